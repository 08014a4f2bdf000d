//! The systems under test, behind one trait so that more slot in: the native local copy, the raw
//! backend (the S3 API itself, no cache), and FUSE mounts of the bucket, one [`Tool`] each:
//! Granary, and s3fs-fuse and rclone when they are installed.
//!
//! A system is measured in runs. Each run starts a fresh instance (empty caches) and reads the
//! workload once per [`Condition`] it is measured in, in order: cold first, then hot.

use crate::cleanup::{self, Guard};
use crate::host::{self, Daemon};
use crate::s3::{REGION, S3Conn};
use crate::workloads::{Access, Workload};
use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// How long a mount gets to come up.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// The cache state a pass is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Nothing cached anywhere: a fresh instance and the page cache dropped.
    Cold,
    /// Read again right away: whatever the kernel's page cache kept.
    HotPageCache,
    /// Read again after dropping the page cache: served by the daemon's own cache.
    HotDaemonCache,
    /// No cache exists (the raw backend).
    Direct,
    /// Epoch N of a multi-epoch workload, each read with the page cache dropped first.
    Epoch(u8),
}

impl Condition {
    pub fn label(self, system: &str) -> String {
        match self {
            Condition::Cold => "cold".into(),
            Condition::HotPageCache => "hot-pagecache".into(),
            Condition::HotDaemonCache => format!("hot-{system}-cache"),
            Condition::Direct => "direct".into(),
            Condition::Epoch(n) => format!("epoch-{n}"),
        }
    }

    pub fn drops_page_cache(self) -> bool {
        matches!(
            self,
            Condition::Cold | Condition::HotDaemonCache | Condition::Epoch(_)
        )
    }
}

/// What a system is, which decides the workloads and conditions it is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Native,
    Backend,
    Granary,
    /// A peer FUSE tool.
    Peer,
}

/// Something that serves the dataset and can be set up, read and torn down.
pub trait System {
    fn name(&self) -> &str;
    fn kind(&self) -> Kind;
    /// Starts a fresh instance for `workload` (stopping the previous one): empty caches, nothing
    /// read yet.
    fn start(&mut self, workload: Workload) -> anyhow::Result<()>;
    /// How to read the dataset from the running instance.
    fn access(&self) -> Access;
    /// The serving process, whose CPU time and peak RSS are reported.
    fn pid(&self) -> Option<u32>;
    /// Counters the system exports (series name with labels → value), to diff around a pass.
    fn counters(&self) -> BTreeMap<String, f64>;
    /// Stops the instance, if any, and removes its cache.
    fn stop(&mut self);
}

/// The native copy on local disk, read with plain file I/O.
pub struct Native {
    pub root: PathBuf,
}

impl System for Native {
    fn name(&self) -> &str {
        "native"
    }
    fn kind(&self) -> Kind {
        Kind::Native
    }
    fn start(&mut self, _: Workload) -> anyhow::Result<()> {
        Ok(())
    }
    fn access(&self) -> Access {
        Access::Files(self.root.clone())
    }
    fn pid(&self) -> Option<u32> {
        None
    }
    fn counters(&self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    fn stop(&mut self) {}
}

/// The S3 API with no cache: the direct backend GET rate every cache is compared with.
pub struct RawBackend {
    pub store: Arc<dyn object_store::ObjectStore>,
}

impl System for RawBackend {
    fn name(&self) -> &str {
        "backend"
    }
    fn kind(&self) -> Kind {
        Kind::Backend
    }
    fn start(&mut self, _: Workload) -> anyhow::Result<()> {
        Ok(())
    }
    fn access(&self) -> Access {
        Access::Store(self.store.clone())
    }
    fn pid(&self) -> Option<u32> {
        None
    }
    fn counters(&self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    fn stop(&mut self) {}
}

/// A FUSE client of the bucket.
#[derive(Debug, Clone)]
pub enum Tool {
    /// `granary up`, with its cache sizes; for [`Workload::Epochs`], `epochs_memory_cache` and
    /// no disk tier.
    Granary {
        bin: PathBuf,
        memory_cache: u64,
        disk_cache: u64,
        epochs_memory_cache: u64,
    },
    /// s3fs-fuse with its disk cache (`use_cache`).
    S3fs,
    /// `rclone mount` with the full VFS cache.
    Rclone,
}

impl Tool {
    pub fn name(&self) -> &'static str {
        match self {
            Tool::Granary { .. } => "granary",
            Tool::S3fs => "s3fs",
            Tool::Rclone => "rclone",
        }
    }

    /// The foreground command that mounts `s3://bucket/prefix` at `mnt` for `workload`, caching
    /// in `cache`; `dir` holds any config file it needs.
    fn command(
        &self,
        s3: &S3Conn,
        prefix: &str,
        paths: &RunPaths,
        workload: Workload,
    ) -> anyhow::Result<Command> {
        let RunPaths {
            dir,
            mnt,
            cache,
            metrics,
        } = paths;
        let cmd = match self {
            Tool::Granary {
                bin,
                memory_cache,
                disk_cache,
                epochs_memory_cache,
            } => {
                let (memory_cache, disk_cache) = match workload {
                    Workload::Epochs => (epochs_memory_cache, &0),
                    _ => (memory_cache, disk_cache),
                };
                let mut cmd = Command::new(bin);
                cmd.arg("up")
                    .arg("--source")
                    .arg(format!("s3://{}/{prefix}", s3.bucket))
                    .arg("--mount")
                    .arg(mnt)
                    .arg("--cache-dir")
                    .arg(cache)
                    .args(["--memory-cache", &memory_cache.to_string()])
                    .args(["--disk-cache", &disk_cache.to_string()]);
                if let Some(addr) = metrics {
                    cmd.args(["--metrics-addr", &addr.to_string()]);
                }
                cmd.envs(s3.aws_env());
                cmd
            }
            Tool::S3fs => {
                let passwd = dir.join("passwd-s3fs");
                host::write_private(&passwd, &format!("{}:{}\n", s3.access_key, s3.secret_key))?;
                let mut cmd = Command::new("s3fs");
                cmd.arg(format!("{}:/{prefix}", s3.bucket))
                    .arg(mnt)
                    .arg("-f")
                    .args(["-o", "ro", "-o", "use_path_request_style"])
                    .args(["-o", &format!("url={}", s3.endpoint)])
                    .args(["-o", &format!("endpoint={REGION}")])
                    .args(["-o", &format!("passwd_file={}", passwd.display())])
                    .args(["-o", &format!("use_cache={}", cache.display())]);
                cmd
            }
            Tool::Rclone => {
                let config = dir.join("rclone.conf");
                host::write_private(
                    &config,
                    &format!(
                        "[bench]\ntype = s3\nprovider = Other\nendpoint = {}\nregion = {REGION}\n\
                         access_key_id = {}\nsecret_access_key = {}\nforce_path_style = true\n",
                        s3.endpoint, s3.access_key, s3.secret_key
                    ),
                )?;
                let mut cmd = Command::new("rclone");
                cmd.arg("--config")
                    .arg(&config)
                    .arg("mount")
                    .arg(format!("bench:{}/{prefix}", s3.bucket))
                    .arg(mnt)
                    .args(["--read-only", "--vfs-cache-mode", "full"])
                    .arg("--cache-dir")
                    .arg(cache)
                    // rclone fails on the CA bundle this machine points every client at.
                    .env_remove("AWS_CA_BUNDLE");
                cmd
            }
        };
        Ok(cmd)
    }
}

/// Where one run of a mount lives.
struct RunPaths {
    dir: PathBuf,
    mnt: PathBuf,
    cache: PathBuf,
    metrics: Option<SocketAddr>,
}

/// A running mount. Fields drop in order: the daemon stops (and unmounts) before the fallback
/// unmount runs.
struct Live {
    daemon: Daemon,
    paths: RunPaths,
    _unmount: Guard,
}

/// A FUSE mount of the dataset's prefix, a fresh daemon and cache directory for every run.
pub struct Mount {
    tool: Tool,
    s3: S3Conn,
    prefix: String,
    /// Parent of the per-run directories.
    base: PathBuf,
    log: PathBuf,
    runs: usize,
    live: Option<Live>,
}

impl Mount {
    pub fn new(tool: Tool, s3: S3Conn, prefix: &str, base: &Path, log_dir: &Path) -> Mount {
        Mount {
            log: log_dir.join(format!("{}.log", tool.name())),
            base: base.join(tool.name()),
            tool,
            s3,
            prefix: prefix.to_string(),
            runs: 0,
            live: None,
        }
    }
}

impl System for Mount {
    fn name(&self) -> &str {
        self.tool.name()
    }

    fn kind(&self) -> Kind {
        match self.tool {
            Tool::Granary { .. } => Kind::Granary,
            Tool::S3fs | Tool::Rclone => Kind::Peer,
        }
    }

    fn start(&mut self, workload: Workload) -> anyhow::Result<()> {
        self.stop();
        self.runs += 1;
        let dir = self.base.join(format!("run-{}", self.runs));
        let paths = RunPaths {
            mnt: dir.join("mnt"),
            cache: dir.join("cache"),
            metrics: match self.tool {
                Tool::Granary { .. } => Some(host::free_local_addr()?),
                _ => None,
            },
            dir,
        };
        for d in [&paths.mnt, &paths.cache] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let unmount = {
            let mnt = paths.mnt.clone();
            cleanup::register(format!("unmount {}", mnt.display()), move || {
                host::unmount_all_under(&mnt)
            })
        };
        let cmd = self
            .tool
            .command(&self.s3, &self.prefix, &paths, workload)?;
        let daemon = Daemon::spawn(self.tool.name(), cmd, &self.log)?;
        let live = Live {
            daemon,
            paths,
            _unmount: unmount,
        };
        let mnt = &live.paths.mnt;
        match self.tool {
            Tool::Granary { .. } => {
                // The CLI contract: this line on stdout once the mount is ready.
                let line = format!("mounted at {}", mnt.display());
                live.daemon
                    .wait_until(&format!("'{line}'"), MOUNT_TIMEOUT, || {
                        live.daemon.log_text().contains(&line)
                    })?;
                if !host::is_mounted(mnt) {
                    bail!("granary said '{line}' but nothing is mounted there");
                }
            }
            Tool::S3fs | Tool::Rclone => {
                live.daemon
                    .wait_until("the mount", MOUNT_TIMEOUT, || host::is_mounted(mnt))?;
            }
        }
        self.live = Some(live);
        Ok(())
    }

    fn access(&self) -> Access {
        Access::Files(
            self.live
                .as_ref()
                .map_or_else(PathBuf::new, |l| l.paths.mnt.clone()),
        )
    }

    fn pid(&self) -> Option<u32> {
        self.live.as_ref().map(|l| l.daemon.pid())
    }

    fn counters(&self) -> BTreeMap<String, f64> {
        self.live
            .as_ref()
            .and_then(|l| l.paths.metrics)
            .map(scrape_counters)
            .unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(live) = self.live.take() {
            let dir = live.paths.dir.clone();
            drop(live);
            host::remove_tree(&dir);
        }
    }
}

/// Granary's counters that explain a figure: backend requests and bytes, block reads by tier,
/// and the FUSE requests that reached the daemon.
const COUNTERS: &[&str] = &[
    "granary_backend_requests_total",
    "granary_backend_bytes_total",
    "granary_block_reads_total",
    "granary_fuse_ops_total",
];

/// The [`COUNTERS`] series from a Prometheus text endpoint; empty if it cannot be read.
fn scrape_counters(addr: SocketAddr) -> BTreeMap<String, f64> {
    scrape(addr, COUNTERS)
}

/// The series of the metrics named `names` (series name with labels → value) from a Prometheus
/// text endpoint; empty if it cannot be read.
pub fn scrape(addr: SocketAddr, names: &[&str]) -> BTreeMap<String, f64> {
    let text = http_get(addr, "/metrics").unwrap_or_else(|e| {
        eprintln!("granary-bench: cannot scrape http://{addr}/metrics: {e:#}");
        String::new()
    });
    text.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let name = series.split_once('{').map_or(*series, |(name, _)| name);
            names.contains(&name)
        })
        .filter_map(|(series, value)| Some((series.to_string(), value.parse().ok()?)))
        .collect()
}

/// The body of a plain HTTP/1.0 GET.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    conn.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        bail!(
            "unexpected response: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_string())
}
