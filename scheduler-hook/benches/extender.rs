//! The extender under load on loopback: filter + prioritize of a pod with a dataset (one GPU),
//! against 1,000 and 5,000 nodes, with node names (nodeCacheCapable: true) and with whole Node
//! objects (~2 KB each, nodeCacheCapable: false). Reports p50/p99 of one filter + prioritize pair
//! sent one after the other, and requests per second with 4 connections. Then the planner alone:
//! a 64-pod gang over 1,000 nodes.
//!
//! Run: `cargo bench -p granary-scheduler-hook --bench extender [-- SECONDS]`

use granary_core::gang::{Member, NodeState, plan_gang};
use granary_scheduler_hook::data::{BoxFuture, DataSource, DatasetView, NodeBytes};
use granary_scheduler_hook::pod::intent;
use granary_scheduler_hook::{CallError, ClusterApi, Hook, HookConfig};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Data(DatasetView);

impl DataSource for Data {
    fn status<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<DatasetView, CallError>> {
        Box::pin(async move { Ok(self.0.clone()) })
    }
    fn load<'a>(
        &'a self,
        _: &'a str,
        _: Vec<String>,
    ) -> BoxFuture<'a, Result<DatasetView, CallError>> {
        Box::pin(async move { Ok(self.0.clone()) })
    }
}

struct NoCluster;

impl ClusterApi for NoCluster {
    fn get_pod<'a>(
        &'a self,
        _: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<granary_scheduler_hook::extender::Pod, CallError>> {
        Box::pin(async move { Err(CallError::NotFound(format!("no pod {name}"))) })
    }
    fn bind<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async { Ok(()) })
    }
    fn note_phase<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async { Ok(()) })
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

/// A deterministic pseudo-random sequence (no RNG dependency).
fn mix(i: u64) -> u64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

fn node_name(i: usize) -> String {
    format!("gpu-node-{i:05}")
}

fn node_object(i: usize) -> Value {
    let name = node_name(i);
    let mut labels = serde_json::Map::new();
    labels.insert("kubernetes.io/hostname".into(), json!(name));
    labels.insert(
        "topology.kubernetes.io/zone".into(),
        json!(format!("zone-{}", i % 8)),
    );
    labels.insert(
        "node.kubernetes.io/instance-type".into(),
        json!("p4d.24xlarge"),
    );
    labels.insert(
        "nvidia.com/gpu.product".into(),
        json!("NVIDIA-A100-SXM4-40GB"),
    );
    for l in 0..6 {
        labels.insert(
            format!("example.com/label-{l}"),
            json!(format!("value-{l}")),
        );
    }
    let resources = json!({"cpu": "96", "memory": "1152Gi", "pods": "110",
        "ephemeral-storage": "7Ti", "nvidia.com/gpu": "8"});
    let conditions: Vec<Value> = ["MemoryPressure", "DiskPressure", "PIDPressure", "Ready"].iter().map(|t| json!({
                "type": t, "status": if *t == "Ready" {"True"} else {"False"},
                "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z",
                "reason": "KubeletReady", "message": "kubelet is posting ready status"})).collect::<Vec<_>>();
    json!({
        "metadata": {"name": name, "uid": format!("2f6c1a3e-0000-4000-8000-{i:012}"),
            "resourceVersion": "123456", "labels": labels,
            "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true"}},
        "spec": {"podCIDR": format!("10.{}.{}.0/24", i / 256, i % 256), "providerID": format!("aws:///us-east-1a/i-{i:017}")},
        "status": {"capacity": resources, "allocatable": resources,
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": format!("10.0.{}.{}", i / 256, i % 256)},
                {"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": "v1.20.2", "osImage": "Debian GNU/Linux 12", "kernelVersion": "6.1.0",
                "containerRuntimeVersion": "containerd://1.6.20", "architecture": "amd64", "operatingSystem": "linux",
                "machineID": "0123456789abcdef", "systemUUID": "ec2-0000", "bootID": "b00t"}}
    })
}

fn pod() -> Value {
    json!({
        "metadata": {"name": "reader", "namespace": "ml", "uid": "u-reader",
            "annotations": {"granary.io/dataset": "imagenet"}},
        "spec": {"containers": [{"name": "train", "image": "pytorch",
            "resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "8", "memory": "64Gi"}}}]}
    })
}

/// A keep-alive HTTP/1.1 connection to the extender.
struct Conn {
    reader: BufReader<TcpStream>,
    addr: String,
}

impl Conn {
    async fn open(addr: &str) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            reader: BufReader::new(stream),
            addr: addr.into(),
        }
    }

    async fn post(&mut self, path: &str, body: &[u8]) -> Vec<u8> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        let mut request = Vec::with_capacity(head.len() + body.len());
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(body);
        self.reader.get_mut().write_all(&request).await.unwrap();
        let mut len = 0usize;
        let mut status = String::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).await.unwrap();
            if status.is_empty() {
                status = line.clone();
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        assert!(status.contains(" 200 "), "{status}");
        let mut out = vec![0; len];
        self.reader.read_exact(&mut out).await.unwrap();
        out
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

async fn run_case(nodes: usize, names_only: bool, secs: f64) {
    // Cluster: every node 8 GPUs; a third of them hold 3 GPUs of bound pods; the dataset is on
    // 1 node in 10.
    let names: Vec<String> = (0..nodes).map(node_name).collect();
    let per_node = names
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 == 0)
        .map(|(i, n)| {
            (
                n.clone(),
                NodeBytes {
                    ready: mix(i as u64) % (64 << 30),
                    total: 64 << 30,
                    state: "ready".into(),
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    let view = DatasetView {
        name: "imagenet".into(),
        nodes: per_node.keys().cloned().collect(),
        load: true,
        per_node,
    };
    let hook = Hook::new(
        HookConfig::default(),
        Arc::new(Data(view.clone())),
        Arc::new(NoCluster),
    );
    {
        let mut s = hook.state();
        for (i, n) in names.iter().enumerate() {
            let labels = BTreeMap::from([(
                "topology.kubernetes.io/zone".to_string(),
                format!("zone-{}", i % 8),
            )]);
            s.set_node(n, 8, &labels);
            if i % 3 == 0 {
                let p: granary_scheduler_hook::extender::Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("busy-{i}"), "namespace": "ml"},
                    "spec": {"nodeName": n, "containers": [{"resources": {"limits": {"nvidia.com/gpu": "3"}}}]}
                })).unwrap();
                s.set_pod(intent(&p).unwrap());
            }
        }
        s.set_dataset(view, hook.now());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let router = granary_scheduler_hook::http::router(hook.clone(), 64 << 20);
    tokio::spawn(granary_scheduler_hook::http::serve(
        listener,
        router,
        std::future::pending(),
    ));

    let body = if names_only {
        json!({"Pod": pod(), "Nodes": null, "NodeNames": names})
    } else {
        json!({"Pod": pod(), "Nodes": {"metadata": {}, "items": (0..nodes).map(node_object).collect::<Vec<_>>()}, "NodeNames": null})
    };
    let body = Arc::new(serde_json::to_vec(&body).unwrap());

    // Latency: one pair at a time.
    let mut conn = Conn::open(&addr).await;
    for _ in 0..5 {
        conn.post("/filter", &body).await;
    }
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs || lat.len() < 20 {
        let t = Instant::now();
        let f = conn.post("/filter", &body).await;
        let p = conn.post("/prioritize", &body).await;
        lat.push(t.elapsed());
        assert!(f.len() > 10 && p.len() > 10);
    }
    lat.sort();
    // Throughput: 4 connections, filter and prioritize alternating.
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (addr, body, done) = (addr.clone(), body.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(&addr).await;
            let mut i = 0u64;
            while Instant::now() < deadline {
                c.post(
                    if i.is_multiple_of(2) {
                        "/filter"
                    } else {
                        "/prioritize"
                    },
                    &body,
                )
                .await;
                i += 1;
            }
            done.fetch_add(i, std::sync::atomic::Ordering::Relaxed);
        }));
    }
    let t = Instant::now();
    for task in tasks {
        task.await.unwrap();
    }
    let rps = done.load(std::sync::atomic::Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64();
    println!(
        "{nodes:>5} nodes  {:<22} body {:>7.1} KiB  filter+prioritize p50 {:>7.2} ms  p99 {:>7.2} ms  ({} pairs)  {:>7.0} requests/s (4 connections)",
        if names_only {
            "nodeCacheCapable=true"
        } else {
            "nodeCacheCapable=false"
        },
        body.len() as f64 / 1024.0,
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        lat.len(),
        rps
    );
}

fn plan_bench() {
    let nodes: Vec<NodeState> = (0..1000)
        .map(|i| NodeState {
            name: node_name(i),
            free_gpus: (mix(i as u64) % 9) as u32,
            domain: Some(format!("zone-{}", i % 8)),
            dataset_bytes: if i % 7 == 0 {
                mix(i as u64 + 1) % (64 << 30)
            } else {
                0
            },
        })
        .collect();
    for (label, gpus) in [
        ("64 pods x 1 GPU", vec![1u32; 64]),
        ("64 pods x 2 GPUs", vec![2; 64]),
        (
            "64 pods x 1-4 GPUs (mixed)",
            (0..64).map(|i| 1 + (i % 4)).collect(),
        ),
    ] {
        let members: Vec<Member> = gpus
            .iter()
            .enumerate()
            .map(|(i, g)| Member {
                pod: format!("ml/p{i:02}"),
                gpus: *g,
            })
            .collect();
        let mut times = Vec::new();
        let mut plan = None;
        for _ in 0..30 {
            let t = Instant::now();
            plan = Some(plan_gang(&members, &nodes));
            times.push(t.elapsed());
        }
        times.sort();
        let plan = plan.unwrap().expect("the gang fits");
        println!(
            "plan {label:<27} over 1000 nodes: p50 {:>7.2} ms  max {:>7.2} ms  -> {} nodes, domain {:?}",
            pct(&times, 0.5),
            times.last().unwrap().as_secs_f64() * 1000.0,
            plan.nodes.len(),
            plan.domain
        );
    }
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(3.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for nodes in [1000, 5000] {
            for names_only in [true, false] {
                run_case(nodes, names_only, secs).await;
            }
        }
    });
    plan_bench();
}
