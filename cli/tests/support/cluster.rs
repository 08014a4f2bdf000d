//! A cluster of `granary server` workers on 127.0.0.1 for end-to-end tests, and what tests ask
//! of it (status, mounts, checksums).

use super::process::{Mount, granary, interrupt_and_reap, run_with_timeout};
use super::{free_port, http_get, metric};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Worker {
    child: Option<Child>,
    pub id: String,
    pub config: PathBuf,
    pub metrics: String,
}

impl Worker {
    pub fn start(id: &str, config: &Path, metrics: &str) -> Worker {
        let mut w = Worker::new(id, config, metrics);
        w.spawn();
        w
    }

    fn new(id: &str, config: &Path, metrics: &str) -> Worker {
        Worker {
            child: None,
            id: id.into(),
            config: config.into(),
            metrics: metrics.into(),
        }
    }

    /// Starts the worker and waits until it serves its metrics; panics with its log if it
    /// exits or is not up within 30 s.
    pub fn spawn(&mut self) {
        if let Err(why) = self.try_spawn() {
            panic!("worker {} did not start: {why}", self.id);
        }
    }

    /// Starts the worker; Err(what went wrong, with the end of its log) if it exits before
    /// serving its metrics or is not up within 30 s.
    fn try_spawn(&mut self) -> Result<(), String> {
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
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = self.log();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                return Err(match exited {
                    Some(status) => {
                        self.child = None;
                        format!("exited ({status}); log:\n{tail}")
                    }
                    None => format!("not up within 30 s; log:\n{tail}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
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

/// The TLS directory of each test cluster, by its etcd URL and its workers' API addresses: the
/// clients' `--tls-dir`.
static TLS_OF: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());

/// Remembers that `addr` (an etcd URL or a worker API address) is reached with the certificates
/// in `tls`.
pub fn register_tls(addr: &str, tls: &Path) {
    TLS_OF.lock().unwrap().insert(addr.into(), tls.into());
}

/// `--tls-dir DIR --tls-name client` for a registered etcd URL or worker address; nothing for a
/// plaintext worker.
pub fn tls_flags(addr: &str) -> Vec<String> {
    match TLS_OF.lock().unwrap().get(addr) {
        Some(dir) => vec![
            "--tls-dir".into(),
            dir.display().to_string(),
            "--tls-name".into(),
            "client".into(),
        ],
        None => Vec::new(),
    }
}

pub fn status(etcd: &str) -> serde_json::Value {
    let mut args = vec![
        "status".to_string(),
        "--etcd".into(),
        etcd.into(),
        "--json".into(),
    ];
    args.extend(tls_flags(etcd));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_with_timeout(granary(&args, &[]), Duration::from_secs(30));
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

/// Certificates for workers w1..wN and a client from the CA of the test's own etcd (`etcd.sh`
/// writes it), in `work/tls`, so that etcd accepts them; remembered for the etcd URL.
pub fn cluster_certs(work: &Path, workers: usize, etcd: &super::own::OwnService) -> PathBuf {
    let tls = work.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let ca = PathBuf::from(etcd.get("GRANARY_TEST_ETCD_TLS"));
    for file in ["ca.pem", "ca.key"] {
        std::fs::copy(ca.join(file), tls.join(file)).unwrap();
    }
    dev_certs(work, workers);
    register_tls(&etcd.get("GRANARY_TEST_ETCD"), &tls);
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

fn write_worker_config(config: &Path, id: &str, api: &str, cache: &Path, spec: &Spec) {
    std::fs::write(
        config,
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
        let cache = work.join(format!("cache-{id}"));
        let config = work.join(format!("{id}.toml"));
        // A port picked free can be taken before the worker binds it (by another process's
        // outgoing connection): then the worker exits saying so, and gets new ports.
        let mut attempt = 0;
        let (worker, api, metrics) = loop {
            attempt += 1;
            let (api, metrics) = (
                format!("127.0.0.1:{}", free_port()),
                format!("127.0.0.1:{}", free_port()),
            );
            write_worker_config(&config, &id, &api, &cache, spec);
            let mut worker = Worker::new(&id, &config, &metrics);
            match worker.try_spawn() {
                Ok(()) => break (worker, api, metrics),
                Err(why) if attempt < 3 && why.contains("in use") => {
                    eprintln!("worker {id}: a port was taken; trying new ones: {why}");
                }
                Err(why) => panic!("worker {id} did not start: {why}"),
            }
        };
        register_tls(&api, spec.tls);
        started.workers.push(worker);
        started.api.push(api);
        started.metrics.push(metrics);
        started.caches.push(cache);
    }
    started
}
