//! The extender's HTTP API with fakes for the cache cluster and the Kubernetes API: the JSON of
//! every verb (nodeCacheCapable both ways, null lists), bad bodies answered with 400 while the
//! server keeps serving, and a gang going from waiting to bound through filter and bind.

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
    binds: Mutex<Vec<(String, String)>>,
    notes: Mutex<Vec<(String, String)>>,
}

impl ClusterApi for FakeCluster {
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

/// Makes the watch's view hold `pod` (as the cluster watch would).
fn seen(hook: &Hook, pod: &Value) {
    let p: granary_scheduler_hook::extender::Pod = serde_json::from_value(pod.clone()).unwrap();
    hook.state().set_pod(intent(&p).unwrap());
}

#[tokio::test]
async fn filter_with_node_names_and_with_node_objects() {
    let s = start(1 << 20).await;
    // A bound pod holds 3 of d's... d has 2: a 3-GPU pod fits a, b, c only.
    let p = pod("plain", 3, json!({}));
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
    let none =
        json!({"metadata": {"name": "none", "namespace": "ml"}, "spec": {"containers": [{}]}});
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

    seen(&s.hook, &members[0]);
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
        seen(&s.hook, m);
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
        seen(&s.hook, m);
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
            &json!({"PodName": m["metadata"]["name"], "PodNamespace": "ml", "PodUID": "", "Node": "a"}),
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
    // A pod the hook never saw cannot be bound by it.
    let (_, r) = post(
        &s.addr,
        "/bind",
        &json!({"PodName": "ghost", "PodNamespace": "ml", "PodUID": "", "Node": "a"}),
    )
    .await;
    assert_eq!(r["Error"], "pod ml/ghost not seen by the hook yet");
}
