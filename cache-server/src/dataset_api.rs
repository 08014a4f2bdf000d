//! The dataset control API of a worker: pin, load, unpin, status, list, verify, with bearer
//! token authentication per tenant, quotas and capacity checks; and the namespace view of pinned
//! datasets (stat and list inside a pin are answered from its frozen manifest).
//!
//! [`DatasetApi`] is its own value, built by the worker, holding what it uses of it: the dataset
//! store, the settings, each mount's backend id and the cluster's membership. `pin` walks the
//! namespace through a [`NamespaceView`] its caller passes (the worker), so this file needs
//! nothing else of the worker.

use crate::config::{DatasetSettings, Settings};
use crate::datasets::{Datasets, now_secs};
use crate::registry::Pin;
use granary_core::dataset::{
    Child, LoadState, MAX_PATH, Manifest, ManifestFile, check_name, check_node_list,
    check_replicas, check_tenant_files, check_tenant_quota, expiry, overall, percent, share,
};
use granary_core::namespace::components;
use granary_core::{Namespace, ObjectId, Resolved};
use granary_net::membership::Membership;
pub use granary_proto::datasets::{DatasetStatus, PinRequest};
use granary_proto::{ApiError, Entry, EntryKind, ObjectRef};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::sync::Arc;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

/// Files in one pin, at most. Every worker keeps each pin's manifest in memory (about 200 bytes
/// a file); etcd holds it compressed, in chunks.
pub const MAX_PIN_FILES: usize = 2_000_000;
/// Directories a pin's walk visits, at most (empty ones count too).
pub const MAX_PIN_DIRS: usize = 1_000_000;
/// The largest request the Datasets service decodes: a pin names at most 4096 node ids of
/// 253 bytes and a 4096-byte path.
pub const MAX_REQUEST_BYTES: usize = 2 << 20;

/// Who is calling: the admin (sees and changes every pin), the scheduler hook (sees every pin,
/// may load pinned datasets, nothing else) or one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Scheduler,
    Tenant(String),
}

impl Caller {
    /// Whether the caller may see `pin` (its status, in lists).
    fn may_see(&self, pin: &Pin) -> bool {
        match self {
            Caller::Admin | Caller::Scheduler => true,
            Caller::Tenant(t) => *t == pin.tenant,
        }
    }

    /// Refuses the scheduler's role everything but reading status and loading: `what` is the
    /// call refused.
    fn may_change(&self, what: &str) -> Result<(), ApiError> {
        match self {
            Caller::Scheduler => Err(ApiError::Denied(format!(
                "role \"scheduler\" may only read status and load pinned datasets: {what} needs a tenant's or the admin's token"
            ))),
            Caller::Admin | Caller::Tenant(_) => Ok(()),
        }
    }
}

/// A bearer token as a worker keeps it: its SHA-256 digest, never printed, compared in
/// constant time.
#[derive(Clone)]
pub struct Token([u8; 32]);

impl Token {
    pub fn new(secret: &str) -> Self {
        Token(Sha256::digest(secret.as_bytes()).into())
    }

    fn matches(&self, other: &Token) -> Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Token) -> bool {
        self.matches(other).into()
    }
}

impl Eq for Token {}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Maps a bearer token to a caller. With no tokens configured the API is open (everyone is
/// admin): fine for one node on a laptop, logged loudly at startup.
///
/// The token's digest is compared with every configured one in constant time, each of them
/// whatever matched before: how long it takes tells nothing of which token (if any) matched.
pub fn authenticate(settings: &DatasetSettings, token: Option<&str>) -> Result<Caller, ApiError> {
    if settings.open() {
        return Ok(Caller::Admin);
    }
    let token = token.ok_or_else(|| {
        ApiError::Denied(
            "no token: pass --token-file FILE (or --token, or set GRANARY_TOKEN) with a tenant's, the scheduler's or the admin's token"
                .into(),
        )
    })?;
    let presented = Token::new(token);
    // 0: none; 1: the admin; 2: the scheduler; 3 + i: tenant i.
    let mut found = 0u32;
    let roles = [
        (&settings.admin_token, 1u32),
        (&settings.scheduler_token, 2),
    ];
    for (t, id) in roles {
        if let Some(t) = t {
            found.conditional_assign(&id, t.matches(&presented));
        }
    }
    for (i, t) in settings.tenants.iter().enumerate() {
        found.conditional_assign(&(3 + i as u32), t.token.matches(&presented));
    }
    match found {
        0 => Err(ApiError::Denied(
            "the token matches no tenant, nor the scheduler or the admin".into(),
        )),
        1 => Ok(Caller::Admin),
        2 => Ok(Caller::Scheduler),
        n => Ok(Caller::Tenant(
            settings.tenants[n as usize - 3].name.clone(),
        )),
    }
}

fn normalize(path: &str) -> Result<String, ApiError> {
    let parts = components(path).ok_or_else(|| {
        ApiError::Invalid(format!(
            "invalid path {path:?}: give an absolute namespace path like /data/imagenet"
        ))
    })?;
    Ok(format!("/{}", parts.join("/")))
}

/// The pin whose root contains `path` (the longest root wins), with `path`'s part below it.
fn pin_of<'a>(pins: &'a [Pin], path: &str) -> Option<(&'a Pin, String)> {
    pins.iter()
        .filter_map(|p| {
            let root = p.manifest.root.trim_end_matches('/');
            if path == root {
                Some((p, String::new()))
            } else {
                path.strip_prefix(root)
                    .and_then(|r| r.strip_prefix('/'))
                    .map(|rel| (p, rel.to_string()))
            }
        })
        .max_by_key(|(p, _)| p.manifest.root.len())
}

/// The namespace as the worker serves it (pinned datasets included): what `pin` stats and walks.
pub trait NamespaceView: Sync {
    fn stat(&self, path: &str) -> impl Future<Output = Result<Entry, ApiError>> + Send;

    fn list(&self, path: &str) -> impl Future<Output = Result<Arc<Vec<Entry>>, ApiError>> + Send;
}

/// Live members' node ids as `membership` shows them (`node_id` alone without a cluster).
pub(crate) fn member_ids(membership: Option<&Membership>, node_id: &str) -> Vec<String> {
    match membership {
        Some(m) => m.view().members.iter().map(|m| m.node_id.clone()).collect(),
        None => vec![node_id.to_string()],
    }
}

/// A worker's dataset API (see the module docs).
pub struct DatasetApi {
    datasets: Arc<Datasets>,
    settings: DatasetSettings,
    node_id: String,
    namespace: Namespace,
    /// Each mount's backend id, by mount index.
    backend_ids: Vec<String>,
    /// The cluster's membership (`None` outside a cluster).
    membership: Option<Membership>,
    /// The modification time of directories inside pins: the worker's start.
    started_ns: i64,
}

impl DatasetApi {
    pub fn new(
        datasets: Arc<Datasets>,
        settings: &Settings,
        backend_ids: Vec<String>,
        membership: Option<Membership>,
        started_ns: i64,
    ) -> Self {
        DatasetApi {
            datasets,
            settings: settings.datasets.clone(),
            node_id: settings.node_id.clone(),
            namespace: settings.namespace.clone(),
            backend_ids,
            membership,
            started_ns,
        }
    }

    fn file_entry(&self, pin: &Pin, f: &ManifestFile) -> Entry {
        Entry {
            name: f.path.rsplit('/').next().unwrap_or(&f.path).to_string(),
            kind: EntryKind::File,
            size: f.size,
            mtime_ns: f.mtime_ns,
            object: Some(ObjectRef {
                mount: pin.mount,
                id: ObjectId {
                    backend: self.backend_ids[pin.mount as usize].clone(),
                    key: pin.key_of(&f.path),
                    size: f.size,
                    etag: f.etag.clone(),
                    version: f.version.clone(),
                    mtime_ns: f.mtime_ns,
                },
            }),
            // The pin's manifest is frozen: this version holds while the pin lasts.
            pinned: true,
            owner: f.owner,
        }
    }

    fn dir_entry(&self, name: &str) -> Entry {
        Entry {
            name: name.to_string(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: self.started_ns,
            object: None,
            pinned: true,
            owner: None,
        }
    }

    /// `stat` inside a pinned dataset, from its manifest; `None` outside every pin.
    pub fn pinned_stat(&self, path: &str) -> Option<Result<Entry, ApiError>> {
        let path = normalize(path).ok()?;
        let pins = self.datasets.pins();
        let (pin, rel) = pin_of(&pins, &path)?;
        let name = path.rsplit('/').next().unwrap_or("");
        if rel.is_empty() {
            return Some(Ok(self.dir_entry(name)));
        }
        if let Some(f) = pin.manifest.file(&rel) {
            return Some(Ok(self.file_entry(pin, f)));
        }
        if pin.manifest.is_dir(&rel) {
            return Some(Ok(self.dir_entry(name)));
        }
        Some(Err(ApiError::NotFound(format!(
            "{path} (not in dataset {:?} as pinned)",
            pin.name
        ))))
    }

    /// `list` inside a pinned dataset, from its manifest; `None` outside every pin.
    pub fn pinned_list(&self, path: &str) -> Option<Result<Arc<Vec<Entry>>, ApiError>> {
        let path = normalize(path).ok()?;
        let pins = self.datasets.pins();
        let (pin, rel) = pin_of(&pins, &path)?;
        if pin.manifest.file(&rel).is_some() {
            return Some(Err(ApiError::NotADirectory(path)));
        }
        if !pin.manifest.is_dir(&rel) {
            return Some(Err(ApiError::NotFound(path)));
        }
        let mut entries: Vec<Entry> = pin
            .manifest
            .children(&rel)
            .into_iter()
            .map(|child| match child {
                Child::File(f) => self.file_entry(pin, f),
                Child::Dir(name) => self.dir_entry(name),
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries.dedup_by(|a, b| a.name == b.name);
        Some(Ok(Arc::new(entries)))
    }

    pub fn authenticate(&self, token: Option<&str>) -> Result<Caller, ApiError> {
        authenticate(&self.settings, token)
    }

    fn live_members(&self) -> Vec<String> {
        member_ids(self.membership.as_ref(), &self.node_id)
    }

    /// The dataset capacity `node` publishes in the membership; this worker's own where it
    /// publishes none (a static member list, or an older worker).
    fn dataset_capacity(&self, node: &str) -> u64 {
        let published = self.membership.as_ref().and_then(|m| {
            m.view()
                .members
                .iter()
                .find(|m| m.node_id == node)
                .map(|m| m.dataset_capacity)
        });
        match published {
            Some(bytes) if bytes > 0 => bytes,
            _ => self.settings.capacity.bytes(),
        }
    }

    async fn fresh_pins(&self) -> Result<Arc<Vec<Pin>>, ApiError> {
        self.datasets.refresh().await
    }

    async fn find_pin(&self, caller: &Caller, name: &str) -> Result<Pin, ApiError> {
        check_name(name).map_err(ApiError::Invalid)?;
        let pins = self.fresh_pins().await?;
        let pin = pins
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| ApiError::NotFound(format!("no dataset named {name:?} is pinned")))?;
        if !caller.may_see(pin) {
            // Do not reveal other tenants' datasets.
            return Err(ApiError::NotFound(format!(
                "no dataset named {name:?} is pinned"
            )));
        }
        Ok(pin.clone())
    }

    /// Checks a node set: live members, no repeats, enough for the replicas, room on each.
    fn check_nodes(&self, pins: &[Pin], pin: &Pin) -> Result<(), ApiError> {
        let live = self.live_members();
        if !self.datasets.registry.shared()
            && let Some(other) = pin.nodes.iter().find(|n| **n != self.node_id)
        {
            return Err(ApiError::Invalid(format!(
                "node {other:?}: without etcd, pins live on this worker's disk alone, so a dataset can be loaded only onto this node ({})",
                self.node_id
            )));
        }
        for (i, node) in pin.nodes.iter().enumerate() {
            if !live.contains(node) {
                return Err(ApiError::Invalid(format!(
                    "node {node:?} is not a live member (members: {})",
                    live.join(",")
                )));
            }
            if pin.nodes[..i].contains(node) {
                return Err(ApiError::Invalid(format!("node {node:?} is listed twice")));
            }
        }
        if !pin.nodes.is_empty() && pin.replicas > pin.nodes.len() {
            return Err(ApiError::Invalid(format!(
                "{} replicas need at least as many nodes; {} given",
                pin.replicas,
                pin.nodes.len()
            )));
        }
        for node in &pin.nodes {
            let wanted = share(&pin.manifest, &pin.nodes, pin.replicas, node).1;
            let used = self.datasets.committed(pins, node, &pin.name);
            let free = self.dataset_capacity(node).saturating_sub(used);
            if wanted > free {
                return Err(ApiError::Exhausted(
                    granary_core::dataset::QuotaError::Node {
                        node: node.clone(),
                        wanted,
                        free,
                    }
                    .to_string(),
                ));
            }
        }
        Ok(())
    }

    /// Walks `namespace` under `path`, listing every file (the manifest).
    async fn walk(
        &self,
        namespace: &impl NamespaceView,
        path: &str,
    ) -> Result<Vec<ManifestFile>, ApiError> {
        let mut files = Vec::new();
        let mut dirs = vec![String::new()];
        let mut visited = 0usize;
        while let Some(rel) = dirs.pop() {
            visited += 1;
            if visited > MAX_PIN_DIRS {
                return Err(ApiError::Invalid(format!(
                    "{path} holds over {MAX_PIN_DIRS} directories: pin a smaller subtree"
                )));
            }
            let dir = if rel.is_empty() {
                path.to_string()
            } else {
                format!("{path}/{rel}")
            };
            for e in namespace.list(&dir).await?.iter() {
                let child = if rel.is_empty() {
                    e.name.clone()
                } else {
                    format!("{rel}/{}", e.name)
                };
                if path.len() + 1 + child.len() > MAX_PATH {
                    return Err(ApiError::Invalid(format!(
                        "{path}: a file's path below it is over {MAX_PATH} bytes"
                    )));
                }
                match (&e.kind, &e.object) {
                    (EntryKind::Dir, _) => dirs.push(child),
                    (EntryKind::File, Some(o)) => files.push(ManifestFile {
                        path: child,
                        size: o.id.size,
                        etag: o.id.etag.clone(),
                        version: o.id.version.clone(),
                        mtime_ns: o.id.mtime_ns,
                        owner: e.owner,
                    }),
                    (EntryKind::File, None) => {}
                }
                if files.len() > MAX_PIN_FILES {
                    return Err(ApiError::Invalid(format!(
                        "{path} holds over {MAX_PIN_FILES} files: pin a smaller subtree"
                    )));
                }
            }
        }
        Ok(files)
    }

    /// Pins the directory `req.path` of `namespace` (the worker's, pinned datasets included).
    pub async fn pin_dataset(
        &self,
        namespace: &impl NamespaceView,
        caller: &Caller,
        req: PinRequest,
    ) -> Result<DatasetStatus, ApiError> {
        caller.may_change("pin")?;
        check_name(&req.name).map_err(ApiError::Invalid)?;
        if req.path.len() > MAX_PATH {
            return Err(ApiError::Invalid(format!(
                "a path of {} bytes is over the limit of {MAX_PATH}",
                req.path.len()
            )));
        }
        let path = normalize(&req.path)?;
        // An unset count (0 on the wire) means one copy.
        let replicas = req.replicas.max(1);
        check_replicas(replicas).map_err(ApiError::Invalid)?;
        check_node_list(&req.nodes).map_err(ApiError::Invalid)?;
        let now = now_secs();
        let expires_at = req
            .ttl
            .map(|ttl| expiry(now, ttl))
            .transpose()
            .map_err(ApiError::Invalid)?;
        let tenant = match (caller, &req.tenant) {
            (Caller::Admin, Some(t)) => t.clone(),
            (Caller::Admin, None) if self.settings.open() => "default".to_string(),
            (Caller::Admin, None) => "admin".to_string(),
            (Caller::Tenant(me), Some(t)) if t != me => {
                return Err(ApiError::Denied(format!(
                    "tenant {me:?} cannot pin for tenant {t:?}"
                )));
            }
            (Caller::Tenant(me), _) => me.clone(),
            (Caller::Scheduler, _) => {
                return Err(ApiError::Denied("role \"scheduler\" cannot pin".into()));
            }
        };
        check_name(&tenant).map_err(|e| ApiError::Invalid(format!("tenant: {e}")))?;
        let (quota, quota_files) = self
            .settings
            .tenants
            .iter()
            .find(|t| t.name == tenant)
            .map_or((None, None), |t| (t.quota, t.quota_files));
        // The admin's own pins (no --tenant) belong to "admin", outside every quota.
        if !self.settings.open()
            && req.tenant.is_some()
            && !self.settings.tenants.iter().any(|t| t.name == tenant)
        {
            return Err(ApiError::Invalid(format!("unknown tenant {tenant:?}")));
        }
        let (mount, root_key) = match self
            .namespace
            .resolve(&path)
            .map_err(|e| ApiError::Invalid(e.to_string()))?
        {
            Resolved::Mount { mount, key, .. } => (mount as u32, key),
            Resolved::Synthetic { .. } => {
                return Err(ApiError::Invalid(format!(
                    "{path} spans several mounts: pin a directory inside one mount"
                )));
            }
            Resolved::NotFound => return Err(ApiError::NotFound(path)),
        };
        let pins = self.fresh_pins().await?;
        if pins.iter().any(|p| p.name == req.name) {
            return Err(ApiError::Invalid(format!(
                "dataset {:?} is already pinned",
                req.name
            )));
        }
        match namespace.stat(&path).await?.kind {
            EntryKind::Dir => {}
            EntryKind::File => {
                return Err(ApiError::Invalid(format!(
                    "{path} is a file: a dataset is a directory"
                )));
            }
        }
        let files = self.walk(namespace, &path).await?;
        let manifest = Manifest::new(path.clone(), files);
        let used: u64 = pins
            .iter()
            .filter(|p| p.tenant == tenant)
            .map(|p| p.bytes() * p.replicas as u64)
            .sum();
        check_tenant_quota(&tenant, used, manifest.bytes(), replicas, quota)
            .map_err(|e| ApiError::Exhausted(e.to_string()))?;
        let used_files: u64 = pins
            .iter()
            .filter(|p| p.tenant == tenant)
            .map(|p| p.manifest.files.len() as u64)
            .sum();
        let files = manifest.files.len() as u64;
        check_tenant_files(&tenant, used_files, files, quota_files)
            .map_err(|e| ApiError::Exhausted(e.to_string()))?;
        let pin = Pin {
            name: req.name.clone(),
            tenant,
            nodes: req.nodes.clone(),
            replicas,
            expires_at,
            created_at: now,
            load: false,
            verify_seq: 0,
            mount,
            root_key,
            backend: self.backend_ids[mount as usize].clone(),
            manifest,
            exact_names: true,
        };
        self.check_nodes(&pins, &pin)?;
        self.datasets.registry.create(&pin).await?;
        self.datasets.refresh().await?;
        tracing::info!(dataset = %pin.name, tenant = %pin.tenant, files = pin.manifest.files.len(), bytes = pin.bytes(), "pinned");
        self.status_of(&pin).await
    }

    pub async fn load_dataset(
        &self,
        caller: &Caller,
        name: &str,
        nodes: Vec<String>,
    ) -> Result<DatasetStatus, ApiError> {
        check_node_list(&nodes).map_err(ApiError::Invalid)?;
        let mut pin = self.find_pin(caller, name).await?;
        if !nodes.is_empty() {
            pin.nodes = nodes;
        } else if pin.nodes.is_empty() && !self.datasets.registry.shared() {
            pin.nodes = vec![self.node_id.clone()];
        } else if pin.nodes.is_empty() {
            let mut live = self.live_members();
            live.sort();
            pin.nodes = live;
        }
        if pin.replicas > pin.nodes.len() {
            return Err(ApiError::Invalid(format!(
                "dataset {name:?} wants {} replicas but the node set has {} nodes",
                pin.replicas,
                pin.nodes.len()
            )));
        }
        let pins = self.fresh_pins().await?;
        self.check_nodes(&pins, &pin)?;
        pin.load = true;
        self.datasets.registry.update(&pin).await?;
        self.datasets.refresh().await?;
        tracing::info!(dataset = %name, nodes = %pin.nodes.join(","), "load requested");
        self.status_of(&pin).await
    }

    pub async fn unpin_dataset(&self, caller: &Caller, name: &str) -> Result<(), ApiError> {
        caller.may_change("unpin")?;
        let pin = self.find_pin(caller, name).await?;
        self.datasets.registry.remove(&pin.name).await?;
        self.datasets.refresh().await?;
        tracing::info!(dataset = %name, "unpinned");
        Ok(())
    }

    /// Asks every holding node to re-check its files; returns the request's sequence number
    /// (each node's progress reports `verified_seq` once it has carried it out).
    pub async fn verify_dataset(&self, caller: &Caller, name: &str) -> Result<u64, ApiError> {
        caller.may_change("verify")?;
        let mut pin = self.find_pin(caller, name).await?;
        pin.verify_seq += 1;
        self.datasets.registry.update(&pin).await?;
        Ok(pin.verify_seq)
    }

    pub async fn dataset_status(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<DatasetStatus, ApiError> {
        let pin = self.find_pin(caller, name).await?;
        self.status_of(&pin).await
    }

    pub async fn list_datasets(&self, caller: &Caller) -> Result<Vec<DatasetStatus>, ApiError> {
        let pins = self.fresh_pins().await?;
        let mut out = Vec::new();
        for pin in pins.iter().filter(|p| caller.may_see(p)) {
            out.push(self.status_of(pin).await?);
        }
        Ok(out)
    }

    async fn status_of(&self, pin: &Pin) -> Result<DatasetStatus, ApiError> {
        let mut reports = self.datasets.registry.progress(&pin.name).await?;
        // Reports of a node set that has since changed do not count.
        reports.retain(|r| pin.nodes.contains(&r.node));
        for r in &mut reports {
            let want = share(&pin.manifest, &pin.nodes, pin.replicas, &r.node);
            if (r.files_total, r.bytes_total) != want {
                // Written for an older node set or manifest: nothing of it counts yet.
                r.state = LoadState::Pending;
                r.bytes_ready = 0;
                r.files_ready = 0;
                r.files_total = want.0;
                r.bytes_total = want.1;
            }
        }
        let expected: Vec<(u64, u64)> = pin
            .nodes
            .iter()
            .map(|n| share(&pin.manifest, &pin.nodes, pin.replicas, n))
            .collect();
        let (mut state, ready, total) = overall(&pin.nodes, &reports, &expected);
        if !pin.load || pin.nodes.is_empty() {
            state = LoadState::Pending;
        }
        Ok(DatasetStatus {
            name: pin.name.clone(),
            tenant: pin.tenant.clone(),
            path: pin.manifest.root.clone(),
            files: pin.manifest.files.len() as u64,
            bytes: pin.bytes(),
            replicas: pin.replicas as u64,
            nodes: pin.nodes.clone(),
            expires_at: pin.expires_at,
            created_at: pin.created_at,
            load: pin.load,
            state,
            percent: if pin.load { percent(ready, total) } else { 0.0 },
            bytes_ready: ready,
            bytes_total: total,
            verify_seq: pin.verify_seq,
            node_progress: reports,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Tenant;

    const ADMIN: &str = "admin-token-0123456789";
    const HOOK: &str = "scheduler-token-0123456789";

    fn settings() -> DatasetSettings {
        let tenant = |name: &str| Tenant {
            name: name.into(),
            token: Token::new(&format!("{name}-token-0123456789")),
            quota: None,
            quota_files: None,
        };
        DatasetSettings {
            admin_token: Some(Token::new(ADMIN)),
            scheduler_token: Some(Token::new(HOOK)),
            tenants: vec![tenant("team-a"), tenant("team-b")],
            ..DatasetSettings::default()
        }
    }

    #[test]
    fn each_token_names_its_role() {
        let s = settings();
        assert_eq!(authenticate(&s, Some(ADMIN)), Ok(Caller::Admin));
        assert_eq!(authenticate(&s, Some(HOOK)), Ok(Caller::Scheduler));
        for t in ["team-a", "team-b"] {
            let token = format!("{t}-token-0123456789");
            assert_eq!(authenticate(&s, Some(&token)), Ok(Caller::Tenant(t.into())));
        }
        for wrong in ["", "admin-token-012345678", "admin-token-01234567890", "x"] {
            let e = authenticate(&s, Some(wrong)).unwrap_err();
            assert!(e.to_string().contains("matches no tenant"), "{e}");
        }
        let e = authenticate(&s, None).unwrap_err().to_string();
        assert!(e.contains("no token") && e.contains("--token-file"), "{e}");
        // With no token configured, the API is open.
        assert_eq!(
            authenticate(&DatasetSettings::default(), None),
            Ok(Caller::Admin)
        );
    }

    #[test]
    fn the_scheduler_role_reads_every_pin_and_changes_none() {
        for what in ["pin", "unpin", "verify"] {
            let e = Caller::Scheduler.may_change(what).unwrap_err().to_string();
            assert!(
                e.contains("role \"scheduler\"") && e.contains(&format!("{what} needs")),
                "{e}"
            );
        }
        assert!(Caller::Admin.may_change("pin").is_ok());
        assert!(Caller::Tenant("t".into()).may_change("unpin").is_ok());
    }

    #[test]
    fn a_token_is_kept_as_a_digest_and_never_printed() {
        let t = Token::new(ADMIN);
        assert_eq!(format!("{t:?}"), "Token(..)");
        assert!(!format!("{:?}", settings()).contains("admin-token"));
        assert_eq!(t, Token::new(ADMIN));
        assert_ne!(t, Token::new(HOOK));
    }
}
