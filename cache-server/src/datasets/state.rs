//! What this node keeps in memory about each dataset it loads, one [`DatasetState`] per
//! dataset: its share of the pin, whether a load runs, why loads failed, files waiting out a
//! retry backoff, and verification. (The index of loaded files, the load rate and the datasets
//! awaiting a checkpoint are kept apart, each under its own lock: see [`super::Datasets`].)

use crate::registry::Pin;
use granary_core::dataset::{ManifestFile, holders};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// One dataset's state on this node. A missing entry reads as the default: nothing known.
#[derive(Default)]
pub(super) struct DatasetState {
    /// This node's share of the pin (dropped when the pin is).
    pub(super) share: Option<Arc<Share>>,
    /// A load of it is running.
    pub(super) loading: bool,
    /// The last verification request carried out (the pin's `verify_seq`; 0: none).
    pub(super) verified: u64,
    /// Files verification found damaged and dropped, in all.
    pub(super) repaired: u64,
    /// Why its last load failed as a whole (not a file: those are in `backoff`).
    pub(super) failure: Option<String>,
    /// Files that failed to load, by path.
    pub(super) backoff: HashMap<String, Retry>,
}

impl DatasetState {
    /// Why files of the dataset are waiting to be loaded again, if any are.
    pub(super) fn backoff_reason(&self) -> Option<String> {
        let files = &self.backoff;
        let (path, first) = files.iter().min_by_key(|(_, r)| r.at)?;
        Some(format!(
            "{} file(s) failed to load; {path}: {} (failed {} time(s), next try in {} s)",
            files.len(),
            first.reason,
            first.failures,
            first.at.saturating_duration_since(Instant::now()).as_secs()
        ))
    }
}

/// The files of a pin one node holds (by rendezvous hashing of their paths over the pin's
/// nodes): computed once per manifest and node set, not on every tick, as a manifest can list
/// millions of files.
pub(super) struct Share {
    manifest: Arc<Vec<ManifestFile>>,
    nodes: Vec<String>,
    replicas: usize,
    /// Positions in the manifest.
    files: Vec<usize>,
    bytes: u64,
}

impl Share {
    pub(super) fn of(pin: &Pin, node: &str) -> Share {
        let mut files = Vec::new();
        let mut bytes = 0;
        for (i, f) in pin.manifest.files.iter().enumerate() {
            if holders(&f.path, &pin.nodes, pin.replicas)
                .iter()
                .any(|n| *n == node)
            {
                files.push(i);
                bytes += f.size;
            }
        }
        Share {
            manifest: pin.manifest.files.clone(),
            nodes: pin.nodes.clone(),
            replicas: pin.replicas,
            files,
            bytes,
        }
    }

    pub(super) fn is_of(&self, pin: &Pin) -> bool {
        Arc::ptr_eq(&self.manifest, &pin.manifest.files)
            && self.nodes == pin.nodes
            && self.replicas == pin.replicas
    }

    /// (files, bytes).
    pub(super) fn totals(&self) -> (u64, u64) {
        (self.files.len() as u64, self.bytes)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &ManifestFile> {
        self.files.iter().map(|i| &self.manifest[*i])
    }
}

/// A file that failed to load: failures in a row, when to try again, and why.
pub(super) struct Retry {
    pub(super) failures: u32,
    pub(super) at: Instant,
    pub(super) reason: String,
}
