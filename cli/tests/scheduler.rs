//! The scheduler hook against a real kube-scheduler 1.20 and kube-apiserver (built by
//! scripts/services/kube.sh), three cache workers over etcd and an S3 server: gangs bound whole
//! only when their data is ready on their nodes, a gang too big never bound, two gangs competing
//! for the same GPUs never partial, a plain dataset pod placed where its bytes are, pods with
//! neither passing through, and bad extender requests answered with 400 while the hook keeps
//! serving the scheduler.

mod support;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::backends::{S3Target, unique};
use support::cluster::{Worker, wait_for_members};
use support::data::Tree;
use support::own::OwnService;
use support::process::{Finished, granary, granary_bin, interrupt_and_reap, run_with_timeout};
use support::{free_port, http_get, wait_until};

const ADMIN: &str = "admin-token-0123456789";
const GIB: u64 = 1 << 30;

/// A child process killed (SIGINT, then SIGKILL) when the test ends, whatever happens.
struct Process {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Process {
    fn spawn(mut cmd: Command, log: &Path) -> Process {
        let file = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Process {
            child: Some(child),
            log: log.into(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            interrupt_and_reap(c, Duration::from_secs(10));
        }
    }
}

fn ok(out: Finished, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        out.stderr,
        out.stdout
    );
    out.stdout
}

/// The Kubernetes API, called from this synchronous test.
struct Kube {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
}

impl Kube {
    fn new(kubeconfig: &str) -> Kube {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = rt.block_on(async {
            let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap();
            kube::Client::try_from(config).unwrap()
        });
        Kube { rt, client }
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), "default")
    }

    /// A Node offering `gpus` nvidia.com/gpu, schedulable (no not-ready taint).
    fn add_node(&self, name: &str, gpus: u32) {
        let nodes = self.nodes();
        self.rt.block_on(async {
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                    "topology.kubernetes.io/zone": "zone-a"}},
            }))
            .unwrap();
            nodes.create(&PostParams::default(), &node).await.unwrap();
            let resources = json!({"cpu": "16", "memory": "64Gi", "pods": "110",
                "nvidia.com/gpu": gpus.to_string()});
            let status = json!({"status": {"capacity": resources, "allocatable": resources,
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "test node", "lastHeartbeatTime": null, "lastTransitionTime": null}]}});
            nodes
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap();
            nodes
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"spec": {"taints": null}})),
                )
                .await
                .unwrap();
        });
    }

    fn add_pod(&self, name: &str, phase: &str, gpus: u32, annotations: Value) {
        let mut resources = json!({});
        if gpus > 0 {
            resources = json!({"limits": {"nvidia.com/gpu": gpus.to_string()}});
        }
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"phase": phase}, "annotations": annotations},
            "spec": {"containers": [{"name": "main", "image": "registry.invalid/pause:3",
                "resources": resources}], "terminationGracePeriodSeconds": 0}
        }))
        .unwrap();
        self.rt
            .block_on(self.pods().create(&PostParams::default(), &pod))
            .unwrap();
    }

    fn list(&self, phase: &str) -> Vec<Pod> {
        self.rt
            .block_on(
                self.pods()
                    .list(&ListParams::default().labels(&format!("phase={phase}"))),
            )
            .unwrap()
            .items
    }

    /// Pod name -> node, for the pods of `phase` that are bound.
    fn bound(&self, phase: &str) -> BTreeMap<String, String> {
        self.list(phase)
            .into_iter()
            .filter_map(|p| {
                let node = p.spec.as_ref()?.node_name.clone()?;
                Some((p.metadata.name.clone()?, node))
            })
            .collect()
    }

    /// Why the scheduler could not place each pod of `phase` (PodScheduled=False messages).
    fn unschedulable_messages(&self, phase: &str) -> BTreeMap<String, String> {
        self.list(phase)
            .into_iter()
            .filter_map(|p| {
                let c = p
                    .status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .iter()
                    .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
                    .clone();
                Some((p.metadata.name.clone()?, c.message.unwrap_or_default()))
            })
            .collect()
    }

    fn delete_phase(&self, phase: &str) {
        let pods = self.pods();
        self.rt.block_on(async {
            for p in pods
                .list(&ListParams::default().labels(&format!("phase={phase}")))
                .await
                .unwrap()
                .items
            {
                let _ = pods
                    .delete(
                        p.metadata.name.as_deref().unwrap(),
                        &DeleteParams::default().grace_period(0),
                    )
                    .await;
            }
        });
        wait_until(
            &format!("pods of {phase} to go"),
            Duration::from_secs(30),
            || self.list(phase).is_empty(),
        );
    }
}

/// `granary dataset status NAME --json` through w1.
fn dataset_status(api: &str, name: &str) -> Value {
    let out = ok(
        run_with_timeout(
            granary(
                &[
                    "dataset", "--server", api, "--token", ADMIN, "status", name, "--json",
                ],
                &[],
            ),
            Duration::from_secs(30),
        ),
        "dataset status",
    );
    serde_json::from_str(&out).unwrap()
}

/// The nodes of `status` whose share is complete (present and verified).
fn ready_nodes(status: &Value) -> BTreeSet<String> {
    status["node_progress"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["state"] == "ready" && p["bytes_ready"] == p["bytes_total"])
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect()
}

/// One raw HTTP request to the hook: status code and body.
/// `declared` overrides the Content-Length sent (the body itself is then not sent).
fn raw_request(addr: &str, path: &str, body: &[u8], declared: Option<usize>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        declared.unwrap_or(body.len())
    )
    .unwrap();
    if declared.is_none() {
        s.write_all(body).unwrap();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, rest) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, rest.to_string())
}

fn gang_report(hook: &str, name: &str) -> Value {
    let v: Value = serde_json::from_str(&http_get(hook, "/gangs")).unwrap();
    v["gangs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

fn gang(name: &str, size: usize, dataset: Option<&str>) -> Value {
    let mut a = json!({"granary.io/gang": name, "granary.io/gang-size": size.to_string()});
    if let Some(d) = dataset {
        a["granary.io/dataset"] = json!(d);
    }
    a
}

#[test]
fn gangs_bind_whole_near_ready_data_through_a_real_kube_scheduler() {
    let kube_svc = OwnService::start("kube");
    let kubeconfig = kube_svc.get("GRANARY_TEST_KUBECONFIG");
    let kube_scheduler = kube_svc.get("GRANARY_TEST_KUBE_SCHEDULER");
    let etcd = OwnService::start("etcd");
    let etcd_url = etcd.get("GRANARY_TEST_ETCD");
    let s3 = S3Target::moto();
    let work = tempfile::tempdir().unwrap();
    let tls = work.path().join("tls");
    ok(
        run_with_timeout(
            granary(
                &[
                    "certs",
                    "--out",
                    tls.to_str().unwrap(),
                    "w1",
                    "w2",
                    "w3",
                    "client",
                ],
                &[],
            ),
            Duration::from_secs(20),
        ),
        "certs",
    );

    // The dataset: 16 files of 4 MiB (one block each); the backend allows 3 GETs/s per worker,
    // so a node's share takes seconds to load and the gating can be watched.
    let prefix = unique("sched");
    let mut tree = Tree::new();
    for i in 0..16 {
        tree.insert(format!("train/part-{i:02}.bin"), 4 << 20);
    }
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(s3.upload(&prefix, &tree));
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let _workers: Vec<Worker> = (1..=3)
        .map(|i| {
            let id = format!("w{i}");
            let config = work.path().join(format!("{id}.toml"));
            std::fs::write(
                &config,
                format!(
                    "node_id = \"{id}\"\nlisten = \"127.0.0.1:{port}\"\n\
                     [cache]\ndir = \"{dir}\"\nmemory = \"64MiB\"\ndisk = \"0\"\n\
                     [s3]\nendpoint = \"{ep}\"\naccess_key_id = \"{ak}\"\nsecret_access_key = \"{sk}\"\n\
                     [backend]\nmax_requests_per_second = 3\n\
                     [cluster]\netcd = [\"{etcd_url}\"]\nlease_ttl = \"4s\"\n[tls]\ndir = \"{tls}\"\n\
                     [datasets]\ncapacity = \"{cap}\"\nadmin_token = \"{ADMIN}\"\n\
                     [[mount]]\npath = \"/data\"\nsource = \"{src}\"\n",
                    port = ports[i - 1],
                    dir = work.path().join(format!("cache-{id}")).display(),
                    ep = s3.endpoint,
                    ak = s3.access_key,
                    sk = s3.secret_key,
                    tls = tls.display(),
                    cap = GIB,
                    src = s3.uri(&prefix),
                ),
            )
            .unwrap();
            Worker::start(&id, &config, &format!("127.0.0.1:{}", free_port()))
        })
        .collect();
    wait_for_members(&etcd_url, 3);
    let api = format!("127.0.0.1:{}", ports[0]);
    let dataset = |args: &[&str]| {
        let mut all = vec!["dataset", "--server", &api, "--token", ADMIN];
        all.extend_from_slice(args);
        ok(
            run_with_timeout(granary(&all, &[]), Duration::from_secs(300)),
            &format!("dataset {args:?}"),
        )
    };
    dataset(&["pin", "train", "--path", "/data/train", "--nodes", "w2,w3"]);
    dataset(&["load", "train", "--wait", "--timeout", "240s"]);
    assert_eq!(
        ready_nodes(&dataset_status(&api, "train")),
        BTreeSet::from(["w2".to_string(), "w3".to_string()])
    );

    // Four GPU nodes named like the cache workers (w4 has no worker).
    let k = Kube::new(&kubeconfig);
    for i in 1..=4 {
        k.add_node(&format!("w{i}"), 4);
    }

    // The hook, then the real scheduler configured with it.
    let hook_addr = format!("127.0.0.1:{}", free_port());
    let hook_metrics = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(granary_bin());
    cmd.args([
        "scheduler",
        "--listen",
        &hook_addr,
        "--kubeconfig",
        &kubeconfig,
        "--cache-server",
        &api,
        "--token",
        ADMIN,
        "--reservation-ttl",
        "60s",
        "--metrics-addr",
        &hook_metrics,
    ])
    .env("GRANARY_LOG", "info,kube=warn");
    let hook = Process::spawn(cmd, &work.path().join("hook.log"));
    wait_until("the hook to serve", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&hook_addr).is_ok()
    });
    let (healthz, metrics_port) = (free_port(), free_port());
    let sched_config = work.path().join("scheduler.yaml");
    std::fs::write(
        &sched_config,
        format!(
            "apiVersion: kubescheduler.config.k8s.io/v1beta1\nkind: KubeSchedulerConfiguration\n\
             clientConnection:\n  kubeconfig: {kubeconfig}\nleaderElection:\n  leaderElect: false\n\
             healthzBindAddress: 127.0.0.1:{healthz}\nmetricsBindAddress: 127.0.0.1:{metrics_port}\n\
             extenders:\n- urlPrefix: http://{hook_addr}\n  filterVerb: filter\n  prioritizeVerb: prioritize\n\
             \x20 bindVerb: bind\n  weight: 5\n  nodeCacheCapable: true\n  httpTimeout: 10s\n  ignorable: false\n\
             \x20 managedResources:\n  - name: nvidia.com/gpu\n    ignoredByScheduler: false\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(&kube_scheduler);
    cmd.args([
        "--config",
        sched_config.to_str().unwrap(),
        "--port=0",
        "--secure-port=0",
        "-v=2",
    ]);
    let scheduler = Process::spawn(cmd, &work.path().join("kube-scheduler.log"));
    wait_until(
        "kube-scheduler to be healthy",
        Duration::from_secs(60),
        || std::net::TcpStream::connect(("127.0.0.1", healthz)).is_ok(),
    );
    let context = || {
        format!(
            "\n--- hook log ---\n{}\n--- kube-scheduler log (tail) ---\n{}",
            hook.log(),
            scheduler
                .log()
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    };

    // 1. A plain pod with the dataset lands on a node holding its bytes; pods with neither a
    //    dataset nor a gang pass through (one with a GPU, bound by the hook; one without).
    for i in 0..3 {
        k.add_pod(
            &format!("reader-{i}"),
            "plain",
            1,
            json!({"granary.io/dataset": "train"}),
        );
    }
    k.add_pod("gpu-only", "plain", 1, json!({}));
    k.add_pod("cpu-only", "plain", 0, json!({}));
    let started = Instant::now();
    while k.bound("plain").len() < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "plain pods not bound: {:?}{}",
            k.bound("plain"),
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let plain = k.bound("plain");
    for i in 0..3 {
        let node = &plain[&format!("reader-{i}")];
        assert!(
            ["w2", "w3"].contains(&node.as_str()),
            "dataset pod reader-{i} went to {node} (its bytes are on w2, w3)"
        );
    }
    // The scores behind it: bytes of the dataset on each node, relative to the most.
    let probe = json!({"Pod": {"metadata": {"name": "probe", "namespace": "default",
        "annotations": {"granary.io/dataset": "train"}}},
        "NodeNames": ["w1", "w2", "w3", "w4"]});
    let (code, text) = raw_request(
        &hook_addr,
        "/prioritize",
        probe.to_string().as_bytes(),
        None,
    );
    assert_eq!(code, 200, "{text}");
    let scores: Vec<Value> = serde_json::from_str(&text).unwrap();
    let score = |n: &str| {
        scores.iter().find(|h| h["Host"] == n).unwrap()["Score"]
            .as_i64()
            .unwrap()
    };
    let status = dataset_status(&api, "train");
    let held = |n: &str| {
        status["node_progress"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"] == n)
            .map_or(0, |p| p["bytes_ready"].as_u64().unwrap())
    };
    let most = held("w2").max(held("w3"));
    for n in ["w1", "w2", "w3", "w4"] {
        assert_eq!(
            score(n) as u64,
            (held(n) * 10).div_ceil(most),
            "{n}: scores {text}, status {status}"
        );
    }
    eprintln!("plain pods bound: {plain:?}; dataset scores {text}");
    k.delete_phase("plain");

    // 2. Move the whole dataset onto w3, then a gang of 4 x 2 GPUs: planned on w3 (all the
    //    bytes) plus one node; no member binds before the data is ready on both; then all bind.
    dataset(&[
        "load",
        "train",
        "--nodes",
        "w3",
        "--wait",
        "--timeout",
        "240s",
    ]);
    assert_eq!(
        ready_nodes(&dataset_status(&api, "train")),
        BTreeSet::from(["w3".to_string()])
    );
    for i in 0..4 {
        k.add_pod(&format!("g4-{i}"), "g4", 2, gang("g4", 4, Some("train")));
    }
    let started = Instant::now();
    let mut saw_gated = false;
    let mut saw_reason = false;
    loop {
        // Pods first, then the data: data never goes back, so bound pods must see it ready.
        let bound = k.bound("g4");
        let status = dataset_status(&api, "train");
        let ready = ready_nodes(&status);
        let nodes: BTreeSet<String> = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        if !bound.is_empty() {
            let on: BTreeSet<String> = bound.values().cloned().collect();
            assert!(
                on.is_subset(&ready) && nodes.is_subset(&ready),
                "bound on {on:?} while the data is ready only on {ready:?} of {nodes:?}{}",
                context()
            );
        } else if nodes.len() == 2 && ready != nodes {
            saw_gated = true;
        }
        saw_reason |= k
            .unschedulable_messages("g4")
            .values()
            .any(|m| m.contains("gang g4: data"));
        if bound.len() == 4 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "gang g4 not bound in 120 s: {bound:?}, data {status}, gang {}{}",
            gang_report(&hook_addr, "g4"),
            context()
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    assert!(
        saw_gated,
        "the gang's data was never seen loading while its pods waited"
    );
    assert!(
        saw_reason,
        "no member's scheduling failure said the data was not ready"
    );
    let bound = k.bound("g4");
    let on: BTreeSet<String> = bound.values().cloned().collect();
    eprintln!(
        "gang g4 bound after {:.1} s: {bound:?}; gang {}",
        started.elapsed().as_secs_f64(),
        gang_report(&hook_addr, "g4")
    );
    assert_eq!(on.len(), 2, "{bound:?}");
    assert!(on.contains("w3"), "the node holding the data: {bound:?}");
    let status = dataset_status(&api, "train");
    assert_eq!(ready_nodes(&status), on, "{status}");
    assert_eq!(status["percent"], 100.0);
    let report = gang_report(&hook_addr, "g4");
    assert_eq!(report["state"], "bound", "{report}");
    k.delete_phase("g4");

    // 3. A gang of 5 x 4 GPUs on 4 nodes of 4: never bound, each pod's failure names the gang.
    for i in 0..5 {
        k.add_pod(&format!("big-{i}"), "big", 4, gang("big", 5, None));
    }
    wait_until(
        "every member of gang big to say why it waits",
        Duration::from_secs(60),
        || {
            let m = k.unschedulable_messages("big");
            m.len() == 5 && m.values().all(|m| m.contains("gang big: does not fit"))
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(k.bound("big").is_empty(), "{:?}", k.bound("big"));
    eprintln!("gang big: {:?}", k.unschedulable_messages("big"));
    let report = gang_report(&hook_addr, "big");
    assert_eq!(report["state"], "unschedulable", "{report}");
    k.delete_phase("big");

    // 4. Bad extender requests: 400 naming the problem; the hook keeps serving (step 5).
    for (path, body, says) in [
        ("/filter", &b"{\"Pod\": "[..], "not valid extender JSON"),
        (
            "/prioritize",
            &b"{\"NodeNames\":[\"w1\"]}"[..],
            "has no Pod",
        ),
        ("/bind", &b"{}"[..], "not valid ExtenderBindingArgs"),
    ] {
        let (code, text) = raw_request(&hook_addr, path, body, None);
        assert_eq!(code, 400, "{path}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["Error"].as_str().unwrap().contains(says),
            "{path}: {text}"
        );
    }
    let (code, text) = raw_request(&hook_addr, "/filter", b"", Some(40 << 20));
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("larger than the limit"), "{text}");

    // 5. Two gangs of 3 x 4 GPUs compete for 16 GPUs: one binds whole, the other waits whole;
    //    when the first goes, the second binds whole.
    for i in 0..3 {
        k.add_pod(&format!("red-{i}"), "red", 4, gang("red", 3, None));
        k.add_pod(&format!("blue-{i}"), "blue", 4, gang("blue", 3, None));
    }
    let started = Instant::now();
    let (winner, loser) = loop {
        let (r, b) = (k.bound("red").len(), k.bound("blue").len());
        assert!(
            r == 0 || b == 0,
            "both gangs bound members: red {r}, blue {b}{}",
            context()
        );
        if r == 3 {
            break ("red", "blue");
        }
        if b == 3 {
            break ("blue", "red");
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no gang bound whole: red {r}, blue {b}{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(150));
    };
    let won: BTreeSet<String> = k.bound(winner).values().cloned().collect();
    assert_eq!(won.len(), 3, "one member per node: {won:?}");
    for _ in 0..20 {
        assert!(k.bound(loser).is_empty(), "gang {loser} bound partially");
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("gang {winner} bound whole on {won:?}; gang {loser} waits whole");
    let m = k.unschedulable_messages(loser);
    assert!(
        m.len() == 3 && m.values().all(|m| m.contains(&format!("gang {loser}"))),
        "{m:?}"
    );
    k.delete_phase(winner);
    wait_until(
        &format!("gang {loser} to bind whole"),
        Duration::from_secs(90),
        || {
            let n = k.bound(loser).len();
            n == 3
        },
    );
    k.delete_phase(loser);

    // The hook's own account: requests by verb, bad ones counted, gangs by state.
    let metrics = http_get(&hook_metrics, "/metrics");
    assert!(
        support::metric(
            &metrics,
            "granary_scheduler_requests_total",
            &[("verb", "filter"), ("outcome", "ok")]
        ) > 0.0,
        "{metrics}"
    );
    assert!(
        support::metric(
            &metrics,
            "granary_scheduler_requests_total",
            &[("outcome", "bad_request")]
        ) >= 4.0,
        "{metrics}"
    );
    assert!(
        support::metric(
            &metrics,
            "granary_scheduler_requests_total",
            &[("verb", "bind"), ("outcome", "ok")]
        ) >= 14.0,
        "{metrics}"
    );
}
