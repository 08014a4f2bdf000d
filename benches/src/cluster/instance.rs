//! One Granary cluster: its own etcd (own data directory and ports), N `granary server` workers
//! over the bucket (each with its own cache directory, ports and log) and, as [`Layout`] says,
//! either N `granary mount --etcd` clients, everything on 127.0.0.1, or no clients but each
//! worker in its own emulated host ([`super::netns`]) serving a FUSE mount itself (`--mount`,
//! `--no-keeper`). Everything is stopped when the [`Instance`] is dropped, clients first (their
//! mounts undone), then workers (theirs undone), then etcd, then its directory is removed; on an
//! error or Ctrl-C the cleanup guards do the same.

use super::netns::{Host, LinkBytes, Network};
use crate::cleanup::{self, Guard};
use crate::host::{self, Daemon, MachineCpu, ProcStats};
use crate::s3::S3Conn;
use crate::systems::scrape;
use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long etcd, a worker, the membership or a mount get to come up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// A worker's gRPC and QUIC port, and its metrics port, in an emulated host (each has its own).
const HOST_WORKER_PORT: u16 = 7070;
const HOST_METRICS_PORT: u16 = 9100;

/// Where a cluster's processes run.
#[derive(Clone, Copy)]
pub enum Layout<'a> {
    /// Everything on 127.0.0.1: the workers and one `granary mount --etcd` client per worker.
    Loopback,
    /// Worker i in emulated host i, serving a FUSE mount in its own process; no clients. etcd
    /// listens on the bridge.
    Hosts(&'a Network),
}

/// The counters read from every worker and client around each pass.
const COUNTERS: &[&str] = &[
    "granary_backend_requests_total",
    "granary_backend_bytes_total",
    "granary_block_reads_total",
    "granary_block_read_bytes_total",
    "granary_fuse_ops_total",
    "granary_fuse_read_bytes_total",
];

/// What every cluster is made of.
pub struct Spec {
    /// The `granary` binary.
    pub bin: PathBuf,
    /// The `etcd` binary.
    pub etcd: PathBuf,
    /// The workers' shared config file (the mount of the bucket, the block size).
    pub config: PathBuf,
    /// What `granary certs` wrote: `ca.pem`, `wI.pem`/`wI.key` for each worker, `client.*`, and
    /// etcd's.
    pub tls: PathBuf,
    /// The name of etcd's certificate in `tls` (valid for the address it listens on).
    pub etcd_cert: String,
    /// How the workers reach the S3 server.
    pub s3: S3Conn,
    /// The S3 server's processes, whose CPU time is read around each pass.
    pub s3_pids: Vec<u32>,
    /// A thread of this process that forwards to the S3 server: its CPU time is the S3 server's,
    /// not the readers'.
    pub s3_forwarder_tid: Option<u32>,
    /// Per worker.
    pub memory_cache: u64,
    /// Per worker.
    pub disk_cache: u64,
}

/// A granary process with a metrics endpoint (fields drop in order: the daemon stops, then
/// whatever it left mounted is unmounted).
pub struct Node {
    pub name: String,
    daemon: Daemon,
    metrics: SocketAddr,
    /// The FUSE mount a worker serves itself.
    mount: Option<MountPoint>,
}

/// A mount point, unmounted (if still mounted) when dropped.
struct MountPoint {
    path: PathBuf,
    _unmount: Guard,
}

impl MountPoint {
    fn new(path: PathBuf) -> anyhow::Result<MountPoint> {
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let unmount = {
            let path = path.clone();
            cleanup::register(format!("unmount {}", path.display()), move || {
                host::unmount_all_under(&path)
            })
        };
        Ok(MountPoint {
            path,
            _unmount: unmount,
        })
    }
}

/// A client: its mount point (dropped in order: the daemon unmounts, then the fallback unmount).
pub struct Client {
    pub node: Node,
    pub mnt: PathBuf,
    _unmount: Guard,
}

/// What a process had done at one moment: its CPU time and peak RSS, and its counters.
pub struct NodeReading {
    pub stats: ProcStats,
    pub counters: BTreeMap<String, f64>,
}

/// The cluster and the machine at one moment.
pub struct Reading {
    /// The whole machine's CPU time so far.
    pub machine_cpu: MachineCpu,
    pub workers: Vec<NodeReading>,
    pub clients: Vec<NodeReading>,
    /// CPU time so far of etcd, of the S3 server's processes (and the forwarder to it) and of
    /// this process (the readers).
    pub etcd_cpu: f64,
    pub s3_cpu: f64,
    pub bench_cpu: f64,
    /// What crossed each emulated host's link so far (none on loopback).
    pub links: Vec<LinkBytes>,
}

/// A running cluster. Fields drop in declaration order.
pub struct Instance {
    pub clients: Vec<Client>,
    pub workers: Vec<Node>,
    etcd: Daemon,
    s3_pids: Vec<u32>,
    s3_forwarder_tid: Option<u32>,
    hosts: Vec<Host>,
    _remove: Guard,
}

impl Instance {
    /// Starts etcd, `n` workers (once all are members) and, on loopback, `n` clients, everything
    /// under `dir`; logs go to `log_dir/cluster-<label>-<process>.log`.
    pub fn start(
        spec: &Spec,
        layout: Layout,
        n: usize,
        dir: &Path,
        log_dir: &Path,
        label: &str,
    ) -> anyhow::Result<Instance> {
        host::remove_tree(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let remove = {
            let dir = dir.to_path_buf();
            cleanup::register(format!("remove {}", dir.display()), move || {
                host::remove_tree(&dir)
            })
        };
        let log = |name: &str| log_dir.join(format!("cluster-{label}-{name}.log"));
        let hosts: &[Host] = match layout {
            Layout::Loopback => &[],
            Layout::Hosts(network) => {
                if network.hosts.len() < n {
                    bail!("{n} workers but {} emulated hosts", network.hosts.len());
                }
                &network.hosts[..n]
            }
        };
        // etcd where every worker reaches it: loopback, or the bridge.
        let etcd_ip = match layout {
            Layout::Loopback => std::net::Ipv4Addr::LOCALHOST,
            Layout::Hosts(_) => Network::gateway(),
        };
        let mut etcd_ports = host::free_addrs(etcd_ip, 2)?.into_iter();
        let mut ports = host::free_local_addrs(3 * n)?.into_iter();
        let mut port = || ports.next().expect("enough ports were reserved");

        let (client_addr, peer_addr) = (
            etcd_ports.next().expect("two ports"),
            etcd_ports.next().expect("two ports"),
        );
        // etcd as deployed: TLS with client-certificate auth, its certificate from the
        // cluster's CA (`granary certs ... etcd`).
        let (client_url, peer_url) = (
            format!("https://{client_addr}"),
            format!("https://{peer_addr}"),
        );
        let (ca, cert, key) = (
            spec.tls.join("ca.pem"),
            spec.tls.join(format!("{}.pem", spec.etcd_cert)),
            spec.tls.join(format!("{}.key", spec.etcd_cert)),
        );
        let mut cmd = Command::new(&spec.etcd);
        cmd.args(["--name", "bench"])
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .args(["--initial-cluster-state", "new"])
            .arg("--cert-file")
            .arg(&cert)
            .arg("--key-file")
            .arg(&key)
            .arg("--trusted-ca-file")
            .arg(&ca)
            .arg("--client-cert-auth")
            .arg("--peer-cert-file")
            .arg(&cert)
            .arg("--peer-key-file")
            .arg(&key)
            .arg("--peer-trusted-ca-file")
            .arg(&ca)
            .arg("--peer-client-cert-auth");
        let etcd = Daemon::spawn("etcd", cmd, &log("etcd"))?;
        etcd.wait_until("etcd's log: ready to serve", START_TIMEOUT, || {
            etcd.log_text().contains("ready to serve client requests")
        })?;

        let mut workers = Vec::with_capacity(n);
        for i in 1..=n {
            let name = format!("w{i}");
            let (mut cmd, listen, metrics, mount) = match hosts.get(i - 1) {
                None => (Command::new(&spec.bin), port(), port(), None),
                Some(h) => {
                    let ip = IpAddr::V4(h.ip);
                    (
                        h.command(&spec.bin),
                        SocketAddr::new(ip, HOST_WORKER_PORT),
                        SocketAddr::new(ip, HOST_METRICS_PORT),
                        Some(MountPoint::new(dir.join(format!("mnt-{name}")))?),
                    )
                }
            };
            cmd.arg("server")
                .arg("--config")
                .arg(&spec.config)
                .args(["--node-id", &name])
                .args(["--listen", &listen.to_string()])
                .args(["--etcd", &client_url])
                .arg("--tls-dir")
                .arg(&spec.tls)
                .arg("--cache-dir")
                .arg(dir.join(format!("cache-{name}")))
                .args(["--memory-cache", &spec.memory_cache.to_string()])
                .args(["--disk-cache", &spec.disk_cache.to_string()])
                .args(["--metrics-addr", &metrics.to_string()])
                .envs(spec.s3.aws_env());
            if let Some(m) = &mount {
                // The worker serves the mount itself, with no keeper: the process measured is
                // the one serving both the mount and its peers.
                cmd.arg("--mount").arg(&m.path).arg("--no-keeper");
            }
            let daemon = Daemon::spawn(&format!("worker {name}"), cmd, &log(&name))?;
            workers.push(Node {
                name,
                daemon,
                metrics,
                mount,
            });
        }
        for w in &workers {
            // The CLI contract: this line on stdout once the worker serves.
            w.daemon.wait_until("'serving on'", START_TIMEOUT, || {
                w.daemon.log_text().contains("serving on")
            })?;
        }
        wait_for_members(spec, &client_url, &workers)?;
        for w in &workers {
            if let Some(m) = &w.mount {
                w.daemon.wait_until(
                    &format!("a mount at {}", m.path.display()),
                    START_TIMEOUT,
                    || host::is_mounted(&m.path),
                )?;
            }
        }

        // On emulated hosts, each worker's own mount is read instead.
        let clients_wanted = if hosts.is_empty() { n } else { 0 };
        let mut clients = Vec::with_capacity(clients_wanted);
        for i in 1..=clients_wanted {
            let name = format!("c{i}");
            let mnt = dir.join(format!("mnt-{name}"));
            std::fs::create_dir_all(&mnt)?;
            let unmount = {
                let mnt = mnt.clone();
                cleanup::register(format!("unmount {}", mnt.display()), move || {
                    host::unmount_all_under(&mnt)
                })
            };
            let metrics = port();
            let mut cmd = Command::new(&spec.bin);
            cmd.arg("mount")
                .args(["--etcd", &client_url])
                .arg("--tls-dir")
                .arg(&spec.tls)
                .args(["--tls-name", "client"])
                .args(["--metrics-addr", &metrics.to_string()])
                .arg(&mnt);
            let daemon = Daemon::spawn(&format!("client {name}"), cmd, &log(&name))?;
            let client = Client {
                node: Node {
                    name,
                    daemon,
                    metrics,
                    mount: None,
                },
                mnt,
                _unmount: unmount,
            };
            let line = format!("mounted at {}", client.mnt.display());
            client
                .node
                .daemon
                .wait_until(&format!("'{line}'"), START_TIMEOUT, || {
                    client.node.daemon.log_text().contains(&line)
                })?;
            if !host::is_mounted(&client.mnt) {
                bail!("granary mount said '{line}' but nothing is mounted there");
            }
            clients.push(client);
        }
        Ok(Instance {
            clients,
            workers,
            etcd,
            s3_pids: spec.s3_pids.clone(),
            s3_forwarder_tid: spec.s3_forwarder_tid,
            hosts: hosts.to_vec(),
            _remove: remove,
        })
    }

    /// Where reader i reads: client i's mount on loopback, worker i's own on emulated hosts.
    pub fn mounts(&self) -> Vec<&Path> {
        if self.clients.is_empty() {
            self.workers
                .iter()
                .filter_map(|w| w.mount.as_ref().map(|m| m.path.as_path()))
                .collect()
        } else {
            self.clients.iter().map(|c| c.mnt.as_path()).collect()
        }
    }

    /// Fails (with the end of its log) if any worker or client has exited.
    pub fn check_running(&self) -> anyhow::Result<()> {
        for node in self.nodes() {
            node.daemon.check_running()?;
        }
        Ok(())
    }

    fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.workers
            .iter()
            .chain(self.clients.iter().map(|c| &c.node))
    }

    /// Every process's CPU time, peak RSS and counters, and the machine's CPU time.
    pub fn read(&self) -> anyhow::Result<Reading> {
        let cpu = |pid: u32| ProcStats::read(pid).map_or(0.0, |s| s.cpu_seconds);
        let read = |node: &Node| -> anyhow::Result<NodeReading> {
            Ok(NodeReading {
                stats: ProcStats::read(node.daemon.pid())
                    .with_context(|| format!("cannot read /proc of {}", node.name))?,
                counters: scrape(node.metrics, COUNTERS),
            })
        };
        let forwarder = self
            .s3_forwarder_tid
            .map_or(0.0, |tid| host::thread_cpu_seconds(tid).unwrap_or(0.0));
        Ok(Reading {
            machine_cpu: MachineCpu::read()?,
            etcd_cpu: cpu(self.etcd.pid()),
            s3_cpu: self.s3_pids.iter().map(|&pid| cpu(pid)).sum::<f64>() + forwarder,
            // This process alone: its children are the etcd, workers and clients above.
            bench_cpu: ProcStats::read_one(std::process::id()).map_or(0.0, |s| s.cpu_seconds)
                - forwarder,
            links: self
                .hosts
                .iter()
                .map(Host::link_bytes)
                .collect::<Result<_, _>>()?,
            workers: self.workers.iter().map(read).collect::<Result<_, _>>()?,
            clients: self
                .clients
                .iter()
                .map(|c| read(&c.node))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Waits until `granary status` lists exactly the `workers`, all up.
fn wait_for_members(spec: &Spec, etcd_url: &str, workers: &[Node]) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let out = host::run_command(
            Command::new(&spec.bin)
                .args(["status", "--etcd", etcd_url, "--json"])
                .arg("--tls-dir")
                .arg(&spec.tls)
                .args(["--tls-name", "client"])
                .env("GRANARY_LOG", "warn"),
        );
        let last = match out {
            Ok(text) => {
                let status: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("granary status --json printed {text:?}"))?;
                let members = status["members"].as_array().cloned().unwrap_or_default();
                let up = members.iter().filter(|m| m["up"] == true).count();
                if members.len() == workers.len() && up == workers.len() {
                    return Ok(());
                }
                text
            }
            Err(e) => format!("{e:#}"),
        };
        for w in workers {
            w.daemon.check_running()?;
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {START_TIMEOUT:?} waiting for {} live members; last status: {last}",
                workers.len()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
