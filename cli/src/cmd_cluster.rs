//! `granary certs` (development TLS material) and `granary status` (the cluster at a glance).

use anyhow::Context;
use clap::Args;
use granary_core::ByteSize;
use granary_net::client::GrpcCache;
use granary_net::membership::{MemberInfo, Membership};
use granary_net::tls::generate_dev_certs;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Directory to write ca.pem/ca.key and NAME.pem/NAME.key into (an existing CA there is reused).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Names to issue certificates for: worker node ids, and the clients' name (e.g. `client`).
    #[arg(value_name = "NAME", required_unless_present = "csr")]
    pub names: Vec<String>,
    /// Instead of signing here, ask the cluster's signer for this node's certificate through
    /// the Kubernetes CSR API (no CA key needed): writes ca.pem, NODE.pem and NODE.key.
    #[arg(long, requires = "node", conflicts_with = "names")]
    pub csr: bool,
    /// The node to ask for with --csr (the node this pod runs on).
    #[arg(long, value_name = "NODE", requires = "csr")]
    pub node: Option<String>,
    /// With --csr: keep running and renew the certificate at 2/3 of its lifetime.
    #[arg(long, requires = "csr")]
    pub renew: bool,
    #[command(flatten)]
    pub csr_args: crate::cmd_signer::CsrArgs,
}

pub fn certs(args: CertsArgs) -> anyhow::Result<()> {
    if args.csr {
        let node = args.node.unwrap_or_default();
        return crate::runtime::block_on(crate::cmd_signer::certs_by_csr(
            node,
            args.out,
            args.renew,
            args.csr_args,
        ));
    }
    let written = generate_dev_certs(&args.out, &args.names)?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The cluster's etcd endpoints.
    #[arg(
        long,
        value_name = "URL[,URL]",
        value_delimiter = ',',
        required_unless_present = "server"
    )]
    pub etcd: Vec<String>,
    /// A single worker instead of a cluster.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "etcd")]
    pub server: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub tls: crate::tls_args::TlsArgs,
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let tls = args.tls.identity()?;
    let (epoch, members) = match &args.server {
        Some(addr) => {
            let addr = addr
                .parse()
                .with_context(|| format!("bad --server address {addr:?}"))?;
            (
                0,
                vec![MemberInfo {
                    node_id: addr_string(addr),
                    data_addr: addr,
                    api_addr: addr,
                    memory_capacity: 0,
                    disk_capacity: 0,
                    dataset_capacity: 0,
                }],
            )
        }
        None => {
            let etcd = crate::tls_args::etcd(&args.etcd, tls.as_ref())?;
            let view = Membership::read(&etcd).await?;
            (view.epoch, view.members)
        }
    };
    let mut nodes = Vec::new();
    for m in &members {
        // A single --server is checked against its address; a member against its node id.
        let name = args.server.is_none().then_some(m.node_id.as_str());
        nodes.push((m, member_info(m, tls.as_ref(), name).await));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status_json(epoch, &nodes))?
        );
        return Ok(());
    }
    println!("epoch {epoch}, {} member(s)", members.len());
    println!(
        "{:<16} {:<22} {:>4} {:>12} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "node", "address", "up", "memory", "hits mem", "hits disk", "backend", "peer", "hit ratio"
    );
    for (m, info) in nodes {
        match info {
            Some(i) => println!(
                "{:<16} {:<22} {:>4} {:>12} {:>10} {:>10} {:>10} {:>10} {:>9}",
                i.node_id,
                m.api_addr,
                "yes",
                format!(
                    "{}/{}",
                    ByteSize(i.stats.memory_used),
                    ByteSize(i.memory_capacity)
                ),
                i.stats.reads_memory,
                i.stats.reads_disk,
                i.stats.reads_backend,
                i.stats.reads_peer,
                i.stats
                    .hit_ratio()
                    .map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
            ),
            None => println!("{:<16} {:<22} {:>4}", m.node_id, m.api_addr, "no"),
        }
    }
    Ok(())
}

/// A member's fresh counters over its gRPC API (`None` when it does not answer in 3 s); over TLS
/// with `tls`, the worker's certificate checked for `name` (default: its address).
pub async fn member_info(
    m: &MemberInfo,
    tls: Option<&granary_net::tls::TlsIdentity>,
    name: Option<&str>,
) -> Option<granary_proto::Info> {
    let addr = m.api_addr.to_string();
    match GrpcCache::connect(&addr, tls, name, Duration::from_secs(3)).await {
        Ok(api) => api.fresh_info().await.ok(),
        Err(_) => None,
    }
}

/// What `granary status --json` prints (and the dashboard shows): the epoch and every member.
pub fn status_json(
    epoch: u64,
    nodes: &[(&MemberInfo, Option<granary_proto::Info>)],
) -> serde_json::Value {
    let nodes: Vec<_> = nodes
        .iter()
        .map(|(m, info)| match info {
            Some(i) => json!({
                "node_id": i.node_id, "addr": m.api_addr.to_string(), "up": true,
                "memory_capacity": i.memory_capacity, "memory_used": i.stats.memory_used,
                "disk_capacity": i.disk_capacity, "membership_epoch": i.stats.membership_epoch,
                "reads": { "memory": i.stats.reads_memory, "disk": i.stats.reads_disk,
                           "backend": i.stats.reads_backend, "peer": i.stats.reads_peer },
                "bytes": { "memory": i.stats.bytes_memory, "disk": i.stats.bytes_disk,
                           "backend": i.stats.bytes_backend, "peer": i.stats.bytes_peer },
                "hit_ratio": i.stats.hit_ratio(),
            }),
            None => json!({ "node_id": m.node_id, "addr": m.api_addr.to_string(), "up": false }),
        })
        .collect();
    json!({ "epoch": epoch, "members": nodes })
}

fn addr_string(addr: std::net::SocketAddr) -> String {
    addr.to_string()
}
