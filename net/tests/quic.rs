//! The QUIC data plane on loopback: mutual TLS with the cluster CA, verified blocks, and a
//! server that closes a misbehaving connection and keeps serving the others.

use bytes::Bytes;
use granary_core::{BlockSize, ObjectId};
use granary_net::quic::{self, BlockClient, CLOSE_MALFORMED};
use granary_net::tls::{TlsFiles, TlsIdentity, generate_dev_certs};
use granary_proto::{ApiError, Block, CacheApi, Entry, Info, ObjectRef};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Serves block `i` of any object as 1,000 bytes of value `i`.
struct Blocks;

impl CacheApi for Blocks {
    fn info(&self) -> Info {
        Info {
            node_id: "w1".into(),
            block_size: BlockSize::DEFAULT,
            memory_capacity: 0,
            disk_capacity: 0,
            stats: Default::default(),
        }
    }
    async fn stat(&self, path: &str) -> Result<Entry, ApiError> {
        Err(ApiError::NotFound(path.into()))
    }
    async fn list(&self, path: &str) -> Result<Arc<Vec<Entry>>, ApiError> {
        Err(ApiError::NotFound(path.into()))
    }
    async fn read_block(&self, object: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        if object.id.key == "missing" {
            return Err(ApiError::NotFound("missing".into()));
        }
        Ok(Block::new(Bytes::from(vec![index as u8; 1000])))
    }
}

fn object(key: &str) -> ObjectRef {
    ObjectRef {
        mount: 0,
        id: ObjectId {
            backend: "b".into(),
            key: key.into(),
            size: 10_000,
            etag: None,
            version: None,
            mtime_ns: 0,
        },
    }
}

fn identity(dir: &std::path::Path, name: &str) -> TlsIdentity {
    TlsIdentity::load(&TlsFiles::in_dir(dir, name)).unwrap()
}

async fn server(certs: &std::path::Path) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let endpoint =
        quic::server_endpoint("127.0.0.1:0".parse().unwrap(), &identity(certs, "w1")).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(quic::serve(endpoint, Arc::new(Blocks), async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn mutual_tls_block_reads() {
    let certs = tempfile::tempdir().unwrap();
    generate_dev_certs(certs.path(), &["w1".into(), "client".into()]).unwrap();
    let (addr, _stop) = server(certs.path()).await;
    let client = BlockClient::new(&identity(certs.path(), "client")).unwrap();
    for i in 0..5 {
        let block = client
            .read_block(addr, "w1", &object("k"), i, T)
            .await
            .unwrap();
        assert_eq!(block.data[..], vec![i as u8; 1000][..]);
    }
    let err = client
        .read_block(addr, "w1", &object("missing"), 0, T)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::NotFound(_)), "{err:?}");
    // A name the server's certificate does not carry is refused.
    let err = client
        .read_block(addr, "somebody-else", &object("k"), 0, T)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn a_client_from_another_ca_is_refused() {
    let certs = tempfile::tempdir().unwrap();
    generate_dev_certs(certs.path(), &["w1".into()]).unwrap();
    let rogue = tempfile::tempdir().unwrap();
    generate_dev_certs(rogue.path(), &["client".into()]).unwrap();
    let (addr, _stop) = server(certs.path()).await;
    let client = BlockClient::new(&identity(rogue.path(), "client")).unwrap();
    let err = client
        .read_block(addr, "w1", &object("k"), 0, T)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let certs = tempfile::tempdir().unwrap();
    generate_dev_certs(certs.path(), &["w1".into()]).unwrap();
    let (addr, _stop) = server(certs.path()).await;
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pki_types::pem::PemObject::pem_file_iter(certs.path().join("ca.pem")).unwrap()
    {
        roots.add(ca.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![granary_net::tls::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint.connect(addr, "w1").unwrap().await;
    // TLS 1.3 may report the refusal at the handshake or at the first stream.
    if let Ok(conn) = conn {
        let refused = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(b"GRQ1").await?;
            send.finish()?;
            recv.read_to_end(1 << 20).await?;
            Ok::<_, Box<dyn std::error::Error>>(())
        };
        assert!(
            tokio::time::timeout(T, refused).await.unwrap().is_err(),
            "a client without a certificate was served"
        );
    }
}

#[tokio::test]
async fn malformed_frames_close_that_connection_only() {
    let certs = tempfile::tempdir().unwrap();
    generate_dev_certs(certs.path(), &["w1".into(), "client".into()]).unwrap();
    let (addr, _stop) = server(certs.path()).await;
    let good = BlockClient::new(&identity(certs.path(), "client")).unwrap();
    good.read_block(addr, "w1", &object("k"), 1, T)
        .await
        .unwrap();

    // A second connection sends garbage, then an oversized length.
    let tls = identity(certs.path(), "client").client_config().unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &b"GRQ1\x01\xff\xff\xff\xff"[..],
    ] {
        let conn = endpoint.connect(addr, "w1").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(garbage).await.unwrap();
        send.finish().unwrap();
        assert!(recv.read_to_end(1 << 20).await.is_err());
        let reason = tokio::time::timeout(T, conn.closed()).await.unwrap();
        match reason {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, quinn::VarInt::from_u32(CLOSE_MALFORMED));
                assert!(!close.reason.is_empty(), "the close says why");
            }
            other => panic!("unexpected close: {other:?}"),
        }
    }
    // The well-behaved client is still served.
    let block = good
        .read_block(addr, "w1", &object("k"), 2, T)
        .await
        .unwrap();
    assert_eq!(block.data[..], vec![2u8; 1000][..]);
}
