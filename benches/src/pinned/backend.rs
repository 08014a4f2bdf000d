//! The backend's raw parallel GET throughput for the same objects a load fetches: every file of
//! the dataset through the S3 API with no cache in between, in ranged GETs of one cache block
//! (4 MiB; a small file is one GET of the whole object), `in_flight` GETs at a time over all the
//! files. What a load could reach at best: it fetches the same blocks.

use crate::dataset::{self, Dataset, FileSpec};
use anyhow::{Context, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

/// One pass over every object.
#[derive(Debug, Serialize)]
pub struct RawPass {
    pub in_flight: usize,
    pub seconds: f64,
    pub bytes: u64,
    pub gets: usize,
    pub mb_per_s: f64,
    /// Whether every byte was compared with the dataset (an untimed check pass).
    pub checked: bool,
}

/// GETs `files` (whole, in `range_bytes` pieces), `in_flight` at a time; with `check`, compares
/// every byte with the dataset.
pub async fn parallel_get(
    dataset: &Dataset,
    files: &[&FileSpec],
    store: &Arc<dyn ObjectStore>,
    in_flight: usize,
    range_bytes: u64,
    check: bool,
) -> anyhow::Result<RawPass> {
    let requests: Vec<(&FileSpec, Range<u64>)> = files
        .iter()
        .flat_map(|&file| {
            (0..file.size)
                .step_by(range_bytes as usize)
                .map(move |start| (file, start..(start + range_bytes).min(file.size)))
        })
        .collect();
    let gets = requests.len();
    let start = Instant::now();
    let bytes = futures::stream::iter(requests)
        .map(|(file, range)| get(dataset, store, file, range, check))
        .buffer_unordered(in_flight)
        .try_fold(0, |total, n| async move { Ok(total + n) })
        .await?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(RawPass {
        in_flight,
        seconds,
        bytes,
        gets,
        mb_per_s: bytes as f64 / 1e6 / seconds,
        checked: check,
    })
}

/// One GET of `range` of `file` (a plain GET of the whole object when the range is all of it).
async fn get(
    dataset: &Dataset,
    store: &Arc<dyn ObjectStore>,
    file: &FileSpec,
    range: Range<u64>,
    check: bool,
) -> anyhow::Result<u64> {
    let key = dataset.key(file);
    let data = if range == (0..file.size) {
        async { store.get(&key).await?.bytes().await }
            .await
            .with_context(|| format!("GET {key}"))?
    } else {
        store
            .get_range(&key, range.clone())
            .await
            .with_context(|| format!("GET {key} bytes {range:?}"))?
    };
    ensure!(
        data.len() as u64 == range.end - range.start,
        "GET {key} bytes {range:?}: {} bytes",
        data.len()
    );
    if check {
        let mut want = vec![0u8; data.len()];
        dataset::expected(file, range.start, &mut want);
        if let Some(i) = data.iter().zip(&want).position(|(a, b)| a != b) {
            bail!("GET {key}: wrong byte at offset {}", range.start + i as u64);
        }
    }
    Ok(data.len() as u64)
}
