//! A job read through the S3 API with no cache in between: the direct backend rate every cache is
//! compared with. A reader is a GET in flight (ranged GETs of the large file, whole-object GETs of
//! small files).

use super::{Job, Outcome, RANDOM_BYTES, share, verify};
use crate::dataset::{Dataset, FileSpec};
use anyhow::{Context, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStore, ObjectStoreExt};
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

/// Range of one GET of a sequential read...
const RANGE_BYTES: u64 = 8 << 20;
/// ...and how many are in flight, over all readers.
const RANGES_IN_FLIGHT: usize = 8;

pub async fn run(
    job: &Job<'_>,
    dataset: &Dataset,
    store: &Arc<dyn ObjectStore>,
    check: bool,
) -> anyhow::Result<Outcome> {
    match job {
        Job::Sequential { file, readers } => {
            // Each reader its share in ranged GETs, consumed in order; 8 in flight in all.
            let in_flight = (RANGES_IN_FLIGHT / readers).max(1);
            let reader = |i| {
                let share = share(file.size, i, *readers, RANGE_BYTES);
                let ranges = share
                    .clone()
                    .step_by(RANGE_BYTES as usize)
                    .map(move |start| start..(start + RANGE_BYTES).min(share.end));
                futures::stream::iter(ranges)
                    .map(|range| get_range(dataset, store, file, range, check))
                    .buffered(in_flight)
                    .try_fold(0, |total, (n, _)| async move { Ok(total + n) })
            };
            let bytes = futures::future::try_join_all((0..*readers).map(reader))
                .await?
                .into_iter()
                .sum();
            Ok(Outcome {
                bytes,
                ops: 1,
                latencies: Vec::new(),
            })
        }
        Job::Random {
            file,
            offsets,
            readers,
        } => {
            let done: Vec<(u64, f64)> = futures::stream::iter(offsets)
                .map(|&offset| {
                    get_range(dataset, store, file, offset..offset + RANDOM_BYTES, check)
                })
                .buffer_unordered(*readers)
                .try_collect()
                .await?;
            Ok(Outcome {
                bytes: done.iter().map(|(n, _)| n).sum(),
                ops: done.len() as u64,
                latencies: done.into_iter().map(|(_, s)| s).collect(),
            })
        }
        Job::WholeFiles { files, readers } => {
            let done: Vec<(u64, f64)> = futures::stream::iter(files)
                .map(|file| get_range(dataset, store, file, 0..file.size, check))
                .buffer_unordered(*readers)
                .try_collect()
                .await?;
            Ok(Outcome {
                bytes: done.iter().map(|(n, _)| n).sum(),
                ops: files.len() as u64,
                latencies: Vec::new(),
            })
        }
        Job::FirstBytes { files } => {
            let mut latencies = Vec::with_capacity(files.len());
            for file in files {
                latencies.push(first_byte(dataset, store, file).await?);
            }
            Ok(Outcome {
                bytes: files.len() as u64,
                ops: files.len() as u64,
                latencies,
            })
        }
        Job::Stat { .. } | Job::List { .. } => {
            bail!("metadata workloads are not measured through the S3 API")
        }
    }
}

/// Seconds from sending a GET of `file` until the first bytes of its body arrive (checked; the
/// rest is not read). Not a ranged GET of one byte: on Ceph RGW those took 44 ms (p50) where a
/// 256 KiB range took 1.8 ms, an artefact of tiny responses rather than a first byte.
async fn first_byte(
    dataset: &Dataset,
    store: &Arc<dyn ObjectStore>,
    file: &FileSpec,
) -> anyhow::Result<f64> {
    let key = dataset.key(file);
    let start = Instant::now();
    let first = async { store.get(&key).await?.into_stream().try_next().await }
        .await
        .with_context(|| format!("GET {key}"))?;
    let took = start.elapsed().as_secs_f64();
    let first = first.with_context(|| format!("GET {key}: empty body"))?;
    verify(key.as_ref(), file, 0, &first[..1])?;
    Ok(took)
}

/// One GET of `range` of `file` (a plain GET for the whole object): bytes and seconds.
async fn get_range(
    dataset: &Dataset,
    store: &Arc<dyn ObjectStore>,
    file: &FileSpec,
    range: Range<u64>,
    check: bool,
) -> anyhow::Result<(u64, f64)> {
    let key = dataset.key(file);
    let start = Instant::now();
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
    let took = start.elapsed().as_secs_f64();
    ensure!(
        data.len() as u64 == range.end - range.start,
        "GET {key} bytes {range:?}: {} bytes",
        data.len()
    );
    if check {
        verify(key.as_ref(), file, range.start, &data)?;
    }
    Ok((data.len() as u64, took))
}
