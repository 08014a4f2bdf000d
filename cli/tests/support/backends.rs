//! The real backends the tests run against, from the GRANARY_TEST_* variables that
//! `scripts/services/*.sh start` write (scripts/test.sh sources them).

use super::data::{Tree, content};
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as StorePath;
use object_store::{ObjectStoreExt, PutPayload};
use std::path::PathBuf;

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the tests with scripts/test.sh, which starts the real backends"
        )
    })
}

/// An S3-compatible endpoint (moto or Ceph RGW) and a bucket in it.
#[derive(Clone, Debug)]
pub struct S3Target {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub bucket: String,
}

impl S3Target {
    pub fn moto() -> Self {
        S3Target {
            endpoint: env("GRANARY_TEST_S3_ENDPOINT"),
            access_key: env("GRANARY_TEST_S3_ACCESS_KEY"),
            secret_key: env("GRANARY_TEST_S3_SECRET_KEY"),
            bucket: env("GRANARY_TEST_S3_BUCKET"),
        }
    }

    pub fn rgw() -> Self {
        S3Target {
            endpoint: env("GRANARY_TEST_RGW_ENDPOINT"),
            access_key: env("GRANARY_TEST_RGW_ACCESS_KEY"),
            secret_key: env("GRANARY_TEST_RGW_SECRET_KEY"),
            bucket: env("GRANARY_TEST_RGW_BUCKET"),
        }
    }

    pub fn store(&self) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_bucket_name(&self.bucket)
            .build()
            .unwrap()
    }

    /// Environment for a `granary` process reading this target.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }

    pub fn uri(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// This target for boto3 uploads ([`super::keys::put`]).
    pub fn boto3(&self) -> super::keys::Boto3Target<'_> {
        super::keys::Boto3Target {
            endpoint: &self.endpoint,
            access_key: &self.access_key,
            secret_key: &self.secret_key,
            bucket: &self.bucket,
        }
    }

    /// Uploads the tree under `prefix` (16 uploads in flight), each path as its key byte for byte
    /// (`Path::parse`: `Path::from` would percent-encode `%`, `#` and non-ASCII bytes).
    pub async fn upload(&self, prefix: &str, tree: &Tree) {
        let store = self.store();
        let store = &store;
        futures::stream::iter(tree.iter())
            .for_each_concurrent(16, |(path, size)| async move {
                let key = StorePath::parse(format!("{prefix}/{path}")).unwrap();
                let payload = PutPayload::from(content(path, *size));
                store
                    .put(&key, payload)
                    .await
                    .unwrap_or_else(|e| panic!("upload {key}: {e}"));
            })
            .await;
    }

    pub async fn put(&self, key: &str, data: Vec<u8>) {
        self.store()
            .put(&StorePath::parse(key).unwrap(), PutPayload::from(data))
            .await
            .unwrap();
    }
}

/// The GlusterFS volume's FUSE mount, read by Granary as a POSIX path.
pub fn gluster_dir() -> PathBuf {
    PathBuf::from(env("GRANARY_TEST_GLUSTER_DIR"))
}

/// A unique prefix for one test run.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}
