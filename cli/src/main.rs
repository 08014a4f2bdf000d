//! `granary`: the one binary. This crate is the composition root: it parses flags, loads
//! settings, builds the components and wires them together; it decides nothing else.

mod cmd_cluster;
mod cmd_dataset;
mod cmd_mount;
mod cmd_scheduler;
mod cmd_server;
mod cmd_signer;
mod cmd_up;
mod dashboard;
mod mount_flags;
mod runtime;
mod tls_args;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "granary",
    version,
    about = "Granary: a distributed data cache and staging layer for AI training",
    long_about = "Granary puts S3, Ceph RGW and POSIX sources (GlusterFS, CephFS, NFS) behind one read-only \
                  namespace, mounted with FUSE, cached in memory and on local disk.\n\n\
                  Logs go to stderr; set GRANARY_LOG (e.g. GRANARY_LOG=debug) to choose what is logged."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a cache worker and a FUSE mount of one source in this process (single node).
    Up(cmd_up::UpArgs),
    /// Run a cache worker serving its namespace to remote FUSE clients.
    Server(cmd_server::ServerArgs),
    /// Mount a remote worker's (or a whole cluster's) namespace with FUSE.
    Mount(cmd_mount::MountArgs),
    /// Show the cluster's members, their cache use and hit ratios.
    Status(cmd_cluster::StatusArgs),
    /// Write a development CA and certificates for workers and clients.
    Certs(cmd_cluster::CertsArgs),
    /// Pin, load, watch and release datasets.
    Dataset(cmd_dataset::DatasetArgs),
    /// Run the kube-scheduler extender: gangs placed whole near their data, bound only when
    /// GPUs and data are ready.
    Scheduler(cmd_scheduler::SchedulerArgs),
    /// Approve and sign node certificate requests (CSR API); the only holder of the CA key.
    Signer(cmd_signer::SignerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    runtime::init_tracing();
    let result = match cli.command {
        Command::Up(args) => runtime::block_on(cmd_up::run(args)),
        Command::Server(args) => runtime::block_on(cmd_server::run(args)),
        Command::Mount(args) => runtime::block_on(cmd_mount::run(args)),
        Command::Status(args) => runtime::block_on(cmd_cluster::status(args)),
        Command::Certs(args) => cmd_cluster::certs(args),
        Command::Dataset(args) => runtime::block_on(cmd_dataset::run(args)),
        Command::Scheduler(args) => runtime::block_on(cmd_scheduler::run(args)),
        Command::Signer(args) => runtime::block_on(cmd_signer::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("granary: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ").replace('\n', " ")
}
