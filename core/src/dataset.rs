//! Datasets: a named subtree of the namespace, frozen in a manifest at pin time and loaded whole
//! onto a set of nodes. This module holds the pure parts: names, the manifest, which node holds
//! which file (rendezvous striping), readiness arithmetic and quota checks.

use crate::object::BlockKey;
use crate::placement::owners;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Longest dataset name accepted.
pub const MAX_NAME: usize = 63;
/// Longest a pin may live before it expires: ten years.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Most copies of each file a dataset may ask for.
pub const MAX_REPLICAS: usize = 1024;
/// Longest namespace path a pin may name, in bytes (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Most nodes a node set may list.
pub const MAX_NODES: usize = 4096;
/// Longest node id (a DNS name, as a worker's `node_id`).
pub const MAX_NODE_ID: usize = 253;

/// Checks a pin's time to live; its length in whole seconds (at least 1).
pub fn check_ttl(ttl: Duration) -> Result<u64, String> {
    if ttl > MAX_TTL {
        return Err(format!(
            "ttl of {}s is over the limit of {}s (10 years)",
            ttl.as_secs(),
            MAX_TTL.as_secs()
        ));
    }
    Ok(ttl.as_secs().max(1))
}

/// When a pin made at `now` (unix seconds) with `ttl` expires, without overflow.
pub fn expiry(now: u64, ttl: Duration) -> Result<u64, String> {
    let secs = check_ttl(ttl)?;
    now.checked_add(secs)
        .ok_or_else(|| format!("ttl of {secs}s from now is past the end of time"))
}

/// Checks a dataset's replica count: 1 to [`MAX_REPLICAS`].
pub fn check_replicas(replicas: usize) -> Result<(), String> {
    if (1..=MAX_REPLICAS).contains(&replicas) {
        Ok(())
    } else {
        Err(format!(
            "replicas {replicas} is out of range: give 1 to {MAX_REPLICAS}"
        ))
    }
}

/// Checks a node set as a request names it: at most [`MAX_NODES`] ids of 1 to
/// [`MAX_NODE_ID`] bytes, without spaces, control characters or `/`.
pub fn check_node_list(nodes: &[String]) -> Result<(), String> {
    if nodes.len() > MAX_NODES {
        return Err(format!("{} nodes listed: at most {MAX_NODES}", nodes.len()));
    }
    for node in nodes {
        if node.is_empty()
            || node.len() > MAX_NODE_ID
            || node
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '/')
        {
            let shown: String = node.chars().take(MAX_NODE_ID).collect();
            return Err(format!(
                "invalid node id {shown:?}: use 1-{MAX_NODE_ID} characters without spaces or '/'"
            ));
        }
    }
    Ok(())
}

/// Checks a dataset name: 1-63 of `a-z 0-9 . _ -`, starting with a letter or digit (so it is
/// safe as a directory name, an etcd key and a Kubernetes annotation value).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid dataset name {name:?}: use 1-{MAX_NAME} of a-z 0-9 . _ -, starting with a letter or digit"
        ))
    }
}

/// One file of a dataset, as the backend described it at pin time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path below the dataset's root, `/`-separated, no leading `/`.
    pub path: String,
    pub size: u64,
    pub etag: Option<String>,
    pub version: Option<String>,
    pub mtime_ns: i64,
    /// A POSIX source's mode bits and owner, kept for the pinned file (absent in manifests
    /// written before they were kept, and for S3 objects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<crate::keys::Owner>,
}

/// The frozen listing of a dataset: every file under its root when it was pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The namespace path of the dataset's root directory (`/mount/prefix`).
    pub root: String,
    /// Sorted by path. Shared: a manifest can list millions of files, and every copy of a pin
    /// (the registry's cache, each refresh) points at the one list.
    pub files: Arc<Vec<ManifestFile>>,
}

impl Manifest {
    pub fn new(root: String, mut files: Vec<ManifestFile>) -> Self {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Manifest {
            root,
            files: Arc::new(files),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub fn file(&self, path: &str) -> Option<&ManifestFile> {
        self.files
            .binary_search_by(|f| f.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.files[i])
    }

    /// The path of `file` in the namespace.
    pub fn namespace_path(&self, file: &ManifestFile) -> String {
        format!("{}/{}", self.root.trim_end_matches('/'), file.path)
    }

    /// The files below directory `dir` (relative to the root, no trailing `/`; `""` is the
    /// root): a contiguous run of the sorted list, found by binary search.
    pub fn under(&self, dir: &str) -> &[ManifestFile] {
        if dir.is_empty() {
            return &self.files;
        }
        let prefix = format!("{dir}/");
        let start = self
            .files
            .partition_point(|f| f.path.as_str() < prefix.as_str());
        let len = self.files[start..].partition_point(|f| f.path.starts_with(&prefix));
        &self.files[start..start + len]
    }

    /// Whether `dir` is a directory of the dataset: the root, or a path some file lies below.
    pub fn is_dir(&self, dir: &str) -> bool {
        dir.is_empty() || !self.under(dir).is_empty()
    }

    /// The entries directly in directory `dir`, in path order: each file, and each
    /// subdirectory once. A subdirectory's files are stepped over by binary search, so a listing
    /// costs O(entries x log files), not O(files): a manifest can list millions.
    pub fn children(&self, dir: &str) -> Vec<Child<'_>> {
        let files = self.under(dir);
        let skip = if dir.is_empty() { 0 } else { dir.len() + 1 };
        let mut children = Vec::new();
        let mut i = 0;
        while i < files.len() {
            let path = files[i].path.as_str();
            match path[skip..].split_once('/') {
                None => {
                    children.push(Child::File(&files[i]));
                    i += 1;
                }
                Some((name, _)) => {
                    children.push(Child::Dir(name));
                    let subtree = &path[..skip + name.len() + 1];
                    i += files[i..].partition_point(|f| f.path.starts_with(subtree));
                }
            }
        }
        children
    }
}

/// An entry directly in a directory of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Child<'a> {
    File(&'a ManifestFile),
    Dir(&'a str),
}

/// The nodes of `nodes` that hold `path` (rendezvous hashing of the path over the set, `replicas`
/// of them): each file whole on `replicas` nodes, files spread evenly, and a node joining or
/// leaving the set moves only its own share.
pub fn holders<'a>(path: &str, nodes: &'a [String], replicas: usize) -> Vec<&'a String> {
    let digest = xxhash_rust::xxh3::xxh3_128(path.as_bytes());
    owners(BlockKey(digest), nodes, replicas.max(1))
}

/// How much of a dataset one node must hold: (files, bytes).
pub fn share(manifest: &Manifest, nodes: &[String], replicas: usize, node: &str) -> (u64, u64) {
    manifest
        .files
        .iter()
        .filter(|f| holders(&f.path, nodes, replicas).iter().any(|n| *n == node))
        .fold((0, 0), |(n, b), f| (n + 1, b + f.size))
}

/// Where a node stands in loading its share of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadState {
    /// Pinned, not asked to load (or not started yet).
    Pending,
    Loading,
    /// Every byte of the node's share is present and verified.
    Ready,
    Failed,
}

impl LoadState {
    /// The state's name, as serde writes it and the API, the CLI and the scheduler hook show it.
    pub fn as_str(self) -> &'static str {
        match self {
            LoadState::Pending => "pending",
            LoadState::Loading => "loading",
            LoadState::Ready => "ready",
            LoadState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for LoadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LoadState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            LoadState::Pending,
            LoadState::Loading,
            LoadState::Ready,
            LoadState::Failed,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| format!("unknown dataset state {s:?}"))
    }
}

/// One node's report on its share of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeProgress {
    pub node: String,
    pub state: LoadState,
    pub files_total: u64,
    pub files_ready: u64,
    pub bytes_total: u64,
    pub bytes_ready: u64,
    /// Bytes per second over the last few seconds of loading.
    pub rate: f64,
    /// Why the node failed or is waiting (empty otherwise).
    pub reason: String,
    /// Unix seconds of the report.
    pub updated: u64,
    /// The last verification request (`Pin::verify_seq`) this node has carried out.
    #[serde(default)]
    pub verified_seq: u64,
    /// Files found damaged and dropped (to be loaded again) by verifications so far.
    #[serde(default)]
    pub repaired: u64,
}

impl NodeProgress {
    pub fn percent(&self) -> f64 {
        percent(self.bytes_ready, self.bytes_total)
    }

    /// Seconds left at the current rate, when it is loading.
    pub fn eta_secs(&self) -> Option<u64> {
        (self.state == LoadState::Loading && self.rate > 0.0).then(|| {
            ((self.bytes_total - self.bytes_ready.min(self.bytes_total)) as f64 / self.rate) as u64
        })
    }
}

/// `ready` of `total` as a percentage; 100 only when every byte is there (an empty share is
/// complete). Rounded down to 0.01 so that 99.999% never shows as 100%.
pub fn percent(ready: u64, total: u64) -> f64 {
    if total == 0 || ready >= total {
        return if ready >= total { 100.0 } else { 0.0 };
    }
    ((ready as u128 * 10_000 / total as u128) as f64 / 100.0).min(99.99)
}

/// A dataset's readiness over the nodes it is to be loaded on: the overall state is `Ready` only
/// when every node of the set reports `Ready`; missing reports count as pending with nothing
/// present.
pub fn overall(
    nodes: &[String],
    reports: &[NodeProgress],
    expected: &[(u64, u64)],
) -> (LoadState, u64, u64) {
    let mut state = LoadState::Ready;
    let (mut ready, mut total) = (0u64, 0u64);
    for (i, node) in nodes.iter().enumerate() {
        let (_, want) = expected.get(i).copied().unwrap_or((0, 0));
        total += want;
        match reports.iter().find(|r| &r.node == node) {
            Some(r) => {
                ready += r.bytes_ready.min(want);
                state = worse(state, r.state);
            }
            None => state = worse(state, LoadState::Pending),
        }
    }
    if state == LoadState::Ready && ready < total {
        state = LoadState::Loading;
    }
    (state, ready, total)
}

fn worse(a: LoadState, b: LoadState) -> LoadState {
    let rank = |s| match s {
        LoadState::Ready => 0,
        LoadState::Loading => 1,
        LoadState::Pending => 2,
        LoadState::Failed => 3,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// Why a pin is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error(
        "tenant {tenant:?} would pin {wanted} bytes with {used} already pinned, over its quota of {quota} bytes"
    )]
    Tenant {
        tenant: String,
        used: u64,
        wanted: u64,
        quota: u64,
    },
    #[error(
        "tenant {tenant:?} would pin {wanted} files with {used} already pinned, over its quota of {quota} files"
    )]
    TenantFiles {
        tenant: String,
        used: u64,
        wanted: u64,
        quota: u64,
    },
    #[error(
        "node {node:?} would hold {wanted} bytes of this dataset but has {free} bytes free in its dataset store"
    )]
    Node {
        node: String,
        wanted: u64,
        free: u64,
    },
}

/// Checks a new pin of `bytes` (each byte stored `replicas` times) by `tenant` against its quota.
pub fn check_tenant_quota(
    tenant: &str,
    used: u64,
    bytes: u64,
    replicas: usize,
    quota: Option<u64>,
) -> Result<(), QuotaError> {
    let wanted = bytes.saturating_mul(replicas.max(1) as u64);
    match quota {
        Some(quota) if used.saturating_add(wanted) > quota => Err(QuotaError::Tenant {
            tenant: tenant.into(),
            used,
            wanted,
            quota,
        }),
        _ => Ok(()),
    }
}

/// Checks a new pin of `files` files by `tenant` against its file quota. Each file counts once,
/// whatever its replicas: every worker keeps each pinned file's manifest entry.
pub fn check_tenant_files(
    tenant: &str,
    used: u64,
    files: u64,
    quota: Option<u64>,
) -> Result<(), QuotaError> {
    match quota {
        Some(quota) if used.checked_add(files).is_none_or(|total| total > quota) => {
            Err(QuotaError::TenantFiles {
                tenant: tenant.into(),
                used,
                wanted: files,
                quota,
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_states_print_as_serde_writes_them_and_parse_back() {
        for state in [
            LoadState::Pending,
            LoadState::Loading,
            LoadState::Ready,
            LoadState::Failed,
        ] {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{state}\""));
            assert_eq!(state.as_str().parse::<LoadState>(), Ok(state));
        }
        assert_eq!(
            "done".parse::<LoadState>(),
            Err("unknown dataset state \"done\"".into())
        );
    }
    use proptest::prelude::*;

    fn file(path: &str, size: u64) -> ManifestFile {
        ManifestFile {
            path: path.into(),
            size,
            etag: None,
            version: None,
            mtime_ns: 0,
            owner: None,
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "imagenet-1k", "v1.2_x", "0abc"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "A", "a/b", "a b", &"x".repeat(64), "é"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_directories() {
        let m = Manifest::new(
            "/data/set".into(),
            vec![file("b/c.bin", 1), file("a.txt", 2), file("b/d/e", 3)],
        );
        assert_eq!(m.bytes(), 6);
        assert_eq!(m.file("b/c.bin").unwrap().size, 1);
        assert!(m.file("b").is_none());
        assert_eq!(
            m.children(""),
            vec![Child::File(&m.files[0]), Child::Dir("b")]
        );
        assert_eq!(
            m.children("b"),
            vec![Child::File(&m.files[1]), Child::Dir("d")]
        );
        assert_eq!(m.children("b/d"), vec![Child::File(&m.files[2])]);
        assert!(m.is_dir("") && m.is_dir("b") && m.is_dir("b/d"));
        assert!(!m.is_dir("a.txt") && !m.is_dir("b/c") && !m.is_dir("c"));
        assert!(m.children("nope").is_empty());
        assert_eq!(m.namespace_path(&m.files[0]), "/data/set/a.txt");
    }

    /// The entries directly in `dir`, by looking at every file.
    fn children_by_scan<'a>(m: &'a Manifest, dir: &str) -> Vec<Child<'a>> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut out: Vec<Child<'a>> = Vec::new();
        for f in m.files.iter().filter(|f| f.path.starts_with(&prefix)) {
            match f.path[prefix.len()..].split_once('/') {
                None => out.push(Child::File(f)),
                Some((name, _)) => {
                    if !out.contains(&Child::Dir(name)) {
                        out.push(Child::Dir(name));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn percent_is_100_only_when_complete() {
        assert_eq!(percent(0, 0), 100.0);
        assert_eq!(percent(10, 10), 100.0);
        assert_eq!(percent(999_999, 1_000_000), 99.99);
        assert_eq!(percent(5, 10), 50.0);
        assert_eq!(percent(0, 10), 0.0);
    }

    #[test]
    fn overall_needs_every_node() {
        let nodes = vec!["a".to_string(), "b".to_string()];
        let report = |node: &str, state, ready| NodeProgress {
            node: node.into(),
            state,
            files_total: 1,
            files_ready: 0,
            bytes_total: 10,
            bytes_ready: ready,
            rate: 0.0,
            reason: String::new(),
            updated: 0,
            verified_seq: 0,
            repaired: 0,
        };
        let expected = [(1, 10), (1, 10)];
        let r = [report("a", LoadState::Ready, 10)];
        assert_eq!(overall(&nodes, &r, &expected), (LoadState::Pending, 10, 20));
        let r = [
            report("a", LoadState::Ready, 10),
            report("b", LoadState::Loading, 4),
        ];
        assert_eq!(overall(&nodes, &r, &expected), (LoadState::Loading, 14, 20));
        let r = [
            report("a", LoadState::Ready, 10),
            report("b", LoadState::Ready, 10),
        ];
        assert_eq!(overall(&nodes, &r, &expected), (LoadState::Ready, 20, 20));
    }

    #[test]
    fn quotas() {
        assert!(check_tenant_quota("t", 0, 10, 2, Some(20)).is_ok());
        assert!(check_tenant_quota("t", 1, 10, 2, Some(20)).is_err());
        assert!(check_tenant_quota("t", u64::MAX, 10, 2, None).is_ok());
        assert!(check_tenant_files("t", 3, 7, Some(10)).is_ok());
        let e = check_tenant_files("t", 4, 7, Some(10)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tenant \"t\" would pin 7 files with 4 already pinned, over its quota of 10 files"
        );
        assert!(check_tenant_files("t", u64::MAX, 1, Some(u64::MAX)).is_err());
    }

    #[test]
    fn ttls_replicas_and_node_lists_are_range_checked() {
        assert_eq!(check_ttl(Duration::from_millis(10)), Ok(1));
        assert_eq!(check_ttl(MAX_TTL), Ok(MAX_TTL.as_secs()));
        let e = check_ttl(Duration::from_secs(u64::MAX)).unwrap_err();
        assert!(e.contains("over the limit"), "{e}");
        assert!(check_ttl(Duration::from_secs(999_999_999_999 * 3600)).is_err());
        assert_eq!(expiry(100, Duration::from_secs(5)), Ok(105));
        assert!(expiry(u64::MAX, Duration::from_secs(5)).is_err());
        assert!(expiry(0, Duration::from_secs(u64::MAX)).is_err());
        assert!(check_replicas(1).is_ok() && check_replicas(MAX_REPLICAS).is_ok());
        for bad in [0, MAX_REPLICAS + 1, u32::MAX as usize] {
            let e = check_replicas(bad).unwrap_err();
            assert!(e.contains("out of range"), "{e}");
        }
        assert!(check_node_list(&["w1".into(), "node-b.zone".into()]).is_ok());
        for bad in ["", "a b", "a/b", "x\u{0}", &"n".repeat(MAX_NODE_ID + 1)] {
            assert!(check_node_list(&[bad.to_string()]).is_err(), "{bad:?}");
        }
        let many = vec!["n".to_string(); MAX_NODES + 1];
        assert!(check_node_list(&many).unwrap_err().contains("at most"));
    }

    proptest! {
        /// Listing by binary search finds what looking at every file finds, in every directory
        /// (names that sort around `/`, like `a.b`, `a/`, `a0`, included).
        #[test]
        fn children_match_a_full_scan(
            paths in proptest::collection::btree_set("[ab.0]{1,2}(/[ab.0]{1,2}){0,3}", 1..40),
        ) {
            let files: Vec<ManifestFile> = paths.iter().map(|p| file(p, 1)).collect();
            let m = Manifest::new("/d".into(), files);
            let mut dirs: Vec<String> = vec![String::new()];
            for f in m.files.iter() {
                let parts: Vec<&str> = f.path.split('/').collect();
                for n in 1..parts.len() {
                    dirs.push(parts[..n].join("/"));
                }
                dirs.push(f.path.clone());
            }
            for dir in dirs {
                prop_assert_eq!(m.children(&dir), children_by_scan(&m, &dir), "{}", dir);
                prop_assert_eq!(m.is_dir(&dir), dir.is_empty() || m.files.iter().any(|f| f.path.starts_with(&format!("{dir}/"))));
            }
        }

        /// Each file is held by exactly `replicas` distinct nodes of the set, and the shares of
        /// all nodes add up to the manifest times the replicas.
        #[test]
        fn striping_covers_every_byte(
            sizes in proptest::collection::vec(0u64..1000, 1..60),
            n in 1usize..6,
            replicas in 1usize..4,
        ) {
            let files = sizes.iter().enumerate().map(|(i, s)| file(&format!("f{i}"), *s)).collect();
            let m = Manifest::new("/d".into(), files);
            let nodes: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
            let r = replicas.min(n);
            for f in m.files.iter() {
                let h = holders(&f.path, &nodes, replicas);
                prop_assert_eq!(h.len(), r);
                let mut ids: Vec<&String> = h.clone();
                ids.dedup();
                prop_assert_eq!(ids.len(), r);
            }
            let total: u64 = nodes.iter().map(|node| share(&m, &nodes, replicas, node).1).sum();
            prop_assert_eq!(total, m.bytes() * r as u64);
        }
    }
}
