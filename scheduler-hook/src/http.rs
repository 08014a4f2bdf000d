//! The extender's HTTP API: `POST /filter`, `/prioritize`, `/bind`, `/preempt`; `GET /gangs`,
//! `/healthz`.
//!
//! A body that is too large, not JSON, or not the shape the verb expects gets HTTP 400 with
//! `{"Error": "<verb>: <what is wrong>"}` and changes nothing; the server keeps serving. Errors
//! of the world (a Binding refused by the API server) travel in the verb's own `Error` field with
//! HTTP 200, as the scheduler expects.

use crate::driver::Hook;
use crate::extender::{
    BadRequest, Candidates, ExtenderArgs, ExtenderBindingArgs, ExtenderBindingResult,
    ExtenderFilterResult, HostPriority, NodeListOut,
};
use crate::pod::{Intent, intent};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use granary_core::metrics as m;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest request body accepted by default (5,000 full Node objects fit).
pub const DEFAULT_MAX_BODY: usize = 32 << 20;

#[derive(Clone)]
struct App {
    hook: Arc<Hook>,
    max_body: usize,
}

/// The extender's routes over `hook`, accepting bodies up to `max_body` bytes.
pub fn router(hook: Arc<Hook>, max_body: usize) -> Router {
    Router::new()
        .route("/filter", post(filter))
        .route("/prioritize", post(prioritize))
        .route("/bind", post(bind))
        .route("/preempt", post(preempt))
        .route("/gangs", get(gangs))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(App { hook, max_body })
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}"),
        )
            .into_response(),
    }
}

fn bad(verb: &str, problem: impl std::fmt::Display) -> Response {
    tracing::warn!(verb, %problem, "bad extender request");
    json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({ "Error": format!("{verb}: {problem}") }),
    )
}

fn record(verb: &'static str, started: Instant, outcome: &'static str) {
    metrics::histogram!(m::SCHEDULER_REQUEST_SECONDS, "verb" => verb)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(m::SCHEDULER_REQUESTS, "verb" => verb, "outcome" => outcome).increment(1);
}

async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, String> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max as u64
    {
        return Err(format!(
            "the body ({len} bytes) is larger than the limit of {max} bytes"
        ));
    }
    axum::body::to_bytes(body, max).await.map_err(|e| {
        format!("cannot read the body (larger than the limit of {max} bytes, or cut short): {e}")
    })
}

fn parse_args(bytes: &[u8]) -> Result<(crate::extender::Pod, Candidates), BadRequest> {
    let args: ExtenderArgs =
        serde_json::from_slice(bytes).map_err(|e| BadRequest::Json(e.to_string()))?;
    args.into_parts()
}

/// The pod's intent, as the hook's watch knows it (falling back to the request's copy).
fn pod_intent(app: &App, pod: &crate::extender::Pod) -> Result<Intent, BadRequest> {
    let from_request = intent(pod)?;
    let mut s = app.hook.state();
    if s.pod(&from_request.key).is_none() {
        s.set_pod(from_request.clone());
    }
    Ok(from_request)
}

async fn filter(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let bytes = match read_body(&headers, body, app.max_body).await {
        Ok(b) => b,
        Err(e) => {
            record("filter", started, "bad_request");
            return bad("filter", e);
        }
    };
    let (pod, candidates) = match parse_args(&bytes) {
        Ok(x) => x,
        Err(e) => {
            record("filter", started, "bad_request");
            return bad("filter", e);
        }
    };
    let intent = match pod_intent(&app, &pod) {
        Ok(i) => i,
        Err(e) => {
            record("filter", started, "bad_request");
            return bad("filter", e);
        }
    };
    let names = candidates.names();
    let gpus: Vec<Option<u32>> = match &candidates {
        Candidates::Names(_) => Vec::new(),
        Candidates::Objects(o) => o.iter().map(|(_, gpus, _)| *gpus).collect(),
    };
    let answer = app
        .hook
        .state()
        .filter(&intent, &names, &|i| gpus.get(i).copied().flatten());
    let mut result = ExtenderFilterResult {
        failed_nodes: answer.failed,
        ..Default::default()
    };
    match candidates {
        Candidates::Names(n) => {
            result.node_names = Some(answer.pass.iter().map(|&i| n[i].clone()).collect());
        }
        Candidates::Objects(o) => {
            let mut keep = vec![false; o.len()];
            for &i in &answer.pass {
                keep[i] = true;
            }
            result.nodes = Some(NodeListOut {
                metadata: Default::default(),
                items: o
                    .into_iter()
                    .zip(keep)
                    .filter(|(_, k)| *k)
                    .map(|((_, _, raw), _)| raw)
                    .collect(),
            });
        }
    }
    record("filter", started, "ok");
    json(StatusCode::OK, &result)
}

async fn prioritize(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let bytes = match read_body(&headers, body, app.max_body).await {
        Ok(b) => b,
        Err(e) => {
            record("prioritize", started, "bad_request");
            return bad("prioritize", e);
        }
    };
    let (pod, candidates) = match parse_args(&bytes) {
        Ok(x) => x,
        Err(e) => {
            record("prioritize", started, "bad_request");
            return bad("prioritize", e);
        }
    };
    let intent = match pod_intent(&app, &pod) {
        Ok(i) => i,
        Err(e) => {
            record("prioritize", started, "bad_request");
            return bad("prioritize", e);
        }
    };
    // A pod without a gang scores by its dataset's bytes: make sure the view is fresh.
    if intent.gang.is_none()
        && let Some(d) = &intent.dataset
    {
        let now = app.hook.now();
        let stale = app.hook.state().dataset_stale(d, now);
        if stale {
            app.hook.refresh_dataset(d).await;
        }
    }
    let names = candidates.names();
    let scores: Vec<HostPriority> = app.hook.state().prioritize(&intent, &names);
    record("prioritize", started, "ok");
    json(StatusCode::OK, &scores)
}

async fn bind(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let bytes = match read_body(&headers, body, app.max_body).await {
        Ok(b) => b,
        Err(e) => {
            record("bind", started, "bad_request");
            return bad("bind", e);
        }
    };
    let args: ExtenderBindingArgs = match serde_json::from_slice(&bytes) {
        Ok(a) => a,
        Err(e) => {
            record("bind", started, "bad_request");
            return bad(
                "bind",
                format!("the body is not valid ExtenderBindingArgs: {e}"),
            );
        }
    };
    if args.pod_name.is_empty() || args.node.is_empty() {
        record("bind", started, "bad_request");
        return bad("bind", "PodName and Node must not be empty");
    }
    let key = format!("{}/{}", args.pod_namespace, args.pod_name);
    let check = {
        let s = app.hook.state();
        match s.pod(&key) {
            Some(p) => s.check_bind(p, &args.node),
            None => Err(format!("pod {key} not seen by the hook yet")),
        }
    };
    let result = match check {
        Err(e) => ExtenderBindingResult { error: e },
        Ok(()) => match app
            .hook
            .cluster
            .bind(
                &args.pod_namespace,
                &args.pod_name,
                &args.pod_uid,
                &args.node,
            )
            .await
        {
            Ok(()) => {
                let now = app.hook.now();
                app.hook.state().bound(&key, &args.node, now);
                tracing::info!(pod = %key, node = %args.node, "bound");
                ExtenderBindingResult::default()
            }
            Err(e) => ExtenderBindingResult {
                error: format!("binding {key} to {}: {e}", args.node),
            },
        },
    };
    record(
        "bind",
        started,
        if result.error.is_empty() {
            "ok"
        } else {
            "error"
        },
    );
    json(StatusCode::OK, &result)
}

/// Preemption passes through: the victims the scheduler proposes, unchanged (as MetaVictims).
async fn preempt(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let bytes = match read_body(&headers, body, app.max_body).await {
        Ok(b) => b,
        Err(e) => {
            record("preempt", started, "bad_request");
            return bad("preempt", e);
        }
    };
    let args: serde_json::Value = match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(o)) => serde_json::Value::Object(o),
        Ok(_) => {
            record("preempt", started, "bad_request");
            return bad("preempt", "the body is not a JSON object");
        }
        Err(e) => {
            record("preempt", started, "bad_request");
            return bad("preempt", format!("the body is not valid JSON: {e}"));
        }
    };
    let field = |name: &str| {
        args.as_object().and_then(|o| {
            o.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        })
    };
    let meta = match field("NodeNameToMetaVictims") {
        Some(v) if !v.is_null() => v,
        _ => {
            let mut out = serde_json::Map::new();
            if let Some(serde_json::Value::Object(victims)) = field("NodeNameToVictims") {
                for (node, v) in victims {
                    let pods: Vec<serde_json::Value> = v
                        .get("Pods")
                        .and_then(|p| p.as_array())
                        .map(|pods| {
                            pods.iter()
                                .map(|p| serde_json::json!({ "UID": p["metadata"]["uid"] }))
                                .collect()
                        })
                        .unwrap_or_default();
                    out.insert(
                        node,
                        serde_json::json!({
                            "Pods": pods,
                            "NumPDBViolations": v.get("NumPDBViolations").cloned().unwrap_or(0.into()),
                        }),
                    );
                }
            }
            serde_json::Value::Object(out)
        }
    };
    record("preempt", started, "ok");
    json(
        StatusCode::OK,
        &serde_json::json!({ "NodeNameToMetaVictims": meta }),
    )
}

async fn gangs(State(app): State<App>) -> Response {
    let now = app.hook.now();
    let reports = app.hook.state().gang_reports(now);
    json(StatusCode::OK, &serde_json::json!({ "gangs": reports }))
}

/// Serves `router` on `listener` until `shutdown` completes (requests in flight finish).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Answers go out at once (no Nagle delay behind the scheduler's delayed ACKs).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// How long the scheduler should wait for the hook (for docs and the example config).
pub const SUGGESTED_HTTP_TIMEOUT: Duration = Duration::from_secs(10);
