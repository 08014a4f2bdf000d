//! [`Hook`]: the hook's state behind a lock, with the outside it acts on (the cache cluster's
//! Datasets API, the Kubernetes API), and the loop that moves gangs along.

use crate::data::{BoxFuture, DataSource};
use crate::error::CallError;
use crate::hook::{Action, HookConfig, HookState};
use granary_core::gang::Millis;
use granary_core::metrics as m;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The Kubernetes API, as the hook needs it.
pub trait ClusterApi: Send + Sync + 'static {
    /// The pod as the API server has it ([`CallError::NotFound`] when it has none).
    fn get_pod<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<crate::extender::Pod, CallError>>;
    /// Creates the pod's Binding to `node`.
    fn bind<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
        uid: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>>;
    /// Writes `granary.io/gang-phase: PHASE` on the pod.
    fn note_phase<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
        phase: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>>;
    /// Records an Event on the pod.
    fn event<'a>(
        &'a self,
        namespace: &'a str,
        pod: &'a str,
        reason: &'a str,
        message: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>>;
}

/// The running hook.
pub struct Hook {
    state: Mutex<HookState>,
    pub data: Arc<dyn DataSource>,
    pub cluster: Arc<dyn ClusterApi>,
    start: Instant,
}

/// How long one call to the cache cluster may take.
const DATA_TIMEOUT: Duration = Duration::from_secs(5);

impl Hook {
    pub fn new(
        config: HookConfig,
        data: Arc<dyn DataSource>,
        cluster: Arc<dyn ClusterApi>,
    ) -> Arc<Hook> {
        Arc::new(Hook {
            state: Mutex::new(HookState::new(config)),
            data,
            cluster,
            start: Instant::now(),
        })
    }

    /// Milliseconds since the hook started (the clock every state transition is given).
    pub fn now(&self) -> Millis {
        self.start.elapsed().as_millis() as Millis
    }

    pub fn state(&self) -> MutexGuard<'_, HookState> {
        // A panic while holding the lock leaves plain data behind: keep serving it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fetches `name`'s view from the cache cluster into the state.
    pub async fn refresh_dataset(&self, name: &str) {
        match tokio::time::timeout(DATA_TIMEOUT, self.data.status(name)).await {
            Ok(Ok(view)) => {
                let now = self.now();
                self.state().set_dataset(view, now);
            }
            Ok(Err(e)) => self.state().dataset_error(name, e.to_string()),
            Err(_) => self
                .state()
                .dataset_error(name, "the cache cluster did not answer in 5 s".into()),
        }
    }

    /// One round: fresh dataset views, reconcile, then what it asks for.
    pub async fn tick(&self) {
        let wanted = self.state().datasets_wanted();
        for name in wanted {
            self.refresh_dataset(&name).await;
        }
        let (actions, by_phase, released) = {
            let now = self.now();
            let mut s = self.state();
            let actions = s.reconcile(now);
            (actions, s.gangs_by_phase(), s.take_released())
        };
        for (phase, n) in by_phase {
            metrics::gauge!(m::SCHEDULER_GANGS, "state" => phase).set(n as f64);
        }
        for secs in released {
            metrics::histogram!(m::SCHEDULER_GANG_WAIT_SECONDS).record(secs);
        }
        for a in actions {
            self.act(a).await;
        }
    }

    async fn act(&self, action: Action) {
        match action {
            Action::Load { dataset, nodes } => {
                tracing::info!(%dataset, nodes = %nodes.join(","), "loading the dataset onto a gang's nodes");
                match tokio::time::timeout(DATA_TIMEOUT, self.data.load(&dataset, nodes)).await {
                    Ok(Ok(view)) => {
                        let now = self.now();
                        self.state().set_dataset(view, now);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%dataset, error = %e, "load failed");
                        self.state().dataset_error(&dataset, e.to_string());
                    }
                    Err(_) => tracing::warn!(%dataset, "load: no answer in 5 s"),
                }
            }
            Action::Note {
                namespace,
                pod,
                phase,
            } => {
                if let Err(e) = self.cluster.note_phase(&namespace, &pod, &phase).await {
                    tracing::debug!(%namespace, %pod, error = %e, "cannot note the gang phase");
                }
            }
            Action::Event {
                namespace,
                pod,
                reason,
                message,
            } => {
                tracing::info!(%namespace, %pod, %reason, "{message}");
                if let Err(e) = self
                    .cluster
                    .event(&namespace, &pod, &reason, &message)
                    .await
                {
                    tracing::warn!(%namespace, %pod, error = %e, "cannot record an event");
                }
            }
        }
    }

    /// Ticks every `period` until `shutdown` completes.
    pub async fn run(
        self: Arc<Self>,
        period: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = interval.tick() => self.tick().await,
            }
        }
    }
}
