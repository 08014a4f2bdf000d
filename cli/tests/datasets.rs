//! Pinned datasets on a real cluster: etcd, three workers with mutual TLS, Ceph RGW, FUSE.
//! Pin with tokens and quotas, load onto two of three nodes through a worker crash, exact
//! readiness checked against the disks, one backend GET per block, TTL expiry, passthrough
//! reads on a holding node, eviction pressure, corruption repaired, restart without refetch.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use support::backends::{S3Target, unique};
use support::cluster::{
    Spec, Started, Worker, cluster_certs, drop_page_cache, mount_cluster_with, sha, start_workers,
    tls_flags, wait_for_members,
};
use support::data::{Tree, content, write_local};
use support::own::OwnService;
use support::process::{Finished, granary, run_with_timeout};
use support::{http_get, metric, wait_until};

const BLOCK: u64 = 4 << 20;
const ADMIN: &str = "admin-token-0123456789";
const TEAM_A: &str = "team-a-token-0123456789";
const TINY: &str = "tiny-token-0123456789ab";

fn dataset(api: &str, token: Option<&str>, args: &[&str]) -> Finished {
    let tls = tls_flags(api);
    let mut all = vec!["dataset", "--server", api];
    all.extend(tls.iter().map(String::as_str));
    if let Some(t) = token {
        all.extend(["--token", t]);
    }
    all.extend_from_slice(args);
    run_with_timeout(granary(&all, &[]), Duration::from_secs(300))
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

fn refused(out: Finished, what: &str, says: &str) {
    assert!(!out.status.success(), "{what} succeeded: {}", out.stdout);
    // Progress lines (JSON) may come first; the error is one last line.
    let last = out.stderr.trim().lines().last().unwrap_or("");
    assert!(
        last.starts_with("granary: error:") && last.to_lowercase().contains(&says.to_lowercase()),
        "{what} should end with one error line saying {says:?}: {}",
        out.stderr
    );
}

fn status(api: &str, token: &str, name: &str) -> Value {
    let out = ok(
        dataset(api, Some(token), &["status", name, "--json"]),
        "status",
    );
    serde_json::from_str(&out).unwrap()
}

fn node<'a>(s: &'a Value, id: &str) -> Option<&'a Value> {
    s["node_progress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == id)
}

/// What a worker's dataset store holds complete for `name`: path -> size.
fn stored(cache: &Path, name: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(cache.join("datasets").join(name).join("index.jsonl"))
    else {
        return out;
    };
    for line in text.lines() {
        // (Checkpoint lines, `{"durable_bytes": N}`, name no file.)
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(path) = v["path"].as_str().map(str::to_string) else {
            continue;
        };
        if v["dropped"] == true {
            out.remove(&path);
        } else {
            out.insert(path, v["size"].as_u64().unwrap());
        }
    }
    out
}

/// Blocks of `name` a worker has written to disk: complete files plus partial loads' journals.
fn blocks_on_disk(cache: &Path, name: &str) -> u64 {
    let complete: u64 = stored(cache, name)
        .values()
        .map(|s| s.div_ceil(BLOCK))
        .sum();
    let mut partial = 0;
    let mut dirs = vec![cache.join("datasets").join(name).join("files")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.map(Result::unwrap) {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.to_string_lossy().ends_with(".loading.crcs") {
                // (A journal disappears when its file completes.)
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines = text.lines().count() as u64;
                partial += lines.saturating_sub(1);
            }
        }
    }
    complete + partial
}

#[test]
fn pin_load_through_a_crash_exact_readiness_quotas_ttl_passthrough_repair_restart() {
    let s3 = S3Target::rgw();
    let etcd = OwnService::start("etcd");
    let etcd_url = etcd.get("GRANARY_TEST_ETCD");
    let work = tempfile::tempdir().unwrap();
    let tls = cluster_certs(work.path(), 3, &etcd);

    // The dataset: 500 small files and a 256 MiB file; beside it, unpinned data.
    let prefix = unique("datasets");
    let mut tree = Tree::new();
    tree.insert("ds/big.bin".into(), 256 << 20);
    for i in 0..500 {
        tree.insert(format!("ds/small/f{i:03}"), 3000 + i * 13);
    }
    for i in 0..6 {
        tree.insert(format!("other/o{i}"), 24 << 20);
    }
    let local = work.path().join("local");
    write_local(&local, &tree);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(s3.upload(&prefix, &tree));
    let ds_files: Vec<(&String, u64)> = tree
        .iter()
        .filter(|(p, _)| p.starts_with("ds/"))
        .map(|(p, s)| (p, *s))
        .collect();
    let ds_blocks: u64 = ds_files.iter().map(|(_, s)| s.div_ceil(BLOCK)).sum();

    let extra = format!(
        "[backend]\nmax_requests_per_second = 25\n\
         [datasets]\ncapacity = \"1GiB\"\nadmin_token = \"{ADMIN}\"\n\
         [[tenant]]\nname = \"team-a\"\ntoken = \"{TEAM_A}\"\nquota = \"2GiB\"\n\
         [[tenant]]\nname = \"tiny\"\ntoken = \"{TINY}\"\nquota = \"1MiB\"\n"
    );
    // w3 may hold less: pins are checked against each node's own capacity.
    let small = extra.replace("capacity = \"1GiB\"", "capacity = \"100MiB\"");
    let spec = Spec {
        s3: &s3,
        prefix: &prefix,
        etcd: &etcd_url,
        tls: &tls,
        memory: "64MiB",
        extra: &extra,
        extra_for: &[("w3", &small)],
    };
    let Started {
        mut workers,
        api: apis,
        caches,
        ..
    } = start_workers(work.path(), 3, &spec);
    wait_for_members(&etcd_url, 3);
    let api = apis[0].as_str();

    // Bad requests: a clear error each, nothing pinned.
    refused(
        dataset(api, None, &["pin", "ds", "--path", "/data/ds"]),
        "no token",
        "no token",
    );
    refused(
        dataset(
            api,
            Some("wrong-token-0123456789"),
            &["pin", "ds", "--path", "/data/ds"],
        ),
        "wrong token",
        "matches no tenant",
    );
    refused(
        dataset(
            api,
            Some(TEAM_A),
            &["pin", "Bad Name", "--path", "/data/ds"],
        ),
        "bad name",
        "invalid dataset name",
    );
    refused(
        dataset(api, Some(TEAM_A), &["pin", "ds", "--path", "/data/nope"]),
        "missing path",
        "not found",
    );
    refused(
        dataset(
            api,
            Some(TEAM_A),
            &["pin", "ds", "--path", "/data/ds", "--ttl", "soon"],
        ),
        "bad ttl",
        "--ttl",
    );
    refused(
        dataset(
            api,
            Some(TEAM_A),
            &["pin", "ds", "--path", "/data/ds", "--nodes", "w1,w9"],
        ),
        "unknown node",
        "not a live member",
    );
    refused(
        dataset(api, Some(TINY), &["pin", "ds", "--path", "/data/ds"]),
        "over quota",
        "quota",
    );
    // w3's 100 MiB cannot hold the 259 MiB dataset, though w1 (asked) has 1 GiB.
    refused(
        dataset(
            api,
            Some(TEAM_A),
            &["pin", "ds", "--path", "/data/ds", "--nodes", "w3"],
        ),
        "over w3's capacity",
        "node \"w3\" would hold 271557206 bytes of this dataset but has 104857600 bytes free",
    );
    refused(
        dataset(
            api,
            Some(TEAM_A),
            &["pin", "ds", "--path", "/data/ds", "--tenant", "tiny"],
        ),
        "pin for another tenant",
        "cannot pin for tenant",
    );
    let list = ok(dataset(api, Some(ADMIN), &["list", "--json"]), "list");
    assert_eq!(
        serde_json::from_str::<Value>(&list).unwrap(),
        Value::Array(vec![])
    );

    // Pin onto w1 and w2; nothing is loaded yet, so `wait` times out.
    ok(
        dataset(
            api,
            Some(TEAM_A),
            &["pin", "ds", "--path", "/data/ds", "--nodes", "w1,w2"],
        ),
        "pin",
    );
    let s = status(api, TEAM_A, "ds");
    assert_eq!(s["files"], 501);
    assert_eq!(s["state"], "pending");
    refused(
        dataset(
            api,
            Some(TEAM_A),
            &["wait", "ds", "--node", "w1", "--timeout", "2s"],
        ),
        "wait before load",
        "not ready",
    );
    refused(
        dataset(api, Some(TINY), &["status", "ds"]),
        "another tenant's dataset",
        "no dataset named",
    );

    // Load; kill -9 w2 in the middle of it; restart it; the load completes.
    ok(dataset(api, Some(TEAM_A), &["load", "ds"]), "load");
    wait_until(
        "w2 to load some of its share",
        Duration::from_secs(120),
        || blocks_on_disk(&caches[1], "ds") >= 20,
    );
    let mid = status(api, TEAM_A, "ds");
    assert!(mid["percent"].as_f64().unwrap() < 100.0, "{mid}");
    workers[1].kill9();
    let w2_done_at_crash = blocks_on_disk(&caches[1], "ds");
    workers[1].spawn();
    let out = ok(
        dataset(api, Some(TEAM_A), &["wait", "ds", "--timeout", "300s"]),
        "wait for the load",
    );
    assert!(out.contains("ready"), "{out}");

    // 100% means every byte is on the set: check the disks.
    let s = status(api, TEAM_A, "ds");
    assert_eq!(s["state"], "ready", "{s}");
    assert_eq!(s["percent"], 100.0);
    let (on1, on2, on3) = (
        stored(&caches[0], "ds"),
        stored(&caches[1], "ds"),
        stored(&caches[2], "ds"),
    );
    assert!(on3.is_empty(), "w3 is not in the node set");
    assert!(
        !on1.is_empty() && !on2.is_empty(),
        "files striped over both"
    );
    for (path, size) in &ds_files {
        let rel = path.strip_prefix("ds/").unwrap();
        let holder = if on1.contains_key(rel) {
            &caches[0]
        } else {
            &caches[1]
        };
        assert!(
            on1.contains_key(rel) || on2.contains_key(rel),
            "{rel} on no node"
        );
        let file = holder.join("datasets/ds/files").join(rel);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), *size);
    }
    assert_eq!(
        sha(&caches[0].join("datasets/ds/files/big.bin"))
            .max(sha(&caches[1].join("datasets/ds/files/big.bin"))),
        sha(&local.join("ds/big.bin"))
    );
    // Backend GETs: w1 fetched each of its blocks once; w2, after its restart, fetched
    // exactly the blocks it had not written before the crash.
    let blocks = |m: &BTreeMap<String, u64>| m.values().map(|s| s.div_ceil(BLOCK)).sum::<u64>();
    assert_eq!(blocks(&on1) + blocks(&on2), ds_blocks);
    assert_eq!(
        workers[0].gets(),
        blocks(&on1) as f64,
        "w1: one GET per block"
    );
    assert_eq!(
        workers[1].gets(),
        (blocks(&on2) - w2_done_at_crash) as f64,
        "w2: only what it had not written before the crash"
    );
    assert_eq!(workers[2].gets(), 0.0);

    // A pin with a TTL lapses by itself.
    ok(
        dataset(
            api,
            Some(ADMIN),
            &["pin", "short", "--path", "/data/ds/small", "--ttl", "2s"],
        ),
        "pin with ttl",
    );
    wait_until("the TTL to unpin", Duration::from_secs(20), || {
        !dataset(api, Some(ADMIN), &["status", "short"])
            .status
            .success()
    });

    // Passthrough: a client beside w1 opens w1's files from its disk; the kernel serves the
    // reads, so they never reach the FUSE daemon.
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let client = mount_cluster_with(
        &etcd_url,
        &tls,
        &mnt,
        &["--local-node", "w1", "--job", "train-1", "--attr-ttl", "1s"],
    );
    let read_on1 = || {
        for rel in on1.keys() {
            let path = format!("ds/{rel}");
            assert!(
                std::fs::read(mnt.join("data").join(&path)).unwrap() == content(&path, tree[&path]),
                "{path} through passthrough"
            );
        }
    };
    drop_page_cache();
    read_on1();
    let m = client.metrics();
    assert!(
        metric(&m, "granary_fuse_passthrough_opens_total", &[]) >= on1.len() as f64,
        "passthrough opens"
    );
    assert_eq!(
        metric(&m, "granary_fuse_ops_total", &[("op", "read")]),
        0.0,
        "no read reached the daemon"
    );
    // The next epoch, past the attribute TTL: the pins are unchanged, so the kernel still
    // holds the pinned entries and no lookup of them reaches the daemon (only `data`, outside
    // the pin, is looked up again, once a second at most), and every open is a passthrough
    // open again.
    // (Read twice: an entry looked up before the mount first heard the epoch, which it asks
    // for once it is up, is trusted for the attribute TTL only.)
    std::thread::sleep(Duration::from_millis(2500));
    read_on1();
    std::thread::sleep(Duration::from_millis(2500));
    let m = client.metrics();
    let lookups = metric(&m, "granary_fuse_ops_total", &[("op", "lookup")]);
    let opens = metric(&m, "granary_fuse_passthrough_opens_total", &[]);
    let started = std::time::Instant::now();
    read_on1();
    let m = client.metrics();
    let again = metric(&m, "granary_fuse_ops_total", &[("op", "lookup")]) - lookups;
    assert!(
        again <= 1.0 + started.elapsed().as_secs_f64().ceil(),
        "{again} lookups for {} pinned files past the 1 s attribute TTL",
        on1.len()
    );
    assert!(
        metric(&m, "granary_fuse_passthrough_opens_total", &[]) - opens >= on1.len() as f64,
        "passthrough opens in the next epoch"
    );
    assert_eq!(metric(&m, "granary_fuse_pins_epoch_known", &[]), 1.0);
    // Files held by w2 come through the daemon, from w2's store: still no backend GET.
    let gets_before: f64 = workers.iter().map(Worker::gets).sum();
    for rel in on2.keys().take(50) {
        let path = format!("ds/{rel}");
        assert!(
            std::fs::read(mnt.join("data").join(&path)).unwrap() == content(&path, tree[&path])
        );
    }
    assert_eq!(workers.iter().map(Worker::gets).sum::<f64>(), gets_before);

    // Eviction pressure: 144 MiB of unpinned reads through 64 MiB memory caches drop no
    // pinned byte.
    for i in 0..6 {
        let path = format!("other/o{i}");
        assert_eq!(sha(&mnt.join("data").join(&path)), sha(&local.join(&path)));
    }
    // Those cold reads waited for the backend: the client's data-stall time shows it, labelled
    // by the namespace directory and the job.
    let m = client.metrics();
    let stall = [("dataset", "data"), ("training_job", "train-1")];
    assert!(
        metric(&m, "granary_fuse_stall_seconds_count", &stall) > 0.0,
        "stalled reads"
    );
    assert!(
        metric(&m, "granary_fuse_stall_seconds_sum", &stall) > 0.0,
        "stall time"
    );
    assert_eq!(stored(&caches[0], "ds"), on1);
    assert_eq!(stored(&caches[1], "ds"), on2);
    assert_eq!(status(api, TEAM_A, "ds")["percent"], 100.0);

    // A damaged file on w1's disk is found by `status --verify` and loaded again.
    let victim = on1.keys().next().unwrap().clone();
    let victim_file = caches[0].join("datasets/ds/files").join(&victim);
    let mut bytes = std::fs::read(&victim_file).unwrap();
    bytes[7] ^= 0xff;
    std::fs::write(&victim_file, &bytes).unwrap();
    let out = ok(
        dataset(api, Some(TEAM_A), &["status", "ds", "--verify", "--json"]),
        "verify",
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(
        node(&v, "w1").unwrap()["repaired"].as_u64().unwrap() >= 1,
        "{v}"
    );
    ok(
        dataset(api, Some(TEAM_A), &["wait", "ds", "--timeout", "60s"]),
        "wait after repair",
    );
    let path = format!("ds/{victim}");
    assert!(std::fs::read(&victim_file).unwrap() == content(&path, tree[&path]));

    // A restart keeps everything: w1 is ready at once and serves without a backend GET.
    assert!(client.stop().success());
    workers[0].stop();
    workers[0].spawn();
    wait_for_members(&etcd_url, 3);
    let s = status(api, TEAM_A, "ds");
    assert_eq!(node(&s, "w1").unwrap()["state"], "ready", "{s}");
    assert_eq!(s["percent"], 100.0);
    let mnt2 = work.path().join("mnt2");
    std::fs::create_dir(&mnt2).unwrap();
    let client = mount_cluster_with(&etcd_url, &tls, &mnt2, &["--local-node", "w3"]);
    for rel in on1.keys().take(50) {
        let path = format!("ds/{rel}");
        assert!(
            std::fs::read(mnt2.join("data").join(&path)).unwrap() == content(&path, tree[&path])
        );
    }
    assert_eq!(workers[0].gets(), 0.0, "no refetch after the restart");
    let _ = http_get(&workers[0].metrics, "/metrics");
    assert!(client.stop().success());

    // Unpin: the files leave the stores.
    ok(dataset(api, Some(TEAM_A), &["unpin", "ds"]), "unpin");
    wait_until("the stores to be freed", Duration::from_secs(20), || {
        !caches[0].join("datasets/ds").exists() && !caches[1].join("datasets/ds").exists()
    });
    refused(
        dataset(api, Some(TEAM_A), &["status", "ds"]),
        "status after unpin",
        "no dataset named",
    );
    drop(workers);
}
