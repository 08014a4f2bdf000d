//! TLS for the data plane: every connection is TLS 1.3 with mutual authentication against one
//! cluster CA. Workers and clients present certificates the CA signed; anything else is refused
//! during the handshake. [`generate_dev_certs`] makes a CA and per-node certificates for
//! development and tests (`granary certs`); production points the config at real files.

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// ALPN protocol id of Granary's block protocol.
pub const ALPN: &[u8] = b"granary-blocks/1";

/// Where a node's TLS material lives (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("invalid TLS material: {0}")]
    Invalid(String),
}

/// Loaded, validated TLS material.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |message: String| TlsError::Read {
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

impl TlsIdentity {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&files.ca)? {
            roots
                .add(ca)
                .map_err(|e| TlsError::Invalid(format!("CA {}: {e}", files.ca.display())))?;
        }
        let chain = read_certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Read {
            path: files.key.clone(),
            message: e.to_string(),
        })?;
        let identity = TlsIdentity {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
        };
        // Fail now, not at the first connection, on a key that does not match its certificate.
        identity.server_config()?;
        Ok(identity)
    }

    /// Server side: our certificate; clients must present one signed by the CA.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Invalid(format!("certificate and key: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// Client side: servers must present a certificate signed by the CA; we present ours.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Invalid(format!("certificate and key: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// Writes a development CA (`ca.pem`, `ca.key`) and, per name, `NAME.pem` + `NAME.key` valid for
/// that name, `localhost` and 127.0.0.1, into `dir`. An existing CA in `dir` is reused.
pub fn generate_dev_certs(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let invalid = |e: rcgen::Error| TlsError::Invalid(e.to_string());
    let write = |path: PathBuf, text: String| -> Result<PathBuf, TlsError> {
        std::fs::write(&path, text).map_err(|e| TlsError::Read {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(path)
    };
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Read {
        path: dir.into(),
        message: e.to_string(),
    })?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(invalid)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "granary development CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let (ca_pem_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let ca_key = match std::fs::read_to_string(&ca_key_path) {
        Ok(pem) => KeyPair::from_pem(&pem).map_err(invalid)?,
        Err(_) => {
            let key = KeyPair::generate().map_err(invalid)?;
            let cert = ca_params.self_signed(&key).map_err(invalid)?;
            write(ca_pem_path.clone(), cert.pem())?;
            write(ca_key_path.clone(), key.serialize_pem())?;
            key
        }
    };
    let issuer = Issuer::new(ca_params, ca_key);
    let mut written = vec![ca_pem_path];
    for name in names {
        if name.is_empty() || name.contains('/') {
            return Err(TlsError::Invalid(format!("bad certificate name {name:?}")));
        }
        let mut params =
            CertificateParams::new(vec![name.clone(), "localhost".to_string()]).map_err(invalid)?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params
            .distinguished_name
            .push(DnType::CommonName, name.as_str());
        let key = KeyPair::generate().map_err(invalid)?;
        let cert = params.signed_by(&key, &issuer).map_err(invalid)?;
        written.push(write(dir.join(format!("{name}.pem")), cert.pem())?);
        written.push(write(dir.join(format!("{name}.key")), key.serialize_pem())?);
    }
    Ok(written)
}

impl TlsFiles {
    /// The files `generate_dev_certs` wrote for `name` in `dir`.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }
}
