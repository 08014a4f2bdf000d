//! The data plane over QUIC: block reads between clients and workers and between workers.
//!
//! One connection per peer, one bidirectional stream per block read (the frame codec in
//! [`granary_proto::frame`]). Both sides authenticate with the cluster CA ([`crate::tls`]). The server
//! bounds what one connection may hold: at most [`MAX_STREAMS`] reads in flight and a receive
//! window; a peer that sends a malformed or oversized frame has its connection closed with an
//! error code and a reason, while the server goes on serving everyone else.

use crate::tls::TlsIdentity;
use bytes::BytesMut;
use granary_core::object::checksum_append;
use granary_proto::frame::{self, ReadBlock};
use granary_proto::{ApiError, Block, CacheApi, ObjectRef};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, TransportConfig, VarInt};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Block reads one connection may have in flight.
pub const MAX_STREAMS: u32 = 64;
/// Error code sent when closing a connection for a protocol violation.
pub const CLOSE_MALFORMED: u32 = 1;

/// The largest UDP payload we send (MTU discovery's upper bound) and accept. Each peer
/// advertises what it accepts (`max_udp_payload_size`), and discovery never probes above it: at
/// quinn's default (1472) discovery stopped at Ethernet's size, whatever the path allowed.
const MAX_UDP_PAYLOAD: u16 = 65_527;

fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("within QUIC's bounds");
    config
}

/// Kernel buffer asked for each UDP socket, each way (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`). At the default (about 200 KiB) a receiver busy for a
/// moment overflows at a few GB/s: the datagrams dropped count as congestion, and as losses of
/// large packets they can trip MTU black-hole detection, which sends the path back to 1200 bytes.
const SOCKET_BUFFER: usize = 8 << 20;
/// What a connection may have in flight towards us ([`TransportConfig::receive_window`]): less
/// than the receive buffer holds, so a burst does not overflow it while the endpoint is busy.
/// 6 MiB is 6 GB/s at a 1 ms round trip.
const RECEIVE_WINDOW: u32 = 6 << 20;
/// What one stream (one block read) may have in flight: a 4 MiB block without waiting for the
/// window to open.
const STREAM_RECEIVE_WINDOW: u32 = 4 << 20;

/// An endpoint on `socket` that accepts datagrams up to [`MAX_UDP_PAYLOAD`].
fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<Endpoint> {
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    if let Err(e) = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER) {
        tracing::debug!(error = %e, "cannot size the UDP send buffer");
    }
    let received = state
        .set_recv_buffer_size((&socket).into(), SOCKET_BUFFER)
        .and_then(|()| state.recv_buffer_size((&socket).into()));
    // Linux reports twice what was asked (up to the cap): its budget for data plus bookkeeping.
    match received {
        Ok(bytes) if bytes >= RECEIVE_WINDOW as usize * 5 / 4 => {}
        Ok(bytes) => tracing::warn!(
            bytes,
            "the UDP receive buffer is small for block transfers at line rate: expect losses; \
             raise net.core.rmem_max to 8 MiB"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot size the UDP receive buffer"),
    }
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    let socket = Arc::new(WithinSendLimit(runtime.wrap_udp_socket(socket)?));
    Endpoint::new_with_abstract_socket(endpoint_config(), server, socket, runtime)
}

/// The most one `sendmsg` may carry: the largest UDP payload over IPv4.
const MAX_SEND: usize = 65_507;

/// A UDP socket that splits a send over [`MAX_SEND`] into several. quinn batches up to 10
/// datagrams of the path MTU into one segmentation-offload (GSO) send; once MTU discovery goes
/// past 6.5 KB (jumbo frames, loopback) the batch is over what one send may carry, the kernel
/// refuses it (EMSGSIZE), quinn-udp drops it silently as it would a too-large MTU probe, and the
/// loss of large packets trips black-hole detection, which puts the path back to 1200 bytes for a
/// minute.
#[derive(Debug)]
struct WithinSendLimit(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for WithinSendLimit {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        let segment = match transmit.segment_size {
            Some(segment) if segment > 0 && transmit.contents.len() > MAX_SEND => segment,
            _ => return self.0.try_send(transmit),
        };
        let per_send = (MAX_SEND / segment).max(1) * segment;
        for (i, contents) in transmit.contents.chunks(per_send).enumerate() {
            let part = quinn::udp::Transmit {
                contents,
                segment_size: (contents.len() > segment).then_some(segment),
                ..*transmit
            };
            match self.0.try_send(&part) {
                Ok(()) => {}
                // Nothing sent yet: quinn waits until the socket is writable and retries it all.
                Err(e) if i == 0 => return Err(e),
                // Part sent: the rest is lost, as a full queue on the path would lose it, and
                // recovered like any loss.
                Err(_) => return Ok(()),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Windows sized to the receiver's socket buffer, not beyond: measured on loopback, windows of
    // 16/128 MiB overflowed it (thousands of datagrams dropped per run, congestion backoff).
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW));
    t.receive_window(VarInt::from_u32(RECEIVE_WINDOW));
    t.send_window(128 << 20);
    // A peer that stops answering (crashed, paused, partitioned) is declared gone after 3 s of
    // silence; live peers keep the connection busy with a keep-alive every second. A block read
    // waiting on a slow backend fetch at its owner is not silence.
    t.max_idle_timeout(Some(VarInt::from_u32(3_000).into()));
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    // Per-packet work dominates QUIC's cost: let MTU discovery find jumbo paths (loopback,
    // jumbo-frame networks) instead of stopping at 1452 bytes. Connections still start at the
    // default initial MTU (1200), safe on any path; probes larger than the path are lost and
    // discovery settles on what gets through.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("QUIC setup: {0}")]
    Setup(String),
}

/// Binds a QUIC server endpoint.
pub fn server_endpoint(addr: SocketAddr, tls: &TlsIdentity) -> Result<Endpoint, QuicError> {
    let crypto = QuicServerConfig::try_from(
        tls.server_config()
            .map_err(|e| QuicError::Setup(e.to_string()))?,
    )
    .map_err(|e| QuicError::Setup(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    std::net::UdpSocket::bind(addr)
        .and_then(|socket| endpoint(socket, Some(config)))
        .map_err(|e| QuicError::Setup(format!("cannot listen on {addr}: {e}")))
}

/// Serves block reads from `api` on `endpoint` until `shutdown` completes.
pub async fn serve<A: CacheApi>(
    endpoint: Endpoint,
    api: Arc<A>,
    shutdown: impl Future<Output = ()>,
) {
    let accept = async {
        while let Some(incoming) = endpoint.accept().await {
            let api = api.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => serve_connection(conn, api).await,
                    Err(e) => tracing::warn!(error = %e, "QUIC handshake refused"),
                }
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {}
    }
    endpoint.close(VarInt::from_u32(0), b"shutting down");
}

async fn serve_connection<A: CacheApi>(conn: Connection, api: Arc<A>) {
    let peer = conn.remote_address();
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection ended");
                return;
            }
        };
        let (api, conn) = (api.clone(), conn.clone());
        tokio::spawn(async move {
            let request = match recv.read_to_end(frame::MAX_REQUEST + 16).await {
                Ok(bytes) => {
                    let mut buf = BytesMut::from(&bytes[..]);
                    match frame::decode_request(&mut buf) {
                        Ok(Some(req)) if buf.is_empty() => Ok(req),
                        Ok(Some(_)) => Err("trailing bytes after the request".to_string()),
                        Ok(None) => Err("truncated request".to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                Err(e) => Err(format!("reading the request: {e}")),
            };
            let req = match request {
                Ok(req) => req,
                Err(reason) => {
                    tracing::warn!(%peer, %reason, "closing a connection that sent a malformed frame");
                    conn.close(VarInt::from_u32(CLOSE_MALFORMED), reason.as_bytes());
                    return;
                }
            };
            let result = if req.held_only {
                api.read_held_block(&req.object, req.index).await
            } else {
                api.read_block(&req.object, req.index).await
            };
            let mut header = BytesMut::new();
            let body = frame::encode_response_header(&result, &mut header);
            let sent = async {
                send.write_all(&header).await?;
                if let Some(body) = body {
                    send.write_chunk(body).await?;
                }
                send.finish()?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            };
            if let Err(e) = sent.await {
                tracing::debug!(%peer, error = %e, "response not delivered");
            }
        });
    }
}

/// A client of workers' data planes: one QUIC connection per worker (address and certificate
/// name), made on first use
/// and remade after it fails.
#[derive(Clone)]
pub struct BlockClient {
    endpoint: Endpoint,
    connections: Arc<Mutex<HashMap<(SocketAddr, String), Connection>>>,
    /// Peers that just failed: skipped without waiting until the instant given.
    suspects: Arc<Mutex<HashMap<SocketAddr, std::time::Instant>>>,
}

/// How long a worker that failed a read is skipped before it is tried again.
pub const SUSPECT_FOR: Duration = Duration::from_secs(3);

impl std::fmt::Debug for BlockClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockClient").finish_non_exhaustive()
    }
}

impl BlockClient {
    pub fn new(tls: &TlsIdentity) -> Result<Self, QuicError> {
        let crypto = QuicClientConfig::try_from(
            tls.client_config()
                .map_err(|e| QuicError::Setup(e.to_string()))?,
        )
        .map_err(|e| QuicError::Setup(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport());
        let bind: SocketAddr = "0.0.0.0:0".parse().expect("address");
        let mut endpoint = std::net::UdpSocket::bind(bind)
            .and_then(|socket| endpoint(socket, None))
            .map_err(|e| QuicError::Setup(e.to_string()))?;
        endpoint.set_default_client_config(config);
        Ok(BlockClient {
            endpoint,
            connections: Arc::new(Mutex::new(HashMap::new())),
            suspects: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    async fn connection(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Connection, ApiError> {
        let key = (addr, server_name.to_string());
        if let Some(conn) = self.connections.lock().expect("connections").get(&key)
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let connecting = self.endpoint.connect(addr, server_name).map_err(|e| {
            ApiError::Unavailable(format!("connect to {server_name} at {addr}: {e}"))
        })?;
        let conn = connecting.await.map_err(|e| {
            ApiError::Unavailable(format!("connect to {server_name} at {addr}: {e}"))
        })?;
        self.connections
            .lock()
            .expect("connections")
            .insert(key, conn.clone());
        Ok(conn)
    }

    /// Completes a TLS handshake with the worker at `addr`: `Err` carries why it was refused.
    /// `Ok(false)` when it did not answer within `timeout` (down, not refused).
    pub async fn probe(
        &self,
        addr: SocketAddr,
        server_name: &str,
        timeout: Duration,
    ) -> Result<bool, String> {
        let connecting = self
            .endpoint
            .connect(addr, server_name)
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(conn)) => {
                conn.close(VarInt::from_u32(0), b"probe");
                Ok(true)
            }
            Ok(Err(quinn::ConnectionError::TimedOut)) | Err(_) => Ok(false),
            Ok(Err(e)) => Err(e.to_string()),
        }
    }

    /// Reads block `index` of `object` from the worker at `addr` (named `server_name` in its
    /// certificate), within `timeout`. The block's checksum is verified on arrival.
    pub async fn read_block(
        &self,
        addr: SocketAddr,
        server_name: &str,
        object: &ObjectRef,
        index: u64,
        timeout: Duration,
    ) -> Result<Block, ApiError> {
        self.request(addr, server_name, object, index, false, timeout)
            .await
    }

    /// Block `index` of `object` if the worker at `addr` already holds it (`NotFound` when it
    /// does not; it fetches nothing). Like [`BlockClient::read_block`] otherwise.
    pub async fn read_held_block(
        &self,
        addr: SocketAddr,
        server_name: &str,
        object: &ObjectRef,
        index: u64,
        timeout: Duration,
    ) -> Result<Block, ApiError> {
        self.request(addr, server_name, object, index, true, timeout)
            .await
    }

    async fn request(
        &self,
        addr: SocketAddr,
        server_name: &str,
        object: &ObjectRef,
        index: u64,
        held_only: bool,
        timeout: Duration,
    ) -> Result<Block, ApiError> {
        let attempt = async {
            let conn = self.connection(addr, server_name).await?;
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| ApiError::Unavailable(format!("{server_name}: {e}")))?;
            let mut request = BytesMut::new();
            frame::encode_request(
                &ReadBlock {
                    object: object.clone(),
                    index,
                    held_only,
                },
                &mut request,
            );
            send.write_all(&request)
                .await
                .map_err(|e| ApiError::Unavailable(format!("{server_name}: {e}")))?;
            send.finish()
                .map_err(|e| ApiError::Unavailable(format!("{server_name}: {e}")))?;
            // Collect the response without an intermediate Vec: reserve the body once its
            // length is known, refuse anything longer than a block of this object may be
            // before reserving for it. The body's CRC32C is computed piece by piece, on the
            // bytes just copied while they are in cache, not over the whole block afterwards.
            let max_block = usize::try_from(object.id.size)
                .unwrap_or(usize::MAX)
                .min(frame::MAX_BODY);
            let mut buf = BytesMut::with_capacity(64 << 10);
            let mut body_end = None;
            let (mut crc, mut crc_upto) = (0, frame::RESPONSE_HEADER);
            loop {
                match recv.read_chunk(usize::MAX, true).await {
                    Ok(Some(chunk)) => {
                        if buf.len() + chunk.bytes.len() > frame::MAX_BODY + 64 {
                            return Err(ApiError::Corrupt(format!(
                                "{server_name}: response longer than a frame"
                            )));
                        }
                        buf.extend_from_slice(&chunk.bytes);
                        if body_end.is_none() {
                            match frame::checked_body_len(&buf, max_block) {
                                Ok(Some(len)) => {
                                    let end = frame::RESPONSE_HEADER + len;
                                    buf.reserve(end.saturating_sub(buf.len()));
                                    body_end = Some(end);
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    return Err(ApiError::Corrupt(format!("{server_name}: {e}")));
                                }
                            }
                        }
                        if let Some(end) = body_end {
                            let upto = buf.len().min(end);
                            if upto > crc_upto {
                                crc = checksum_append(crc, &buf[crc_upto..upto]);
                                crc_upto = upto;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Err(ApiError::Unavailable(format!("{server_name}: {e}"))),
                }
            }
            match frame::decode_response_checked(&mut buf, max_block, body_end.map(|_| crc)) {
                Ok(Some(result)) => result,
                Ok(None) => Err(ApiError::Unavailable(format!(
                    "{server_name}: truncated response"
                ))),
                Err(e) => Err(ApiError::Corrupt(format!("{server_name}: {e}"))),
            }
        };
        if let Some(until) = self.suspects.lock().expect("suspects").get(&addr)
            && *until > std::time::Instant::now()
        {
            return Err(ApiError::Unavailable(format!(
                "{server_name} at {addr} failed recently; skipped"
            )));
        }
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::Unavailable(format!(
                "{server_name} at {addr}: no answer within {timeout:?}"
            ))),
        };
        if let Err(ApiError::Unavailable(_)) = &result {
            self.suspects
                .lock()
                .expect("suspects")
                .insert(addr, std::time::Instant::now() + SUSPECT_FOR);
            self.connections
                .lock()
                .expect("connections")
                .remove(&(addr, server_name.to_string()));
        }
        result
    }
}
