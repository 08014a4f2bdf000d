//! `granary up`: a worker and a FUSE mount of one source, in one process.

use crate::mount_flags::{MountFlags, default_attr_ttl};
use crate::runtime;
use anyhow::Context;
use clap::Args;
use granary_cache_server::config::{CacheSection, ConfigFile, MountSection};
use granary_cache_server::{Worker, grpc};
use granary_core::ByteSize;
use granary_fuse_client::{GranaryFs, Handoff};
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
    #[arg(long, value_name = "DURATION", default_value_t = default_attr_ttl())]
    pub metadata_ttl: String,
    #[command(flatten)]
    pub client: MountFlags,
}

/// What the keeper mounts for `up`; `None` with `--no-keeper` (or `--io-uring`), and when the
/// flags do not parse (the command itself then says why).
pub fn kept(args: &UpArgs) -> Option<crate::keeper::Kept> {
    let ttl = granary_core::parse_duration(&args.metadata_ttl).ok()?;
    let fsname = format!("granary:{}", args.source);
    args.client.kept(&args.mount, fsname, ttl).ok().flatten()
}

pub async fn run(args: UpArgs, handoff: Option<Handoff>) -> anyhow::Result<()> {
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
            tenants: None,
        }],
        ..ConfigFile::default()
    };
    let settings = file.settings()?;
    let fs_config = args.client.fs_config(settings.metadata_ttl)?;
    // Fail on a bad mount point or /dev/fuse before touching any backend (a keeper checked
    // them, and the mount is there now).
    if handoff.is_none() {
        granary_fuse_client::check_mount_dir(&args.mount)?;
        granary_fuse_client::check_fuse_device()?;
    }
    let _lock = runtime::lock_cache_dir(&settings.cache.dir)?;
    let grpc_listener = match args.listen {
        Some(addr) if !addr.ip().is_loopback() => anyhow::bail!(
            "--listen {addr}: `granary up` serves its worker API plaintext and unauthenticated, so on loopback only; for other machines run `granary server` with [tls]"
        ),
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
    let fs = Arc::new(GranaryFs::new(worker.clone(), fs_config));
    let mounted = match handoff {
        Some(handoff) => granary_fuse_client::serve_handed(fs, &args.mount, handoff).await?,
        None => granary_fuse_client::mount(fs, &args.mount, &format!("granary:{}", args.source))?,
    };
    runtime::watch_mount(&args.mount);
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
            grpc::serve_worker(worker.clone(), listener, None, runtime::shutdown_signal()).await?;
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
