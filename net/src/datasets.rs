//! The client of a worker's Datasets API (pin, load, status, list, unpin, verify), with a tenant
//! or admin token as a bearer header.

use crate::tls::TlsIdentity;
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
    /// Without TLS: failures get a hint that the worker may speak TLS only.
    plaintext: bool,
}

impl DatasetClient {
    /// A plaintext client (a worker on this machine without `[tls]`).
    pub async fn connect(addr: &str, token: Option<&str>) -> Result<Self, ApiError> {
        Self::connect_with(addr, None, token).await
    }

    /// A client of the worker at `addr`; with `tls`, over TLS with the cluster CA (and our
    /// certificate when `tls` has one).
    pub async fn connect_with(
        addr: &str,
        tls: Option<&TlsIdentity>,
        token: Option<&str>,
    ) -> Result<Self, ApiError> {
        let channel = crate::channel::connect(
            addr,
            tls,
            None,
            Duration::from_secs(5),
            Duration::from_secs(300),
        )
        .await?;
        let token = token.map(crate::client::bearer).transpose()?;
        Ok(DatasetClient {
            client: pb::datasets_client::DatasetsClient::new(channel)
                .max_decoding_message_size(granary_proto::MAX_MESSAGE_BYTES),
            token,
            plaintext: tls.is_none(),
        })
    }

    fn fail(&self, status: tonic::Status) -> ApiError {
        crate::client::plaintext_hint(ApiError::from(status), self.plaintext)
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
            .await
            .map_err(|s| self.fail(s))?
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
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        DatasetStatus::try_from(s)
    }

    pub async fn unpin(&self, name: &str) -> Result<(), ApiError> {
        let msg = pb::DatasetName { name: name.into() };
        self.client
            .clone()
            .unpin(self.request(msg))
            .await
            .map_err(|s| self.fail(s))?;
        Ok(())
    }

    pub async fn status(&self, name: &str) -> Result<DatasetStatus, ApiError> {
        let msg = pb::DatasetName { name: name.into() };
        let s = self
            .client
            .clone()
            .status(self.request(msg))
            .await
            .map_err(|s| self.fail(s))?
            .into_inner();
        DatasetStatus::try_from(s)
    }

    pub async fn list(&self) -> Result<Vec<DatasetStatus>, ApiError> {
        let list = self
            .client
            .clone()
            .list(self.request(pb::ListDatasetsRequest {}))
            .await
            .map_err(|s| self.fail(s))?
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
            .await
            .map_err(|s| self.fail(s))?
            .into_inner()
            .seq)
    }
}
