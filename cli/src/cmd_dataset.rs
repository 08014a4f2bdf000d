//! `granary dataset ...`: pin, load, watch and release datasets through any worker's API.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use granary_core::dataset::{self, LoadState, NodeProgress};
use granary_core::{ByteSize, parse_duration};
use granary_net::datasets::DatasetClient;
use granary_proto::datasets::{DatasetStatus, PinRequest};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct DatasetArgs {
    /// A worker's API address (any worker of the cluster).
    #[arg(
        long,
        global = true,
        value_name = "HOST:PORT",
        env = "GRANARY_SERVER",
        default_value = "127.0.0.1:7070"
    )]
    pub server: String,
    /// The bearer token of a tenant or of the admin (from the workers' config).
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "GRANARY_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Read the bearer token from FILE (one line; e.g. a mounted Kubernetes Secret): unlike
    /// --token, it never shows in the process list. Overrides --token and GRANARY_TOKEN.
    #[arg(long, global = true, value_name = "FILE", env = "GRANARY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The cluster's TLS material: `ca.pem` (workers with `[tls]` speak TLS only; the token
    /// then travels encrypted), and with --tls-name NAME a client certificate.
    #[arg(long, global = true, value_name = "DIR", env = "GRANARY_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The name of a client certificate in --tls-dir (NAME.pem + NAME.key); optional.
    #[arg(long, global = true, value_name = "NAME", env = "GRANARY_TLS_NAME")]
    pub tls_name: Option<String>,
    #[command(subcommand)]
    pub command: DatasetCommand,
}

#[derive(Subcommand, Debug)]
pub enum DatasetCommand {
    /// Pin a directory of the namespace as a dataset: its manifest (every file's size and
    /// version) is frozen now; listings and opens inside it no longer ask the backend.
    Pin {
        name: String,
        /// The dataset's root directory in the namespace, e.g. /data/imagenet.
        #[arg(long, value_name = "PATH")]
        path: String,
        /// The owning tenant [default: the token's tenant; `admin` for the admin token, `default`
        /// when the API has no tokens].
        #[arg(long)]
        tenant: Option<String>,
        /// Unpin automatically after this long (e.g. 12h).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// The nodes to load it onto later (node ids, comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "NODE[,NODE]")]
        nodes: Vec<String>,
        /// Copies of each file across the node set.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        #[arg(long)]
        json: bool,
    },
    /// Load a pinned dataset onto its nodes (or the nodes given): each file whole on local disk.
    Load {
        name: String,
        #[arg(long, value_delimiter = ',', value_name = "NODE[,NODE]")]
        nodes: Vec<String>,
        /// Wait until every byte is on the node set and verified, showing progress.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up (non-zero exit) after this long.
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        timeout: String,
        /// With --wait: give up as soon as a node reports a failure, instead of waiting for
        /// its retries.
        #[arg(long)]
        fail_fast: bool,
    },
    /// A dataset's readiness: per node, files and bytes present and verified, rate and ETA.
    Status {
        name: String,
        #[arg(long)]
        json: bool,
        /// Re-check every loaded file's checksums first (damaged files are loaded again).
        #[arg(long)]
        verify: bool,
    },
    /// Every dataset the token may see.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Release a dataset: its files leave the nodes' dataset stores.
    Unpin { name: String },
    /// Exit 0 once the dataset is ready on a node (for init containers and the scheduler hook),
    /// non-zero on timeout. A node that reports a failure retries the failed files (2 s, then
    /// 4, 8, ... up to every 5 minutes): wait shows the reason and goes on waiting.
    Wait {
        name: String,
        /// The node to wait for [default: every node of the dataset's set].
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
        /// Ready enough at this percentage of the node's share.
        #[arg(long, value_name = "P", default_value_t = 100.0)]
        min_percent: f64,
        /// Give up (non-zero exit) after this long.
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        timeout: String,
        /// Exit non-zero as soon as a node reports a failure, instead of waiting for its retries.
        #[arg(long)]
        fail_fast: bool,
    },
}

pub async fn run(args: DatasetArgs) -> anyhow::Result<()> {
    // Check what can be checked before touching the cluster.
    match &args.command {
        DatasetCommand::Pin {
            name,
            path,
            ttl,
            nodes,
            replicas,
            ..
        } => {
            granary_core::dataset::check_name(name).map_err(anyhow::Error::msg)?;
            if let Some(ttl) = ttl {
                let ttl = parse_duration(ttl).context("--ttl")?;
                dataset::check_ttl(ttl)
                    .map_err(anyhow::Error::msg)
                    .context("--ttl")?;
            }
            dataset::check_replicas(*replicas)
                .map_err(anyhow::Error::msg)
                .context("--replicas")?;
            if path.len() > dataset::MAX_PATH {
                bail!("--path: over {} bytes", dataset::MAX_PATH);
            }
            dataset::check_node_list(nodes)
                .map_err(anyhow::Error::msg)
                .context("--nodes")?;
        }
        DatasetCommand::Load {
            name,
            timeout,
            nodes,
            ..
        } => {
            granary_core::dataset::check_name(name).map_err(anyhow::Error::msg)?;
            parse_duration(timeout).context("--timeout")?;
            dataset::check_node_list(nodes)
                .map_err(anyhow::Error::msg)
                .context("--nodes")?;
        }
        DatasetCommand::Wait {
            name,
            timeout,
            min_percent,
            ..
        } => {
            granary_core::dataset::check_name(name).map_err(anyhow::Error::msg)?;
            parse_duration(timeout).context("--timeout")?;
            if !(0.0..=100.0).contains(min_percent) {
                bail!("--min-percent must be between 0 and 100");
            }
        }
        DatasetCommand::Status { name, .. } | DatasetCommand::Unpin { name } => {
            granary_core::dataset::check_name(name).map_err(anyhow::Error::msg)?;
        }
        DatasetCommand::List { .. } => {}
    }
    let token = match &args.token_file {
        Some(file) => Some(read_token_file(file)?),
        None => args.token.clone(),
    };
    let tls = crate::tls_args::identity(args.tls_dir.as_deref(), args.tls_name.as_deref())?;
    let client = DatasetClient::connect_with(&args.server, tls.as_ref(), token.as_deref()).await?;
    match args.command {
        DatasetCommand::Pin {
            name,
            path,
            tenant,
            ttl,
            nodes,
            replicas,
            json,
        } => {
            let request = PinRequest {
                name,
                path,
                tenant,
                ttl: ttl.as_deref().map(parse_duration).transpose()?,
                nodes,
                replicas,
            };
            let status = client.pin(&request).await?;
            print_status(&status, json);
        }
        DatasetCommand::Load {
            name,
            nodes,
            wait,
            timeout,
            fail_fast,
        } => {
            let status = client.load(&name, nodes).await?;
            if wait {
                let until = Until {
                    min_percent: 100.0,
                    timeout: parse_duration(&timeout)?,
                    fail_fast,
                };
                watch(&client, &name, None, until).await?;
            } else {
                print!("{status}");
            }
        }
        DatasetCommand::Status { name, json, verify } => {
            if verify {
                let seq = client.verify(&name).await?;
                let deadline = Instant::now() + Duration::from_secs(600);
                loop {
                    let s = client.status(&name).await?;
                    let done = s.nodes.iter().all(|n| {
                        s.node_progress
                            .iter()
                            .any(|p| &p.node == n && p.verified_seq >= seq)
                    });
                    if done {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("the nodes did not finish verifying {name} within 10 minutes");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            print_status(&client.status(&name).await?, json);
        }
        DatasetCommand::List { json } => {
            let all = client.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("no datasets pinned");
            } else {
                for s in &all {
                    print!("{s}");
                }
            }
        }
        DatasetCommand::Unpin { name } => {
            client.unpin(&name).await?;
            println!("granary: unpinned {name}");
        }
        DatasetCommand::Wait {
            name,
            node,
            min_percent,
            timeout,
            fail_fast,
        } => {
            let until = Until {
                min_percent,
                timeout: parse_duration(&timeout)?,
                fail_fast,
            };
            watch(&client, &name, node.as_deref(), until).await?;
        }
    }
    Ok(())
}

/// A bearer token from `file`: its one line, without the line end.
pub fn read_token_file(file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("--token-file {}", file.display()))?;
    let line = text.strip_suffix('\n').unwrap_or(&text);
    let token = line.strip_suffix('\r').unwrap_or(line);
    if token.is_empty() || token.contains(char::is_whitespace) {
        bail!(
            "--token-file {}: expected one token on one line",
            file.display()
        );
    }
    Ok(token.to_string())
}

fn print_status(s: &DatasetStatus, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(s).expect("status serializes")
        );
    } else {
        print!("{s}");
    }
}

/// The part of a dataset that `node` (or the whole set) must hold: (state, percent, ready,
/// total, rate).
fn readiness(
    s: &DatasetStatus,
    node: Option<&str>,
) -> anyhow::Result<(LoadState, f64, u64, u64, f64)> {
    match node {
        None => {
            let rate = s.node_progress.iter().fold(0.0, |a, p| a + p.rate);
            Ok((s.state, s.percent, s.bytes_ready, s.bytes_total, rate))
        }
        Some(node) => {
            if !s.nodes.iter().any(|n| n == node) {
                bail!(
                    "node {node:?} is not in dataset {}'s node set ({})",
                    s.name,
                    if s.nodes.is_empty() {
                        "not loaded yet".to_string()
                    } else {
                        s.nodes.join(",")
                    }
                );
            }
            let p: Option<&NodeProgress> = s.node_progress.iter().find(|p| p.node == node);
            Ok(match p {
                Some(p) if s.load => (p.state, p.percent(), p.bytes_ready, p.bytes_total, p.rate),
                _ => (LoadState::Pending, 0.0, 0, 0, 0.0),
            })
        }
    }
}

/// When [`watch`] stops.
struct Until {
    /// Ready enough at this percentage.
    min_percent: f64,
    /// Gives up (an error) after this long.
    timeout: Duration,
    /// Gives up (an error) at the first failure a node reports.
    fail_fast: bool,
}

/// The bar a terminal shows while waiting for `name`: bytes ready of the share, percent, and the
/// nodes' rate and ETA.
fn progress_bar(name: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {percent:>3}%  {binary_bytes}/{binary_total_bytes}  {msg}",
    )
    .expect("a valid template")
    .progress_chars("## ");
    ProgressBar::new(0)
        .with_style(style)
        .with_prefix(name.to_string())
}

/// Polls the status until ready (exit 0) or past the timeout (an error), showing progress (a
/// bar on a terminal, JSON lines otherwise) and, when nodes report failures, why. Failed files
/// are retried by their nodes, so a failure ends the wait only with `fail_fast`.
async fn watch(
    client: &DatasetClient,
    name: &str,
    node: Option<&str>,
    until: Until,
) -> anyhow::Result<()> {
    let Until {
        min_percent,
        timeout,
        fail_fast,
    } = until;
    let bar = std::io::stderr().is_terminal().then(|| progress_bar(name));
    let start = Instant::now();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let mut last_reasons = String::new();
    loop {
        let s = client.status(name).await?;
        let (state, percent, ready, total, rate) = readiness(&s, node)?;
        let reasons: Vec<String> = s
            .node_progress
            .iter()
            .filter(|p| !p.reason.is_empty() && node.is_none_or(|n| p.node == n))
            .map(|p| format!("{}: {}", p.node, p.reason))
            .collect();
        let reasons = reasons.join("; ");
        if let Some(bar) = &bar
            && reasons != last_reasons
            && !reasons.is_empty()
        {
            bar.println(format!("{name}: {reasons}"));
        }
        let done = state == LoadState::Ready || (min_percent < 100.0 && percent >= min_percent);
        let remaining = (rate > 0.0 && !done).then(|| total.saturating_sub(ready) as f64 / rate);
        let eta = remaining.map(|seconds| seconds as u64);
        if let Some(bar) = &bar {
            // The node's own rate and ETA (the bar's would be this client's polling's).
            bar.set_length(total);
            bar.set_position(ready);
            bar.set_message(format!(
                "{}/s  {}",
                ByteSize(rate as u64),
                eta.map(|e| format!("eta {e}s")).unwrap_or_default()
            ));
        } else if done || reasons != last_reasons || last_line.elapsed() >= Duration::from_secs(1) {
            last_line = Instant::now();
            eprintln!(
                "{}",
                serde_json::json!({
                    "dataset": name,
                    "node": node,
                    "state": state,
                    "percent": percent,
                    "bytes_ready": ready,
                    "bytes_total": total,
                    "bytes_per_second": rate,
                    "eta_seconds": eta,
                    "elapsed_seconds": start.elapsed().as_secs_f64(),
                    "reason": (!reasons.is_empty()).then_some(&reasons),
                })
            );
        }
        if done {
            if let Some(bar) = &bar {
                bar.finish();
            }
            println!("granary: {name} ready ({percent:.2}%)");
            return Ok(());
        }
        if fail_fast && state == LoadState::Failed {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            bail!("loading {name} failed: {reasons}");
        }
        if start.elapsed() >= timeout {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            let why = if reasons.is_empty() {
                String::new()
            } else {
                format!("; {reasons}")
            };
            bail!("{name} not ready after {timeout:?}: {percent:.2}% ({state}){why}");
        }
        last_reasons = reasons;
        // Every 100 ms; every 20 ms in the last 2 s expected, so the wait ends promptly.
        let poll = if remaining.is_some_and(|seconds| seconds < 2.0) {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(100)
        };
        tokio::time::sleep(poll).await;
    }
}
