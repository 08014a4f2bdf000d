//! The extender's HTTP API with fakes for the cache cluster and the Kubernetes API: the JSON of
//! every verb (nodeCacheCapable both ways, null lists), bad bodies answered with 400 while the
//! server keeps serving, a gang going from waiting to bound through filter and bind; forged
//! requests (pods the API server does not have, or has otherwise; binds of pods nothing was
//! reserved for) refused with nothing changed; and HTTPS that accepts only CA-signed clients.

use granary_scheduler_hook::data::{BoxFuture, DataSource, DatasetView, NodeBytes};
use granary_scheduler_hook::pod::intent;
use granary_scheduler_hook::{CallError, ClusterApi, Hook, HookConfig};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
struct FakeData {
    /// node -> (ready, total) of dataset "ds"; the pin's node set.
    per_node: Mutex<BTreeMap<String, (u64, u64)>>,
    nodes: Mutex<Vec<String>>,
    loaded: Mutex<bool>,
    loads: Mutex<Vec<Vec<String>>>,
}

impl FakeData {
    fn view(&self) -> DatasetView {
        DatasetView {
            name: "ds".into(),
            nodes: self.nodes.lock().unwrap().clone(),
            load: *self.loaded.lock().unwrap(),
            per_node: self
                .per_node
                .lock()
                .unwrap()
                .iter()
                .map(|(n, (r, t))| {
                    (
                        n.clone(),
                        NodeBytes {
                            ready: *r,
                            total: *t,
                            state: if r == t { "ready" } else { "loading" }.into(),
                        },
                    )
                })
                .collect(),
        }
    }
}

impl DataSource for FakeData {
    fn status<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<DatasetView, CallError>> {
        Box::pin(async move {
            if name == "ds" {
                Ok(self.view())
            } else {
                Err(CallError::NotFound(format!("no dataset named {name}")))
            }
        })
    }

    fn load<'a>(
        &'a self,
        _name: &'a str,
        nodes: Vec<String>,
    ) -> BoxFuture<'a, Result<DatasetView, CallError>> {
        Box::pin(async move {
            self.loads.lock().unwrap().push(nodes.clone());
            *self.nodes.lock().unwrap() = nodes.clone();
            *self.loaded.lock().unwrap() = true;
            let mut p = self.per_node.lock().unwrap();
            p.retain(|n, _| nodes.contains(n));
            for n in &nodes {
                p.entry(n.clone()).or_insert((0, 100));
            }
            drop(p);
            Ok(self.view())
        })
    }
}

#[derive(Default)]
struct FakeCluster {
    /// The API server's pods, `namespace/name` -> object.
    pods: Mutex<BTreeMap<String, Value>>,
    binds: Mutex<Vec<(String, String)>>,
    notes: Mutex<Vec<(String, String)>>,
}

impl ClusterApi for FakeCluster {
    fn get_pod<'a>(
        &'a self,
        ns: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<granary_scheduler_hook::extender::Pod, CallError>> {
        Box::pin(async move {
            match self.pods.lock().unwrap().get(&format!("{ns}/{name}")) {
                Some(p) => Ok(serde_json::from_value(p.clone()).unwrap()),
                None => Err(CallError::NotFound(format!("pods \"{name}\" not found"))),
            }
        })
    }

    fn bind<'a>(
        &'a self,
        ns: &'a str,
        pod: &'a str,
        _uid: &'a str,
        node: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            self.binds
                .lock()
                .unwrap()
                .push((format!("{ns}/{pod}"), node.to_string()));
            Ok(())
        })
    }

    fn note_phase<'a>(
        &'a self,
        ns: &'a str,
        pod: &'a str,
        phase: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            self.notes
                .lock()
                .unwrap()
                .push((format!("{ns}/{pod}"), phase.to_string()));
            Ok(())
        })
    }

    fn event<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async { Ok(()) })
    }
}

struct Server {
    addr: String,
    hook: Arc<Hook>,
    data: Arc<FakeData>,
    cluster: Arc<FakeCluster>,
}

async fn start(max_body: usize) -> Server {
    let data = Arc::new(FakeData::default());
    let cluster = Arc::new(FakeCluster::default());
    let hook = Hook::new(HookConfig::default(), data.clone(), cluster.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let router = granary_scheduler_hook::http::router(hook.clone(), max_body);
    tokio::spawn(granary_scheduler_hook::http::serve(
        listener,
        router,
        std::future::pending(),
    ));
    for (name, gpus) in [("a", 4), ("b", 4), ("c", 4), ("d", 2)] {
        hook.state().set_node(name, gpus, &BTreeMap::new());
    }
    Server {
        addr,
        hook,
        data,
        cluster,
    }
}

/// One HTTP/1.1 request; the status and the body parsed as JSON.
async fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, value)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

async fn post(addr: &str, path: &str, body: &Value) -> (u16, Value) {
    request(addr, "POST", path, body.to_string().as_bytes()).await
}

fn pod(name: &str, gpus: u32, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "ml", "uid": format!("uid-{name}"), "annotations": annotations},
        "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}]}
    })
}

fn node_object(name: &str, gpus: u32) -> Value {
    json!({
        "metadata": {"name": name, "uid": format!("node-{name}"), "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.0.0.0/24"},
        "status": {"allocatable": {"nvidia.com/gpu": gpus.to_string(), "cpu": "8"}, "conditions": []}
    })
}

/// Puts `pod` in the (fake) API server only: the hook must fetch it.
fn in_api(s: &Server, pod: &Value) {
    let key = format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap_or("default"),
        pod["metadata"]["name"].as_str().unwrap()
    );
    s.cluster.pods.lock().unwrap().insert(key, pod.clone());
}

/// Puts `pod` in the API server and in the watch's view (as the cluster watch would).
fn seen(s: &Server, pod: &Value) {
    in_api(s, pod);
    let p: granary_scheduler_hook::extender::Pod = serde_json::from_value(pod.clone()).unwrap();
    s.hook.state().set_pod(intent(&p).unwrap());
}

#[tokio::test]
async fn filter_with_node_names_and_with_node_objects() {
    let s = start(1 << 20).await;
    // A bound pod holds 3 of d's... d has 2: a 3-GPU pod fits a, b, c only.
    let p = pod("plain", 3, json!({}));
    in_api(&s, &p);
    let (code, r) = post(
        &s.addr,
        "/filter",
        &json!({"Pod": p, "Nodes": null, "NodeNames": ["a", "b", "c", "d", "unknown"]}),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["NodeNames"], json!(["a", "b", "c", "unknown"]));
    assert_eq!(r["Nodes"], Value::Null);
    assert_eq!(
        r["FailedNodes"]["d"],
        "granary: 2 of 2 nvidia.com/gpu free (0 reserved for gangs), 3 requested"
    );
    assert_eq!(r["Error"], "");

    // nodeCacheCapable false: whole Node objects in, the same objects out.
    let nodes = vec![
        node_object("a", 4),
        node_object("d", 2),
        node_object("x", 8),
    ];
    let (code, r) = post(
        &s.addr,
        "/filter",
        &json!({"Pod": p, "Nodes": {"metadata": {}, "items": nodes}, "NodeNames": null}),
    )
    .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["Nodes"]["items"], json!([nodes[0], nodes[2]]));
    assert_eq!(r["NodeNames"], Value::Null);
    assert!(
        r["FailedNodes"]["d"]
            .as_str()
            .unwrap()
            .contains("3 requested")
    );

    // Null and missing lists are empty lists.
    for body in [
        json!({"Pod": p, "Nodes": null, "NodeNames": null}),
        json!({"Pod": p}),
        json!({"Pod": p, "Nodes": {"items": null}}),
    ] {
        let (code, r) = post(&s.addr, "/filter", &body).await;
        assert_eq!(code, 200, "{body}: {r}");
        assert!(r["FailedNodes"].as_object().unwrap().is_empty());
    }

    // A pod with neither GPUs, dataset nor gang passes everywhere and scores 0.
    let none = json!({"metadata": {"name": "none", "namespace": "ml", "uid": "uid-none"},
        "spec": {"containers": [{}]}});
    in_api(&s, &none);
    let (_, r) = post(
        &s.addr,
        "/filter",
        &json!({"Pod": none, "NodeNames": ["a", "d"]}),
    )
    .await;
    assert_eq!(r["NodeNames"], json!(["a", "d"]));
    let (code, r) = post(
        &s.addr,
        "/prioritize",
        &json!({"Pod": none, "NodeNames": ["a", "d"]}),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        r,
        json!([{"Host": "a", "Score": 0}, {"Host": "d", "Score": 0}])
    );
}

#[tokio::test]
async fn bad_bodies_get_400_naming_the_problem_and_the_server_keeps_serving() {
    let s = start(4096).await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("/filter", b"{not json".to_vec(), "filter: the body is not valid extender JSON"),
        ("/filter", b"".to_vec(), "filter: the body is not valid extender JSON"),
        ("/filter", br#"{"NodeNames":["a"]}"#.to_vec(), "filter: the body has no Pod"),
        ("/filter", br#"{"Pod":{"metadata":{"name":"p"}},"NodeNames":"a"}"#.to_vec(), "filter: the body is not valid extender JSON"),
        ("/filter", br#"{"Pod":{"metadata":{"name":"p"}},"Nodes":{"items":[{"metadata":{}}]}}"#.to_vec(), "filter: Nodes.items[0] has no metadata.name"),
        ("/filter", br#"{"Pod":{"metadata":{"name":"p","annotations":{"granary.io/gang-size":"-1","granary.io/gang":"g"}}}}"#.to_vec(), "filter: annotation granary.io/gang-size:"),
        ("/filter", br#"{"Pod":{"metadata":{"name":"p"},"spec":{"containers":[{"resources":{"limits":{"nvidia.com/gpu":"0.5"}}}]}}}"#.to_vec(), "filter: the pod's nvidia.com/gpu request 0.5 is not a whole number"),
        ("/prioritize", b"[1,2]".to_vec(), "prioritize: the body is not valid extender JSON"),
        ("/prioritize", br#"{"Pod":{"metadata":{"uid":"u"}}}"#.to_vec(), "prioritize: the Pod has no metadata.name"),
        ("/bind", br#"{"PodName":"p"}"#.to_vec(), "bind: the body is not valid ExtenderBindingArgs"),
        ("/bind", br#"{"PodName":"","PodNamespace":"ml","PodUID":"","Node":"a"}"#.to_vec(), "bind: PodName and Node must not be empty"),
        ("/preempt", b"null".to_vec(), "preempt: the body is not a JSON object"),
        ("/filter", vec![b' '; 5000], "filter: the body (5000 bytes) is larger than the limit of 4096 bytes"),
    ];
    for (path, body, says) in cases {
        let (code, r) = request(&s.addr, "POST", path, &body).await;
        assert_eq!(
            code,
            400,
            "{path} {}: {r}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        let err = r["Error"].as_str().unwrap_or_default();
        assert!(
            err.starts_with(says),
            "{path}: {err:?} should start with {says:?}"
        );
    }
    // Still serving.
    in_api(&s, &pod("p", 1, json!({})));
    let (code, r) = post(
        &s.addr,
        "/filter",
        &json!({"Pod": pod("p", 1, json!({})), "NodeNames": ["a"]}),
    )
    .await;
    assert_eq!((code, r["NodeNames"].clone()), (200, json!(["a"])));
    let (code, _) = request(&s.addr, "GET", "/healthz", b"").await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn a_gang_waits_for_members_then_data_then_binds_on_its_planned_nodes() {
    let s = start(1 << 20).await;
    // The dataset is already partly on b and c.
    s.data
        .per_node
        .lock()
        .unwrap()
        .extend([("b".to_string(), (60, 100)), ("c".to_string(), (40, 100))]);
    *s.data.nodes.lock().unwrap() = vec!["b".into(), "c".into()];
    let ann =
        json!({"granary.io/gang": "g", "granary.io/gang-size": "4", "granary.io/dataset": "ds"});
    let members: Vec<Value> = (0..4)
        .map(|i| pod(&format!("m{i}"), 2, ann.clone()))
        .collect();
    let names = json!(["a", "b", "c", "d"]);

    seen(&s, &members[0]);
    s.hook.tick().await;
    let (_, r) = post(
        &s.addr,
        "/filter",
        &json!({"Pod": members[0], "NodeNames": names}),
    )
    .await;
    assert_eq!(r["NodeNames"], json!([]));
    assert_eq!(r["FailedNodes"]["a"], "gang g: waiting for members (1/4)");

    for m in &members[1..] {
        seen(&s, m);
    }
    // Planned only once the scheduler has asked about every member.
    s.hook.tick().await;
    assert!(s.data.loads.lock().unwrap().is_empty());
    for m in &members[1..] {
        post(&s.addr, "/filter", &json!({"Pod": m, "NodeNames": names})).await;
    }
    s.hook.tick().await;
    // Planned on the two nodes holding the most bytes; loaded onto exactly them.
    assert_eq!(
        *s.data.loads.lock().unwrap(),
        vec![vec!["b".to_string(), "c".to_string()]]
    );
    s.hook.tick().await;
    let (_, r) = post(
        &s.addr,
        "/filter",
        &json!({"Pod": members[1], "NodeNames": names}),
    )
    .await;
    assert_eq!(r["NodeNames"], json!([]));
    assert_eq!(r["FailedNodes"]["d"], "gang g: data 50% ready on b,c");
    // Binding before the data is ready is refused.
    let (code, r) = post(
        &s.addr,
        "/bind",
        &json!({"PodName": "m1", "PodNamespace": "ml", "PodUID": "uid-m1", "Node": "b"}),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(r["Error"], "gang g: data 50% ready on b,c");
    assert!(s.cluster.binds.lock().unwrap().is_empty());
    // The reserved GPUs are kept from pods outside the gang.
    in_api(&s, &pod("outsider", 1, json!({})));
    let (_, r) = post(
        &s.addr,
        "/filter",
        &json!({"Pod": pod("outsider", 1, json!({})), "NodeNames": names}),
    )
    .await;
    assert_eq!(r["NodeNames"], json!(["a", "d"]));
    assert!(
        r["FailedNodes"]["b"]
            .as_str()
            .unwrap()
            .contains("(4 reserved for gangs)")
    );
    let (_, g) = request(&s.addr, "GET", "/gangs", b"").await;
    assert_eq!(g["gangs"][0]["state"], "warming");
    assert_eq!(g["gangs"][0]["nodes"], json!(["b", "c"]));
    assert!(
        s.cluster
            .notes
            .lock()
            .unwrap()
            .iter()
            .any(|(p, phase)| p == "ml/m3" && phase == "warming")
    );

    // Data ready: each member is filtered to its planned node and bound there.
    for v in s.data.per_node.lock().unwrap().values_mut() {
        v.0 = v.1;
    }
    s.hook.tick().await;
    let (_, g) = request(&s.addr, "GET", "/gangs", b"").await;
    assert_eq!(g["gangs"][0]["state"], "ready");
    let mut placed = BTreeMap::new();
    for (i, m) in members.iter().enumerate() {
        let (_, r) = post(&s.addr, "/filter", &json!({"Pod": m, "NodeNames": names})).await;
        let only = r["NodeNames"].as_array().unwrap();
        assert_eq!(only.len(), 1, "{r}");
        let node = only[0].as_str().unwrap().to_string();
        let (_, scores) = post(
            &s.addr,
            "/prioritize",
            &json!({"Pod": m, "NodeNames": names}),
        )
        .await;
        let best = scores
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["Score"] == 10)
            .unwrap();
        assert_eq!(best["Host"], node.as_str());
        if i == 0 {
            let wrong = if node == "b" { "c" } else { "b" };
            let (_, r) = post(
                &s.addr,
                "/bind",
                &json!({"PodName": "m0", "PodNamespace": "ml", "PodUID": "uid-m0", "Node": wrong}),
            )
            .await;
            assert!(
                r["Error"].as_str().unwrap().contains("member planned on"),
                "{r}"
            );
        }
        let (_, r) = post(
            &s.addr,
            "/bind",
            &json!({"PodName": format!("m{i}"), "PodNamespace": "ml", "PodUID": format!("uid-m{i}"), "Node": node}),
        )
        .await;
        assert_eq!(r["Error"], "");
        *placed.entry(node).or_insert(0) += 1;
    }
    assert_eq!(
        placed,
        BTreeMap::from([("b".to_string(), 2), ("c".to_string(), 2)])
    );
    assert_eq!(s.cluster.binds.lock().unwrap().len(), 4);
    s.hook.tick().await;
    let (_, g) = request(&s.addr, "GET", "/gangs", b"").await;
    assert_eq!(g["gangs"][0]["state"], "bound");
    assert_eq!(g["gangs"][0]["bound"], 4);
    assert!(g["gangs"][0]["waiting_secs"].as_f64().is_some());
}

#[tokio::test]
async fn a_gang_that_cannot_fit_is_refused_whole_with_its_name() {
    let s = start(1 << 20).await;
    let ann = json!({"granary.io/gang": "big", "granary.io/gang-size": "5"});
    let members: Vec<Value> = (0..5)
        .map(|i| pod(&format!("b{i}"), 4, ann.clone()))
        .collect();
    for m in &members {
        seen(&s, m);
        post(
            &s.addr,
            "/filter",
            &json!({"Pod": m, "NodeNames": ["a", "b", "c", "d"]}),
        )
        .await;
    }
    s.hook.tick().await;
    for m in &members {
        let (_, r) = post(
            &s.addr,
            "/filter",
            &json!({"Pod": m, "NodeNames": ["a", "b", "c", "d"]}),
        )
        .await;
        assert_eq!(r["NodeNames"], json!([]));
        assert_eq!(
            r["FailedNodes"]["a"],
            "gang big: does not fit: 5 pods need 20 GPUs (4 on the largest pod); 14 GPUs are free on 4 nodes, at most 4 on one node"
        );
        let (_, r) = post(
            &s.addr,
            "/bind",
            &json!({"PodName": m["metadata"]["name"], "PodNamespace": "ml", "PodUID": m["metadata"]["uid"], "Node": "a"}),
        )
        .await;
        assert!(
            r["Error"]
                .as_str()
                .unwrap()
                .starts_with("gang big: does not fit")
        );
    }
    assert!(s.cluster.binds.lock().unwrap().is_empty());
}

#[tokio::test]
async fn plain_dataset_pods_score_by_bytes_and_preempt_passes_through() {
    let s = start(1 << 20).await;
    s.data.per_node.lock().unwrap().extend([
        ("b".to_string(), (800, 1000)),
        ("c".to_string(), (200, 1000)),
    ]);
    *s.data.nodes.lock().unwrap() = vec!["b".into(), "c".into()];
    let p = pod("reader", 1, json!({"granary.io/dataset": "ds"}));
    in_api(&s, &p);
    let (code, r) = post(
        &s.addr,
        "/prioritize",
        &json!({"Pod": p, "Nodes": {"items": [node_object("a", 4), node_object("b", 4), node_object("c", 4)]}}),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        r,
        json!([{"Host": "a", "Score": 0}, {"Host": "b", "Score": 10}, {"Host": "c", "Score": 3}])
    );
    let victims = json!({"Pod": p, "NodeNameToVictims": {"a": {"Pods": [{"metadata": {"uid": "v1"}}], "NumPDBViolations": 1}}});
    let (code, r) = post(&s.addr, "/preempt", &victims).await;
    assert_eq!(code, 200);
    assert_eq!(
        r,
        json!({"NodeNameToMetaVictims": {"a": {"Pods": [{"UID": "v1"}], "NumPDBViolations": 1}}})
    );
    let meta = json!({"Pod": p, "NodeNameToMetaVictims": {"c": {"Pods": [{"UID": "v2"}], "NumPDBViolations": 0}}});
    let (_, r) = post(&s.addr, "/preempt", &meta).await;
    assert_eq!(r["NodeNameToMetaVictims"], meta["NodeNameToMetaVictims"]);
    // A pod the API server does not have cannot be bound by the hook.
    let (_, r) = post(
        &s.addr,
        "/bind",
        &json!({"PodName": "ghost", "PodNamespace": "ml", "PodUID": "u", "Node": "a"}),
    )
    .await;
    assert_eq!(
        r["Error"],
        "pod ml/ghost does not exist in the API server; refused"
    );
}

#[tokio::test]
async fn forged_pods_are_refused_and_change_nothing() {
    let s = start(1 << 20).await;
    let names = json!(["a", "b", "c", "d"]);
    let gang_ann = json!({"granary.io/gang": "evil", "granary.io/gang-size": "2"});
    // 1. Pods the API server does not have: refused; no pod, no gang, no reservation.
    for name in ["f0", "f1"] {
        let (code, r) = post(
            &s.addr,
            "/filter",
            &json!({"Pod": pod(name, 4, gang_ann.clone()), "NodeNames": names}),
        )
        .await;
        assert_eq!(code, 400, "{r}");
        assert_eq!(
            r["Error"],
            format!("filter: pod ml/{name} does not exist in the API server; refused")
        );
        assert!(s.hook.state().pod(&format!("ml/{name}")).is_none());
    }
    s.hook.tick().await;
    let (_, g) = request(&s.addr, "GET", "/gangs", b"").await;
    assert_eq!(g["gangs"], json!([]), "no gang from forged pods");

    // 2. A real pod, claimed with another uid or another request: refused, the hook keeps the
    //    API server's view.
    let real = pod("real", 1, json!({}));
    seen(&s, &real);
    let mut other_uid = real.clone();
    other_uid["metadata"]["uid"] = json!("forged-uid");
    let (code, r) = post(
        &s.addr,
        "/filter",
        &json!({"Pod": other_uid, "NodeNames": names}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        r["Error"],
        "filter: pod ml/real has uid uid-real in the API server, not forged-uid; refused"
    );
    let as_gang = pod("real", 4, gang_ann.clone());
    let (code, r) = post(
        &s.addr,
        "/filter",
        &json!({"Pod": as_gang, "NodeNames": names}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        r["Error"],
        "filter: pod ml/real: the request's nvidia.com/gpu request differs from the API server's; refused"
    );
    let mut with_gang = real.clone();
    with_gang["metadata"]["annotations"] = gang_ann.clone();
    let (_, r) = post(
        &s.addr,
        "/prioritize",
        &json!({"Pod": with_gang, "NodeNames": names}),
    )
    .await;
    assert_eq!(
        r["Error"],
        "prioritize: pod ml/real: the request's gang differs from the API server's; refused"
    );
    let kept = s.hook.state().pod("ml/real").unwrap().clone();
    assert_eq!((kept.gpus, kept.gang.is_none()), (1, true));
    let mut no_uid = real.clone();
    no_uid["metadata"].as_object_mut().unwrap().remove("uid");
    let (code, r) = post(
        &s.addr,
        "/filter",
        &json!({"Pod": no_uid, "NodeNames": names}),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(r["Error"], "filter: pod ml/real: the request gives no uid");

    // 3. Binding a pending kube-system pod nothing was reserved for: refused, not bound; with
    //    another uid: refused; to a node the scheduler never filtered it for: refused.
    let system = json!({"metadata": {"name": "coredns-x", "namespace": "kube-system",
        "uid": "uid-dns"}, "spec": {"containers": [{"name": "c"}]}});
    in_api(&s, &system);
    for (uid, says) in [
        (
            "uid-dns",
            "pod kube-system/coredns-x was not filtered by this hook in the last 5m: nothing reserved for it",
        ),
        (
            "other",
            "pod kube-system/coredns-x has uid uid-dns in the API server, not other; refused",
        ),
    ] {
        let (code, r) = post(
            &s.addr,
            "/bind",
            &json!({"PodName": "coredns-x", "PodNamespace": "kube-system", "PodUID": uid, "Node": "a"}),
        )
        .await;
        assert_eq!((code, r["Error"].as_str().unwrap()), (200, says));
    }
    // A real gang member may bind only to its planned node once its gang is ready.
    let m = pod(
        "member",
        2,
        json!({"granary.io/gang": "g", "granary.io/gang-size": "2"}),
    );
    seen(&s, &m);
    let (_, r) = post(
        &s.addr,
        "/bind",
        &json!({"PodName": "member", "PodNamespace": "ml", "PodUID": "uid-member", "Node": "a"}),
    )
    .await;
    assert_eq!(r["Error"], "gang g: not planned yet");
    assert!(s.cluster.binds.lock().unwrap().is_empty());
}

/// A TLS client config trusting `ca`, presenting `identity` (`(cert, key)` PEM files) if given.
fn client_config(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// GET /healthz over TLS with `config`: the HTTP status, or the error that ended the attempt.
async fn tls_healthz(addr: &str, config: rustls::ClientConfig) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    // TLS 1.3: a refused client certificate shows up at the first read.
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))
}

#[tokio::test]
async fn https_accepts_only_clients_the_ca_signed() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let names: Vec<String> = ["scheduler", "kube-scheduler"].map(String::from).into();
    granary_net::tls::generate_dev_certs(&certs, &names).unwrap();
    // Another CA's client: a certificate, but not one the cluster CA signed.
    let other = dir.path().join("other");
    granary_net::tls::generate_dev_certs(&other, &["intruder".to_string()]).unwrap();
    let identity = granary_net::tls::TlsIdentity::load(&granary_net::tls::TlsFiles::in_dir(
        &certs,
        "scheduler",
    ))
    .unwrap();
    let cluster = Arc::new(FakeCluster::default());
    let hook = Hook::new(
        HookConfig::default(),
        Arc::new(FakeData::default()),
        cluster.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(granary_scheduler_hook::http::serve_tls(
        listener,
        identity.server_config().unwrap(),
        granary_scheduler_hook::http::router(hook, 1 << 20),
        std::future::pending(),
    ));
    let ca = certs.join("ca.pem");
    let ok = client_config(
        &ca,
        Some((
            &certs.join("kube-scheduler.pem"),
            &certs.join("kube-scheduler.key"),
        )),
    );
    assert_eq!(tls_healthz(&addr, ok.clone()).await, Ok(200));

    let e = tls_healthz(&addr, client_config(&ca, None))
        .await
        .unwrap_err();
    assert!(e.contains("CertificateRequired"), "{e}");
    let e = tls_healthz(
        &addr,
        client_config(
            &ca,
            Some((&other.join("intruder.pem"), &other.join("intruder.key"))),
        ),
    )
    .await
    .unwrap_err();
    // Same CA name, another key: the signature check fails (BadSignature -> DecryptError).
    assert!(e.contains("alert"), "{e}");

    // Plain HTTP to the TLS port: no HTTP answer, and no forged bind reaches the hook.
    let mut plain = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = br#"{"PodName":"coredns-x","PodNamespace":"kube-system","PodUID":"u","Node":"a"}"#;
    let head = format!(
        "POST /bind HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = plain.write_all(head.as_bytes()).await;
    let _ = plain.write_all(body).await;
    let mut out = Vec::new();
    let _ = plain.read_to_end(&mut out).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("HTTP/1.1"),
        "plain HTTP got an HTTP answer: {:?}",
        String::from_utf8_lossy(&out)
    );
    assert!(cluster.binds.lock().unwrap().is_empty());
    // Still serving authenticated clients.
    assert_eq!(tls_healthz(&addr, ok).await, Ok(200));
}
