//! What both transports share: passthrough backing files registered on the connection's
//! `/dev/fuse` ([`KernelBacking`]) and the id an open answer names for one, whether an open asks
//! for write access, the op metrics every answer records, and the largest request or answer body.

use crate::fs::{Backing, FsError};
use crate::journal::{Journal, Record};
use fuser::BackingId;
use granary_core::metrics as m;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

/// The largest request or answer body: the mount's `max_write` and `max_pages` are set so that
/// the kernel never needs more (a 1 MiB read).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// A local file registered with the kernel for passthrough (`FUSE_DEV_IOC_BACKING_OPEN` on the
/// connection's `/dev/fuse`), for both transports; unregistered when dropped.
pub struct KernelBacking {
    dev: Arc<OwnedFd>,
    id: u32,
    /// Where a kept connection records the id's registration and its end.
    journal: Option<Arc<Journal>>,
}

impl KernelBacking {
    pub fn open(
        dev: &Arc<OwnedFd>,
        file: &std::fs::File,
        journal: Option<&Arc<Journal>>,
    ) -> std::io::Result<Self> {
        let id = BackingId::create_raw(&**dev, file)?;
        if let Some(j) = journal {
            j.record(Record::Backing { id });
        }
        Ok(KernelBacking {
            dev: dev.clone(),
            id,
            journal: journal.cloned(),
        })
    }

    /// An id an earlier server registered on this connection (its journal names it).
    pub fn adopt(dev: &Arc<OwnedFd>, id: u32, journal: Option<&Arc<Journal>>) -> Self {
        KernelBacking {
            dev: dev.clone(),
            id,
            journal: journal.cloned(),
        }
    }

    /// The `backing_id` an open answer names.
    pub fn id(&self) -> u32 {
        self.id
    }
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, u32)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = (1 << 30) | (4 << 16) | (229 << 8) | 2;

#[allow(unsafe_code)]
impl Drop for KernelBacking {
    fn drop(&mut self) {
        // SAFETY: the ioctl reads one u32 from a live local. After an unmount it fails, harmlessly.
        unsafe {
            libc::ioctl(
                self.dev.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_CLOSE,
                &self.id as *const u32,
            )
        };
        if let Some(j) = &self.journal {
            j.record(Record::Unbacking { id: self.id });
        }
    }
}

/// The kernel id of a backing file this module registered.
pub(crate) fn backing_id(backing: &Backing) -> Option<u32> {
    backing
        .downcast_ref::<KernelBacking>()
        .map(KernelBacking::id)
}

/// Registers `file` on the connection `dev` as a passthrough backing file.
pub(crate) fn register_backing(
    dev: &Arc<OwnedFd>,
    file: &std::fs::File,
    journal: Option<&Arc<Journal>>,
) -> std::io::Result<Backing> {
    KernelBacking::open(dev, file, journal).map(|b| Arc::new(b) as Backing)
}

/// Whether an open with these `open(2)` flags asks for write access (or truncation).
pub(crate) fn wants_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

pub(crate) fn record(op: &'static str, start: Instant, outcome: Result<(), &FsError>) {
    let label = match outcome {
        Ok(()) => "ok",
        Err(e) => e.label(),
    };
    metrics::counter!(m::FUSE_OPS, "op" => op, "outcome" => label).increment(1);
    metrics::histogram!(m::FUSE_OP_SECONDS, "op" => op).record(start.elapsed().as_secs_f64());
    if let Err(e @ (FsError::Io(_) | FsError::Stale(_))) = outcome {
        tracing::warn!(op, error = %e, "filesystem operation failed");
    }
}

/// The kernel's id of a passthrough open's backing file; counts the open.
pub(crate) fn passthrough_open(backing: &Backing) -> u32 {
    metrics::counter!(m::FUSE_PASSTHROUGH_OPENS).increment(1);
    backing
        .downcast_ref::<KernelBacking>()
        .expect("backing files are registered as KernelBacking")
        .id()
}
