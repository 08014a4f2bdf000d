//! The TLS flags every client command takes (`--tls-dir`, `--tls-name`), and what they build:
//! the identity for gRPC and the QUIC data plane, and the etcd connection.

use anyhow::Context;
use clap::Args;
use granary_net::membership::Etcd;
use granary_net::tls::TlsIdentity;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// The cluster's TLS material: `ca.pem`, and with --tls-name NAME this client's certificate
    /// `NAME.pem` + `NAME.key` (what `granary certs` writes). Workers with `[tls]` speak TLS only.
    #[arg(long, value_name = "DIR", env = "GRANARY_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The name of this client's certificate in --tls-dir (needed for https etcd and for
    /// reading data; a bearer token over TLS needs only ca.pem).
    #[arg(
        long,
        value_name = "NAME",
        env = "GRANARY_TLS_NAME",
        requires = "tls_dir"
    )]
    pub tls_name: Option<String>,
}

impl TlsArgs {
    pub fn identity(&self) -> anyhow::Result<Option<TlsIdentity>> {
        identity(self.tls_dir.as_deref(), self.tls_name.as_deref())
    }
}

/// The TLS identity in `dir` (`ca.pem`; `NAME.pem` + `NAME.key` with a name), if a dir is given.
pub fn identity(dir: Option<&Path>, name: Option<&str>) -> anyhow::Result<Option<TlsIdentity>> {
    dir.map(|dir| {
        TlsIdentity::from_dir(dir, name).with_context(|| format!("--tls-dir {}", dir.display()))
    })
    .transpose()
}

/// etcd at `endpoints`, its member records checked against the CA in `tls`.
pub fn etcd(endpoints: &[String], tls: Option<&TlsIdentity>) -> anyhow::Result<Etcd> {
    let tls = tls.context(
        "--etcd needs --tls-dir DIR: member records are checked against the cluster CA (DIR/ca.pem), and https etcd needs --tls-name NAME",
    )?;
    Ok(Etcd::new(endpoints, tls.clone())?)
}
