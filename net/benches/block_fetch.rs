//! Block fetch from a remote worker on loopback, three ways in one run, for the same blocks:
//!
//! - `QUIC`: the data plane as Granary uses it ([`quic::serve`] + [`BlockClient`]: mutual TLS,
//!   framed, CRC32C verified per block), all reads on one connection;
//! - `TCP+TLS`: TLS 1.3 over TCP with rustls and the same [`TlsIdentity`] configurations (mutual
//!   TLS), a length + CRC32C header per block and the CRC verified on arrival, one connection per
//!   reader;
//! - `TCP`: plain TCP, no TLS, no checksum (the floor), one connection per reader.
//!
//! For each: p50/p99 of one read at a time, throughput with 8 reads in flight, and the process's
//! CPU time (user + system, from `/proc/self/stat`) per GB moved during the throughput phase.
//! Client and server run in this one process, so the CPU figure is both ends together.
//!
//! Run: `cargo bench -p granary-net --bench block_fetch [-- BLOCK_MIB COUNT [ONLY]]`: COUNT reads
//! one at a time, then 3 x COUNT with 8 in flight; ONLY = quic, tcp+tls or tcp runs just that
//! one, for profiling.

use bytes::Bytes;
use granary_core::{BlockSize, ObjectId};
use granary_net::quic::{self, BlockClient};
use granary_net::tls::{TlsFiles, TlsIdentity, generate_dev_certs};
use granary_proto::{ApiError, Block, CacheApi, Entry, Info, ObjectRef};
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const IN_FLIGHT: usize = 8;
const TIMEOUT: Duration = Duration::from_secs(30);

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

/// Answers each 8-byte request with `len u32 BE | crc32c u32 BE | block` (the CRC is the block's
/// stored one, as the QUIC server sends it; the plain TCP client ignores it).
async fn stream_server<S, F, Fut>(listener: TcpListener, block: Block, wrap: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = std::io::Result<S>> + Send + 'static,
{
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (block, accepted) = (block.clone(), wrap(stream));
        tokio::spawn(async move {
            let mut stream = accepted.await.unwrap();
            let mut request = [0u8; 8];
            while stream.read_exact(&mut request).await.is_ok() {
                let mut header = [0u8; 8];
                header[..4].copy_from_slice(&(block.data.len() as u32).to_be_bytes());
                header[4..].copy_from_slice(&block.crc32c.to_be_bytes());
                stream.write_all(&header).await.unwrap();
                stream.write_all(&block.data).await.unwrap();
                stream.flush().await.unwrap();
            }
        });
    }
}

/// One reader: a handle on the shared QUIC connection, or a stream of its own.
enum Reader {
    Quic {
        client: BlockClient,
        addr: SocketAddr,
        object: ObjectRef,
    },
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>, Vec<u8>),
    Tcp(TcpStream, Vec<u8>),
}

async fn stream_fetch<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    index: u64,
    buf: &mut Vec<u8>,
    verify: bool,
) -> usize {
    stream.write_all(&index.to_be_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).await.unwrap();
    let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
    buf.resize(len, 0);
    // The CRC32C is computed piece by piece as the bytes arrive, as the QUIC client does.
    let mut crc = 0;
    for piece in buf.chunks_mut(64 << 10) {
        stream.read_exact(piece).await.unwrap();
        if verify {
            crc = granary_core::object::checksum_append(crc, piece);
        }
    }
    if verify {
        let expected = u32::from_be_bytes(header[4..].try_into().unwrap());
        assert_eq!(crc, expected, "block checksum");
    }
    len
}

impl Reader {
    async fn fetch(&mut self, index: u64) -> usize {
        match self {
            Reader::Quic {
                client,
                addr,
                object,
            } => {
                let block = client
                    .read_block(*addr, "w1", object, index, TIMEOUT)
                    .await
                    .unwrap();
                block.data.len()
            }
            Reader::Tls(stream, buf) => stream_fetch(stream, index, buf, true).await,
            Reader::Tcp(stream, buf) => stream_fetch(stream, index, buf, false).await,
        }
    }
}

#[derive(Clone)]
enum Transport {
    Quic(BlockClient, SocketAddr, Box<ObjectRef>),
    Tls(SocketAddr, TlsConnector),
    Tcp(SocketAddr),
}

impl Transport {
    async fn reader(&self) -> Reader {
        match self {
            Transport::Quic(client, addr, object) => Reader::Quic {
                client: client.clone(),
                addr: *addr,
                object: (**object).clone(),
            },
            Transport::Tls(addr, connector) => {
                let tcp = TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let name = ServerName::try_from("w1").unwrap();
                let tls = connector.connect(name, tcp).await.unwrap();
                Reader::Tls(Box::new(tls), Vec::new())
            }
            Transport::Tcp(addr) => {
                let tcp = TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                Reader::Tcp(tcp, Vec::new())
            }
        }
    }
}

/// User + system CPU time of this whole process (all threads, exited ones included), from
/// `/proc/self/stat` (clock ticks of 10 ms: `USER_HZ` is 100 on Linux).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

struct Row {
    name: &'static str,
    p50: Duration,
    p99: Duration,
    bytes_per_s: f64,
    cpu_s_per_gb: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn measure(name: &'static str, transport: Transport, count: usize, bulk: usize) -> Row {
    let mut reader = transport.reader().await;
    reader.fetch(0).await;
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let start = Instant::now();
        reader.fetch(i as u64).await;
        latencies.push(start.elapsed());
    }
    latencies.sort();
    drop(reader);

    // Readers (and their connections) are set up before the clock starts.
    let mut readers = Vec::with_capacity(IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        let mut reader = transport.reader().await;
        reader.fetch(0).await;
        readers.push(reader);
    }
    let (cpu, start) = (process_cpu(), Instant::now());
    let tasks: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(worker, mut reader)| {
            tokio::spawn(async move {
                let mut bytes = 0;
                for i in (worker..bulk).step_by(IN_FLIGHT) {
                    bytes += reader.fetch(i as u64).await;
                }
                bytes
            })
        })
        .collect();
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.unwrap();
    }
    let (wall, cpu) = (start.elapsed(), process_cpu() - cpu);
    Row {
        name,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        bytes_per_s: bytes as f64 / wall.as_secs_f64(),
        cpu_s_per_gb: cpu.as_secs_f64() / (bytes as f64 / 1e9),
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let block_mib: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(4);
    let count: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    // The throughput phase moves more blocks, for CPU time measured in 10 ms ticks.
    let bulk = 3 * count;
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
    let client_tls = TlsIdentity::load(&TlsFiles::in_dir(certs.path(), "client")).unwrap();

    let endpoint = quic::server_endpoint("127.0.0.1:0".parse().unwrap(), &server_tls).unwrap();
    let quic_addr: SocketAddr = endpoint.local_addr().unwrap();
    tokio::spawn(quic::serve(
        endpoint,
        Arc::new(MemoryBlocks(block.clone())),
        std::future::pending(),
    ));
    let client = BlockClient::new(&client_tls).unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server_tls.server_config().unwrap()));
    tokio::spawn(stream_server(listener, block.clone(), move |tcp| {
        acceptor.accept(tcp)
    }));
    let connector = TlsConnector::from(Arc::new(client_tls.client_config().unwrap()));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = listener.local_addr().unwrap();
    tokio::spawn(stream_server(listener, block.clone(), |tcp| async {
        Ok(tcp)
    }));

    println!(
        "block fetch over loopback: {block_mib} MiB blocks, {count} reads one at a time, then {bulk} with {IN_FLIGHT} in flight\n"
    );
    let only = args.get(2).map(|a| a.to_ascii_lowercase());
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o == name.to_ascii_lowercase())
    };
    let transports = [
        (
            "QUIC",
            Transport::Quic(client.clone(), quic_addr, Box::new(object.clone())),
        ),
        ("TCP+TLS", Transport::Tls(tls_addr, connector)),
        ("TCP", Transport::Tcp(tcp_addr)),
    ];
    let mut rows = Vec::new();
    for (name, transport) in transports {
        if wanted(name) {
            rows.push(measure(name, transport, count, bulk).await);
        }
    }
    println!(
        "| transport | p50 ms | p99 ms | {IN_FLIGHT} in flight MiB/s | GB/s | CPU s/GB (client+server) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.2} | {:.3} |",
            r.name,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.bytes_per_s / (1 << 20) as f64,
            r.bytes_per_s / 1e9,
            r.cpu_s_per_gb,
        );
    }
    println!(
        "\nQUIC: one connection, {IN_FLIGHT} streams; TCP+TLS and TCP: {IN_FLIGHT} connections. \
         CPU is this process's user+system time (/proc/self/stat) during the {IN_FLIGHT}-in-flight \
         phase: client and server together."
    );
    if let [quic, tls, ..] = &rows[..]
        && (quic.name, tls.name) == ("QUIC", "TCP+TLS")
    {
        println!(
            "QUIC / TCP+TLS: throughput {:.2}x, CPU per GB {:.2}x",
            quic.bytes_per_s / tls.bytes_per_s,
            quic.cpu_s_per_gb / tls.cpu_s_per_gb,
        );
    }
}
