//! `granary up`: a worker and a FUSE mount of one source, in one process.

use crate::runtime;
use anyhow::Context;
use clap::Args;
use granary_cache_server::config::{CacheSection, ConfigFile, MountSection};
use granary_cache_server::{Worker, grpc};
use granary_core::{ByteSize, parse_duration};
use granary_fuse_client::{FsConfig, GranaryFs};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// What to serve: s3://bucket/prefix, file:///path or an absolute path.
    #[arg(long, value_name = "URI")]
    pub source: String,
    /// Where to mount it (an existing, empty directory).
    #[arg(long, value_name = "DIR")]
    pub mount: PathBuf,
    /// Directory of the disk cache [default: $GRANARY_CACHE_DIR, /var/cache/granary as root, else ~/.cache/granary].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Memory cache size, e.g. 512MiB or 4GiB.
    #[arg(long, value_name = "SIZE", default_value = "512MiB")]
    pub memory_cache: ByteSize,
    /// Disk cache size (0 disables the disk tier).
    #[arg(long, value_name = "SIZE", default_value = "4GiB")]
    pub disk_cache: ByteSize,
    /// Cache block size: a power of two from 64KiB to 64MiB.
    #[arg(long, value_name = "SIZE", default_value = "4MiB")]
    pub block_size: ByteSize,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Also serve the worker API (gRPC) here, for clients on other nodes.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<SocketAddr>,
    /// How long listings and attributes are trusted before asking the backend again.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub metadata_ttl: String,
    /// Readahead per open file.
    #[arg(long, value_name = "SIZE", default_value = "64MiB")]
    pub readahead: ByteSize,
    /// Readahead across all open files.
    #[arg(long, value_name = "SIZE", default_value = "128MiB")]
    pub readahead_total: ByteSize,
    /// How long the kernel keeps the entries of a pinned dataset's files while the worker's pins
    /// stay the same (it is told to drop them as soon as they change; at least the attribute TTL).
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    pub pinned_ttl: String,
    /// Never open local copies of pinned files with kernel FUSE passthrough (read them through
    /// the daemon instead).
    #[arg(long)]
    pub no_passthrough: bool,
    /// Take kernel requests over FUSE-over-io_uring (Linux 6.14+; as root this turns on the fuse
    /// module's enable_uring): one ring per CPU, answered on the requester's CPU. Faster opens,
    /// stats and small reads (pinned datasets: passthrough opens), one more copy on large reads
    /// through the daemon. Without it, or where the kernel lacks it: /dev/fuse.
    #[arg(long, env = "GRANARY_IO_URING", value_parser = clap::builder::BoolishValueParser::new())]
    pub io_uring: bool,
    /// The job or pod this mount serves: a label of its data-stall metric (keep it low-cardinality).
    #[arg(long, value_name = "NAME", env = "GRANARY_JOB", default_value = "")]
    pub job: String,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let pinned_ttl = parse_duration(&args.pinned_ttl).context("--pinned-ttl")?;
    let file = ConfigFile {
        listen: args.listen.map(|a| a.to_string()),
        metadata_ttl: Some(args.metadata_ttl.clone()),
        cache: CacheSection {
            dir: args.cache_dir.clone(),
            memory: Some(args.memory_cache.to_string()),
            disk: Some(args.disk_cache.to_string()),
            block_size: Some(args.block_size.to_string()),
        },
        mounts: vec![MountSection {
            path: "/".into(),
            source: args.source.clone(),
        }],
        ..ConfigFile::default()
    };
    let settings = file.settings()?;
    // Fail on a bad mount point or /dev/fuse before touching any backend.
    granary_fuse_client::check_mount_dir(&args.mount)?;
    granary_fuse_client::check_fuse_device()?;
    let _lock = runtime::lock_cache_dir(&settings.cache.dir)?;
    let grpc_listener = match args.listen {
        Some(addr) => Some(
            grpc::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        ),
        None => None,
    };
    if let Some(addr) = args.metrics_addr {
        runtime::serve_metrics(addr).await?;
    }
    let worker = Worker::start(settings.clone()).await?;
    worker
        .datasets()
        .clone()
        .start(worker.clone())
        .context("cannot start the dataset loader's threads")?;
    let fs_config = FsConfig {
        attr_ttl: settings.metadata_ttl,
        pinned_ttl,
        readahead_per_file: args.readahead.bytes(),
        readahead_total: args.readahead_total.bytes(),
        passthrough: !args.no_passthrough,
        io_uring: args.io_uring,
        job: args.job.clone(),
        uid: current_uid(),
        gid: current_gid(),
        ..FsConfig::default()
    };
    let fs = Arc::new(GranaryFs::new(worker.clone(), fs_config));
    let mounted = granary_fuse_client::mount(fs, &args.mount, &args.source)?;
    println!(
        "granary: {} mounted at {}",
        args.source,
        args.mount.display()
    );
    tracing::info!(
        source = %args.source,
        mount = %args.mount.display(),
        cache_dir = %settings.cache.dir.display(),
        memory = %settings.cache.memory,
        disk = %settings.cache.disk,
        block_size = %ByteSize(settings.cache.block_size.get()),
        "ready"
    );
    match grpc_listener {
        Some(listener) => {
            tracing::info!(addr = ?args.listen, "serving the worker API");
            grpc::serve_worker(worker.clone(), listener, runtime::shutdown_signal()).await?;
        }
        None => runtime::shutdown_signal().await,
    }
    tokio::task::spawn_blocking(move || mounted.unmount())
        .await?
        .context("unmount failed")?;
    worker.close().await;
    tracing::info!("unmounted; bye");
    Ok(())
}

pub fn current_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0)
}

pub fn current_gid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .unwrap_or(0)
}
