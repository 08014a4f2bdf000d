//! The wire side of FUSE over io_uring: a registered slot ([`Slot`]: the kernel's
//! `fuse_uring_req_header` and a payload buffer), where the kernel writes each request and we
//! write its answer over it ([`Answer`]): the kernel's structs (`fuse_attr`, `fuse_entry_out`,
//! `fuse_open_out`, `fuse_dirent`) encoded by offset, in native byte order.
//!
//! `unsafe`: the kernel reads and writes the slots' buffers behind the compiler's back.
#![allow(unsafe_code)]

use crate::fs::{Attr, DirItem, FsError, OpenIo, Opened};
use crate::kernel::shared::{passthrough_open, record};
use granary_proto::EntryKind;
use std::cell::UnsafeCell;
use std::sync::Arc;
use std::time::Instant;

/// `struct fuse_uring_req_header`: in/out header (128), op header (128), ring entry (32).
pub(crate) const HEADER: usize = 288;
pub(crate) const OP_IN: usize = 128;
pub(crate) const ENT: usize = 256;

pub(crate) mod op {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const READDIRPLUS: u32 = 44;
}

const FOPEN_KEEP_CACHE: u32 = 1 << 1;
const FOPEN_PASSTHROUGH: u32 = 1 << 7;

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// `struct fuse_attr` (88 bytes).
fn put_attr(b: &mut [u8], a: &Attr) {
    let (secs, nsecs) = if a.mtime_ns >= 0 {
        (
            a.mtime_ns as u64 / 1_000_000_000,
            (a.mtime_ns % 1_000_000_000) as u32,
        )
    } else {
        (0, 0)
    };
    let (kind, nlink) = match a.kind {
        EntryKind::Dir => (libc::S_IFDIR, 2),
        EntryKind::File => (libc::S_IFREG, 1),
    };
    put_u64(b, 0, a.ino);
    put_u64(b, 8, a.size);
    put_u64(b, 16, a.size.div_ceil(512));
    for at in [24, 32, 40] {
        put_u64(b, at, secs);
    }
    for at in [48, 52, 56] {
        put_u32(b, at, nsecs);
    }
    put_u32(b, 60, kind | u32::from(a.perm));
    put_u32(b, 64, nlink);
    put_u32(b, 68, a.uid);
    put_u32(b, 72, a.gid);
    put_u32(b, 76, 0);
    put_u32(b, 80, a.blksize);
    put_u32(b, 84, 0);
}

/// `struct fuse_entry_out` (128 bytes).
fn put_entry(b: &mut [u8], a: &Attr) {
    put_u64(b, 0, a.ino);
    put_u64(b, 8, 0);
    put_u64(b, 16, a.ttl.as_secs());
    put_u64(b, 24, a.ttl.as_secs());
    put_u32(b, 32, a.ttl.subsec_nanos());
    put_u32(b, 36, a.ttl.subsec_nanos());
    put_attr(&mut b[40..128], a);
}

/// Adds directory entries to an answer until it is full.
pub(crate) struct DirWriter<'a> {
    pub(crate) buf: &'a mut [u8],
    pub(crate) len: usize,
    pub(crate) plus: bool,
}

impl DirWriter<'_> {
    /// Appends `item` (`struct fuse_dirent`, after a `fuse_entry_out` for READDIRPLUS); false
    /// when it does not fit.
    pub(crate) fn add(&mut self, item: &DirItem) -> bool {
        let name = item.name.as_bytes();
        let head = if self.plus { 128 } else { 0 };
        let size = head + (24 + name.len()).next_multiple_of(8);
        if self.len + size > self.buf.len() {
            return false;
        }
        let b = &mut self.buf[self.len..self.len + size];
        b.fill(0);
        if self.plus {
            put_entry(&mut b[..128], &item.attr);
        }
        let d = &mut b[head..];
        put_u64(d, 0, item.ino);
        put_u64(d, 8, item.next_offset);
        put_u32(d, 16, name.len() as u32);
        let dtype = match item.attr.kind {
            EntryKind::Dir => libc::DT_DIR,
            EntryKind::File => libc::DT_REG,
        };
        put_u32(d, 20, u32::from(dtype));
        d[24..24 + name.len()].copy_from_slice(name);
        self.len += size;
        true
    }
}

/// One registered slot: the kernel writes a request into it, we write the answer over it.
/// Owned by the ring thread while the kernel or that thread holds it, and by one runtime task
/// while the task works on the request; never by two at once.
pub(crate) struct Slot {
    pub(crate) header: UnsafeCell<[u8; HEADER]>,
    pub(crate) payload: UnsafeCell<Box<[u8]>>,
}

// SAFETY: access is handed over explicitly (see `Slot`): the ring thread gives the slot to at
// most one task and touches it again only after that task sent its index back.
unsafe impl Sync for Slot {}

impl Slot {
    pub(crate) fn new(payload: usize) -> Arc<Slot> {
        Arc::new(Slot {
            header: UnsafeCell::new([0; HEADER]),
            // Zeroed: pages are mapped only when an answer first writes them.
            payload: UnsafeCell::new(vec![0; payload].into_boxed_slice()),
        })
    }

    /// # Safety
    /// The caller owns the slot (see [`Slot`]).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn parts(&self) -> (&mut [u8; HEADER], &mut [u8]) {
        let (header, payload) = unsafe { (&mut *self.header.get(), &mut *self.payload.get()) };
        (header, &mut payload[..])
    }
}

/// Writes an answer into a slot.
pub(crate) struct Answer<'a> {
    pub(crate) header: &'a mut [u8; HEADER],
    pub(crate) payload: &'a mut [u8],
}

impl Answer<'_> {
    /// `struct fuse_out_header` and the body size. The out header's `unique` sits where the in
    /// header's did, so it is left as the kernel wrote it.
    pub(crate) fn finish(&mut self, error: i32, len: usize) {
        put_u32(&mut self.header[..], 0, (16 + len) as u32);
        put_u32(&mut self.header[..], 4, (-error) as u32);
        put_u32(&mut self.header[..], ENT + 16, len as u32);
    }

    pub(crate) fn error(&mut self, errno: i32) {
        self.finish(errno, 0);
    }

    fn fs_error(&mut self, e: &FsError) {
        self.error(e.errno());
    }

    pub(crate) fn empty(&mut self) {
        self.finish(0, 0);
    }

    pub(crate) fn body(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) {
        fill(&mut self.payload[..len]);
        self.finish(0, len);
    }

    pub(crate) fn entry(&mut self, a: &Attr) {
        self.body(128, |b| put_entry(b, a));
    }

    pub(crate) fn attr(&mut self, a: &Attr) {
        self.body(104, |b| {
            put_u64(b, 0, a.ttl.as_secs());
            put_u32(b, 8, a.ttl.subsec_nanos());
            put_u32(b, 12, 0);
            put_attr(&mut b[16..104], a);
        });
    }

    /// `struct fuse_open_out`.
    pub(crate) fn open(&mut self, fh: u64, flags: u32, backing_id: u32) {
        self.body(16, |b| {
            put_u64(b, 0, fh);
            put_u32(b, 8, flags);
            put_u32(b, 12, backing_id);
        });
    }

    pub(crate) fn opened(&mut self, start: Instant, result: Result<Opened, FsError>) {
        self.outcome("open", start, result, |a, opened| match &opened.io {
            OpenIo::Passthrough(backing) => {
                a.open(opened.fh, FOPEN_PASSTHROUGH, passthrough_open(backing));
            }
            OpenIo::Userspace => {
                let flags = if opened.keep_cache {
                    FOPEN_KEEP_CACHE
                } else {
                    0
                };
                a.open(opened.fh, flags, 0);
            }
        });
    }

    /// Records `op`'s outcome (count, latency), then answers with `ok` of its value, or with
    /// its errno.
    pub(crate) fn outcome<T>(
        &mut self,
        op: &'static str,
        start: Instant,
        result: Result<T, FsError>,
        ok: impl FnOnce(&mut Self, T),
    ) {
        record(op, start, result.as_ref().map(|_| ()));
        match result {
            Ok(value) => ok(self, value),
            Err(e) => self.fs_error(&e),
        }
    }

    pub(crate) fn data(&mut self, data: &[u8]) {
        let n = data.len().min(self.payload.len());
        self.body(n, |b| b.copy_from_slice(&data[..n]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn attr(kind: EntryKind) -> Attr {
        Attr {
            ino: 42,
            kind,
            size: 1000,
            mtime_ns: 1_700_000_000_123_456_789,
            perm: 0o444,
            uid: 7,
            gid: 8,
            blksize: 4096,
            ttl: Duration::from_secs(30),
        }
    }

    #[test]
    fn attributes_encode_as_struct_fuse_attr() {
        let mut b = [0u8; 88];
        put_attr(&mut b, &attr(EntryKind::File));
        assert_eq!(u64_at(&b, 0), 42);
        assert_eq!(u64_at(&b, 8), 1000);
        assert_eq!(u64_at(&b, 16), 2, "512-byte blocks, rounded up");
        assert_eq!(u64_at(&b, 32), 1_700_000_000, "mtime seconds");
        assert_eq!(u32_at(&b, 52), 123_456_789, "mtime nanoseconds");
        assert_eq!(u32_at(&b, 60), libc::S_IFREG | 0o444);
        assert_eq!(u32_at(&b, 64), 1, "nlink");
        assert_eq!((u32_at(&b, 68), u32_at(&b, 72)), (7, 8));
        assert_eq!(u32_at(&b, 80), 4096);
        put_attr(&mut b, &attr(EntryKind::Dir));
        assert_eq!(u32_at(&b, 60), libc::S_IFDIR | 0o444);
        assert_eq!(u32_at(&b, 64), 2);
    }

    #[test]
    fn an_answer_writes_the_out_header_over_the_in_header_and_keeps_unique() {
        let slot = Slot::new(4096);
        let (header, payload) = unsafe { slot.parts() };
        put_u32(header, 0, 64);
        put_u32(header, 4, op::OPEN);
        put_u64(header, 8, 0xdead_beef);
        let mut a = Answer { header, payload };
        a.open(9, FOPEN_PASSTHROUGH, 3);
        let (header, payload) = unsafe { slot.parts() };
        assert_eq!(u32_at(header, 0), 16 + 16, "out header + fuse_open_out");
        assert_eq!(u32_at(header, 4), 0, "no error");
        assert_eq!(u64_at(header, 8), 0xdead_beef, "unique");
        assert_eq!(u32_at(header, ENT + 16), 16, "payload size");
        assert_eq!(
            (u64_at(payload, 0), u32_at(payload, 8), u32_at(payload, 12)),
            (9, 1 << 7, 3)
        );
        Answer { header, payload }.error(libc::ENOENT);
        let (header, _) = unsafe { slot.parts() };
        assert_eq!(u32_at(header, 4) as i32, -libc::ENOENT);
        assert_eq!(u32_at(header, ENT + 16), 0);
    }

    #[test]
    fn directory_entries_are_padded_to_8_bytes_and_stop_when_full() {
        let mut buf = [0u8; 64];
        let mut dir = DirWriter {
            buf: &mut buf,
            len: 0,
            plus: false,
        };
        let item = |name: &str, next| DirItem {
            next_offset: next,
            ino: 5,
            name: name.into(),
            attr: attr(EntryKind::File),
        };
        assert!(dir.add(&item("abc", 1)), "24 + 3 -> 32 bytes");
        assert!(dir.add(&item("abcdefgh", 2)), "24 + 8 -> 32 bytes");
        assert!(!dir.add(&item("x", 3)), "a third does not fit in 64");
        assert_eq!(dir.len, 64);
        assert_eq!(u64_at(&buf, 8), 1, "offset of the next entry");
        assert_eq!(u32_at(&buf, 16), 3, "name length");
        assert_eq!(u32_at(&buf, 20), u32::from(libc::DT_REG));
        assert_eq!(&buf[24..27], b"abc");
        assert_eq!(&buf[27..32], &[0; 5], "padding");
        assert_eq!(&buf[32 + 24..64], b"abcdefgh");

        let mut big = [0u8; 512];
        let mut plus = DirWriter {
            buf: &mut big,
            len: 0,
            plus: true,
        };
        assert!(plus.add(&item("abc", 1)));
        assert_eq!(plus.len, 128 + 32);
        assert_eq!(u64_at(&big, 0), 42, "entry_out nodeid is the attr's inode");
        assert_eq!(u64_at(&big, 16), 30, "entry ttl");
        assert_eq!(u64_at(&big, 128), 5, "dirent inode");
    }
}
