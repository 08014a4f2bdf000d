//! The node side: a key made here (never sent anywhere), a CertificateSigningRequest for this
//! node with the Granary signer name, a bounded wait for the signer's answer, and the files
//! `NODE.key` (0600), `NODE.pem` and `ca.pem` (from the ConfigMap the signer publishes) written
//! into the TLS directory. The certificate is checked before it is written: it must be for
//! this key and this node, and verify against the CA.
//!
//! Files are replaced atomically (a temporary file, then a rename), the key before the
//! certificate, so a reader that reloads when `NODE.pem` changes finds the matching key. With
//! [`keep_renewed`] a new key and certificate replace the old ones at two thirds of the
//! certificate's lifetime; a failed attempt is retried with backoff.

use crate::policy::ALLOWED_USAGES;
use crate::signer::CA_KEY;
use granary_core::backoff::Backoff;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData, SanType};
use serde_json::json;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use x509_parser::prelude::{FromDer, X509Certificate};

/// What this node asks for and where it writes the answer.
#[derive(Debug, Clone)]
pub struct NodeRequest {
    pub node: String,
    pub out: PathBuf,
    pub signer_name: String,
    /// Namespace and name of the ConfigMap holding the CA certificate.
    pub ca_config_map: (String, String),
    /// How long to wait for the signer's answer.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate request {name} was denied: {reason}: {message}")]
    Denied {
        name: String,
        reason: String,
        message: String,
    },
    #[error("certificate request {name} failed: {reason}: {message}")]
    Failed {
        name: String,
        reason: String,
        message: String,
    },
    #[error(
        "certificate request {name} was not answered within {after:?} (is the signer running, \
         with signer name {signer}?)"
    )]
    Timeout {
        name: String,
        after: Duration,
        signer: String,
    },
    #[error("certificate request {0} was deleted before it was answered")]
    Deleted(String),
    #[error("the issued certificate is unusable: {0}")]
    BadCertificate(String),
    #[error("no CA certificate in ConfigMap {0} (key {CA_KEY}); is the signer running?")]
    NoCa(String),
    #[error("{0}")]
    Local(String),
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Two thirds into the lifetime: when a new certificate is asked for.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }
}

fn first_cert(pem: &[u8], what: &str) -> Result<Vec<u8>, String> {
    let (_, parsed) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("{what}: not PEM: {e}"))?;
    if parsed.label != "CERTIFICATE" {
        return Err(format!(
            "{what}: a {} block, not a CERTIFICATE",
            parsed.label
        ));
    }
    Ok(parsed.contents)
}

/// Checks that `cert_pem` is for `node` and for the key whose SubjectPublicKeyInfo is `spki`,
/// verifies against `ca_pem`, and has not expired at `now`.
pub fn verify_issued(
    cert_pem: &[u8],
    ca_pem: &[u8],
    spki: &[u8],
    node: &str,
    now: SystemTime,
) -> Result<Validity, String> {
    let cert_der = first_cert(cert_pem, "certificate")?;
    let ca_der = first_cert(ca_pem, "CA certificate")?;
    let (_, cert) =
        X509Certificate::from_der(&cert_der).map_err(|e| format!("certificate: {e}"))?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| format!("CA certificate: {e}"))?;
    if cert.public_key().raw != spki {
        return Err("the certificate is not for this node's key".into());
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    if cn != Some(node) {
        return Err(format!("the certificate names {cn:?}, not node {node:?}"));
    }
    if cert.is_ca() {
        return Err("the certificate is a CA certificate".into());
    }
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|e| format!("the certificate does not verify against the CA: {e}"))?;
    let validity = Validity {
        not_before: crate::ca::from_unix(cert.validity().not_before.timestamp()),
        not_after: crate::ca::from_unix(cert.validity().not_after.timestamp()),
    };
    if validity.not_after <= now {
        return Err("the certificate has expired".into());
    }
    Ok(validity)
}

impl NodeRequest {
    fn path(&self, file: &str) -> PathBuf {
        self.out.join(file)
    }

    /// The files already in `out`, if they are this node's, match, verify, and are not yet due
    /// for renewal at `now`.
    pub fn current(&self, now: SystemTime) -> Result<Validity, String> {
        let read = |p: PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
        let key_pem = read(self.path(&format!("{}.key", self.node)))?;
        let key = KeyPair::from_pem(&String::from_utf8_lossy(&key_pem))
            .map_err(|e| format!("{}.key: {e}", self.node))?;
        let validity = verify_issued(
            &read(self.path(&format!("{}.pem", self.node)))?,
            &read(self.path("ca.pem"))?,
            &key.subject_public_key_info(),
            &self.node,
            now,
        )?;
        if validity.renew_at() <= now {
            return Err("the certificate is due for renewal".into());
        }
        Ok(validity)
    }

    /// Asks for a certificate, waits for it, checks it, and writes the files.
    pub async fn obtain(&self, client: &kube::Client) -> Result<Validity, RequestError> {
        let local = |e: String| RequestError::Local(e);
        std::fs::create_dir_all(&self.out)
            .map_err(|e| local(format!("{}: {e}", self.out.display())))?;
        let key = KeyPair::generate().map_err(|e| local(e.to_string()))?;
        let mut params = CertificateParams::new(vec![self.node.clone(), "localhost".into()])
            .map_err(|e| local(format!("node name {:?}: {e}", self.node)))?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        params
            .distinguished_name
            .push(DnType::CommonName, self.node.as_str());
        let csr_pem = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|e| local(e.to_string()))?;

        let api: Api<CertificateSigningRequest> = Api::all(client.clone());
        let object: CertificateSigningRequest = serde_json::from_value(json!({
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": {"generateName": format!("granary-{}-", self.node)},
            "spec": {
                "request": k8s_openapi::ByteString(csr_pem.into_bytes()),
                "signerName": self.signer_name,
                "usages": ALLOWED_USAGES,
            },
        }))
        .map_err(|e| local(e.to_string()))?;
        let created = api.create(&PostParams::default(), &object).await?;
        let name = created.metadata.name.unwrap_or_default();
        tracing::info!(csr = %name, node = %self.node, signer = %self.signer_name, "certificate requested");

        let decided = |csr: Option<&CertificateSigningRequest>| {
            csr.is_none_or(|c| {
                c.status.as_ref().is_some_and(|s| {
                    s.certificate.as_ref().is_some_and(|b| !b.0.is_empty())
                        || s.conditions.as_ref().is_some_and(|cs| {
                            cs.iter().any(|c| {
                                (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True"
                            })
                        })
                })
            })
        };
        let answer = tokio::time::timeout(
            self.timeout,
            kube::runtime::wait::await_condition(api.clone(), &name, decided),
        )
        .await
        .map_err(|_| RequestError::Timeout {
            name: name.clone(),
            after: self.timeout,
            signer: self.signer_name.clone(),
        })?
        .map_err(|e| local(format!("waiting for {name}: {e}")))?
        .ok_or_else(|| RequestError::Deleted(name.clone()))?;
        let status = answer.status.unwrap_or_default();
        for c in status.conditions.unwrap_or_default() {
            if c.status != "True" {
                continue;
            }
            let (reason, message) = (c.reason.unwrap_or_default(), c.message.unwrap_or_default());
            match c.type_.as_str() {
                "Denied" => {
                    return Err(RequestError::Denied {
                        name,
                        reason,
                        message,
                    });
                }
                "Failed" => {
                    return Err(RequestError::Failed {
                        name,
                        reason,
                        message,
                    });
                }
                _ => {}
            }
        }
        let cert_pem = status.certificate.map(|b| b.0).unwrap_or_default();

        let (ns, cm_name) = &self.ca_config_map;
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        let ca_pem = cms
            .get_opt(cm_name)
            .await?
            .and_then(|cm| cm.data)
            .and_then(|mut d| d.remove(CA_KEY))
            .ok_or_else(|| RequestError::NoCa(format!("{ns}/{cm_name}")))?;

        let validity = verify_issued(
            &cert_pem,
            ca_pem.as_bytes(),
            &key.subject_public_key_info(),
            &self.node,
            SystemTime::now(),
        )
        .map_err(RequestError::BadCertificate)?;
        self.write(ca_pem.as_bytes(), &key.serialize_pem(), &cert_pem)?;
        tracing::info!(csr = %name, node = %self.node, dir = %self.out.display(), "certificate written");
        Ok(validity)
    }

    fn write(&self, ca: &[u8], key: &str, cert: &[u8]) -> Result<(), RequestError> {
        let put = |file: String, bytes: &[u8], mode: u32| {
            let path = self.path(&file);
            granary_net::tls::write_file(&path, bytes, mode)
                .map_err(|e| RequestError::Local(format!("cannot write {}: {e}", path.display())))
        };
        put("ca.pem".into(), ca, 0o644)?;
        put(format!("{}.key", self.node), key.as_bytes(), 0o600)?;
        put(format!("{}.pem", self.node), cert, 0o644)
    }
}

/// Renews the certificate at two thirds of each lifetime, forever; `validity` is the current
/// certificate's. A failed attempt is logged and retried with backoff.
pub async fn keep_renewed(client: &kube::Client, request: &NodeRequest, mut validity: Validity) {
    let backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(120));
    loop {
        let wait = validity
            .renew_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        tracing::info!(node = %request.node, in_secs = wait.as_secs(), "next renewal");
        tokio::time::sleep(wait).await;
        let mut failures = 0;
        validity = loop {
            match request.obtain(client).await {
                Ok(v) => break v,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(node = %request.node, error = %e, failures, "renewal failed; retrying");
                    tokio::time::sleep(backoff.after(failures)).await;
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_two_thirds_into_the_lifetime() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let v = Validity {
            not_before: t0,
            not_after: t0 + Duration::from_secs(90),
        };
        assert_eq!(v.renew_at(), t0 + Duration::from_secs(60));
    }

    #[test]
    fn atomic_writes_replace_whole_files_with_the_mode_asked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n1.key");
        granary_net::tls::write_file(&path, b"old", 0o600).unwrap();
        granary_net::tls::write_file(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
