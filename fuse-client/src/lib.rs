//! Granary's FUSE client: a read-only POSIX view of a cache worker's namespace.
//!
//! [`fs::GranaryFs`] holds the filesystem logic over any [`granary_proto::CacheApi`] (a worker in
//! the same process, or one reached over gRPC); [`open`] decides how each open file is read,
//! including when to let the kernel read a file the local worker holds whole (FUSE
//! passthrough); the pins-epoch trust rules are pure functions in [`granary_core::trust`].
//! [`kernel`] is the kernel side: [`kernel::fuser::FuseAdapter`] is the thin fuser layer,
//! [`kernel::uring`] serves its requests over FUSE-over-io_uring where the kernel allows, and
//! [`kernel::mount`] checks the mount point and mounts.
//!
//! Dependencies point one way: `kernel` -> `fs` -> `open` -> `error`, `inodes`, `backings`
//! (and `fs` -> `prefetch`, `hint`), all -> `granary_core`. [`hint`] also takes hints from
//! `granary hint` on the mount's socket.

pub mod backings;
pub mod error;
pub mod fs;
pub mod hint;
pub mod inodes;
pub mod journal;
pub mod kernel;
pub mod open;
pub mod pods;
pub mod prefetch;

pub use fs::{FsConfig, FsError, GranaryFs};
pub use kernel::handover::{
    Connection, HANDOFF_ENV, Handoff, Handovers, hold, inheritable, serve as serve_handed,
};
pub use kernel::mount::{MountError, Mounted, check_fuse_device, check_mount_dir, mount};
