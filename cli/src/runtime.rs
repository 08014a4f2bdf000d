//! Process plumbing shared by the subcommands: the tokio runtime, logging, signals, the
//! Prometheus endpoint, and the cache directory lock.

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::fs::File;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpListener;

pub fn block_on<F: Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("granary")
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

/// Logs to stderr, filtered by `GRANARY_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GRANARY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,foyer=warn,fuser=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// The metrics endpoint: bound and its recorder installed at once (so a bad or busy address fails
/// before anything else starts, and no metric emitted during startup is lost), served once
/// `serve` is called with any extra routes (a worker's dashboard).
pub struct MetricsEndpoint {
    listener: TcpListener,
    handle: PrometheusHandle,
    addr: SocketAddr,
}

pub async fn metrics_endpoint(addr: SocketAddr) -> anyhow::Result<MetricsEndpoint> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let seconds = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0,
    ];
    let handle: PrometheusHandle = PrometheusBuilder::new()
        .set_buckets(&seconds)
        .context("histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    Ok(MetricsEndpoint {
        listener,
        handle,
        addr,
    })
}

impl MetricsEndpoint {
    /// Serves `/metrics`, `/healthz` and the routes of `extra`.
    pub fn serve(self, extra: axum::Router) {
        let handle = self.handle;
        let app = extra
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let handle = handle.clone();
                    async move { handle.render() }
                }),
            )
            .route("/healthz", axum::routing::get(healthz));
        let listener = self.listener;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        });
        let addr = self.addr;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
    }
}

/// The mount `/healthz` checks, once there is one.
static HEALTH_MOUNT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
/// Set while a health check's statfs is in the kernel (a hung mount keeps it set).
static HEALTH_PROBING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// From now on `/healthz` answers only if the FUSE mount at `dir` answers.
pub fn watch_mount(dir: &Path) {
    let _ = HEALTH_MOUNT.set(dir.to_path_buf());
}

/// `/healthz`: 200 while the FUSE server answers the kernel: a `statfs` of the mount (which the
/// kernel always sends to the server) comes back within 5 s; 503 naming the problem otherwise.
/// Without a mount (a worker alone): 200.
async fn healthz() -> (axum::http::StatusCode, String) {
    use axum::http::StatusCode;
    use std::sync::atomic::Ordering;
    let Some(dir) = HEALTH_MOUNT.get().cloned() else {
        return (StatusCode::OK, "ok\n".into());
    };
    if HEALTH_PROBING.swap(true, Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("an earlier statfs of {} has not come back\n", dir.display()),
        );
    }
    let probe = tokio::task::spawn_blocking(move || {
        let result = nix::sys::statvfs::statvfs(&dir);
        HEALTH_PROBING.store(false, Ordering::SeqCst);
        result
            .map(drop)
            .map_err(|e| format!("statfs of {}: {e}", dir.display()))
    });
    match tokio::time::timeout(HEALTH_TIMEOUT, probe).await {
        Ok(Ok(Ok(()))) => (StatusCode::OK, "ok\n".into()),
        Ok(Ok(Err(e))) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the FUSE mount did not answer a statfs within {HEALTH_TIMEOUT:?}\n"),
        ),
    }
}

/// Installs the Prometheus recorder and serves `/metrics` on `addr`.
pub async fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_endpoint(addr).await?.serve(axum::Router::new());
    Ok(())
}

/// Takes an exclusive lock on the cache directory for this process's lifetime.
/// A Kubernetes client from `kubeconfig`, or from the in-cluster service account (or
/// `$KUBECONFIG` / `~/.kube/config`) when none is given: the hook's, the signer's and the node's
/// certificate requests'.
pub async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster config and no kubeconfig")?,
    };
    kube::Client::try_from(config).context("cannot build a Kubernetes client")
}

pub fn lock_cache_dir(dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create cache dir {}", dir.display()))?;
    let path = dir.join("granary.lock");
    let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            anyhow::bail!(
                "cache dir {} is in use by another granary process",
                dir.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}
