//! The `Datasets` gRPC service of a worker and its client (for `granary dataset ...`).
//!
//! The caller's bearer token travels in the `authorization` metadata (`Bearer <token>`).

use crate::dataset_api::{DatasetStatus, PinRequest};
use crate::rpc_metrics::record;
use crate::worker::Worker;
use granary_core::dataset::{LoadState, NodeProgress};
use granary_proto::{ApiError, pb};
use std::sync::Arc;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

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

pub struct DatasetService {
    pub worker: Arc<Worker>,
}

fn token<T>(req: &Request<T>) -> Option<String> {
    let value = req.metadata().get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

fn done<T>(method: &'static str, result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    record(method, &result);
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl pb::datasets_server::Datasets for DatasetService {
    async fn pin(
        &self,
        req: Request<pb::PinRequest>,
    ) -> Result<Response<pb::DatasetStatus>, Status> {
        let api = self.worker.dataset_api();
        let caller = api.authenticate(token(&req).as_deref());
        let r = req.into_inner();
        let result = async {
            let request = PinRequest {
                name: r.name,
                path: r.path,
                tenant: r.tenant,
                ttl: r.ttl_secs.map(Duration::from_secs),
                nodes: r.nodes,
                replicas: r.replicas as usize,
            };
            let s = api.pin_dataset(&*self.worker, &caller?, request).await?;
            Ok(pb::DatasetStatus::from(&s))
        };
        done("dataset_pin", result.await)
    }

    async fn load(
        &self,
        req: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::DatasetStatus>, Status> {
        let api = self.worker.dataset_api();
        let caller = api.authenticate(token(&req).as_deref());
        let r = req.into_inner();
        let result = async {
            let s = api.load_dataset(&caller?, &r.name, r.nodes).await?;
            Ok(pb::DatasetStatus::from(&s))
        };
        done("dataset_load", result.await)
    }

    async fn unpin(
        &self,
        req: Request<pb::DatasetName>,
    ) -> Result<Response<pb::UnpinReply>, Status> {
        let api = self.worker.dataset_api();
        let caller = api.authenticate(token(&req).as_deref());
        let name = req.into_inner().name;
        let result = async {
            api.unpin_dataset(&caller?, &name).await?;
            Ok(pb::UnpinReply {})
        };
        done("dataset_unpin", result.await)
    }

    async fn status(
        &self,
        req: Request<pb::DatasetName>,
    ) -> Result<Response<pb::DatasetStatus>, Status> {
        let api = self.worker.dataset_api();
        let caller = api.authenticate(token(&req).as_deref());
        let name = req.into_inner().name;
        let result = async {
            let s = api.dataset_status(&caller?, &name).await?;
            Ok(pb::DatasetStatus::from(&s))
        };
        done("dataset_status", result.await)
    }

    async fn list(
        &self,
        req: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::DatasetList>, Status> {
        let api = self.worker.dataset_api();
        let caller = api.authenticate(token(&req).as_deref());
        let result = async {
            let all = api.list_datasets(&caller?).await?;
            Ok(pb::DatasetList {
                datasets: all.iter().map(pb::DatasetStatus::from).collect(),
            })
        };
        done("dataset_list", result.await)
    }

    async fn verify(
        &self,
        req: Request<pb::DatasetName>,
    ) -> Result<Response<pb::VerifyReply>, Status> {
        let api = self.worker.dataset_api();
        let caller = api.authenticate(token(&req).as_deref());
        let name = req.into_inner().name;
        let result = async {
            let seq = api.verify_dataset(&caller?, &name).await?;
            Ok(pb::VerifyReply { seq })
        };
        done("dataset_verify", result.await)
    }
}

/// A client of a worker's `Datasets` service.
#[derive(Clone)]
pub struct DatasetClient {
    client: pb::datasets_client::DatasetsClient<tonic::transport::Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl DatasetClient {
    pub async fn connect(addr: &str, token: Option<&str>) -> Result<Self, ApiError> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ApiError::Invalid(format!("bad server address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(300));
        let channel = endpoint.connect().await.map_err(|e| {
            ApiError::Unavailable(format!("cannot reach the worker at {addr}: {e}"))
        })?;
        let token = token
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| {
                    ApiError::Invalid("the token has characters a header cannot carry".into())
                })
            })
            .transpose()?;
        Ok(DatasetClient {
            client: pb::datasets_client::DatasetsClient::new(channel)
                .max_decoding_message_size(granary_proto::MAX_MESSAGE_BYTES),
            token,
        })
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(t) = &self.token {
            req.metadata_mut().insert("authorization", t.clone());
        }
        req
    }

    pub async fn pin(&self, r: &PinRequest) -> Result<DatasetStatus, ApiError> {
        let msg = pb::PinRequest {
            name: r.name.clone(),
            path: r.path.clone(),
            tenant: r.tenant.clone(),
            ttl_secs: r.ttl.map(|t| t.as_secs().max(1)),
            nodes: r.nodes.clone(),
            replicas: r.replicas as u32,
        };
        let s = self
            .client
            .clone()
            .pin(self.request(msg))
            .await?
            .into_inner();
        DatasetStatus::try_from(s)
    }

    pub async fn load(&self, name: &str, nodes: Vec<String>) -> Result<DatasetStatus, ApiError> {
        let msg = pb::LoadRequest {
            name: name.into(),
            nodes,
        };
        let s = self
            .client
            .clone()
            .load(self.request(msg))
            .await?
            .into_inner();
        DatasetStatus::try_from(s)
    }

    pub async fn unpin(&self, name: &str) -> Result<(), ApiError> {
        let msg = pb::DatasetName { name: name.into() };
        self.client.clone().unpin(self.request(msg)).await?;
        Ok(())
    }

    pub async fn status(&self, name: &str) -> Result<DatasetStatus, ApiError> {
        let msg = pb::DatasetName { name: name.into() };
        let s = self
            .client
            .clone()
            .status(self.request(msg))
            .await?
            .into_inner();
        DatasetStatus::try_from(s)
    }

    pub async fn list(&self) -> Result<Vec<DatasetStatus>, ApiError> {
        let list = self
            .client
            .clone()
            .list(self.request(pb::ListDatasetsRequest {}))
            .await?
            .into_inner();
        list.datasets
            .into_iter()
            .map(DatasetStatus::try_from)
            .collect()
    }

    pub async fn verify(&self, name: &str) -> Result<u64, ApiError> {
        let msg = pb::DatasetName { name: name.into() };
        Ok(self
            .client
            .clone()
            .verify(self.request(msg))
            .await?
            .into_inner()
            .seq)
    }
}
