//! Pins in etcd, shared by every worker of the cluster.
//!
//! etcd keys: `/granary/pins/<name>` holds a [`Pin`] as JSON without its manifest's file list
//! (created with a transaction so two pins of one name cannot race), which is in
//! `/granary/manifests/<name>/<id>/<i>`: zstd-compressed JSON chunks of at most 1 MiB of JSON
//! each (etcd refuses values over 1.5 MiB), written once before the pin and never changed.
//! `/granary/progress/<name>/<node>` holds a [`NodeProgress`].

use super::{BoxFuture, Pin, PinStore};
use granary_core::dataset::{ManifestFile, NodeProgress};
use granary_proto::ApiError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PINS: &str = "/granary/pins/";
const PROGRESS: &str = "/granary/progress/";
const MANIFESTS: &str = "/granary/manifests/";
/// JSON bytes of manifest files per etcd value, at most (compressed, it stays under etcd's
/// 1.5 MiB limit whatever the paths).
const CHUNK_JSON: usize = 1 << 20;
/// Manifest chunks left by a pin that was never created (its worker died between writing them
/// and the pin) are removed once they are this old.
const ORPHAN_AGE: Duration = Duration::from_secs(600);

/// Each pin key with its last modification revision.
type Stamp = Vec<(Vec<u8>, i64)>;

/// A pin as etcd holds it: without its manifest's files when they are in chunks.
#[derive(Serialize, Deserialize)]
struct StoredPin {
    #[serde(flatten)]
    pin: Pin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chunks: Option<Chunks>,
}

/// Where a pin's manifest files are: `/granary/manifests/<name>/<id>/<i>` for i < `count`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Chunks {
    /// `<unix nanoseconds>-<random>`, hex: unique to one pin creation.
    id: String,
    count: usize,
    files: usize,
    bytes: u64,
}

impl Chunks {
    fn prefix(name: &str, id: &str) -> String {
        format!("{MANIFESTS}{name}/{id}/")
    }

    fn key(name: &str, id: &str, i: usize) -> String {
        format!("{}{i:08}", Chunks::prefix(name, id))
    }

    /// When the chunks were written (from the id).
    fn written_at(id: &str) -> Option<SystemTime> {
        let nanos = u64::from_str_radix(id.split('-').next()?, 16).ok()?;
        Some(UNIX_EPOCH + Duration::from_nanos(nanos))
    }
}

/// What an etcd registry last read.
#[derive(Default)]
pub struct EtcdCache {
    /// The pins, with the (key, mod revision) list they were read at: a cheap keys-only read
    /// tells whether anything changed before the pins are fetched.
    pins: Option<(Stamp, Vec<Pin>)>,
    /// Manifest files by pin name and chunk id: fetched once per pin.
    manifests: HashMap<(String, String), Arc<Vec<ManifestFile>>>,
    /// When orphaned manifest chunks were last looked for.
    swept: Option<Instant>,
}

/// Pins in etcd.
pub struct EtcdRegistry {
    client: Box<tokio::sync::Mutex<etcd_client::Client>>,
    cached: Mutex<EtcdCache>,
}

use granary_net::membership::Etcd;

impl EtcdRegistry {
    pub async fn connect(etcd: &Etcd) -> Result<Self, ApiError> {
        let client = granary_net::membership::connect(etcd)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        Ok(EtcdRegistry {
            client: Box::new(tokio::sync::Mutex::new(client)),
            cached: Mutex::new(EtcdCache::default()),
        })
    }
}

fn etcd(e: etcd_client::Error) -> ApiError {
    ApiError::Unavailable(format!("etcd: {e}"))
}

impl PinStore for EtcdRegistry {
    fn shared(&self) -> bool {
        true
    }

    fn watch_pins<'a>(&'a self, changed: &'a (dyn Fn() + Send + Sync)) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Self { client, .. } = self;
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
        })
    }

    fn pins(&self) -> BoxFuture<'_, Result<Vec<Pin>, ApiError>> {
        Box::pin(async move {
            let Self { client, cached } = self;
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
            if let Some((at, pins)) = cached.lock().expect("pins cache").pins.as_ref()
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
            let mut pins = Vec::new();
            let mut manifests = HashMap::new();
            // Every chunk set a pin names, read or not (one that failed to read now is
            // not an orphan).
            let mut named = std::collections::HashSet::new();
            for kv in resp.kvs() {
                let stored = match serde_json::from_slice::<StoredPin>(kv.value()) {
                    Ok(p) => p,
                    Err(e) => {
                        metrics::counter!(granary_core::metrics::ETCD_RECORDS_REFUSED, "kind" => "pin")
                            .increment(1);
                        tracing::warn!(key = ?kv.key_str(), error = %e, "ignoring a malformed pin");
                        continue;
                    }
                };
                let StoredPin { mut pin, chunks } = stored;
                if let Some(chunks) = chunks {
                    let id = (pin.name.clone(), chunks.id.clone());
                    named.insert(id.clone());
                    let known = cached
                        .lock()
                        .expect("pins cache")
                        .manifests
                        .get(&id)
                        .cloned();
                    let files = match known {
                        Some(files) => files,
                        None => match read_chunks(&mut client, &pin.name, &chunks).await {
                            Ok(files) => Arc::new(files),
                            // etcd away: no answer this time rather than a pin list
                            // without this pin (its nodes would free its files).
                            Err(e @ ApiError::Unavailable(_)) => return Err(e),
                            Err(e) => {
                                tracing::warn!(dataset = %pin.name, error = %e, "ignoring a pin whose manifest cannot be read");
                                continue;
                            }
                        },
                    };
                    pin.manifest.files = files.clone();
                    manifests.insert(id, files);
                }
                // etcd is shared: what it holds is checked like a request before it is used.
                if let Err(e) = pin.check() {
                    metrics::counter!(granary_core::metrics::ETCD_RECORDS_REFUSED, "kind" => "pin")
                        .increment(1);
                    tracing::warn!(key = ?kv.key_str(), error = %e, "ignoring a pin that does not pass its checks");
                    continue;
                }
                pins.push(pin);
            }
            let sweep = {
                let mut cache = cached.lock().expect("pins cache");
                cache.pins = Some((stamp, pins.clone()));
                cache.manifests = manifests;
                let due = cache.swept.is_none_or(|t| t.elapsed() >= ORPHAN_AGE);
                if due {
                    cache.swept = Some(Instant::now());
                }
                due
            };
            if sweep {
                sweep_orphans(&mut client, &named).await;
            }
            Ok(pins)
        })
    }

    fn create<'a>(&'a self, pin: &'a Pin) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let Self { client, .. } = self;
            let exists = || ApiError::Invalid(format!("dataset {:?} is already pinned", pin.name));
            use etcd_client::{Compare, CompareOp, Txn, TxnOp};
            let chunks = encode_chunks(&pin.manifest.files)?;
            let reference = Chunks {
                id: chunk_id(),
                count: chunks.len(),
                files: pin.manifest.files.len(),
                bytes: pin.manifest.bytes(),
            };
            let prefix = Chunks::prefix(&pin.name, &reference.id);
            let mut client = client.lock().await;
            // The chunks first, then the pin that names them: a reader never sees a pin
            // whose manifest is incomplete.
            let mut result = Ok(());
            for (i, chunk) in chunks.into_iter().enumerate() {
                result = client
                    .put(Chunks::key(&pin.name, &reference.id, i), chunk, None)
                    .await
                    .map(|_| ())
                    .map_err(etcd);
                if result.is_err() {
                    break;
                }
            }
            if result.is_ok() {
                let key = format!("{PINS}{}", pin.name);
                let txn = Txn::new()
                    .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, stored_json(pin, reference), None)]);
                result = match client.txn(txn).await.map_err(etcd) {
                    Ok(resp) if resp.succeeded() => return Ok(()),
                    Ok(_) => Err(exists()),
                    // The pin may have been written all the same (an answer lost on the
                    // way): its chunks stay; the sweep removes them if no pin names them.
                    Err(e) => return Err(e),
                };
            }
            // Not pinned: its chunks go (or, if etcd is away, the sweep removes them later).
            let _ = client
                .delete(
                    prefix,
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                )
                .await;
            result
        })
    }

    fn update<'a>(&'a self, pin: &'a Pin) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let Self { client, .. } = self;
            use etcd_client::{Compare, CompareOp, Txn, TxnOp};
            let key = format!("{PINS}{}", pin.name);
            let mut client = client.lock().await;
            // The stored pin names the manifest chunks (the manifest never changes).
            let (stored, revision) = read_stored(&mut client, &key)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("dataset {:?}", pin.name)))?;
            let json = match stored.chunks {
                Some(reference) => stored_json(pin, reference),
                None => serde_json::to_vec(pin).expect("pins serialize"),
            };
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(key, json, None)]);
            if client.txn(txn).await.map_err(etcd)?.succeeded() {
                Ok(())
            } else {
                Err(ApiError::Unavailable(format!(
                    "dataset {:?} changed meanwhile; try again",
                    pin.name
                )))
            }
        })
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let Self { client, .. } = self;
            let mut client = client.lock().await;
            let key = format!("{PINS}{name}");
            let chunks = read_stored(&mut client, &key)
                .await?
                .and_then(|(stored, _)| stored.chunks);
            client.delete(key, None).await.map_err(etcd)?;
            let prefix = etcd_client::DeleteOptions::new().with_prefix();
            client
                .delete(format!("{PROGRESS}{name}/"), Some(prefix.clone()))
                .await
                .map_err(etcd)?;
            // Only this pin's chunks: a pin of the same name made since has its own id.
            if let Some(c) = chunks {
                client
                    .delete(Chunks::prefix(name, &c.id), Some(prefix))
                    .await
                    .map_err(etcd)?;
            }
            Ok(())
        })
    }

    fn report<'a>(
        &'a self,
        name: &'a str,
        progress: &'a NodeProgress,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let Self { client, .. } = self;
            let json = serde_json::to_vec(progress).expect("progress serializes");
            client
                .lock()
                .await
                .put(format!("{PROGRESS}{name}/{}", progress.node), json, None)
                .await
                .map_err(etcd)?;
            Ok(())
        })
    }

    fn progress<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<NodeProgress>, ApiError>> {
        Box::pin(async move {
            let Self { client, .. } = self;
            let resp = client
                .lock()
                .await
                .get(
                    format!("{PROGRESS}{name}/"),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .map_err(etcd)?;
            let prefix = format!("{PROGRESS}{name}/");
            Ok(resp
                .kvs()
                .iter()
                .filter_map(|kv| {
                    let node = kv.key().strip_prefix(prefix.as_bytes())?;
                    let checked = serde_json::from_slice::<NodeProgress>(kv.value())
                        .map_err(|e| e.to_string())
                        .and_then(|p| check_progress(node, &p).map(|()| p));
                    match checked {
                        Ok(p) => Some(p),
                        Err(e) => {
                            metrics::counter!(granary_core::metrics::ETCD_RECORDS_REFUSED, "kind" => "progress")
                                .increment(1);
                            tracing::warn!(key = ?kv.key_str(), error = %e, "ignoring a progress report");
                            None
                        }
                    }
                })
                .collect())
        })
    }
}

/// Checks a node's progress report read from etcd: under its own node's key, counts that add up.
fn check_progress(key_node: &[u8], p: &NodeProgress) -> Result<(), String> {
    granary_core::placement::check_node_id(&p.node)?;
    if key_node != p.node.as_bytes() {
        return Err(format!(
            "a report for {:?} under another node's key",
            p.node
        ));
    }
    if p.files_ready > p.files_total || p.bytes_ready > p.bytes_total {
        return Err("more ready than there is".into());
    }
    if !p.rate.is_finite() || p.rate < 0.0 || p.reason.len() > 4096 {
        return Err("rate or reason out of range".into());
    }
    Ok(())
}

/// The stored pin at `key`, with its modification revision.
async fn read_stored(
    client: &mut etcd_client::Client,
    key: &str,
) -> Result<Option<(StoredPin, i64)>, ApiError> {
    let resp = client.get(key, None).await.map_err(etcd)?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(None);
    };
    let stored = serde_json::from_slice::<StoredPin>(kv.value())
        .map_err(|e| ApiError::Internal(format!("{key}: {e}")))?;
    Ok(Some((stored, kv.mod_revision())))
}

/// `pin` as etcd holds it, its files in the chunks `reference` names.
fn stored_json(pin: &Pin, reference: Chunks) -> Vec<u8> {
    let mut pin = pin.clone();
    pin.manifest.files = Arc::new(Vec::new());
    serde_json::to_vec(&StoredPin {
        pin,
        chunks: Some(reference),
    })
    .expect("pins serialize")
}

/// A new chunk id: the time now, and randomness (two workers pinning one name at once).
fn chunk_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut random = std::collections::hash_map::RandomState::new().build_hasher();
    random.write_u64(nanos);
    format!("{nanos:x}-{:016x}", random.finish())
}

/// `files` as zstd-compressed JSON arrays of at most [`CHUNK_JSON`] bytes each.
fn encode_chunks(files: &[ManifestFile]) -> Result<Vec<Vec<u8>>, ApiError> {
    let mut chunks = Vec::new();
    let mut json = Vec::with_capacity(CHUNK_JSON + 4096);
    let mut flush = |json: &mut Vec<u8>| -> Result<(), ApiError> {
        json.push(b']');
        let chunk = zstd::encode_all(json.as_slice(), 3)
            .map_err(|e| ApiError::Internal(format!("compressing a manifest: {e}")))?;
        chunks.push(chunk);
        json.clear();
        Ok(())
    };
    for file in files {
        json.push(if json.is_empty() { b'[' } else { b',' });
        serde_json::to_writer(&mut json, file).expect("manifest files serialize");
        if json.len() >= CHUNK_JSON {
            flush(&mut json)?;
        }
    }
    if !json.is_empty() {
        flush(&mut json)?;
    }
    Ok(chunks)
}

/// The manifest files in the chunks `reference` names, checked against its counts.
async fn read_chunks(
    client: &mut etcd_client::Client,
    name: &str,
    reference: &Chunks,
) -> Result<Vec<ManifestFile>, ApiError> {
    let mut files = Vec::with_capacity(reference.files);
    for i in 0..reference.count {
        let key = Chunks::key(name, &reference.id, i);
        let resp = client.get(key.as_str(), None).await.map_err(etcd)?;
        let kv = resp
            .kvs()
            .first()
            .ok_or_else(|| ApiError::Internal(format!("{key} is missing")))?;
        let json =
            zstd::decode_all(kv.value()).map_err(|e| ApiError::Internal(format!("{key}: {e}")))?;
        let chunk: Vec<ManifestFile> =
            serde_json::from_slice(&json).map_err(|e| ApiError::Internal(format!("{key}: {e}")))?;
        files.extend(chunk);
    }
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    if files.len() != reference.files || bytes != reference.bytes {
        return Err(ApiError::Internal(format!(
            "the manifest of {name:?} has {} files and {bytes} bytes in etcd, not {} and {}",
            files.len(),
            reference.files,
            reference.bytes
        )));
    }
    Ok(files)
}

/// Removes manifest chunks that no pin names and that are older than [`ORPHAN_AGE`] (left by
/// a worker that died while pinning). Errors are only logged: the next sweep tries again.
async fn sweep_orphans(
    client: &mut etcd_client::Client,
    in_use: &std::collections::HashSet<(String, String)>,
) {
    let keys = match client
        .get(
            MANIFESTS,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
    {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list manifest chunks");
            return;
        }
    };
    let mut sets: Vec<(String, String)> = keys
        .kvs()
        .iter()
        .filter_map(|kv| {
            let rest = kv.key_str().ok()?.strip_prefix(MANIFESTS)?;
            let mut parts = rest.splitn(3, '/');
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect();
    sets.dedup();
    for (name, id) in sets {
        // (The pins were read just now; a pin being created meanwhile wrote its chunks less
        // than a minute before it, hence the age.)
        let in_use = in_use.contains(&(name.clone(), id.clone()));
        let old = Chunks::written_at(&id)
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age >= ORPHAN_AGE);
        if in_use || !old {
            continue;
        }
        tracing::info!(dataset = %name, chunks = %id, "removing manifest chunks no pin names");
        let _ = client
            .delete(
                Chunks::prefix(&name, &id),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_chunks_hold_at_most_a_mebibyte_of_json_each() {
        let files: Vec<ManifestFile> = (0..20_000)
            .map(|i| ManifestFile {
                path: format!("dir/{i:0>200}"),
                size: i,
                etag: None,
                version: None,
                mtime_ns: 0,
                owner: None,
            })
            .collect();
        let chunks = encode_chunks(&files).unwrap();
        let mut back = Vec::new();
        for chunk in &chunks {
            let json = zstd::decode_all(chunk.as_slice()).unwrap();
            assert!(json.len() <= CHUNK_JSON + 1024, "{} bytes", json.len());
            back.extend(serde_json::from_slice::<Vec<ManifestFile>>(&json).unwrap());
        }
        assert!(chunks.len() >= 4, "{} chunks", chunks.len());
        assert_eq!(back, files);
        assert!(encode_chunks(&[]).unwrap().is_empty());
    }
}
