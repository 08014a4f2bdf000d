//! A real Prometheus (Debian's 2.42) scraping a three-worker cluster and a FUSE client, with
//! Granary's recording rules, while a workload runs: the cluster hit ratio and per-dataset
//! cached bytes it answers are the ones the workload implies.

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::backends::{S3Target, unique};
use support::cluster::{
    Spec, Started, cluster_certs, drop_page_cache, mount_cluster_with, start_workers,
    wait_for_members,
};
use support::data::{Tree, content};
use support::own::OwnService;
use support::process::{granary, interrupt_and_reap, run_with_timeout};
use support::{free_port, http_get, wait_until};

struct Prometheus(Option<Child>);

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            interrupt_and_reap(child, Duration::from_secs(10));
        }
    }
}

/// `expr` evaluated now by Prometheus at `addr`: one scalar (the first series).
fn query(addr: &str, expr: &str) -> Option<f64> {
    let encoded: String = expr
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = http_get(addr, &format!("/api/v1/query?query={encoded}"));
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{expr}: {body}");
    let result = v["data"]["result"].as_array()?.first()?.clone();
    result["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_sees_the_hit_ratio_and_cached_bytes_the_workload_implies() {
    let s3 = S3Target::moto();
    let etcd = OwnService::start("etcd");
    let etcd_url = etcd.get("GRANARY_TEST_ETCD");
    let work = tempfile::tempdir().unwrap();
    let tls = cluster_certs(work.path(), 3, &etcd);

    // 24 files of one block each to read; a pinned dataset of 10 files beside them.
    let prefix = unique("observability");
    let mut tree = Tree::new();
    for i in 0..24 {
        tree.insert(format!("read/f{i:02}"), 1_000_000 + i * 1000);
    }
    for i in 0..10 {
        tree.insert(format!("pinned/p{i}"), 50_000 + i * 7);
    }
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(s3.upload(&prefix, &tree));
    let pinned_bytes: u64 = tree
        .iter()
        .filter(|(p, _)| p.starts_with("pinned/"))
        .map(|(_, s)| s)
        .sum();

    let spec = Spec {
        s3: &s3,
        prefix: &prefix,
        etcd: &etcd_url,
        tls: &tls,
        memory: "64MiB",
        extra: "",
        extra_for: &[],
    };
    let Started {
        workers,
        api: apis,
        metrics,
        ..
    } = start_workers(work.path(), 3, &spec);
    wait_for_members(&etcd_url, 3);
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let client = mount_cluster_with(&etcd_url, &tls, &mnt, &["--job", "resnet"]);

    // Prometheus scrapes the workers and the client every second, with Granary's rules.
    let prom_port = free_port();
    let prom_addr = format!("127.0.0.1:{prom_port}");
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/rules.yml");
    let targets = |addrs: &[String]| {
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let config = work.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: granary-workers\n    static_configs:\n      - targets: [{}]\n\
             \x20 - job_name: granary-clients\n    static_configs:\n      - targets: [\"{}\"]\n",
            rules.display(),
            targets(&metrics),
            client.metrics_addr
        ),
    )
    .unwrap();
    let _prometheus = Prometheus(Some(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus is installed (scripts/install-deps.sh installs it)"),
    ));
    wait_until(
        "prometheus to scrape every target",
        Duration::from_secs(60),
        || {
            std::net::TcpStream::connect(&prom_addr).is_ok()
                && query(&prom_addr, "count(up == 1)") == Some(4.0)
        },
    );

    // The workload: every block read once from the backend, then once more from the caches
    // (page cache dropped): the cluster hit ratio is exactly 1/2.
    for pass in 0..2 {
        drop_page_cache();
        for (path, size) in tree.iter().filter(|(p, _)| p.starts_with("read/")) {
            let bytes = std::fs::read(mnt.join("data").join(path)).unwrap();
            assert!(bytes == content(path, *size), "{path} in pass {pass}");
        }
    }
    // A pinned dataset loaded onto w1 and w2.
    let api = apis[0].clone();
    let pin = run_with_timeout(
        granary(
            &[
                "dataset",
                "--server",
                &api,
                "--tls-dir",
                tls.to_str().unwrap(),
                "pin",
                "imagenet",
                "--path",
                "/data/pinned",
                "--nodes",
                "w1,w2",
            ],
            &[],
        ),
        Duration::from_secs(60),
    );
    assert!(pin.status.success(), "{}", pin.stderr);
    let load = run_with_timeout(
        granary(
            &[
                "dataset",
                "--server",
                &api,
                "--tls-dir",
                tls.to_str().unwrap(),
                "load",
                "imagenet",
                "--wait",
                "--timeout",
                "60s",
            ],
            &[],
        ),
        Duration::from_secs(90),
    );
    assert!(load.status.success(), "{}", load.stderr);

    // What the workers' own counters say, and what Prometheus answers.
    let hit_expr = "sum(granary_block_reads_total{job=\"granary-workers\",tier=~\"memory|disk\"}) / sum(granary_block_reads_total{job=\"granary-workers\",tier=~\"memory|disk|backend\"})";
    let direct: (f64, f64) = metrics.iter().fold((0.0, 0.0), |(h, a), m| {
        let text = http_get(m, "/metrics");
        let get = |tier| support::metric(&text, "granary_block_reads_total", &[("tier", tier)]);
        let hits = get("memory") + get("disk");
        (h + hits, a + hits + get("backend"))
    });
    assert_eq!(
        direct.0 * 2.0,
        direct.1,
        "the workload reads every block once cold, once hot"
    );
    wait_until(
        "prometheus to see the workload",
        Duration::from_secs(30),
        || {
            query(&prom_addr, hit_expr) == Some(0.5)
                && query(
                    &prom_addr,
                    "granary:dataset_cached_bytes{dataset=\"imagenet\"}",
                ) == Some(pinned_bytes as f64)
        },
    );
    assert_eq!(
        query(
            &prom_addr,
            "granary:dataset_ready:ratio{dataset=\"imagenet\"}"
        ),
        Some(1.0)
    );
    // The mount's own view: half its blocks came from a worker's cache, and the backend bytes
    // it cost are exactly one pass over the files.
    let read_bytes: u64 = tree
        .iter()
        .filter(|(p, _)| p.starts_with("read/"))
        .map(|(_, s)| s)
        .sum();
    wait_until("the client's counters", Duration::from_secs(30), || {
        query(
            &prom_addr,
            "sum(granary_fuse_blocks_total{origin=~\"memory|disk\",training_job=\"resnet\"}) / sum(granary_fuse_blocks_total{training_job=\"resnet\"})",
        ) == Some(0.5)
            && query(
                &prom_addr,
                "sum(granary_fuse_block_bytes_total{origin=\"backend\",training_job=\"resnet\"})",
            ) == Some(read_bytes as f64)
    });
    // The client's data stall, by job.
    assert!(
        query(
            &prom_addr,
            "sum(granary_fuse_stall_seconds_count{job=\"granary-clients\",training_job=\"resnet\"})"
        )
        .is_some_and(|n| n > 0.0),
        "stall metric scraped with its job label"
    );
    assert!(client.stop().success());
    drop(workers);
}
