//! The worker over a real POSIX source: namespace answers, request validation, and single flight
//! (concurrent misses on one block make one backend read), asserted on the metric catalogue.

use granary_cache_server::{ConfigFile, Worker};
use granary_core::metrics as m;
use granary_proto::{ApiError, CacheApi, EntryKind};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use std::sync::{Arc, OnceLock};

fn snapshotter() -> &'static Snapshotter {
    static SNAP: OnceLock<Snapshotter> = OnceLock::new();
    SNAP.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().unwrap();
        snapshotter
    })
}

/// Sum of a counter over the label sets that contain `label`.
fn counter(name: &str, label: (&str, &str)) -> u64 {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == name)
        .filter(|(key, ..)| {
            key.key()
                .labels()
                .any(|l| l.key() == label.0 && l.value() == label.1)
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(c) => c,
            _ => 0,
        })
        .sum()
}

async fn worker(source: &std::path::Path, cache: &std::path::Path) -> Arc<Worker> {
    let text = format!(
        "[cache]\ndir = \"{}\"\nmemory = \"64MiB\"\ndisk = \"0\"\nblock_size = \"1MiB\"\n[[mount]]\npath = \"/data\"\nsource = \"{}\"\n",
        cache.display(),
        source.display()
    );
    let settings = toml::from_str::<ConfigFile>(&text)
        .unwrap()
        .settings()
        .unwrap();
    Worker::start(settings).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_answers_validates_and_fetches_each_block_once() {
    snapshotter();
    let source = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(source.path().join("d/e")).unwrap();
    let payload: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(source.path().join("d/file.bin"), &payload).unwrap();
    let w = worker(source.path(), cache.path()).await;

    // The namespace: a synthesized root, the mount, directories and files.
    let root = w.list("/").await.unwrap();
    assert_eq!(
        root.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        ["data"]
    );
    let d = w.list("/data/d").await.unwrap();
    assert_eq!(
        d.iter()
            .map(|e| (e.name.as_str(), e.kind))
            .collect::<Vec<_>>(),
        [("e", EntryKind::Dir), ("file.bin", EntryKind::File)]
    );
    let file = w.stat("/data/d/file.bin").await.unwrap();
    assert_eq!(file.size, 5 << 20);
    assert!(matches!(
        w.list("/data/d/file.bin").await,
        Err(ApiError::NotADirectory(_))
    ));
    assert!(matches!(
        w.stat("/data/nope").await,
        Err(ApiError::NotFound(_))
    ));
    assert!(matches!(
        w.stat("/elsewhere").await,
        Err(ApiError::NotFound(_))
    ));
    assert!(matches!(
        w.stat("/data/../etc").await,
        Err(ApiError::Invalid(_))
    ));

    // Forged or wrong references are refused, never served.
    let object = file.object.clone().unwrap();
    let mut forged = object.clone();
    forged.id.key = "../../etc/passwd".into();
    assert!(matches!(
        w.read_block(&forged, 0).await,
        Err(ApiError::Invalid(_))
    ));
    let mut other = object.clone();
    other.id.backend = "s3://somebody-else".into();
    assert!(matches!(
        w.read_block(&other, 0).await,
        Err(ApiError::Invalid(_))
    ));
    assert!(
        matches!(w.read_block(&object, 5).await, Err(ApiError::Invalid(_))),
        "past the last block"
    );

    // Sixteen concurrent readers of one cold block: one backend read.
    let gets_before = counter(m::BACKEND_REQUESTS, ("op", "get"));
    let reads = (0..16).map(|_| {
        let (w, object) = (w.clone(), object.clone());
        tokio::spawn(async move { w.read_block(&object, 3).await })
    });
    for r in futures::future::join_all(reads).await {
        let block = r.unwrap().unwrap();
        assert_eq!(block.data[..], payload[3 << 20..4 << 20]);
        assert!(block.verify());
    }
    assert_eq!(
        counter(m::BACKEND_REQUESTS, ("op", "get")) - gets_before,
        1,
        "single flight"
    );
    // The next read of that block is a memory hit.
    let hits_before = counter(m::BLOCK_READS, ("tier", "memory"));
    w.read_block(&object, 3).await.unwrap();
    assert_eq!(counter(m::BLOCK_READS, ("tier", "memory")) - hits_before, 1);
}

#[tokio::test]
async fn backend_requests_are_rate_limited() {
    use granary_cache_server::backend::Backend;
    use granary_cache_server::config::{BackendSettings, S3Section};
    let dir = tempfile::tempdir().unwrap();
    let settings = BackendSettings {
        max_requests_per_second: Some(20.0),
        ..BackendSettings::default()
    };
    let source = format!("file://{}", dir.path().display()).parse().unwrap();
    let backend = Backend::new(&source, &S3Section::default(), &settings).unwrap();
    let start = std::time::Instant::now();
    for _ in 0..40 {
        backend.list("").await.unwrap();
    }
    // 20 in the first burst, then 20 more at 20 per second.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(900),
        "{elapsed:?}"
    );
    assert!(elapsed < std::time::Duration::from_secs(3), "{elapsed:?}");
}
