//! Answering the request in a slot: [`Server::serve`] decodes it, calls
//! [`GranaryFs`], and answers at once on the ring thread when it can (a hot open or getattr,
//! release, readdir, and whatever is ready at its first poll); otherwise it lends the slot to a
//! tokio task that answers and commits it itself. Every READ runs on the runtime.
//!
//! `unsafe`: the slot's buffers are borrowed from the kernel's hand-over (see [`Slot`]).
#![allow(unsafe_code)]

use super::ring::Lent;
use super::wire::{Answer, DirWriter, ENT, OP_IN, Slot, op, put_u32, put_u64, u32_at, u64_at};
use crate::fs::{Backing, GranaryFs};
use crate::journal::Journal;
use crate::kernel::shared::{MAX_PAYLOAD, record, register_backing, wants_write};
use granary_core::metrics as m;
use granary_proto::CacheApi;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;
use tokio::runtime::Handle;

/// What a ring thread needs to answer requests.
pub(crate) struct Server<A> {
    pub(crate) fs: Arc<GranaryFs<A>>,
    pub(crate) rt: Handle,
    pub(crate) dev: Arc<OwnedFd>,
    /// A kept connection's journal, where backing ids are recorded.
    pub(crate) journal: Option<Arc<Journal>>,
}

impl<A> Clone for Server<A> {
    fn clone(&self) -> Self {
        Server {
            fs: self.fs.clone(),
            rt: self.rt.clone(),
            dev: self.dev.clone(),
            journal: self.journal.clone(),
        }
    }
}

/// Answered at once, or lent to a runtime task that answers later.
pub(crate) enum Served {
    Now,
    Later,
}

impl<A: CacheApi> Server<A> {
    fn register(&self) -> impl Fn(&std::fs::File) -> std::io::Result<Backing> + Send + 'static {
        let (dev, journal) = (self.dev.clone(), self.journal.clone());
        move |file| register_backing(&dev, file, journal.as_ref())
    }

    /// Answers with what `work` gives. With `inline` it is polled once here first: a fresh entry
    /// or a hot open is ready at once, and is answered on this thread with no hand-off.
    /// Otherwise the slot is lent and `work` finishes on the runtime, which answers and commits
    /// (the runtime polls it again at once, so the wakers it registers are the runtime's, not
    /// the no-op one used here).
    fn answer_with<T: Send + 'static>(
        &self,
        slot: &Slot,
        inline: bool,
        lend: impl FnOnce() -> Lent,
        work: impl Future<Output = T> + Send + 'static,
        answer: impl FnOnce(&mut Answer, T) + Send + 'static,
    ) -> Served {
        let mut work = Box::pin(work);
        let first = match inline {
            true => work.as_mut().poll(&mut Context::from_waker(Waker::noop())),
            false => Poll::Pending,
        };
        match first {
            Poll::Ready(out) => {
                // SAFETY: the ring thread owns the slot, and `serve` holds no part of it now.
                let (header, payload) = unsafe { slot.parts() };
                answer(&mut Answer { header, payload }, out);
                Served::Now
            }
            Poll::Pending => {
                let lent = lend();
                self.rt.spawn(async move {
                    let out = work.await;
                    lent.answer(|a| answer(a, out));
                });
                Served::Later
            }
        }
    }

    /// Answers the request in `slot`, or lends the slot to a runtime task that will.
    pub(crate) fn serve(&self, slot: &Slot, lend: impl FnOnce() -> Lent) -> Served {
        // SAFETY: the kernel just handed this slot to the ring thread, which calls us.
        let (header, payload) = unsafe { slot.parts() };
        // Everything needed from the request is copied out before an answer overwrites it.
        let opcode = u32_at(header, 4);
        let ino = u64_at(header, 16);
        let mut op_in = [0u8; OP_IN];
        op_in.copy_from_slice(&header[OP_IN..2 * OP_IN]);
        let fs = &self.fs;
        match opcode {
            op::LOOKUP => {
                let len = (u32_at(header, ENT + 16) as usize).min(payload.len());
                let name = payload[..len].split(|&b| b == 0).next().unwrap_or_default();
                let name = String::from_utf8_lossy(name).into_owned();
                let (fs, start) = (fs.clone(), Instant::now());
                self.answer_with(
                    slot,
                    true,
                    lend,
                    async move { fs.lookup(ino, &name).await },
                    move |a, result| a.outcome("lookup", start, result, |a, attr| a.entry(&attr)),
                )
            }
            op::GETATTR => {
                if let Some(attr) = fs.getattr_now(ino) {
                    record("getattr", Instant::now(), Ok(()));
                    Answer { header, payload }.attr(&attr);
                    return Served::Now;
                }
                let (fs, start) = (fs.clone(), Instant::now());
                self.answer_with(
                    slot,
                    true,
                    lend,
                    async move { fs.getattr(ino).await },
                    move |a, result| a.outcome("getattr", start, result, |a, attr| a.attr(&attr)),
                )
            }
            op::OPEN => {
                let start = Instant::now();
                let flags = u32_at(&op_in, 0) as i32;
                let write = wants_write(flags);
                // fuse_in_header: the opener's pid after len, opcode, unique, nodeid, uid, gid.
                let pid = u32_at(header, 32);
                if let Some(result) = fs.open_now(ino, write, pid, self.register()) {
                    Answer { header, payload }.opened(start, result);
                    return Served::Now;
                }
                let (fs, register) = (fs.clone(), self.register());
                let open = async move { fs.open_passthrough(ino, write, pid, register).await };
                self.answer_with(slot, true, lend, open, move |a, result| {
                    a.opened(start, result)
                })
            }
            op::READ => {
                let fh = u64_at(&op_in, 0);
                let offset = u64_at(&op_in, 8);
                let size = u32_at(&op_in, 16).min(MAX_PAYLOAD as u32);
                let (fs, start) = (fs.clone(), Instant::now());
                let read = async move { fs.read(fh, offset, size).await };
                // Never on the ring thread, which shares its CPU with the reader: copying a
                // large answer (into the slot, then the kernel's into the reader's pages) is
                // better done beside the reader than before it.
                self.answer_with(slot, false, lend, read, move |a, result| {
                    a.outcome("read", start, result, |a, data| {
                        metrics::counter!(m::FUSE_READ_BYTES).increment(data.len() as u64);
                        a.data(&data)
                    })
                })
            }
            op::RELEASE => {
                fs.release(u64_at(&op_in, 0));
                Answer { header, payload }.empty();
                Served::Now
            }
            op::OPENDIR => {
                let (fs, start) = (fs.clone(), Instant::now());
                self.answer_with(
                    slot,
                    true,
                    lend,
                    async move { fs.opendir(ino).await },
                    move |a, result| a.outcome("opendir", start, result, |a, fh| a.open(fh, 0, 0)),
                )
            }
            op::READDIR | op::READDIRPLUS => {
                let plus = opcode == op::READDIRPLUS;
                let fh = u64_at(&op_in, 0);
                let offset = u64_at(&op_in, 8);
                let size = (u32_at(&op_in, 16) as usize).min(payload.len());
                let start = Instant::now();
                let mut dir = DirWriter {
                    buf: &mut payload[..size],
                    len: 0,
                    plus,
                };
                let result = fs.readdir(ino, fh, offset, plus, |item| dir.add(item));
                let n = dir.len;
                let name = if plus { "readdirplus" } else { "readdir" };
                Answer { header, payload }.outcome(name, start, result, |a, ()| a.finish(0, n));
                Served::Now
            }
            op::RELEASEDIR => {
                fs.releasedir(u64_at(&op_in, 0));
                Answer { header, payload }.empty();
                Served::Now
            }
            op::STATFS => {
                let bsize = fs.block_size().get().min(1 << 20) as u32;
                let files = (fs.inode_count() as u64).max(1);
                // A read-only view: what it holds counts as used, and nothing is free.
                Answer { header, payload }.body(80, |b| {
                    b.fill(0);
                    put_u64(b, 0, 1 << 30);
                    put_u64(b, 24, files);
                    put_u32(b, 40, bsize);
                    put_u32(b, 44, 255);
                    put_u32(b, 48, bsize);
                });
                Served::Now
            }
            op::LISTXATTR => {
                let mut answer = Answer { header, payload };
                if u32_at(&op_in, 0) == 0 {
                    answer.body(8, |b| b.fill(0));
                } else {
                    answer.empty();
                }
                Served::Now
            }
            op::GETXATTR => {
                Answer { header, payload }.error(libc::ENODATA);
                Served::Now
            }
            op::DESTROY => {
                Answer { header, payload }.empty();
                Served::Now
            }
            // Nothing to flush on a read-only mount: ENOSYS stops the kernel from sending FLUSH
            // on every close(2).
            op::FLUSH => {
                Answer { header, payload }.error(libc::ENOSYS);
                Served::Now
            }
            // No ioctl is implemented: ENOTTY, what `isatty()` expects (as over /dev/fuse).
            op::IOCTL => {
                metrics::counter!(m::FUSE_UNSUPPORTED_IOCTLS).increment(1);
                Answer { header, payload }.error(libc::ENOTTY);
                Served::Now
            }
            // Writes, links, locks, ...: not on this read-only mount.
            _ => {
                Answer { header, payload }.error(libc::ENOSYS);
                Served::Now
            }
        }
    }
}
