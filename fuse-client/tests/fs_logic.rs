//! GranaryFs without a kernel: the filesystem logic over an in-memory worker (a fake CacheApi
//! for logic tests; the real worker and the real mount are tested in cli/tests).

use bytes::Bytes;
use granary_core::{BlockSize, ObjectId};
use granary_fuse_client::fs::{FsConfig, FsError, GranaryFs};
use granary_proto::{ApiError, Block, CacheApi, Entry, EntryKind, Info, ObjectRef};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BS: u64 = 64 << 10;

/// Files by path; every block read is counted.
#[derive(Default)]
struct FakeWorker {
    files: Mutex<BTreeMap<String, (Vec<u8>, String)>>,
    block_reads: AtomicU64,
}

impl FakeWorker {
    fn put(&self, path: &str, data: Vec<u8>, etag: &str) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), (data, etag.to_string()));
    }

    fn entry(&self, path: &str, data: &[u8], etag: &str) -> Entry {
        let name = path.rsplit('/').next().unwrap().to_string();
        Entry {
            name,
            kind: EntryKind::File,
            size: data.len() as u64,
            mtime_ns: 0,
            object: Some(ObjectRef {
                mount: 0,
                id: ObjectId {
                    backend: "fake".into(),
                    key: path.trim_start_matches('/').into(),
                    size: data.len() as u64,
                    etag: Some(etag.into()),
                    version: None,
                    mtime_ns: 0,
                },
            }),
        }
    }

    fn dir(name: &str) -> Entry {
        Entry {
            name: name.into(),
            kind: EntryKind::Dir,
            size: 0,
            mtime_ns: 0,
            object: None,
        }
    }
}

impl CacheApi for FakeWorker {
    fn info(&self) -> Info {
        Info {
            node_id: "fake".into(),
            block_size: BlockSize::new(BS).unwrap(),
            memory_capacity: 0,
            disk_capacity: 0,
            stats: Default::default(),
        }
    }

    async fn stat(&self, path: &str) -> Result<Entry, ApiError> {
        let files = self.files.lock().unwrap();
        if let Some((data, etag)) = files.get(path) {
            return Ok(self.entry(path, data, etag));
        }
        let prefix = format!("{}/", path.trim_end_matches('/'));
        if path == "/" || files.keys().any(|k| k.starts_with(&prefix)) {
            return Ok(Self::dir(path.rsplit('/').next().unwrap()));
        }
        Err(ApiError::NotFound(path.into()))
    }

    async fn list(&self, path: &str) -> Result<Arc<Vec<Entry>>, ApiError> {
        let files = self.files.lock().unwrap();
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        let mut out: BTreeMap<String, Entry> = BTreeMap::new();
        for (k, (data, etag)) in files.iter() {
            let Some(rest) = k.strip_prefix(&prefix) else {
                continue;
            };
            match rest.split_once('/') {
                Some((dir, _)) => {
                    out.insert(dir.to_string(), Self::dir(dir));
                }
                None => {
                    out.insert(rest.to_string(), self.entry(k, data, etag));
                }
            }
        }
        if out.is_empty() && path != "/" {
            return Err(ApiError::NotFound(path.into()));
        }
        Ok(Arc::new(out.into_values().collect()))
    }

    async fn read_block(&self, object: &ObjectRef, index: u64) -> Result<Block, ApiError> {
        self.block_reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let files = self.files.lock().unwrap();
        let (data, etag) = files
            .get(&format!("/{}", object.id.key))
            .ok_or(ApiError::NotFound(object.id.key.clone()))?;
        if Some(etag) != object.id.etag.as_ref() {
            return Err(ApiError::Stale(object.id.key.clone()));
        }
        let range = BlockSize::new(BS).unwrap().range(index, data.len() as u64);
        Ok(Block::new(Bytes::copy_from_slice(
            &data[range.start as usize..range.end as usize],
        )))
    }
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| ((i * 7) as u8) ^ seed).collect()
}

fn fs(worker: Arc<FakeWorker>, config: FsConfig) -> GranaryFs<FakeWorker> {
    GranaryFs::new(worker, config)
}

#[tokio::test]
async fn lookup_list_and_attributes() {
    let w = Arc::new(FakeWorker::default());
    w.put("/a/x.bin", data(1000, 1), "e1");
    w.put("/b.txt", data(10, 2), "e2");
    let fs = fs(w, FsConfig::default());
    let a = fs.lookup(1, "a").await.unwrap();
    assert_eq!(a.kind, EntryKind::Dir);
    assert_eq!(a.perm, 0o555);
    let x = fs.lookup(a.ino, "x.bin").await.unwrap();
    assert_eq!((x.kind, x.size, x.perm), (EntryKind::File, 1000, 0o444));
    assert_eq!(fs.getattr(x.ino).await.unwrap(), x);
    assert_eq!(fs.lookup(1, "nope").await.unwrap_err(), FsError::NotFound);
    assert!(matches!(fs.lookup(1, "..").await, Err(FsError::Invalid(_))));

    let fh = fs.opendir(1).await.unwrap();
    let mut names = Vec::new();
    fs.readdir(1, fh, 0, true, |item| {
        names.push(item.name.clone());
        true
    })
    .unwrap();
    assert_eq!(names, [".", "..", "a", "b.txt"]);
    // Resume from an offset, stop when the buffer is full.
    let mut rest = Vec::new();
    fs.readdir(1, fh, 3, false, |item| {
        rest.push(item.name.clone());
        false
    })
    .unwrap();
    assert_eq!(rest, ["b.txt"]);
    fs.releasedir(fh);
    assert!(matches!(
        fs.opendir(x.ino).await,
        Err(FsError::NotADirectory)
    ));
    assert!(matches!(
        fs.open(a.ino, false).await,
        Err(FsError::IsADirectory)
    ));
    assert!(matches!(fs.open(x.ino, true).await, Err(FsError::ReadOnly)));
}

#[tokio::test]
async fn reads_match_the_bytes_at_any_offset() {
    let w = Arc::new(FakeWorker::default());
    let bytes = data(10 * BS as usize + 123, 3);
    w.put("/f", bytes.clone(), "e");
    let fs = fs(w, FsConfig::default());
    let ino = fs.lookup(1, "f").await.unwrap().ino;
    let fh = fs.open(ino, false).await.unwrap().fh;
    let mut state = 42u64;
    for _ in 0..300 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = (state >> 20) % (bytes.len() as u64 + 100);
        let len = ((state >> 5) % (3 * BS)) as u32;
        let got = fs.read(fh, offset, len).await.unwrap();
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize + len as usize).min(bytes.len());
        assert_eq!(got[..], bytes[start..end], "read {len} at {offset}");
    }
    fs.release(fh);
    assert!(matches!(fs.read(fh, 0, 10).await, Err(FsError::BadHandle)));
}

#[tokio::test]
async fn random_reads_fetch_only_what_they_touch_and_sequential_reads_read_ahead() {
    let w = Arc::new(FakeWorker::default());
    w.put("/f", data(64 * BS as usize, 4), "e");
    let fs = fs(
        w.clone(),
        FsConfig {
            readahead_per_file: 8 * BS,
            ..FsConfig::default()
        },
    );
    let ino = fs.lookup(1, "f").await.unwrap().ino;
    let fh = fs.open(ino, false).await.unwrap().fh;
    for i in [40u64, 3, 17, 55, 9] {
        fs.read(fh, i * BS + 10, 100).await.unwrap();
    }
    assert_eq!(
        w.block_reads.load(Ordering::SeqCst),
        5,
        "a seek reads only the touched block"
    );
    let fh2 = fs.open(ino, false).await.unwrap().fh;
    w.block_reads.store(0, Ordering::SeqCst);
    for i in 0..4 {
        fs.read(fh2, i * (BS / 2), (BS / 2) as u32).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fetched = w.block_reads.load(Ordering::SeqCst);
    assert!(
        fetched > 2 && fetched <= 2 + 8,
        "sequential reads fetch ahead, within the window: {fetched}"
    );
}

#[tokio::test]
async fn readahead_memory_is_bounded_in_total() {
    let w = Arc::new(FakeWorker::default());
    for i in 0..20 {
        w.put(&format!("/f{i}"), data(32 * BS as usize, i as u8), "e");
    }
    let total = 10 * BS;
    let fs = Arc::new(fs(
        w,
        FsConfig {
            readahead_per_file: 8 * BS,
            readahead_total: total,
            ..FsConfig::default()
        },
    ));
    let mut handles = Vec::new();
    for i in 0..20 {
        let ino = fs.lookup(1, &format!("f{i}")).await.unwrap().ino;
        handles.push(fs.open(ino, false).await.unwrap().fh);
    }
    for step in 0..6u64 {
        for &fh in &handles {
            fs.read(fh, step * BS, BS as u32).await.unwrap();
            assert!(
                fs.readahead_bytes() <= total,
                "{} > {total}",
                fs.readahead_bytes()
            );
        }
    }
    for fh in handles {
        fs.release(fh);
    }
    assert_eq!(
        fs.readahead_bytes(),
        0,
        "released files give their budget back"
    );
}

#[tokio::test]
async fn versions_pin_opens_and_steer_the_page_cache() {
    let w = Arc::new(FakeWorker::default());
    w.put("/f", data(4 * BS as usize, 5), "v1");
    let fs = fs(
        w.clone(),
        FsConfig {
            attr_ttl: Duration::ZERO,
            ..FsConfig::default()
        },
    );
    let ino = fs.lookup(1, "f").await.unwrap().ino;
    let first = fs.open(ino, false).await.unwrap();
    assert!(!first.keep_cache, "nothing cached yet");
    let second = fs.open(ino, false).await.unwrap();
    assert!(second.keep_cache, "same version: keep the page cache");
    w.put("/f", data(4 * BS as usize, 6), "v2");
    // The open handle of v1 never gets v2's bytes.
    assert!(matches!(
        fs.read(first.fh, 0, 10).await,
        Err(FsError::Stale(_))
    ));
    let third = fs.open(ino, false).await.unwrap();
    assert!(!third.keep_cache, "new version: drop the page cache");
    assert_eq!(fs.read(third.fh, 0, 4).await.unwrap()[..], data(4, 6)[..]);
}
