//! The scheduler hook against a real kube-scheduler 1.20 and kube-apiserver (built by
//! scripts/services/kube.sh), three cache workers over etcd and an S3 server: gangs bound whole
//! only when their data is ready on their nodes, a gang too big never bound, two gangs competing
//! for the same GPUs never partial, a plain dataset pod placed where its bytes are, pods with
//! neither passing through, and bad extender requests answered with 400 while the hook keeps
//! serving the scheduler.
//!
//! kube-scheduler reaches the hook over mutual TLS, with the extender block of the shipped
//! deploy/scheduler/kube-scheduler-config.yaml (v1) put in a v1beta1 file (1.20 loads no v1).
//! The hook calls the workers with their limited scheduler token. Attacks, with a certificate
//! the CA signed: forged pods (unknown to the API server, another uid, another request), a bind
//! of a pending kube-system pod, and a gang the scheduler never places are all refused or hold
//! nothing; plain HTTP and clients without a certificate get no answer.

mod support;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::backends::{S3Target, unique};
use support::cluster::Worker;
use support::data::Tree;
use support::own::OwnService;
use support::process::{Finished, Logged, granary, granary_bin, run_with_timeout};
use support::{free_port, http_get, wait_until};

const ADMIN: &str = "admin-token-0123456789";
/// The workers' scheduler token: dataset status and loads only.
const SCHEDULER: &str = "scheduler-token-0123456789";
const GIB: u64 = 1 << 30;

/// A child process killed (SIGINT, then SIGKILL) when the test ends, whatever happens.
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

    /// A pod in `namespace` that no scheduler places (schedulerName `nobody`), label phase=idle.
    fn add_idle_pod(&self, namespace: &str, name: &str, gpus: u32, annotations: Value) -> Pod {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"phase": "idle"}, "annotations": annotations},
            "spec": {"schedulerName": "nobody", "containers": [{"name": "main",
                "image": "registry.invalid/pause:3",
                "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}],
                "terminationGracePeriodSeconds": 0}
        }))
        .unwrap();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        self.rt
            .block_on(api.create(&PostParams::default(), &pod))
            .unwrap()
    }

    /// The node `namespace/name` is bound to, as the API server says.
    fn node_of(&self, namespace: &str, name: &str) -> Option<String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pod = self.rt.block_on(api.get(name)).unwrap();
        pod.spec.and_then(|s| s.node_name)
    }

    fn delete_idle(&self, namespace: &str, name: &str) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let _ = self
            .rt
            .block_on(api.delete(name, &DeleteParams::default().grace_period(0)));
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
fn dataset_status(api: &str, tls: &Path, name: &str) -> Value {
    let out = ok(
        run_with_timeout(
            granary(
                &[
                    "dataset",
                    "--server",
                    api,
                    "--tls-dir",
                    tls.to_str().unwrap(),
                    "--token",
                    ADMIN,
                    "status",
                    name,
                    "--json",
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

/// How a test client reaches the hook: its URL and curl's TLS arguments.
struct HookClient {
    url: String,
    tls: Vec<String>,
}

impl HookClient {
    /// kube-scheduler's certificate (signed by the cluster CA) from `tls`.
    fn new(addr: &str, tls: &Path, name: Option<&str>) -> HookClient {
        let mut args = vec![
            "--cacert".to_string(),
            tls.join("ca.pem").display().to_string(),
        ];
        if let Some(name) = name {
            args.extend([
                "--cert".to_string(),
                tls.join(format!("{name}.pem")).display().to_string(),
                "--key".to_string(),
                tls.join(format!("{name}.key")).display().to_string(),
            ]);
        }
        HookClient {
            url: format!("https://{addr}"),
            tls: args,
        }
    }

    /// One request with curl (an independent HTTPS client): the status code (0 when no HTTP
    /// answer came) and the body, or curl's error. `declared` overrides the Content-Length sent
    /// (the body itself is then not sent).
    fn request_to(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: &[u8],
        declared: Option<usize>,
    ) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-X", method, "-o", "-"])
            .args(["-w", "\n%{http_code}"])
            .args(&self.tls)
            .args(["-H", "Content-Type: application/json"])
            .arg(format!("{base}{path}"));
        if method == "POST" {
            cmd.args(["--data-binary", "@-"]);
            if let Some(n) = declared {
                cmd.args(["-H", &format!("Content-Length: {n}")]);
            }
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("curl is installed");
        let mut stdin = child.stdin.take().unwrap();
        if declared.is_none() {
            stdin.write_all(body).unwrap();
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code: u16 = code.trim().parse().unwrap_or(0);
        if code == 0 {
            return (0, String::from_utf8_lossy(&out.stderr).to_string());
        }
        (code, body.to_string())
    }

    fn post(&self, path: &str, body: &[u8], declared: Option<usize>) -> (u16, String) {
        self.request_to(&self.url, "POST", path, body, declared)
    }

    fn get(&self, path: &str) -> String {
        let (code, body) = self.request_to(&self.url, "GET", path, b"", None);
        assert_eq!(code, 200, "GET {path}: {body}");
        body
    }
}

fn gang_report(hook: &HookClient, name: &str) -> Value {
    let v: Value = serde_json::from_str(&hook.get("/gangs")).unwrap();
    v["gangs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until `granary status` (etcd over TLS, client certificate `client`) shows `n` live
/// members.
fn wait_for_members(etcd: &str, tls: &Path, n: usize) {
    let tls = tls.to_str().unwrap();
    wait_until(
        &format!("{n} live members"),
        Duration::from_secs(40),
        || {
            let out = run_with_timeout(
                granary(
                    &[
                        "status",
                        "--etcd",
                        etcd,
                        "--tls-dir",
                        tls,
                        "--tls-name",
                        "client",
                        "--json",
                    ],
                    &[],
                ),
                Duration::from_secs(30),
            );
            let s: Value = serde_json::from_str(&ok(out, "status")).unwrap();
            let members = s["members"].as_array().unwrap();
            members.len() == n && members.iter().all(|m| m["up"] == true)
        },
    );
}

fn gang(name: &str, size: usize, dataset: Option<&str>) -> Value {
    let mut a = json!({"granary.io/gang": name, "granary.io/gang-size": size.to_string()});
    if let Some(d) = dataset {
        a["granary.io/dataset"] = json!(d);
    }
    a
}

/// deploy/scheduler/kube-scheduler-config.yaml (v1) as the v1beta1 file kube-scheduler 1.20
/// loads: the same extender block, pointed at `hook_addr` and the test's certificates; the rest
/// (client, leader election, ports) the test's own.
fn scheduler_config(
    hook_addr: &str,
    tls: &Path,
    kubeconfig: &str,
    healthz: u16,
    metrics: u16,
) -> String {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/scheduler/kube-scheduler-config.yaml");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let v1: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(v1["apiVersion"], "kubescheduler.config.k8s.io/v1");
    let extenders = v1["extenders"].as_array().unwrap();
    assert_eq!(extenders.len(), 1, "{v1}");
    let mut extender = extenders[0].clone();
    let url = extender["urlPrefix"].as_str().unwrap();
    assert!(url.starts_with("https://"), "{url}");
    assert_eq!(extender["enableHTTPS"], true);
    extender["urlPrefix"] = json!(format!("https://{hook_addr}"));
    let t = extender["tlsConfig"].as_object_mut().unwrap();
    for (field, file) in [
        ("caFile", "ca.pem"),
        ("certFile", "kube-scheduler.pem"),
        ("keyFile", "kube-scheduler.key"),
    ] {
        assert!(t.contains_key(field), "tlsConfig lacks {field}");
        t.insert(field.into(), json!(tls.join(file).display().to_string()));
    }
    // JSON is YAML.
    json!({
        "apiVersion": "kubescheduler.config.k8s.io/v1beta1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": kubeconfig},
        "leaderElection": {"leaderElect": false},
        "healthzBindAddress": format!("127.0.0.1:{healthz}"),
        "metricsBindAddress": format!("127.0.0.1:{metrics}"),
        "extenders": [extender],
    })
    .to_string()
}

#[test]
fn without_tls_the_hook_refuses_a_non_loopback_address() {
    let out = run_with_timeout(
        granary(
            &[
                "scheduler",
                "--listen",
                &format!("0.0.0.0:{}", free_port()),
                "--cache-server",
                "127.0.0.1:1",
            ],
            &[],
        ),
        Duration::from_secs(20),
    );
    assert!(!out.status.success(), "{}", out.stdout);
    assert!(
        out.stderr.contains("without --tls-dir") && out.stderr.contains("only a loopback address"),
        "{}",
        out.stderr
    );
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
    // Every certificate from etcd's CA (`granary certs` reuses the CA it finds), so etcd, the
    // workers, the hook and kube-scheduler all trust one another.
    let etcd_ca = PathBuf::from(etcd.get("GRANARY_TEST_ETCD_TLS"));
    std::fs::create_dir_all(&tls).unwrap();
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(etcd_ca.join(f), tls.join(f)).unwrap();
    }
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
                    "scheduler",
                    "kube-scheduler",
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
                     scheduler_token = \"{SCHEDULER}\"\n\
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
    wait_for_members(&etcd_url, &tls, 3);
    let api = format!("127.0.0.1:{}", ports[0]);
    let tls_arg = tls.to_str().unwrap();
    let dataset = |args: &[&str]| {
        let mut all = vec![
            "dataset",
            "--server",
            &api,
            "--tls-dir",
            tls_arg,
            "--token",
            ADMIN,
        ];
        all.extend_from_slice(args);
        ok(
            run_with_timeout(granary(&all, &[]), Duration::from_secs(300)),
            &format!("dataset {args:?}"),
        )
    };
    dataset(&["pin", "train", "--path", "/data/train", "--nodes", "w2,w3"]);
    dataset(&["load", "train", "--wait", "--timeout", "240s"]);
    assert_eq!(
        ready_nodes(&dataset_status(&api, &tls, "train")),
        BTreeSet::from(["w2".to_string(), "w3".to_string()])
    );

    // Four GPU nodes named like the cache workers (w4 has no worker).
    let k = Kube::new(&kubeconfig);
    for i in 1..=4 {
        k.add_node(&format!("w{i}"), 4);
    }

    // The hook (HTTPS, mutual TLS; the workers' scheduler token from a file), then the real
    // scheduler configured with it.
    let hook_addr = format!("127.0.0.1:{}", free_port());
    let hook_metrics = format!("127.0.0.1:{}", free_port());
    let token_file = work.path().join("scheduler-token");
    std::fs::write(&token_file, format!("{SCHEDULER}\n")).unwrap();
    let mut cmd = Command::new(granary_bin());
    cmd.args([
        "scheduler",
        "--listen",
        &hook_addr,
        "--tls-dir",
        tls_arg,
        "--kubeconfig",
        &kubeconfig,
        "--cache-server",
        &api,
        "--token-file",
        token_file.to_str().unwrap(),
        "--reservation-ttl",
        "60s",
        "--metrics-addr",
        &hook_metrics,
    ])
    .env("GRANARY_LOG", "info,kube=warn");
    let hook = Logged::spawn(cmd, &work.path().join("hook.log"));
    // The hook's credential reads status and loads; it cannot pin (nor unpin, nor verify).
    let out = run_with_timeout(
        granary(
            &[
                "dataset",
                "--server",
                &api,
                "--tls-dir",
                tls_arg,
                "--token-file",
                token_file.to_str().unwrap(),
                "pin",
                "stolen",
                "--path",
                "/data/train",
            ],
            &[],
        ),
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success() && out.stderr.contains("role \"scheduler\""),
        "the scheduler token pinned: {}{}",
        out.stdout,
        out.stderr
    );
    let client = HookClient::new(&hook_addr, &tls, Some("kube-scheduler"));
    wait_until("the hook to serve", Duration::from_secs(30), || {
        client
            .request_to(&client.url, "GET", "/healthz", b"", None)
            .0
            == 200
    });
    let (healthz, metrics_port) = (free_port(), free_port());
    let sched_config = work.path().join("scheduler.yaml");
    std::fs::write(
        &sched_config,
        scheduler_config(&hook_addr, &tls, &kubeconfig, healthz, metrics_port),
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
    let scheduler = Logged::spawn(cmd, &work.path().join("kube-scheduler.log"));
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
    let probe = json!({"Pod": {"metadata": {"name": "probe", "namespace": "default", "uid": "made-up",
        "annotations": {"granary.io/dataset": "train"}}},
        "NodeNames": ["w1", "w2", "w3", "w4"]});
    let (code, text) = client.post("/prioritize", probe.to_string().as_bytes(), None);
    assert_eq!(code, 400, "a pod the API server does not have: {text}");
    assert!(
        text.contains("pod default/probe does not exist in the API server"),
        "{text}"
    );
    k.add_pod("probe", "probe", 0, json!({"granary.io/dataset": "train"}));
    let probe_pod = k.list("probe").remove(0);
    let probe = json!({"Pod": probe_pod, "NodeNames": ["w1", "w2", "w3", "w4"]});
    let (code, text) = client.post("/prioritize", probe.to_string().as_bytes(), None);
    assert_eq!(code, 200, "{text}");
    let scores: Vec<Value> = serde_json::from_str(&text).unwrap();
    let score = |n: &str| {
        scores.iter().find(|h| h["Host"] == n).unwrap()["Score"]
            .as_i64()
            .unwrap()
    };
    let status = dataset_status(&api, &tls, "train");
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
    k.delete_phase("probe");

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
        ready_nodes(&dataset_status(&api, &tls, "train")),
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
        let status = dataset_status(&api, &tls, "train");
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
            gang_report(&client, "g4"),
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
        gang_report(&client, "g4")
    );
    assert_eq!(on.len(), 2, "{bound:?}");
    assert!(on.contains("w3"), "the node holding the data: {bound:?}");
    let status = dataset_status(&api, &tls, "train");
    assert_eq!(ready_nodes(&status), on, "{status}");
    assert_eq!(status["percent"], 100.0);
    let report = gang_report(&client, "g4");
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
    let report = gang_report(&client, "big");
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
        let (code, text) = client.post(path, body, None);
        assert_eq!(code, 400, "{path}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(
            v["Error"].as_str().unwrap().contains(says),
            "{path}: {text}"
        );
    }
    let (code, text) = client.post("/filter", b"", Some(40 << 20));
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("larger than the limit"), "{text}");

    // 4b. Attacks, with kube-scheduler's own certificate (the TLS check is not all there is).
    let all_nodes = json!(["w1", "w2", "w3", "w4"]);
    let gpu_pod = |name: &str, uid: &str, gpus: u32, annotations: Value| {
        json!({"metadata": {"name": name, "namespace": "default", "uid": uid,
            "annotations": annotations},
            "spec": {"containers": [{"name": "c",
                "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}}}]}})
    };
    //  - A forged gang of pods the API server does not have: refused, no gang, nothing held.
    for i in 0..2 {
        let body = json!({"Pod": gpu_pod(&format!("forged-{i}"), "u-forged", 4,
            gang("forged", 2, None)), "NodeNames": all_nodes});
        let (code, text) = client.post("/filter", body.to_string().as_bytes(), None);
        assert_eq!(code, 400, "{text}");
        assert!(
            text.contains(&format!(
                "pod default/forged-{i} does not exist in the API server; refused"
            )),
            "{text}"
        );
    }
    //  - A gang of real pods no scheduler places (schedulerName nobody): the hook watches them
    //    but holds nothing for them (step 5 needs 12 of the 16 GPUs while they exist).
    let idle: Vec<Pod> = (0..2)
        .map(|i| k.add_idle_pod("default", &format!("idle-{i}"), 4, gang("idle", 2, None)))
        .collect();
    //  - A real pod claimed with another uid, or asking for more than it does: refused.
    let uid = idle[0].metadata.uid.clone().unwrap();
    for (claimed, says) in [
        (
            gpu_pod("idle-0", "forged-uid", 4, gang("idle", 2, None)),
            format!("pod default/idle-0 has uid {uid} in the API server, not forged-uid"),
        ),
        (
            gpu_pod("idle-0", &uid, 8, gang("idle", 2, None)),
            "pod default/idle-0: the request's nvidia.com/gpu request differs".to_string(),
        ),
    ] {
        let body = json!({"Pod": claimed, "NodeNames": all_nodes});
        let (code, text) = client.post("/filter", body.to_string().as_bytes(), None);
        assert_eq!(code, 400, "{text}");
        assert!(text.contains(&says), "{text}");
    }
    //  - A pending kube-system pod bound through the hook: refused, not bound.
    let victim = k.add_idle_pod("kube-system", "victim", 0, json!({}));
    let victim_uid = victim.metadata.uid.clone().unwrap();
    for (uid, says) in [
        (
            victim_uid.as_str(),
            "pod kube-system/victim was not filtered by this hook",
        ),
        ("other-uid", "in the API server, not other-uid"),
    ] {
        let body = json!({"PodName": "victim", "PodNamespace": "kube-system", "PodUID": uid,
            "Node": "w1"});
        let (code, text) = client.post("/bind", body.to_string().as_bytes(), None);
        assert_eq!(code, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v["Error"].as_str().unwrap().contains(says), "{text}");
    }
    //  - Plain HTTP, and HTTPS without a client certificate: no HTTP answer at all.
    let bind = json!({"PodName": "victim", "PodNamespace": "kube-system", "PodUID": victim_uid,
        "Node": "w1"})
    .to_string();
    let (code, text) = client.request_to(
        &format!("http://{hook_addr}"),
        "POST",
        "/bind",
        bind.as_bytes(),
        None,
    );
    assert_eq!(code, 0, "plain HTTP was answered: {text}");
    let anonymous = HookClient::new(&hook_addr, &tls, None);
    let (code, text) = anonymous.post("/bind", bind.as_bytes(), None);
    assert_eq!(
        code, 0,
        "a client without a certificate was answered: {text}"
    );
    assert!(text.contains("certificate"), "{text}");
    assert_eq!(k.node_of("kube-system", "victim"), None);
    assert_eq!(gang_report(&client, "forged"), Value::Null);
    eprintln!(
        "attacks refused; the idle gang: {}",
        gang_report(&client, "idle")
    );

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
    // The idle gang held nothing all along, the kube-system pod is still not bound.
    let report = gang_report(&client, "idle");
    assert_eq!(report["state"], "waiting-for-members", "{report}");
    assert_eq!(report["nodes"], json!([]), "{report}");
    assert_eq!(k.node_of("kube-system", "victim"), None);
    for (ns, name) in [
        ("default", "idle-0"),
        ("default", "idle-1"),
        ("kube-system", "victim"),
    ] {
        k.delete_idle(ns, name);
    }

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
            &[("outcome", "refused")]
        ) >= 5.0,
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
