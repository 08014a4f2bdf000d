//! `granary scheduler`: the kube-scheduler extender (docs/SCHEDULING.md). Wires the hook
//! (`granary-scheduler-hook`) to the Kubernetes API and to the cache cluster's Datasets API.

use anyhow::Context;
use clap::Args;
use granary_core::{ByteSize, parse_duration};
use granary_net::datasets::DatasetClient;
use granary_proto::ApiError;
use granary_proto::datasets::DatasetStatus;
use granary_scheduler_hook::data::{BoxFuture, DataSource, DatasetView, NodeBytes};
use granary_scheduler_hook::kube::{KubeCluster, spawn_watches};
use granary_scheduler_hook::{CallError, Hook, HookConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct SchedulerArgs {
    /// Address the extender serves on (POST /filter, /prioritize, /bind, /preempt; GET /gangs,
    /// /healthz). Point the KubeSchedulerConfiguration's extender urlPrefix at it. Without
    /// --tls-dir only a loopback address is accepted.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8888")]
    pub listen: SocketAddr,
    /// Serve HTTPS with mutual TLS: DIR/ca.pem signs the clients accepted (kube-scheduler's
    /// extender tlsConfig certFile/keyFile), DIR/NAME.pem and DIR/NAME.key are the hook's own
    /// (`granary certs --out DIR scheduler kube-scheduler`). The same files secure its calls to
    /// the workers' Datasets API.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The hook's certificate in --tls-dir (NAME.pem, NAME.key).
    #[arg(long, value_name = "NAME", default_value = "scheduler")]
    pub tls_name: String,
    /// Kubeconfig to reach the API server [default: in-cluster service account, else
    /// $KUBECONFIG or ~/.kube/config].
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// A cache worker's API address (any worker of the cluster): dataset readiness and loads.
    #[arg(long, value_name = "HOST:PORT", env = "GRANARY_SERVER")]
    pub cache_server: String,
    /// Bearer token for the Datasets API. Give it a limited one (the workers' scheduler token:
    /// dataset status and loads only), not the admin's.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "GRANARY_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Read the Datasets API token from FILE (one line; e.g. a mounted Secret); overrides
    /// --token and GRANARY_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// How long a gang released for binding (placed, data ready) keeps its reserved GPUs while
    /// its members bind; members not bound by then release the whole reservation.
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    pub reservation_ttl: String,
    /// The longest a planned gang holds its GPUs while its data loads; then it starts without
    /// the data (a gang's granary.io/ready-timeout may be shorter).
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    pub max_warming: String,
    /// Node label whose value is the topology domain a gang should stay within.
    #[arg(
        long,
        value_name = "LABEL",
        default_value = "topology.kubernetes.io/zone"
    )]
    pub topology_key: String,
    /// Largest extender request body accepted (larger ones get HTTP 400).
    #[arg(long, value_name = "SIZE", default_value = "32MiB")]
    pub max_body: ByteSize,
    /// Serve Prometheus metrics on this address (/metrics).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// The cache cluster's Datasets API as the hook's data source.
struct CacheData {
    client: DatasetClient,
}

fn view(s: DatasetStatus) -> DatasetView {
    DatasetView {
        name: s.name,
        nodes: s.nodes,
        load: s.load,
        per_node: s
            .node_progress
            .into_iter()
            .map(|p| {
                (
                    p.node,
                    NodeBytes {
                        ready: p.bytes_ready,
                        total: p.bytes_total,
                        state: p.state.as_str().into(),
                    },
                )
            })
            .collect(),
    }
}

impl DataSource for CacheData {
    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<DatasetView, CallError>> {
        Box::pin(async move { self.client.status(name).await.map(view).map_err(call_error) })
    }

    fn load<'a>(
        &'a self,
        name: &'a str,
        nodes: Vec<String>,
    ) -> BoxFuture<'a, Result<DatasetView, CallError>> {
        Box::pin(async move {
            self.client
                .load(name, nodes)
                .await
                .map(view)
                .map_err(call_error)
        })
    }
}

/// A Datasets API error as the hook sees it (the text unchanged).
fn call_error(e: ApiError) -> CallError {
    let text = e.to_string();
    match e {
        ApiError::NotFound(_) => CallError::NotFound(text),
        ApiError::Invalid(_)
        | ApiError::Denied(_)
        | ApiError::Exhausted(_)
        | ApiError::NotADirectory(_) => CallError::Refused(text),
        _ => CallError::Unavailable(text),
    }
}

/// The token from --token-file, else --token (or GRANARY_TOKEN).
fn token(args: &SchedulerArgs) -> anyhow::Result<Option<String>> {
    match &args.token_file {
        Some(file) => crate::cmd_dataset::read_token_file(file).map(Some),
        None => Ok(args.token.clone()),
    }
}

pub async fn run(args: SchedulerArgs) -> anyhow::Result<()> {
    if args.tls_dir.is_none() && !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "--listen {}: without --tls-dir the extender serves plain HTTP, so only a loopback \
             address (127.0.0.1, ::1) is accepted; give --tls-dir DIR (ca.pem and the hook's \
             NAME.pem/NAME.key) to serve other hosts over mutual TLS",
            args.listen
        );
    }
    let tls = match &args.tls_dir {
        Some(dir) => {
            let files = granary_net::tls::TlsFiles::in_dir(dir, &args.tls_name);
            let identity = granary_net::tls::TlsIdentity::load(&files).with_context(|| {
                format!(
                    "--tls-dir {} --tls-name {}: ca.pem, {name}.pem and {name}.key",
                    dir.display(),
                    args.tls_name,
                    name = args.tls_name
                )
            })?;
            let server = identity.server_config().context("--tls-dir")?;
            Some((identity, server))
        }
        None => None,
    };
    let token = token(&args)?;
    let reservation_ttl = parse_duration(&args.reservation_ttl).context("--reservation-ttl")?;
    let max_warming = parse_duration(&args.max_warming).context("--max-warming")?;
    anyhow::ensure!(
        !args.topology_key.trim().is_empty(),
        "--topology-key must not be empty"
    );
    let max_body = usize::try_from(args.max_body.0)
        .ok()
        .filter(|&n| n >= 1024)
        .context("--max-body must be at least 1KiB")?;
    if let Some(addr) = args.metrics_addr {
        crate::runtime::serve_metrics(addr).await?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let data = DatasetClient::connect_with(
        &args.cache_server,
        tls.as_ref().map(|(identity, _)| identity),
        token.as_deref(),
    )
    .await
    .with_context(|| format!("cache server {}", args.cache_server))?;
    let kube = crate::runtime::kube_client(args.kubeconfig.as_deref()).await?;
    kube.apiserver_version()
        .await
        .context("cannot reach the Kubernetes API server")?;
    let config = HookConfig {
        reservation_ttl,
        topology_key: args.topology_key,
        max_warming,
        ..HookConfig::default()
    };
    let hook = Hook::new(
        config,
        Arc::new(CacheData { client: data }),
        Arc::new(KubeCluster {
            client: kube.clone(),
        }),
    );
    spawn_watches(kube, hook.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ticker = {
        let mut rx = stop_rx.clone();
        tokio::spawn(hook.clone().run(Duration::from_millis(500), async move {
            let _ = rx.wait_for(|s| *s).await;
        }))
    };
    tracing::info!(listen = %args.listen, cache_server = %args.cache_server,
        tls = tls.is_some(), "scheduler hook serving");
    let router = granary_scheduler_hook::http::router(hook, max_body);
    let mut rx = stop_rx;
    let stopped = async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = match tls {
        Some((_, config)) => tokio::spawn(granary_scheduler_hook::http::serve_tls(
            listener, config, router, stopped,
        )),
        None => tokio::spawn(granary_scheduler_hook::http::serve(
            listener, router, stopped,
        )),
    };
    crate::runtime::shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = ticker.await;
    server
        .await
        .context("the HTTP server task")?
        .context("the HTTP server")?;
    Ok(())
}
