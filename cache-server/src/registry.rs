//! Where pins and load progress live: etcd for a cluster (every worker sees every pin), or files
//! in the dataset store for a worker without etcd.
//!
//! etcd keys: `/granary/pins/<name>` holds a [`Pin`] as JSON (manifest included; created with a
//! transaction so two pins of one name cannot race), `/granary/progress/<name>/<node>` holds a
//! [`NodeProgress`].

use granary_core::dataset::{Manifest, NodeProgress};
use granary_proto::ApiError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

const PINS: &str = "/granary/pins/";
const PROGRESS: &str = "/granary/progress/";
/// etcd refuses values over 1.5 MiB by default; keep manifests well under it.
pub const MAX_PIN_JSON: usize = 1 << 20;

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
}

impl Pin {
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

/// Each pin key with its last modification revision.
type Stamp = Vec<(Vec<u8>, i64)>;

pub enum Registry {
    Etcd {
        client: Box<tokio::sync::Mutex<etcd_client::Client>>,
        /// The pins last read, with the (key, mod revision) list they were read at: a cheap
        /// keys-only read tells whether anything changed before the manifests are fetched.
        cached: Mutex<Option<(Stamp, Vec<Pin>)>>,
    },
    /// Pins as files `<dir>/<name>.json`; progress in memory (one node).
    Local {
        dir: PathBuf,
        progress: Mutex<BTreeMap<(String, String), NodeProgress>>,
    },
}

fn etcd(e: etcd_client::Error) -> ApiError {
    ApiError::Unavailable(format!("etcd: {e}"))
}

fn io(what: &str, e: std::io::Error) -> ApiError {
    ApiError::Internal(format!("{what}: {e}"))
}

impl Registry {
    pub async fn etcd(endpoints: &[String]) -> Result<Self, ApiError> {
        let client = granary_proto::membership::connect(endpoints)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        Ok(Registry::Etcd {
            client: Box::new(tokio::sync::Mutex::new(client)),
            cached: Mutex::new(None),
        })
    }

    /// Whether every worker sees the same pins (etcd), or only this one (files on its disk).
    pub fn shared(&self) -> bool {
        matches!(self, Registry::Etcd { .. })
    }

    pub fn local(dir: PathBuf) -> Result<Self, ApiError> {
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir.display().to_string(), e))?;
        Ok(Registry::Local {
            dir,
            progress: Mutex::new(BTreeMap::new()),
        })
    }

    pub async fn pins(&self) -> Result<Vec<Pin>, ApiError> {
        match self {
            Registry::Etcd { client, cached } => {
                let mut client = client.lock().await;
                let keys = client
                    .get(
                        PINS,
                        Some(
                            etcd_client::GetOptions::new()
                                .with_prefix()
                                .with_keys_only(),
                        ),
                    )
                    .await
                    .map_err(etcd)?;
                let stamp: Stamp = keys
                    .kvs()
                    .iter()
                    .map(|kv| (kv.key().to_vec(), kv.mod_revision()))
                    .collect();
                if let Some((at, pins)) = cached.lock().expect("pins cache").as_ref()
                    && *at == stamp
                {
                    return Ok(pins.clone());
                }
                let resp = client
                    .get(PINS, Some(etcd_client::GetOptions::new().with_prefix()))
                    .await
                    .map_err(etcd)?;
                let stamp = resp
                    .kvs()
                    .iter()
                    .map(|kv| (kv.key().to_vec(), kv.mod_revision()))
                    .collect();
                let pins: Vec<Pin> = resp
                    .kvs()
                    .iter()
                    .filter_map(|kv| match serde_json::from_slice::<Pin>(kv.value()) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            tracing::warn!(key = ?kv.key_str(), error = %e, "ignoring a malformed pin");
                            None
                        }
                    })
                    .collect();
                *cached.lock().expect("pins cache") = Some((stamp, pins.clone()));
                Ok(pins)
            }
            Registry::Local { dir, .. } => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || {
                    let mut pins = Vec::new();
                    for entry in std::fs::read_dir(&dir).map_err(|e| io("pins", e))? {
                        let path = entry.map_err(|e| io("pins", e))?.path();
                        if path.extension().is_some_and(|x| x == "json") {
                            let text = std::fs::read(&path).map_err(|e| io("pin", e))?;
                            match serde_json::from_slice::<Pin>(&text) {
                                Ok(p) => pins.push(p),
                                Err(e) => tracing::warn!(path = %path.display(), error = %e, "ignoring a malformed pin"),
                            }
                        }
                    }
                    pins.sort_by(|a, b| a.name.cmp(&b.name));
                    Ok(pins)
                })
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
            }
        }
    }

    /// Calls `changed` whenever a pin is created, changed or removed, until the process ends
    /// (etcd; a local registry's pins change only through this worker, which says so itself).
    /// Reconnects after errors.
    pub async fn watch_pins(&self, changed: impl Fn()) {
        let Registry::Etcd { client, .. } = self else {
            return;
        };
        loop {
            let mut c = client.lock().await.clone();
            match c
                .watch(PINS, Some(etcd_client::WatchOptions::new().with_prefix()))
                .await
            {
                Ok(mut stream) => {
                    // Whatever happened while the watch was down.
                    changed();
                    while let Ok(Some(resp)) = stream.message().await {
                        if !resp.events().is_empty() {
                            changed();
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot watch the pins; retrying"),
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    /// Stores a new pin; fails with `Invalid` when one of that name exists.
    pub async fn create(&self, pin: &Pin) -> Result<(), ApiError> {
        let json = serde_json::to_vec(pin).expect("pins serialize");
        if json.len() > MAX_PIN_JSON {
            return Err(ApiError::Invalid(format!(
                "dataset {:?} has {} files: its manifest ({} bytes) is over the {} byte limit of one pin; pin a smaller subtree",
                pin.name,
                pin.manifest.files.len(),
                json.len(),
                MAX_PIN_JSON
            )));
        }
        let exists = || ApiError::Invalid(format!("dataset {:?} is already pinned", pin.name));
        match self {
            Registry::Etcd { client, .. } => {
                use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                let key = format!("{PINS}{}", pin.name);
                let txn = Txn::new()
                    .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, json, None)]);
                let resp = client.lock().await.txn(txn).await.map_err(etcd)?;
                if resp.succeeded() {
                    Ok(())
                } else {
                    Err(exists())
                }
            }
            Registry::Local { dir, .. } => {
                let path = dir.join(format!("{}.json", pin.name));
                if path.exists() {
                    return Err(exists());
                }
                write_atomic(path, json).await
            }
        }
    }

    /// Replaces an existing pin (load requests, node sets).
    pub async fn update(&self, pin: &Pin) -> Result<(), ApiError> {
        let json = serde_json::to_vec(pin).expect("pins serialize");
        match self {
            Registry::Etcd { client, .. } => {
                client
                    .lock()
                    .await
                    .put(format!("{PINS}{}", pin.name), json, None)
                    .await
                    .map_err(etcd)?;
                Ok(())
            }
            Registry::Local { dir, .. } => {
                write_atomic(dir.join(format!("{}.json", pin.name)), json).await
            }
        }
    }

    /// Removes a pin and its progress reports.
    pub async fn remove(&self, name: &str) -> Result<(), ApiError> {
        match self {
            Registry::Etcd { client, .. } => {
                let mut client = client.lock().await;
                client
                    .delete(format!("{PINS}{name}"), None)
                    .await
                    .map_err(etcd)?;
                client
                    .delete(
                        format!("{PROGRESS}{name}/"),
                        Some(etcd_client::DeleteOptions::new().with_prefix()),
                    )
                    .await
                    .map_err(etcd)?;
                Ok(())
            }
            Registry::Local { dir, progress } => {
                progress
                    .lock()
                    .expect("progress")
                    .retain(|(n, _), _| n != name);
                match tokio::fs::remove_file(dir.join(format!("{name}.json"))).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(io("unpin", e)),
                }
            }
        }
    }

    pub async fn report(&self, name: &str, progress: &NodeProgress) -> Result<(), ApiError> {
        match self {
            Registry::Etcd { client, .. } => {
                let json = serde_json::to_vec(progress).expect("progress serializes");
                client
                    .lock()
                    .await
                    .put(format!("{PROGRESS}{name}/{}", progress.node), json, None)
                    .await
                    .map_err(etcd)?;
                Ok(())
            }
            Registry::Local { progress: map, .. } => {
                map.lock()
                    .expect("progress")
                    .insert((name.into(), progress.node.clone()), progress.clone());
                Ok(())
            }
        }
    }

    pub async fn progress(&self, name: &str) -> Result<Vec<NodeProgress>, ApiError> {
        match self {
            Registry::Etcd { client, .. } => {
                let resp = client
                    .lock()
                    .await
                    .get(
                        format!("{PROGRESS}{name}/"),
                        Some(etcd_client::GetOptions::new().with_prefix()),
                    )
                    .await
                    .map_err(etcd)?;
                Ok(resp
                    .kvs()
                    .iter()
                    .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
                    .collect())
            }
            Registry::Local { progress, .. } => Ok(progress
                .lock()
                .expect("progress")
                .iter()
                .filter(|((n, _), _)| n == name)
                .map(|(_, p)| p.clone())
                .collect()),
        }
    }
}

async fn write_atomic(path: PathBuf, bytes: Vec<u8>) -> Result<(), ApiError> {
    tokio::task::spawn_blocking(move || {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| io(&path.display().to_string(), e))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}
