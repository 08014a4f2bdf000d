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
