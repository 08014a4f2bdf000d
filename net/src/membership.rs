//! Cluster membership: who the live workers are, as a view with an epoch.
//!
//! With etcd, each worker registers `/granary/members/<node_id>` (its addresses and capacity)
//! under a lease it keeps alive; a worker that dies stops renewing and its key expires with the
//! lease. Every worker watches the prefix and publishes a new [`View`] on each change, its epoch
//! being etcd's revision. When etcd is unreachable the last view stays in force (cached reads go
//! on) and the worker keeps trying to re-register. Without etcd a static member list from the
//! config is the view, with epoch 1.

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions};
use granary_core::backoff::Backoff;
use granary_core::placement::Member;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub const PREFIX: &str = "/granary/members/";

/// What a worker tells the cluster about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub node_id: String,
    /// The data plane (QUIC) address.
    pub data_addr: SocketAddr,
    /// The worker API (gRPC) address.
    pub api_addr: SocketAddr,
    pub memory_capacity: u64,
    pub disk_capacity: u64,
    /// Bytes of pinned datasets the node may hold (its `datasets.capacity`); 0: not published
    /// (a static member list, or a worker older than this field).
    #[serde(default)]
    pub dataset_capacity: u64,
}

impl Member for MemberInfo {
    fn id(&self) -> &str {
        &self.node_id
    }
}

/// The live members, sorted by node id, and the epoch of this view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub epoch: u64,
    pub members: Vec<MemberInfo>,
}

impl View {
    pub fn new(epoch: u64, mut members: Vec<MemberInfo>) -> Self {
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        members.dedup_by(|a, b| a.node_id == b.node_id);
        View { epoch, members }
    }

    pub fn get(&self, node_id: &str) -> Option<&MemberInfo> {
        self.members.iter().find(|m| m.node_id == node_id)
    }
}

/// A live view of the membership.
#[derive(Debug, Clone)]
pub struct Membership {
    rx: watch::Receiver<Arc<View>>,
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd at {endpoints}: {message}")]
    Etcd { endpoints: String, message: String },
}

impl Membership {
    /// A fixed member list (no etcd).
    pub fn fixed(members: Vec<MemberInfo>) -> Self {
        let (_tx, rx) = watch::channel(Arc::new(View::new(1, members)));
        Membership { rx }
    }

    pub fn view(&self) -> Arc<View> {
        self.rx.borrow().clone()
    }

    /// Waits until the view changes.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// Reads the current members from etcd once (for clients and `granary status`).
    pub async fn read(endpoints: &[String]) -> Result<View, MembershipError> {
        let mut client = connect(endpoints).await?;
        read_view(&mut client)
            .await
            .map_err(|e| etcd_error(endpoints, e))
    }

    /// Watches the members in etcd without registering (for FUSE clients).
    pub async fn watch(endpoints: &[String]) -> Result<Self, MembershipError> {
        Self::run(endpoints, None, Duration::from_secs(10)).await
    }

    /// Registers `me` in etcd under a lease of `ttl` and watches the members. Fails if etcd
    /// cannot be reached at start; later outages keep the last view and retry.
    pub async fn join(
        endpoints: &[String],
        me: MemberInfo,
        ttl: Duration,
    ) -> Result<Self, MembershipError> {
        Self::run(endpoints, Some(me), ttl).await
    }

    async fn run(
        endpoints: &[String],
        me: Option<MemberInfo>,
        ttl: Duration,
    ) -> Result<Self, MembershipError> {
        let mut client = connect(endpoints).await?;
        if let Some(me) = &me {
            register(&mut client, me, ttl)
                .await
                .map_err(|e| etcd_error(endpoints, e))?
                .0
                .abort();
        }
        let first = read_view(&mut client)
            .await
            .map_err(|e| etcd_error(endpoints, e))?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let endpoints = endpoints.to_vec();
        tokio::spawn(async move {
            let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            let mut failures = 0;
            loop {
                match session(&endpoints, me.as_ref(), ttl, &tx).await {
                    Ok(()) => return, // every receiver is gone
                    Err(e) => {
                        failures += 1;
                        let wait = backoff.after(failures);
                        tracing::warn!(error = %e, retry_in = ?wait, "etcd session lost; keeping the last membership view");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        });
        Ok(Membership { rx })
    }
}

fn etcd_error(endpoints: &[String], e: etcd_client::Error) -> MembershipError {
    MembershipError::Etcd {
        endpoints: endpoints.join(","),
        message: e.to_string(),
    }
}

/// A client of the etcd cluster at `endpoints`, with bounded connect and request timeouts.
pub async fn connect(endpoints: &[String]) -> Result<Client, MembershipError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        // etcd refuses HTTP/2 pings more often than every 5 s (--grpc-keepalive-min-time) with
        // GOAWAY "too many pings": a client pinging every 2 s lost its watch every few seconds.
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
    let connect = Client::connect(endpoints, Some(options));
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(etcd_error(endpoints, e)),
        Err(_) => Err(MembershipError::Etcd {
            endpoints: endpoints.join(","),
            message: "no answer within 10s".into(),
        }),
    }
}

/// Puts our key under a fresh lease and starts renewing it; returns the renewal task.
async fn register(
    client: &mut Client,
    me: &MemberInfo,
    ttl: Duration,
) -> Result<(tokio::task::JoinHandle<()>, i64), etcd_client::Error> {
    let lease = client
        .lease_grant(ttl.as_secs().max(2) as i64, None)
        .await?
        .id();
    let value = serde_json::to_string(me).expect("member info serializes");
    client
        .put(
            format!("{PREFIX}{}", me.node_id),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
    let every = ttl / 3;
    let task = tokio::spawn(async move {
        loop {
            if keeper.keep_alive().await.is_err() {
                return;
            }
            match stream.message().await {
                Ok(Some(resp)) if resp.ttl() > 0 => {}
                _ => return, // the lease is gone: the session re-registers
            }
            tokio::time::sleep(every).await;
        }
    });
    Ok((task, lease))
}

async fn read_view(client: &mut Client) -> Result<View, etcd_client::Error> {
    let resp = client
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await?;
    let epoch = resp.header().map_or(0, |h| h.revision()) as u64;
    let members = resp
        .kvs()
        .iter()
        .filter_map(|kv| match serde_json::from_slice::<MemberInfo>(kv.value()) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(key = ?kv.key_str(), error = %e, "ignoring a malformed member entry");
                None
            }
        })
        .collect();
    Ok(View::new(epoch, members))
}

/// One etcd session: (re-)register, publish the view, follow changes until something fails.
async fn session(
    endpoints: &[String],
    me: Option<&MemberInfo>,
    ttl: Duration,
    tx: &watch::Sender<Arc<View>>,
) -> Result<(), etcd_client::Error> {
    let mut client = match connect(endpoints).await {
        Ok(c) => c,
        Err(e) => return Err(etcd_client::Error::InvalidArgs(e.to_string())),
    };
    let renewal = match me {
        Some(me) => Some(register(&mut client, me, ttl).await?.0),
        None => None,
    };
    let view = read_view(&mut client).await?;
    let start = view.epoch as i64 + 1;
    publish(tx, view);
    let mut stream = client
        .watch(
            PREFIX,
            Some(WatchOptions::new().with_prefix().with_start_revision(start)),
        )
        .await?;
    let result = loop {
        tokio::select! {
            message = stream.message() => match message {
                Ok(Some(_)) => match read_view(&mut client).await {
                    Ok(view) => publish(tx, view),
                    Err(e) => break Err(e),
                },
                Ok(None) => break Err(etcd_client::Error::WatchError("watch ended".into())),
                Err(e) => break Err(e),
            },
            _ = tx.closed() => break Ok(()),
            _ = async {
                match &renewal {
                    Some(task) => while !task.is_finished() { tokio::time::sleep(Duration::from_millis(500)).await },
                    None => std::future::pending::<()>().await,
                }
            } => break Err(etcd_client::Error::LeaseKeepAliveError("lease renewal stopped".into())),
        }
    };
    if let Some(task) = renewal {
        task.abort();
    }
    result
}

fn publish(tx: &watch::Sender<Arc<View>>, view: View) {
    tx.send_if_modified(|current| {
        if current.members == view.members {
            return false;
        }
        tracing::info!(epoch = view.epoch, members = ?view.members.iter().map(|m| &m.node_id).collect::<Vec<_>>(), "membership changed");
        *current = Arc::new(view);
        true
    });
}
