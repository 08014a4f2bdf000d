//! Worker settings: plain data loaded from a TOML file (then overridden by flags in the CLI),
//! validated once into [`Settings`] before any component is built.
//!
//! ```toml
//! node_id = "node-a"
//! listen = "127.0.0.1:7070"
//! metrics_addr = "127.0.0.1:9464"
//! metadata_ttl = "30s"
//!
//! [cache]
//! dir = "/var/cache/granary"
//! memory = "1GiB"
//! disk = "16GiB"
//! block_size = "4MiB"
//!
//! [s3]                      # optional; AWS_* variables fill what is not set here
//! endpoint = "http://127.0.0.1:9000"
//! region = "us-east-1"
//!
//! [backend]
//! request_timeout = "20s"
//! max_concurrency = 64            # this worker's
//! cluster_max_concurrency = 256   # the cluster's, shared among the live members
//! max_requests_per_second = 500   # the cluster's, shared among the live members
//!
//! [[mount]]
//! path = "/imagenet"
//! source = "s3://bucket/imagenet"
//! ```

mod datasets;

use crate::dataset_api::Token;

use granary_core::{BlockSize, ByteSize, MountPoint, Namespace, SourceUri, parse_duration};
use granary_net::tls::TlsFiles;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub node_id: Option<String>,
    pub listen: Option<String>,
    pub metrics_addr: Option<String>,
    pub metadata_ttl: Option<String>,
    #[serde(default)]
    pub cache: CacheSection,
    #[serde(default)]
    pub s3: S3Section,
    #[serde(default)]
    pub backend: BackendSection,
    #[serde(default, rename = "mount")]
    pub mounts: Vec<MountSection>,
    pub cluster: Option<ClusterSection>,
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub datasets: DatasetsSection,
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantSection>,
    /// The node's FUSE mount, served by the worker in its own process.
    pub fuse: Option<FuseSection>,
}

/// The node's FUSE mount, served in the worker's process: blocks this node holds are read
/// without leaving it. Keys and defaults as the flags of `granary mount` (docs/CONFIGURATION.md);
/// checked by the CLI, which builds the mount.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FuseSection {
    /// Where to mount (an existing, empty directory); no mount without it.
    pub mount: Option<PathBuf>,
    pub readahead: Option<String>,
    pub readahead_total: Option<String>,
    /// [default: the worker's `metadata_ttl`]
    pub attr_ttl: Option<String>,
    pub pinned_ttl: Option<String>,
    /// Open pinned files with kernel FUSE passthrough [default: true].
    pub passthrough: Option<bool>,
    pub io_uring: Option<bool>,
    pub job: Option<String>,
    /// The CSI driver's pod records: reads by its pods carry their pods' jobs.
    pub pods_dir: Option<PathBuf>,
    pub allow_other: Option<bool>,
    pub auto_unmount: Option<bool>,
    /// Hold the mount in a keeper process that outlives the worker [default: true].
    pub keeper: Option<bool>,
    pub max_inodes: Option<usize>,
    pub max_handles: Option<usize>,
    pub hint_budget: Option<String>,
}

/// The dataset store (pinned datasets, kept whole on local disk apart from the block cache) and
/// who may pin.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetsSection {
    /// Bytes of pinned data this node may hold [default: 16GiB].
    pub capacity: Option<String>,
    /// Block reads in flight per dataset load on this node, and the most threads writing loaded
    /// files [default: 32].
    pub load_concurrency: Option<usize>,
    /// Threads that run this node's dataset loads, apart from the threads serving reads
    /// [default: a quarter of the CPUs, 1-4].
    pub load_threads: Option<usize>,
    /// The bearer token that may see and change every tenant's pins, inline (for development:
    /// keep tokens out of ConfigMaps), ...
    pub admin_token: Option<String>,
    /// ... or read from this file (a Kubernetes Secret volume), ...
    pub admin_token_file: Option<PathBuf>,
    /// ... or from this environment variable.
    pub admin_token_env: Option<String>,
    /// The scheduler hook's token: it may read every dataset's status and load pinned datasets,
    /// nothing else. Inline, from a file or from an environment variable, as the admin's.
    pub scheduler_token: Option<String>,
    pub scheduler_token_file: Option<PathBuf>,
    pub scheduler_token_env: Option<String>,
}

/// A tenant of the dataset API: its bearer token (inline, from a file or from an environment
/// variable: exactly one) and what it may pin across the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSection {
    pub name: String,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    /// Bytes the tenant may pin (counting every replica) [default: unlimited].
    pub quota: Option<String>,
    /// Files the tenant may pin (each file once, whatever its replicas) [default: unlimited].
    pub quota_files: Option<u64>,
}

/// Joining a cluster: through etcd, or a static member list.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    #[serde(default)]
    pub etcd: Vec<String>,
    #[serde(default)]
    pub members: Vec<StaticMember>,
    pub replicas: Option<usize>,
    pub peer_timeout: Option<String>,
    pub lease_ttl: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticMember {
    pub node_id: String,
    /// Worker API (gRPC, TCP) and data plane (QUIC, UDP) share this address.
    pub addr: String,
}

/// TLS material: explicit files, or a directory holding `ca.pem`, `<node_id>.pem` and
/// `<node_id>.key` (what `granary certs` writes).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    pub dir: Option<PathBuf>,
    pub memory: Option<String>,
    pub disk: Option<String>,
    pub block_size: Option<String>,
}

/// S3 connection settings; each one left out is taken from the standard `AWS_*` variables.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Send unsigned requests (public buckets).
    #[serde(default)]
    pub anonymous: bool,
    /// Let the SDK find credentials itself (instance metadata, web identity, ECS).
    #[serde(default)]
    pub use_instance_credentials: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    pub request_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    pub max_retries: Option<usize>,
    pub max_concurrency: Option<usize>,
    pub cluster_max_concurrency: Option<usize>,
    pub max_requests_per_second: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSection {
    pub path: String,
    pub source: String,
    /// The tenants whose tokens may read this mount (`granary mount --token`, CSI volumes);
    /// absent: every caller. Nodes (a cluster certificate, no token) read every mount.
    pub tenants: Option<Vec<String>>,
}

/// Validated worker settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_id: String,
    pub listen: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub metadata_ttl: Duration,
    pub cache: CacheSettings,
    pub s3: S3Section,
    pub backend: BackendSettings,
    pub namespace: Namespace,
    /// Per mount of `namespace` (same order): the tenants that may read it; `None`: everyone.
    pub mount_tenants: Vec<Option<Vec<String>>>,
    pub cluster: Option<ClusterSettings>,
    pub tls: Option<TlsFiles>,
    pub datasets: DatasetSettings,
}

/// Validated cluster settings.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub etcd: Vec<String>,
    pub members: Vec<(String, SocketAddr)>,
    pub replicas: usize,
    pub peer_timeout: Duration,
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct DatasetSettings {
    pub capacity: ByteSize,
    /// Block reads in flight per dataset load (default 32); a load holds at most twice as
    /// many blocks in memory.
    pub load_concurrency: usize,
    /// Threads of the runtime that runs dataset loads (default: a quarter of the CPUs, 1-4).
    pub load_threads: usize,
    pub admin_token: Option<Token>,
    /// The scheduler hook's token (see [`crate::dataset_api::Caller::Scheduler`]).
    pub scheduler_token: Option<Token>,
    pub tenants: Vec<Tenant>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub token: Token,
    /// Bytes, counting every replica.
    pub quota: Option<u64>,
    /// Files, each once.
    pub quota_files: Option<u64>,
}

impl DatasetSettings {
    pub const DEFAULT_CAPACITY: ByteSize = ByteSize::gib(16);

    /// Whether the dataset API needs no token (no admin, scheduler or tenant token configured).
    pub fn open(&self) -> bool {
        self.admin_token.is_none() && self.scheduler_token.is_none() && self.tenants.is_empty()
    }
}

impl Default for DatasetSettings {
    fn default() -> Self {
        DatasetSettings {
            capacity: Self::DEFAULT_CAPACITY,
            load_concurrency: 32,
            load_threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get() / 4)
                .clamp(1, 4),
            admin_token: None,
            scheduler_token: None,
            tenants: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub dir: PathBuf,
    pub memory: ByteSize,
    pub disk: ByteSize,
    pub block_size: BlockSize,
}

#[derive(Debug, Clone)]
pub struct BackendSettings {
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_retries: usize,
    /// Requests in flight to each backend from this worker.
    pub max_concurrency: usize,
    /// Requests in flight to each backend from the whole cluster: each of N members takes 1/N
    /// (at least 1, at most `max_concurrency`); `None` = only `max_concurrency`.
    pub cluster_max_concurrency: Option<usize>,
    /// Requests per second to each backend (bursts of one second's worth) from the whole
    /// cluster: each of N members takes 1/N; `None` = unlimited.
    pub max_requests_per_second: Option<f64>,
}

impl Default for BackendSettings {
    fn default() -> Self {
        BackendSettings {
            request_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(3),
            max_retries: 3,
            max_concurrency: 64,
            cluster_max_concurrency: None,
            max_requests_per_second: None,
        }
    }
}

impl CacheSettings {
    pub const DEFAULT_MEMORY: ByteSize = ByteSize::mib(512);
    pub const DEFAULT_DISK: ByteSize = ByteSize::gib(4);

    /// The memory tier must hold a few blocks, and a disk tier at least 64 MiB or 8 blocks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.memory.bytes() < 4 * self.block_size.get() {
            return Err(ConfigError::Invalid(format!(
                "memory cache {} is too small for block size {}: give it at least 4 blocks",
                self.memory,
                ByteSize(self.block_size.get())
            )));
        }
        let min_disk = (64 << 20).max(8 * self.block_size.get());
        if self.disk.bytes() != 0 && self.disk.bytes() < min_disk {
            return Err(ConfigError::Invalid(format!(
                "disk cache {} is too small: use 0 (no disk tier) or at least {}",
                self.disk,
                ByteSize(min_disk)
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn field<T, E: std::fmt::Display>(
    name: &str,
    value: &str,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<T, ConfigError> {
    parse(value).map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Validates every field and builds the settings.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let node_id = match &self.node_id {
            Some(id) => {
                granary_core::placement::check_node_id(id)
                    .map_err(|e| ConfigError::Invalid(format!("node_id: {e}")))?;
                id.clone()
            }
            None => default_node_id(),
        };
        let listen = field(
            "listen",
            self.listen.as_deref().unwrap_or("127.0.0.1:7070"),
            |s| s.parse::<SocketAddr>(),
        )?;
        let metrics_addr = self
            .metrics_addr
            .as_deref()
            .map(|a| field("metrics_addr", a, |s| s.parse::<SocketAddr>()))
            .transpose()?;
        let metadata_ttl = field(
            "metadata_ttl",
            self.metadata_ttl.as_deref().unwrap_or("30s"),
            parse_duration,
        )?;
        let size = |name: &str, v: &Option<String>, default: ByteSize| match v {
            Some(s) => field(name, s, |s| s.parse::<ByteSize>()),
            None => Ok(default),
        };
        let block_size = size(
            "cache.block_size",
            &self.cache.block_size,
            ByteSize(BlockSize::DEFAULT.get()),
        )?;
        let cache = CacheSettings {
            dir: self.cache.dir.clone().unwrap_or_else(default_cache_dir),
            memory: size(
                "cache.memory",
                &self.cache.memory,
                CacheSettings::DEFAULT_MEMORY,
            )?,
            disk: size("cache.disk", &self.cache.disk, CacheSettings::DEFAULT_DISK)?,
            block_size: BlockSize::new(block_size.bytes())
                .map_err(|e| ConfigError::Invalid(format!("cache.block_size: {e}")))?,
        };
        cache.validate()?;
        let mut backend = BackendSettings::default();
        if let Some(t) = &self.backend.request_timeout {
            backend.request_timeout = field("backend.request_timeout", t, parse_duration)?;
        }
        if let Some(t) = &self.backend.connect_timeout {
            backend.connect_timeout = field("backend.connect_timeout", t, parse_duration)?;
        }
        if let Some(n) = self.backend.max_retries {
            backend.max_retries = n;
        }
        if let Some(n) = self.backend.max_concurrency {
            if n == 0 {
                return Err(ConfigError::Invalid(
                    "backend.max_concurrency must be at least 1".into(),
                ));
            }
            backend.max_concurrency = n;
        }
        if let Some(rate) = self.backend.max_requests_per_second {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(ConfigError::Invalid(
                    "backend.max_requests_per_second must be a positive number".into(),
                ));
            }
            backend.max_requests_per_second = Some(rate);
        }
        if let Some(n) = self.backend.cluster_max_concurrency {
            if n == 0 {
                return Err(ConfigError::Invalid(
                    "backend.cluster_max_concurrency must be at least 1".into(),
                ));
            }
            backend.cluster_max_concurrency = Some(n);
        }
        if self.mounts.is_empty() {
            return Err(ConfigError::Invalid(
                "no [[mount]] sections: add at least one, e.g. path = \"/data\", source = \"s3://bucket/prefix\"".into(),
            ));
        }
        let mounts = self
            .mounts
            .iter()
            .map(|m| {
                let source = m
                    .source
                    .parse::<SourceUri>()
                    .map_err(|e| ConfigError::Invalid(format!("mount {:?}: {e}", m.path)))?;
                Ok(MountPoint {
                    path: m.path.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let namespace = Namespace::new(mounts).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let tls = self
            .tls
            .as_ref()
            .map(|t| tls_files(t, &node_id))
            .transpose()?;
        let cluster = self.cluster.as_ref().map(cluster_settings).transpose()?;
        if cluster.is_some() && tls.is_none() {
            return Err(ConfigError::Invalid(
                "[cluster] needs [tls] (dir, or ca/cert/key): the data plane between workers is always mutual TLS".into(),
            ));
        }
        let datasets = self.dataset_settings()?;
        for m in &self.mounts {
            for t in m.tenants.iter().flatten() {
                if !datasets.tenants.iter().any(|known| &known.name == t) {
                    return Err(ConfigError::Invalid(format!(
                        "mount {:?}: tenant {t:?} has no [[tenant]] section (its token)",
                        m.path
                    )));
                }
            }
        }
        let mount_tenants = self.mounts.iter().map(|m| m.tenants.clone()).collect();
        Ok(Settings {
            datasets,
            mount_tenants,
            node_id,
            listen,
            metrics_addr,
            metadata_ttl,
            cache,
            s3: self.s3.clone(),
            backend,
            namespace,
            cluster,
            tls,
        })
    }
}

fn tls_files(t: &TlsSection, node_id: &str) -> Result<TlsFiles, ConfigError> {
    match (&t.dir, &t.ca, &t.cert, &t.key) {
        (Some(dir), None, None, None) => Ok(TlsFiles::in_dir(dir, node_id)),
        (None, Some(ca), Some(cert), Some(key)) => Ok(TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => Err(ConfigError::Invalid(
            "[tls]: give either dir, or all of ca, cert and key".into(),
        )),
    }
}

fn cluster_settings(c: &ClusterSection) -> Result<ClusterSettings, ConfigError> {
    if c.etcd.is_empty() == c.members.is_empty() {
        return Err(ConfigError::Invalid(
            "[cluster]: give either etcd endpoints or a static members list".into(),
        ));
    }
    for url in &c.etcd {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::Invalid(format!(
                "cluster.etcd: {url:?} is not an http(s):// URL"
            )));
        }
    }
    let members = c
        .members
        .iter()
        .map(|m| {
            let addr = field("cluster.members.addr", &m.addr, |s| s.parse::<SocketAddr>())?;
            Ok((m.node_id.clone(), addr))
        })
        .collect::<Result<Vec<_>, ConfigError>>()?;
    let replicas = c.replicas.unwrap_or(1);
    if !(1..=5).contains(&replicas) {
        return Err(ConfigError::Invalid(
            "cluster.replicas must be between 1 and 5".into(),
        ));
    }
    Ok(ClusterSettings {
        etcd: c.etcd.clone(),
        members,
        replicas,
        peer_timeout: field(
            "cluster.peer_timeout",
            c.peer_timeout.as_deref().unwrap_or("20s"),
            parse_duration,
        )?,
        lease_ttl: field(
            "cluster.lease_ttl",
            c.lease_ttl.as_deref().unwrap_or("10s"),
            parse_duration,
        )?,
    })
}

/// A worker's node id when none is configured: this host's name.
pub fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "granary".into())
}

/// `$GRANARY_CACHE_DIR`, else `/var/cache/granary` for root, else `~/.cache/granary`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GRANARY_CACHE_DIR") {
        return dir.into();
    }
    match std::env::var_os("HOME") {
        Some(home) if !is_root() => Path::new(&home).join(".cache/granary"),
        _ => PathBuf::from("/var/cache/granary"),
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests;
