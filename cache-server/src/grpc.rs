//! The worker's gRPC service: any [`CacheApi`] served over tonic, with the API's one error mapping.
//!
//! With TLS (the worker's `[tls]`), the listener speaks TLS only and every cache RPC but `Info`
//! needs a client certificate the cluster CA signed (a node: a worker or a node's FUSE client);
//! `LocalCopy` also needs the caller on this machine. The Datasets service checks bearer tokens
//! (`dataset_grpc`). Without TLS a worker listens on loopback only (`granary server` refuses
//! anything else), where the machine's users are the callers.

use crate::rpc_metrics::record;
use crate::tenant_view::TenantViews;
use granary_net::tls::TlsIdentity;
use granary_proto::{ApiError, CacheApi, MAX_MESSAGE_BYTES, ObjectRef, pb};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

pub struct CacheService<A> {
    api: Arc<A>,
    /// Whether callers must present a client certificate (the listener is TLS).
    certificates: bool,
    /// What a tenant's token may read (`None`: no tenant views, everyone reads everything).
    views: Option<Arc<TenantViews>>,
}

impl<A> CacheService<A> {
    /// The tenant whose view the request gets, from its bearer token, with the views (`None`:
    /// everything).
    fn tenant<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
    ) -> Result<Option<(&TenantViews, String)>, Status> {
        let Some(views) = &self.views else {
            return Ok(None);
        };
        let token = crate::dataset_grpc::token(req);
        match views.caller(token.as_deref()) {
            Ok(tenant) => Ok(tenant.map(|t| (views.as_ref(), t))),
            Err(e) => {
                metrics::counter!(granary_core::metrics::RPC_REFUSED, "method" => method, "reason" => "bad_token")
                    .increment(1);
                Err(Status::from(e))
            }
        }
    }

    /// Whether the caller presented a certificate the cluster CA signed (always, without TLS:
    /// then only this machine's users reach the listener).
    fn is_node<T>(&self, req: &Request<T>) -> bool {
        !self.certificates || req.peer_certs().is_some_and(|c| !c.is_empty())
    }

    /// Refuses a request without a verified client certificate when the listener is TLS.
    fn node_only<T>(&self, req: &Request<T>, method: &'static str) -> Result<(), Status> {
        if self.is_node(req) {
            return Ok(());
        }
        metrics::counter!(granary_core::metrics::RPC_REFUSED, "method" => method, "reason" => "no_certificate")
            .increment(1);
        Err(Status::unauthenticated(format!(
            "{method} is for cluster nodes: connect with a client certificate the cluster CA signed (--tls-dir DIR --tls-name NAME)"
        )))
    }
}

#[tonic::async_trait]
impl<A: CacheApi> pb::cache_server::Cache for CacheService<A> {
    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let info = self.api.info();
        // Where this machine keeps its files is for nodes (the FUSE client checking a
        // LocalCopy path), not for anyone who may ask for the counters.
        let node = self.is_node(&req);
        Ok(Response::new(pb::InfoResponse {
            node_id: info.node_id,
            block_size: info.block_size.get(),
            memory_capacity: info.memory_capacity,
            disk_capacity: info.disk_capacity,
            stats: Some((&info.stats).into()),
            dataset_store: self
                .api
                .dataset_store()
                .filter(|_| node)
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }))
    }

    async fn local_copy(
        &self,
        req: Request<pb::ObjectRef>,
    ) -> Result<Response<pb::LocalCopyReply>, Status> {
        self.node_only(&req, "local_copy")?;
        let tenant = self.tenant(&req, "local_copy")?;
        // A path means something only on this machine: answer callers on it alone (the
        // connection's two ends share an address), never a client elsewhere that might hold
        // another file at the same path.
        let same_host = match (req.remote_addr(), req.local_addr()) {
            (Some(remote), Some(local)) => remote.ip() == local.ip() || remote.ip().is_loopback(),
            _ => false,
        };
        if !same_host {
            metrics::counter!(granary_core::metrics::RPC_REFUSED, "method" => "local_copy", "reason" => "not_local")
                .increment(1);
            return Ok(Response::new(pb::LocalCopyReply { path: None }));
        }
        let object = ObjectRef::from(req.into_inner());
        if let Some((views, t)) = &tenant {
            views.check_object(t, &object)?;
        }
        let path = self.api.local_copy(&object).await?;
        Ok(Response::new(pb::LocalCopyReply {
            path: path.map(|p| p.to_string_lossy().into_owned()),
        }))
    }

    async fn pins_epoch(
        &self,
        req: Request<pb::PinsEpochRequest>,
    ) -> Result<Response<pb::PinsEpochReply>, Status> {
        self.node_only(&req, "pins_epoch")?;
        let epoch = self.api.pins_epoch().await?;
        Ok(Response::new(pb::PinsEpochReply { epoch }))
    }

    async fn stat(&self, req: Request<pb::StatRequest>) -> Result<Response<pb::Entry>, Status> {
        self.node_only(&req, "stat")?;
        let tenant = self.tenant(&req, "stat")?;
        let path = req.into_inner().path;
        let result = match &tenant {
            Some((views, t)) => match views.check_path(t, &path) {
                Ok(()) => self.api.stat(&path).await,
                Err(e) => Err(e),
            },
            None => self.api.stat(&path).await,
        };
        record("stat", &result);
        Ok(Response::new(pb::Entry::from(&result?)))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.node_only(&req, "list")?;
        let tenant = self.tenant(&req, "list")?;
        let path = req.into_inner().path;
        let result = match &tenant {
            Some((views, t)) => match views.check_path(t, &path) {
                Ok(()) => self
                    .api
                    .list(&path)
                    .await
                    .map(|entries| views.filter(t, &path, entries)),
                Err(e) => Err(e),
            },
            None => self.api.list(&path).await,
        };
        record("list", &result);
        let entries = result?.iter().map(pb::Entry::from).collect();
        Ok(Response::new(pb::ListResponse { entries }))
    }

    async fn read_block(
        &self,
        req: Request<pb::ReadBlockRequest>,
    ) -> Result<Response<pb::BlockData>, Status> {
        self.node_only(&req, "read_block")?;
        let tenant = self.tenant(&req, "read_block")?;
        let req = req.into_inner();
        let result = match req.object.map(ObjectRef::from) {
            None => Err(ApiError::Invalid("read_block without an object".into())),
            Some(object) => match &tenant {
                Some((views, t)) => match views.check_object(t, &object) {
                    Ok(()) => self.api.read_block(&object, req.index).await,
                    Err(e) => Err(e),
                },
                None => self.api.read_block(&object, req.index).await,
            },
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

/// Serves `api` on `listener` until `shutdown` completes: TLS only with `tls`, else plaintext.
pub async fn serve<A: CacheApi>(
    api: Arc<A>,
    listener: TcpListener,
    tls: Option<TlsIdentity>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let certificates = tls.is_some();
    let service = pb::cache_server::CacheServer::new(CacheService {
        api,
        certificates,
        views: None,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    run(builder().add_service(service), listener, tls, shutdown).await
}

/// Serves a worker's whole API on `listener`: the cache service and the dataset control service;
/// TLS only with `tls`, else plaintext.
pub async fn serve_worker(
    worker: Arc<crate::Worker>,
    listener: TcpListener,
    tls: Option<TlsIdentity>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let cache = pb::cache_server::CacheServer::new(CacheService {
        api: worker.clone(),
        certificates: tls.is_some(),
        views: Some(Arc::new(TenantViews::new(worker.settings()))),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let datasets =
        pb::datasets_server::DatasetsServer::new(crate::dataset_grpc::DatasetService { worker })
            .max_decoding_message_size(crate::dataset_api::MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = builder().add_service(cache).add_service(datasets);
    run(router, listener, tls, shutdown).await
}

/// Runs `router` on `listener`: over the TLS accept loop with `tls`, else plaintext.
async fn run(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Option<TlsIdentity>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    match &tls {
        Some(tls) => {
            let incoming = granary_net::channel::tls_incoming(listener, tls.grpc_server_config()?);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?
        }
        None => {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await?
        }
    }
    Ok(())
}

fn builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        // Bounded per connection: a client cannot open unbounded concurrent streams.
        .max_concurrent_streams(Some(1024))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC TLS: {0}")]
    Tls(#[from] granary_net::tls::TlsError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}
