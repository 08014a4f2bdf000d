//! The metadata cache: directory listings kept for a TTL.
//!
//! A lookup of `dir/name` is answered from the listing of `dir`, so `ls -l`, `find` and the
//! lookups that follow a readdir cost one backend LIST per directory per TTL. Concurrent misses
//! on one directory share one LIST (each directory has a slot guarded by an async mutex). The
//! number of directories and of entries kept are bounded; the oldest listings are dropped
//! first.

use granary_core::metrics as m;
use granary_proto::{ApiError, Entry};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One directory's entries, sorted by name, with an index by name.
#[derive(Debug, Default)]
pub struct Listing {
    pub entries: Arc<Vec<Entry>>,
    index: HashMap<String, usize>,
}

impl Listing {
    /// Builds a listing; where a file and a directory share a name, the directory wins.
    pub fn new(mut entries: Vec<Entry>) -> Self {
        entries.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then((a.kind as u8).cmp(&(b.kind as u8)).reverse())
        });
        entries.dedup_by(|later, earlier| later.name == earlier.name);
        let index = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        Listing {
            entries: Arc::new(entries),
            index,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<(Instant, Arc<Listing>)>>>;

#[derive(Debug)]
pub struct ListingCache {
    ttl: Duration,
    max_dirs: usize,
    max_entries: usize,
    /// Entries held, about (counted as listings are stored; recounted when shrinking).
    held: AtomicUsize,
    slots: Mutex<HashMap<(usize, String), Slot>>,
}

impl ListingCache {
    /// At most `max_dirs` listings and about `max_entries` entries in all.
    pub fn new(ttl: Duration, max_dirs: usize, max_entries: usize) -> Self {
        ListingCache {
            ttl,
            max_dirs,
            max_entries,
            held: AtomicUsize::new(0),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Drops the oldest idle listings until the entries held are three quarters of the limit.
    fn shrink(&self) {
        let mut slots = self.slots.lock().expect("listing cache lock");
        let mut idle: Vec<_> = slots
            .iter()
            .filter_map(|(k, s)| {
                s.try_lock().ok().map(|g| {
                    let at = g.as_ref().map(|(t, _)| *t);
                    (
                        k.clone(),
                        at,
                        g.as_ref().map_or(0, |(_, l)| l.entries.len()),
                    )
                })
            })
            .collect();
        let mut held: usize = idle.iter().map(|(_, _, n)| n).sum();
        idle.sort_by_key(|(_, at, _)| *at);
        let target = self.max_entries / 4 * 3;
        for (k, _, n) in idle {
            if held <= target {
                break;
            }
            slots.remove(&k);
            held -= n;
        }
        self.held.store(held, Ordering::Relaxed);
    }

    fn slot(&self, mount: usize, key: &str) -> Slot {
        let mut slots = self.slots.lock().expect("listing cache lock");
        if slots.len() >= self.max_dirs && !slots.contains_key(&(mount, key.to_string())) {
            // Drop the idle half: slots nobody is filling right now.
            let mut idle: Vec<_> = slots
                .iter()
                .filter_map(|(k, s)| {
                    s.try_lock()
                        .ok()
                        .map(|g| (k.clone(), g.as_ref().map(|(t, _)| *t)))
                })
                .collect();
            idle.sort_by_key(|(_, t)| *t);
            for (k, _) in idle.into_iter().take(self.max_dirs / 2 + 1) {
                slots.remove(&k);
            }
        }
        slots.entry((mount, key.to_string())).or_default().clone()
    }

    /// The listing of `key` in `mount`, from the cache if younger than the TTL, else from `list`.
    pub async fn get_or_list<F, Fut>(
        &self,
        mount: usize,
        key: &str,
        list: F,
    ) -> Result<Arc<Listing>, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Listing, ApiError>>,
    {
        let slot = self.slot(mount, key);
        let mut guard = slot.lock().await;
        if let Some((at, listing)) = guard.as_ref()
            && at.elapsed() < self.ttl
        {
            metrics::counter!(m::METADATA_LOOKUPS, "result" => "hit").increment(1);
            return Ok(listing.clone());
        }
        metrics::counter!(m::METADATA_LOOKUPS, "result" => "miss").increment(1);
        let listing = Arc::new(list().await?);
        let old = guard.replace((Instant::now(), listing.clone()));
        let old = old.map_or(0, |(_, l)| l.entries.len());
        drop(guard);
        let added = listing.entries.len();
        let held = self.held.fetch_add(added, Ordering::Relaxed) + added;
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(old))
            });
        if held.saturating_sub(old) > self.max_entries {
            self.shrink();
        }
        Ok(listing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_proto::EntryKind;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn entry(name: &str, kind: EntryKind) -> Entry {
        Entry {
            name: name.into(),
            kind,
            size: 0,
            mtime_ns: 0,
            object: None,
            pinned: false,
            owner: None,
        }
    }

    #[tokio::test]
    async fn entries_held_stay_under_their_limit() {
        let cache = ListingCache::new(Duration::from_secs(60), 1000, 1000);
        let big = |n: usize| {
            Listing::new(
                (0..n)
                    .map(|i| entry(&format!("f{i}"), EntryKind::File))
                    .collect(),
            )
        };
        for d in 0..50 {
            let l = cache
                .get_or_list(0, &format!("d{d}"), || async { Ok(big(100)) })
                .await
                .unwrap();
            assert_eq!(l.entries.len(), 100);
        }
        let held: usize = cache
            .slots
            .lock()
            .unwrap()
            .values()
            .map(|s| {
                s.try_lock()
                    .unwrap()
                    .as_ref()
                    .map_or(0, |(_, l)| l.entries.len())
            })
            .sum();
        assert!(held <= 1000, "{held} entries held");
        assert!(held >= 700, "the newest listings stay: {held}");
        // The newest directory is still a hit.
        let hit = cache
            .get_or_list(0, "d49", || async { panic!("d49 should be cached") })
            .await
            .unwrap();
        assert_eq!(hit.entries.len(), 100);
    }

    #[test]
    fn directory_wins_a_name_clash() {
        let l = Listing::new(vec![
            entry("b", EntryKind::File),
            entry("a", EntryKind::File),
            entry("b", EntryKind::Dir),
        ]);
        assert_eq!(l.entries.len(), 2);
        assert_eq!(l.get("b").unwrap().kind, EntryKind::Dir);
        assert_eq!(l.entries[0].name, "a");
    }

    #[tokio::test]
    async fn caches_for_the_ttl_and_bounds_size() {
        let cache = ListingCache::new(Duration::from_secs(60), 4, 1000);
        let calls = AtomicUsize::new(0);
        for _ in 0..3 {
            cache
                .get_or_list(0, "d", || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(Listing::new(vec![]))
                })
                .await
                .unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for i in 0..20 {
            cache
                .get_or_list(0, &format!("d{i}"), || async { Ok(Listing::new(vec![])) })
                .await
                .unwrap();
        }
        assert!(cache.slots.lock().unwrap().len() <= 4);
        let expired = ListingCache::new(Duration::ZERO, 4, 1000);
        for _ in 0..2 {
            expired
                .get_or_list(0, "d", || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok(Listing::new(vec![]))
                })
                .await
                .unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
