//! The backend conformance suite: the same checks of [`Backend`] against every real backend kind
//! the tests start — an S3 server (moto), Ceph RGW, and a GlusterFS volume read as a POSIX path.
//! Run through scripts/test.sh, which starts them and sets the GRANARY_TEST_* variables.
//!
//! Objects reach S3 through boto3 (as users upload them: raw UTF-8 keys, folder markers), files
//! reach POSIX sources as plain files: a backend must show what other clients wrote, byte for
//! byte, including names with `%`, `#`, `?`, non-ASCII and 200 bytes.

#[path = "../../cli/tests/support/keys.rs"]
mod keys;

use granary_cache_server::backend::{Backend, RawEntry};
use granary_cache_server::config::{BackendSettings, S3Section};
use granary_core::SourceUri;
use granary_proto::ApiError;
use std::path::PathBuf;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run scripts/test.sh"))
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("conformance-{name}-{nanos}")
}

enum Fixture {
    S3 {
        endpoint: String,
        bucket: String,
        prefix: String,
        s3: S3Section,
    },
    Posix {
        root: PathBuf,
    },
}

impl Fixture {
    fn s3(vars: &str, name: &str) -> Fixture {
        let endpoint = env(&format!("GRANARY_TEST_{vars}_ENDPOINT"));
        let access = env(&format!("GRANARY_TEST_{vars}_ACCESS_KEY"));
        let secret = env(&format!("GRANARY_TEST_{vars}_SECRET_KEY"));
        let bucket = env(&format!("GRANARY_TEST_{vars}_BUCKET"));
        let s3 = S3Section {
            endpoint: Some(endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some(access),
            secret_access_key: Some(secret),
            ..S3Section::default()
        };
        Fixture::S3 {
            endpoint,
            bucket,
            prefix: unique(name),
            s3,
        }
    }

    fn posix(root: PathBuf) -> Fixture {
        let root = root.join(unique("posix"));
        std::fs::create_dir_all(&root).unwrap();
        Fixture::Posix { root }
    }

    /// Writes each (key, bytes): with boto3 to S3, as plain files to a POSIX source. A key
    /// ending in `/` is an S3 folder marker (zero bytes).
    fn put(&self, objects: &[(String, Vec<u8>)]) {
        match self {
            Fixture::S3 {
                endpoint,
                bucket,
                prefix,
                s3,
            } => {
                let target = keys::Boto3Target {
                    endpoint,
                    access_key: s3.access_key_id.as_deref().unwrap(),
                    secret_key: s3.secret_access_key.as_deref().unwrap(),
                    bucket,
                };
                keys::put(&target, prefix, objects);
            }
            Fixture::Posix { root } => {
                for (key, data) in objects {
                    let path = root.join(key);
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    // Replace, never rewrite in place: a new version is a new file.
                    let tmp = path.with_file_name(".granary-tmp");
                    std::fs::write(&tmp, data).unwrap();
                    std::fs::rename(&tmp, &path).unwrap();
                }
            }
        }
    }

    fn backend(&self) -> Backend {
        let (uri, s3) = match self {
            Fixture::S3 {
                bucket, prefix, s3, ..
            } => (format!("s3://{bucket}/{prefix}"), s3.clone()),
            Fixture::Posix { root } => (format!("file://{}", root.display()), S3Section::default()),
        };
        Backend::new(
            &uri.parse::<SourceUri>().unwrap(),
            &s3,
            &BackendSettings::default(),
        )
        .unwrap()
    }
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The suite every backend must pass.
async fn conformance(fx: Fixture) {
    let mut names: Vec<String> = [
        "plain.bin",
        "with space.txt",
        "ünïcødé-文件.bin",
        "per%cent#hash.txt",
        "dir/inner.bin",
        "dir/sub/deep.bin",
    ]
    .map(String::from)
    .into();
    for name in keys::hostile_names() {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let size = |i: usize| {
        if i < 6 {
            1000 + i * 100_000
        } else {
            300 + i * 1000
        }
    };
    let objects: Vec<(String, Vec<u8>)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| (name.clone(), bytes(size(i), i as u8)))
        .collect();
    fx.put(&objects);
    let backend = fx.backend();
    backend
        .probe(std::time::Duration::from_secs(5))
        .await
        .unwrap();

    // Listing one level: files with sizes and versions, directories once, every name exactly
    // the key's bytes (nothing decoded: `q%20a.txt` is not `q a.txt`).
    let mut root = backend.list("").await.unwrap();
    root.sort_by(|a, b| a.name.cmp(&b.name));
    let listed: Vec<(&str, bool)> = root.iter().map(|e| (e.name.as_str(), e.dir)).collect();
    let mut expected: Vec<(&str, bool)> = names
        .iter()
        .filter(|n| !n.contains('/'))
        .map(|n| (n.as_str(), false))
        .chain([("dir", true)])
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    for e in root.iter().filter(|e| !e.dir) {
        let i = names.iter().position(|n| *n == e.name).unwrap();
        assert_eq!(e.size, size(i) as u64, "{}", e.name);
        assert!(
            e.etag.is_some() || e.version.is_some(),
            "{} has no version tag",
            e.name
        );
        assert_eq!(e.key, e.name);
    }
    let dir = backend.list("dir").await.unwrap();
    let mut dir_names: Vec<(&str, bool, &str)> = dir
        .iter()
        .map(|e| (e.name.as_str(), e.dir, e.key.as_str()))
        .collect();
    dir_names.sort();
    assert_eq!(dir_names[0].0, "inner.bin");
    assert_eq!(dir_names[0].2, "dir/inner.bin");
    assert_eq!((dir_names[1].0, dir_names[1].1), ("sub", true));

    // Ranged reads return exactly the asked bytes, for every name.
    for (i, entry) in root.iter().filter(|e| !e.dir).enumerate() {
        let idx = names.iter().position(|n| *n == entry.name).unwrap();
        let data = bytes(size(idx), idx as u8);
        let size = data.len() as u64;
        for range in [0..size, 0..1, size / 2..size, size - 1..size] {
            let got = backend
                .get_range(
                    &entry.key,
                    range.clone(),
                    entry.etag.as_deref(),
                    entry.version.as_deref(),
                )
                .await;
            assert_eq!(
                got.unwrap()[..],
                data[range.start as usize..range.end as usize],
                "{} {range:?} (#{i})",
                entry.name
            );
        }
    }

    // A missing object is NotFound; a range past the end is an error, never short bytes.
    let missing = backend
        .get_range("no-such-object", 0..10, None, None)
        .await
        .unwrap_err();
    assert!(matches!(missing, ApiError::NotFound(_)), "{missing:?}");
    // A key that cannot be a path is refused before anything is asked for it.
    for bad in ["dir/../plain.bin", "../x", "dir//inner.bin", "a\nb"] {
        let refused = backend.get_range(bad, 0..1, None, None).await.unwrap_err();
        assert!(
            matches!(&refused, ApiError::Invalid(m) if m.contains("cannot be a path")),
            "{bad:?}: {refused:?}"
        );
        assert!(backend.list(bad).await.is_err(), "{bad:?} listed");
    }
    let plain = root.iter().find(|e| e.name == "plain.bin").unwrap();
    assert!(
        backend
            .get_range(&plain.key, 500..5000, None, None)
            .await
            .is_err()
    );

    // A new version of an object: reading with the old version tag fails as Stale.
    fx.put(&[("plain.bin".into(), bytes(3000, 99))]);
    let stale = backend
        .get_range(
            &plain.key,
            0..100,
            plain.etag.as_deref(),
            plain.version.as_deref(),
        )
        .await;
    assert!(matches!(stale, Err(ApiError::Stale(_))), "{stale:?}");
    let relisted = backend.list("").await.unwrap();
    let fresh = relisted.iter().find(|e| e.name == "plain.bin").unwrap();
    assert_ne!(fresh.etag, plain.etag);
    assert_eq!(fresh.size, 3000);
    let got = backend
        .get_range(&fresh.key, 0..3000, fresh.etag.as_deref(), None)
        .await
        .unwrap();
    assert_eq!(got[..], bytes(3000, 99)[..]);

    // Folder markers (S3): a key ending in `/` makes its directory exist and is never a file; an
    // object whose key is also a prefix stays beside the directory (the worker's listing keeps
    // the directory).
    if matches!(fx, Fixture::S3 { .. }) {
        fx.put(&[
            ("marker/".into(), vec![]),
            ("marker/empty/".into(), vec![]),
            ("marker/full/".into(), vec![]),
            ("marker/full/c.txt".into(), bytes(10, 1)),
            ("marker/both".into(), bytes(5, 2)),
            ("marker/both/x.txt".into(), bytes(7, 3)),
        ]);
        let kinds = |mut listed: Vec<RawEntry>| {
            listed.sort_by(|a, b| (&a.name, a.dir).cmp(&(&b.name, b.dir)));
            listed
                .into_iter()
                .map(|e| (e.name, e.dir))
                .collect::<Vec<_>>()
        };
        let owned = |v: &[(&str, bool)]| {
            v.iter()
                .map(|(n, d)| (n.to_string(), *d))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(backend.list("marker").await.unwrap()),
            owned(&[
                ("both", false),
                ("both", true),
                ("empty", true),
                ("full", true)
            ])
        );
        assert_eq!(kinds(backend.list("marker/empty").await.unwrap()), vec![]);
        assert_eq!(
            kinds(backend.list("marker/full").await.unwrap()),
            owned(&[("c.txt", false)])
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_server_moto() {
    conformance(Fixture::s3("S3", "moto")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ceph_rgw() {
    conformance(Fixture::s3("RGW", "rgw")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn glusterfs_volume() {
    conformance(Fixture::posix(PathBuf::from(env(
        "GRANARY_TEST_GLUSTER_DIR",
    ))))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn local_directory() {
    let dir = tempfile::tempdir().unwrap();
    conformance(Fixture::posix(dir.path().to_path_buf())).await;
}
