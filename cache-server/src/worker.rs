//! The cache worker: the namespace over its backends, the metadata cache and the block cache,
//! answering [`CacheApi`] calls. The same value serves a FUSE client in the same process and,
//! through [`crate::grpc`], remote clients.

use crate::backend::{Backend, BackendError};
use crate::blocks::{BlockCache, CacheOpenError};
use crate::config::Settings;
use crate::listing::{Listing, ListingCache};
use granary_core::namespace::components;
use granary_core::{BlockKey, BlockSize, ObjectId, Resolved};
use granary_proto::{ApiError, Block, CacheApi, Entry, EntryKind, Info, ObjectRef};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Cache(#[from] CacheOpenError),
}

pub struct Worker {
    settings: Settings,
    backends: Vec<Arc<Backend>>,
    listings: ListingCache,
    blocks: BlockCache,
    started_ns: i64,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("node_id", &self.settings.node_id)
            .finish_non_exhaustive()
    }
}

/// How long startup waits for each backend to answer its first listing.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

impl Worker {
    /// Builds the backends, checks that each answers, and opens the block cache.
    pub async fn start(settings: Settings) -> Result<Arc<Self>, StartError> {
        let mut backends = Vec::new();
        for mount in settings.namespace.mounts() {
            backends.push(Arc::new(Backend::new(
                &mount.source,
                &settings.s3,
                &settings.backend,
            )?));
        }
        let probes = backends.iter().map(|b| b.probe(PROBE_TIMEOUT));
        for result in futures::future::join_all(probes).await {
            result?;
        }
        let blocks = BlockCache::open(&settings.cache).await?;
        let started_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        Ok(Arc::new(Worker {
            listings: ListingCache::new(settings.metadata_ttl, 100_000),
            settings,
            backends,
            blocks,
            started_ns,
        }))
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub async fn close(&self) {
        self.blocks.close().await;
    }

    fn dir_entry(&self, name: &str) -> Entry {
        Entry {
            name: name.to_string(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: self.started_ns,
            object: None,
        }
    }

    /// Lists one directory of a backend, as entries.
    async fn list_backend(&self, mount: usize, key: &str) -> Result<Listing, ApiError> {
        let backend = &self.backends[mount];
        let raw = backend.list(key).await?;
        let entries = raw
            .into_iter()
            .filter(|r| valid_name(&r.name))
            .map(|r| {
                if r.dir {
                    return self.dir_entry(&r.name);
                }
                let id = ObjectId {
                    backend: backend.id().to_string(),
                    key: r.key,
                    size: r.size,
                    etag: r.etag,
                    version: r.version,
                    mtime_ns: r.mtime_ns,
                };
                Entry {
                    name: r.name,
                    kind: EntryKind::File,
                    size: r.size,
                    mtime_ns: r.mtime_ns,
                    object: Some(ObjectRef {
                        mount: mount as u32,
                        id,
                    }),
                }
            })
            .collect();
        Ok(Listing::new(entries))
    }

    async fn listing(&self, mount: usize, key: &str) -> Result<Arc<Listing>, ApiError> {
        self.listings
            .get_or_list(mount, key, || self.list_backend(mount, key))
            .await
    }

    /// Checks that a client-supplied object reference names an object this worker serves.
    fn check_ref(&self, object: &ObjectRef, index: u64) -> Result<&Arc<Backend>, ApiError> {
        let backend = self
            .backends
            .get(object.mount as usize)
            .filter(|b| b.id() == object.id.backend)
            .ok_or_else(|| {
                ApiError::Invalid(format!(
                    "object {:?} names mount {} of backend {:?}, which this worker does not serve",
                    object.id.key, object.mount, object.id.backend
                ))
            })?;
        if object.id.key.is_empty() || components(&format!("/{}", object.id.key)).is_none() {
            return Err(ApiError::Invalid(format!(
                "invalid object key {:?}",
                object.id.key
            )));
        }
        let count = self.settings.cache.block_size.count(object.id.size);
        if index >= count {
            return Err(ApiError::Invalid(format!(
                "block {index} is past the end of {:?} ({} bytes, {count} blocks)",
                object.id.key, object.id.size
            )));
        }
        Ok(backend)
    }
}

/// Names the filesystem can show: not empty, not `.`/`..`, no NUL.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('\0')
}

fn split_parent(key: &str) -> (&str, &str) {
    key.rsplit_once('/').unwrap_or(("", key))
}

impl CacheApi for Worker {
    fn info(&self) -> Info {
        Info {
            node_id: self.settings.node_id.clone(),
            block_size: self.settings.cache.block_size,
            memory_capacity: self.settings.cache.memory.bytes(),
            disk_capacity: self.settings.cache.disk.bytes(),
        }
    }

    async fn stat(&self, path: &str) -> Result<Entry, ApiError> {
        let resolved = self
            .settings
            .namespace
            .resolve(path)
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        let name = path.rsplit('/').next().unwrap_or("");
        match resolved {
            Resolved::NotFound => Err(ApiError::NotFound(path.to_string())),
            Resolved::Synthetic { .. } => Ok(self.dir_entry(name)),
            Resolved::Mount { key, .. } if key.is_empty() => Ok(self.dir_entry(name)),
            Resolved::Mount { mount, key, .. } => {
                let (parent, base) = split_parent(&key);
                let listing = self.listing(mount, parent).await?;
                listing
                    .get(base)
                    .cloned()
                    .ok_or_else(|| ApiError::NotFound(path.to_string()))
            }
        }
    }

    async fn list(&self, path: &str) -> Result<Arc<Vec<Entry>>, ApiError> {
        let resolved = self
            .settings
            .namespace
            .resolve(path)
            .map_err(|e| ApiError::Invalid(e.to_string()))?;
        match resolved {
            Resolved::NotFound => Err(ApiError::NotFound(path.to_string())),
            Resolved::Synthetic { children } => Ok(Arc::new(
                children.iter().map(|c| self.dir_entry(c)).collect(),
            )),
            Resolved::Mount { mount, key, .. } => {
                let listing = self.listing(mount, &key).await?;
                if listing.entries.is_empty() && !key.is_empty() {
                    // An empty listing: an empty directory, a file, or nothing at all.
                    match self.stat(path).await?.kind {
                        EntryKind::File => return Err(ApiError::NotADirectory(path.to_string())),
                        EntryKind::Dir => {}
                    }
                }
                Ok(listing.entries.clone())
            }
        }
    }

    async fn read_block(&self, object: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        let backend = self.check_ref(object, index)?;
        let bs: BlockSize = self.settings.cache.block_size;
        let key = BlockKey::new(object.id.fingerprint(), index);
        let range = bs.range(index, object.id.size);
        let (block, _tier) = self
            .blocks
            .get_or_fetch(key, || {
                let backend = backend.clone();
                let id = object.id.clone();
                let range = range.clone();
                async move {
                    let data = backend
                        .get_range(&id.key, range, id.etag.as_deref(), id.version.as_deref())
                        .await?;
                    Ok(Block::new(data))
                }
            })
            .await?;
        Ok(block)
    }
}
