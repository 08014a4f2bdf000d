//! A cluster of `granary server` workers on 127.0.0.1 for end-to-end tests, and what tests ask
//! of it (status, mounts, checksums).

use super::process::{Mount, granary, interrupt_and_reap, run_with_timeout};
use super::{free_port, http_get, metric};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Worker {
    child: Option<Child>,
    pub id: String,
    pub config: PathBuf,
    pub metrics: String,
}

impl Worker {
    pub fn start(id: &str, config: &Path, metrics: &str) -> Worker {
        let mut w = Worker {
            child: None,
            id: id.into(),
            config: config.into(),
            metrics: metrics.into(),
        };
        w.spawn();
        w
    }

    pub fn spawn(&mut self) {
        let mut cmd = granary(
            &[
                "server",
                "--config",
                self.config.to_str().unwrap(),
                "--metrics-addr",
                &self.metrics,
            ],
            &[],
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        cmd.env("GRANARY_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log);
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&self.metrics).is_err() {
            assert!(
                Instant::now() < deadline,
                "worker {} did not start",
                self.id
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The worker's log (stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.config.with_extension("log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGINT and wait: a clean stop.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            interrupt_and_reap(child, Duration::from_secs(10));
        }
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn gets(&self) -> f64 {
        metric(
            &http_get(&self.metrics, "/metrics"),
            "granary_backend_requests_total",
            &[("op", "get")],
        )
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            interrupt_and_reap(child, Duration::from_secs(10));
        }
    }
}

pub fn status(etcd: &str) -> serde_json::Value {
    let out = run_with_timeout(
        granary(&["status", "--etcd", etcd, "--json"], &[]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "status: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

pub fn wait_for_members(etcd: &str, n: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let s = status(etcd);
        let up = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["up"] == true)
            .count();
        if up == n && s["members"].as_array().unwrap().len() == n {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} live members, got {s}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

pub fn mount_cluster(etcd: &str, tls: &Path, dir: &Path) -> Mount {
    mount_cluster_with(etcd, tls, dir, &[])
}

/// `granary mount --etcd` with extra flags.
pub fn mount_cluster_with(etcd: &str, tls: &Path, dir: &Path, extra: &[&str]) -> Mount {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "mount",
        "--etcd",
        etcd,
        "--tls-dir",
        tls.to_str().unwrap(),
        dir.to_str().unwrap(),
        "--metrics-addr",
        &metrics,
    ];
    args.extend_from_slice(extra);
    Mount::spawn(granary(&args, &[]), dir, metrics.clone())
}

pub fn sha(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

pub fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// `granary certs` for workers w1..wN and a client, in `work/tls`.
pub fn dev_certs(work: &Path, workers: usize) -> PathBuf {
    let tls = work.join("tls");
    let mut args = vec![
        "certs".to_string(),
        "--out".into(),
        tls.display().to_string(),
    ];
    args.extend((1..=workers).map(|i| format!("w{i}")));
    args.push("client".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_with_timeout(granary(&args, &[]), Duration::from_secs(20));
    assert!(out.status.success(), "certs: {}", out.stderr);
    tls
}

/// What the workers of a test cluster share.
pub struct Spec<'a> {
    pub s3: &'a super::backends::S3Target,
    /// The bucket prefix mounted at /data.
    pub prefix: &'a str,
    pub etcd: &'a str,
    pub tls: &'a Path,
    pub memory: &'a str,
    /// More TOML, appended to each worker's config (whole sections).
    pub extra: &'a str,
    /// Workers whose config gets this TOML instead of `extra`: (worker id, TOML).
    pub extra_for: &'a [(&'a str, &'a str)],
}

/// Workers w1..wN, started, with their API and metrics addresses and cache directories.
pub struct Started {
    pub workers: Vec<Worker>,
    pub api: Vec<String>,
    pub metrics: Vec<String>,
    pub caches: Vec<PathBuf>,
}

/// Starts `n` workers over `spec` (configs, caches and logs under `work`); returns once each
/// serves its metrics (`wait_for_members` waits for the membership).
pub fn start_workers(work: &Path, n: usize, spec: &Spec) -> Started {
    let mut started = Started {
        workers: Vec::new(),
        api: Vec::new(),
        metrics: Vec::new(),
        caches: Vec::new(),
    };
    for i in 1..=n {
        let id = format!("w{i}");
        let (api, metrics) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let cache = work.join(format!("cache-{id}"));
        let config = work.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_id = \"{id}\"\nlisten = \"{api}\"\n\
                 [cache]\ndir = \"{dir}\"\nmemory = \"{memory}\"\ndisk = \"0\"\n\
                 [s3]\nendpoint = \"{ep}\"\naccess_key_id = \"{ak}\"\nsecret_access_key = \"{sk}\"\n\
                 [cluster]\netcd = [\"{etcd}\"]\nlease_ttl = \"4s\"\n[tls]\ndir = \"{tls}\"\n\
                 [[mount]]\npath = \"/data\"\nsource = \"{src}\"\n{extra}",
                dir = cache.display(),
                memory = spec.memory,
                ep = spec.s3.endpoint,
                ak = spec.s3.access_key,
                sk = spec.s3.secret_key,
                etcd = spec.etcd,
                tls = spec.tls.display(),
                src = spec.s3.uri(spec.prefix),
                extra = spec
                    .extra_for
                    .iter()
                    .find(|(w, _)| *w == id)
                    .map_or(spec.extra, |(_, e)| *e),
            ),
        )
        .unwrap();
        started.workers.push(Worker::start(&id, &config, &metrics));
        started.api.push(api);
        started.metrics.push(metrics);
        started.caches.push(cache);
    }
    started
}
