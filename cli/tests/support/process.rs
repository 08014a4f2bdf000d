//! Running `granary` as a real process: wait for its mount, stop it with SIGINT, and always
//! leave nothing mounted behind (Drop guard), even when the test fails.

use super::{free_port, http_get, is_mounted};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn granary_bin() -> &'static str {
    env!("CARGO_BIN_EXE_granary")
}

/// A `granary` command with the given args and extra environment.
pub fn granary(args: &[&str], envs: &[(String, String)]) -> Command {
    let mut cmd = Command::new(granary_bin());
    cmd.args(args).env("GRANARY_LOG", "warn");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Output of a command that must finish within `limit`.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

pub fn run_with_timeout(mut cmd: Command, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return Finished {
                status,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                elapsed: start.elapsed(),
            };
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "command did not finish within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `granary up` (or `granary mount`) with its mount point.
pub struct Mount {
    child: Option<Child>,
    pub dir: PathBuf,
    pub metrics_addr: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

pub struct UpOptions<'a> {
    pub source: String,
    pub envs: Vec<(String, String)>,
    pub cache_dir: &'a Path,
    pub mount_dir: &'a Path,
    pub extra: Vec<String>,
}

impl Mount {
    /// Starts `granary up` and waits until it reports the mount.
    pub fn up(opts: UpOptions<'_>) -> Mount {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = vec![
            "up".into(),
            "--source".into(),
            opts.source.clone(),
            "--mount".into(),
            opts.mount_dir.to_str().unwrap().into(),
            "--cache-dir".into(),
            opts.cache_dir.to_str().unwrap().into(),
            "--metrics-addr".into(),
            metrics_addr.clone(),
        ];
        args.extend(opts.extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Mount::spawn(granary(&args, &opts.envs), opts.mount_dir, metrics_addr)
    }

    /// Spawns any granary command that mounts at `dir` and waits for the "mounted at" line.
    pub fn spawn(mut cmd: Command, dir: &Path, metrics_addr: String) -> Mount {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let stderr_pipe = child.stderr.take().unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                eprintln!("[granary] {line}");
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("mounted at") {
                    let _ = tx.send(());
                }
            }
        });
        let mut mount = Mount {
            child: Some(child),
            dir: dir.to_path_buf(),
            metrics_addr,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                assert!(
                    is_mounted(dir),
                    "granary said mounted but {} is not a mount point",
                    dir.display()
                );
                return mount;
            }
            if let Some(status) = mount.child.as_mut().unwrap().try_wait().unwrap() {
                mount.child = None;
                panic!(
                    "granary exited with {status} before mounting: {}",
                    mount.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "granary did not mount within 60 s: {}",
                mount.stderr()
            );
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn metrics(&self) -> String {
        http_get(&self.metrics_addr, "/metrics")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The FUSE server: the keeper's `granary` child (the process itself with --no-keeper).
    pub fn server_pid(&self) -> u32 {
        server_of(self.pid()).unwrap_or(self.pid())
    }

    /// SIGINT, then wait: the process must unmount and exit 0.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        signal(child.id(), "INT");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    !is_mounted(&self.dir),
                    "{} still mounted after exit",
                    self.dir.display()
                );
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("granary did not exit within 30 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `granary` child of keeper `pid`, if it has one now.
pub fn server_of(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<u32>().ok())
        .find(|c| {
            std::fs::read_to_string(format!("/proc/{c}/comm"))
                .is_ok_and(|comm| comm.trim() == "granary")
        })
}

/// SIGINT, a grace period to exit, then SIGKILL; always reaps the child.
pub fn interrupt_and_reap(mut child: Child, grace: Duration) {
    signal(child.id(), "INT");
    let deadline = Instant::now() + grace;
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            interrupt_and_reap(child, Duration::from_secs(10));
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// A background process whose output goes to a log file; interrupted (SIGINT) and reaped when
/// dropped.
pub struct Logged {
    child: Option<Child>,
    log: PathBuf,
}

impl Logged {
    pub fn spawn(mut cmd: Command, log: &Path) -> Logged {
        let file = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Logged {
            child: Some(child),
            log: log.into(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it has not exited.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            interrupt_and_reap(c, Duration::from_secs(10));
        }
    }
}
