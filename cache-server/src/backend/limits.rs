//! A backend's request limits as one worker applies them. Outside a cluster: `max_concurrency`
//! requests in flight and `max_requests_per_second`. In a cluster the rate limit, and
//! `cluster_max_concurrency` when set, are the whole cluster's: each of the N live members takes
//! 1/N of them (the same N from the same membership view), re-divided as members come and go.

use crate::config::BackendSettings;
use granary_core::metrics as m;
use granary_core::rate::TokenBucket;
use granary_proto::ApiError;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{Semaphore, SemaphorePermit};

pub(crate) struct Limits {
    backend: String,
    /// `max_concurrency` slots, of which the `holdback` task keeps back those above our share.
    slots: Arc<Semaphore>,
    max_concurrency: usize,
    cluster_concurrency: Option<usize>,
    holdback: Mutex<Option<tokio::task::JoinHandle<()>>>,
    cluster_rate: Option<f64>,
    rate: Option<Mutex<TokenBucket>>,
}

impl Limits {
    pub(crate) fn new(backend: &str, settings: &BackendSettings) -> Self {
        let limits = Limits {
            backend: backend.to_string(),
            slots: Arc::new(Semaphore::new(settings.max_concurrency)),
            max_concurrency: settings.max_concurrency,
            cluster_concurrency: settings.cluster_max_concurrency,
            holdback: Mutex::new(None),
            cluster_rate: settings.max_requests_per_second,
            rate: settings
                .max_requests_per_second
                .map(|r| Mutex::new(TokenBucket::new(r, r))),
        };
        limits.publish(settings.max_concurrency, settings.max_requests_per_second);
        limits
    }

    /// Takes this worker's share of the cluster-wide limits, `members` workers sharing them.
    /// Call from within a tokio runtime.
    pub(crate) fn set_members(&self, members: usize) {
        let n = members.max(1);
        let rate = self.cluster_rate.map(|r| r / n as f64);
        if let (Some(bucket), Some(rate)) = (&self.rate, rate) {
            bucket.lock().expect("rate lock").set_rate(rate, rate);
        }
        let concurrency = match self.cluster_concurrency {
            Some(c) => (c / n).clamp(1, self.max_concurrency),
            None => self.max_concurrency,
        };
        let keep_back = self.max_concurrency - concurrency;
        let mut holdback = self.holdback.lock().expect("holdback lock");
        if let Some(previous) = holdback.take() {
            // Gives back what it held (or stops waiting for it).
            previous.abort();
        }
        if keep_back > 0 {
            let slots = self.slots.clone();
            *holdback = Some(tokio::spawn(async move {
                // Taken as requests in flight finish (the semaphore is fair: new requests
                // queue behind), then held until the share changes again.
                let _held = slots.acquire_many_owned(keep_back as u32).await;
                std::future::pending::<()>().await;
            }));
        }
        self.publish(concurrency, rate);
    }

    fn publish(&self, concurrency: usize, rate: Option<f64>) {
        let backend = self.backend.clone();
        metrics::gauge!(m::BACKEND_LIMIT, "backend" => backend.clone(), "limit" => "concurrency")
            .set(concurrency as f64);
        if let Some(rate) = rate {
            metrics::gauge!(m::BACKEND_LIMIT, "backend" => backend, "limit" => "requests_per_second")
                .set(rate);
        }
    }

    /// Waits for a request slot, and a token when rate-limited.
    pub(crate) async fn admit(&self) -> Result<SemaphorePermit<'_>, ApiError> {
        if let Some(rate) = &self.rate {
            loop {
                let wait = match rate.lock().expect("rate lock").try_take(Instant::now()) {
                    Ok(()) => break,
                    Err(wait) => wait,
                };
                tokio::time::sleep(wait).await;
            }
        }
        self.slots
            .acquire()
            .await
            .map_err(|_| ApiError::Unavailable("backend closed".into()))
    }
}

impl Drop for Limits {
    fn drop(&mut self) {
        if let Some(task) = self.holdback.lock().expect("holdback lock").take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(concurrency: usize, cluster: Option<usize>, rate: Option<f64>) -> BackendSettings {
        BackendSettings {
            max_concurrency: concurrency,
            cluster_max_concurrency: cluster,
            max_requests_per_second: rate,
            ..BackendSettings::default()
        }
    }

    #[tokio::test]
    async fn a_member_takes_its_share_of_the_cluster_concurrency() {
        let limits = Limits::new("s3://b", &settings(8, Some(12), None));
        limits.set_members(3);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(limits.admit().await.unwrap());
        }
        assert!(
            limits.slots.try_acquire().is_err(),
            "a fifth slot of a share of 4"
        );
        drop(held);
        // One member left: 12 / 2 = 6, within the worker's own 8.
        limits.set_members(2);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let held: Vec<_> = (0..6)
            .map(|_| limits.slots.try_acquire().unwrap())
            .collect();
        assert!(limits.slots.try_acquire().is_err());
        drop(held);
        // Alone: its own max_concurrency.
        limits.set_members(1);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let held: Vec<_> = (0..8)
            .map(|_| limits.slots.try_acquire().unwrap())
            .collect();
        assert!(limits.slots.try_acquire().is_err());
        drop(held);
    }

    #[tokio::test]
    async fn a_share_smaller_than_requests_in_flight_waits_for_them() {
        let limits = Limits::new("s3://b", &settings(4, Some(4), None));
        let busy: Vec<_> = (0..4)
            .map(|_| limits.slots.try_acquire().unwrap())
            .collect();
        limits.set_members(4);
        drop(busy);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let one = limits.slots.try_acquire().unwrap();
        assert!(limits.slots.try_acquire().is_err());
        drop(one);
    }

    #[tokio::test]
    async fn the_rate_is_divided_among_members() {
        let limits = Limits::new("s3://b", &settings(64, None, Some(30.0)));
        limits.set_members(3);
        let mut bucket = limits.rate.as_ref().unwrap().lock().unwrap();
        let t0 = Instant::now();
        // A burst of one second's share (10), then 10 per second.
        let taken = (0..100).filter(|_| bucket.try_take(t0).is_ok()).count();
        assert_eq!(taken, 10);
        let wait = bucket.try_take(t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
    }
}
