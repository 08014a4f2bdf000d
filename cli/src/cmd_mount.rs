//! `granary mount`: a FUSE mount of a remote worker's namespace.

use crate::mount_flags::{MountFlags, default_attr_ttl};
use crate::runtime;
use crate::tls_args;
use anyhow::Context;
use clap::Args;
use granary_core::parse_duration;
use granary_fuse_client::{GranaryFs, Handoff};
use granary_net::client::GrpcCache;
use granary_net::cluster::ClusterClient;
use granary_net::membership::Membership;
use granary_net::tls::{TlsFiles, TlsIdentity};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct MountArgs {
    /// The worker to read from.
    #[arg(long, value_name = "HOST:PORT", required_unless_present_any = ["etcd", "upgrade"])]
    pub server: Option<String>,
    /// Read from the whole cluster registered in etcd: each block from the worker that owns it.
    #[arg(
        long,
        value_name = "URL[,URL]",
        value_delimiter = ',',
        conflicts_with = "server"
    )]
    pub etcd: Vec<String>,
    /// TLS material (ca.pem, NAME.pem, NAME.key): needed with --etcd, and with --server for a
    /// worker with `[tls]` (reading data takes a certificate the cluster CA signed).
    #[arg(long, value_name = "DIR", env = "GRANARY_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The name of this client's certificate in --tls-dir.
    #[arg(long, value_name = "NAME", default_value = "client")]
    pub tls_name: String,
    /// With --etcd: the node id of the worker on this machine, whose cached blocks are read from
    /// it first [default: this host's name, when a worker of that id is a member].
    #[arg(long, value_name = "ID", env = "GRANARY_NODE_ID", requires = "etcd")]
    pub local_node: Option<String>,
    /// With --server: a tenant's token (from the worker's `[[tenant]]`): the mount then shows
    /// and reads only the mounts whose `tenants` name that tenant (or no one), as the worker
    /// checks on every listing and block read. (--etcd mounts take no token: the QUIC data
    /// plane admits nodes by certificate, not tenants.)
    #[arg(
        long,
        value_name = "TOKEN",
        env = "GRANARY_TOKEN",
        hide_env_values = true,
        requires = "server"
    )]
    pub token: Option<String>,
    /// The tenant's token from FILE (one line; e.g. a mounted Secret): unlike --token, it never
    /// shows in the process list. Overrides --token and GRANARY_TOKEN.
    #[arg(
        long,
        value_name = "FILE",
        env = "GRANARY_TOKEN_FILE",
        requires = "server"
    )]
    pub token_file: Option<PathBuf>,
    /// Where to mount (an existing, empty directory).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Upgrade the running mount at DIR (made by `granary mount` or `granary up`) in place:
    /// its keeper starts the binary now on disk, which takes the mount over; readers see no
    /// error. Same as SIGHUP to the keeper.
    #[arg(long, conflicts_with_all = ["server", "etcd"])]
    pub upgrade: bool,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// How long attributes are trusted before asking the worker again.
    #[arg(long, value_name = "DURATION", default_value_t = default_attr_ttl())]
    pub attr_ttl: String,
    #[command(flatten)]
    pub client: MountFlags,
}

/// What the keeper mounts; `None` with `--no-keeper` (or `--io-uring`), and when the flags do
/// not parse (the command itself then says why).
pub fn kept(args: &MountArgs) -> Option<crate::keeper::Kept> {
    let ttl = parse_duration(&args.attr_ttl).ok()?;
    args.client
        .kept(&args.dir, fsname(args), ttl)
        .ok()
        .flatten()
}

fn fsname(args: &MountArgs) -> String {
    match &args.server {
        Some(server) => format!("granary:{server}"),
        None => "granary:cluster".into(),
    }
}

pub async fn run(args: MountArgs, handoff: Option<Handoff>) -> anyhow::Result<()> {
    let config = args.client.fs_config(parse_duration(&args.attr_ttl)?)?;
    if handoff.is_none() {
        granary_fuse_client::check_mount_dir(&args.dir)?;
        granary_fuse_client::check_fuse_device()?;
    }
    if let Some(addr) = args.metrics_addr {
        runtime::serve_metrics(addr).await?;
    }
    let mounted = match &args.server {
        Some(server) => {
            let tls = tls_args::identity(args.tls_dir.as_deref(), Some(&args.tls_name))?;
            let mut api =
                GrpcCache::connect(server, tls.as_ref(), None, Duration::from_secs(10)).await?;
            let token = match &args.token_file {
                Some(file) => Some(crate::cmd_dataset::read_token_file(file)?),
                None => args.token.clone(),
            };
            if let Some(token) = token {
                api = api.with_token(&token)?;
                // The token is checked now: a wrong one fails here, not at the first read.
                granary_proto::CacheApi::list(&api, "/")
                    .await
                    .context("the tenant token")?;
            }
            let api = Arc::new(api);
            let fs = Arc::new(GranaryFs::new(api, config));
            mount(fs, &args, handoff).await?
        }
        None => {
            let tls_dir = args.tls_dir.as_ref().context("--etcd needs --tls-dir")?;
            let tls = TlsIdentity::load(&TlsFiles::in_dir(tls_dir, &args.tls_name))?;
            let etcd = tls_args::etcd(&args.etcd, Some(&tls))?;
            let membership = Membership::watch(&etcd).await?;
            let local = args.local_node.clone().or_else(|| {
                let host = granary_cache_server::config::default_node_id();
                let view = membership.view();
                view.members
                    .iter()
                    .any(|m| m.node_id == host)
                    .then_some(host)
            });
            if let Some(local) = &local {
                tracing::info!(node = %local, "reading blocks the local worker holds from it first");
            }
            let api = Arc::new(
                ClusterClient::connect(membership, &tls, 1, Duration::from_secs(20))
                    .await?
                    .with_local_node(local),
            );
            let fs = Arc::new(GranaryFs::new(api, config));
            mount(fs, &args, handoff).await?
        }
    };
    runtime::watch_mount(&args.dir);
    println!(
        "granary: {} mounted at {}",
        args.server.as_deref().unwrap_or("cluster"),
        args.dir.display()
    );
    runtime::shutdown_signal().await;
    tokio::task::spawn_blocking(move || mounted.unmount()).await??;
    Ok(())
}

/// Mounts `fs`, or serves the mount a keeper handed over.
async fn mount<A: granary_proto::CacheApi>(
    fs: Arc<GranaryFs<A>>,
    args: &MountArgs,
    handoff: Option<Handoff>,
) -> anyhow::Result<granary_fuse_client::Mounted> {
    Ok(match handoff {
        Some(handoff) => granary_fuse_client::serve_handed(fs, &args.dir, handoff).await?,
        None => granary_fuse_client::mount(fs, &args.dir, &fsname(args))?,
    })
}
