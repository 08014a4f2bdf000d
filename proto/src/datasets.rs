//! The Datasets API's request and status types, and their one conversion to and from the wire
//! (`pb::DatasetStatus`), shared by the worker's service and every client.

use crate::{ApiError, pb};
use granary_core::ByteSize;
use granary_core::dataset::{LoadState, NodeProgress};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What `pin` asks for.
#[derive(Debug, Clone, Default)]
pub struct PinRequest {
    pub name: String,
    pub path: String,
    pub tenant: Option<String>,
    pub ttl: Option<Duration>,
    pub nodes: Vec<String>,
    pub replicas: usize,
}

/// A dataset's state as `status` and `list` report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetStatus {
    pub name: String,
    pub tenant: String,
    pub path: String,
    pub files: u64,
    pub bytes: u64,
    pub replicas: u64,
    pub nodes: Vec<String>,
    pub expires_at: Option<u64>,
    pub created_at: u64,
    pub load: bool,
    pub state: LoadState,
    /// Bytes present and verified on the node set / bytes the set must hold (every replica).
    pub percent: f64,
    pub bytes_ready: u64,
    pub bytes_total: u64,
    pub verify_seq: u64,
    pub node_progress: Vec<NodeProgress>,
}

impl std::fmt::Display for DatasetStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{}  tenant {}  {}  {} files, {}  x{}  {}  {:.2}%",
            self.name,
            self.tenant,
            self.path,
            self.files,
            ByteSize(self.bytes),
            self.replicas,
            self.state,
            self.percent
        )?;
        for p in &self.node_progress {
            let eta = p
                .eta_secs()
                .map(|s| format!("  eta {s}s"))
                .unwrap_or_default();
            writeln!(
                f,
                "  {:<16} {:<8} {:>7.2}%  {}/{} files  {}/{}  {}/s{eta}{}",
                p.node,
                p.state.as_str(),
                p.percent(),
                p.files_ready,
                p.files_total,
                ByteSize(p.bytes_ready),
                ByteSize(p.bytes_total),
                ByteSize(p.rate as u64),
                if p.reason.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", p.reason)
                }
            )?;
        }
        Ok(())
    }
}

fn state_of(s: &str) -> Result<LoadState, ApiError> {
    s.parse().map_err(ApiError::Invalid)
}

impl From<&DatasetStatus> for pb::DatasetStatus {
    fn from(s: &DatasetStatus) -> Self {
        pb::DatasetStatus {
            name: s.name.clone(),
            tenant: s.tenant.clone(),
            path: s.path.clone(),
            files: s.files,
            bytes: s.bytes,
            replicas: s.replicas as u32,
            nodes: s.nodes.clone(),
            expires_at: s.expires_at,
            created_at: s.created_at,
            load: s.load,
            state: s.state.to_string(),
            percent: s.percent,
            bytes_ready: s.bytes_ready,
            bytes_total: s.bytes_total,
            verify_seq: s.verify_seq,
            node_progress: s
                .node_progress
                .iter()
                .map(|p| pb::NodeProgress {
                    node: p.node.clone(),
                    state: p.state.to_string(),
                    files_total: p.files_total,
                    files_ready: p.files_ready,
                    bytes_total: p.bytes_total,
                    bytes_ready: p.bytes_ready,
                    rate: p.rate,
                    reason: p.reason.clone(),
                    updated: p.updated,
                    verified_seq: p.verified_seq,
                    repaired: p.repaired,
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::DatasetStatus> for DatasetStatus {
    type Error = ApiError;

    fn try_from(s: pb::DatasetStatus) -> Result<Self, ApiError> {
        let node_progress = s
            .node_progress
            .into_iter()
            .map(|p| {
                Ok(NodeProgress {
                    node: p.node,
                    state: state_of(&p.state)?,
                    files_total: p.files_total,
                    files_ready: p.files_ready,
                    bytes_total: p.bytes_total,
                    bytes_ready: p.bytes_ready,
                    rate: p.rate,
                    reason: p.reason,
                    updated: p.updated,
                    verified_seq: p.verified_seq,
                    repaired: p.repaired,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(DatasetStatus {
            name: s.name,
            tenant: s.tenant,
            path: s.path,
            files: s.files,
            bytes: s.bytes,
            replicas: s.replicas as u64,
            nodes: s.nodes,
            expires_at: s.expires_at,
            created_at: s.created_at,
            load: s.load,
            state: state_of(&s.state)?,
            percent: s.percent,
            bytes_ready: s.bytes_ready,
            bytes_total: s.bytes_total,
            verify_seq: s.verify_seq,
            node_progress,
        })
    }
}
