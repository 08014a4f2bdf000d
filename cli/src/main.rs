//! `granary`: the one binary. This crate is the composition root: it parses flags, loads
//! settings, builds the components and wires them together; it decides nothing else.

mod cmd_cluster;
mod cmd_csi;
mod cmd_dataset;
mod cmd_hint;
mod cmd_mount;
mod cmd_scheduler;
mod cmd_server;
mod cmd_signer;
mod cmd_up;
mod csi_mount;
mod dashboard;
mod keeper;
mod mount_flags;
mod runtime;
mod tls_args;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// The version, with a build id: `granary --version` prints it and every FUSE server logs it.
/// The upgrade test makes a second build by rewriting the id's 16 digits in a copy.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (granary-build-id:0000000000000000)"
);

#[derive(Parser)]
#[command(
    name = "granary",
    version = VERSION,
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
    /// Tell a mount the order in which the next epoch reads its files: it fetches them ahead.
    Hint(cmd_hint::HintArgs),
    /// Run the kube-scheduler extender: gangs placed whole near their data, bound only when
    /// GPUs and data are ready.
    Scheduler(cmd_scheduler::SchedulerArgs),
    /// Approve and sign node certificate requests (CSR API); the only holder of the CA key.
    Signer(cmd_signer::SignerArgs),
    /// The CSI node plugin (driver csi.granary.io): gives pods directories of the node's mount as
    /// read-only volumes, each tenant only its own.
    Csi(cmd_csi::CsiArgs),
}

/// Allocations from this size up get their own mapping, returned to the system when freed.
/// glibc's default threshold rises to the largest block freed (4 MiB): blocks are then carved
/// from its heaps, whose freed memory stays resident (80 MiB more peak RSS with 16 readers).
const MMAP_THRESHOLD: i32 = 1 << 20;

#[allow(unsafe_code)]
fn fix_mmap_threshold() {
    // SAFETY: mallopt only sets a parameter of glibc's allocator; called before any thread
    // starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

fn main() -> ExitCode {
    fix_mmap_threshold();
    // First: a FUSE server started by its keeper takes the descriptors it inherited.
    let handoff = granary_fuse_client::Handoff::from_env();
    let cli = Cli::parse();
    runtime::init_tracing();
    let handoff = match handoff {
        Ok(Some(handoff)) => {
            // The keeper blocks the signals it waits for; a child inherits that mask.
            if let Err(e) = nix::sys::signal::SigSet::empty().thread_set_mask() {
                eprintln!("granary: error: cannot unblock signals: {e}");
                return ExitCode::FAILURE;
            }
            tracing::info!(
                version = VERSION,
                "FUSE server starting; it takes over the mount its keeper holds"
            );
            Some(handoff)
        }
        Ok(None) => None,
        Err(e) => {
            eprintln!("granary: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Up(args) => match (handoff, cmd_up::kept(&args)) {
            (None, Some(kept)) => return exit(keeper::run(kept)),
            (handoff, _) => runtime::block_on(cmd_up::run(args, handoff)),
        },
        Command::Server(args) => match (handoff, cmd_server::kept(&args)) {
            (None, Some(kept)) => return exit(keeper::run(kept)),
            (handoff, _) => runtime::block_on(cmd_server::run(args, handoff)),
        },
        Command::Mount(args) if args.upgrade => {
            return exit(keeper::upgrade(&args.dir, mount_dir_of));
        }
        Command::Mount(args) => match (handoff, cmd_mount::kept(&args)) {
            (None, Some(kept)) => return exit(keeper::run(kept)),
            (handoff, _) => runtime::block_on(cmd_mount::run(args, handoff)),
        },
        Command::Status(args) => runtime::block_on(cmd_cluster::status(args)),
        Command::Certs(args) => cmd_cluster::certs(args),
        Command::Dataset(args) => runtime::block_on(cmd_dataset::run(args)),
        Command::Hint(args) => cmd_hint::run(args),
        Command::Scheduler(args) => runtime::block_on(cmd_scheduler::run(args)),
        Command::Signer(args) => runtime::block_on(cmd_signer::run(args)),
        Command::Csi(args) => runtime::block_on(cmd_csi::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("granary: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The directory a `granary up`, `granary mount` or `granary server` command line mounts (not
/// an upgrade's).
fn mount_dir_of(argv: &[std::ffi::OsString]) -> Option<std::path::PathBuf> {
    match Cli::try_parse_from(argv).ok()?.command {
        Command::Up(args) => Some(args.mount),
        Command::Server(args) => cmd_server::mount_dir(&args),
        Command::Mount(args) if !args.upgrade => Some(args.dir),
        _ => None,
    }
}

fn exit(result: anyhow::Result<ExitCode>) -> ExitCode {
    result.unwrap_or_else(|e| {
        eprintln!("granary: error: {}", one_line(&e));
        ExitCode::FAILURE
    })
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
