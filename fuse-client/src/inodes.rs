//! The inode table: stable inode numbers for the paths the kernel has looked up.
//!
//! The kernel refers to files by inode number; it takes a reference for every entry we return
//! from lookup or readdirplus and gives them back with forget. An inode lives while the kernel
//! holds references to it (the root always lives). Each inode remembers the last entry seen
//! for its path, which answers getattr and is refreshed once no longer trusted ([`Seen`]), and,
//! for a pinned file, the local copy the worker named for that version.

use granary_proto::{Entry, EntryKind};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

pub const ROOT: u64 = 1;

/// A verified whole copy of one version of a pinned file on this machine, as the worker named
/// it, and which file it was when first opened: the next open of the same version opens it
/// again without asking the worker, and only if it is still that file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCopy {
    /// The object version's fingerprint.
    pub fingerprint: u128,
    pub path: PathBuf,
    pub file: FileIdentity,
}

/// Which file a path led to: device, inode number and change time (a file replaced at the same
/// path, or changed in place, differs in one of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }
}

/// When an inode's entry was last had from the worker, and the pins epoch the client knew before
/// asking ([`granary_proto::CacheApi::pins_epoch`]); the trust rules that follow from it are
/// [`granary_core::trust`]'s.
pub use granary_core::trust::Seen;

/// An entry had now, asked for when the pins epoch known was `epoch`.
pub fn seen_now(epoch: Option<u64>) -> Seen {
    Seen {
        at: Instant::now(),
        epoch,
    }
}

/// An entry the kernel may hold: the inode, and the directory inode and name it was looked up
/// by (`None` for the parent once it is gone from the table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    pub ino: u64,
    pub parent: Option<u64>,
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct Inode {
    pub path: String,
    pub entry: Entry,
    pub seen: Seen,
    /// The local copy last used for this inode's (pinned) version, if any.
    pub local: Option<LocalCopy>,
    /// The pins epoch under which the kernel was last told to keep this entry for the pinned
    /// TTL: it must be told to drop it when that epoch ends, whatever was had since.
    kept_in: Option<u64>,
    lookups: u64,
    /// When the kernel last had this entry from us (a lookup, readdirplus or getattr), and
    /// when it was last asked to drop it ([`InodeTable::least_used`]).
    used: Instant,
    shed: Option<Instant>,
}

impl Inode {
    /// Takes a newer entry; a local copy remembered for another version is forgotten.
    fn update(&mut self, entry: Entry, seen: Seen) {
        if entry.object != self.entry.object {
            self.local = None;
        }
        self.entry = entry;
        self.used = seen.at;
        self.seen = seen;
    }
}

#[derive(Debug)]
pub struct InodeTable {
    by_ino: HashMap<u64, Inode>,
    by_path: HashMap<String, u64>,
    next: u64,
}

/// The namespace path of `name` inside the directory at `parent`.
pub fn child_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

impl InodeTable {
    pub fn new(root: Entry, now: Instant) -> Self {
        let mut by_ino = HashMap::new();
        by_ino.insert(
            ROOT,
            Inode {
                path: "/".into(),
                entry: root,
                seen: Seen {
                    at: now,
                    epoch: None,
                },
                local: None,
                kept_in: None,
                lookups: 1,
                used: now,
                shed: None,
            },
        );
        let mut by_path = HashMap::new();
        by_path.insert("/".to_string(), ROOT);
        InodeTable {
            by_ino,
            by_path,
            next: ROOT + 1,
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.by_ino.get(&ino)
    }

    pub fn ino_of(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// Records `entry` at `path`, taking `refs` kernel references; returns its inode number.
    pub fn upsert(&mut self, path: &str, entry: Entry, refs: u64, seen: Seen) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            let inode = self.by_ino.get_mut(&ino).expect("inode tables agree");
            inode.update(entry, seen);
            inode.lookups += refs;
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(
            ino,
            Inode {
                path: path.to_string(),
                entry,
                used: seen.at,
                seen,
                local: None,
                kept_in: None,
                lookups: refs,
                shed: None,
            },
        );
        self.by_path.insert(path.to_string(), ino);
        ino
    }

    /// Notes that the kernel had `ino`'s attributes from us now.
    pub fn touch(&mut self, ino: u64, now: Instant) {
        if let Some(inode) = self.by_ino.get_mut(&ino) {
            inode.used = now;
        }
    }

    /// Up to `n` entries to ask the kernel to drop, least recently used first: files before
    /// directories, none in `busy` (open), none asked for in the last `again` (the kernel keeps
    /// an entry in use however often it is asked). Marks them asked.
    pub fn least_used(
        &mut self,
        n: usize,
        busy: impl Fn(u64) -> bool,
        now: Instant,
        again: std::time::Duration,
    ) -> Vec<KernelEntry> {
        let mut candidates: Vec<(bool, Instant, u64)> = self
            .by_ino
            .iter()
            .filter(|(ino, i)| {
                **ino != ROOT
                    && i.shed
                        .is_none_or(|at| now.saturating_duration_since(at) >= again)
                    && !busy(**ino)
            })
            .map(|(ino, i)| (i.entry.kind == EntryKind::Dir, i.used, *ino))
            .collect();
        if candidates.len() > n {
            candidates.select_nth_unstable(n);
            candidates.truncate(n);
        }
        candidates
            .into_iter()
            .filter_map(|(_, _, ino)| {
                let inode = self.by_ino.get_mut(&ino)?;
                inode.shed = Some(now);
                let (parent, name) = inode.path.rsplit_once('/')?;
                let (parent, name) = (
                    if parent.is_empty() { "/" } else { parent },
                    name.to_string(),
                );
                Some(KernelEntry {
                    ino,
                    parent: self.by_path.get(parent).copied(),
                    name,
                })
            })
            .collect()
    }

    /// Refreshes the entry of a known inode.
    pub fn refresh(&mut self, ino: u64, entry: Entry, seen: Seen) {
        if let Some(inode) = self.by_ino.get_mut(&ino) {
            inode.update(entry, seen);
        }
    }

    /// Records that the kernel was told to keep `ino`'s entry for the pinned TTL under pins
    /// epoch `epoch`.
    pub fn kept_in(&mut self, ino: u64, epoch: u64) {
        if let Some(inode) = self.by_ino.get_mut(&ino) {
            inode.kept_in = Some(epoch);
        }
    }

    /// The inodes the kernel was told to keep under pins epoch `epoch` ([`InodeTable::kept_in`]),
    /// deepest paths first (a directory's entries before the directory's own).
    pub fn kept_under(&self, epoch: u64) -> Vec<KernelEntry> {
        let mut found: Vec<(&str, KernelEntry)> = self
            .by_ino
            .iter()
            .filter(|(ino, i)| **ino != ROOT && i.kept_in == Some(epoch))
            .map(|(ino, i)| {
                let (parent, name) = i.path.rsplit_once('/').unwrap_or(("", &i.path));
                let parent = if parent.is_empty() { "/" } else { parent };
                let entry = KernelEntry {
                    ino: *ino,
                    parent: self.ino_of(parent),
                    name: name.to_string(),
                };
                (i.path.as_str(), entry)
            })
            .collect();
        found.sort_by_key(|(path, _)| std::cmp::Reverse(path.matches('/').count()));
        found.into_iter().map(|(_, e)| e).collect()
    }

    /// Remembers the local copy of `ino`'s current version (`copy.fingerprint`'s).
    pub fn remember_copy(&mut self, ino: u64, copy: LocalCopy) {
        if let Some(inode) = self.by_ino.get_mut(&ino) {
            inode.local = Some(copy);
        }
    }

    /// Forgets the local copy remembered for `ino` if it is of version `fingerprint`.
    pub fn forget_copy(&mut self, ino: u64, fingerprint: u128) {
        if let Some(inode) = self.by_ino.get_mut(&ino)
            && inode.local.as_ref().map(|c| c.fingerprint) == Some(fingerprint)
        {
            inode.local = None;
        }
    }

    /// Drops `n` kernel references; forgets the inode when none are left (and says so).
    pub fn forget(&mut self, ino: u64, n: u64) -> bool {
        if ino == ROOT {
            return false;
        }
        let Some(inode) = self.by_ino.get_mut(&ino) else {
            return false;
        };
        inode.lookups = inode.lookups.saturating_sub(n);
        if inode.lookups == 0 {
            let path = inode.path.clone();
            self.by_ino.remove(&ino);
            self.by_path.remove(&path);
            return true;
        }
        false
    }

    /// Puts back an inode the kernel holds `refs` references to, as a journal names it
    /// ([`crate::journal`]): its entry is `entry`, had at `seen` (long enough ago that it is
    /// asked for again before it answers anything). New inode numbers start after it.
    pub fn restore(&mut self, ino: u64, path: &str, entry: Entry, refs: u64, seen: Seen) {
        if ino == ROOT || refs == 0 {
            return;
        }
        if let Some(old) = self.by_path.insert(path.to_string(), ino)
            && old != ino
        {
            // Two numbers for one path (a lookup raced a forget): the later one answers by
            // path; the kernel may still use both numbers.
            tracing::debug!(path, old, ino, "journal: two inode numbers for one path");
        }
        self.by_ino.insert(
            ino,
            Inode {
                path: path.to_string(),
                entry,
                seen,
                local: None,
                kept_in: None,
                lookups: refs,
                used: seen.at,
                shed: None,
            },
        );
        self.next = self.next.max(ino + 1);
    }

    pub fn len(&self) -> usize {
        self.by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ino.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_proto::EntryKind;

    fn dir(name: &str) -> Entry {
        Entry {
            name: name.into(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: 0,
            object: None,
            pinned: false,
            owner: None,
        }
    }

    fn seen(epoch: Option<u64>) -> Seen {
        Seen {
            at: Instant::now(),
            epoch,
        }
    }

    #[test]
    fn inodes_live_while_referenced() {
        let now = seen(None);
        let mut t = InodeTable::new(dir(""), now.at);
        let a = t.upsert("/a", dir("a"), 1, now);
        assert_eq!(t.upsert("/a", dir("a"), 2, now), a);
        t.forget(a, 2);
        assert_eq!(t.ino_of("/a"), Some(a));
        t.forget(a, 1);
        assert_eq!(t.ino_of("/a"), None);
        assert!(t.get(a).is_none());
        let b = t.upsert("/a", dir("a"), 1, now);
        assert_ne!(a, b, "inode numbers are not reused");
        t.forget(ROOT, 100);
        assert!(t.get(ROOT).is_some());
        assert_eq!(child_path("/", "x"), "/x");
        assert_eq!(child_path("/x", "y z"), "/x/y z");
    }

    #[test]
    fn a_remembered_copy_lasts_while_the_version_does() {
        use granary_core::ObjectId;
        use granary_proto::ObjectRef;
        let file = |etag: &str| Entry {
            object: Some(ObjectRef {
                mount: 0,
                id: ObjectId {
                    backend: "b".into(),
                    key: "f".into(),
                    size: 1,
                    etag: Some(etag.into()),
                    version: None,
                    mtime_ns: 0,
                },
            }),
            kind: EntryKind::File,
            size: 1,
            pinned: true,
            ..dir("f")
        };
        let copy = LocalCopy {
            fingerprint: 7,
            path: "/store/f".into(),
            file: FileIdentity {
                dev: 1,
                ino: 2,
                ctime_ns: 3,
            },
        };
        let now = seen(None);
        let mut t = InodeTable::new(dir(""), now.at);
        let f = t.upsert("/f", file("v1"), 1, now);
        t.remember_copy(f, copy.clone());
        t.refresh(f, file("v1"), now);
        t.upsert("/f", file("v1"), 1, now);
        assert_eq!(t.get(f).unwrap().local, Some(copy.clone()), "same version");
        t.forget_copy(f, 8);
        assert!(t.get(f).unwrap().local.is_some(), "another version's");
        t.forget_copy(f, 7);
        assert!(t.get(f).unwrap().local.is_none());
        t.remember_copy(f, copy);
        t.refresh(f, file("v2"), now);
        assert!(
            t.get(f).unwrap().local.is_none(),
            "a new version forgets it"
        );
    }

    #[test]
    fn the_entries_kept_under_an_epoch_are_found_deepest_first() {
        let mut t = InodeTable::new(dir(""), Instant::now());
        let d = t.upsert("/d", dir("d"), 1, seen(Some(7)));
        let f = t.upsert("/d/f", dir("f"), 1, seen(Some(7)));
        let g = t.upsert("/d/g", dir("g"), 1, seen(Some(6)));
        t.upsert("/d/not-kept", dir("not-kept"), 1, seen(Some(7)));
        for (ino, epoch) in [(d, 7), (f, 7), (g, 6)] {
            t.kept_in(ino, epoch);
        }
        let entry = |ino, parent, name: &str| KernelEntry {
            ino,
            parent: Some(parent),
            name: name.into(),
        };
        assert_eq!(t.kept_under(7), vec![entry(f, d, "f"), entry(d, ROOT, "d")]);
        assert!(t.kept_under(8).is_empty());
        // Had again since (an open that asked the worker), it is still one the kernel keeps
        // under 7, until it is kept under another epoch.
        t.refresh(f, dir("f"), seen(None));
        assert_eq!(t.kept_under(7).len(), 2);
        t.kept_in(f, 8);
        assert_eq!(t.kept_under(8), vec![entry(f, d, "f")]);
        assert_eq!(t.kept_under(7), vec![entry(d, ROOT, "d")]);
    }
}
