//! [`GrpcCache`]: the worker API over gRPC, for a client on another node than its worker.

use crate::tls::TlsIdentity;
use granary_core::BlockSize;
use granary_proto::{ApiError, Block, CacheApi, Entry, Info, MAX_MESSAGE_BYTES, ObjectRef, pb};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

type Client = pb::cache_client::CacheClient<Channel>;

/// A connection to one worker.
#[derive(Clone)]
pub struct GrpcCache {
    client: Client,
    /// `Bearer <token>`: a tenant's view of the worker's namespace (`with_token`).
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    info: Info,
    /// The worker's dataset store (from its info): the only place a local copy may be.
    dataset_store: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for GrpcCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcCache")
            .field("info", &self.info)
            .finish()
    }
}

impl GrpcCache {
    /// Connects to a worker at `addr` (`host:port`) and asks its info. With `tls`, the worker
    /// must present a certificate the cluster CA signed for `server_name` (default: the host of
    /// `addr`), and we present ours.
    pub async fn connect(
        addr: &str,
        tls: Option<&TlsIdentity>,
        server_name: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, ApiError> {
        let channel = crate::channel::connect(addr, tls, server_name, timeout, timeout).await?;
        let mut client = pb::cache_client::CacheClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let info = client
            .info(pb::InfoRequest {})
            .await
            .map_err(|status| plaintext_hint(ApiError::from(status), tls.is_none()))?
            .into_inner();
        let block_size = BlockSize::new(info.block_size)
            .map_err(|e| ApiError::Invalid(format!("worker {addr} reports {e}")))?;
        Ok(GrpcCache {
            client,
            token: None,
            // Resolved once: LocalCopy answers are checked against it at every open.
            dataset_store: Some(info.dataset_store.as_str())
                .filter(|p| !p.is_empty())
                .and_then(|p| std::path::Path::new(p).canonicalize().ok()),
            info: Info {
                node_id: info.node_id,
                block_size,
                memory_capacity: info.memory_capacity,
                disk_capacity: info.disk_capacity,
                stats: info.stats.map(Into::into).unwrap_or_default(),
            },
        })
    }

    /// Presents `token` with every call: the worker then shows and serves only what that
    /// tenant may read (`[[mount]] tenants`).
    pub fn with_token(mut self, token: &str) -> Result<Self, ApiError> {
        self.token = Some(bearer(token)?);
        Ok(self)
    }

    /// `message` as a request, with the token if there is one.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }

    /// Asks the worker for its current info and stats.
    pub async fn fresh_info(&self) -> Result<Info, ApiError> {
        let info = self
            .client
            .clone()
            .info(pb::InfoRequest {})
            .await?
            .into_inner();
        Ok(Info {
            node_id: info.node_id,
            block_size: self.info.block_size,
            memory_capacity: info.memory_capacity,
            disk_capacity: info.disk_capacity,
            stats: info.stats.map(Into::into).unwrap_or_default(),
        })
    }
}

/// The `authorization` header's value for `token`.
pub(crate) fn bearer(
    token: &str,
) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, ApiError> {
    format!("Bearer {token}")
        .parse()
        .map_err(|_| ApiError::Invalid("the token has characters a header cannot carry".into()))
}

/// A plaintext call to a TLS listener fails deep in HTTP/2: say what is likely wrong.
pub fn plaintext_hint(e: ApiError, plaintext: bool) -> ApiError {
    match e {
        ApiError::Internal(m) | ApiError::Unavailable(m) if plaintext => ApiError::Unavailable(
            format!("{m} (a worker with [tls] speaks TLS only: give --tls-dir DIR)"),
        ),
        e => e,
    }
}

impl CacheApi for GrpcCache {
    fn info(&self) -> Info {
        self.info.clone()
    }

    async fn stat(&self, path: &str) -> Result<Entry, ApiError> {
        let req = pb::StatRequest {
            path: path.to_string(),
        };
        let entry = self
            .client
            .clone()
            .stat(self.request(req))
            .await?
            .into_inner();
        Entry::try_from(entry)
    }

    async fn list(&self, path: &str) -> Result<Arc<Vec<Entry>>, ApiError> {
        let req = pb::ListRequest {
            path: path.to_string(),
        };
        let resp = self
            .client
            .clone()
            .list(self.request(req))
            .await?
            .into_inner();
        let entries = resp
            .entries
            .into_iter()
            .map(Entry::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(entries))
    }

    async fn local_copy(&self, object: &ObjectRef) -> Result<Option<std::path::PathBuf>, ApiError> {
        let reply = self
            .client
            .clone()
            .local_copy(self.request(pb::ObjectRef::from(object)))
            .await?;
        let Some(path) = reply.into_inner().path.map(std::path::PathBuf::from) else {
            return Ok(None);
        };
        // Only a regular file beneath the worker's own dataset store: never a path a worker
        // (or a record forged in etcd) names elsewhere. Else the reads go through the worker.
        match beneath_store(self.dataset_store.as_deref(), &path) {
            Ok(path) => Ok(Some(path)),
            Err(reason) => {
                metrics::counter!(granary_core::metrics::FUSE_LOCAL_COPIES_REFUSED, "reason" => reason)
                    .increment(1);
                tracing::warn!(
                    worker = %self.info.node_id,
                    path = %path.display(),
                    reason,
                    "refused a local copy outside the worker's dataset store; reading through the worker"
                );
                Ok(None)
            }
        }
    }

    fn dataset_store(&self) -> Option<std::path::PathBuf> {
        self.dataset_store.clone()
    }

    async fn pins_epoch(&self) -> Result<Option<u64>, ApiError> {
        match self
            .client
            .clone()
            .pins_epoch(pb::PinsEpochRequest {})
            .await
        {
            Ok(reply) => Ok(reply.into_inner().epoch),
            // A worker from before pins had epochs.
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Err(s) => Err(s.into()),
        }
    }

    async fn read_block(&self, object: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        let req = pb::ReadBlockRequest {
            object: Some(object.into()),
            index,
        };
        let resp = self
            .client
            .clone()
            .read_block(self.request(req))
            .await?
            .into_inner();
        let block = Block {
            data: resp.data,
            crc32c: resp.crc32c,
            origin: granary_proto::Origin::from_code(resp.origin.min(255) as u8),
        };
        if !block.verify() {
            return Err(ApiError::Corrupt(format!(
                "block {index} of {:?} failed its checksum in transit",
                object.id.key
            )));
        }
        Ok(block)
    }
}

/// `path` resolved (symlinks followed), if it is a regular file beneath `store` (already
/// resolved; `None` when the worker's store is not on this machine); else why not (a metric
/// label).
fn beneath_store(
    store: Option<&std::path::Path>,
    path: &std::path::Path,
) -> Result<std::path::PathBuf, &'static str> {
    let store = store.ok_or("no_store")?;
    let resolved = path.canonicalize().map_err(|_| "missing")?;
    if !resolved.starts_with(store) || resolved == store {
        return Err("outside_store");
    }
    match std::fs::symlink_metadata(&resolved) {
        Ok(m) if m.is_file() => Ok(resolved),
        _ => Err("not_a_regular_file"),
    }
}

#[cfg(test)]
mod local_copy_tests {
    use super::beneath_store;

    #[test]
    fn local_copies_lie_beneath_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("datasets");
        std::fs::create_dir_all(store.join("ds/files")).unwrap();
        std::fs::write(store.join("ds/files/f"), b"f").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), store.join("ds/files/out")).unwrap();
        let resolved = store.canonicalize().unwrap();
        let s = Some(resolved.as_path());
        assert!(beneath_store(s, &store.join("ds/files/f")).is_ok());
        assert_eq!(
            beneath_store(s, &dir.path().join("secret")),
            Err("outside_store")
        );
        assert_eq!(
            beneath_store(s, &store.join("ds/files/out")),
            Err("outside_store")
        );
        assert_eq!(
            beneath_store(s, &store.join("ds/files/../../../secret")),
            Err("outside_store")
        );
        assert_eq!(
            beneath_store(s, &store.join("ds/files")),
            Err("not_a_regular_file")
        );
        assert_eq!(
            beneath_store(None, &store.join("ds/files/f")),
            Err("no_store")
        );
        assert_eq!(
            beneath_store(s, std::path::Path::new("/proc/self/status")),
            Err("outside_store")
        );
    }
}
