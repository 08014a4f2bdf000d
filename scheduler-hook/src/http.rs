//! The extender's HTTP API: `POST /filter`, `/prioritize`, `/bind`, `/preempt`; `GET /gangs`,
//! `/healthz`.
//!
//! A body that is too large, not JSON, or not the shape the verb expects gets HTTP 400 with
//! `{"Error": "<verb>: <what is wrong>"}` and changes nothing; the server keeps serving. Errors
//! of the world (a Binding refused by the API server) travel in the verb's own `Error` field with
//! HTTP 200, as the scheduler expects.
//!
//! The pod in a request only names a pod: its spec, annotations and gang come from the API
//! server (the hook's watch, or a GET when the watch does not have it). A pod the API server does
//! not have, or has with another uid or another request, is refused (HTTP 400) and changes
//! nothing. `/bind` binds only a pod the hook holds something for (see
//! [`HookState::check_bind`](crate::HookState::check_bind)).

use crate::driver::Hook;
use crate::error::CallError;
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

/// Why a request's pod is not acted on: the status to answer with, the metrics outcome
/// (`bad_request`: a malformed body; `refused`: a pod the hook does not trust), the reason.
struct Refused {
    status: StatusCode,
    outcome: &'static str,
    why: String,
}

impl Refused {
    fn untrusted(status: StatusCode, why: String) -> Refused {
        Refused {
            status,
            outcome: "refused",
            why,
        }
    }
}

impl From<BadRequest> for Refused {
    fn from(e: BadRequest) -> Self {
        Refused {
            status: StatusCode::BAD_REQUEST,
            outcome: "bad_request",
            why: e.to_string(),
        }
    }
}

/// What of a pod the hook acts on differs between `a` (the request's) and `b` (the server's).
fn differs(a: &Intent, b: &Intent) -> Option<&'static str> {
    if a.gpus != b.gpus {
        Some("nvidia.com/gpu request")
    } else if a.gang != b.gang {
        Some("gang")
    } else if a.dataset != b.dataset {
        Some("dataset")
    } else if a.min_ready_percent != b.min_ready_percent {
        Some("min-ready-percent")
    } else if a.ready_timeout != b.ready_timeout {
        Some("ready-timeout")
    } else {
        None
    }
}

/// The pod a request names (`namespace`, `name`, `uid`), as the API server shows it: from the
/// watch's view, or fetched when the view lacks it or differs. `claimed` is the request's copy,
/// only checked against the server's.
async fn trusted(
    app: &App,
    namespace: &str,
    name: &str,
    uid: &str,
    claimed: Option<&Intent>,
) -> Result<Intent, Refused> {
    let key = format!("{namespace}/{name}");
    if uid.is_empty() {
        return Err(Refused::untrusted(
            StatusCode::BAD_REQUEST,
            format!("pod {key}: the request gives no uid"),
        ));
    }
    let fits = |p: &Intent| p.uid == uid && claimed.is_none_or(|c| differs(c, p).is_none());
    if let Some(p) = app.hook.state().pod(&key).filter(|p| fits(p)) {
        return Ok(p.clone());
    }
    // Not in the watch's view, or different: the API server decides (the watch may lag).
    let pod = match app.hook.cluster.get_pod(namespace, name).await {
        Ok(p) => p,
        Err(CallError::NotFound(_)) => {
            return Err(Refused::untrusted(
                StatusCode::BAD_REQUEST,
                format!("pod {key} does not exist in the API server; refused"),
            ));
        }
        Err(e) => {
            return Err(Refused::untrusted(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("pod {key}: cannot check it with the API server: {e}"),
            ));
        }
    };
    let server = intent(&pod).map_err(|e| {
        Refused::untrusted(
            StatusCode::BAD_REQUEST,
            format!("pod {key} in the API server: {e}"),
        )
    })?;
    if server.uid != uid {
        return Err(Refused::untrusted(
            StatusCode::BAD_REQUEST,
            format!(
                "pod {key} has uid {} in the API server, not {uid}; refused",
                server.uid
            ),
        ));
    }
    if !server.finished {
        app.hook.state().set_pod(server.clone());
    }
    if let Some(what) = claimed.and_then(|c| differs(c, &server)) {
        return Err(Refused::untrusted(
            StatusCode::BAD_REQUEST,
            format!("pod {key}: the request's {what} differs from the API server's; refused"),
        ));
    }
    Ok(server)
}

/// The request's pod as the API server shows it (see [`trusted`]).
async fn pod_intent(app: &App, pod: &crate::extender::Pod) -> Result<Intent, Refused> {
    let claimed = intent(pod)?;
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let name = &pod.metadata.name;
    if name.is_empty() {
        return Err(BadRequest::NoPodName.into());
    }
    trusted(app, &claimed.namespace, name, uid, Some(&claimed)).await
}

fn refused(verb: &str, r: Refused) -> Response {
    tracing::warn!(verb, problem = %r.why, "extender request refused");
    json(
        r.status,
        &serde_json::json!({ "Error": format!("{verb}: {}", r.why) }),
    )
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
    let intent = match pod_intent(&app, &pod).await {
        Ok(i) => i,
        Err(e) => {
            record("filter", started, e.outcome);
            return refused("filter", e);
        }
    };
    let now = app.hook.now();
    app.hook.state().asked(&intent.key, now);
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
    let intent = match pod_intent(&app, &pod).await {
        Ok(i) => i,
        Err(e) => {
            record("prioritize", started, e.outcome);
            return refused("prioritize", e);
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
    let namespace = if args.pod_namespace.is_empty() {
        "default"
    } else {
        args.pod_namespace.as_str()
    };
    let key = format!("{namespace}/{}", args.pod_name);
    let check = match trusted(&app, namespace, &args.pod_name, &args.pod_uid, None).await {
        Ok(pod) => {
            let now = app.hook.now();
            app.hook.state().check_bind(&pod, &args.node, now)
        }
        Err(r) => Err(r.why),
    };
    let result = match check {
        Err(e) => ExtenderBindingResult { error: e },
        Ok(()) => match app
            .hook
            .cluster
            .bind(namespace, &args.pod_name, &args.pod_uid, &args.node)
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
    if !result.error.is_empty() {
        tracing::warn!(pod = %key, node = %args.node, error = %result.error, "bind refused");
    }
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

/// Serves `router` over TLS on `listener` with `config` (which should require client
/// certificates: see [`crate::tls`]) until `shutdown` completes.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    config: rustls::ServerConfig,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = crate::tls::TlsListener::new(listener, config)?;
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// How long the scheduler should wait for the hook (for docs and the example config).
pub const SUGGESTED_HTTP_TIMEOUT: Duration = Duration::from_secs(10);
