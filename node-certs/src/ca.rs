//! The cluster CA as the signer holds it (`ca.pem` + `ca.key`), and the node certificates it
//! issues: built from a [`Grant`], never copied from a request, with a bounded lifetime.

use crate::policy::Grant;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKey, PublicKeyData,
    SanType, SerialNumber,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("invalid CA: {0}")]
    Invalid(String),
    #[error("cannot issue a certificate: {0}")]
    Issue(String),
}

/// How far before `now` a certificate's validity starts (clock skew between nodes), at most a
/// tenth of its lifetime.
const BACKDATE: Duration = Duration::from_secs(60);

/// The CA certificate and its private key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    not_after: SystemTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| CaError::Read {
        path: path.into(),
        message: e.to_string(),
    })
}

/// Seconds since the epoch to a `SystemTime` (times before 1970 become 1970).
pub(crate) fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

impl Ca {
    /// Loads `ca.pem` and `ca.key` from `dir`; the key must be the certificate's.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let pem = read(&dir.join("ca.pem"))?;
        let key_pem = read(&dir.join("ca.key"))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| CaError::Invalid(format!("{}: {e}", dir.join("ca.key").display())))?;
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .map_err(|e| CaError::Invalid(format!("{}: {e}", dir.join("ca.pem").display())))?;
        let cert = parsed
            .parse_x509()
            .map_err(|e| CaError::Invalid(format!("{}: {e}", dir.join("ca.pem").display())))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::Invalid(
                "ca.key is not the key of the certificate in ca.pem".into(),
            ));
        }
        if !cert.is_ca() {
            return Err(CaError::Invalid("ca.pem is not a CA certificate".into()));
        }
        let not_after = from_unix(cert.validity().not_after.timestamp());
        let issuer =
            Issuer::from_ca_cert_pem(&pem, key).map_err(|e| CaError::Invalid(e.to_string()))?;
        Ok(Ca {
            issuer,
            pem,
            not_after,
        })
    }

    /// The CA certificate (PEM), which nodes trust.
    pub fn certificate_pem(&self) -> &str {
        &self.pem
    }

    /// A certificate for `grant`'s node and `key`, valid from `now` (less a small backdate)
    /// for `lifetime`, never past the CA's own expiry. `serial` should be unique per request.
    pub fn issue(
        &self,
        grant: &Grant,
        key: &PublicKey,
        serial: &[u8],
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<String, CaError> {
        let bad = |e: rcgen::Error| CaError::Issue(e.to_string());
        if now >= self.not_after {
            return Err(CaError::Issue("the CA certificate has expired".into()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, grant.node.as_str());
        for name in &grant.dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into().map_err(bad)?));
        }
        for ip in &grant.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let mut serial = serial.to_vec();
        serial.truncate(20);
        if let Some(first) = serial.first_mut() {
            *first &= 0x7f;
        }
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let backdate = BACKDATE.min(lifetime / 10);
        params.not_before = (now - backdate).into();
        params.not_after = (now + lifetime).min(self.not_after).into();
        let request = CertificateSigningRequestParams {
            params,
            public_key: key.clone(),
        };
        Ok(request.signed_by(&self.issuer).map_err(bad)?.pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::check_request;

    /// A CA written into a temporary directory, as `granary certs` writes it.
    fn ca_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("ca.key"), key.serialize_pem()).unwrap();
        dir
    }

    #[test]
    fn issues_a_bounded_certificate_for_the_grant_that_verifies_against_the_ca() {
        let dir = ca_dir();
        let ca = Ca::load(dir.path()).unwrap();
        let node_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["n1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "n1");
        let csr = p.serialize_request(&node_key).unwrap().pem().unwrap();
        let req = check_request(csr.as_bytes(), &[]).unwrap();
        let grant = Grant::for_node("n1", &["10.1.2.3".parse().unwrap()]);
        let now = SystemTime::now();
        let pem = ca
            .issue(
                &grant,
                &req.public_key,
                &[0xff; 32],
                now,
                Duration::from_secs(3600),
            )
            .unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = parsed.parse_x509().unwrap();
        let (_, ca_parsed) =
            x509_parser::pem::parse_x509_pem(ca.certificate_pem().as_bytes()).unwrap();
        let ca_cert = ca_parsed.parse_x509().unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert!(!cert.is_ca());
        assert_eq!(
            cert.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            "n1"
        );
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 3660);
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let text = format!("{:?}", sans.value.general_names);
        for want in ["n1", "localhost", "127.0.0.1", "10.1.2.3"] {
            assert!(
                text.contains(want) || text.contains(&hex_ip(want)),
                "{want} in {text}"
            );
        }
        assert_eq!(
            cert.public_key().raw,
            node_key.subject_public_key_info().as_slice()
        );
    }

    fn hex_ip(ip: &str) -> String {
        match ip.parse::<std::net::Ipv4Addr>() {
            Ok(v4) => format!("{:?}", v4.octets()),
            Err(_) => ip.to_string(),
        }
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let dir = ca_dir();
        std::fs::write(
            dir.path().join("ca.key"),
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let err = Ca::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not the key"), "{err}");
    }
}
