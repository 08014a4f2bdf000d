//! The S3 server behind every S3-backed system: moto on 127.0.0.1, installed, started and stopped
//! with the project's own `scripts/services/moto.sh`, plus object_store clients for it.

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

/// A running moto server with one empty bucket; stopped when dropped.
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
    /// Installs moto if needed and starts it with its state (pid, log, env file) in `state_dir`.
    pub fn start(script: &Path, state_dir: &Path) -> anyhow::Result<S3Server> {
        let stop = {
            let (script, state_dir) = (script.to_path_buf(), state_dir.to_path_buf());
            cleanup::register("stop moto", move || stop_moto(&script, &state_dir))
        };
        run_command(&mut script_command(script, &["install"]))?;
        run_command(script_command(script, &["start"]).arg(state_dir))?;
        let env_file = state_dir.join("moto.env");
        let text = std::fs::read_to_string(&env_file)
            .with_context(|| format!("moto.sh start wrote no {}", env_file.display()))?;
        let var = |name: &str| -> anyhow::Result<String> {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("export "))
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.trim_matches(['"', '\'']).to_string())
                .with_context(|| format!("{} has no {name}", env_file.display()))
        };
        let conn = S3Conn {
            endpoint: var("GRANARY_TEST_S3_ENDPOINT")?,
            access_key: var("GRANARY_TEST_S3_ACCESS_KEY")?,
            secret_key: var("GRANARY_TEST_S3_SECRET_KEY")?,
            bucket: var("GRANARY_TEST_S3_BUCKET")?,
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

/// Stops a moto started from `state_dir` (harmless if none is running). Never fails.
pub fn stop_moto(script: &Path, state_dir: &Path) {
    if let Err(e) = run_command(script_command(script, &["stop"]).arg(state_dir)) {
        eprintln!("granary-bench: stopping moto: {e:#}");
    }
}
