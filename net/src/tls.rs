//! TLS between Granary processes: every connection is TLS 1.3 against one cluster CA.
//!
//! - The QUIC data plane is mutual TLS: both ends present a certificate the CA signed.
//! - The worker's gRPC API serves TLS with the same certificate; callers present a CA-signed
//!   certificate (nodes, the scheduler hook) or come with a bearer token over server-authenticated
//!   TLS (people and jobs); each RPC checks which (`cache-server::grpc`).
//! - etcd is reached with the same files when its URLs are `https://`.
//!
//! A process's own certificate and key are re-read when their files change (checked at most every
//! [`RELOAD_CHECK`]), so a certificate renewed on disk (`granary certs --csr --renew`) takes effect
//! for new connections without a restart. [`generate_dev_certs`] makes a CA and per-node
//! certificates for development and tests (`granary certs`).

use rustls::RootCertStore;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// ALPN protocol id of Granary's block protocol.
pub const ALPN: &[u8] = b"granary-blocks/1";
/// ALPN protocol id of gRPC (HTTP/2).
pub const ALPN_GRPC: &[u8] = b"h2";
/// How often a process looks whether its certificate files changed.
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);

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
    #[error("{0}")]
    NoCertificate(String),
    #[error("not signed by the cluster CA for {name:?}: {message}")]
    Untrusted { name: String, message: String },
}

/// The cluster CA's roots and, for most processes, our own certificate.
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    roots: Arc<RootCertStore>,
    ca_pem: Arc<Vec<u8>>,
    own: Option<Arc<OwnCert>>,
}

/// Our certificate and key, re-read when the files change.
#[derive(Debug)]
struct OwnCert {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    checked: Instant,
    stamp: Option<(SystemTime, SystemTime)>,
    key: Arc<CertifiedKey>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(path, e))?;
    if certs.is_empty() {
        return Err(read_error(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl OwnCert {
    fn load(cert: &Path, key: &Path) -> Result<OwnCert, TlsError> {
        let stamp = modified(cert).zip(modified(key));
        let loaded = Self::read(cert, key)?;
        Ok(OwnCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            state: Mutex::new(Loaded {
                checked: Instant::now(),
                stamp,
                key: Arc::new(loaded),
            }),
        })
    }

    fn read(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
        let chain = read_certs(cert)?;
        let der = PrivateKeyDer::from_pem_file(key).map_err(|e| read_error(key, e))?;
        CertifiedKey::from_der(chain, der, &provider()).map_err(|e| {
            TlsError::Invalid(format!("{} and {}: {e}", cert.display(), key.display()))
        })
    }

    /// The current certificate: re-read when the files changed since the last look.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().expect("certificate state");
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let stamp = modified(&self.cert).zip(modified(&self.key));
            if stamp.is_some() && stamp != state.stamp {
                match Self::read(&self.cert, &self.key) {
                    Ok(key) => {
                        tracing::info!(cert = %self.cert.display(), "certificate reloaded");
                        state.key = Arc::new(key);
                        state.stamp = stamp;
                    }
                    // A renewal half written, or a bad file: keep serving with the old one.
                    Err(e) => tracing::warn!(error = %e, "keeping the current certificate"),
                }
            }
        }
        state.key.clone()
    }
}

#[derive(Debug)]
struct Resolver(Arc<OwnCert>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl TlsIdentity {
    /// The CA and our certificate and key.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let mut identity = Self::trust_only(&files.ca)?;
        identity.own = Some(Arc::new(OwnCert::load(&files.cert, &files.key)?));
        // Fail now, not at the first connection, on a key that does not match its certificate.
        identity.server_config()?;
        Ok(identity)
    }

    /// Only the CA: for callers that authenticate with a token over server-authenticated TLS.
    pub fn trust_only(ca: &Path) -> Result<Self, TlsError> {
        let ca_pem = std::fs::read(ca).map_err(|e| read_error(ca, e))?;
        let mut roots = RootCertStore::empty();
        for cert in read_certs(ca)? {
            roots
                .add(cert)
                .map_err(|e| TlsError::Invalid(format!("CA {}: {e}", ca.display())))?;
        }
        Ok(TlsIdentity {
            roots: Arc::new(roots),
            ca_pem: Arc::new(ca_pem),
            own: None,
        })
    }

    /// `DIR/ca.pem`, and with a name `DIR/NAME.pem` + `DIR/NAME.key` (a client command's
    /// `--tls-dir` and `--tls-name`).
    pub fn from_dir(dir: &Path, name: Option<&str>) -> Result<Self, TlsError> {
        match name {
            Some(name) => Self::load(&TlsFiles::in_dir(dir, name)),
            None => Self::trust_only(&dir.join("ca.pem")),
        }
    }

    /// The CA certificates as PEM (for clients that take PEM, like etcd's).
    pub fn ca_pem(&self) -> &[u8] {
        &self.ca_pem
    }

    /// Our certificate chain and key as PEM, read from the files now (so a renewed certificate
    /// is used by the next connection).
    pub fn own_pem(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        let own = self.own("a client certificate")?;
        let cert = std::fs::read(&own.cert).map_err(|e| read_error(&own.cert, e))?;
        let key = std::fs::read(&own.key).map_err(|e| read_error(&own.key, e))?;
        Ok((cert, key))
    }

    /// Whether we present a certificate of our own.
    pub fn has_certificate(&self) -> bool {
        self.own.is_some()
    }

    fn own(&self, what: &str) -> Result<&Arc<OwnCert>, TlsError> {
        self.own.as_ref().ok_or_else(|| {
            TlsError::NoCertificate(format!(
                "{what} needs a certificate of its own (--tls-name NAME: NAME.pem and NAME.key)"
            ))
        })
    }

    fn server_builder(&self, client_auth_required: bool) -> Result<rustls::ServerConfig, TlsError> {
        let own = self.own("a TLS server")?.clone();
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        if !client_auth_required {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = verifier
            .build()
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        Ok(rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(own))))
    }

    fn client_builder(&self) -> Result<rustls::ClientConfig, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_root_certificates(self.roots.clone());
        Ok(match &self.own {
            Some(own) => builder.with_client_cert_resolver(Arc::new(Resolver(own.clone()))),
            None => builder.with_no_client_auth(),
        })
    }

    /// The QUIC data plane's server side: clients must present a certificate the CA signed.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = self.server_builder(true)?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The QUIC data plane's client side: servers must present a certificate the CA signed for
    /// the name we ask; we present ours.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        self.own("the data plane (QUIC)")?;
        let mut config = self.client_builder()?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The gRPC API's server side: a client certificate is checked when one is presented, and
    /// each RPC decides whether it needs one.
    pub fn grpc_server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = self.server_builder(false)?;
        config.alpn_protocols = vec![ALPN_GRPC.to_vec()];
        Ok(config)
    }

    /// The gRPC API's client side: our certificate when we have one.
    pub fn grpc_client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = self.client_builder()?;
        config.alpn_protocols = vec![ALPN_GRPC.to_vec()];
        Ok(config)
    }

    /// Our certificate chain as PEM, and a signature of `message` with our key: how a worker
    /// proves it wrote its membership record.
    pub fn sign(&self, message: &[u8]) -> Result<Signature, TlsError> {
        use rustls::SignatureScheme as S;
        let key = self.own("signing")?.current();
        let signer = key
            .key
            .choose_scheme(&[
                S::ED25519,
                S::ECDSA_NISTP256_SHA256,
                S::ECDSA_NISTP384_SHA384,
                S::RSA_PSS_SHA256,
            ])
            .ok_or_else(|| TlsError::Invalid("the key's type cannot sign records".into()))?;
        let bytes = signer
            .sign(message)
            .map_err(|e| TlsError::Invalid(format!("signing: {e}")))?;
        let chain = key
            .cert
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect();
        Ok(Signature {
            chain,
            scheme: u16::from(signer.scheme()),
            bytes,
        })
    }

    /// Checks that `signature` is over `message`, by a certificate the CA signed that is valid
    /// now and names `name`.
    pub fn verify(
        &self,
        name: &str,
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), TlsError> {
        let untrusted = |message: String| TlsError::Untrusted {
            name: name.to_string(),
            message,
        };
        let chain = CertificateDer::pem_slice_iter(signature.chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| untrusted(format!("certificate: {e}")))?;
        let (end, intermediates) = chain
            .split_first()
            .ok_or_else(|| untrusted("no certificate".into()))?;
        let algorithms = provider().signature_verification_algorithms;
        let parsed = rustls::server::ParsedCertificate::try_from(end)
            .map_err(|e| untrusted(format!("certificate: {e}")))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            UnixTime::now(),
            algorithms.all,
        )
        .map_err(|e| untrusted(e.to_string()))?;
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| untrusted(format!("not a certificate name: {e}")))?;
        rustls::client::verify_server_name(&parsed, &server_name)
            .map_err(|e| untrusted(e.to_string()))?;
        let scheme = rustls::SignatureScheme::from(signature.scheme);
        let candidates = algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, algs)| *algs)
            .ok_or_else(|| untrusted(format!("unsupported signature scheme {scheme:?}")))?;
        let cert = webpki::EndEntityCert::try_from(end)
            .map_err(|e| untrusted(format!("certificate: {e}")))?;
        if candidates.iter().any(|alg| {
            cert.verify_signature(*alg, message, &signature.bytes)
                .is_ok()
        }) {
            Ok(())
        } else {
            Err(untrusted("the signature does not match".into()))
        }
    }
}

/// A signature with the certificate chain that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// PEM certificates, ours first.
    pub chain: String,
    /// The TLS 1.3 `SignatureScheme` code.
    pub scheme: u16,
    pub bytes: Vec<u8>,
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes a development CA (`ca.pem`, `ca.key`) and, per name, `NAME.pem` + `NAME.key` valid for
/// that name, `localhost` and 127.0.0.1, into `dir`. An existing CA in `dir` is reused.
pub fn generate_dev_certs(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let invalid = |e: rcgen::Error| TlsError::Invalid(e.to_string());
    let write = |path: PathBuf, text: String, mode: u32| -> Result<PathBuf, TlsError> {
        write_file(&path, text.as_bytes(), mode).map_err(|e| read_error(&path, e))?;
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
    let issuer = match std::fs::read_to_string(&ca_key_path) {
        Ok(pem) => {
            // An existing CA (ours, or one made elsewhere): sign as the certificate in ca.pem.
            let key = KeyPair::from_pem(&pem).map_err(invalid)?;
            let ca_pem =
                std::fs::read_to_string(&ca_pem_path).map_err(|e| read_error(&ca_pem_path, e))?;
            Issuer::from_ca_cert_pem(&ca_pem, key).map_err(invalid)?
        }
        Err(_) => {
            let key = KeyPair::generate().map_err(invalid)?;
            let cert = ca_params.self_signed(&key).map_err(invalid)?;
            write(ca_pem_path.clone(), cert.pem(), 0o644)?;
            write(ca_key_path.clone(), key.serialize_pem(), 0o600)?;
            Issuer::new(ca_params, key)
        }
    };
    let mut written = vec![ca_pem_path];
    for name in names {
        if ServerName::try_from(name.as_str()).is_err() || name.contains('/') {
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
        written.push(write(dir.join(format!("{name}.pem")), cert.pem(), 0o644)?);
        written.push(write(
            dir.join(format!("{name}.key")),
            key.serialize_pem(),
            0o600,
        )?);
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

/// Writes `bytes` to `path` with `mode`, replacing it atomically (a temporary file beside it,
/// then a rename): a process reloading the file never reads half of it, and a key is never
/// readable by others, not even for a moment.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}
