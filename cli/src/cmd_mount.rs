//! `granary mount`: a FUSE mount of a remote worker's namespace.

use crate::cmd_up::{current_gid, current_uid};
use crate::runtime;
use clap::Args;
use granary_core::{ByteSize, parse_duration};
use granary_fuse_client::{FsConfig, GranaryFs};
use granary_proto::client::GrpcCache;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct MountArgs {
    /// The worker to read from.
    #[arg(long, value_name = "HOST:PORT")]
    pub server: String,
    /// Where to mount (an existing, empty directory).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// How long attributes are trusted before asking the worker again.
    #[arg(long, value_name = "DURATION", default_value = "30s")]
    pub attr_ttl: String,
    /// Readahead per open file.
    #[arg(long, value_name = "SIZE", default_value = "64MiB")]
    pub readahead: ByteSize,
    /// Readahead across all open files.
    #[arg(long, value_name = "SIZE", default_value = "128MiB")]
    pub readahead_total: ByteSize,
}

pub async fn run(args: MountArgs) -> anyhow::Result<()> {
    let attr_ttl = parse_duration(&args.attr_ttl)?;
    granary_fuse_client::check_mount_dir(&args.dir)?;
    granary_fuse_client::check_fuse_device()?;
    if let Some(addr) = args.metrics_addr {
        runtime::serve_metrics(addr).await?;
    }
    let api = Arc::new(GrpcCache::connect(&args.server, Duration::from_secs(10)).await?);
    let config = FsConfig {
        attr_ttl,
        readahead_per_file: args.readahead.bytes(),
        readahead_total: args.readahead_total.bytes(),
        uid: current_uid(),
        gid: current_gid(),
        ..FsConfig::default()
    };
    let fs = Arc::new(GranaryFs::new(api, config));
    let mounted = granary_fuse_client::mount(fs, &args.dir, &format!("granary:{}", args.server))?;
    println!(
        "granary: worker {} mounted at {}",
        args.server,
        args.dir.display()
    );
    runtime::shutdown_signal().await;
    tokio::task::spawn_blocking(move || mounted.unmount()).await??;
    Ok(())
}
