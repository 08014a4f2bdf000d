//! The worker's gRPC service: any [`CacheApi`] served over tonic, with the API's one error mapping.

use crate::rpc_metrics::record;
use granary_proto::{ApiError, CacheApi, MAX_MESSAGE_BYTES, ObjectRef, pb};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

pub struct CacheService<A> {
    api: Arc<A>,
}

#[tonic::async_trait]
impl<A: CacheApi> pb::cache_server::Cache for CacheService<A> {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let info = self.api.info();
        Ok(Response::new(pb::InfoResponse {
            node_id: info.node_id,
            block_size: info.block_size.get(),
            memory_capacity: info.memory_capacity,
            disk_capacity: info.disk_capacity,
            stats: Some((&info.stats).into()),
        }))
    }

    async fn local_copy(
        &self,
        req: Request<pb::ObjectRef>,
    ) -> Result<Response<pb::LocalCopyReply>, Status> {
        // A path means something only on this machine: answer callers on it alone (the
        // connection's two ends share an address), never a client elsewhere that might hold
        // another file at the same path.
        let same_host = match (req.remote_addr(), req.local_addr()) {
            (Some(remote), Some(local)) => remote.ip() == local.ip() || remote.ip().is_loopback(),
            _ => false,
        };
        if !same_host {
            return Ok(Response::new(pb::LocalCopyReply { path: None }));
        }
        let object = ObjectRef::from(req.into_inner());
        let path = self.api.local_copy(&object).await?;
        Ok(Response::new(pb::LocalCopyReply {
            path: path.map(|p| p.to_string_lossy().into_owned()),
        }))
    }

    async fn pins_epoch(
        &self,
        _: Request<pb::PinsEpochRequest>,
    ) -> Result<Response<pb::PinsEpochReply>, Status> {
        let epoch = self.api.pins_epoch().await?;
        Ok(Response::new(pb::PinsEpochReply { epoch }))
    }

    async fn stat(&self, req: Request<pb::StatRequest>) -> Result<Response<pb::Entry>, Status> {
        let result = self.api.stat(&req.into_inner().path).await;
        record("stat", &result);
        Ok(Response::new(pb::Entry::from(&result?)))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let result = self.api.list(&req.into_inner().path).await;
        record("list", &result);
        let entries = result?.iter().map(pb::Entry::from).collect();
        Ok(Response::new(pb::ListResponse { entries }))
    }

    async fn read_block(
        &self,
        req: Request<pb::ReadBlockRequest>,
    ) -> Result<Response<pb::BlockData>, Status> {
        let req = req.into_inner();
        let result = match req.object {
            None => Err(ApiError::Invalid("read_block without an object".into())),
            Some(object) => self.api.read_block(&object.into(), req.index).await,
        };
        record("read_block", &result);
        let block = result?;
        Ok(Response::new(pb::BlockData {
            data: block.data,
            crc32c: block.crc32c,
            origin: block.origin.code() as u32,
        }))
    }
}

/// Binds the gRPC listener (so that a bad or busy address fails before anything else starts).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `api` on `listener` until `shutdown` completes.
pub async fn serve<A: CacheApi>(
    api: Arc<A>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let service = pb::cache_server::CacheServer::new(CacheService { api })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

/// Serves a worker's whole API on `listener`: the cache service and the dataset control service.
pub async fn serve_worker(
    worker: Arc<crate::Worker>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let cache = pb::cache_server::CacheServer::new(CacheService {
        api: worker.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let datasets =
        pb::datasets_server::DatasetsServer::new(crate::dataset_grpc::DatasetService { worker })
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .add_service(cache)
        .add_service(datasets)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
