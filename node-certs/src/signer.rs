//! The signer: the one component that holds the CA key. It publishes the CA certificate in a
//! ConfigMap, watches CertificateSigningRequests with its signer name (and lists them again
//! every [`RESYNC`], so nothing is missed across a lost watch), and for each one not yet
//! decided either approves and signs it or denies it with a reason.
//!
//! The facts come from the apiserver, not from the request: who asked (`spec.username`,
//! `spec.extra`, set by the apiserver at creation), the pod the token is bound to and the node
//! it runs on (a GET of that pod), and the node's addresses (a GET of the Node). The policy
//! itself is [`crate::policy`]. A request with another signer name is never looked at.

use crate::ca::Ca;
use crate::policy::{self, Denial, Grant, PodFacts, WorkerAccount};
use futures::StreamExt;
use granary_core::metrics::CSR_DECISIONS;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// How often every pending request is looked at again, watch or not.
pub const RESYNC: Duration = Duration::from_secs(30);

/// The ConfigMap key holding the CA certificate.
pub const CA_KEY: &str = "ca.pem";

/// What the signer signs for, and how.
#[derive(Debug, Clone)]
pub struct SignerConfig {
    /// `spec.signerName` of the requests this signer handles (e.g. `granary.io/node`).
    pub signer_name: String,
    /// The only account whose requests are signed.
    pub account: WorkerAccount,
    /// Lifetime of an issued certificate.
    pub lifetime: Duration,
    /// Where the CA certificate is published: namespace and ConfigMap name.
    pub ca_config_map: (String, String),
    /// DNS names every node certificate also carries, never asked by nodes: the Service in
    /// front of all workers (`granary-workers.granary.svc`), so that a client reaching any
    /// worker through it (the scheduler hook, `granary dataset --server`) can check the name.
    pub service_names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Ca(#[from] crate::ca::CaError),
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not ours, or already decided.
    Skipped,
    Issued {
        node: String,
    },
    /// Denied, or marked Failed when someone else had approved it.
    Refused {
        denial: Denial,
        failed: bool,
    },
}

/// The signer's handles.
pub struct Signer {
    client: kube::Client,
    ca: Ca,
    config: SignerConfig,
}

fn condition(csr: &CertificateSigningRequest, kind: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == kind && c.status == "True"))
}

/// The request's conditions as JSON, to append one to (a merge patch replaces the list).
fn existing_conditions(csr: &CertificateSigningRequest) -> Vec<serde_json::Value> {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| serde_json::to_value(c).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn issued(csr: &CertificateSigningRequest) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty())
}

fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::from(SystemTime::now());
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A serial number unique per request: its uid's bytes, then the time.
fn serial_for(csr: &CertificateSigningRequest) -> Vec<u8> {
    let mut serial: Vec<u8> = csr
        .metadata
        .uid
        .as_deref()
        .unwrap_or("")
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .collect::<Vec<u8>>()
        .chunks(2)
        .filter_map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .take(16)
        .collect();
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u32;
    serial.extend_from_slice(&nanos.to_be_bytes());
    serial
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn new(client: kube::Client, ca: Ca, config: SignerConfig) -> Signer {
        Signer { client, ca, config }
    }

    /// Writes the CA certificate into the ConfigMap nodes read it from.
    pub async fn publish_ca(&self) -> Result<(), SignerError> {
        let (ns, name) = &self.config.ca_config_map;
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns},
            "data": {CA_KEY: self.ca.certificate_pem()},
        });
        api.patch(
            name,
            &PatchParams::apply("granary-signer").force(),
            &Patch::Apply(&cm),
        )
        .await?;
        tracing::info!(configmap = %format!("{ns}/{name}"), "CA certificate published");
        Ok(())
    }

    /// Publishes the CA, then handles requests until the process ends.
    pub async fn run(self) -> Result<(), SignerError> {
        self.publish_ca().await?;
        let api: Api<CertificateSigningRequest> = Api::all(self.client.clone());
        let selector = format!("spec.signerName={}", self.config.signer_name);
        let mut events =
            watcher::watcher(api.clone(), watcher::Config::default().fields(&selector))
                .default_backoff()
                .boxed();
        let mut resync = tokio::time::interval(RESYNC);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(Event::Apply(csr) | Event::InitApply(csr))) => self.handle_logged(&csr).await,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(error = %e, "CSR watch failed; retrying"),
                    None => return Ok(()),
                },
                _ = resync.tick() => match api.list(&ListParams::default().fields(&selector)).await {
                    Ok(list) => for csr in &list.items { self.handle_logged(csr).await },
                    Err(e) => tracing::warn!(error = %e, "cannot list CSRs; retrying"),
                },
            }
        }
    }

    async fn handle_logged(&self, csr: &CertificateSigningRequest) {
        let name = csr.metadata.name.as_deref().unwrap_or("");
        match self.handle(csr).await {
            Ok(Outcome::Skipped) => {}
            Ok(Outcome::Issued { node }) => {
                metrics::counter!(CSR_DECISIONS, "decision" => "issued", "reason" => "granted")
                    .increment(1);
                tracing::info!(csr = name, %node, "CSR approved and signed");
            }
            Ok(Outcome::Refused { denial: d, failed }) => {
                let decision = if failed { "failed" } else { "denied" };
                metrics::counter!(CSR_DECISIONS, "decision" => decision, "reason" => d.reason)
                    .increment(1);
                tracing::warn!(csr = name, decision, reason = d.reason, message = %d.message, "CSR refused");
            }
            Err(e) => {
                tracing::warn!(csr = name, error = %e, "CSR not handled; will retry");
            }
        }
    }

    /// Decides one request and records the decision on it.
    pub async fn handle(&self, csr: &CertificateSigningRequest) -> Result<Outcome, SignerError> {
        let undecided = |csr: &CertificateSigningRequest| {
            csr.spec.signer_name == self.config.signer_name
                && !issued(csr)
                && !condition(csr, "Denied")
                && !condition(csr, "Failed")
        };
        if !undecided(csr) {
            return Ok(Outcome::Skipped);
        }
        // An event may be older than our own last write to this request: decide on it as it
        // is now.
        let api: Api<CertificateSigningRequest> = Api::all(self.client.clone());
        let name = csr.metadata.name.as_deref().unwrap_or("");
        let Some(csr) = api.get_opt(name).await? else {
            return Ok(Outcome::Skipped);
        };
        let csr = &csr;
        if !undecided(csr) {
            return Ok(Outcome::Skipped);
        }
        match self.decide(csr).await? {
            Ok((grant, key)) => {
                self.approve_and_sign(csr, &grant, &key).await?;
                Ok(Outcome::Issued { node: grant.node })
            }
            Err(denial) => {
                let failed = self.refuse(csr, &denial).await?;
                Ok(Outcome::Refused { denial, failed })
            }
        }
    }

    /// The policy, with the apiserver's facts. `Err` only for a failure to get those facts.
    async fn decide(
        &self,
        csr: &CertificateSigningRequest,
    ) -> Result<Result<(Grant, rcgen::PublicKey), Denial>, SignerError> {
        let spec = &csr.spec;
        let pod_ref = match policy::check_requester(
            &self.config.account,
            spec.username.as_deref(),
            spec.extra.as_ref(),
        ) {
            Ok(p) => p,
            Err(d) => return Ok(Err(d)),
        };
        let requested =
            match policy::check_request(&spec.request.0, spec.usages.as_deref().unwrap_or(&[])) {
                Ok(r) => r,
                Err(d) => return Ok(Err(d)),
            };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &pod_ref.namespace);
        let pod = pods.get_opt(&pod_ref.name).await?.map(|p| PodFacts {
            uid: p.metadata.uid.unwrap_or_default(),
            service_account: p
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
            phase: p.status.as_ref().and_then(|s| s.phase.clone()),
            deleting: p.metadata.deletion_timestamp.is_some(),
        });
        let node = match policy::check_pod(&self.config.account, &pod_ref, pod.as_ref()) {
            Ok(n) => n,
            Err(d) => return Ok(Err(d)),
        };
        let nodes: Api<Node> = Api::all(self.client.clone());
        let Some(node_obj) = nodes.get_opt(&node).await? else {
            return Ok(Err(Denial {
                reason: "NodeNotFound",
                message: format!("node {node} does not exist"),
            }));
        };
        let addresses: Vec<IpAddr> = node_obj
            .status
            .and_then(|s| s.addresses)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        Ok(
            policy::check_names(&requested, &node, &addresses).map(|mut grant| {
                for name in &self.config.service_names {
                    if !grant.dns_names.contains(name) {
                        grant.dns_names.push(name.clone());
                    }
                }
                (grant, requested.public_key)
            }),
        )
    }

    async fn approve_and_sign(
        &self,
        csr: &CertificateSigningRequest,
        grant: &Grant,
        key: &rcgen::PublicKey,
    ) -> Result<(), SignerError> {
        let api: Api<CertificateSigningRequest> = Api::all(self.client.clone());
        let name = csr.metadata.name.as_deref().unwrap_or("");
        if !condition(csr, "Approved") {
            let mut conditions = existing_conditions(csr);
            conditions.push(json!({
                "type": "Approved",
                "status": "True",
                "reason": "GranaryNodeCertificate",
                "message": format!("the worker pod on node {} asked for its certificate", grant.node),
                "lastUpdateTime": now_rfc3339(),
            }));
            api.patch_approval(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": conditions}})),
            )
            .await?;
        }
        let pem = self.ca.issue(
            grant,
            key,
            &serial_for(csr),
            SystemTime::now(),
            self.config.lifetime,
        )?;
        let certificate = k8s_openapi::ByteString(pem.into_bytes());
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"certificate": certificate}})),
        )
        .await?;
        Ok(())
    }

    /// Denies a request, or marks it Failed if someone else already approved it (then returns
    /// true).
    async fn refuse(
        &self,
        csr: &CertificateSigningRequest,
        denial: &Denial,
    ) -> Result<bool, SignerError> {
        let api: Api<CertificateSigningRequest> = Api::all(self.client.clone());
        let name = csr.metadata.name.as_deref().unwrap_or("");
        let approved = condition(csr, "Approved");
        let mut conditions = existing_conditions(csr);
        conditions.push(json!({
            "type": if approved { "Failed" } else { "Denied" },
            "status": "True",
            "reason": denial.reason,
            "message": denial.message,
            "lastUpdateTime": now_rfc3339(),
        }));
        let patch = Patch::Merge(json!({"status": {"conditions": conditions}}));
        if approved {
            api.patch_status(name, &PatchParams::default(), &patch)
                .await?;
        } else {
            api.patch_approval(name, &PatchParams::default(), &patch)
                .await?;
        }
        Ok(approved)
    }
}

/// Reads `NAMESPACE/NAME`.
pub fn parse_object_ref(text: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.into(), name.into()))
        }
        _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
    }
}
