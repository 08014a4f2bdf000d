//! The cluster client's read order over real gRPC and QUIC on loopback, with two stand-in
//! workers that count what they are asked: each block from its owner, except what the worker
//! on the client's own machine already holds, which is read from it.

use bytes::Bytes;
use granary_cache_server::grpc;
use granary_core::placement::owners;
use granary_core::{BlockKey, BlockSize, ObjectId};
use granary_net::cluster::ClusterClient;
use granary_net::membership::{MemberInfo, Membership};
use granary_net::quic;
use granary_net::tls::{TlsFiles, TlsIdentity, generate_dev_certs};
use granary_proto::{ApiError, Block, CacheApi, Entry, Info, ObjectRef};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A worker that serves block `i` of any object as 1,000 bytes of value `i`, and holds (for
/// held-only reads) the even blocks when `holds_even`.
struct Node {
    id: &'static str,
    holds_even: bool,
    reads: AtomicU64,
    held_reads: AtomicU64,
}

impl CacheApi for Node {
    fn info(&self) -> Info {
        Info {
            node_id: self.id.into(),
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
    async fn read_block(&self, _: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(Block::new(Bytes::from(vec![index as u8; 1000])))
    }
    async fn read_held_block(&self, _: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        self.held_reads.fetch_add(1, Ordering::Relaxed);
        if self.holds_even && index.is_multiple_of(2) {
            Ok(Block::new(Bytes::from(vec![index as u8; 1000])))
        } else {
            Err(ApiError::NotFound("not held".into()))
        }
    }
}

async fn start(node: Arc<Node>, certs: &std::path::Path) -> MemberInfo {
    let listener = grpc::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = TlsIdentity::load(&TlsFiles::in_dir(certs, node.id)).unwrap();
    tokio::spawn(grpc::serve(
        node.clone(),
        listener,
        Some(tls.clone()),
        std::future::pending::<()>(),
    ));
    let endpoint = quic::server_endpoint(addr, &tls).unwrap();
    tokio::spawn(quic::serve(endpoint, node.clone(), std::future::pending()));
    MemberInfo {
        node_id: node.id.into(),
        data_addr: addr,
        api_addr: addr,
        memory_capacity: 0,
        disk_capacity: 0,
        dataset_capacity: 0,
    }
}

fn node(id: &'static str, holds_even: bool) -> Arc<Node> {
    Arc::new(Node {
        id,
        holds_even,
        reads: AtomicU64::new(0),
        held_reads: AtomicU64::new(0),
    })
}

#[tokio::test]
async fn the_local_worker_serves_what_it_holds_and_owners_the_rest() {
    let certs = tempfile::tempdir().unwrap();
    generate_dev_certs(certs.path(), &["a".into(), "b".into(), "client".into()]).unwrap();
    let (a, b) = (node("a", false), node("b", true));
    let members = vec![
        start(a.clone(), certs.path()).await,
        start(b.clone(), certs.path()).await,
    ];
    let tls = TlsIdentity::load(&TlsFiles::in_dir(certs.path(), "client")).unwrap();
    let client = ClusterClient::connect(
        Membership::fixed(members.clone()),
        &tls,
        1,
        Duration::from_secs(5),
    )
    .await
    .unwrap()
    .with_local_node(Some("b".into()));

    let object = ObjectRef {
        mount: 0,
        id: ObjectId {
            backend: "s3://bucket".into(),
            key: "k".into(),
            size: 200 * 4096,
            etag: None,
            version: None,
            mtime_ns: 0,
        },
    };
    let (mut owned_by_a, mut odd_owned_by_a) = (0, 0);
    for index in 0..200u64 {
        let block = client.read_block(&object, index).await.unwrap();
        assert_eq!(block.data[..], vec![index as u8; 1000][..]);
        let key = BlockKey::new(object.id.fingerprint(), index);
        if owners(key, &members, 1)[0].node_id == "a" {
            owned_by_a += 1;
            odd_owned_by_a += index % 2;
        }
    }
    assert!(owned_by_a > 50 && owned_by_a < 150, "{owned_by_a}");
    // b is asked held-only for exactly the blocks a owns; a serves only those b lacks; b
    // serves the blocks it owns itself.
    assert_eq!(b.held_reads.load(Ordering::Relaxed), owned_by_a);
    assert_eq!(a.reads.load(Ordering::Relaxed), odd_owned_by_a);
    assert_eq!(b.reads.load(Ordering::Relaxed), 200 - owned_by_a);
    assert_eq!(a.held_reads.load(Ordering::Relaxed), 0);

    // Without a local worker, every block comes from its owner and nobody is asked held-only.
    let plain = ClusterClient::connect(Membership::fixed(members), &tls, 1, Duration::from_secs(5))
        .await
        .unwrap();
    let before = (
        a.reads.load(Ordering::Relaxed),
        b.reads.load(Ordering::Relaxed),
    );
    for index in 0..200u64 {
        plain.read_block(&object, index).await.unwrap();
    }
    assert_eq!(a.reads.load(Ordering::Relaxed) - before.0, owned_by_a);
    assert_eq!(b.reads.load(Ordering::Relaxed) - before.1, 200 - owned_by_a);
    assert_eq!(b.held_reads.load(Ordering::Relaxed), owned_by_a);
}
