//! Serving a kept connection over `/dev/fuse`: the loop a server runs on a connection whose
//! FUSE_INIT the keeper already answered ([`super::handover`]), where fuser (which must see
//! INIT itself) cannot be used.
//!
//! Two threads read requests from the keeper's `/dev/fuse` file itself, never from a clone
//! (`FUSE_DEV_IOC_CLONE`): the kernel ends the requests a clone holds with ECONNABORTED when it
//! is closed, which a dying server would do; requests read from the keeper's file stay in its
//! processing queue, and `FUSE_NOTIFY_RESEND` sends them again to the next server.
//!
//! READ is answered from a runtime task with one `writev` of the header and the data (no copy);
//! FORGET, BATCH_FORGET and INTERRUPT need no answer; everything else is copied into a slot laid
//! out as the io_uring transport's and answered by the same code ([`super::uring::serve`]).
//!
//! `unsafe`: `read`/`writev`/`write` on the device with live buffers, and slot hand-over as in
//! the rings.
#![allow(unsafe_code)]

use super::shared::{MAX_PAYLOAD, record};
use super::uring::ring::{Home, Lent};
use super::uring::serve::{Served, Server};
use super::uring::wire::{ENT, OP_IN, Slot, put_u32, u32_at, u64_at};
use crate::fs::{FsError, GranaryFs};
use crate::journal::Journal;
use granary_core::metrics as m;
use granary_proto::CacheApi;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;
use tokio::runtime::Handle;

mod op {
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const INTERRUPT: u32 = 36;
    pub const IOCTL: u32 = 39;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
}

/// `struct fuse_in_header`.
const IN_HEADER: usize = 40;
/// A slot's payload for requests other than READ and READDIR: room for a name (at most 4 KiB)
/// and for any of their answers (an entry, attributes: under 256 bytes).
const SLOT_PAYLOAD: usize = 4 << 10;
/// The kernel wants a read buffer of at least `max_write` + 8 KiB.
const READ_BUFFER: usize = MAX_PAYLOAD + (8 << 10);

/// `FUSE_NOTIFY_*` codes.
const NOTIFY_INVAL_INODE: i32 = 2;
const NOTIFY_INVAL_ENTRY: i32 = 3;
const NOTIFY_RESEND: i32 = 7;

/// The size of the request's op struct (`in_args[0]`), which the slot layout keeps apart from
/// what follows (a name, or nothing).
fn op_struct(opcode: u32) -> usize {
    match opcode {
        op::GETATTR | op::RELEASE | op::RELEASEDIR => 16,
        op::OPEN | op::OPENDIR | op::GETXATTR | op::LISTXATTR => 8,
        op::READ | op::READDIR | op::READDIRPLUS => 40,
        op::FLUSH => 24,
        op::IOCTL => 32,
        _ => 0,
    }
}

/// Writes `parts` to the device as one message (one `writev`).
fn writev(dev: &OwnedFd, parts: &[&[u8]]) -> std::io::Result<()> {
    let iov: Vec<libc::iovec> = parts
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut _,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: every iovec points into a live borrowed slice.
    let n = unsafe { libc::writev(dev.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes an answer. ENOENT (the request was interrupted, or the kernel forgot it) and ENODEV
/// (the mount is gone) are not errors for us.
fn write_parts(dev: &OwnedFd, parts: &[&[u8]]) {
    if let Err(e) = writev(dev, parts)
        && !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV))
    {
        tracing::warn!(error = %e, "a FUSE answer was refused");
    }
}

fn out_header(len: usize, error: i32, unique: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&((16 + len) as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// Writes the answer in `slot` (as [`super::uring::wire::Answer`] left it) to the device.
pub(crate) fn write_slot(dev: &OwnedFd, slot: &Slot) {
    // SAFETY: the caller owns the slot (it answered it).
    let (header, payload) = unsafe { slot.parts() };
    let len = (u32_at(header, ENT + 16) as usize).min(payload.len());
    write_parts(dev, &[&header[..16], &payload[..len]]);
}

/// Kernel notifications on a kept connection.
#[derive(Clone)]
pub struct DevNotifier(pub Arc<OwnedFd>);

impl DevNotifier {
    fn notify(&self, code: i32, body: &[&[u8]]) -> std::io::Result<()> {
        let len: usize = body.iter().map(|b| b.len()).sum();
        let header = out_header(len, code, 0);
        let mut parts = vec![&header[..]];
        parts.extend_from_slice(body);
        writev(&self.0, &parts)
    }

    /// `FUSE_NOTIFY_RESEND` (Linux 6.9+): the kernel sends again every request a server took
    /// and did not answer.
    pub fn resend(&self) -> std::io::Result<()> {
        self.notify(NOTIFY_RESEND, &[])
    }

    pub fn inval_entry(&self, parent: u64, name: &str) -> std::io::Result<()> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&parent.to_ne_bytes());
        b[8..12].copy_from_slice(&(name.len() as u32).to_ne_bytes());
        self.notify(NOTIFY_INVAL_ENTRY, &[&b, name.as_bytes(), &[0]])
    }

    pub fn inval_inode(&self, ino: u64) -> std::io::Result<()> {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&ino.to_ne_bytes());
        self.notify(NOTIFY_INVAL_INODE, &[&b])
    }
}

/// Starts `threads` threads serving the connection `dev` with `fs`. They run until the
/// connection ends (the keeper unmounts) or the process exits.
pub fn start<A: CacheApi>(
    dev: Arc<OwnedFd>,
    fs: Arc<GranaryFs<A>>,
    rt: Handle,
    journal: Option<Arc<Journal>>,
    threads: usize,
) -> std::io::Result<()> {
    let server = Server {
        fs,
        rt,
        dev,
        journal,
    };
    for i in 0..threads {
        let server = server.clone();
        std::thread::Builder::new()
            .name(format!("fuse-dev-{i}"))
            .spawn(move || {
                let _entered = server.rt.clone().enter();
                serve_loop(&server)
            })?;
    }
    Ok(())
}

fn serve_loop<A: CacheApi>(server: &Server<A>) {
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        // SAFETY: reads into a live buffer of its length.
        let n = unsafe { libc::read(server.dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // Interrupted before we took it, or a signal: read the next.
                Some(libc::ENOENT | libc::EINTR | libc::EAGAIN) => continue,
                Some(libc::ENODEV) => {
                    tracing::info!("the FUSE connection ended (unmounted)");
                    return;
                }
                _ => {
                    tracing::error!(error = %e, "reading /dev/fuse failed");
                    return;
                }
            }
        }
        let req = &buf[..n as usize];
        if req.len() < IN_HEADER {
            continue;
        }
        dispatch(server, req);
    }
}

fn dispatch<A: CacheApi>(server: &Server<A>, req: &[u8]) {
    let opcode = u32_at(req, 4);
    let unique = u64_at(req, 8);
    let nodeid = u64_at(req, 16);
    let body = &req[IN_HEADER..];
    match opcode {
        op::FORGET if body.len() >= 8 => server.fs.forget(nodeid, u64_at(body, 0)),
        op::BATCH_FORGET if body.len() >= 8 => {
            let count = u32_at(body, 0) as usize;
            let forgets: Vec<(u64, u64)> = body[8..]
                .chunks_exact(16)
                .take(count)
                .map(|one| (u64_at(one, 0), u64_at(one, 8)))
                .collect();
            server.fs.forget_many(&forgets);
        }
        op::FORGET | op::BATCH_FORGET | op::INTERRUPT => {}
        op::INIT => {
            // The keeper answered INIT; a second one is a protocol error.
            write_parts(&server.dev, &[&out_header(0, -libc::EPROTO, unique)]);
        }
        op::READ if body.len() >= 40 => read(server, unique, body),
        _ => in_slot(server, opcode, req),
    }
}

/// A READ, answered from the runtime with the data as it is.
fn read<A: CacheApi>(server: &Server<A>, unique: u64, body: &[u8]) {
    let fh = u64_at(body, 0);
    let offset = u64_at(body, 8);
    let size = u32_at(body, 16).min(MAX_PAYLOAD as u32);
    let (fs, dev) = (server.fs.clone(), server.dev.clone());
    server.rt.spawn(async move {
        let start = Instant::now();
        let result = fs.read(fh, offset, size).await;
        record("read", start, result.as_ref().map(|_| ()));
        match result {
            Ok(data) => {
                metrics::counter!(m::FUSE_READ_BYTES).increment(data.len() as u64);
                write_parts(&dev, &[&out_header(data.len(), 0, unique), &data]);
            }
            Err(e) => write_parts(&dev, &[&out_header(0, -errno(&e), unique)]),
        }
    });
}

fn errno(e: &FsError) -> i32 {
    e.errno()
}

/// Any other request: copied into a slot laid out as a ring's, answered by the rings' code.
fn in_slot<A: CacheApi>(server: &Server<A>, opcode: u32, req: &[u8]) {
    // A directory read's answer is as large as the kernel asks (a page or a few).
    let payload = match opcode {
        op::READDIR | op::READDIRPLUS if req.len() >= IN_HEADER + 20 => {
            (u32_at(req, IN_HEADER + 16) as usize).clamp(SLOT_PAYLOAD, MAX_PAYLOAD)
        }
        _ => SLOT_PAYLOAD,
    };
    let slot = Slot::new(payload);
    {
        // SAFETY: the slot is new and ours.
        let (header, payload) = unsafe { slot.parts() };
        header[..IN_HEADER].copy_from_slice(&req[..IN_HEADER]);
        let body = &req[IN_HEADER..];
        let k = op_struct(opcode).min(body.len()).min(OP_IN);
        header[OP_IN..OP_IN + k].copy_from_slice(&body[..k]);
        let rest = &body[k..];
        let n = rest.len().min(payload.len());
        payload[..n].copy_from_slice(&rest[..n]);
        put_u32(header, ENT + 16, n as u32);
    }
    let lent = std::cell::Cell::new(false);
    let lend = || {
        lent.set(true);
        Lent {
            slot: slot.clone(),
            home: Home::Dev(server.dev.clone()),
            answered: false,
        }
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.serve(&slot, lend))) {
        Ok(Served::Now) => write_slot(&server.dev, &slot),
        Ok(Served::Later) => {}
        // A lent slot answers EIO itself when dropped by the panic.
        Err(_) if lent.get() => {}
        Err(_) => write_parts(&server.dev, &[&out_header(0, -libc::EIO, u64_at(req, 8))]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_structs_match_the_kernel_abi() {
        // struct fuse_open_in, fuse_read_in, fuse_release_in, fuse_getattr_in, fuse_flush_in.
        assert_eq!(op_struct(op::OPEN), 8);
        assert_eq!(op_struct(op::READDIRPLUS), 40);
        assert_eq!(op_struct(op::RELEASEDIR), 16);
        assert_eq!(op_struct(op::GETATTR), 16);
        assert_eq!(op_struct(op::FLUSH), 24);
        assert_eq!(op_struct(1), 0, "LOOKUP: the name follows the header");
    }

    #[test]
    fn an_out_header_carries_length_error_and_unique() {
        let h = out_header(100, -libc::ENOENT, 0x8000_0000_0000_0007);
        assert_eq!(u32_at(&h, 0), 116);
        assert_eq!(u32_at(&h, 4) as i32, -libc::ENOENT);
        assert_eq!(
            u64_at(&h, 8),
            0x8000_0000_0000_0007,
            "a resent request's unique is kept"
        );
    }
}
