//! HTTPS for the extender: a [`TlsListener`] that hands axum only connections whose TLS handshake
//! succeeded, so with a server config that requires client certificates (mutual TLS) a client
//! without a certificate the CA signed never reaches a route. The handshakes are the worker
//! API's (`granary_net::channel::tls_incoming`): each in its own task, bounded in time and number.

use futures::{Stream, StreamExt};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

type Incoming = Pin<Box<dyn Stream<Item = io::Result<TlsStream<TcpStream>>> + Send>>;

/// Accepted, authenticated TLS connections, for `axum::serve`.
pub struct TlsListener {
    incoming: Incoming,
    local: SocketAddr,
}

impl TlsListener {
    /// Serves TLS with `config` on `tcp`. The config's ALPN is set to `http/1.1` (the extender
    /// speaks HTTP/1.1 only).
    pub fn new(tcp: TcpListener, mut config: rustls::ServerConfig) -> io::Result<TlsListener> {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let local = tcp.local_addr()?;
        let incoming = Box::pin(granary_net::channel::tls_incoming(tcp, config));
        Ok(TlsListener { incoming, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(tls)) => match tls.get_ref().0.peer_addr() {
                    Ok(peer) => return (tls, peer),
                    Err(_) => continue, // gone already
                },
                Some(Err(_)) => continue,
                // The accept loop ended (the runtime is shutting down): accept nothing more.
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
