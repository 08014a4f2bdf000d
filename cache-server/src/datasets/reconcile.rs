//! The reconcile loop, which decides what this node loads and drops, and the checkpoints task.
//!
//! Each worker runs [`Datasets::run`]: every second, and at once when a pin changes (an etcd
//! watch, or this worker's own API) or a load ends, it reads the pins, drops what is no longer
//! pinned here, lapses expired pins, loads its share of every pin being loaded (each file on
//! `replicas` nodes of the pin's set by rendezvous hashing of its path; the first holder fetches
//! it from the backend in block-size ranged GETs, the others copy it from that holder over QUIC),
//! carries out verification requests, and reports its progress to the registry.
//!
//! Beside it, every couple of seconds, the checkpoints task makes new index lines durable (see
//! `store`).

use super::store::checkpoint;
use super::{Datasets, Source, blocking, now_secs};
use granary_core::dataset::NodeProgress;
use granary_proto::ApiError;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often datasets with new index lines are synced and checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

impl Datasets {
    /// Starts the reconcile loop ([`Datasets::run`]) on a runtime of its own, of
    /// `settings.load_threads` threads named `granary-load`, which runs until the process ends.
    /// Loads are bulk work: apart, they do not delay the reads the main runtime serves. And a
    /// load is one task whose GETs' connections are tasks too: on one thread they wake each
    /// other without waking and stealing across threads (on 2 CPUs beside the backend: 1.4-1.8
    /// CPU-seconds a 1.27 GiB load instead of 1.8-2.0, 21,000 context switches instead of
    /// 31,000).
    ///
    /// The runtime's blocking threads (file creates, writes, renames, checks) are at most
    /// `load_concurrency`: as many writes as blocks in flight, never one thread per block fetched
    /// and not yet written.
    pub fn start<S: Source>(self: Arc<Self>, source: Arc<S>) -> std::io::Result<()> {
        let threads = self.settings.load_threads;
        let mut builder = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads);
            b
        };
        let runtime = builder
            .thread_name("granary-load")
            .max_blocking_threads(self.settings.load_concurrency)
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("granary-load".into())
            .spawn(move || runtime.block_on(self.run(source)))?;
        Ok(())
    }

    /// The reconcile loop (see the module docs); runs until the process ends.
    pub async fn run<S: Source>(self: Arc<Self>, source: Arc<S>) {
        if self.registry.shared() {
            let me = self.clone();
            tokio::spawn(async move { me.registry.watch_pins(|| me.wake()).await });
        }
        tokio::spawn(self.clone().checkpoints());
        let mut last_report: HashMap<String, (NodeProgress, Instant)> = HashMap::new();
        loop {
            if let Err(e) = self.reconcile(&source, &mut last_report).await {
                tracing::warn!(error = %e, "dataset reconcile failed; retrying");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    async fn reconcile<S: Source>(
        self: &Arc<Self>,
        source: &Arc<S>,
        last_report: &mut HashMap<String, (NodeProgress, Instant)>,
    ) -> Result<(), ApiError> {
        let pins = self.refresh().await?;
        let now = now_secs();
        for pin in pins.iter().filter(|p| p.expired(now)) {
            tracing::info!(dataset = %pin.name, tenant = %pin.tenant, "pin expired; unpinning");
            self.registry.remove(&pin.name).await?;
        }
        // Drop what is no longer pinned here: indexed datasets, and dataset directories of loads
        // that never completed a file.
        let mine: HashSet<&str> = pins
            .iter()
            .filter(|p| !p.expired(now) && p.nodes.iter().any(|n| *n == self.node_id))
            .map(|p| p.name.as_str())
            .collect();
        let mut stale: HashSet<String> = self
            .indexes
            .lock()
            .expect("indexes")
            .keys()
            .filter(|n| !mine.contains(n.as_str()))
            .cloned()
            .collect();
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            stale.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().join("files").is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "pins" && !mine.contains(n.as_str())),
            );
        }
        for name in stale {
            if self
                .datasets
                .lock()
                .expect("datasets")
                .get(&name)
                .is_some_and(|s| s.loading)
            {
                continue;
            }
            tracing::info!(dataset = %name, "not pinned on this node any more; freeing its files");
            self.indexes.lock().expect("indexes").remove(&name);
            if let Some(state) = self.datasets.lock().expect("datasets").get_mut(&name) {
                state.backoff = HashMap::new();
                state.failure = None;
            }
            let dir = self.root.join(&name);
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            last_report.remove(&name);
            self.rebuild_held();
        }
        for pin in pins
            .iter()
            .filter(|p| !p.expired(now) && mine.contains(p.name.as_str()))
        {
            let seen = self
                .datasets
                .lock()
                .expect("datasets")
                .get(&pin.name)
                .map(|s| s.verified);
            if seen.unwrap_or(0) < pin.verify_seq {
                self.verify(pin).await;
                self.datasets
                    .lock()
                    .expect("datasets")
                    .entry(pin.name.clone())
                    .or_default()
                    .verified = pin.verify_seq;
            }
            let idle = !self
                .datasets
                .lock()
                .expect("datasets")
                .get(&pin.name)
                .is_some_and(|s| s.loading);
            // (Files waiting out a backoff start no load: the tick after it ends does.)
            if pin.load && idle && !self.due(pin).is_empty() {
                self.datasets
                    .lock()
                    .expect("datasets")
                    .entry(pin.name.clone())
                    .or_default()
                    .loading = true;
                let (me, pin, source) = (self.clone(), pin.clone(), source.clone());
                tokio::spawn(async move {
                    me.load(&pin, &source).await;
                    if let Some(state) = me.datasets.lock().expect("datasets").get_mut(&pin.name) {
                        state.loading = false;
                    }
                    // Report the outcome now, not at the next tick.
                    me.wake();
                });
            }
            let report = self.progress(pin);
            let due = match last_report.get(&pin.name) {
                Some((prev, at)) => {
                    prev_differs(prev, &report) || at.elapsed() > Duration::from_secs(10)
                }
                None => true,
            };
            if due {
                self.registry.report(&pin.name, &report).await?;
                last_report.insert(pin.name.clone(), (report, Instant::now()));
            }
        }
        Ok(())
    }

    /// Every [`CHECKPOINT_EVERY`], makes the index lines of each dataset that has new ones
    /// durable: notes the index's length, syncs the filesystem, appends a
    /// [`Checkpoint`](super::store::checkpoint).
    async fn checkpoints(self: Arc<Self>) {
        loop {
            tokio::time::sleep(CHECKPOINT_EVERY).await;
            let due = std::mem::take(&mut *self.unsynced.lock().expect("unsynced"));
            for dataset in due {
                let dir = self.root.join(&dataset);
                if let Err(e) = blocking(move || checkpoint(&dir)).await {
                    // Gone with an unpin, or a disk error (the next commit tries again).
                    tracing::debug!(%dataset, error = %e, "cannot checkpoint the dataset index");
                }
            }
        }
    }
}

fn prev_differs(a: &NodeProgress, b: &NodeProgress) -> bool {
    a.state != b.state
        || a.bytes_ready != b.bytes_ready
        || a.files_ready != b.files_ready
        || a.bytes_total != b.bytes_total
        || a.verified_seq != b.verified_seq
        || a.reason != b.reason
}
