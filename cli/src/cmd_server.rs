//! `granary server`: a cache worker serving its namespace over gRPC.

use crate::runtime;
use anyhow::Context;
use clap::Args;
use granary_cache_server::{ConfigFile, Worker, grpc};
use granary_core::ByteSize;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// The worker's TOML config (see docs/CONFIGURATION.md).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Only validate the config and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Overrides `node_id`.
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Overrides `listen`: where the worker API (gRPC) listens.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Overrides `cache.dir`.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Overrides `cache.memory`.
    #[arg(long, value_name = "SIZE")]
    pub memory_cache: Option<ByteSize>,
    /// Overrides `cache.disk`.
    #[arg(long, value_name = "SIZE")]
    pub disk_cache: Option<ByteSize>,
    /// Overrides `metrics_addr`.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let mut file = ConfigFile::load(&args.config)?;
    if let Some(v) = args.node_id {
        file.node_id = Some(v);
    }
    if let Some(v) = args.listen {
        file.listen = Some(v);
    }
    if let Some(v) = args.cache_dir {
        file.cache.dir = Some(v);
    }
    if let Some(v) = args.memory_cache {
        file.cache.memory = Some(v.to_string());
    }
    if let Some(v) = args.disk_cache {
        file.cache.disk = Some(v.to_string());
    }
    if let Some(v) = args.metrics_addr {
        file.metrics_addr = Some(v);
    }
    let settings = file.settings()?;
    if args.check_config {
        println!(
            "{}: ok ({} mounts)",
            args.config.display(),
            settings.namespace.mounts().len()
        );
        return Ok(());
    }
    let _lock = runtime::lock_cache_dir(&settings.cache.dir)?;
    let listener = grpc::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    if let Some(addr) = settings.metrics_addr {
        runtime::serve_metrics(addr).await?;
    }
    let worker = Worker::start(settings.clone()).await?;
    println!(
        "granary: worker {} serving on {}",
        settings.node_id, settings.listen
    );
    grpc::serve(worker.clone(), listener, runtime::shutdown_signal()).await?;
    worker.close().await;
    Ok(())
}
