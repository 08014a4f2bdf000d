//! Granary's FUSE client: a read-only POSIX view of a cache worker's namespace.
//!
//! [`fs::GranaryFs`] holds the filesystem logic over any [`granary_proto::CacheApi`] (a worker in
//! the same process, or one reached over gRPC), including when to let the kernel read a file
//! the local worker holds whole (FUSE passthrough); [`fuse::FuseAdapter`] is the thin fuser
//! layer, and [`uring`] serves its requests over FUSE-over-io_uring where the kernel allows;
//! [`mount`] checks the mount point and mounts.

pub mod backings;
pub mod fs;
pub mod fuse;
pub mod inodes;
pub mod mount;
pub mod prefetch;
pub mod uring;

pub use fs::{FsConfig, FsError, GranaryFs};
pub use mount::{MountError, Mounted, check_fuse_device, check_mount_dir, mount};
