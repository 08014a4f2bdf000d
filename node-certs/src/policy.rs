//! What the signer signs: pure checks over a CertificateSigningRequest and the facts the
//! apiserver gives about its requester, with no I/O.
//!
//! A request is granted only when all of these hold:
//! - it was made by the worker service account (`spec.username`, which the apiserver sets from
//!   the authenticated caller, never from the request body);
//! - with a token bound to a pod (`spec.extra` carries `authentication.kubernetes.io/pod-name`
//!   and `pod-uid`, which kube-apiserver adds for pod-bound service-account tokens);
//! - that pod, as the apiserver shows it now, has the same uid, runs as the worker service
//!   account, is not finished or being deleted, and is bound to the node the request names;
//! - the PKCS#10 request is well formed, its signature verifies (the requester holds the key),
//!   it asks for no CA rights, its common name is that node, and every name it asks for is one
//!   the node may have (its name, `localhost`, 127.0.0.1, the node's addresses);
//! - its Kubernetes `usages` are among digital signature, key encipherment, server and client
//!   auth.
//!
//! The certificate then issued is built from the [`Grant`], not copied from the request.

use rcgen::{
    CertificateSigningRequestParams, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, PublicKey, SanType,
};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// `spec.extra` key kube-apiserver sets to the name of the pod a token is bound to.
pub const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
/// `spec.extra` key kube-apiserver sets to the uid of the pod a token is bound to.
pub const POD_UID_KEY: &str = "authentication.kubernetes.io/pod-uid";

/// Kubernetes key usages a node certificate may ask for.
pub const ALLOWED_USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// Why a request is refused: a short reason (the condition's `reason`) and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: &'static str,
    pub message: String,
}

fn deny(reason: &'static str, message: impl Into<String>) -> Denial {
    Denial {
        reason,
        message: message.into(),
    }
}

/// The service account allowed to ask for node certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerAccount {
    pub namespace: String,
    pub name: String,
}

impl WorkerAccount {
    /// Parses `system:serviceaccount:NAMESPACE:NAME`.
    pub fn parse(username: &str) -> Result<WorkerAccount, String> {
        let rest = username
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(|| format!("{username:?} is not system:serviceaccount:NAMESPACE:NAME"))?;
        match rest.split_once(':') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains(':') => {
                Ok(WorkerAccount {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!(
                "{username:?} is not system:serviceaccount:NAMESPACE:NAME"
            )),
        }
    }

    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// The pod a request's token is bound to, as the request claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Checks who asked: the worker account, with a pod-bound token. Returns the bound pod.
pub fn check_requester(
    account: &WorkerAccount,
    username: Option<&str>,
    extra: Option<&BTreeMap<String, Vec<String>>>,
) -> Result<PodRef, Denial> {
    let expected = account.username();
    let username = username.unwrap_or("");
    if username != expected {
        return Err(deny(
            "NotWorkerAccount",
            format!("requested by {username:?}; only {expected} may ask for node certificates"),
        ));
    }
    let one = |key: &str| -> Option<String> {
        match extra.and_then(|e| e.get(key)).map(Vec::as_slice) {
            Some([value]) if !value.is_empty() => Some(value.clone()),
            _ => None,
        }
    };
    match (one(POD_NAME_KEY), one(POD_UID_KEY)) {
        (Some(name), Some(uid)) => Ok(PodRef {
            namespace: account.namespace.clone(),
            name,
            uid,
        }),
        _ => Err(deny(
            "NoPodBinding",
            "the request was made with a token not bound to a pod, so its node cannot be known",
        )),
    }
}

/// The pod as the apiserver shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub service_account: String,
    pub node_name: Option<String>,
    pub phase: Option<String>,
    pub deleting: bool,
}

/// Checks the bound pod and returns the node it runs on.
pub fn check_pod(
    account: &WorkerAccount,
    claimed: &PodRef,
    pod: Option<&PodFacts>,
) -> Result<String, Denial> {
    let name = format!("{}/{}", claimed.namespace, claimed.name);
    let Some(pod) = pod else {
        return Err(deny("PodNotFound", format!("pod {name} does not exist")));
    };
    if pod.uid != claimed.uid {
        return Err(deny(
            "PodMismatch",
            format!("pod {name} now has uid {}, not {}", pod.uid, claimed.uid),
        ));
    }
    if pod.service_account != account.name {
        return Err(deny(
            "PodMismatch",
            format!(
                "pod {name} runs as service account {:?}, not {}",
                pod.service_account, account.name
            ),
        ));
    }
    if pod.deleting || matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Err(deny(
            "PodNotRunning",
            format!("pod {name} has finished or is being deleted"),
        ));
    }
    match pod.node_name.as_deref() {
        Some(node) if !node.is_empty() => Ok(node.to_string()),
        _ => Err(deny(
            "PodNotScheduled",
            format!("pod {name} is not bound to a node"),
        )),
    }
}

/// What a well-formed request asks for.
#[derive(Debug, Clone)]
pub struct Requested {
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub public_key: PublicKey,
}

/// Parses the PKCS#10 request (PEM), verifies its signature, and refuses CA rights, unknown
/// extensions and usages outside [`ALLOWED_USAGES`].
pub fn check_request(pem: &[u8], usages: &[String]) -> Result<Requested, Denial> {
    if let Some(bad) = usages
        .iter()
        .find(|u| !ALLOWED_USAGES.contains(&u.as_str()))
    {
        return Err(deny(
            "UsageNotAllowed",
            format!(
                "usage {bad:?} is not allowed (only {})",
                ALLOWED_USAGES.join(", ")
            ),
        ));
    }
    let text = std::str::from_utf8(pem)
        .map_err(|_| deny("BadRequest", "spec.request is not a PEM text"))?;
    let csr = CertificateSigningRequestParams::from_pem(text).map_err(|e| {
        deny(
            "BadRequest",
            format!("spec.request is not a valid, correctly signed PKCS#10 request: {e}"),
        )
    })?;
    let params = &csr.params;
    if matches!(params.is_ca, IsCa::Ca(_))
        || params
            .key_usages
            .iter()
            .any(|u| matches!(u, KeyUsagePurpose::KeyCertSign | KeyUsagePurpose::CrlSign))
    {
        return Err(deny(
            "CANotAllowed",
            "the request asks for CA rights (CA:true or certificate/CRL signing)",
        ));
    }
    if let Some(eku) = params.extended_key_usages.iter().find(|u| {
        !matches!(
            u,
            ExtendedKeyUsagePurpose::ServerAuth | ExtendedKeyUsagePurpose::ClientAuth
        )
    }) {
        return Err(deny(
            "UsageNotAllowed",
            format!("extended key usage {eku:?} is not allowed (only server and client auth)"),
        ));
    }
    let common_name = match params.distinguished_name.get(&DnType::CommonName) {
        Some(DnValue::Utf8String(s)) => s.clone(),
        Some(DnValue::PrintableString(s)) => s.as_str().to_string(),
        Some(DnValue::Ia5String(s)) => s.as_str().to_string(),
        _ => return Err(deny("BadRequest", "the request has no common name")),
    };
    let (mut dns_names, mut ips) = (Vec::new(), Vec::new());
    for san in &params.subject_alt_names {
        match san {
            SanType::DnsName(name) => dns_names.push(name.as_str().to_string()),
            SanType::IpAddress(ip) => ips.push(*ip),
            other => {
                return Err(deny(
                    "NameNotAllowed",
                    format!("subject alternative name {other:?} is not allowed"),
                ));
            }
        }
    }
    Ok(Requested {
        common_name,
        dns_names,
        ips,
        public_key: csr.public_key,
    })
}

/// What the signer certifies: a node's name and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub node: String,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl Grant {
    /// Everything a node's certificate names: the node, `localhost`, 127.0.0.1 and its addresses.
    pub fn for_node(node: &str, addresses: &[IpAddr]) -> Grant {
        let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        for ip in addresses {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        Grant {
            node: node.to_string(),
            dns_names: vec![node.to_string(), "localhost".to_string()],
            ips,
        }
    }
}

/// Checks that the request names `node` (the bound pod's node) and nothing it may not have.
pub fn check_names(
    requested: &Requested,
    node: &str,
    addresses: &[IpAddr],
) -> Result<Grant, Denial> {
    if requested.common_name != node {
        return Err(deny(
            "WrongNode",
            format!(
                "the request is for node {:?} but the requesting pod runs on node {node:?}",
                requested.common_name
            ),
        ));
    }
    let grant = Grant::for_node(node, addresses);
    if let Some(name) = requested
        .dns_names
        .iter()
        .find(|n| !grant.dns_names.contains(n))
    {
        return Err(deny(
            "NameNotAllowed",
            format!("node {node} may not have the name {name:?}"),
        ));
    }
    if let Some(ip) = requested.ips.iter().find(|ip| !grant.ips.contains(ip)) {
        return Err(deny(
            "NameNotAllowed",
            format!("node {node} may not have the address {ip}"),
        ));
    }
    Ok(grant)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, KeyPair};

    fn account() -> WorkerAccount {
        WorkerAccount::parse("system:serviceaccount:granary:granary-worker").unwrap()
    }

    fn csr(params: CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        params
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
            .into_bytes()
    }

    fn node_params(cn: &str, names: &[&str]) -> CertificateParams {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p
    }

    fn usages() -> Vec<String> {
        ALLOWED_USAGES.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn worker_account_parses_and_refuses_other_shapes() {
        assert_eq!(
            account().username(),
            "system:serviceaccount:granary:granary-worker"
        );
        for bad in [
            "admin",
            "system:serviceaccount:granary",
            "system:serviceaccount::x",
        ] {
            assert!(WorkerAccount::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requester_must_be_the_worker_with_a_pod_bound_token() {
        let mut extra = BTreeMap::new();
        extra.insert(POD_NAME_KEY.to_string(), vec!["w-1".to_string()]);
        extra.insert(POD_UID_KEY.to_string(), vec!["u-1".to_string()]);
        let user = "system:serviceaccount:granary:granary-worker";
        let pod = check_requester(&account(), Some(user), Some(&extra)).unwrap();
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("granary", "w-1")
        );
        let other = check_requester(
            &account(),
            Some("system:serviceaccount:granary:default"),
            Some(&extra),
        );
        assert_eq!(other.unwrap_err().reason, "NotWorkerAccount");
        assert_eq!(
            check_requester(&account(), None, Some(&extra))
                .unwrap_err()
                .reason,
            "NotWorkerAccount"
        );
        assert_eq!(
            check_requester(&account(), Some(user), None)
                .unwrap_err()
                .reason,
            "NoPodBinding"
        );
        extra.insert(POD_UID_KEY.to_string(), vec!["a".into(), "b".into()]);
        assert_eq!(
            check_requester(&account(), Some(user), Some(&extra))
                .unwrap_err()
                .reason,
            "NoPodBinding"
        );
    }

    #[test]
    fn pod_must_match_and_be_bound() {
        let claimed = PodRef {
            namespace: "granary".into(),
            name: "w-1".into(),
            uid: "u-1".into(),
        };
        let pod = PodFacts {
            uid: "u-1".into(),
            service_account: "granary-worker".into(),
            node_name: Some("n1".into()),
            phase: Some("Pending".into()),
            deleting: false,
        };
        assert_eq!(check_pod(&account(), &claimed, Some(&pod)).unwrap(), "n1");
        let reason = |p: PodFacts| {
            check_pod(&account(), &claimed, Some(&p))
                .unwrap_err()
                .reason
        };
        assert_eq!(
            check_pod(&account(), &claimed, None).unwrap_err().reason,
            "PodNotFound"
        );
        assert_eq!(
            reason(PodFacts {
                uid: "u-2".into(),
                ..pod.clone()
            }),
            "PodMismatch"
        );
        assert_eq!(
            reason(PodFacts {
                service_account: "default".into(),
                ..pod.clone()
            }),
            "PodMismatch"
        );
        assert_eq!(
            reason(PodFacts {
                deleting: true,
                ..pod.clone()
            }),
            "PodNotRunning"
        );
        assert_eq!(
            reason(PodFacts {
                phase: Some("Succeeded".into()),
                ..pod.clone()
            }),
            "PodNotRunning"
        );
        assert_eq!(
            reason(PodFacts {
                node_name: None,
                ..pod
            }),
            "PodNotScheduled"
        );
    }

    #[test]
    fn a_node_request_is_granted_its_names_only() {
        let mut p = node_params("n1", &["n1", "localhost"]);
        p.subject_alt_names
            .push(SanType::IpAddress("10.0.0.1".parse().unwrap()));
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let req = check_request(&csr(p), &usages()).unwrap();
        let addrs = ["10.0.0.1".parse().unwrap()];
        let grant = check_names(&req, "n1", &addrs).unwrap();
        assert_eq!(grant.dns_names, ["n1", "localhost"]);
        assert_eq!(grant.ips.len(), 2);
        assert_eq!(
            check_names(&req, "n2", &addrs).unwrap_err().reason,
            "WrongNode"
        );
        // An address the node does not have.
        assert_eq!(
            check_names(&req, "n1", &[]).unwrap_err().reason,
            "NameNotAllowed"
        );
        let other = check_request(&csr(node_params("n1", &["n1", "n2"])), &usages()).unwrap();
        assert_eq!(
            check_names(&other, "n1", &[]).unwrap_err().reason,
            "NameNotAllowed"
        );
    }

    #[test]
    fn ca_rights_bad_usages_and_garbage_are_refused() {
        let mut ca = node_params("n1", &["n1"]);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        assert_eq!(
            check_request(&csr(ca), &usages()).unwrap_err().reason,
            "CANotAllowed"
        );
        let mut signing = node_params("n1", &["n1"]);
        signing.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        assert_eq!(
            check_request(&csr(signing), &usages()).unwrap_err().reason,
            "CANotAllowed"
        );
        let mut code = node_params("n1", &["n1"]);
        code.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        assert_eq!(
            check_request(&csr(code), &usages()).unwrap_err().reason,
            "UsageNotAllowed"
        );
        let plain = csr(node_params("n1", &["n1"]));
        assert_eq!(
            check_request(&plain, &["cert sign".to_string()])
                .unwrap_err()
                .reason,
            "UsageNotAllowed"
        );
        assert_eq!(
            check_request(b"garbage", &usages()).unwrap_err().reason,
            "BadRequest"
        );
        // A request whose signature does not verify (one byte of the signature flipped).
        let text = String::from_utf8(plain).unwrap();
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let last = lines.len() - 2;
        let mut body: Vec<char> = lines[last].chars().collect();
        let i = body.len() / 2;
        body[i] = if body[i] == 'A' { 'B' } else { 'A' };
        lines[last] = body.into_iter().collect();
        let broken = lines.join("\n");
        assert_eq!(
            check_request(broken.as_bytes(), &usages())
                .unwrap_err()
                .reason,
            "BadRequest"
        );
        let mut nameless = CertificateParams::new(vec!["n1".to_string()]).unwrap();
        nameless.distinguished_name = rcgen::DistinguishedName::new();
        assert_eq!(
            check_request(&csr(nameless), &usages()).unwrap_err().reason,
            "BadRequest"
        );
    }
}
