//! Cluster membership: who the live workers are, as a view with an epoch.
//!
//! With etcd, each worker registers `/granary/members/<node_id>` (its addresses and capacity)
//! under a lease it keeps alive. The record is signed with the worker's key and carries its
//! certificate; a reader keeps it only if the cluster CA signed that certificate for the node id
//! the key names and the signature matches, so a record written by anyone else (a forged member,
//! a duplicate shadowing a real worker's address) is logged and ignored. A worker whose record is
//! deleted writes it again. a worker that dies stops renewing and its key expires with the
//! lease. Every worker watches the prefix and publishes a new [`View`] on each change, its epoch
//! being etcd's revision. When etcd is unreachable the last view stays in force (cached reads go
//! on) and the worker keeps trying to re-register. Without etcd a static member list from the
//! config is the view, with epoch 1.

use crate::tls::{Signature, TlsIdentity};
use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions};
use granary_core::backoff::Backoff;
use granary_core::placement::{Member, check_node_id};
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

impl MemberInfo {
    /// Checks what a record read from etcd claims before anything uses it.
    pub fn check(&self) -> Result<(), String> {
        check_node_id(&self.node_id)?;
        for (what, addr) in [("data_addr", self.data_addr), ("api_addr", self.api_addr)] {
            if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
                return Err(format!("{what} {addr} is not an address to connect to"));
            }
        }
        const MAX: u64 = 1 << 60; // an exbibyte: beyond any node
        for (what, n) in [
            ("memory_capacity", self.memory_capacity),
            ("disk_capacity", self.disk_capacity),
            ("dataset_capacity", self.dataset_capacity),
        ] {
            if n > MAX {
                return Err(format!("{what} {n} is out of range"));
            }
        }
        Ok(())
    }
}

/// A member record as stored in etcd: the record's JSON, signed by the node it names.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SignedRecord {
    /// `MemberInfo` as JSON: the exact bytes signed.
    record: String,
    /// The signer's certificate chain (PEM).
    cert: String,
    /// The TLS 1.3 signature scheme code.
    scheme: u16,
    /// The signature, base64.
    signature: String,
}

/// Largest member record accepted (a record with a certificate chain is ~2 KiB).
const MAX_RECORD_BYTES: usize = 64 << 10;

fn seal(me: &MemberInfo, tls: &TlsIdentity) -> Result<String, String> {
    use base64::Engine;
    let record = serde_json::to_string(me).expect("member info serializes");
    let signature = tls.sign(record.as_bytes()).map_err(|e| e.to_string())?;
    let sealed = SignedRecord {
        record,
        cert: signature.chain,
        scheme: signature.scheme,
        signature: base64::engine::general_purpose::STANDARD.encode(&signature.bytes),
    };
    Ok(serde_json::to_string(&sealed).expect("record serializes"))
}

/// The member a record under `key` describes, if the record is well formed, checked and signed
/// by the node it names.
fn open(key: &[u8], value: &[u8], tls: &TlsIdentity) -> Result<MemberInfo, String> {
    use base64::Engine;
    if value.len() > MAX_RECORD_BYTES {
        return Err(format!("record of {} bytes is too large", value.len()));
    }
    let sealed: SignedRecord =
        serde_json::from_slice(value).map_err(|e| format!("not a signed member record: {e}"))?;
    let member: MemberInfo = serde_json::from_str(&sealed.record)
        .map_err(|e| format!("malformed member record: {e}"))?;
    member.check()?;
    let key_id = key.strip_prefix(PREFIX.as_bytes()).unwrap_or(key);
    if key_id != member.node_id.as_bytes() {
        return Err(format!(
            "the record names {:?} under another node's key",
            member.node_id
        ));
    }
    let signature = Signature {
        chain: sealed.cert,
        scheme: sealed.scheme,
        bytes: base64::engine::general_purpose::STANDARD
            .decode(&sealed.signature)
            .map_err(|e| format!("signature: {e}"))?,
    };
    tls.verify(&member.node_id, sealed.record.as_bytes(), &signature)
        .map_err(|e| e.to_string())?;
    Ok(member)
}

/// How to reach etcd: its endpoints and the TLS identity that secures them (`https://` URLs)
/// and checks the member records read from them (always).
#[derive(Debug, Clone)]
pub struct Etcd {
    endpoints: Vec<String>,
    tls: TlsIdentity,
}

impl Etcd {
    /// Endpoints are all `http://` or all `https://`; `https://` needs a certificate of our own
    /// (etcd checks client certificates).
    pub fn new(endpoints: &[String], tls: TlsIdentity) -> Result<Self, MembershipError> {
        let error = |message: String| MembershipError::Etcd {
            endpoints: endpoints.join(","),
            message,
        };
        if endpoints.is_empty() {
            return Err(error("no etcd endpoint given".into()));
        }
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        let http = endpoints
            .iter()
            .filter(|e| e.starts_with("http://"))
            .count();
        if https + http != endpoints.len() || (https > 0 && http > 0) {
            return Err(error(
                "give etcd URLs as all http://HOST:PORT or all https://HOST:PORT".into(),
            ));
        }
        if https > 0 && !tls.has_certificate() {
            return Err(error(
                "https etcd needs a client certificate (--tls-name NAME in --tls-dir)".into(),
            ));
        }
        Ok(Etcd {
            endpoints: endpoints.to_vec(),
            tls,
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn tls(&self) -> &TlsIdentity {
        &self.tls
    }

    fn is_https(&self) -> bool {
        self.endpoints.iter().all(|e| e.starts_with("https://"))
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
    pub async fn read(etcd: &Etcd) -> Result<View, MembershipError> {
        let mut client = connect(etcd).await?;
        read_view(&mut client, &etcd.tls)
            .await
            .map_err(|e| etcd_error(&etcd.endpoints, e))
    }

    /// Watches the members in etcd without registering (for FUSE clients).
    pub async fn watch(etcd: &Etcd) -> Result<Self, MembershipError> {
        Self::run(etcd, None, Duration::from_secs(10)).await
    }

    /// Registers `me` in etcd under a lease of `ttl`, signed with our certificate, and watches
    /// the members. Fails if etcd cannot be reached at start; later outages keep the last view
    /// and retry.
    pub async fn join(etcd: &Etcd, me: MemberInfo, ttl: Duration) -> Result<Self, MembershipError> {
        Self::run(etcd, Some(me), ttl).await
    }

    async fn run(
        etcd: &Etcd,
        me: Option<MemberInfo>,
        ttl: Duration,
    ) -> Result<Self, MembershipError> {
        let error = |message: String| MembershipError::Etcd {
            endpoints: etcd.endpoints.join(","),
            message,
        };
        // Fail at start, not in the background, on a record we could not sign.
        if let Some(me) = &me {
            me.check().map_err(error)?;
            seal(me, &etcd.tls).map_err(error)?;
        }
        let mut client = connect(etcd).await?;
        if let Some(me) = &me {
            register(&mut client, me, &etcd.tls, ttl)
                .await
                .map_err(|e| etcd_error(&etcd.endpoints, e))?
                .0
                .abort();
        }
        let first = read_view(&mut client, &etcd.tls)
            .await
            .map_err(|e| etcd_error(&etcd.endpoints, e))?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let etcd = etcd.clone();
        tokio::spawn(async move {
            let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            let mut failures = 0;
            loop {
                match session(&etcd, me.as_ref(), ttl, &tx).await {
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

/// A client of the etcd cluster, with bounded connect and request timeouts; over TLS with our
/// certificate when the URLs are `https://`.
pub async fn connect(etcd: &Etcd) -> Result<Client, MembershipError> {
    let endpoints = &etcd.endpoints;
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        // etcd refuses HTTP/2 pings more often than every 5 s (--grpc-keepalive-min-time) with
        // GOAWAY "too many pings": a client pinging every 2 s lost its watch every few seconds.
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
    if etcd.is_https() {
        let (cert, key) = etcd.tls.own_pem().map_err(|e| MembershipError::Etcd {
            endpoints: endpoints.join(","),
            message: e.to_string(),
        })?;
        options = options.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(etcd.tls.ca_pem()))
                .identity(etcd_client::Identity::from_pem(cert, key)),
        );
    }
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

/// Puts our signed record under a fresh lease and starts renewing it; returns the renewal task
/// and the lease.
async fn register(
    client: &mut Client,
    me: &MemberInfo,
    tls: &TlsIdentity,
    ttl: Duration,
) -> Result<(tokio::task::JoinHandle<()>, i64), etcd_client::Error> {
    let lease = client
        .lease_grant(ttl.as_secs().clamp(2, 3600) as i64, None)
        .await?
        .id();
    put_record(client, me, tls, lease).await?;
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

async fn put_record(
    client: &mut Client,
    me: &MemberInfo,
    tls: &TlsIdentity,
    lease: i64,
) -> Result<(), etcd_client::Error> {
    // Signed now, with the certificate in force now (it may have been renewed on disk).
    let value = seal(me, tls).map_err(etcd_client::Error::InvalidArgs)?;
    client
        .put(
            format!("{PREFIX}{}", me.node_id),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    Ok(())
}

/// Whether this version of a refused record is new to this process: it is logged and counted
/// once, not at every read of the view. Bounded: forgotten wholesale past 1,024 versions.
fn first_sighting(key: &[u8], revision: i64) -> bool {
    use std::collections::HashSet;
    use std::sync::Mutex;
    type Versions = HashSet<(Vec<u8>, i64)>;
    static SEEN: Mutex<Option<Versions>> = Mutex::new(None);
    let mut seen = SEEN.lock().expect("refused records");
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.len() >= 1024 {
        seen.clear();
    }
    seen.insert((key.to_vec(), revision))
}

async fn read_view(client: &mut Client, tls: &TlsIdentity) -> Result<View, etcd_client::Error> {
    let resp = client
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await?;
    let epoch = resp.header().map_or(0, |h| h.revision()) as u64;
    let members = resp
        .kvs()
        .iter()
        .filter_map(|kv| match open(kv.key(), kv.value(), tls) {
            Ok(m) => Some(m),
            Err(e) => {
                if first_sighting(kv.key(), kv.mod_revision()) {
                    metrics::counter!(granary_core::metrics::ETCD_RECORDS_REFUSED, "kind" => "member")
                        .increment(1);
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()).escape_debug(), error = %e, "ignoring a member record");
                }
                None
            }
        })
        .collect();
    Ok(View::new(epoch, members))
}

/// One etcd session: (re-)register, publish the view, follow changes until something fails.
async fn session(
    etcd: &Etcd,
    me: Option<&MemberInfo>,
    ttl: Duration,
    tx: &watch::Sender<Arc<View>>,
) -> Result<(), etcd_client::Error> {
    let mut client = match connect(etcd).await {
        Ok(c) => c,
        Err(e) => return Err(etcd_client::Error::InvalidArgs(e.to_string())),
    };
    let renewal = match me {
        Some(me) => Some(register(&mut client, me, &etcd.tls, ttl).await?),
        None => None,
    };
    let view = read_view(&mut client, &etcd.tls).await?;
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
                Ok(Some(_)) => match read_view(&mut client, &etcd.tls).await {
                    Ok(view) => {
                        // Our record deleted by someone (the lease lives on): write it again.
                        if let (Some(me), Some((_, lease))) = (me, &renewal)
                            && view.get(&me.node_id) != Some(me)
                        {
                            tracing::warn!(node = %me.node_id, "our member record was removed or replaced; writing it again");
                            if let Err(e) = put_record(&mut client, me, &etcd.tls, *lease).await {
                                break Err(e);
                            }
                        }
                        publish(tx, view)
                    }
                    Err(e) => break Err(e),
                },
                Ok(None) => break Err(etcd_client::Error::WatchError("watch ended".into())),
                Err(e) => break Err(e),
            },
            _ = tx.closed() => break Ok(()),
            _ = async {
                match &renewal {
                    Some((task, _)) => while !task.is_finished() { tokio::time::sleep(Duration::from_millis(500)).await },
                    None => std::future::pending::<()>().await,
                }
            } => break Err(etcd_client::Error::LeaseKeepAliveError("lease renewal stopped".into())),
        }
    };
    if let Some((task, _)) = renewal {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{TlsFiles, generate_dev_certs};

    fn member(id: &str) -> MemberInfo {
        MemberInfo {
            node_id: id.into(),
            data_addr: "127.0.0.1:7070".parse().unwrap(),
            api_addr: "127.0.0.1:7070".parse().unwrap(),
            memory_capacity: 1 << 30,
            disk_capacity: 0,
            dataset_capacity: 0,
        }
    }

    fn key(id: &str) -> Vec<u8> {
        format!("{PREFIX}{id}").into_bytes()
    }

    #[test]
    fn only_records_signed_by_the_node_they_name_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        generate_dev_certs(dir.path(), &["w1".into(), "w2".into()]).unwrap();
        let w1 = TlsIdentity::load(&TlsFiles::in_dir(dir.path(), "w1")).unwrap();
        let w2 = TlsIdentity::load(&TlsFiles::in_dir(dir.path(), "w2")).unwrap();
        let reader = TlsIdentity::trust_only(&dir.path().join("ca.pem")).unwrap();

        let sealed = seal(&member("w1"), &w1).unwrap();
        assert_eq!(
            open(&key("w1"), sealed.as_bytes(), &reader).unwrap(),
            member("w1")
        );
        // Under another node's key (a duplicate shadowing w2).
        let e = open(&key("w2"), sealed.as_bytes(), &reader).unwrap_err();
        assert!(e.contains("another node's key"), "{e}");
        // w2 signing a record that claims to be w1.
        let forged = seal(&member("w1"), &w2).unwrap();
        let e = open(&key("w1"), forged.as_bytes(), &reader).unwrap_err();
        assert!(e.contains("w1"), "{e}");
        // A record changed after signing (another address).
        let tampered = sealed.replace("7070", "7071");
        assert!(open(&key("w1"), tampered.as_bytes(), &reader).is_err());
        // Plain JSON, as before records were signed.
        let plain = serde_json::to_vec(&member("w1")).unwrap();
        assert!(
            open(&key("w1"), &plain, &reader)
                .unwrap_err()
                .contains("not a signed member record")
        );
        // A certificate from another CA.
        let other = tempfile::tempdir().unwrap();
        generate_dev_certs(other.path(), &["w1".into()]).unwrap();
        let stranger = TlsIdentity::load(&TlsFiles::in_dir(other.path(), "w1")).unwrap();
        let foreign = seal(&member("w1"), &stranger).unwrap();
        assert!(open(&key("w1"), foreign.as_bytes(), &reader).is_err());
    }

    #[test]
    fn records_out_of_range_are_refused() {
        let mut m = member("w1");
        m.data_addr = "0.0.0.0:7070".parse().unwrap();
        assert!(m.check().is_err());
        let mut m = member("w1");
        m.api_addr = "127.0.0.1:0".parse().unwrap();
        assert!(m.check().is_err());
        let mut m = member("w1");
        m.memory_capacity = u64::MAX;
        assert!(m.check().is_err());
        assert!(member("../x").check().is_err());
        assert!(member("w1").check().is_ok());
    }
}
