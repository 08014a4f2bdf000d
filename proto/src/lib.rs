//! Granary's wire types and the worker API: what crosses the network, and nothing that moves it
//! (that is `granary-net`).
//!
//! [`CacheApi`] is what a FUSE client needs from a cache worker: stat, list and block reads in
//! core types. A worker in the same process implements it directly (no network on the same
//! node); `granary_net::client::GrpcCache` implements it over gRPC for a remote worker, and the
//! worker's gRPC service (in `cache-server`) serves any `CacheApi` implementation. Errors cross
//! the wire through exactly one mapping each way ([`ApiError`] <-> `tonic::Status`). [`frame`] is
//! the QUIC block frames' codec; [`datasets`] the Datasets API's request and status types.

mod convert;
pub mod datasets;
pub mod frame;

use bytes::Bytes;
use granary_core::{BlockSize, ObjectId};
use std::future::Future;
use std::sync::Arc;

/// The generated gRPC types.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("granary.v1");
}

/// The Container Storage Interface's Identity and Node services (`proto/csi.proto`), for the
/// CSI node plugin.
pub mod csi {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// Largest gRPC message either side accepts: a 64 MiB block plus framing, or a large listing.
pub const MAX_MESSAGE_BYTES: usize = 80 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
}

/// A file as it was seen: which mount it came from and which version of the object it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub mount: u32,
    pub id: ObjectId,
}

/// One name in a directory, or the answer to a stat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime_ns: i64,
    /// Present for files.
    pub object: Option<ObjectRef>,
    /// Answered from a pinned dataset's frozen manifest: this version cannot change while the
    /// pin lasts, so a client may trust the entry for its attribute TTL without asking again on
    /// each open (outside pins a client asks on every open: close-to-open consistency).
    pub pinned: bool,
    /// Mode bits and owner (POSIX sources), shown as they are; `None`: read-only for all.
    pub owner: Option<Owner>,
}

pub use granary_core::keys::Owner;

/// A block's bytes and the CRC32C computed when it was fetched from the backend.
#[derive(Debug, Clone)]
pub struct Block {
    pub data: Bytes,
    pub crc32c: u32,
    /// Where the worker that holds the block found it (for clients' hit-ratio metrics).
    pub origin: Origin,
}

/// Where a worker found a block it served: a cache hit (memory, disk: the dataset store counts
/// as disk) or a miss fetched from the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    #[default]
    Unknown,
    Memory,
    Disk,
    Backend,
}

impl Origin {
    pub fn code(self) -> u8 {
        match self {
            Origin::Unknown => 0,
            Origin::Memory => 1,
            Origin::Disk => 2,
            Origin::Backend => 3,
        }
    }

    /// Unknown codes (a newer worker) read as `Unknown`.
    pub fn from_code(code: u8) -> Origin {
        match code {
            1 => Origin::Memory,
            2 => Origin::Disk,
            3 => Origin::Backend,
            _ => Origin::Unknown,
        }
    }

    /// The metric label: `memory`, `disk`, `backend` or `unknown`.
    pub fn label(self) -> &'static str {
        match self {
            Origin::Unknown => "unknown",
            Origin::Memory => "memory",
            Origin::Disk => "disk",
            Origin::Backend => "backend",
        }
    }
}

impl Block {
    pub fn new(data: Bytes) -> Self {
        let crc32c = granary_core::object::checksum(&data);
        Block {
            data,
            crc32c,
            origin: Origin::Unknown,
        }
    }

    pub fn with_origin(mut self, origin: Origin) -> Self {
        self.origin = origin;
        self
    }

    pub fn verify(&self) -> bool {
        granary_core::object::checksum(&self.data) == self.crc32c
    }
}

/// What a worker tells its clients about itself.
#[derive(Debug, Clone)]
pub struct Info {
    pub node_id: String,
    pub block_size: BlockSize,
    pub memory_capacity: u64,
    pub disk_capacity: u64,
    pub stats: NodeStats,
}

/// What a worker has served since it started: block reads (and bytes) by where they came from
/// (`peer` = fetched from the owning worker), memory in use, and its membership view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub memory_used: u64,
    pub membership_epoch: u64,
    pub members: u32,
    pub reads_memory: u64,
    pub reads_disk: u64,
    pub reads_backend: u64,
    pub reads_peer: u64,
    pub bytes_memory: u64,
    pub bytes_disk: u64,
    pub bytes_backend: u64,
    pub bytes_peer: u64,
}

impl NodeStats {
    /// Block reads served from this worker's own cache, over all block reads.
    pub fn hit_ratio(&self) -> Option<f64> {
        let total = self.reads_memory + self.reads_disk + self.reads_backend + self.reads_peer;
        (total > 0).then(|| (self.reads_memory + self.reads_disk) as f64 / total as f64)
    }
}

/// Errors of the worker API, by what the caller should do about them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("not a directory: {0}")]
    NotADirectory(String),
    /// The object changed in the backend since it was opened: reopen it.
    #[error("stale: {0}")]
    Stale(String),
    /// A backend or worker did not answer (in time): retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Data failed its checksum on arrival.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller's token is missing or wrong, or it may not touch this resource.
    #[error("permission denied: {0}")]
    Denied(String),
    /// Over a quota or a capacity.
    #[error("refused: {0}")]
    Exhausted(String),
}

impl ApiError {
    /// Whether another worker might answer where this one failed (it did not answer, sent
    /// damaged bytes or broke): the one failover rule of clients and workers. A definitive
    /// answer (not found, stale, invalid, denied) is the same from every worker.
    pub fn worth_retrying_elsewhere(&self) -> bool {
        matches!(
            self,
            ApiError::Unavailable(_) | ApiError::Corrupt(_) | ApiError::Internal(_)
        )
    }
}

/// `range` of a block's bytes, or `Invalid` if the block is too short for it.
pub fn slice_block(data: &Bytes, range: &std::ops::Range<u64>) -> Result<Bytes, ApiError> {
    if range.start > range.end || range.end > data.len() as u64 {
        return Err(ApiError::Invalid(format!(
            "range {range:?} of a block of {} bytes",
            data.len()
        )));
    }
    Ok(data.slice(range.start as usize..range.end as usize))
}

/// What a FUSE client needs from a cache worker.
pub trait CacheApi: Send + Sync + 'static {
    fn info(&self) -> Info;

    /// The entry at a namespace path (`/` is the root directory).
    fn stat(&self, path: &str) -> impl Future<Output = Result<Entry, ApiError>> + Send;

    /// The entries of the directory at a namespace path, sorted by name.
    fn list(&self, path: &str) -> impl Future<Output = Result<Arc<Vec<Entry>>, ApiError>> + Send;

    /// Block `index` of exactly the object version `object` names.
    fn read_block(
        &self,
        object: &ObjectRef,
        index: u64,
    ) -> impl Future<Output = Result<Block, ApiError>> + Send;

    /// Bytes `range` of block `index` (offsets within the block), with where they were found:
    /// what a random reader asks for. A worker reads from its disk tier, and fetches from the
    /// backend, only the parts of the block that cover the range; by default the whole block
    /// is read and sliced.
    fn read_range(
        &self,
        object: &ObjectRef,
        index: u64,
        range: std::ops::Range<u64>,
    ) -> impl Future<Output = Result<(Bytes, Origin), ApiError>> + Send {
        async move {
            let block = self.read_block(object, index).await?;
            slice_block(&block.data, &range).map(|data| (data, block.origin))
        }
    }

    /// Brings block `index` of `object` into the worker's memory tier ahead of a reader that
    /// said it will read it soon (a hint), even past the cache policy's frequency test. By
    /// default, a plain read whose bytes are dropped.
    fn prefetch(
        &self,
        object: &ObjectRef,
        index: u64,
    ) -> impl Future<Output = Result<(), ApiError>> + Send {
        async move { self.read_block(object, index).await.map(drop) }
    }

    /// Block `index` of `object` only when this node already holds it (`NotFound` otherwise),
    /// never fetching it from anywhere. An API with no cache of its own holds nothing.
    fn read_held_block(
        &self,
        object: &ObjectRef,
        index: u64,
    ) -> impl Future<Output = Result<Block, ApiError>> + Send {
        let _ = (object, index);
        std::future::ready(Err(ApiError::NotFound("no cache here".into())))
    }

    /// A path on this machine holding a verified whole copy of exactly this version of
    /// `object` (a pinned dataset's file), which a client on the same machine may open itself
    /// instead of reading blocks. `None` when there is none.
    fn local_copy(
        &self,
        object: &ObjectRef,
    ) -> impl Future<Output = Result<Option<std::path::PathBuf>, ApiError>> + Send {
        let _ = object;
        std::future::ready(Ok(None))
    }

    /// A number that changes whenever the pinned entries `stat` and `list` answer with may
    /// change (a pin made, released or lapsed). A client may trust a pinned entry it got while
    /// the number was `e` for as long as the number stays `e`; `None`: not tracked (trust a
    /// pinned entry for the attribute TTL only).
    fn pins_epoch(&self) -> impl Future<Output = Result<Option<u64>, ApiError>> + Send {
        std::future::ready(Ok(None))
    }

    /// The directory of this worker's dataset store, where every [`CacheApi::local_copy`] path
    /// lies; `None`: no store.
    fn dataset_store(&self) -> Option<std::path::PathBuf> {
        None
    }
}

impl<T: CacheApi> CacheApi for Arc<T> {
    fn info(&self) -> Info {
        (**self).info()
    }

    fn stat(&self, path: &str) -> impl Future<Output = Result<Entry, ApiError>> + Send {
        (**self).stat(path)
    }

    fn list(&self, path: &str) -> impl Future<Output = Result<Arc<Vec<Entry>>, ApiError>> + Send {
        (**self).list(path)
    }

    fn read_block(
        &self,
        object: &ObjectRef,
        index: u64,
    ) -> impl Future<Output = Result<Block, ApiError>> + Send {
        (**self).read_block(object, index)
    }

    fn read_range(
        &self,
        object: &ObjectRef,
        index: u64,
        range: std::ops::Range<u64>,
    ) -> impl Future<Output = Result<(Bytes, Origin), ApiError>> + Send {
        (**self).read_range(object, index, range)
    }

    fn prefetch(
        &self,
        object: &ObjectRef,
        index: u64,
    ) -> impl Future<Output = Result<(), ApiError>> + Send {
        (**self).prefetch(object, index)
    }

    fn read_held_block(
        &self,
        object: &ObjectRef,
        index: u64,
    ) -> impl Future<Output = Result<Block, ApiError>> + Send {
        (**self).read_held_block(object, index)
    }

    fn local_copy(
        &self,
        object: &ObjectRef,
    ) -> impl Future<Output = Result<Option<std::path::PathBuf>, ApiError>> + Send {
        (**self).local_copy(object)
    }

    fn pins_epoch(&self) -> impl Future<Output = Result<Option<u64>, ApiError>> + Send {
        (**self).pins_epoch()
    }

    fn dataset_store(&self) -> Option<std::path::PathBuf> {
        (**self).dataset_store()
    }
}
