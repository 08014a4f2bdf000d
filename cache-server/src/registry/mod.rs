//! Where pins and load progress live: etcd for a cluster (every worker sees every pin,
//! `etcd.rs`), or files in the dataset store for a worker without etcd (`local.rs`).
//!
//! [`PinStore`] is what a store of pins must do; [`Registry`] is the handle the worker holds, over
//! one of them. A new kind of store is a new file implementing [`PinStore`] and a constructor
//! here.
//!
//! Workers read the pins every second: both stores keep what they last read and fetch or parse a
//! manifest again only when its pin changed, so a pin of a million files costs its manifest
//! once, not once a second.

mod etcd;
mod local;

use granary_core::dataset::{Manifest, NodeProgress};
use granary_proto::ApiError;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::PathBuf;

/// A pinned dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pin {
    pub name: String,
    pub tenant: String,
    /// The nodes that hold it (each file on `replicas` of them); empty until a load names them.
    pub nodes: Vec<String>,
    pub replicas: usize,
    /// Unix seconds after which the pin lapses.
    pub expires_at: Option<u64>,
    pub created_at: u64,
    /// Whether the nodes are to load it now.
    pub load: bool,
    /// Bumped to ask every holding node to re-check its files' checksums.
    #[serde(default)]
    pub verify_seq: u64,
    /// The mount the dataset's root is in, and the root's key in that mount's backend.
    pub mount: u32,
    pub root_key: String,
    pub backend: String,
    pub manifest: Manifest,
    /// The manifest's names are the backend's keys byte for byte. Pins made before names were
    /// exact lack it: their names were percent-decoded (`q%20a.txt` was pinned as `q a.txt`), so
    /// a file of theirs that the backend does not have as pinned fails with a message saying
    /// to pin the dataset again (the ETag check means it is never loaded from another object).
    #[serde(default)]
    pub exact_names: bool,
}

impl Pin {
    /// Checks what a pin read from a shared store claims (names, node ids, counts, sizes and
    /// every manifest path) before the worker acts on it.
    pub fn check(&self) -> Result<(), String> {
        use granary_core::dataset;
        let named = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
        dataset::check_name(&self.name)?;
        if self.tenant.is_empty()
            || self.tenant.len() > 128
            || self.tenant.chars().any(|c| c.is_control() || c == '/')
        {
            return Err(format!("tenant {:?} is not a tenant name", self.tenant));
        }
        dataset::check_node_list(&self.nodes)?;
        for node in &self.nodes {
            granary_core::placement::check_node_id(node)?;
        }
        dataset::check_replicas(self.replicas)?;
        if !self.root_key.is_empty() {
            granary_core::keys::check_key(self.root_key.trim_end_matches('/'))
                .map_err(|e| named(&format!("root key {:?}", self.root_key), &e))?;
        }
        let root = self.manifest.root.trim_start_matches('/');
        if !root.is_empty() {
            granary_core::keys::check_key(root)
                .map_err(|e| named(&format!("root {:?}", self.manifest.root), &e))?;
        }
        const MAX_FILE: u64 = 1 << 50; // a pebibyte
        for file in self.manifest.files.iter() {
            granary_core::keys::check_key(&file.path)
                .map_err(|e| named(&format!("manifest path {:?}", file.path), &e))?;
            if file.size > MAX_FILE {
                return Err(format!(
                    "manifest file {:?}: size {} is out of range",
                    file.path, file.size
                ));
            }
        }
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.manifest.bytes()
    }

    /// The backend key of a manifest file.
    pub fn key_of(&self, path: &str) -> String {
        if self.root_key.is_empty() {
            path.to_string()
        } else {
            format!("{}/{}", self.root_key.trim_end_matches('/'), path)
        }
    }

    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }
}

/// A boxed future, for [`PinStore`]'s object-safe methods.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A store of pins and of each node's load progress.
pub trait PinStore: Send + Sync {
    /// Whether every worker sees the same pins (etcd), or only this one (files on its disk).
    fn shared(&self) -> bool;

    /// Every pin, manifests included.
    fn pins(&self) -> BoxFuture<'_, Result<Vec<Pin>, ApiError>>;

    /// Calls `changed` whenever a pin is created, changed or removed, until the process ends
    /// (a store only this worker writes never calls it: the worker says so itself). Reconnects
    /// after errors.
    fn watch_pins<'a>(&'a self, changed: &'a (dyn Fn() + Send + Sync)) -> BoxFuture<'a, ()>;

    /// Stores a new pin; fails with `Invalid` when one of that name exists.
    fn create<'a>(&'a self, pin: &'a Pin) -> BoxFuture<'a, Result<(), ApiError>>;

    /// Replaces an existing pin (load requests, node sets).
    /// Fails with `NotFound` when the pin is gone, `Unavailable` when it changed meanwhile.
    fn update<'a>(&'a self, pin: &'a Pin) -> BoxFuture<'a, Result<(), ApiError>>;

    /// Removes a pin and its progress reports.
    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ApiError>>;

    /// Records `progress` of one node on dataset `name`.
    fn report<'a>(
        &'a self,
        name: &'a str,
        progress: &'a NodeProgress,
    ) -> BoxFuture<'a, Result<(), ApiError>>;

    /// Every node's last report on dataset `name`.
    fn progress<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<NodeProgress>, ApiError>>;
}

/// The pin registry a worker uses: one [`PinStore`].
pub struct Registry(Box<dyn PinStore>);

impl Registry {
    /// Pins in etcd, shared by every worker of the cluster.
    pub async fn etcd(etcd: &granary_net::membership::Etcd) -> Result<Self, ApiError> {
        Ok(Registry(Box::new(etcd::EtcdRegistry::connect(etcd).await?)))
    }

    /// Pins as files in `dir`, for a worker without etcd.
    pub fn local(dir: PathBuf) -> Result<Self, ApiError> {
        Ok(Registry(Box::new(local::LocalRegistry::open(dir)?)))
    }

    /// Whether every worker sees the same pins.
    pub fn shared(&self) -> bool {
        self.0.shared()
    }

    pub async fn pins(&self) -> Result<Vec<Pin>, ApiError> {
        self.0.pins().await
    }

    pub async fn watch_pins(&self, changed: impl Fn() + Send + Sync) {
        self.0.watch_pins(&changed).await
    }

    pub async fn create(&self, pin: &Pin) -> Result<(), ApiError> {
        self.0.create(pin).await
    }

    pub async fn update(&self, pin: &Pin) -> Result<(), ApiError> {
        self.0.update(pin).await
    }

    pub async fn remove(&self, name: &str) -> Result<(), ApiError> {
        self.0.remove(name).await
    }

    pub async fn report(&self, name: &str, progress: &NodeProgress) -> Result<(), ApiError> {
        self.0.report(name, progress).await
    }

    pub async fn progress(&self, name: &str) -> Result<Vec<NodeProgress>, ApiError> {
        self.0.progress(name).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use granary_core::dataset::ManifestFile;

    pub(crate) fn pin(name: &str) -> Pin {
        let files = (0..3)
            .map(|i| ManifestFile {
                path: format!("f{i}"),
                size: 10 + i,
                etag: Some(format!("e{i}")),
                version: None,
                mtime_ns: 0,
                owner: None,
            })
            .collect();
        Pin {
            name: name.into(),
            tenant: "t".into(),
            nodes: Vec::new(),
            replicas: 1,
            expires_at: None,
            created_at: 0,
            load: false,
            verify_seq: 0,
            mount: 0,
            root_key: String::new(),
            backend: "b".into(),
            manifest: Manifest::new("/d".into(), files),
            exact_names: true,
        }
    }

    #[test]
    fn a_pin_written_before_exact_names_reads_as_not_exact() {
        let mut json = serde_json::to_value(pin("old")).unwrap();
        json.as_object_mut().unwrap().remove("exact_names");
        let old: Pin = serde_json::from_value(json).unwrap();
        assert!(!old.exact_names);
        assert!(pin("new").exact_names);
    }
}
