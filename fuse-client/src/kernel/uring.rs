//! FUSE over io_uring (Linux 6.14+, `CONFIG_FUSE_IO_URING`, module parameter
//! `fuse.enable_uring`).
//!
//! Over `/dev/fuse`, a request made on one CPU wakes a server thread wherever it last ran, and
//! its answer wakes the caller back: two cross-CPU wakeups per request. On a VM whose idle
//! CPUs halt, each is a VM exit. A hot open of a pinned file is nothing but that round trip,
//! and it cost 3x a native open + read of a 128 KiB file.
//!
//! Here the kernel keeps one queue per CPU and hands a request to the queue of the CPU that
//! made it. Each queue is an io_uring served by one thread pinned to that CPU, so the request
//! and its answer switch tasks on one core. The kernel writes each request into a registered
//! slot (a header and a payload buffer); we write the answer into the same slot and commit it
//! with `COMMIT_AND_FETCH`, which also re-arms the slot for the next request.
//!
//! Requests answerable at once (a hot open or getattr, release, readdir, and whatever is ready
//! at its first poll) are answered on the ring thread. The rest, and every READ, run on the
//! tokio runtime, which writes the answer into the slot and submits the commit itself (the ring
//! has several submitters; its SQ is pushed under a lock), so the kernel copies a large answer
//! on that thread's CPU rather than the reader's. A slot whose task ends without answering
//! (panic, runtime shutdown) answers EIO, so no reader waits forever.
//!
//! Off by default (`FsConfig::io_uring`, `--io-uring`): every byte read through the daemon is
//! copied once more than over `/dev/fuse` (docs/ARCHITECTURE.md, "The kernel interface").
//!
//! FORGET and INTERRUPT still come through `/dev/fuse` (fuser's threads), and so does INIT,
//! which negotiates this transport (`FUSE_OVER_IO_URING`): the rings start only after it.
//!
//! This file sets the rings up and runs them ([`start`]: one thread and one `Queue` per CPU);
//! `wire` holds the slots and the kernel's structs, `ring` the io_uring and its SQEs,
//! `serve` the answers to each request. Dependencies point one way: this file -> `serve` ->
//! `ring` -> `wire`.
//!
//! The one module (with those three) with `unsafe`: the kernel reads and writes the slots'
//! buffers behind the compiler's back, and the SQEs carry raw pointers to them.
#![allow(unsafe_code)]

pub(crate) mod ring;
pub(crate) mod serve;
pub(crate) mod wire;

use super::shared::MAX_PAYLOAD;
use crate::fs::GranaryFs;
use granary_core::metrics as m;
use granary_proto::CacheApi;
use ring::{Home, Lent, Ring, WAKE, register_sqe};
use serve::{Served, Server};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::thread::JoinHandle;
use tokio::runtime::Handle;
use wire::{Answer, HEADER, Slot};

/// Slots across all queues (each with a [`MAX_PAYLOAD`] buffer, touched only when used),
/// spread over the CPUs, 2 to 16 per queue.
const TOTAL_SLOTS: usize = 32;

/// A running set of rings; [`Rings::stop`] ends them once the mount is gone.
pub struct Rings {
    queues: Vec<(JoinHandle<()>, Arc<OwnedFd>)>,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rings")
            .field("queues", &self.queues.len())
            .finish()
    }
}

impl Rings {
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// Ends every ring thread. Call after the unmount: requests still queued would find no
    /// ring to take them.
    pub fn stop(self) {
        metrics::gauge!(m::FUSE_IO_URING_QUEUES).set(0.0);
        self.stop.store(true, Ordering::Relaxed);
        for (thread, wake) in self.queues {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to an eventfd we own.
            unsafe { libc::write(wake.as_raw_fd(), one.as_ptr().cast(), 8) };
            let _ = thread.join();
        }
    }
}

/// The kernel's queue count: one per possible CPU.
fn possible_cpus() -> usize {
    let parsed = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        });
    match parsed {
        Some(max) => max + 1,
        // SAFETY: sysconf has no preconditions.
        None => unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize,
    }
}

/// Pins the calling thread to `cpu`; a CPU outside our cpuset stays unpinned (its queue only
/// gets requests from tasks that run there).
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid, and CPU_SET stays within it for cpu < CPU_SETSIZE.
    unsafe {
        if cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(cpu, "FUSE ring thread not pinned to its CPU");
        }
    }
}

/// Puts the calling thread in `SCHED_BATCH`: the same CPU share as any other thread, but its
/// wake-up does not preempt the task running on its CPU. A request that its task waits for
/// (an open, a read) blocks that task, so the ring thread runs at once; a RELEASE, which no one
/// waits for, now waits for the opener's next request instead of switching away from the opener
/// and back: one task switch per open of a hot file instead of two (measured over a local source,
/// 2,000 pinned 128 KiB files read whole: 44-54 µs a file instead of 50-63, with no cost to
/// four readers or to one reader beside two busy loops). Threads it starts (tokio's blocking
/// threads, when a request spawns blocking work) get the ordinary policy.
fn batch_policy() {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = libc::SCHED_BATCH | libc::SCHED_RESET_ON_FORK;
    // SAFETY: `param` is a live local; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "FUSE ring thread left in its scheduling policy");
    }
}

/// One CPU's queue as its thread sees it: the ring, the slots, what is in flight.
struct Queue<A> {
    ring: Arc<Ring>,
    slots: Vec<Arc<Slot>>,
    /// Each slot's two buffers, as REGISTER names them (the Vec never grows: stable addresses).
    iovs: Vec<[libc::iovec; 2]>,
    live: usize,
    /// Completions seen while registering, handled first by `run`.
    backlog: Vec<(u64, i32)>,
    wake: Arc<OwnedFd>,
    server: Server<A>,
}

impl<A: CacheApi> Queue<A> {
    fn new(qid: u16, depth: usize, server: Server<A>, wake: Arc<OwnedFd>) -> std::io::Result<Self> {
        let ring = Arc::new(Ring::new(server.dev.clone(), qid, depth)?);
        let slots: Vec<_> = (0..depth).map(|_| Slot::new(MAX_PAYLOAD)).collect();
        let iovs = slots
            .iter()
            .map(|s| {
                [
                    libc::iovec {
                        iov_base: s.header.get().cast(),
                        iov_len: HEADER,
                    },
                    libc::iovec {
                        // SAFETY: reads the buffer's address; nobody else holds the slot yet.
                        iov_base: unsafe { (*s.payload.get()).as_mut_ptr().cast() },
                        iov_len: MAX_PAYLOAD,
                    },
                ]
            })
            .collect();
        Ok(Queue {
            ring,
            slots,
            iovs,
            live: depth,
            backlog: Vec::new(),
            wake,
            server,
        })
    }

    fn register_slot(&self, index: usize) {
        let sqe = register_sqe(&self.ring.dev, self.ring.qid, index, &self.iovs[index]);
        self.ring.push(&sqe, false);
    }

    /// Registers every slot; the kernel starts using the rings once all queues have one.
    fn register(&mut self) -> std::io::Result<()> {
        for i in 0..self.slots.len() {
            self.register_slot(i);
        }
        self.ring.arm_wake(&self.wake);
        self.ring.uring.submit()?;
        // A refused registration completes at once; the others stay pending until a request.
        // SAFETY: only this thread reads completions.
        let completions = unsafe { self.ring.uring.completion_shared() };
        self.backlog
            .extend(completions.map(|c| (c.user_data(), c.result())));
        if let Some(&(slot, e)) = self.backlog.iter().find(|&&(u, r)| u != WAKE && r < 0) {
            let err = std::io::Error::from_raw_os_error(-e);
            return Err(std::io::Error::new(
                err.kind(),
                format!(
                    "registering FUSE ring slot {slot} of queue {}: {err}",
                    self.ring.qid
                ),
            ));
        }
        Ok(())
    }

    fn run(&mut self, stop: &AtomicBool) {
        let mut done = std::mem::take(&mut self.backlog);
        loop {
            for &(user_data, result) in &done {
                self.complete(user_data, result);
            }
            if self.live == 0 || stop.load(Ordering::Relaxed) {
                return;
            }
            if let Err(e) = self.ring.uring.submit_and_wait(1)
                && e.raw_os_error() != Some(libc::EINTR)
            {
                tracing::error!(qid = self.ring.qid, error = %e, "FUSE ring failed");
                return;
            }
            done.clear();
            // SAFETY: only this thread reads completions.
            let completions = unsafe { self.ring.uring.completion_shared() };
            done.extend(completions.map(|c| (c.user_data(), c.result())));
        }
    }

    /// One completion: a request in a slot, a slot lost, or the stop wake-up.
    fn complete(&mut self, user_data: u64, result: i32) {
        if user_data == WAKE {
            if result >= 0 {
                self.ring.arm_wake(&self.wake);
            }
            return;
        }
        let index = user_data as usize;
        match result {
            0 => self.serve(index),
            e if e == -libc::EAGAIN || e == -libc::EINTR => self.register_slot(index),
            e => {
                // ENOTCONN: the mount is gone (unmounted or aborted).
                if e != -libc::ENOTCONN && e != -libc::ECANCELED {
                    let err = std::io::Error::from_raw_os_error(-e);
                    tracing::error!(qid = self.ring.qid, slot = index, error = %err, "FUSE ring slot lost");
                }
                self.live -= 1;
            }
        }
    }

    fn serve(&mut self, index: usize) {
        let slot = self.slots[index].clone();
        let lent = std::cell::Cell::new(false);
        let lend = || {
            lent.set(true);
            Lent {
                slot: slot.clone(),
                home: Home::Ring {
                    ring: self.ring.clone(),
                    index,
                },
                answered: false,
            }
        };
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.server.serve(&slot, lend)
        }));
        match served {
            Ok(Served::Now) => self.ring.commit(index, &slot, false),
            Ok(Served::Later) => {}
            // A lent slot is answered by its `Lent`, even when dropped by the panic.
            Err(_) if lent.get() => {}
            Err(_) => {
                // SAFETY: the handler panicked before lending the slot: this thread owns it.
                let (header, payload) = unsafe { slot.parts() };
                Answer { header, payload }.error(libc::EIO);
                self.ring.commit(index, &slot, false);
            }
        }
    }
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; a non-negative result is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Starts one ring per possible CPU on the FUSE connection `dev` (after FUSE_INIT agreed on
/// `FUSE_OVER_IO_URING`). Returns once every queue registered its slots, so the kernel sends
/// requests through the rings from then on; on an error the rings started are stopped and the
/// connection stays on `/dev/fuse`.
pub fn start<A: CacheApi>(
    dev: Arc<OwnedFd>,
    fs: Arc<GranaryFs<A>>,
    rt: Handle,
) -> std::io::Result<Rings> {
    let n = possible_cpus();
    let depth = (TOTAL_SLOTS / n).clamp(2, 16);
    let server = Server {
        fs,
        rt,
        dev,
        journal: None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut rings = Rings {
        queues: Vec::with_capacity(n),
        stop: stop.clone(),
    };
    let (ready_tx, ready_rx) = channel::<std::io::Result<()>>();
    for qid in 0..n {
        let (server, stop, ready) = (server.clone(), stop.clone(), ready_tx.clone());
        let spawned = eventfd().map(Arc::new).and_then(|wake| {
            let thread_wake = wake.clone();
            std::thread::Builder::new()
                .name(format!("fuse-ring-{qid}"))
                .spawn(move || {
                    pin_to(qid);
                    batch_policy();
                    // Requests are first polled on this thread (`answer_with`): they may use
                    // the runtime's timers and spawn tasks.
                    let runtime = server.rt.clone();
                    let _entered = runtime.enter();
                    let queue = Queue::new(qid as u16, depth, server, thread_wake)
                        .and_then(|mut q| q.register().map(|()| q));
                    let mut queue = match queue {
                        Ok(q) => {
                            let _ = ready.send(Ok(()));
                            q
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    drop(ready);
                    queue.run(&stop);
                })
                .map(|thread| (thread, wake))
        });
        match spawned {
            Ok(queue) => rings.queues.push(queue),
            Err(e) => {
                rings.stop();
                return Err(e);
            }
        }
    }
    drop(ready_tx);
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                rings.stop();
                return Err(e);
            }
            Err(_) => {
                rings.stop();
                return Err(std::io::Error::other(
                    "a FUSE ring thread ended during setup",
                ));
            }
        }
    }
    tracing::info!(
        queues = n,
        slots_per_queue = depth,
        "FUSE requests go through io_uring"
    );
    metrics::gauge!(m::FUSE_IO_URING_QUEUES).set(n as f64);
    Ok(rings)
}
