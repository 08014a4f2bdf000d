//! The three readers of a survival window, each on its own thread: the large file read
//! sequentially in 1 MiB reads (start again at its end), the small files whole in a shuffled order
//! (a new order each pass), and random 4 KiB pages of a file mapped with `mmap` (mapped afresh
//! every [`PAGES_PER_MAP`] pages, so that dropping the page cache reaches them). Every byte is
//! compared with what the file holds; the first error or wrong byte stops the window.
//!
//! An operation is one read, one file or one page. Each reader counts what it completed before
//! the window's deadline and the longest gap between two of its completions, and keeps going
//! until told to stop (a kill near the deadline is still followed to the end). For the stall after
//! a kill, [`Readers::mark_kill`] notes the moment in every reader's slot; a reader then records
//! the end of the first operation it *began* after that moment.

use super::Source;
use crate::dataset::{self, Rng};
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const READ_BYTES: usize = 1 << 20;
const PAGE: usize = 4096;
/// Pages touched per mapping of the mapped file.
const PAGES_PER_MAP: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    LargeFile,
    SmallFiles,
    MappedPages,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::LargeFile, Kind::SmallFiles, Kind::MappedPages];

    pub fn describe(self) -> &'static str {
        match self {
            Kind::LargeFile => "large file, 1 MiB reads (MB/s)",
            Kind::SmallFiles => "small files, shuffled (files/s)",
            Kind::MappedPages => "mmap, random 4 KiB pages (pages/s)",
        }
    }
}

/// What one reader did in a window.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tally {
    pub kind: Kind,
    /// Operations and bytes completed before the deadline.
    pub ops: u64,
    pub bytes: u64,
    /// The longest time between two completed operations (or from the start to the first).
    pub longest_gap_seconds: f64,
}

impl Tally {
    /// MB/s for the large file, operations per second for the others.
    pub fn rate(&self, seconds: f64) -> f64 {
        match self.kind {
            Kind::LargeFile => self.bytes as f64 / 1e6 / seconds,
            Kind::SmallFiles | Kind::MappedPages => self.ops as f64 / seconds,
        }
    }
}

/// Since which kill a reader is watched, and when it was first served after it.
#[derive(Default)]
struct Slot {
    kill_at: Option<Instant>,
    served_at: Option<Instant>,
}

struct Shared {
    stop: AtomicBool,
    errors: Mutex<Vec<String>>,
    slots: [Mutex<Slot>; 3],
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct Readers {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Tally>>,
}

impl Readers {
    /// Starts the three readers on the mount at `mnt`; they count until `deadline`.
    pub fn start(source: &Arc<Source>, mnt: &Path, deadline: Instant, seed: u64) -> Readers {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
            slots: Default::default(),
        });
        let start = Instant::now();
        let threads = Kind::ALL
            .into_iter()
            .enumerate()
            .map(|(i, kind)| {
                let mut reader = Reader {
                    slot: i,
                    shared: shared.clone(),
                    source: source.clone(),
                    mnt: mnt.to_path_buf(),
                    deadline,
                    tally: Tally {
                        kind,
                        ops: 0,
                        bytes: 0,
                        longest_gap_seconds: 0.0,
                    },
                    last_done: start,
                };
                std::thread::spawn(move || {
                    let ended = match kind {
                        Kind::LargeFile => reader.large_file(),
                        Kind::SmallFiles => reader.small_files(seed),
                        Kind::MappedPages => reader.mapped_pages(seed),
                    };
                    if let Err(e) = ended {
                        lock(&reader.shared.errors).push(format!("{kind:?} reader: {e}"));
                        reader.shared.stop.store(true, Ordering::Relaxed);
                    }
                    reader.tally
                })
            })
            .collect();
        Readers { shared, threads }
    }

    /// Notes that the server is killed now: each reader's next operation begun from here on
    /// ends its stall.
    pub fn mark_kill(&self) -> Instant {
        let at = Instant::now();
        for slot in &self.shared.slots {
            *lock(slot) = Slot {
                kill_at: Some(at),
                served_at: None,
            };
        }
        at
    }

    /// When every reader was served after the last kill, once they all were.
    pub fn all_served(&self) -> Option<Instant> {
        let mut latest = None;
        for slot in &self.shared.slots {
            let served = lock(slot).served_at?;
            latest = latest.max(Some(served));
        }
        latest
    }

    /// Whether a reader has failed (and every reader stops).
    pub fn failed(&self) -> bool {
        !lock(&self.shared.errors).is_empty()
    }

    /// Stops the readers; their tallies, and the errors they saw.
    pub fn finish(self) -> (Vec<Tally>, Vec<String>) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        let tallies = self
            .threads
            .into_iter()
            .filter_map(|t| {
                t.join()
                    .inspect_err(|_| errors.push("a reader panicked".to_string()))
                    .ok()
            })
            .collect();
        errors.extend(lock(&self.shared.errors).drain(..));
        (tallies, errors)
    }
}

struct Reader {
    slot: usize,
    shared: Arc<Shared>,
    source: Arc<Source>,
    mnt: PathBuf,
    deadline: Instant,
    tally: Tally,
    last_done: Instant,
}

type Outcome = Result<(), String>;

impl Reader {
    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    /// Counts an operation of `bytes` begun at `began` that has just ended.
    fn done(&mut self, began: Instant, bytes: u64) {
        let now = Instant::now();
        let gap = now.duration_since(self.last_done).as_secs_f64();
        self.tally.longest_gap_seconds = self.tally.longest_gap_seconds.max(gap);
        self.last_done = now;
        if now <= self.deadline {
            self.tally.ops += 1;
            self.tally.bytes += bytes;
        }
        let mut slot = lock(&self.shared.slots[self.slot]);
        if slot.served_at.is_none() && slot.kill_at.is_some_and(|k| began >= k) {
            slot.served_at = Some(now);
        }
    }

    fn large_file(&mut self) -> Outcome {
        let spec = self.source.large.clone();
        let path = self.mnt.join(&spec.name);
        let mut got = vec![0u8; READ_BYTES];
        let mut want = vec![0u8; READ_BYTES];
        while !self.stopped() {
            let mut file = std::fs::File::open(&path).map_err(|e| format!("open: {e}"))?;
            let mut offset = 0u64;
            while offset < spec.size && !self.stopped() {
                let n = (spec.size - offset).min(READ_BYTES as u64) as usize;
                let began = Instant::now();
                read_full(&mut file, &mut got[..n])
                    .map_err(|e| format!("read at {offset}: {e}"))?;
                dataset::expected(&spec, offset, &mut want[..n]);
                if got[..n] != want[..n] {
                    return Err(format!("wrong bytes in the 1 MiB read at {offset}"));
                }
                self.done(began, n as u64);
                offset += n as u64;
            }
        }
        Ok(())
    }

    fn small_files(&mut self, seed: u64) -> Outcome {
        let source = self.source.clone();
        let mut rng = Rng::seeded(seed);
        let mut order: Vec<usize> = (0..source.small.len()).collect();
        while !self.stopped() {
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            for &i in &order {
                if self.stopped() {
                    break;
                }
                let (spec, want) = &source.small[i];
                let began = Instant::now();
                let got = std::fs::read(self.mnt.join(&spec.name))
                    .map_err(|e| format!("{}: {e}", spec.name))?;
                if got != *want {
                    return Err(format!("{}: wrong bytes", spec.name));
                }
                self.done(began, got.len() as u64);
            }
        }
        Ok(())
    }

    fn mapped_pages(&mut self, seed: u64) -> Outcome {
        let source = self.source.clone();
        let (spec, want) = &source.mapped;
        let path = self.mnt.join(&spec.name);
        let pages = want.len() / PAGE;
        let mut rng = Rng::seeded(seed.rotate_left(17));
        while !self.stopped() {
            let file = std::fs::File::open(&path).map_err(|e| format!("open: {e}"))?;
            // SAFETY: the file is read-only in the mount and in its source, which nothing
            // writes while the benchmark runs, so the mapping's bytes cannot change under us.
            #[allow(unsafe_code)]
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("mmap: {e}"))?;
            if map.len() != want.len() {
                return Err(format!("mapped {} bytes of {}", map.len(), want.len()));
            }
            for _ in 0..PAGES_PER_MAP {
                if self.stopped() {
                    break;
                }
                let at = (rng.next_u64() % pages as u64) as usize * PAGE;
                let began = Instant::now();
                if map[at..at + PAGE] != want[at..at + PAGE] {
                    return Err(format!("wrong bytes in the page at {at}"));
                }
                self.done(began, PAGE as u64);
            }
        }
        Ok(())
    }
}

/// Fills `buf` from `file`, failing on an early end.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("end of file after {filled} of {} bytes", buf.len()),
                ));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How long after `since` the readers were all served; `None` if they were not within `limit`
/// (or a reader failed).
pub fn wait_served(readers: &Readers, since: Instant, limit: Duration) -> Option<Duration> {
    let deadline = since + limit;
    loop {
        if let Some(at) = readers.all_served() {
            return Some(at.duration_since(since));
        }
        if readers.failed() || Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
