//! The built-in dashboard of a worker, at `/` of its metrics port: a self-contained page (no
//! external assets) polling `/api/overview`, which gathers the members and their cache use (as
//! `granary status --json`), the cluster hit ratio over the last minutes, every dataset with its
//! readiness per node, and the scheduler hook's gangs when `--scheduler-url` is given.
//!
//! `/api/overview` answers only a caller with a dataset API token (`Authorization: Bearer`),
//! unless the worker's dataset API is open (no tokens configured): the admin's token shows every
//! pin and the hook's gangs, the scheduler's every pin, a tenant's its own pins; without a valid
//! token it answers 401. The page asks for the token (or takes it once from `#token=...` in its
//! address), keeps it in the tab's `sessionStorage` and sends it with every poll.

use crate::cmd_cluster::{member_info, status_json};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use granary_cache_server::Worker;
use granary_cache_server::dataset_api::Caller;
use granary_net::membership::MemberInfo;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PAGE: &str = include_str!("dashboard.html");
/// Samples of the hit ratio kept: 5 minutes at one per 2 seconds.
const HISTORY: usize = 150;
const EVERY: Duration = Duration::from_secs(2);

struct State {
    worker: Arc<Worker>,
    scheduler: Option<String>,
    /// (unix seconds, hit ratio over the interval ending then; None when nothing was read).
    history: Mutex<VecDeque<(u64, Option<f64>)>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn router(worker: Arc<Worker>, scheduler: Option<String>) -> axum::Router {
    let state = Arc::new(State {
        worker,
        scheduler,
        history: Mutex::new(VecDeque::with_capacity(HISTORY)),
    });
    tokio::spawn(sample(state.clone()));
    let overview = state.clone();
    axum::Router::new()
        .route(
            "/",
            axum::routing::get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
                    PAGE,
                )
            }),
        )
        .route(
            "/api/overview",
            axum::routing::get(move |headers: HeaderMap| {
                let state = overview.clone();
                async move { overview_response(&state, &headers).await }
            }),
        )
}

/// The bearer token of an `Authorization: Bearer ...` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::trim)
}

/// `/api/overview` for the caller the request's token names; 401 without a valid token.
async fn overview_response(state: &State, headers: &HeaderMap) -> Response {
    let token = bearer(headers);
    let caller = match state.worker.dataset_api().authenticate(token) {
        Ok(caller) => caller,
        Err(e) => {
            let message = match token {
                None => "no token: the dashboard needs a dataset API token (a tenant's, the scheduler's or the admin's)".to_string(),
                Some(_) => e.to_string(),
            };
            return (
                StatusCode::UNAUTHORIZED,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::WWW_AUTHENTICATE, "Bearer realm=\"granary\""),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                json!({ "error": message }).to_string(),
            )
                .into_response();
        }
    };
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        gather(state, &caller).await.to_string(),
    )
        .into_response()
}

/// The members to show: the cluster as this worker sees it, or this worker alone.
fn members(worker: &Worker) -> (u64, Vec<MemberInfo>) {
    match worker.membership() {
        Some(view) => (view.epoch, view.members.clone()),
        None => {
            let s = worker.settings();
            (
                0,
                vec![MemberInfo {
                    node_id: s.node_id.clone(),
                    data_addr: s.listen,
                    api_addr: s.listen,
                    memory_capacity: s.cache.memory.bytes(),
                    disk_capacity: s.cache.disk.bytes(),
                    dataset_capacity: s.datasets.capacity.bytes(),
                }],
            )
        }
    }
}

async fn cluster_status(worker: &Worker) -> Value {
    let (epoch, members) = members(worker);
    // The other workers' APIs are TLS when ours is: ask with this worker's certificate.
    let tls = worker
        .settings()
        .tls
        .as_ref()
        .and_then(|files| granary_net::tls::TlsIdentity::load(files).ok());
    let mut nodes = Vec::new();
    for m in &members {
        nodes.push((m, member_info(m, tls.as_ref(), Some(&m.node_id)).await));
    }
    status_json(epoch, &nodes)
}

/// Cache hits and all reads at the blocks' owners, summed over the members.
fn totals(status: &Value) -> (u64, u64) {
    status["members"]
        .as_array()
        .map(|ms| {
            ms.iter().fold((0, 0), |(h, a), m| {
                let r = &m["reads"];
                let get = |t: &str| r[t].as_u64().unwrap_or(0);
                let hits = get("memory") + get("disk");
                (h + hits, a + hits + get("backend"))
            })
        })
        .unwrap_or((0, 0))
}

async fn sample(state: Arc<State>) {
    let mut last: Option<(u64, u64)> = None;
    loop {
        let (hits, all) = totals(&cluster_status(&state.worker).await);
        // Counters restart with a worker: a drop starts a new baseline.
        let ratio = match last {
            Some((h0, a0)) if all >= a0 && hits >= h0 && all > a0 => {
                Some((hits - h0) as f64 / (all - a0) as f64)
            }
            _ => None,
        };
        last = Some((hits, all));
        {
            let mut history = state.history.lock().expect("history");
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back((now(), ratio));
        }
        tokio::time::sleep(EVERY).await;
    }
}

async fn gangs(url: &str, tls: Option<&granary_net::tls::TlsIdentity>) -> Value {
    match http_client(tls) {
        Ok(client) => match get_json(client, url, "/gangs").await {
            Ok(v) => v,
            Err(e) => json!({ "error": e }),
        },
        Err(e) => json!({ "error": e }),
    }
}

/// The one HTTP client of the dashboard: over TLS (`https://` hook URLs) it presents this
/// worker's certificate, which the hook asks of every client.
fn http_client(
    tls: Option<&granary_net::tls::TlsIdentity>,
) -> Result<&'static reqwest::Client, String> {
    static CLIENT: std::sync::OnceLock<Result<reqwest::Client, String>> =
        std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(3));
            if let Some(tls) = tls {
                let mut config = tls.grpc_client_config().map_err(|e| e.to_string())?;
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                builder = builder.tls_backend_preconfigured(config);
            }
            builder.build().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Largest answer the hook may send to a dashboard request.
const MAX_ANSWER: usize = 16 << 20;

#[cfg(test)]
async fn http_get_json(base: &str, path: &str) -> Result<Value, String> {
    get_json(http_client(None)?, base, path).await
}

/// A GET of `base` + `path` as JSON within 3 s (the hook's `/gangs`), its body bounded.
async fn get_json(client: &reqwest::Client, base: &str, path: &str) -> Result<Value, String> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let mut resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(format!("{url}: the answer is over {MAX_ANSWER} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))
}

/// The overview `caller` may see: the pins it may list; the hook's gangs for the admin only.
async fn gather(state: &State, caller: &Caller) -> Value {
    let status = cluster_status(&state.worker).await;
    let datasets = match state.worker.list_datasets(caller).await {
        Ok(list) => serde_json::to_value(list).unwrap_or(Value::Null),
        Err(e) => json!({ "error": e.to_string() }),
    };
    let history: Vec<Value> = state
        .history
        .lock()
        .expect("history")
        .iter()
        .map(|(t, r)| json!({ "t": t, "hit_ratio": r }))
        .collect();
    let (hits, all) = totals(&status);
    let gangs = match (&state.scheduler, caller) {
        (Some(url), Caller::Admin) => {
            let tls = state
                .worker
                .settings()
                .tls
                .as_ref()
                .and_then(|files| granary_net::tls::TlsIdentity::load(files).ok());
            gangs(url, tls.as_ref()).await
        }
        (Some(_), _) => json!({ "error": "gangs are shown with the admin's token only" }),
        (None, _) => Value::Null,
    };
    json!({
        "node": state.worker.settings().node_id,
        "updated": now(),
        "cluster": status,
        "hit_ratio": (all > 0).then(|| hits as f64 / all as f64),
        "history": history,
        "datasets": datasets,
        "gangs": gangs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server on 127.0.0.1 answering `/gangs` with JSON, `/big` with more than the limit.
    async fn serve() -> String {
        let app = axum::Router::new()
            .route(
                "/gangs",
                axum::routing::get(|| async { json!({"gangs": [{"name": "g"}]}).to_string() }),
            )
            .route(
                "/big",
                axum::routing::get(|| async { "x".repeat(MAX_ANSWER + 1) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/")
    }

    #[tokio::test]
    async fn the_hook_is_asked_over_http_with_a_bounded_answer() {
        let base = serve().await;
        assert_eq!(
            http_get_json(&base, "/gangs").await.unwrap(),
            json!({"gangs": [{"name": "g"}]})
        );
        let missing = http_get_json(&base, "/nope").await.unwrap_err();
        assert!(missing.contains("404"), "{missing}");
        let big = http_get_json(&base, "/big").await.unwrap_err();
        assert!(big.contains("over"), "{big}");
        let closed = format!("http://127.0.0.1:{}", free_port());
        assert!(http_get_json(&closed, "/gangs").await.is_err());
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}
