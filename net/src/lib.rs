//! Granary's network: how processes reach each other, over the wire types of `granary-proto`.
//!
//! - [`quic`]: the QUIC endpoint serving and fetching blocks between workers and clients
//!   (mutual TLS, one stream per block, frames from `granary_proto::frame`).
//! - [`tls`]: the cluster CA's certificates and the rustls configurations built from them.
//! - [`membership`]: workers' etcd leases and the watched view of live members.
//! - [`channel`]: gRPC channels over TLS with the cluster CA, and the server's TLS accept loop.
//! - [`client`]: `GrpcCache`, a worker's `CacheApi` over gRPC; [`datasets`]: the Datasets API's
//!   client.
//! - [`cluster`]: `ClusterClient`, a `CacheApi` over the whole cluster, each block asked of its
//!   owners in the order `granary_core::placement::failover` gives.

pub mod channel;
pub mod client;
pub mod cluster;
pub mod datasets;
pub mod membership;
pub mod quic;
pub mod tls;
