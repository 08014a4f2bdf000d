//! The metric catalogue: every metric Granary exports is named here once (docs/METRICS.md lists
//! them with units and labels). Labels stay low-cardinality.

/// Block reads served, by `tier`: `memory`, `disk` (cache hits) or `backend` (a miss fetched
/// from the source). Counter, requests.
pub const BLOCK_READS: &str = "granary_block_reads_total";
/// Bytes of block reads served, by `tier` (as above). Counter, bytes.
pub const BLOCK_READ_BYTES: &str = "granary_block_read_bytes_total";
/// Requests sent to a backend, by `op` (`get`, `list`) and `outcome` (`ok`, `error`). Counter.
pub const BACKEND_REQUESTS: &str = "granary_backend_requests_total";
/// Backend request latency, by `op`. Histogram, seconds.
pub const BACKEND_REQUEST_SECONDS: &str = "granary_backend_request_seconds";
/// Bytes received from backends. Counter, bytes.
pub const BACKEND_BYTES: &str = "granary_backend_bytes_total";
/// A backend's request limit as this worker applies it (its share of a cluster-wide limit), by
/// `backend` and `limit` (`concurrency`, `requests_per_second`). Gauge.
pub const BACKEND_LIMIT: &str = "granary_backend_limit";
/// Keys left out of listings because they cannot be a path (an empty, `.` or `..` segment, a
/// control character, a POSIX name that is not UTF-8), by `reason`. Counter, keys.
pub const BACKEND_KEYS_SKIPPED: &str = "granary_backend_keys_skipped_total";
/// Records read from etcd and ignored (malformed, out of range, or not signed by the node they
/// name), by `kind` (`member`, `pin`, `progress`). Counter.
pub const ETCD_RECORDS_REFUSED: &str = "granary_etcd_records_refused_total";
/// RPCs refused before they ran because the caller lacked the credential they need, by
/// `method` and `reason`. Counter.
pub const RPC_REFUSED: &str = "granary_rpc_refused_total";
/// Node certificate requests the signer decided, by `decision` (`issued`, `denied`, `failed`)
/// and `reason` (the condition's reason: `granted`, `WrongNode`, `NotWorkerAccount`, ...). Counter.
pub const CSR_DECISIONS: &str = "granary_csr_decisions_total";
/// Blocks whose checksum did not match (dropped and refetched). Counter.
pub const BLOCK_CHECKSUM_FAILURES: &str = "granary_block_checksum_failures_total";
/// Metadata (stat/list) lookups, by `result`: `hit` (served from the TTL cache) or `miss`. Counter.
pub const METADATA_LOOKUPS: &str = "granary_metadata_lookups_total";
/// FUSE operations, by `op` and `outcome` (`ok` or an errno name). Counter.
pub const FUSE_OPS: &str = "granary_fuse_ops_total";
/// FUSE operation latency, by `op`. Histogram, seconds.
pub const FUSE_OP_SECONDS: &str = "granary_fuse_op_seconds";
/// ioctls the mount answered ENOTTY (it implements none; `isatty()` on every buffered Python
/// `open()` sends one). Counter, requests.
pub const FUSE_UNSUPPORTED_IOCTLS: &str = "granary_fuse_unsupported_ioctls_total";
/// Bytes returned to FUSE readers. Counter, bytes.
pub const FUSE_READ_BYTES: &str = "granary_fuse_read_bytes_total";
/// Opens answered with kernel passthrough to a local copy (its reads never reach Granary).
/// Counter, opens.
pub const FUSE_PASSTHROUGH_OPENS: &str = "granary_fuse_passthrough_opens_total";
/// Local copies a worker named that a client refused to open (not a regular file beneath that
/// worker's dataset store): read through the worker instead. Counter, files; label `reason`.
pub const FUSE_LOCAL_COPIES_REFUSED: &str = "granary_fuse_local_copies_refused_total";
/// Per-CPU io_uring queues taking this mount's kernel requests (FUSE over io_uring); 0 when they
/// go through `/dev/fuse`. Gauge, queues.
pub const FUSE_IO_URING_QUEUES: &str = "granary_fuse_io_uring_queues";
/// 1 while the mount knows the worker's pins epoch, so that pinned entries are trusted and
/// kept by the kernel for the pinned TTL; 0 otherwise (attribute TTL). Gauge.
pub const FUSE_PINS_EPOCH_KNOWN: &str = "granary_fuse_pins_epoch_known";
/// Entries the mount told the kernel to drop because the pins epoch they were kept under
/// ended. Counter, entries.
pub const FUSE_KERNEL_INVALIDATIONS: &str = "granary_fuse_kernel_invalidations_total";
/// Reads that waited for blocks not fetched yet, and how long (data stall; the sum is the total
/// stall time), by `dataset` (the namespace's top directory) and `training_job` (the mount's `--job`).
/// Histogram, seconds.
pub const FUSE_STALL_SECONDS: &str = "granary_fuse_stall_seconds";
/// Blocks a FUSE client fetched for its readers, by `origin` (where the worker found each:
/// `memory`, `disk`, `backend`, `unknown`), `dataset` and `training_job` (as the stall metric).
/// Counter, blocks.
pub const FUSE_BLOCKS: &str = "granary_fuse_blocks_total";
/// Bytes of those blocks, by the same labels. Counter, bytes.
pub const FUSE_BLOCK_BYTES: &str = "granary_fuse_block_bytes_total";
/// Gauge: bytes of the mount's journal (what the kernel holds, for the next server).
pub const FUSE_JOURNAL_BYTES: &str = "granary_fuse_journal_bytes";
/// Counter, label `reason` (`crash`, `upgrade`): FUSE servers that took the kernel connection
/// over from an earlier one (the keeper's count, as this server was told it).
pub const FUSE_HANDOVERS: &str = "granary_fuse_handovers_total";
/// Gauge: entries rebuilt from the journal by this server (label `kind`: inode, file, dir).
pub const FUSE_REBUILT: &str = "granary_fuse_rebuilt_entries";
/// Inodes the FUSE client keeps for the kernel. Gauge.
pub const FUSE_INODES: &str = "granary_fuse_inodes";
/// Entries the FUSE client asked the kernel to drop because its inode table was full. Counter.
pub const FUSE_INODES_SHED: &str = "granary_fuse_inodes_shed_total";
/// Bytes of hinted files fetched (or being fetched) ahead of the job that gave the hint (at most
/// the mount's hint budget). Gauge, bytes.
pub const FUSE_HINT_AHEAD_BYTES: &str = "granary_fuse_hint_ahead_bytes";
/// Blocks of hinted files brought into the worker's memory tier ahead of the job. Counter.
pub const FUSE_HINT_BLOCKS: &str = "granary_fuse_hint_blocks_total";
/// Bytes currently held by readahead across all open files. Gauge, bytes.
pub const READAHEAD_BYTES: &str = "granary_readahead_bytes";
/// Configured capacity of a cache tier, by `tier` (`memory`, `disk`). Gauge, bytes.
pub const CACHE_CAPACITY_BYTES: &str = "granary_cache_capacity_bytes";
/// Bytes a cache tier holds, by `tier` (`memory`, `disk`). Gauge, bytes.
pub const CACHE_USED_BYTES: &str = "granary_cache_used_bytes";
/// Blocks offered to a full cache tier and what the policy decided, by `tier` and `result`
/// (`admitted`, `rejected`). Counter, blocks.
pub const CACHE_ADMISSIONS: &str = "granary_cache_admissions_total";
/// Blocks a cache tier gave up to make room, by `tier`. Counter, blocks.
pub const CACHE_EVICTIONS: &str = "granary_cache_evictions_total";
/// Bytes queued for writing to the disk tier (at most 32 MiB; a reader offering more waits).
/// Gauge, bytes.
pub const CACHE_WRITE_QUEUE_BYTES: &str = "granary_cache_write_queue_bytes";
/// gRPC requests served by the worker, by `method` and `code`. Counter.
pub const RPC_REQUESTS: &str = "granary_rpc_requests_total";
/// Block reads this worker answered for other processes over the QUIC data plane, by `kind`
/// (`block`: fetched if need be, `held`: only if held) and `result` (`ok`, `error`). Counter.
pub const PEER_BLOCKS_SERVED: &str = "granary_peer_blocks_served_total";

/// Bytes of pinned datasets written to this node's dataset store by loads. Counter, bytes.
pub const DATASET_LOADED_BYTES: &str = "granary_dataset_loaded_bytes_total";
/// Bytes of a dataset this node holds, verified, by `dataset`. Gauge, bytes.
pub const DATASET_READY_BYTES: &str = "granary_dataset_ready_bytes";
/// Bytes of a dataset this node is to hold, by `dataset`. Gauge, bytes.
pub const DATASET_WANTED_BYTES: &str = "granary_dataset_wanted_bytes";

/// Scheduler hook requests, by `verb` (`filter`, `prioritize`, `bind`, `preempt`) and
/// `outcome` (`ok`, `error`: the verb's Error field was set, `bad_request`: HTTP 400). Counter.
pub const SCHEDULER_REQUESTS: &str = "granary_scheduler_requests_total";
/// Scheduler hook request latency, by `verb`. Histogram, seconds.
pub const SCHEDULER_REQUEST_SECONDS: &str = "granary_scheduler_request_seconds";
/// Gangs the scheduler hook tracks, by `state` (`waiting-for-members`, `unschedulable`,
/// `warming`, `ready`, `bound`). Gauge.
pub const SCHEDULER_GANGS: &str = "granary_scheduler_gangs";
/// Time from a gang's last member appearing to its release for binding (placed and data
/// ready). Histogram, seconds.
pub const SCHEDULER_GANG_WAIT_SECONDS: &str = "granary_scheduler_gang_wait_seconds";

/// Every name above, for tests and docs.
pub const ALL: &[&str] = &[
    BLOCK_READS,
    BLOCK_READ_BYTES,
    BACKEND_REQUESTS,
    BACKEND_REQUEST_SECONDS,
    BACKEND_BYTES,
    BACKEND_KEYS_SKIPPED,
    BACKEND_LIMIT,
    ETCD_RECORDS_REFUSED,
    CSR_DECISIONS,
    RPC_REFUSED,
    BLOCK_CHECKSUM_FAILURES,
    METADATA_LOOKUPS,
    FUSE_OPS,
    FUSE_OP_SECONDS,
    FUSE_UNSUPPORTED_IOCTLS,
    FUSE_READ_BYTES,
    FUSE_PASSTHROUGH_OPENS,
    FUSE_LOCAL_COPIES_REFUSED,
    FUSE_IO_URING_QUEUES,
    FUSE_PINS_EPOCH_KNOWN,
    FUSE_KERNEL_INVALIDATIONS,
    FUSE_STALL_SECONDS,
    FUSE_BLOCKS,
    FUSE_BLOCK_BYTES,
    FUSE_JOURNAL_BYTES,
    FUSE_HANDOVERS,
    FUSE_REBUILT,
    FUSE_INODES,
    FUSE_INODES_SHED,
    FUSE_HINT_AHEAD_BYTES,
    FUSE_HINT_BLOCKS,
    READAHEAD_BYTES,
    CACHE_CAPACITY_BYTES,
    CACHE_USED_BYTES,
    CACHE_ADMISSIONS,
    CACHE_EVICTIONS,
    CACHE_WRITE_QUEUE_BYTES,
    RPC_REQUESTS,
    PEER_BLOCKS_SERVED,
    DATASET_LOADED_BYTES,
    DATASET_READY_BYTES,
    DATASET_WANTED_BYTES,
    SCHEDULER_REQUESTS,
    SCHEDULER_REQUEST_SECONDS,
    SCHEDULER_GANGS,
    SCHEDULER_GANG_WAIT_SECONDS,
];
