//! `granary server`: a cache worker serving its namespace over gRPC and QUIC and, with `[fuse]
//! mount` (or `--mount`), the node's FUSE mount in its own process: a block this node holds is
//! read without leaving the process, a pinned file opens by passthrough.

use crate::mount_flags::fuse_section_config;
use crate::runtime;
use anyhow::Context;
use clap::Args;
use granary_cache_server::config::{FuseSection, TlsSection};
use granary_cache_server::worker::{Cluster, LocalReads};
use granary_cache_server::{ConfigFile, Settings, Worker, grpc};
use granary_core::ByteSize;
use granary_fuse_client::{FsConfig, GranaryFs, Handoff};
use granary_net::membership::{Etcd, MemberInfo, Membership};
use granary_net::quic::{self, BlockClient};
use granary_net::tls::TlsIdentity;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// Join the cluster registered in etcd (overrides `cluster.etcd`; needs TLS).
    #[arg(long, value_name = "URL[,URL]", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// TLS material: ca.pem, NODE_ID.pem and NODE_ID.key in DIR (overrides `[tls]`).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The scheduler hook (`granary scheduler`), whose gangs the dashboard at `/` of the
    /// metrics address shows.
    /// `https://` (a hook with --tls-dir) is asked with this worker's certificate.
    #[arg(long, value_name = "https://HOST:PORT")]
    pub scheduler_url: Option<String>,
    /// Serve the node's FUSE mount at DIR in this process (overrides `[fuse] mount`).
    #[arg(long, value_name = "DIR")]
    pub mount: Option<PathBuf>,
    /// Serve the mount from this process alone, with no keeper (overrides `[fuse] keeper`):
    /// when the worker dies, the mount dies with it.
    #[arg(long)]
    pub no_keeper: bool,
}

/// The file system name of a worker's node mount.
const FSNAME: &str = "granary:node";

/// What the keeper mounts for the worker's node mount; `None` without a mount, with `keeper =
/// false` (or `io_uring`), and when the config does not load (the command itself then says why).
pub fn kept(args: &ServerArgs) -> Option<crate::keeper::Kept> {
    if args.check_config {
        return None;
    }
    let file = config_file(args).ok()?;
    let metadata_ttl = file.settings().ok()?.metadata_ttl;
    let (dir, config) = node_mount(&file, metadata_ttl).ok()??;
    let keeper = file.fuse.as_ref().and_then(|f| f.keeper).unwrap_or(true);
    (keeper && !config.io_uring).then(|| crate::keeper::Kept {
        dir,
        fsname: FSNAME.into(),
        config,
    })
}

/// The directory a worker's node mount is at, if it has one.
pub fn mount_dir(args: &ServerArgs) -> Option<PathBuf> {
    config_file(args).ok()?.fuse?.mount
}

/// The node mount the config asks for: where, and the client's configuration (its attribute
/// TTL defaulting to the worker's `metadata_ttl`).
fn node_mount(
    file: &ConfigFile,
    metadata_ttl: std::time::Duration,
) -> anyhow::Result<Option<(PathBuf, FsConfig)>> {
    let Some(section) = &file.fuse else {
        return Ok(None);
    };
    let Some(dir) = &section.mount else {
        return Ok(None);
    };
    Ok(Some((
        dir.clone(),
        fuse_section_config(section, metadata_ttl)?,
    )))
}

/// The config file with the command line's overrides.
fn config_file(args: &ServerArgs) -> anyhow::Result<ConfigFile> {
    let mut file = ConfigFile::load(&args.config)?;
    if let Some(v) = &args.node_id {
        file.node_id = Some(v.clone());
    }
    if let Some(v) = &args.listen {
        file.listen = Some(v.clone());
    }
    if let Some(v) = &args.cache_dir {
        file.cache.dir = Some(v.clone());
    }
    if let Some(v) = args.memory_cache {
        file.cache.memory = Some(v.to_string());
    }
    if let Some(v) = args.disk_cache {
        file.cache.disk = Some(v.to_string());
    }
    if let Some(v) = &args.metrics_addr {
        file.metrics_addr = Some(v.clone());
    }
    if !args.etcd.is_empty() {
        let mut cluster = file.cluster.take().unwrap_or_default();
        cluster.etcd = args.etcd.clone();
        cluster.members.clear();
        file.cluster = Some(cluster);
    }
    if let Some(dir) = &args.tls_dir {
        file.tls = Some(TlsSection {
            dir: Some(dir.clone()),
            ..TlsSection::default()
        });
    }
    if args.mount.is_some() || args.no_keeper {
        let fuse = file.fuse.get_or_insert_with(FuseSection::default);
        if let Some(dir) = &args.mount {
            fuse.mount = Some(dir.clone());
        }
        if args.no_keeper {
            fuse.keeper = Some(false);
        }
    }
    Ok(file)
}

pub async fn run(args: ServerArgs, handoff: Option<Handoff>) -> anyhow::Result<()> {
    let file = config_file(&args)?;
    let settings = file.settings()?;
    let node_mount = node_mount(&file, settings.metadata_ttl)?;
    if args.check_config {
        println!(
            "{}: ok ({} mounts{})",
            args.config.display(),
            settings.namespace.mounts().len(),
            match &node_mount {
                Some((dir, _)) => format!(", node mount at {}", dir.display()),
                None => String::new(),
            }
        );
        return Ok(());
    }
    // Fail on a bad mount point or /dev/fuse before touching any backend (a keeper checked
    // them, and the mount is there now).
    if let Some((dir, _)) = &node_mount
        && handoff.is_none()
    {
        granary_fuse_client::check_mount_dir(dir)?;
        granary_fuse_client::check_fuse_device()?;
    }
    if settings.tls.is_none() && !settings.listen.ip().is_loopback() {
        anyhow::bail!(
            "listen {}: without [tls] the worker API is plaintext and unauthenticated, so it listens on loopback only; set [tls] (dir = ...) or listen on 127.0.0.1",
            settings.listen
        );
    }
    let _lock = runtime::lock_cache_dir(&settings.cache.dir)?;
    let listener = grpc::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    if let Some(url) = &args.scheduler_url
        && !(url.starts_with("http://") || (url.starts_with("https://") && settings.tls.is_some()))
    {
        anyhow::bail!(
            "--scheduler-url {url:?}: give https://HOST:PORT (with [tls]: the hook checks this worker's certificate) or http://HOST:PORT (a hook on loopback)"
        );
    }
    let metrics = match settings.metrics_addr {
        Some(addr) => Some(runtime::metrics_endpoint(addr).await?),
        None => None,
    };
    let tls = settings.tls.as_ref().map(TlsIdentity::load).transpose()?;
    let data_plane = match &tls {
        Some(tls) => Some(quic::server_endpoint(settings.listen, tls)?),
        None => None,
    };
    let cluster = match (&settings.cluster, &tls) {
        (Some(_), Some(tls)) => Some(join_cluster(&settings, tls).await?),
        _ => None,
    };
    let worker = Worker::start_with(settings.clone(), cluster).await?;
    if settings.datasets.open() {
        tracing::warn!(
            "no [[tenant]] and no datasets.admin_token configured: anyone who reaches this worker's API may pin and unpin datasets"
        );
    }
    worker
        .datasets()
        .clone()
        .start(worker.clone())
        .context("cannot start the dataset loader's threads")?;
    if let Some(metrics) = metrics {
        metrics.serve(crate::dashboard::router(
            worker.clone(),
            args.scheduler_url.clone(),
        ));
    }
    if let Some(endpoint) = data_plane {
        let reads = Arc::new(LocalReads(worker.clone()));
        tokio::spawn(quic::serve(endpoint, reads, runtime::shutdown_signal()));
    }
    // The node mount reads through this worker in process: its own blocks never cross QUIC.
    let mounted = match node_mount {
        Some((dir, config)) => {
            let fs = Arc::new(GranaryFs::new(worker.clone(), config));
            let mounted = match handoff {
                Some(handoff) => granary_fuse_client::serve_handed(fs, &dir, handoff).await?,
                None => granary_fuse_client::mount(fs, &dir, FSNAME)?,
            };
            runtime::watch_mount(&dir);
            println!("granary: node mount at {}", dir.display());
            Some(mounted)
        }
        None => None,
    };
    println!(
        "granary: worker {} serving on {}",
        settings.node_id, settings.listen
    );
    grpc::serve_worker(
        worker.clone(),
        listener,
        tls.clone(),
        runtime::shutdown_signal(),
    )
    .await?;
    if let Some(mounted) = mounted {
        tokio::task::spawn_blocking(move || mounted.unmount())
            .await?
            .context("unmount failed")?;
    }
    worker.close().await;
    Ok(())
}

async fn join_cluster(settings: &Settings, tls: &TlsIdentity) -> anyhow::Result<Cluster> {
    let cluster = settings.cluster.as_ref().expect("cluster settings");
    if settings.listen.ip().is_unspecified() {
        anyhow::bail!(
            "listen {} is not an address peers can reach: give the node's own IP",
            settings.listen
        );
    }
    let me = MemberInfo {
        node_id: settings.node_id.clone(),
        data_addr: settings.listen,
        api_addr: settings.listen,
        memory_capacity: settings.cache.memory.bytes(),
        disk_capacity: settings.cache.disk.bytes(),
        dataset_capacity: settings.datasets.capacity.bytes(),
    };
    let peers = BlockClient::new(tls)?;
    let etcd = if cluster.etcd.is_empty() {
        None
    } else {
        Some(Etcd::new(&cluster.etcd, tls.clone())?)
    };
    if let Some(etcd) = &etcd {
        // Refuse to join a cluster whose members refuse our certificate.
        let view = Membership::read(etcd).await?;
        for m in view
            .members
            .iter()
            .filter(|m| m.node_id != settings.node_id)
            .take(3)
        {
            if let Err(reason) = peers
                .probe(m.data_addr, &m.node_id, Duration::from_secs(3))
                .await
            {
                anyhow::bail!(
                    "TLS refused between this worker and {} at {}: {reason} (check [tls]: the cluster CA, this node's certificate and key)",
                    m.node_id,
                    m.data_addr
                );
            }
        }
    }
    let membership = if let Some(etcd) = &etcd {
        Membership::join(etcd, me, cluster.lease_ttl).await?
    } else {
        let members = cluster
            .members
            .iter()
            .map(|(id, addr)| MemberInfo {
                node_id: id.clone(),
                data_addr: *addr,
                api_addr: *addr,
                memory_capacity: 0,
                disk_capacity: 0,
                dataset_capacity: 0,
            })
            .collect();
        Membership::fixed(members)
    };
    Ok(Cluster {
        membership,
        etcd,
        peers,
        replicas: cluster.replicas,
        peer_timeout: cluster.peer_timeout,
    })
}
