//! The client of a worker's Datasets API (pin, load, status, list, unpin, verify), with a tenant
//! or admin token as a bearer header.

use granary_proto::datasets::{DatasetStatus, PinRequest};
use granary_proto::{ApiError, pb};
use std::time::Duration;
use tonic::Request;
use tonic::metadata::MetadataValue;

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
