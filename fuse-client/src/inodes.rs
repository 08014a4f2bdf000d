//! The inode table: stable inode numbers for the paths the kernel has looked up.
//!
//! The kernel refers to files by inode number; it takes a reference for every entry we return
//! from lookup or readdirplus and gives them back with forget. An inode lives while the kernel
//! holds references to it (the root always lives). Each inode remembers the last entry seen
//! for its path, which answers getattr and is refreshed after the attribute TTL.

use granary_proto::Entry;
use std::collections::HashMap;
use std::time::Instant;

pub const ROOT: u64 = 1;

#[derive(Debug, Clone)]
pub struct Inode {
    pub path: String,
    pub entry: Entry,
    pub seen: Instant,
    lookups: u64,
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
                seen: now,
                lookups: 1,
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
    pub fn upsert(&mut self, path: &str, entry: Entry, refs: u64, now: Instant) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            let inode = self.by_ino.get_mut(&ino).expect("inode tables agree");
            inode.entry = entry;
            inode.seen = now;
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
                seen: now,
                lookups: refs,
            },
        );
        self.by_path.insert(path.to_string(), ino);
        ino
    }

    /// Refreshes the entry of a known inode.
    pub fn refresh(&mut self, ino: u64, entry: Entry, now: Instant) {
        if let Some(inode) = self.by_ino.get_mut(&ino) {
            inode.entry = entry;
            inode.seen = now;
        }
    }

    /// Drops `n` kernel references; forgets the inode when none are left.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let Some(inode) = self.by_ino.get_mut(&ino) else {
            return;
        };
        inode.lookups = inode.lookups.saturating_sub(n);
        if inode.lookups == 0 {
            let path = inode.path.clone();
            self.by_ino.remove(&ino);
            self.by_path.remove(&path);
        }
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
        }
    }

    #[test]
    fn inodes_live_while_referenced() {
        let now = Instant::now();
        let mut t = InodeTable::new(dir(""), now);
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
}
