//! The mount's journal: what the kernel holds of this server, kept where the server's death
//! does not lose it, so that the next server can take the connection over
//! ([`crate::kernel::handover`]).
//!
//! The kernel refers to what earlier answers gave it: node ids (with a lookup count each), open
//! file handles (each reading one object version), directory handles and passthrough backing
//! ids. A server records each of them here before its answer reaches the kernel, and each
//! release or forget after; the next server replays the records ([`Journal::replay`]) into the
//! same tables and serves on. Answers the kernel never got may be recorded (the server died
//! between the record and the answer; the kernel sends the request again): they cost a count
//! too high, never a node or handle missing.
//!
//! The records live in a file the keeper holds (a memfd, inherited by every server), appended
//! with one `pwrite` each and framed with a length and a CRC32C: a record torn by a kill ends
//! the replay there, and was never answered. When the log grows past four times what it held
//! at its last compaction (and 16 MiB), it is compacted: the live state is written after it and
//! the header's start offset (8 bytes, one write) moves to that snapshot; the old records'
//! memory is given back with a hole punched under them. Format version 1; a server reads every
//! version it knows, and a new record kind or field gets a new version.

use granary_proto::{ObjectRef, pb};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

const MAGIC: &[u8; 8] = b"GRJRNL01";
/// Records start after a one-page header: magic, then the start offset of the live log.
const FIRST: u64 = 4096;
const COMPACT_MIN: u64 = 16 << 20;

/// One change to what the kernel holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The kernel took `n` references to `ino`, the entry at `path`.
    Lookup {
        ino: u64,
        n: u64,
        dir: bool,
        path: String,
    },
    /// The kernel gave `n` references to `ino` back.
    Forget {
        ino: u64,
        n: u64,
    },
    /// File handle `fh` of `ino` reads `object`; through passthrough of backing id
    /// `backing` (and version `fingerprint`), or through this process.
    Open {
        fh: u64,
        ino: u64,
        path: String,
        object: ObjectRef,
        passthrough: Option<(u128, u32)>,
    },
    Release {
        fh: u64,
    },
    OpenDir {
        fh: u64,
        ino: u64,
    },
    ReleaseDir {
        fh: u64,
    },
    /// A backing file registered with the kernel under `id`.
    Backing {
        id: u32,
    },
    /// Backing id `id` unregistered.
    Unbacking {
        id: u32,
    },
}

/// An open file handle as replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRecord {
    pub ino: u64,
    pub path: String,
    pub object: ObjectRef,
    pub passthrough: Option<(u128, u32)>,
}

/// What the kernel holds, as the journal says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// ino -> (path, is a directory, references).
    pub inodes: HashMap<u64, (String, bool, u64)>,
    pub files: HashMap<u64, OpenRecord>,
    /// Directory handle -> its inode.
    pub dirs: HashMap<u64, u64>,
    /// Backing ids registered and not unregistered.
    pub backings: HashSet<u32>,
    /// Records read (0: a fresh journal).
    pub records: u64,
}

impl Rebuilt {
    fn apply(&mut self, r: Record) {
        self.records += 1;
        match r {
            Record::Lookup { ino, n, dir, path } => {
                let e = self.inodes.entry(ino).or_insert((path, dir, 0));
                e.2 += n;
            }
            Record::Forget { ino, n } => {
                if let Some(e) = self.inodes.get_mut(&ino) {
                    e.2 = e.2.saturating_sub(n);
                    if e.2 == 0 {
                        self.inodes.remove(&ino);
                    }
                }
            }
            Record::Open {
                fh,
                ino,
                path,
                object,
                passthrough,
            } => {
                self.files.insert(
                    fh,
                    OpenRecord {
                        ino,
                        path,
                        object,
                        passthrough,
                    },
                );
            }
            Record::Release { fh } => {
                self.files.remove(&fh);
            }
            Record::OpenDir { fh, ino } => {
                self.dirs.insert(fh, ino);
            }
            Record::ReleaseDir { fh } => {
                self.dirs.remove(&fh);
            }
            Record::Backing { id } => {
                self.backings.insert(id);
            }
            Record::Unbacking { id } => {
                self.backings.remove(&id);
            }
        }
    }

    /// The first handle number above every handle in use.
    pub fn next_fh(&self) -> u64 {
        let top = self.files.keys().chain(self.dirs.keys()).max();
        top.map_or(1, |fh| fh + 1)
    }

    /// The first inode number above every inode in use.
    pub fn next_ino(&self) -> u64 {
        self.inodes.keys().max().map_or(2, |ino| (ino + 1).max(2))
    }

    /// Records that rebuild this state.
    fn snapshot(&self) -> Vec<Record> {
        let mut out = Vec::new();
        out.extend(self.backings.iter().map(|&id| Record::Backing { id }));
        out.extend(
            self.inodes
                .iter()
                .map(|(&ino, (path, dir, n))| Record::Lookup {
                    ino,
                    n: *n,
                    dir: *dir,
                    path: path.clone(),
                }),
        );
        out.extend(self.files.iter().map(|(&fh, f)| Record::Open {
            fh,
            ino: f.ino,
            path: f.path.clone(),
            object: f.object.clone(),
            passthrough: f.passthrough,
        }));
        out.extend(
            self.dirs
                .iter()
                .map(|(&fh, &ino)| Record::OpenDir { fh, ino }),
        );
        out
    }
}

fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    b.extend_from_slice(&(v.len() as u32).to_le_bytes());
    b.extend_from_slice(v);
}

/// Reads fields back in order; `None` once short.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

impl Record {
    fn encode(&self, b: &mut Vec<u8>) {
        match self {
            Record::Lookup { ino, n, dir, path } => {
                b.push(1);
                put_u64(b, *ino);
                put_u64(b, *n);
                b.push(u8::from(*dir));
                put_bytes(b, path.as_bytes());
            }
            Record::Forget { ino, n } => {
                b.push(2);
                put_u64(b, *ino);
                put_u64(b, *n);
            }
            Record::Open {
                fh,
                ino,
                path,
                object,
                passthrough,
            } => {
                b.push(3);
                put_u64(b, *fh);
                put_u64(b, *ino);
                put_bytes(b, path.as_bytes());
                put_bytes(b, &pb::ObjectRef::from(object).encode_to_vec());
                match passthrough {
                    Some((fingerprint, id)) => {
                        b.push(1);
                        b.extend_from_slice(&fingerprint.to_le_bytes());
                        b.extend_from_slice(&id.to_le_bytes());
                    }
                    None => b.push(0),
                }
            }
            Record::Release { fh } => {
                b.push(4);
                put_u64(b, *fh);
            }
            Record::OpenDir { fh, ino } => {
                b.push(5);
                put_u64(b, *fh);
                put_u64(b, *ino);
            }
            Record::ReleaseDir { fh } => {
                b.push(6);
                put_u64(b, *fh);
            }
            Record::Backing { id } => {
                b.push(7);
                b.extend_from_slice(&id.to_le_bytes());
            }
            Record::Unbacking { id } => {
                b.push(8);
                b.extend_from_slice(&id.to_le_bytes());
            }
        }
    }

    fn decode(body: &[u8]) -> Option<Record> {
        let mut f = Fields(body);
        let r = match f.u8()? {
            1 => Record::Lookup {
                ino: f.u64()?,
                n: f.u64()?,
                dir: f.u8()? != 0,
                path: f.string()?,
            },
            2 => Record::Forget {
                ino: f.u64()?,
                n: f.u64()?,
            },
            3 => {
                let (fh, ino, path) = (f.u64()?, f.u64()?, f.string()?);
                let object = pb::ObjectRef::decode(f.bytes()?).ok()?.into();
                let passthrough = match f.u8()? {
                    0 => None,
                    _ => Some((u128::from_le_bytes(f.take(16)?.try_into().ok()?), f.u32()?)),
                };
                Record::Open {
                    fh,
                    ino,
                    path,
                    object,
                    passthrough,
                }
            }
            4 => Record::Release { fh: f.u64()? },
            5 => Record::OpenDir {
                fh: f.u64()?,
                ino: f.u64()?,
            },
            6 => Record::ReleaseDir { fh: f.u64()? },
            7 => Record::Backing { id: f.u32()? },
            8 => Record::Unbacking { id: f.u32()? },
            _ => return None,
        };
        f.0.is_empty().then_some(r)
    }

    /// The record framed: body length, CRC32C of the body, body.
    fn framed(&self) -> Vec<u8> {
        let mut b = vec![0u8; 8];
        self.encode(&mut b);
        let len = (b.len() - 8) as u32;
        let crc = crc32c::crc32c(&b[8..]);
        b[..4].copy_from_slice(&len.to_le_bytes());
        b[4..8].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Reads framed records from `bytes` until the end or a torn or damaged one.
fn read_records(bytes: &[u8], mut each: impl FnMut(Record)) -> usize {
    let mut at = 0;
    while bytes.len() >= at + 8 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let Some(body) = bytes.get(at + 8..at + 8 + len) else {
            break;
        };
        if len == 0 || crc32c::crc32c(body) != crc {
            break;
        }
        match Record::decode(body) {
            Some(r) => each(r),
            None => break,
        }
        at += 8 + len;
    }
    at
}

struct Log {
    file: File,
    /// Where the live log starts, and where the next record goes.
    start: u64,
    end: u64,
    /// The log's length after the last compaction.
    compacted: u64,
}

/// The journal file, shared by the keeper (which only holds it) and the server (which writes
/// it). Appends are serialized by a lock; a failed write is logged once and the journal stops
/// (the next server then finds less than it needs, and answers ESTALE for what is missing).
pub struct Journal {
    log: Mutex<Option<Log>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

/// A new, empty journal file in memory (a memfd), for the keeper to hold.
pub fn create_file() -> std::io::Result<File> {
    let fd = rustix::fs::memfd_create("granary-journal", rustix::fs::MemfdFlags::CLOEXEC)?;
    let file = File::from(fd);
    let mut header = vec![0u8; FIRST as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&FIRST.to_le_bytes());
    file.write_all_at(&header, 0)?;
    Ok(file)
}

impl Journal {
    /// Opens the journal in `file` and replays it: what the kernel holds of the last server.
    pub fn open(file: File) -> std::io::Result<(Journal, Rebuilt)> {
        let mut header = [0u8; 16];
        file.read_exact_at(&mut header, 0)?;
        if &header[..8] != MAGIC {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a Granary journal (or a format this version does not know)",
            ));
        }
        let start = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let size = file.metadata()?.len();
        if start < FIRST || start > size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("journal header names offset {start} of a {size}-byte file"),
            ));
        }
        let mut bytes = vec![0u8; (size - start) as usize];
        file.read_exact_at(&mut bytes, start)?;
        let mut rebuilt = Rebuilt::default();
        let used = read_records(&bytes, |r| rebuilt.apply(r));
        let end = start + used as u64;
        let log = Log {
            file,
            start,
            end,
            compacted: used as u64,
        };
        Ok((
            Journal {
                log: Mutex::new(Some(log)),
            },
            rebuilt,
        ))
    }

    /// Appends `record`; it is in the journal when this returns.
    pub fn record(&self, record: Record) {
        self.records(std::slice::from_ref(&record));
    }

    /// Appends `records` with one write.
    pub fn records(&self, records: &[Record]) {
        if records.is_empty() {
            return;
        }
        let mut bytes = Vec::new();
        for r in records {
            bytes.extend(r.framed());
        }
        let mut guard = self.log.lock().expect("journal lock");
        let Some(log) = guard.as_mut() else {
            return;
        };
        if let Err(e) = log.append(&bytes) {
            tracing::error!(error = %e, "the mount's journal cannot be written: a restarted server will not find what the kernel holds");
            *guard = None;
        }
    }
}

impl Log {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, self.end)?;
        self.end += bytes.len() as u64;
        let len = self.end - self.start;
        if len > COMPACT_MIN && len > 4 * self.compacted {
            self.compact()?;
        }
        metrics::gauge!(granary_core::metrics::FUSE_JOURNAL_BYTES)
            .set((self.end - self.start) as f64);
        Ok(())
    }

    /// Writes the live state after the log, then points the header at it and frees the rest.
    fn compact(&mut self) -> std::io::Result<()> {
        let mut bytes = vec![0u8; (self.end - self.start) as usize];
        self.file.read_exact_at(&mut bytes, self.start)?;
        let mut state = Rebuilt::default();
        read_records(&bytes, |r| state.apply(r));
        drop(bytes);
        let mut snapshot = Vec::new();
        for r in state.snapshot() {
            snapshot.extend(r.framed());
        }
        let at = self.end;
        self.file.write_all_at(&snapshot, at)?;
        // The switch: one 8-byte write within one page.
        self.file.write_all_at(&at.to_le_bytes(), 8)?;
        let old = (self.start, at - self.start);
        self.start = at;
        self.end = at + snapshot.len() as u64;
        self.compacted = snapshot.len() as u64;
        punch_hole(&self.file, old.0, old.1);
        tracing::debug!(bytes = self.compacted, "compacted the mount's journal");
        Ok(())
    }
}

/// Gives the memory under `[offset, offset + len)` back (the file keeps its size).
fn punch_hole(file: &File, offset: u64, len: u64) {
    let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
    if let Err(e) = rustix::fs::fallocate(file, flags, offset, len) {
        tracing::debug!(error = %e, fd = file.as_raw_fd(), "journal: no hole punched");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_core::ObjectId;

    fn object(key: &str) -> ObjectRef {
        ObjectRef {
            mount: 0,
            id: ObjectId {
                backend: "file:///src".into(),
                key: key.into(),
                size: 10,
                etag: Some("e".into()),
                version: None,
                mtime_ns: 5,
            },
        }
    }

    #[test]
    fn replay_rebuilds_what_the_kernel_holds() {
        let (j, fresh) = Journal::open(create_file().unwrap()).unwrap();
        assert_eq!(fresh.records, 0);
        j.record(Record::Lookup {
            ino: 2,
            n: 1,
            dir: true,
            path: "/d".into(),
        });
        j.records(&[
            Record::Lookup {
                ino: 3,
                n: 2,
                dir: false,
                path: "/d/f".into(),
            },
            Record::Forget { ino: 3, n: 1 },
            Record::Lookup {
                ino: 4,
                n: 1,
                dir: false,
                path: "/gone".into(),
            },
            Record::Forget { ino: 4, n: 1 },
        ]);
        j.record(Record::Open {
            fh: 7,
            ino: 3,
            path: "/d/f".into(),
            object: object("d/f"),
            passthrough: Some((99, 3)),
        });
        j.record(Record::Open {
            fh: 8,
            ino: 3,
            path: "/d/f".into(),
            object: object("d/f"),
            passthrough: None,
        });
        j.record(Record::Release { fh: 8 });
        j.record(Record::OpenDir { fh: 9, ino: 2 });
        j.record(Record::Backing { id: 3 });
        j.record(Record::Backing { id: 4 });
        j.record(Record::Unbacking { id: 4 });
        let file = j
            .log
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .file
            .try_clone()
            .unwrap();
        let (_, r) = Journal::open(file).unwrap();
        assert_eq!(r.inodes.len(), 2);
        assert_eq!(r.inodes[&2], ("/d".to_string(), true, 1));
        assert_eq!(r.inodes[&3], ("/d/f".to_string(), false, 1));
        assert_eq!(r.files.len(), 1);
        assert_eq!(r.files[&7].object, object("d/f"));
        assert_eq!(r.files[&7].passthrough, Some((99, 3)));
        assert_eq!(r.dirs, HashMap::from([(9, 2)]));
        assert_eq!(r.backings, HashSet::from([3]));
        assert_eq!((r.next_fh(), r.next_ino()), (10, 4));
    }

    #[test]
    fn a_torn_last_record_ends_the_replay_and_is_overwritten() {
        let file = create_file().unwrap();
        let (j, _) = Journal::open(file.try_clone().unwrap()).unwrap();
        j.record(Record::Lookup {
            ino: 2,
            n: 1,
            dir: false,
            path: "/a".into(),
        });
        let end = file.metadata().unwrap().len();
        // Half of a second record, as a kill during its write leaves it.
        let torn = Record::Lookup {
            ino: 3,
            n: 1,
            dir: false,
            path: "/b".into(),
        }
        .framed();
        file.write_all_at(&torn[..torn.len() / 2], end).unwrap();
        let (j, r) = Journal::open(file.try_clone().unwrap()).unwrap();
        assert_eq!(r.inodes.len(), 1, "the torn record is not replayed");
        j.record(Record::Forget { ino: 2, n: 1 });
        let (_, r) = Journal::open(file).unwrap();
        assert!(
            r.inodes.is_empty(),
            "the next record took the torn one's place"
        );
    }

    #[test]
    fn compaction_keeps_the_live_state_and_bounds_the_log() {
        let file = create_file().unwrap();
        let (j, _) = Journal::open(file.try_clone().unwrap()).unwrap();
        let path = "/x".repeat(100);
        // 200,000 lookups and forgets of short-lived inodes, around 10 that stay.
        for ino in 2..12 {
            j.record(Record::Lookup {
                ino,
                n: 1,
                dir: false,
                path: path.clone(),
            });
        }
        for ino in 100..100_100u64 {
            j.records(&[
                Record::Lookup {
                    ino,
                    n: 1,
                    dir: false,
                    path: path.clone(),
                },
                Record::Forget { ino, n: 1 },
            ]);
        }
        {
            let log = j.log.lock().unwrap();
            let log = log.as_ref().unwrap();
            assert!(log.start > FIRST, "compacted at least once");
            assert!(
                log.end - log.start < 2 * COMPACT_MIN,
                "{}",
                log.end - log.start
            );
        }
        drop(j);
        let (_, r) = Journal::open(file).unwrap();
        assert_eq!(r.inodes.len(), 10);
        assert!(r.inodes.keys().all(|ino| (2..12).contains(ino)));
    }

    #[test]
    fn a_file_that_is_no_journal_is_refused() {
        let fd = rustix::fs::memfd_create("x", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let file = File::from(fd);
        file.write_all_at(&[0u8; 64], 0).unwrap();
        let err = Journal::open(file).unwrap_err();
        assert!(err.to_string().contains("not a Granary journal"), "{err}");
    }
}
