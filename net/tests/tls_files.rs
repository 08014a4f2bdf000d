//! The TLS material on disk: what `granary certs` writes (modes, names), and a certificate
//! replaced on disk served to new connections without a restart.

use granary_net::tls::{RELOAD_CHECK, TlsFiles, TlsIdentity, generate_dev_certs};
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

#[test]
fn keys_are_written_0600_and_certificates_name_the_node_localhost_and_loopback() {
    let dir = tempfile::tempdir().unwrap();
    generate_dev_certs(dir.path(), &["w1".into(), "etcd".into()]).unwrap();
    let mode = |f: &str| {
        std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    for key in ["ca.key", "w1.key", "etcd.key"] {
        assert_eq!(mode(key), 0o600, "{key}");
    }
    for cert in ["ca.pem", "w1.pem", "etcd.pem"] {
        assert_eq!(mode(cert), 0o644, "{cert}");
    }
    // A name that cannot be a certificate name is refused, and nothing is written for it.
    assert!(generate_dev_certs(dir.path(), &["a b".into()]).is_err());
    assert!(!dir.path().join("a b.pem").exists());
    // The signature check accepts the names the certificate carries, and no other.
    let w1 = TlsIdentity::load(&TlsFiles::in_dir(dir.path(), "w1")).unwrap();
    let signed = w1.sign(b"hello").unwrap();
    for name in ["w1", "localhost", "127.0.0.1"] {
        w1.verify(name, b"hello", &signed).unwrap();
    }
    assert!(w1.verify("w2", b"hello", &signed).is_err());
}

/// The certificate a TLS server at `addr` presents.
async fn presented(addr: std::net::SocketAddr, client: &TlsIdentity) -> Vec<u8> {
    let config = Arc::new(client.grpc_client_config().unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("w1").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_certificate_renewed_on_disk_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    generate_dev_certs(dir.path(), &["w1".into(), "client".into()]).unwrap();
    let server = TlsIdentity::load(&TlsFiles::in_dir(dir.path(), "w1")).unwrap();
    let client = TlsIdentity::load(&TlsFiles::in_dir(dir.path(), "client")).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server.grpc_server_config().unwrap()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    use tokio::io::AsyncReadExt;
                    let _ = tls.read_u8().await;
                }
            });
        }
    });
    let before = presented(addr, &client).await;
    // A new key and certificate for w1 from the same CA, written as a renewal writes them.
    generate_dev_certs(dir.path(), &["w1".into()]).unwrap();
    let renewed = std::fs::read(dir.path().join("w1.pem")).unwrap();
    tokio::time::sleep(RELOAD_CHECK + std::time::Duration::from_millis(500)).await;
    let after = presented(addr, &client).await;
    assert_ne!(before, after, "the old certificate is still served");
    let renewed_der = rustls_pki_types::CertificateDer::pem_slice_iter(&renewed)
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(after, renewed_der.to_vec());
}
