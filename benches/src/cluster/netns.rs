//! The emulated hosts of `--cluster --hosts`: one network namespace per host (`granary-h1`...),
//! each joined to a bridge in the root namespace (`granbr0`, 10.77.0.1/24) by a veth pair whose
//! two ends are both shaped with `tc qdisc ... tbf` to the link's rate, so that each host has a
//! link of that bandwidth in each direction (the kernel here has no `netem`). Host i is
//! 10.77.0.(10+i), its end of the pair `eth0`; the root end is `grhI`, on the bridge.
//!
//! The hosts share the root *mount* namespace: a process is started in a host with `nsenter
//! --net=/var/run/netns/NAME` (its network namespace only; `ip netns exec` would also give it a
//! mount namespace of its own, hiding a FUSE mount it makes from everyone else).
//!
//! [`Network::create`] first removes what a killed run may have left (the same names), and its
//! guard removes the namespaces (which takes their veths and qdiscs with them) and the bridge
//! however the benchmark ends.

use crate::cleanup::{self, Guard};
use crate::host::run_command;
use anyhow::{Context, bail};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};

/// The bridge in the root namespace.
const BRIDGE: &str = "granbr0";
/// The first three octets of the hosts' subnet.
const SUBNET: [u8; 3] = [10, 77, 0];
/// The most hosts [`Network::create`] makes (and removes leftovers of).
pub const MAX_HOSTS: usize = 8;
/// The token bucket's depth and queue: a 256 KiB burst (a few dozen packets at line rate) and at
/// most 50 ms of queued packets, as a switch port would.
const TBF_BURST: &str = "256k";
const TBF_LATENCY: &str = "50ms";

/// The bridge and the hosts; all removed when dropped.
pub struct Network {
    pub link_mbit: u32,
    pub hosts: Vec<Host>,
    _remove: Guard,
}

/// One emulated host.
#[derive(Debug, Clone)]
pub struct Host {
    /// The network namespace, `granary-hI`.
    pub netns: String,
    /// The root end of its veth pair, `grhI`: what it transmits goes to the host.
    pub veth: String,
    pub ip: Ipv4Addr,
}

/// Bytes that crossed a host's link so far, each way.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkBytes {
    pub to_host: u64,
    pub from_host: u64,
}

impl Network {
    /// The root namespace's address on the bridge: where the hosts reach etcd and the S3
    /// server.
    pub fn gateway() -> Ipv4Addr {
        let [a, b, c] = SUBNET;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// Makes the bridge and `n` hosts with links of `link_mbit` each way.
    pub fn create(n: usize, link_mbit: u32) -> anyhow::Result<Network> {
        if n == 0 || n > MAX_HOSTS {
            bail!("{n} hosts: between 1 and {MAX_HOSTS}");
        }
        if link_mbit == 0 {
            bail!("a link of 0 Mbit/s");
        }
        remove_all();
        let remove = cleanup::register(
            format!("remove the emulated hosts (bridge {BRIDGE})"),
            remove_all,
        );
        let hosts: Vec<Host> = (1..=n).map(Host::new).collect();
        for cmd in setup_commands(&hosts, link_mbit) {
            run_command(Command::new(&cmd[0]).args(&cmd[1..]))?;
        }
        for host in &hosts {
            host.check_shaped(link_mbit)?;
        }
        Ok(Network {
            link_mbit,
            hosts,
            _remove: remove,
        })
    }
}

impl Host {
    fn new(index: usize) -> Host {
        let [a, b, c] = SUBNET;
        Host {
            netns: format!("granary-h{index}"),
            veth: format!("grh{index}"),
            ip: Ipv4Addr::new(a, b, c, 10 + index as u8),
        }
    }

    /// `program` to be run in this host's network namespace (and the root mount namespace).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg("--")
            .arg(program);
        cmd
    }

    /// What crossed this host's link so far (the root end's counters).
    pub fn link_bytes(&self) -> anyhow::Result<LinkBytes> {
        let read = |what: &str| -> anyhow::Result<u64> {
            let path = format!("/sys/class/net/{}/statistics/{what}", self.veth);
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
            text.trim()
                .parse()
                .with_context(|| format!("{path}: {text:?}"))
        };
        Ok(LinkBytes {
            to_host: read("tx_bytes")?,
            from_host: read("rx_bytes")?,
        })
    }

    /// Fails unless both ends of the link have the tbf qdisc at `link_mbit`.
    fn check_shaped(&self, link_mbit: u32) -> anyhow::Result<()> {
        let rate = tc_rate(link_mbit);
        for (netns, dev) in [(None, self.veth.as_str()), (Some(&self.netns), "eth0")] {
            let mut cmd = Command::new("tc");
            if let Some(ns) = netns {
                cmd.args(["-n", ns]);
            }
            let shown = run_command(cmd.args(["qdisc", "show", "dev", dev]))?;
            if !shown.contains("qdisc tbf") || !shown.contains(&format!("rate {rate}")) {
                bail!("{dev} of {}: no tbf at {rate}: {shown}", self.netns);
            }
        }
        Ok(())
    }
}

/// How `tc` shows a rate of `mbit` Mbit/s.
fn tc_rate(mbit: u32) -> String {
    if mbit.is_multiple_of(1000) {
        format!("{}Gbit", mbit / 1000)
    } else {
        format!("{mbit}Mbit")
    }
}

/// The links' MTU: jumbo frames, as the networks between GPU nodes run them (QUIC's MTU
/// discovery finds it; at 1,500 bytes each datagram carries a sixth as much for the same work).
const LINK_MTU: u32 = 9000;

/// The commands that make the bridge and `hosts`, in order.
fn setup_commands(hosts: &[Host], link_mbit: u32) -> Vec<Vec<String>> {
    let gateway = format!("{}/24", Network::gateway());
    let tbf = |prefix: &[&str], dev: &str| -> Vec<String> {
        let rate = format!("{link_mbit}mbit");
        let args = [
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            &rate,
            "burst",
            TBF_BURST,
            "latency",
            TBF_LATENCY,
        ];
        std::iter::once("tc")
            .chain(prefix.iter().copied())
            .chain(args)
            .map(String::from)
            .collect()
    };
    let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    let mut cmds = vec![
        words(&format!("ip link add {BRIDGE} mtu {LINK_MTU} type bridge")),
        words(&format!("ip addr add {gateway} dev {BRIDGE}")),
        words(&format!("ip link set {BRIDGE} up")),
    ];
    for h in hosts {
        let (ns, veth) = (&h.netns, &h.veth);
        cmds.extend([
            words(&format!("ip netns add {ns}")),
            words(&format!(
                "ip link add {veth} mtu {LINK_MTU} type veth peer name eth0 mtu {LINK_MTU} netns {ns}"
            )),
            words(&format!("ip link set {veth} master {BRIDGE}")),
            words(&format!("ip link set {veth} up")),
            words(&format!("ip -n {ns} addr add {}/24 dev eth0", h.ip)),
            words(&format!("ip -n {ns} link set eth0 up")),
            words(&format!("ip -n {ns} link set lo up")),
            // Into the host, then out of it.
            tbf(&[], veth),
            tbf(&["-n", ns], "eth0"),
        ]);
    }
    cmds
}

/// Removes every namespace and the bridge this module makes (those that exist). Never fails.
fn remove_all() {
    let quiet = |args: &[&str]| {
        let _ = Command::new("ip")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    };
    for i in 1..=MAX_HOSTS {
        let ns = format!("granary-h{i}");
        if Path::new("/var/run/netns").join(&ns).exists() {
            quiet(&["netns", "del", &ns]);
        }
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        quiet(&["link", "del", BRIDGE]);
    }
    if Path::new("/sys/class/net").join(BRIDGE).exists() {
        eprintln!("granary-bench: cannot remove the bridge {BRIDGE}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_gets_its_namespace_address_and_a_shaped_link_each_way() {
        let hosts: Vec<Host> = (1..=2).map(Host::new).collect();
        assert_eq!(hosts[1].ip, Ipv4Addr::new(10, 77, 0, 12));
        let cmds: Vec<String> = setup_commands(&hosts, 1000)
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert_eq!(cmds[1], "ip addr add 10.77.0.1/24 dev granbr0");
        for (ns, veth, ip) in [
            ("granary-h1", "grh1", "10.77.0.11"),
            ("granary-h2", "grh2", "10.77.0.12"),
        ] {
            let has = |c: &str| assert!(cmds.iter().any(|x| x == c), "no {c:?} in {cmds:#?}");
            has(&format!("ip netns add {ns}"));
            has(&format!(
                "ip link add {veth} mtu 9000 type veth peer name eth0 mtu 9000 netns {ns}"
            ));
            has(&format!("ip -n {ns} addr add {ip}/24 dev eth0"));
            has(&format!("ip -n {ns} link set lo up"));
            has(&format!(
                "tc qdisc add dev {veth} root tbf rate 1000mbit burst 256k latency 50ms"
            ));
            has(&format!(
                "tc -n {ns} qdisc add dev eth0 root tbf rate 1000mbit burst 256k latency 50ms"
            ));
        }
        // The bridge exists before any veth is put on it.
        let bridge = cmds.iter().position(|c| c.ends_with("type bridge"));
        let first_master = cmds.iter().position(|c| c.contains("master"));
        assert!(bridge < first_master);
    }

    #[test]
    fn a_host_command_enters_only_its_network_namespace() {
        let cmd = Host::new(3).command(Path::new("/bin/granary"));
        assert_eq!(cmd.get_program(), "nsenter");
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            ["--net=/var/run/netns/granary-h3", "--", "/bin/granary"]
        );
    }

    #[test]
    fn rates_are_matched_as_tc_shows_them() {
        assert_eq!(tc_rate(1000), "1Gbit");
        assert_eq!(tc_rate(2000), "2Gbit");
        assert_eq!(tc_rate(500), "500Mbit");
    }
}
