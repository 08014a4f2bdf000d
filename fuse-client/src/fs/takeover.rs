//! Taking over from an earlier server on the same kernel connection ([`crate::kernel::handover`]):
//! the tables rebuilt from what its journal ([`crate::journal`]) says the kernel holds.

use super::{Backing, FsError, GranaryFs, OpenFile};
use crate::inodes::Seen;
use crate::journal::Rebuilt;
use crate::prefetch::FileReader;
use granary_proto::{CacheApi, Entry, EntryKind};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl<A: CacheApi> GranaryFs<A> {
    /// Takes over what the kernel holds of an earlier server on this connection, as its journal
    /// says: inodes (asked for again before they answer anything), open files (each reading the
    /// version it opened), directory handles (listed again) and passthrough backing ids
    /// (`adopt` makes a backing of an id; ids no open file uses are unregistered).
    pub async fn restore(&self, rebuilt: Rebuilt, adopt: impl Fn(u32) -> Backing) {
        let Rebuilt {
            inodes,
            files,
            dirs,
            backings,
            ..
        } = &rebuilt;
        // Old enough that every trust rule asks the worker again.
        let now = Instant::now();
        let seen = Seen {
            at: now
                .checked_sub(
                    self.config.attr_ttl.max(self.config.pinned_ttl) + Duration::from_secs(1),
                )
                .unwrap_or(now),
            epoch: None,
        };
        {
            let mut table = self.inodes.lock().expect("inode lock");
            for (&ino, (path, dir, refs)) in inodes {
                let name = path.rsplit('/').next().unwrap_or_default().to_string();
                let entry = Entry {
                    name,
                    kind: if *dir {
                        EntryKind::Dir
                    } else {
                        EntryKind::File
                    },
                    size: 0,
                    mtime_ns: 0,
                    object: None,
                    pinned: false,
                    owner: None,
                };
                table.restore(ino, path, entry, *refs, seen);
            }
        }
        let mut adopted: HashMap<u32, Backing> = HashMap::new();
        let mut modes: HashMap<u64, (u128, u64, Option<Backing>)> = HashMap::new();
        {
            let mut open = self.files.lock().expect("files lock");
            for (&fh, f) in files {
                let reader = FileReader::new(
                    f.object.clone(),
                    self.block_size,
                    self.max_ahead_blocks,
                    self.budget.clone(),
                    self.labels.for_path(&f.path, None),
                );
                let backing = f
                    .passthrough
                    .map(|(_, id)| adopted.entry(id).or_insert_with(|| adopt(id)).clone());
                let fingerprint = match f.passthrough {
                    Some((fingerprint, _)) => fingerprint,
                    None => f.object.id.fingerprint(),
                };
                let mode = modes.entry(f.ino).or_insert((fingerprint, 0, backing));
                mode.1 += 1;
                open.insert(
                    fh,
                    OpenFile {
                        ino: f.ino,
                        reader: Arc::new(reader),
                    },
                );
            }
        }
        for (ino, (fingerprint, opens, backing)) in modes {
            self.modes.restore(ino, fingerprint, opens, backing);
        }
        // Registered, and no open file reads them: unregistered now (dropping does it).
        for &id in backings.iter().filter(|id| !adopted.contains_key(id)) {
            drop(adopt(id));
        }
        for (&fh, &dir) in dirs {
            if let Err(e) = self.restore_dir(fh, dir).await {
                tracing::warn!(fh, ino = dir, error = %e, "a directory handle could not be listed again");
            }
        }
        self.next_fh.fetch_max(rebuilt.next_fh(), Ordering::Relaxed);
        for (kind, n) in [
            ("inode", inodes.len()),
            ("file", files.len()),
            ("dir", dirs.len()),
        ] {
            metrics::gauge!(granary_core::metrics::FUSE_REBUILT, "kind" => kind).set(n as f64);
        }
        tracing::info!(
            inodes = inodes.len(),
            files = files.len(),
            dirs = dirs.len(),
            backings = backings.len(),
            "took over what the kernel holds from the journal"
        );
    }

    /// A directory handle of an earlier server: its listing is taken again.
    async fn restore_dir(&self, fh: u64, ino: u64) -> Result<(), FsError> {
        let handle = self.list_dir(ino).await?;
        self.dirs.lock().expect("dirs lock").insert(fh, handle);
        Ok(())
    }
}
