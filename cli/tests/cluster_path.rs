//! The cluster data path with each node's mount inside its worker (`[fuse] mount`): three
//! `granary server` workers on 127.0.0.1 with real etcd, an S3 server (moto) behind a proxy that
//! counts what it is asked, each worker serving its own FUSE mount under its keeper.
//! - bytes are right through every mount;
//! - a block the reading node owns never crosses QUIC (the owners' served counters);
//! - six readers on three nodes reading one file at once: each owner sends a block at most once
//!   to each other node, and the S3 server is asked once per block;
//! - the backend's rate limit holds for the cluster as a whole (counted at the S3 server);
//! - a pinned file held by the node opens by passthrough through the node's mount.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;
use support::backends::{S3Target, unique};
use support::cluster::{
    Spec, cluster_certs, drop_page_cache, start_workers, tls_flags, wait_for_members,
};
use support::data::content;
use support::own::OwnService;
use support::process::{granary, run_with_timeout};
use support::s3_count::CountingProxy;
use support::{http_get, metric, wait_until};

const BLOCK: u64 = 4 << 20;
/// The cluster's backend rate limit (requests per second, all workers together).
const RATE: f64 = 10.0;

fn served_to_peers(metrics: &str) -> f64 {
    metric(
        &http_get(metrics, "/metrics"),
        "granary_peer_blocks_served_total",
        &[("result", "ok")],
    )
}

fn block_reads(metrics: &str, tier: &str) -> f64 {
    metric(
        &http_get(metrics, "/metrics"),
        "granary_block_reads_total",
        &[("tier", tier)],
    )
}

/// sha256 of `path` read with O_DIRECT (every read reaches the FUSE server).
fn direct_sha(path: &Path) -> std::process::Child {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dd if='{}' iflag=direct bs=1M status=none | sha256sum | cut -d' ' -f1",
            path.display()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn sha_of(data: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[test]
fn node_mounts_read_in_process_spread_hot_blocks_and_share_the_backend_rate() {
    let moto = S3Target::moto();
    let proxy = CountingProxy::start(moto.endpoint.trim_start_matches("http://"));
    let s3 = S3Target {
        endpoint: proxy.endpoint.clone(),
        ..moto.clone()
    };
    let etcd = OwnService::start("etcd");
    let etcd_url = etcd.get("GRANARY_TEST_ETCD");
    let work = tempfile::tempdir().unwrap();
    let tls = cluster_certs(work.path(), 3, &etcd);

    // The data, uploaded with boto3 straight to the S3 server (not through the proxy).
    let prefix = unique("cluster-path");
    let mut objects: Vec<(String, Vec<u8>)> = vec![
        ("one.bin".into(), content("one.bin", 10 * BLOCK)),
        ("shared.bin".into(), content("shared.bin", 16 * BLOCK)),
    ];
    for i in 0..80 {
        let name = format!("many/f{i:02}");
        objects.push((name.clone(), content(&name, 16 << 10)));
    }
    for i in 0..4 {
        let name = format!("ds/p{i}");
        objects.push((name.clone(), content(&name, 3 << 20)));
    }
    support::keys::put(&moto.boto3(), &prefix, &objects);
    let expected = |name: &str| sha_of(&objects.iter().find(|(n, _)| n == name).unwrap().1);

    let mounts: Vec<PathBuf> = (1..=3)
        .map(|i| work.path().join(format!("mnt-w{i}")))
        .collect();
    let extra: Vec<(String, String)> = mounts
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                format!("w{}", i + 1),
                format!(
                    "[backend]\nmax_requests_per_second = {RATE}\n[fuse]\nmount = \"{}\"\n",
                    m.display()
                ),
            )
        })
        .collect();
    for m in &mounts {
        std::fs::create_dir(m).unwrap();
    }
    let extra_for: Vec<(&str, &str)> = extra
        .iter()
        .map(|(w, e)| (w.as_str(), e.as_str()))
        .collect();
    let spec = Spec {
        s3: &s3,
        prefix: &prefix,
        etcd: &etcd_url,
        tls: &tls,
        memory: "256MiB",
        extra: "",
        extra_for: &extra_for,
    };
    let started = start_workers(work.path(), 3, &spec);
    let metrics = started.metrics.clone();
    wait_for_members(&etcd_url, 3);
    let data = |i: usize| mounts[i].join("data");

    // 1. One node reads a file: its own blocks never cross QUIC.
    drop_page_cache();
    let out = direct_sha(&data(0).join("one.bin"))
        .wait_with_output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        expected("one.bin")
    );
    let from_peers = block_reads(&metrics[0], "peer");
    assert!(
        (1.0..10.0).contains(&from_peers),
        "w1 read {from_peers} of 10 blocks from their owners"
    );
    assert_eq!(served_to_peers(&metrics[0]), 0.0, "w1's own reads left it");
    assert_eq!(
        served_to_peers(&metrics[1]) + served_to_peers(&metrics[2]),
        from_peers,
        "exactly the blocks w1 does not own crossed QUIC"
    );

    // 2. Six readers, two per node, read one file at once: an owner sends each block once to
    // each other node at most, and the backend is asked once per block.
    let sent_before: f64 = metrics.iter().map(|m| served_to_peers(m)).sum();
    drop_page_cache();
    let readers: Vec<_> = (0..6)
        .map(|r| direct_sha(&data(r % 3).join("shared.bin")))
        .collect();
    for reader in readers {
        let out = reader.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            expected("shared.bin")
        );
    }
    let sent: f64 = metrics.iter().map(|m| served_to_peers(m)).sum::<f64>() - sent_before;
    eprintln!("six readers of 16 blocks: {sent} blocks sent between nodes");
    assert!(
        sent <= 2.0 * 16.0,
        "{sent} block sends for 16 blocks read on 3 nodes (at most 2 each)"
    );
    let gets = proxy.requests_for(&format!("{prefix}/shared.bin")).len();
    assert_eq!(gets, 16, "S3 GETs of shared.bin");

    // 3. Reads from every node at once: the backend sees the cluster's rate, not 3 times it.
    let t0 = std::time::Instant::now();
    let handles: Vec<_> = (0..3)
        .map(|node| {
            let dir = data(node).join("many");
            std::thread::spawn(move || {
                for i in (0..80).filter(|i| i % 3 == node) {
                    std::fs::read(dir.join(format!("f{i:02}"))).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let asked: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.at >= t0)
        .collect();
    let span = asked.last().unwrap().at - asked.first().unwrap().at;
    let bound = RATE * (span.as_secs_f64() + 1.0) * 1.05;
    eprintln!(
        "{} backend requests in {span:?} (limit {RATE}/s)",
        asked.len()
    );
    assert!(
        asked.len() >= 80 && asked.len() as f64 <= bound,
        "{} requests in {span:?}: more than {RATE}/s (plus a second's burst) for the cluster",
        asked.len()
    );

    // 4. A dataset pinned onto w1: its files open by passthrough through w1's mount.
    let api = &started.api[0];
    let dataset = |args: &[&str]| {
        let tls = tls_flags(api);
        let mut all = vec!["dataset", "--server", api.as_str()];
        all.extend(tls.iter().map(String::as_str));
        all.extend_from_slice(args);
        let out = run_with_timeout(granary(&all, &[]), Duration::from_secs(120));
        assert!(out.status.success(), "dataset {args:?}: {}", out.stderr);
    };
    dataset(&["pin", "ds", "--path", "/data/ds", "--nodes", "w1"]);
    dataset(&["load", "ds"]);
    dataset(&["wait", "ds", "--timeout", "60s"]);
    let opens = || {
        metric(
            &http_get(&metrics[0], "/metrics"),
            "granary_fuse_passthrough_opens_total",
            &[],
        )
    };
    let before = opens();
    // The node mount learns of the pin when its entries expire (the attribute TTL).
    wait_until("the pinned entries", Duration::from_secs(40), || {
        let _ = std::fs::read(data(0).join("ds/p0"));
        opens() > before
    });
    let before = opens();
    for i in 0..4 {
        let name = format!("ds/p{i}");
        assert_eq!(
            sha_of(&std::fs::read(data(0).join(&name)).unwrap()),
            expected(&name)
        );
    }
    assert!(
        opens() - before >= 4.0,
        "passthrough opens of the pinned files"
    );
}
