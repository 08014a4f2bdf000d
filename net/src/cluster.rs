//! [`ClusterClient`]: the worker API of a whole cluster, for a FUSE client.
//!
//! Metadata (stat, list) goes over gRPC to any live worker (the local one first). Each block is read over QUIC from
//! the worker that owns it (rendezvous placement over the live members, the same function the
//! workers use), so a block is fetched from the backend once for the whole cluster and cached
//! where it belongs. When an owner does not answer within the peer timeout, the next owner is
//! tried, then every other worker (which fetches from the backend itself): a worker crash costs
//! a reader time, never an error and never wrong bytes.
//!
//! A client that runs beside a worker (`with_local_node`) reads what that worker holds from it:
//! first among the owners when it is one, else with a held-only request (answered from its cache
//! or refused at once, never fetched) before going to the owners.

use crate::client::GrpcCache;
use crate::membership::{MemberInfo, Membership};
use crate::quic::BlockClient;
use crate::tls::TlsIdentity;
use granary_core::BlockKey;
use granary_core::placement::ask_order;
use granary_proto::{ApiError, Block, CacheApi, Entry, Info, ObjectRef};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct ClusterClient {
    membership: Membership,
    blocks: BlockClient,
    tls: TlsIdentity,
    api: Mutex<HashMap<String, GrpcCache>>,
    info: Info,
    replicas: usize,
    timeout: Duration,
    local: Option<String>,
}

impl std::fmt::Debug for ClusterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl ClusterClient {
    /// Connects to the cluster `membership` describes, with our TLS identity for the data plane.
    pub async fn connect(
        membership: Membership,
        tls: &TlsIdentity,
        replicas: usize,
        timeout: Duration,
    ) -> Result<Self, ApiError> {
        let blocks = BlockClient::new(tls).map_err(|e| ApiError::Invalid(e.to_string()))?;
        let view = membership.view();
        let mut last = ApiError::Unavailable("the cluster has no live members".into());
        for member in &view.members {
            let addr = member.api_addr.to_string();
            match GrpcCache::connect(&addr, Some(tls), Some(&member.node_id), timeout).await {
                Ok(api) => {
                    let info = api.info();
                    let client = ClusterClient {
                        membership,
                        blocks,
                        tls: tls.clone(),
                        api: Mutex::new(HashMap::from([(member.node_id.clone(), api)])),
                        info,
                        replicas: replicas.max(1),
                        timeout,
                        local: None,
                    };
                    return Ok(client);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Reads blocks the worker `node_id` (the one on this machine) holds from it first.
    pub fn with_local_node(mut self, node_id: Option<String>) -> Self {
        self.local = node_id;
        self
    }

    /// The local worker when it is a live member of `members` and not among `owners`.
    fn local_non_owner<'a>(
        &self,
        members: &'a [MemberInfo],
        owners: &[&MemberInfo],
    ) -> Option<&'a MemberInfo> {
        let local = self.local.as_deref()?;
        if owners.iter().any(|m| m.node_id == local) {
            return None;
        }
        members.iter().find(|m| m.node_id == local)
    }

    async fn api_of(&self, member: &MemberInfo) -> Result<GrpcCache, ApiError> {
        if let Some(api) = self.api.lock().expect("api map").get(&member.node_id) {
            return Ok(api.clone());
        }
        let api = GrpcCache::connect(
            &member.api_addr.to_string(),
            Some(&self.tls),
            Some(&member.node_id),
            self.timeout,
        )
        .await?;
        self.api
            .lock()
            .expect("api map")
            .insert(member.node_id.clone(), api.clone());
        Ok(api)
    }

    /// The API of the local worker, when it is a live member.
    async fn local_api(&self) -> Result<Option<GrpcCache>, ApiError> {
        let view = self.membership.view();
        let local = self
            .local
            .as_deref()
            .and_then(|id| view.members.iter().find(|m| m.node_id == id));
        match local {
            Some(member) => self.api_of(member).await.map(Some),
            None => Ok(None),
        }
    }

    /// Runs a metadata call on the live members in turn until one answers.
    async fn any_member<T, F, Fut>(&self, call: F) -> Result<T, ApiError>
    where
        F: Fn(GrpcCache) -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let view = self.membership.view();
        let mut members: Vec<&MemberInfo> = view.members.iter().collect();
        if let Some(local) = self.local.as_deref() {
            members.sort_by_key(|m| m.node_id != local);
        }
        let mut last = ApiError::Unavailable("the cluster has no live members".into());
        for member in members {
            let result = match self.api_of(member).await {
                Ok(api) => call(api).await,
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.worth_retrying_elsewhere() => {
                    self.api.lock().expect("api map").remove(&member.node_id);
                    last = e;
                }
                other => return other,
            }
        }
        Err(last)
    }
}

impl CacheApi for ClusterClient {
    fn info(&self) -> Info {
        self.info.clone()
    }

    async fn stat(&self, path: &str) -> Result<Entry, ApiError> {
        self.any_member(|api| async move { api.stat(path).await })
            .await
    }

    async fn list(&self, path: &str) -> Result<Arc<Vec<Entry>>, ApiError> {
        self.any_member(|api| async move { api.list(path).await })
            .await
    }

    async fn local_copy(&self, object: &ObjectRef) -> Result<Option<std::path::PathBuf>, ApiError> {
        match self.local_api().await? {
            Some(api) => api.local_copy(object).await,
            None => Ok(None),
        }
    }

    /// The local worker's: the one metadata calls go to first. Without a local worker, `None`
    /// (pinned entries from any member are trusted for the attribute TTL only).
    async fn pins_epoch(&self) -> Result<Option<u64>, ApiError> {
        match self.local_api().await? {
            Some(api) => api.pins_epoch().await,
            None => Ok(None),
        }
    }

    async fn read_block(&self, object: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        let view = self.membership.view();
        let key = BlockKey::new(object.id.fingerprint(), index);
        let order = ask_order(key, &view.members, self.replicas, self.local.as_deref());
        if let Some(local) = self.local_non_owner(&view.members, &order.owners) {
            let held = self.blocks.read_held_block(
                local.data_addr,
                &local.node_id,
                object,
                index,
                self.timeout.min(Duration::from_secs(2)),
            );
            if let Ok(block) = held.await {
                return Ok(block);
            }
        }
        let mut last = ApiError::Unavailable("the cluster has no live members".into());
        for member in order.all() {
            match self
                .blocks
                .read_block(
                    member.data_addr,
                    &member.node_id,
                    object,
                    index,
                    self.timeout,
                )
                .await
            {
                Err(e) if e.worth_retrying_elsewhere() => {
                    tracing::warn!(node = %member.node_id, error = %e, "block read failed; trying the next worker");
                    last = e;
                }
                result => return result,
            }
        }
        Err(last)
    }
}
