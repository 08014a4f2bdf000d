//! The S3 server behind every S3-backed system, on 127.0.0.1: moto (in-memory, fast to start) or
//! a single-node Ceph RGW, installed, started and stopped with the project's own
//! `scripts/services/*.sh`; plus object_store clients for it.

use crate::cleanup::{self, Guard};
use crate::host::run_command;
use anyhow::Context;
use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, ObjectStore};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// The region every client signs for; moto accepts any.
pub const REGION: &str = "us-east-1";

/// Which S3 server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// moto: in memory, up in a second. Every GET reads the whole object, so ranged GETs of a large
    /// object cost as much as the object: large-file backend figures are moto's, not the cache's.
    Moto,
    /// Ceph RGW over a memstore OSD: a real object store, ~15 s to start.
    Ceph,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Moto => "moto",
            Flavor::Ceph => "ceph",
        }
    }

    /// Its script under scripts/services/.
    pub fn script(self) -> &'static str {
        match self {
            Flavor::Moto => "moto.sh",
            Flavor::Ceph => "ceph.sh",
        }
    }

    /// The env file `start` writes into the state directory, and the prefix of its variables.
    fn env_file(self) -> (&'static str, &'static str) {
        match self {
            Flavor::Moto => ("moto.env", "GRANARY_TEST_S3_"),
            Flavor::Ceph => ("ceph.env", "GRANARY_TEST_RGW_"),
        }
    }
}

/// A running S3 server with one empty bucket; stopped when dropped.
pub struct S3Server {
    pub conn: S3Conn,
    _stop: Guard,
}

/// How to reach the server's bucket.
#[derive(Debug, Clone)]
pub struct S3Conn {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
}

impl S3Server {
    /// Installs the server if needed (`SCRIPT install`) and starts it (`SCRIPT start STATE_DIR`)
    /// with its state (pids, logs, env file) in `state_dir`, with room for `data_bytes`.
    pub fn start(
        flavor: Flavor,
        script: &Path,
        state_dir: &Path,
        data_bytes: u64,
    ) -> anyhow::Result<S3Server> {
        let stop = {
            let (script, state_dir) = (script.to_path_buf(), state_dir.to_path_buf());
            cleanup::register(format!("stop {}", flavor.name()), move || {
                stop_server(&script, &state_dir)
            })
        };
        run_command(&mut script_command(script, &["install"]))?;
        // Ceph's OSD keeps objects in memory, 4 GiB unless told otherwise.
        let memstore = (data_bytes + (2 << 30)).max(4 << 30);
        run_command(
            script_command(script, &["start"])
                .arg(state_dir)
                .env("GRANARY_CEPH_MEMSTORE_BYTES", memstore.to_string()),
        )?;
        let (file, prefix) = flavor.env_file();
        let env_file = state_dir.join(file);
        let text = std::fs::read_to_string(&env_file).with_context(|| {
            format!("{} start wrote no {}", script.display(), env_file.display())
        })?;
        let var = |suffix: &str| -> anyhow::Result<String> {
            let name = format!("{prefix}{suffix}");
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("export "))
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.trim_matches(['"', '\'']).to_string())
                .with_context(|| format!("{} has no {name}", env_file.display()))
        };
        let conn = S3Conn {
            endpoint: var("ENDPOINT")?,
            access_key: var("ACCESS_KEY")?,
            secret_key: var("SECRET_KEY")?,
            bucket: var("BUCKET")?,
        };
        Ok(S3Server { conn, _stop: stop })
    }
}

impl S3Conn {
    /// A client for the bucket, sized for `concurrency` requests in flight.
    pub fn store(&self, concurrency: usize) -> anyhow::Result<Arc<dyn ObjectStore>> {
        let client = ClientOptions::new()
            .with_allow_http(true)
            .with_timeout(Duration::from_secs(60))
            .with_pool_max_idle_per_host(concurrency);
        let store = AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_bucket_name(&self.bucket)
            .with_region(REGION)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_client_options(client)
            .build()
            .context("cannot build the S3 client")?;
        Ok(Arc::new(store))
    }

    /// The environment an AWS-SDK-style client (`granary up`) needs to reach this server.
    pub fn aws_env(&self) -> [(&'static str, String); 4] {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_REGION", REGION.to_string()),
        ]
    }
}

fn script_command(script: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(script).args(args);
    cmd
}

/// Stops a server started from `state_dir` (harmless if none is running). Never fails.
pub fn stop_server(script: &Path, state_dir: &Path) {
    if let Err(e) = run_command(script_command(script, &["stop"]).arg(state_dir)) {
        eprintln!("granary-bench: stopping the S3 server: {e:#}");
    }
}
