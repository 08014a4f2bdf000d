//! gRPC connections: a client [`Channel`] (TLS with the cluster CA, or plaintext to a worker on
//! this machine) and the server's stream of accepted TLS connections.

use crate::tls::TlsIdentity;
use futures::Stream;
use granary_proto::ApiError;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::{Channel, Endpoint};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections whose handshake runs at once; more wait in the kernel's backlog.
const HANDSHAKES_IN_FLIGHT: usize = 256;

/// Where a worker's API is: `host:port` (an `http://` or `https://` prefix is accepted).
fn host_port(addr: &str) -> &str {
    addr.strip_prefix("https://")
        .or_else(|| addr.strip_prefix("http://"))
        .unwrap_or(addr)
        .trim_end_matches('/')
}

/// The host part of `host:port` (`[v6]:port` too).
fn host(addr: &str) -> &str {
    let hp = host_port(addr);
    match hp.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => hp,
    }
}

/// A gRPC channel to `addr`. With `tls`, the server must present a certificate the CA signed for
/// `server_name` (default: the address's host), and we present ours when we have one; without,
/// the channel is plaintext, which workers accept only on loopback.
pub async fn connect(
    addr: &str,
    tls: Option<&TlsIdentity>,
    server_name: Option<&str>,
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<Channel, ApiError> {
    let target = host_port(addr).to_string();
    let endpoint = Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| ApiError::Invalid(format!("bad server address {addr:?}: {e}")))?
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20));
    let unavailable = |e: tonic::transport::Error| {
        // The cause (a refused certificate, a refused connection) is in the source chain.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message = format!("{message}: {s}");
            source = s.source();
        }
        ApiError::Unavailable(format!("cannot reach the worker at {addr}: {message}"))
    };
    let Some(tls) = tls else {
        return endpoint.connect().await.map_err(unavailable);
    };
    let config = tls
        .grpc_client_config()
        .map_err(|e| ApiError::Invalid(e.to_string()))?;
    let name = server_name.unwrap_or(host(addr)).to_string();
    let server_name = ServerName::try_from(name.clone())
        .map_err(|e| ApiError::Invalid(format!("bad server name {name:?}: {e}")))?;
    let connector = TlsConnector::from(Arc::new(config));
    let connect = tower::service_fn(move |_: tonic::transport::Uri| {
        let (connector, server_name, target) =
            (connector.clone(), server_name.clone(), target.clone());
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(connect)
        .await
        .map_err(unavailable)
}

/// The TLS connections accepted on `listener`, handshakes done (each in its own task, bounded in
/// time and number); a failed handshake is logged and dropped, never ends the stream.
pub fn tls_incoming(
    listener: TcpListener,
    config: rustls::ServerConfig,
) -> impl Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(host_port("https://w1:7070/"), "w1:7070");
        assert_eq!(host("127.0.0.1:7070"), "127.0.0.1");
        assert_eq!(host("http://[::1]:7070"), "::1");
        assert_eq!(host("w1.example:1"), "w1.example");
    }
}
