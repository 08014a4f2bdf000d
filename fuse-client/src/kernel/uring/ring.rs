//! A queue's io_uring ([`Ring`]) and the SQEs it carries: `REGISTER` lends the kernel a slot,
//! `COMMIT_AND_FETCH` hands an answer back and re-arms the slot. Whoever answers a request
//! commits it: the ring thread, or the runtime task a slot was lent to ([`Lent`]).
//!
//! `unsafe`: the SQEs carry raw pointers to the slots' buffers, and the ring is shared by
//! several submitters.
#![allow(unsafe_code)]

use super::wire::{Answer, ENT, Slot, u64_at};
use io_uring::{IoUring, opcode, squeue::Entry128, types};
use std::cell::UnsafeCell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `user_data` of the eventfd read that wakes a ring thread to stop.
pub(crate) const WAKE: u64 = u64::MAX;

/// Where a lent slot's answer goes: committed to its ring, or written to `/dev/fuse`.
pub(crate) enum Home {
    Ring { ring: Arc<Ring>, index: usize },
    Dev(Arc<OwnedFd>),
}

/// A slot lent to a runtime task, which answers and commits it itself. Answers EIO if dropped
/// unanswered (a panic, or the runtime shutting down), so the kernel's request always ends.
pub(crate) struct Lent {
    pub(crate) slot: Arc<Slot>,
    pub(crate) home: Home,
    pub(crate) answered: bool,
}

impl Lent {
    pub(crate) fn answer(mut self, f: impl FnOnce(&mut Answer)) {
        self.give_back(f);
    }

    fn give_back(&mut self, f: impl FnOnce(&mut Answer)) {
        // SAFETY: the ring thread lent this slot to us alone; the commit hands it to the kernel.
        let (header, payload) = unsafe { self.slot.parts() };
        f(&mut Answer { header, payload });
        self.answered = true;
        match &self.home {
            Home::Ring { ring, index } => ring.commit(*index, &self.slot, true),
            Home::Dev(dev) => crate::kernel::devfuse::write_slot(dev, &self.slot),
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if !self.answered {
            self.give_back(|a| a.error(libc::EIO));
        }
    }
}

/// The 80-byte command of a FUSE ring SQE (`struct fuse_uring_cmd_req`).
fn ring_cmd(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

/// `REGISTER`: lends the kernel a slot's two buffers (`iov`) and waits for a request.
pub(crate) fn register_sqe(
    dev: &OwnedFd,
    qid: u16,
    index: usize,
    iov: &[libc::iovec; 2],
) -> Entry128 {
    let sqe = opcode::UringCmd80::new(types::Fd(dev.as_raw_fd()), CMD_REGISTER)
        .cmd(ring_cmd(0, qid))
        .addr(Some(iov.as_ptr() as u64))
        .build()
        .user_data(index as u64);
    // The crate has no setter for the SQE's `len` (offset 24), which must be the iovec count.
    // SAFETY: Entry128 is a repr(C) 128-byte SQE; any byte pattern of it is a valid value.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], Entry128>(raw) }
}

fn commit_sqe(dev: &OwnedFd, qid: u16, index: usize, commit_id: u64) -> Entry128 {
    opcode::UringCmd80::new(types::Fd(dev.as_raw_fd()), CMD_COMMIT_AND_FETCH)
        .cmd(ring_cmd(commit_id, qid))
        .build()
        .user_data(index as u64)
}

/// A queue's io_uring, shared by its thread (which waits for requests and answers the quick
/// ones) and the runtime tasks that answer the others. Whoever answers submits the commit, so
/// the kernel copies a large answer into the reader's pages on that thread's CPU, and no slot
/// is handed back to the ring thread first.
pub(crate) struct Ring {
    pub(crate) uring: IoUring<Entry128>,
    /// Held while pushing SQEs (the ring thread and answering tasks push; only the ring thread
    /// reads completions).
    sq: Mutex<()>,
    pub(crate) dev: Arc<OwnedFd>,
    pub(crate) qid: u16,
    /// Where the wake-up read of `Rings::stop` lands: lives as long as the ring.
    wake_buf: UnsafeCell<[u8; 8]>,
}

// SAFETY: `wake_buf` is written only by the kernel (the one wake-up read in flight).
unsafe impl Sync for Ring {}

impl Ring {
    pub(crate) fn new(dev: Arc<OwnedFd>, qid: u16, depth: usize) -> std::io::Result<Ring> {
        // Room for a commit or registration per slot plus the wake-up read; twice that for
        // completions.
        let uring = IoUring::<Entry128>::builder().build((depth as u32 + 1).next_power_of_two())?;
        Ok(Ring {
            uring,
            sq: Mutex::new(()),
            dev,
            qid,
            wake_buf: UnsafeCell::new([0; 8]),
        })
    }

    /// Queues an SQE; with `submit` the kernel takes it now, on this thread, else at the ring
    /// thread's next wait.
    pub(crate) fn push(&self, sqe: &Entry128, submit: bool) {
        let _guard = self.sq.lock().expect("sq lock");
        // SAFETY: SQEs are pushed only under `sq`. Each points at buffers that outlive the ring
        // (slots held by `Arc`, iovecs kept by the ring thread until their REGISTER was
        // submitted, `wake_buf`), and each slot has at most one SQE in flight.
        let mut sq = unsafe { self.uring.submission_shared() };
        while unsafe { sq.push(sqe) }.is_err() {
            sq.sync();
            let _ = self.uring.submit();
            sq.sync();
        }
        drop(sq);
        if submit {
            let _ = self.uring.submit();
        }
    }

    /// Commits the answer written into `slot` and re-arms the slot for the next request.
    pub(crate) fn commit(&self, index: usize, slot: &Slot, submit: bool) {
        // SAFETY: the caller owns the slot; the kernel wrote the commit id with the request and
        // an answer leaves it in place.
        let commit_id = u64_at(unsafe { slot.parts() }.0, ENT + 8);
        self.push(&commit_sqe(&self.dev, self.qid, index, commit_id), submit);
    }

    pub(crate) fn arm_wake(&self, wake: &OwnedFd) {
        let read = opcode::Read::new(types::Fd(wake.as_raw_fd()), self.wake_buf.get().cast(), 8)
            .build()
            .user_data(WAKE);
        self.push(&read.into(), false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::uring::wire::{put_u64, u32_at};

    #[test]
    fn a_lent_slot_dropped_unanswered_answers_eio() {
        let slot = Slot::new(64);
        {
            let (header, _) = unsafe { slot.parts() };
            put_u64(header, 8, 77);
        }
        // A ring on /dev/null: the commit is submitted, and refused by the device.
        let dev = Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        let ring = Arc::new(Ring::new(dev, 0, 2).unwrap());
        let lent = Lent {
            slot: slot.clone(),
            home: Home::Ring {
                ring: ring.clone(),
                index: 3,
            },
            answered: false,
        };
        drop(lent);
        let (header, _) = unsafe { slot.parts() };
        assert_eq!(u32_at(header, 4) as i32, -libc::EIO);
        assert_eq!(u64_at(header, 8), 77, "unique kept");
        let done: Vec<_> = unsafe { ring.uring.completion_shared() }
            .map(|c| c.user_data())
            .collect();
        assert_eq!(done, [3], "the commit of slot 3 was submitted");
    }

    #[test]
    fn sqe_commands_carry_the_queue_commit_id_and_iovec_count() {
        let dev = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        let raw: [u8; 128] = unsafe { std::mem::transmute(register_sqe(&dev, 3, 5, &iov)) };
        assert_eq!(raw[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(u32_at(&raw, 8), CMD_REGISTER, "cmd_op");
        assert_eq!(u64_at(&raw, 16), iov.as_ptr() as u64, "addr");
        assert_eq!(u32_at(&raw, 24), 2, "len: two iovecs");
        assert_eq!(u64_at(&raw, 32), 5, "user_data");
        assert_eq!(u16::from_ne_bytes([raw[64], raw[65]]), 3, "qid");
        let raw: [u8; 128] = unsafe { std::mem::transmute(commit_sqe(&dev, 1, 2, 99)) };
        assert_eq!(u32_at(&raw, 8), CMD_COMMIT_AND_FETCH);
        assert_eq!(u64_at(&raw, 56), 99, "commit_id");
    }
}
