//! Pins of large datasets through a real etcd: a manifest of 300,000 files is kept in chunks
//! under etcd's 1.5 MiB value limit, read back whole by another worker, fetched once, kept by
//! pin updates, and removed with its pin; chunks no pin names are swept once they are old, and
//! a pin whose chunks are damaged is never served.

mod support;

use etcd_client::{Client, GetOptions};
use granary_cache_server::registry::{Pin, Registry};
use granary_core::dataset::{Manifest, ManifestFile};
use granary_net::membership::{self, Etcd};
use granary_net::tls::{TlsFiles, TlsIdentity};
use granary_proto::ApiError;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::own::OwnService;

const FILES: usize = 300_000;

fn pin(name: &str, files: usize) -> Pin {
    let files = (0..files)
        .map(|i| ManifestFile {
            path: format!("train/n{:08}/n{:08}_{i}.JPEG", i % 1000, i % 1000),
            size: 100_000 + (i as u64 * 7919) % 50_000,
            etag: Some(format!("\"{:032x}\"", (i as u128) * 0x9e37_79b9_7f4a_7c15)),
            version: None,
            mtime_ns: 1_700_000_000_000_000_000 + i as i64,
            owner: None,
        })
        .collect();
    Pin {
        name: name.into(),
        tenant: "default".into(),
        nodes: Vec::new(),
        replicas: 1,
        expires_at: None,
        created_at: 1_700_000_000,
        load: false,
        verify_seq: 0,
        mount: 0,
        root_key: "imagenet".into(),
        backend: "s3://bucket".into(),
        manifest: Manifest::new("/data/imagenet".into(), files),
        exact_names: true,
    }
}

/// The keys under `prefix` with their values' lengths (one value at a time: all of them in one
/// answer would pass the client's 4 MiB message limit).
async fn keys(client: &mut Client, prefix: &str) -> Vec<(String, usize)> {
    let listed = client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .unwrap();
    let mut keys = Vec::new();
    for kv in listed.kvs() {
        let key = kv.key_str().unwrap().to_string();
        let value = client.get(key.as_str(), None).await.unwrap();
        keys.push((key, value.kvs()[0].value().len()));
    }
    keys
}

/// The test's etcd, reached with etcd's own certificate (from its CA, as a node's would be).
fn etcd_of(service: &OwnService) -> Etcd {
    let dir = std::path::PathBuf::from(service.get("GRANARY_TEST_ETCD_TLS"));
    let tls = TlsIdentity::load(&TlsFiles::in_dir(&dir, "etcd")).unwrap();
    Etcd::new(&[service.get("GRANARY_TEST_ETCD")], tls).unwrap()
}

fn hex_nanos(t: SystemTime) -> String {
    format!(
        "{:x}",
        t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
    )
}

#[test]
fn a_pin_of_300000_files_is_stored_in_chunks_read_whole_once_and_removed_with_its_pin() {
    let etcd = OwnService::start("etcd");
    let etcd = etcd_of(&etcd);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = membership::connect(&etcd).await.unwrap();
        let (a, b) = (
            Registry::etcd(&etcd).await.unwrap(),
            Registry::etcd(&etcd).await.unwrap(),
        );
        let big = pin("big", FILES);
        let json = serde_json::to_vec(&big.manifest).unwrap().len();
        assert!(json > 30 << 20, "the manifest is {json} bytes of JSON");
        a.create(&big).await.unwrap();

        // The pin key is small; the files are in chunks, each under etcd's limit.
        let pin_key = keys(&mut client, "/granary/pins/big").await;
        assert_eq!(pin_key.len(), 1);
        assert!(pin_key[0].1 < 4096, "pin value {} bytes", pin_key[0].1);
        let chunks = keys(&mut client, "/granary/manifests/big/").await;
        assert!(chunks.len() >= json >> 20, "{} chunks", chunks.len());
        assert!(chunks.iter().all(|(_, len)| *len < 1_500_000), "{chunks:?}");
        eprintln!(
            "{FILES} files, {json} bytes of JSON: {} chunks, {} bytes in etcd",
            chunks.len(),
            chunks.iter().map(|(_, len)| len).sum::<usize>()
        );

        // Another worker reads it whole, and the next read (nothing changed) fetches nothing.
        let seen = b.pins().await.unwrap();
        assert_eq!(seen, vec![big.clone()]);
        let again = b.pins().await.unwrap();
        assert!(Arc::ptr_eq(
            &seen[0].manifest.files,
            &again[0].manifest.files
        ));

        // An update (a load request) rewrites the small pin value only; the manifest stays.
        let mut loading = big.clone();
        loading.load = true;
        loading.nodes = vec!["w1".into(), "w2".into()];
        b.update(&loading).await.unwrap();
        let after = a.pins().await.unwrap();
        assert_eq!(after, vec![loading.clone()]);
        assert_eq!(keys(&mut client, "/granary/manifests/big/").await, chunks);

        // A second pin of the name is refused and leaves no chunks behind.
        match b.create(&pin("big", 1000)).await {
            Err(ApiError::Invalid(e)) => assert!(e.contains("already pinned"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(keys(&mut client, "/granary/manifests/big/").await, chunks);

        // Unpinned: its chunks go too.
        a.remove("big").await.unwrap();
        assert!(keys(&mut client, "/granary/manifests/").await.is_empty());
        assert!(b.pins().await.unwrap().is_empty());

        // A pin whose chunk went missing is not served (nor is any of its files).
        let broken = pin("broken", 20_000);
        a.create(&broken).await.unwrap();
        let first = keys(&mut client, "/granary/manifests/broken/").await;
        client.delete(first[0].0.as_str(), None).await.unwrap();
        let fresh = Registry::etcd(&etcd).await.unwrap();
        assert!(fresh.pins().await.unwrap().is_empty());
        a.remove("broken").await.unwrap();

        // Chunks no pin names: swept when an hour old (a worker died while pinning), kept
        // while recent (a pin may be on its way).
        let old = hex_nanos(SystemTime::now() - Duration::from_secs(3600));
        let new = hex_nanos(SystemTime::now());
        for key in [
            format!("/granary/manifests/gone/{old}-1/00000000"),
            format!("/granary/manifests/coming/{new}-1/00000000"),
        ] {
            client.put(key, "x", None).await.unwrap();
        }
        let sweeper = Registry::etcd(&etcd).await.unwrap();
        sweeper.pins().await.unwrap();
        let left: Vec<String> = keys(&mut client, "/granary/manifests/")
            .await
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            left,
            vec![format!("/granary/manifests/coming/{new}-1/00000000")]
        );
    });
}
