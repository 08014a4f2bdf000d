//! Pins as files `<dir>/<name>.json` in the dataset store, for a worker without etcd; progress
//! in memory (one node).

use super::{BoxFuture, Pin, PinStore};
use granary_core::dataset::NodeProgress;
use granary_proto::ApiError;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

/// Each pin file with its modification time, length and inode number.
type FileStamp = Vec<(PathBuf, SystemTime, u64, u64)>;

/// Pins as files in a directory.
pub struct LocalRegistry {
    dir: PathBuf,
    progress: Mutex<BTreeMap<(String, String), NodeProgress>>,
    /// The pins last read, and the files' stamps they were read at.
    cached: Mutex<Option<(FileStamp, Vec<Pin>)>>,
}

impl LocalRegistry {
    pub fn open(dir: PathBuf) -> Result<Self, ApiError> {
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir.display().to_string(), e))?;
        Ok(LocalRegistry {
            dir,
            progress: Mutex::new(BTreeMap::new()),
            cached: Mutex::new(None),
        })
    }
}

fn io(what: &str, e: std::io::Error) -> ApiError {
    ApiError::Internal(format!("{what}: {e}"))
}

impl PinStore for LocalRegistry {
    fn shared(&self) -> bool {
        false
    }

    /// Its pins change only through this worker, which says so itself.
    fn watch_pins<'a>(&'a self, _changed: &'a (dyn Fn() + Send + Sync)) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn pins(&self) -> BoxFuture<'_, Result<Vec<Pin>, ApiError>> {
        Box::pin(async move {
            let Self { dir, cached, .. } = self;
            let dir = dir.clone();
            let last = cached.lock().expect("pins cache").clone();
            let (stamp, pins) = tokio::task::spawn_blocking(move || read_pin_files(&dir, last))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))??;
            *cached.lock().expect("pins cache") = Some((stamp, pins.clone()));
            Ok(pins)
        })
    }

    fn create<'a>(&'a self, pin: &'a Pin) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let Self { dir, .. } = self;
            let exists = || ApiError::Invalid(format!("dataset {:?} is already pinned", pin.name));
            let json = serde_json::to_vec(pin).expect("pins serialize");
            let path = dir.join(format!("{}.json", pin.name));
            if path.exists() {
                return Err(exists());
            }
            write_atomic(path, json).await
        })
    }

    fn update<'a>(&'a self, pin: &'a Pin) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let Self { dir, .. } = self;
            let json = serde_json::to_vec(pin).expect("pins serialize");
            write_atomic(dir.join(format!("{}.json", pin.name)), json).await
        })
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let Self { dir, progress, .. } = self;
            progress
                .lock()
                .expect("progress")
                .retain(|(n, _), _| n != name);
            match tokio::fs::remove_file(dir.join(format!("{name}.json"))).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io("unpin", e)),
            }
        })
    }

    fn report<'a>(
        &'a self,
        name: &'a str,
        progress: &'a NodeProgress,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let Self { progress: map, .. } = self;
            map.lock()
                .expect("progress")
                .insert((name.into(), progress.node.clone()), progress.clone());
            Ok(())
        })
    }

    fn progress<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Vec<NodeProgress>, ApiError>> {
        Box::pin(async move {
            let Self { progress, .. } = self;
            Ok(progress
                .lock()
                .expect("progress")
                .iter()
                .filter(|((n, _), _)| n == name)
                .map(|(_, p)| p.clone())
                .collect())
        })
    }
}

async fn write_atomic(path: PathBuf, bytes: Vec<u8>) -> Result<(), ApiError> {
    tokio::task::spawn_blocking(move || {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| io(&path.display().to_string(), e))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

/// The pins in `dir`, with the stamps they were read at; files unchanged since `last` are not
/// read again.
fn read_pin_files(
    dir: &std::path::Path,
    last: Option<(FileStamp, Vec<Pin>)>,
) -> Result<(FileStamp, Vec<Pin>), ApiError> {
    let mut stamp: FileStamp = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io("pins", e))? {
        let entry = entry.map_err(|e| io("pins", e))?;
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "json") {
            let meta = entry.metadata().map_err(|e| io("pin", e))?;
            let modified = meta.modified().map_err(|e| io("pin", e))?;
            stamp.push((path, modified, meta.len(), meta.ino()));
        }
    }
    stamp.sort();
    if let Some((at, pins)) = last
        && at == stamp
    {
        return Ok((stamp, pins));
    }
    let mut pins = Vec::new();
    for (path, ..) in &stamp {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            // Unpinned since it was listed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("pin", e)),
        };
        match serde_json::from_slice::<Pin>(&text) {
            Ok(p) => pins.push(p),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a malformed pin")
            }
        }
    }
    pins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((stamp, pins))
}

#[cfg(test)]
mod tests {
    use super::super::Registry;
    use super::super::tests::pin;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_local_registry_parses_a_pin_file_again_only_when_it_changed() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Registry::local(dir.path().to_path_buf()).unwrap();
        registry.create(&pin("a")).await.unwrap();
        registry.create(&pin("b")).await.unwrap();
        let first = registry.pins().await.unwrap();
        assert_eq!(first, vec![pin("a"), pin("b")]);
        let again = registry.pins().await.unwrap();
        assert!(Arc::ptr_eq(
            &first[0].manifest.files,
            &again[0].manifest.files
        ));

        let mut loading = pin("a");
        loading.load = true;
        registry.update(&loading).await.unwrap();
        assert_eq!(registry.pins().await.unwrap(), vec![loading, pin("b")]);
        registry.remove("b").await.unwrap();
        assert_eq!(registry.pins().await.unwrap().len(), 1);
    }
}
