//! `granary signer` (the only holder of the CA key: approves and signs node certificate
//! requests) and `granary certs --csr` (a node's certificate through the Kubernetes CSR API).

use anyhow::{Context, bail};
use clap::Args;
use granary_core::parse_duration;
use granary_node_certs::ca::Ca;
use granary_node_certs::policy::WorkerAccount;
use granary_node_certs::request::{self, NodeRequest};
use granary_node_certs::signer::{Signer, SignerConfig, parse_object_ref};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

const DEFAULT_SIGNER: &str = "granary.io/node";
const DEFAULT_CA_CONFIGMAP: &str = "granary/granary-ca-cert";
const MIN_LIFETIME: Duration = Duration::from_secs(10);
const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Args, Debug)]
pub struct SignerArgs {
    /// Directory holding the cluster CA: ca.pem and ca.key.
    #[arg(long, value_name = "DIR")]
    pub ca_dir: PathBuf,
    /// Kubeconfig to reach the API server [default: in-cluster service account, else
    /// $KUBECONFIG or ~/.kube/config].
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The signer name of the requests to handle.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_SIGNER)]
    pub signer_name: String,
    /// The only account whose requests are signed.
    #[arg(
        long,
        value_name = "USER",
        default_value = "system:serviceaccount:granary:granary-worker"
    )]
    pub worker_account: String,
    /// Lifetime of an issued certificate (10s to 366d).
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    pub lifetime: String,
    /// ConfigMap the CA certificate is published in (key ca.pem).
    #[arg(long, value_name = "NAMESPACE/NAME", default_value = DEFAULT_CA_CONFIGMAP)]
    pub ca_configmap: String,
    /// Serve Prometheus metrics (granary_csr_decisions_total) at http://ADDR/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// DNS names every node certificate also carries (repeat or comma-separate): the workers'
    /// Service, through which the scheduler hook and `granary dataset --server` reach any worker.
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    pub service_name: Vec<String>,
}

/// `granary certs --csr` options.
#[derive(Args, Debug)]
pub struct CsrArgs {
    /// Kubeconfig to reach the API server with --csr [default: in-cluster service account].
    #[arg(long, value_name = "PATH", requires = "csr")]
    pub kubeconfig: Option<PathBuf>,
    /// Signer name to ask with --csr.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_SIGNER)]
    pub signer_name: String,
    /// ConfigMap the signer publishes the CA certificate in (key ca.pem), with --csr.
    #[arg(long, value_name = "NAMESPACE/NAME", default_value = DEFAULT_CA_CONFIGMAP)]
    pub ca_configmap: String,
    /// How long to wait for the signer's answer, with --csr.
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    pub timeout: String,
}

fn check_signer_name(name: &str) -> anyhow::Result<()> {
    match name.split_once('/') {
        Some((domain, path)) if domain.contains('.') && !path.is_empty() => Ok(()),
        _ => bail!("--signer-name {name:?} is not DOMAIN/NAME (e.g. {DEFAULT_SIGNER})"),
    }
}

fn check_node_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if !ok {
        bail!("--node {name:?} is not a Kubernetes node name (lowercase DNS name)");
    }
    Ok(())
}

fn bounded(text: &str, flag: &str, min: Duration, max: Duration) -> anyhow::Result<Duration> {
    let d = parse_duration(text).with_context(|| flag.to_string())?;
    if d < min || d > max {
        bail!("{flag} {text} is out of range ({min:?} to {max:?})");
    }
    Ok(d)
}

pub async fn run(args: SignerArgs) -> anyhow::Result<()> {
    check_signer_name(&args.signer_name)?;
    let account = WorkerAccount::parse(&args.worker_account)
        .map_err(anyhow::Error::msg)
        .context("--worker-account")?;
    let lifetime = bounded(&args.lifetime, "--lifetime", MIN_LIFETIME, MAX_LIFETIME)?;
    let ca_config_map = parse_object_ref(&args.ca_configmap)
        .map_err(anyhow::Error::msg)
        .context("--ca-configmap")?;
    let ca = Ca::load(&args.ca_dir)?;
    if let Some(addr) = args.metrics_addr {
        crate::runtime::serve_metrics(addr).await?;
    }
    let client = crate::runtime::kube_client(args.kubeconfig.as_deref()).await?;
    tracing::info!(signer = %args.signer_name, account = %args.worker_account, ?lifetime, "signer starting");
    let signer = Signer::new(
        client,
        ca,
        SignerConfig {
            signer_name: args.signer_name,
            account,
            lifetime,
            ca_config_map,
            service_names: args
                .service_name
                .iter()
                .map(|n| {
                    granary_core::placement::check_node_id(n)
                        .map(|()| n.clone())
                        .map_err(|e| anyhow::anyhow!("--service-name: {e}"))
                })
                .collect::<anyhow::Result<_>>()?,
        },
    );
    tokio::select! {
        done = signer.run() => done?,
        _ = crate::runtime::shutdown_signal() => {}
    }
    Ok(())
}

/// `granary certs --csr --node NAME --out DIR [--renew]`.
pub async fn certs_by_csr(
    node: String,
    out: PathBuf,
    renew: bool,
    opts: CsrArgs,
) -> anyhow::Result<()> {
    check_node_name(&node)?;
    check_signer_name(&opts.signer_name)?;
    let timeout = bounded(
        &opts.timeout,
        "--timeout",
        Duration::from_secs(1),
        MAX_TIMEOUT,
    )?;
    let ca_config_map = parse_object_ref(&opts.ca_configmap)
        .map_err(anyhow::Error::msg)
        .context("--ca-configmap")?;
    let req = NodeRequest {
        node,
        out,
        signer_name: opts.signer_name,
        ca_config_map,
        timeout,
    };
    let client = crate::runtime::kube_client(opts.kubeconfig.as_deref()).await?;
    let validity = match req.current(SystemTime::now()) {
        Ok(v) => {
            tracing::info!(node = %req.node, "the certificate in place is valid; kept");
            v
        }
        Err(why) => {
            tracing::info!(node = %req.node, %why, "asking for a certificate");
            req.obtain(&client).await?
        }
    };
    for file in [
        "ca.pem".to_string(),
        format!("{}.pem", req.node),
        format!("{}.key", req.node),
    ] {
        println!("{}", req.out.join(file).display());
    }
    if renew {
        tokio::select! {
            () = request::keep_renewed(&client, &req, validity) => {}
            _ = crate::runtime::shutdown_signal() => {}
        }
    }
    Ok(())
}
