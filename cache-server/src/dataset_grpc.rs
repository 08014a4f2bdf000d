//! The `Datasets` gRPC service of a worker (its client is `granary_net::datasets`).
//!
//! The caller's bearer token travels in the `authorization` metadata (`Bearer <token>`).

use crate::rpc_metrics::record;
use crate::worker::Worker;
use granary_proto::datasets::PinRequest;
use granary_proto::{ApiError, pb};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

pub struct DatasetService {
    pub worker: Arc<Worker>,
}

/// The caller's bearer token, if it sent one.
pub(crate) fn token<T>(req: &Request<T>) -> Option<String> {
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
