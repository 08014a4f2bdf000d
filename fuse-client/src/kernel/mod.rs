//! The kernel side of the mount: how FUSE requests reach [`crate::fs::GranaryFs`] and how their
//! answers go back. Two transports: fuser's threads reading `/dev/fuse` ([`fuser`]), and FUSE over
//! io_uring ([`uring`]), where the kernel offers it. [`shared`] holds what both need (passthrough
//! backing files, the op metrics, the largest request); [`mount`] checks the mount point, mounts
//! and starts a transport.
//!
//! Dependencies point one way: `mount` -> `fuser`, `uring` -> `shared` -> [`crate::fs`]; no file
//! here uses one that uses it back.

pub mod devfuse;
pub mod fuser;
pub mod handover;
pub mod mount;
pub mod shared;
pub mod uring;
