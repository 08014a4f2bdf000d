//! The cache worker: the namespace over its backends, the metadata cache and the block cache,
//! answering [`CacheApi`] calls. The same value serves a FUSE client in the same process and,
//! through [`crate::grpc`], remote clients.

use crate::backend::{Backend, BackendError};
use crate::blocks::Tier;
use crate::blocks::{BlockCache, CacheOpenError};
use crate::config::Settings;
use crate::dataset_api::{Caller, DatasetApi, DatasetStatus, member_ids};
use crate::datasets::{Datasets, Source};
use crate::listing::{Listing, ListingCache};

/// Directory entries the listing cache keeps at most (a few hundred bytes each): a walk of
/// millions of files does not keep them all.
const LISTED_ENTRIES: usize = 250_000;
use crate::registry::Registry;
use bytes::Bytes;
use granary_core::placement::ask_order;
use granary_core::{BlockKey, BlockSize, ObjectId, Resolved};
use granary_net::membership::{MemberInfo, Membership};
use granary_net::quic::BlockClient;
use granary_proto::{
    ApiError, Block, CacheApi, Entry, EntryKind, Info, NodeStats, ObjectRef, Origin,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Cache(#[from] CacheOpenError),
    #[error("dataset store: {0}")]
    Datasets(ApiError),
}

/// What a worker needs to take part in a cluster.
pub struct Cluster {
    pub membership: Membership,
    /// etcd, when the cluster's members and pins live there.
    pub etcd: Option<granary_net::membership::Etcd>,
    pub peers: BlockClient,
    pub replicas: usize,
    pub peer_timeout: Duration,
}

/// Block reads served, by tier: (reads, bytes) for memory, disk, backend, peer.
#[derive(Default)]
struct Served([(AtomicU64, AtomicU64); 4]);

impl Served {
    fn record(&self, tier: Tier, bytes: usize) {
        let i = match tier {
            Tier::Memory => 0,
            Tier::Disk => 1,
            Tier::Backend => 2,
            Tier::Peer => 3,
        };
        self.0[i].0.fetch_add(1, Ordering::Relaxed);
        self.0[i].1.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn get(&self, i: usize) -> (u64, u64) {
        (
            self.0[i].0.load(Ordering::Relaxed),
            self.0[i].1.load(Ordering::Relaxed),
        )
    }
}

pub struct Worker {
    settings: Settings,
    cluster: Option<Cluster>,
    served: Served,
    backends: Vec<Arc<Backend>>,
    listings: ListingCache,
    blocks: BlockCache,
    datasets: Arc<Datasets>,
    dataset_api: DatasetApi,
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
        Self::start_with(settings, None).await
    }

    /// Like [`Worker::start`], as a member of `cluster`.
    pub async fn start_with(
        settings: Settings,
        cluster: Option<Cluster>,
    ) -> Result<Arc<Self>, StartError> {
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
        let root = settings.cache.dir.join("datasets");
        let registry = match cluster.as_ref().and_then(|c| c.etcd.as_ref()) {
            Some(etcd) => Registry::etcd(etcd).await,
            None => Registry::local(root.join("pins")),
        }
        .map_err(StartError::Datasets)?;
        let datasets = Arc::new(
            Datasets::open(
                settings.node_id.clone(),
                root,
                settings.cache.block_size,
                settings.datasets.clone(),
                registry,
            )
            .map_err(StartError::Datasets)?,
        );
        if let Err(e) = datasets.refresh().await {
            tracing::warn!(error = %e, "cannot read the pins yet; the dataset loop keeps trying");
        }
        if let Some(cluster) = &cluster {
            share_backend_limits(cluster.membership.clone(), backends.clone());
        }
        let blocks = BlockCache::open(&settings.cache).await?;
        let started_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let dataset_api = DatasetApi::new(
            datasets.clone(),
            &settings,
            backends.iter().map(|b| b.id().to_string()).collect(),
            cluster.as_ref().map(|c| c.membership.clone()),
            started_ns,
        );
        Ok(Arc::new(Worker {
            listings: ListingCache::new(settings.metadata_ttl, 100_000, LISTED_ENTRIES),
            settings,
            cluster,
            served: Served::default(),
            backends,
            blocks,
            datasets,
            dataset_api,
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
            pinned: false,
            owner: None,
        }
    }

    /// Lists one directory of a backend, as entries.
    async fn list_backend(&self, mount: usize, key: &str) -> Result<Listing, ApiError> {
        let backend = &self.backends[mount];
        let raw = backend.list(key).await?;
        let entries = raw
            .into_iter()
            // (The backend leaves out keys that cannot be paths.)
            .map(|r| {
                if r.dir {
                    return Entry {
                        owner: r.owner,
                        ..self.dir_entry(&r.name)
                    };
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
                    pinned: false,
                    owner: r.owner,
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
        if let Err(e) = granary_core::keys::check_key(&object.id.key) {
            return Err(ApiError::Invalid(format!(
                "invalid object key {:?}: {e}",
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

fn split_parent(key: &str) -> (&str, &str) {
    key.rsplit_once('/').unwrap_or(("", key))
}

impl CacheApi for Worker {
    fn dataset_store(&self) -> Option<std::path::PathBuf> {
        std::path::absolute(self.settings.cache.dir.join("datasets")).ok()
    }

    fn info(&self) -> Info {
        Info {
            node_id: self.settings.node_id.clone(),
            block_size: self.settings.cache.block_size,
            memory_capacity: self.settings.cache.memory.bytes(),
            disk_capacity: self.settings.cache.disk.bytes(),
            stats: self.stats(),
        }
    }

    async fn stat(&self, path: &str) -> Result<Entry, ApiError> {
        if let Some(entry) = self.dataset_api.pinned_stat(path) {
            return entry;
        }
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
        if let Some(entries) = self.dataset_api.pinned_list(path) {
            return entries;
        }
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
        let key = BlockKey::new(object.id.fingerprint(), index);
        if let Some(cluster) = &self.cluster {
            let view = cluster.membership.view();
            let owners = ask_order(key, &view.members, cluster.replicas, None).owners;
            if !owners.is_empty() && !owners.iter().any(|m| m.node_id == self.settings.node_id) {
                let owners = owners.into_iter().cloned().collect();
                let fetch = fetch_from_owners(cluster, owners, object, index);
                match self.blocks.get_or_fetch_remote(key, fetch).await {
                    Ok((block, tier)) => return Ok(self.serve(block, tier)),
                    Err(e) if e.worth_retrying_elsewhere() => {
                        // No owner answered: read it ourselves rather than fail the reader.
                        tracing::warn!(error = %e, "no owner served the block; reading it here");
                    }
                    Err(definitive) => return Err(definitive),
                }
            }
        }
        self.read_local(backend, object, key, index).await
    }

    async fn read_range(
        &self,
        object: &ObjectRef,
        index: u64,
        range: std::ops::Range<u64>,
    ) -> Result<(Bytes, Origin), ApiError> {
        let backend = self.check_ref(object, index)?;
        let key = BlockKey::new(object.id.fingerprint(), index);
        let bs: BlockSize = self.settings.cache.block_size;
        let block = bs.range(index, object.id.size);
        let whole_block = || async {
            let b = self.read_block(object, index).await?;
            granary_proto::slice_block(&b.data, &range).map(|d| (d, b.origin))
        };
        // Blocks owned by other workers, and pinned files, are read whole as before.
        if let Some(cluster) = &self.cluster {
            let view = cluster.membership.view();
            let owners = ask_order(key, &view.members, cluster.replicas, None).owners;
            if !owners.is_empty() && !owners.iter().any(|m| m.node_id == self.settings.node_id) {
                return whole_block().await;
            }
        }
        if self.datasets.held(object).is_some() || !self.datasets.holders_of(object).is_empty() {
            return whole_block().await;
        }
        let (data, tier) = self
            .blocks
            .read_range(key, block.end - block.start, range, |span| {
                let backend = backend.clone();
                let id = object.id.clone();
                let span = block.start + span.start..block.start + span.end;
                async move {
                    backend
                        .get_range(&id.key, span, id.etag.as_deref(), id.version.as_deref())
                        .await
                }
            })
            .await?;
        self.served.record(tier, data.len());
        Ok((data, tier.origin().unwrap_or_default()))
    }

    async fn prefetch(&self, object: &ObjectRef, index: u64) -> Result<(), ApiError> {
        let backend = self.check_ref(object, index)?;
        let key = BlockKey::new(object.id.fingerprint(), index);
        let owned_elsewhere = self.cluster.as_ref().is_some_and(|cluster| {
            let view = cluster.membership.view();
            let owners = ask_order(key, &view.members, cluster.replicas, None).owners;
            !owners.is_empty() && !owners.iter().any(|m| m.node_id == self.settings.node_id)
        });
        if owned_elsewhere || self.datasets.held(object).is_some() {
            // The owner's cache (or the dataset store) serves it; nothing to bring here.
            return self.read_block(object, index).await.map(drop);
        }
        let range = self.settings.cache.block_size.range(index, object.id.size);
        self.blocks
            .prefetch(key, fetch_block(backend, object, range))
            .await
            .map(drop)
    }

    async fn read_held_block(&self, object: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        self.check_ref(object, index)?;
        if let Some(file) = self.datasets.held(object)
            && let Some(data) = self.datasets.read_block(&file, index).await
        {
            return Ok(self.serve(Block::new(data), Tier::Disk));
        }
        let key = BlockKey::new(object.id.fingerprint(), index);
        match self.blocks.get_cached(key).await {
            Some((block, tier)) => Ok(self.serve(block, tier)),
            None => Err(ApiError::NotFound(format!(
                "block {index} of {} is not held here",
                object.id.key
            ))),
        }
    }

    async fn pins_epoch(&self) -> Result<Option<u64>, ApiError> {
        Ok(Some(self.datasets.pins_epoch()))
    }

    async fn local_copy(&self, object: &ObjectRef) -> Result<Option<std::path::PathBuf>, ApiError> {
        Ok(self.datasets.held(object).map(|f| f.path.clone()))
    }
}

impl Worker {
    /// Serves a block from this worker's cache or backend, never forwarding (what owners do for
    /// their peers, so that views that disagree for a moment cannot bounce a read around).
    pub async fn read_block_local(
        &self,
        object: &ObjectRef,
        index: u64,
    ) -> Result<Block, ApiError> {
        let backend = self.check_ref(object, index)?;
        let key = BlockKey::new(object.id.fingerprint(), index);
        self.read_local(backend, object, key, index).await
    }

    /// The block from this node's cache tiers or, on a miss, its backend. The caller has checked
    /// the reference (`check_ref`) and computed its key.
    async fn read_local(
        &self,
        backend: &Arc<Backend>,
        object: &ObjectRef,
        key: BlockKey,
        index: u64,
    ) -> Result<Block, ApiError> {
        // A pinned file: from this node's dataset store, else from a node that holds it.
        if let Some(file) = self.datasets.held(object)
            && let Some(data) = self.datasets.read_block(&file, index).await
        {
            return Ok(self.serve(Block::new(data), Tier::Disk));
        }
        if let Some(block) = self.read_from_dataset_holders(object, index).await {
            return Ok(block);
        }
        let bs: BlockSize = self.settings.cache.block_size;
        let range = bs.range(index, object.id.size);
        let (block, tier) = self
            .blocks
            .get_or_fetch(key, fetch_block(backend, object, range))
            .await?;
        Ok(self.serve(block, tier))
    }

    /// Counts a block served from `tier` and tells the client where it came from (a peer's
    /// block keeps the origin the peer reported).
    fn serve(&self, block: Block, tier: Tier) -> Block {
        self.served.record(tier, block.data.len());
        match tier.origin() {
            Some(origin) => block.with_origin(origin),
            None => block,
        }
    }

    /// Block `index` of a pinned file from a node whose dataset store holds it, when this node
    /// does not.
    async fn read_from_dataset_holders(&self, object: &ObjectRef, index: u64) -> Option<Block> {
        let cluster = self.cluster.as_ref()?;
        let holders = self.datasets.holders_of(object);
        if holders.is_empty() || holders.contains(&self.settings.node_id) {
            return None;
        }
        let view = cluster.membership.view();
        for holder in holders {
            let Some(member) = view.members.iter().find(|m| m.node_id == holder) else {
                continue;
            };
            let read = cluster.peers.read_held_block(
                member.data_addr,
                &member.node_id,
                object,
                index,
                cluster.peer_timeout,
            );
            if let Ok(block) = read.await {
                return Some(self.serve(block, Tier::Peer));
            }
        }
        None
    }

    /// The cluster's membership as this worker sees it (`None` outside a cluster).
    pub fn membership(&self) -> Option<Arc<granary_net::membership::View>> {
        self.cluster.as_ref().map(|c| c.membership.view())
    }

    pub fn datasets(&self) -> &Arc<Datasets> {
        &self.datasets
    }

    /// The dataset control API (pin, load, unpin, status, list, verify).
    pub fn dataset_api(&self) -> &DatasetApi {
        &self.dataset_api
    }

    /// The pins `caller` may see, with their status (see [`DatasetApi::list_datasets`]).
    pub async fn list_datasets(&self, caller: &Caller) -> Result<Vec<DatasetStatus>, ApiError> {
        self.dataset_api.list_datasets(caller).await
    }

    /// What this worker has served, its memory use and its view of the cluster.
    pub fn stats(&self) -> NodeStats {
        let (epoch, members) = match &self.cluster {
            Some(c) => {
                let v = c.membership.view();
                (v.epoch, v.members.len() as u32)
            }
            None => (0, 1),
        };
        let [m, d, b, p] = [0, 1, 2, 3].map(|i| self.served.get(i));
        NodeStats {
            memory_used: self.blocks.memory_used(),
            membership_epoch: epoch,
            members,
            reads_memory: m.0,
            reads_disk: d.0,
            reads_backend: b.0,
            reads_peer: p.0,
            bytes_memory: m.1,
            bytes_disk: d.1,
            bytes_backend: b.1,
            bytes_peer: p.1,
        }
    }
}

/// The block cache's fetch of `range` of `object` from its backend (called again if the
/// cache must refetch).
fn fetch_block(
    backend: &Arc<Backend>,
    object: &ObjectRef,
    range: std::ops::Range<u64>,
) -> impl Fn() -> futures::future::BoxFuture<'static, Result<Block, ApiError>> {
    let (backend, id) = (backend.clone(), object.id.clone());
    move || {
        let (backend, id, range) = (backend.clone(), id.clone(), range.clone());
        Box::pin(async move {
            let data = backend
                .get_range(&id.key, range, id.etag.as_deref(), id.version.as_deref())
                .await?;
            Ok(Block::new(data))
        })
    }
}

/// Keeps each backend's share of the cluster-wide limits: 1/N for N live members, redivided
/// whenever the membership changes (every member sees the same view, so the shares add up).
fn share_backend_limits(mut membership: Membership, backends: Vec<Arc<Backend>>) {
    tokio::spawn(async move {
        loop {
            let members = membership.view().members.len();
            for backend in &backends {
                backend.set_members(members);
            }
            tracing::debug!(members, "backend limits shared");
            if !membership.changed().await {
                return;
            }
        }
    });
}

/// The fetch of block `index` of `object` from its `owners` in turn (the next when one does not
/// answer), for [`BlockCache::get_or_fetch_remote`].
fn fetch_from_owners(
    cluster: &Cluster,
    owners: Vec<MemberInfo>,
    object: &ObjectRef,
    index: u64,
) -> impl Fn() -> futures::future::BoxFuture<'static, Result<Block, ApiError>> {
    let (peers, timeout, object) = (cluster.peers.clone(), cluster.peer_timeout, object.clone());
    move || {
        let (peers, owners, object) = (peers.clone(), owners.clone(), object.clone());
        Box::pin(async move {
            let mut last = ApiError::Unavailable("the block has no owner".into());
            for owner in &owners {
                let read =
                    peers.read_block(owner.data_addr, &owner.node_id, &object, index, timeout);
                match read.await {
                    Err(e) if e.worth_retrying_elsewhere() => {
                        tracing::warn!(owner = %owner.node_id, error = %e, "owner did not serve the block; trying the next");
                        last = e;
                    }
                    result => return result,
                }
            }
            Err(last)
        })
    }
}

/// A worker as its peers see it: block reads are served locally, never forwarded.
pub struct LocalReads(pub Arc<Worker>);

impl CacheApi for LocalReads {
    fn dataset_store(&self) -> Option<std::path::PathBuf> {
        self.0.dataset_store()
    }

    fn info(&self) -> Info {
        self.0.info()
    }

    async fn stat(&self, path: &str) -> Result<Entry, ApiError> {
        self.0.stat(path).await
    }

    async fn list(&self, path: &str) -> Result<Arc<Vec<Entry>>, ApiError> {
        self.0.list(path).await
    }

    async fn read_block(&self, object: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        served_to_peer("block", self.0.read_block_local(object, index).await)
    }

    async fn read_held_block(&self, object: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        served_to_peer("held", self.0.read_held_block(object, index).await)
    }

    async fn pins_epoch(&self) -> Result<Option<u64>, ApiError> {
        self.0.pins_epoch().await
    }
}

/// Counts a block read answered over the data plane.
fn served_to_peer(kind: &'static str, result: Result<Block, ApiError>) -> Result<Block, ApiError> {
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!(granary_core::metrics::PEER_BLOCKS_SERVED, "kind" => kind, "result" => outcome)
        .increment(1);
    result
}

impl Source for Worker {
    async fn backend_range_to(
        &self,
        object: &ObjectRef,
        range: std::ops::Range<u64>,
        sink: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<(), ApiError> {
        let backend = self.check_ref(object, 0)?;
        backend
            .get_range_to(
                &object.id.key,
                range,
                object.id.etag.as_deref(),
                object.id.version.as_deref(),
                sink,
            )
            .await
    }

    async fn peer_held_block(
        &self,
        node: &str,
        object: &ObjectRef,
        index: u64,
    ) -> Result<bytes::Bytes, ApiError> {
        let cluster = self
            .cluster
            .as_ref()
            .ok_or_else(|| ApiError::Unavailable("no cluster".into()))?;
        let view = cluster.membership.view();
        let member = view
            .members
            .iter()
            .find(|m| m.node_id == node)
            .ok_or_else(|| ApiError::Unavailable(format!("{node} is not a live member")))?;
        let block = cluster
            .peers
            .read_held_block(
                member.data_addr,
                &member.node_id,
                object,
                index,
                cluster.peer_timeout,
            )
            .await?;
        Ok(block.data)
    }

    fn members(&self) -> Vec<String> {
        member_ids(
            self.cluster.as_ref().map(|c| &c.membership),
            &self.settings.node_id,
        )
    }
}

/// What a pin walks: the namespace as this worker serves it. (Not imported: in this file `stat`
/// and `list` are [`CacheApi`]'s.)
impl crate::dataset_api::NamespaceView for Worker {
    async fn stat(&self, path: &str) -> Result<Entry, ApiError> {
        CacheApi::stat(self, path).await
    }

    async fn list(&self, path: &str) -> Result<Arc<Vec<Entry>>, ApiError> {
        CacheApi::list(self, path).await
    }
}
