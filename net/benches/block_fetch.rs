//! Block fetch from a remote worker on loopback: the QUIC data plane (mutual TLS, framed,
//! checksummed) against a plain TCP stream carrying the same bytes (no TLS, no checksum), in one
//! run. Reports p50/p99 latency of one block read at a time and throughput with 8 in flight.
//!
//! Run: `cargo bench -p granary-proto --bench block_fetch [-- BLOCK_MIB COUNT]`

use bytes::Bytes;
use granary_core::{BlockSize, ObjectId};
use granary_net::quic::{self, BlockClient};
use granary_net::tls::{TlsFiles, TlsIdentity, generate_dev_certs};
use granary_proto::{ApiError, Block, CacheApi, Entry, Info, ObjectRef};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct MemoryBlocks(Block);

impl CacheApi for MemoryBlocks {
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
    async fn read_block(&self, _: &ObjectRef, _: u64) -> Result<Block, ApiError> {
        Ok(self.0.clone())
    }
}

async fn tcp_server(listener: TcpListener, block: Bytes) {
    loop {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        let block = block.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 8];
            while stream.read_exact(&mut request).await.is_ok() {
                stream
                    .write_all(&(block.len() as u32).to_be_bytes())
                    .await
                    .unwrap();
                stream.write_all(&block).await.unwrap();
            }
        });
    }
}

async fn tcp_fetch(stream: &mut TcpStream, index: u64, buf: &mut Vec<u8>) {
    stream.write_all(&index.to_be_bytes()).await.unwrap();
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.unwrap();
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    stream.read_exact(buf).await.unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut latencies: Vec<Duration>, throughput_mib_s: f64) {
    latencies.sort();
    println!(
        "{name:<6} p50 {:>8.2} ms   p99 {:>8.2} ms   8 in flight: {throughput_mib_s:>7.0} MiB/s",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let block_mib: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(4);
    let count: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let block = Block::new(Bytes::from(vec![7u8; block_mib << 20]));
    let object = ObjectRef {
        mount: 0,
        id: ObjectId {
            backend: "b".into(),
            key: "k".into(),
            size: u64::MAX / 2,
            etag: None,
            version: None,
            mtime_ns: 0,
        },
    };

    let certs = tempfile::tempdir().unwrap();
    generate_dev_certs(certs.path(), &["w1".into(), "client".into()]).unwrap();
    let server_tls = TlsIdentity::load(&TlsFiles::in_dir(certs.path(), "w1")).unwrap();
    let endpoint = quic::server_endpoint("127.0.0.1:0".parse().unwrap(), &server_tls).unwrap();
    let quic_addr: SocketAddr = endpoint.local_addr().unwrap();
    tokio::spawn(quic::serve(
        endpoint,
        Arc::new(MemoryBlocks(block.clone())),
        std::future::pending(),
    ));
    let client =
        BlockClient::new(&TlsIdentity::load(&TlsFiles::in_dir(certs.path(), "client")).unwrap())
            .unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = listener.local_addr().unwrap();
    tokio::spawn(tcp_server(listener, block.data.clone()));

    let timeout = Duration::from_secs(30);
    println!(
        "block fetch over loopback: {block_mib} MiB blocks, {count} sequential reads, then {count} with 8 in flight"
    );
    // QUIC: one at a time, then 8 in flight.
    client
        .read_block(quic_addr, "w1", &object, 0, timeout)
        .await
        .unwrap();
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let start = Instant::now();
        let b = client
            .read_block(quic_addr, "w1", &object, i as u64, timeout)
            .await
            .unwrap();
        latencies.push(start.elapsed());
        assert_eq!(b.data.len(), block_mib << 20);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (client, object) = (client.clone(), object.clone());
        tasks.push(tokio::spawn(async move {
            for i in (worker..count).step_by(8) {
                client
                    .read_block(quic_addr, "w1", &object, i as u64, timeout)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let quic_rate = (count * block_mib) as f64 / start.elapsed().as_secs_f64();
    report("QUIC", latencies, quic_rate);

    // TCP: one connection per reader, the same pattern.
    let mut stream = TcpStream::connect(tcp_addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    tcp_fetch(&mut stream, 0, &mut buf).await;
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let start = Instant::now();
        tcp_fetch(&mut stream, i as u64, &mut buf).await;
        latencies.push(start.elapsed());
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(tcp_addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let mut buf = Vec::new();
            for i in (worker..count).step_by(8) {
                tcp_fetch(&mut stream, i as u64, &mut buf).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let tcp_rate = (count * block_mib) as f64 / start.elapsed().as_secs_f64();
    report("TCP", latencies, tcp_rate);
    println!("QUIC / TCP throughput: {:.2}", quic_rate / tcp_rate);
}
