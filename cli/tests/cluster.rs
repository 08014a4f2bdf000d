//! A real cluster on 127.0.0.1: etcd, three `granary server` workers with mutual TLS, an S3
//! server, and FUSE clients that read each block from the worker that owns it.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};
use support::backends::{S3Target, unique};
use support::cluster::{
    Spec, Worker, cluster_certs, drop_page_cache, mount_cluster, sha, start_workers, status,
    wait_for_members,
};
use support::data::{Tree, content, write_local};
use support::free_port;
use support::own::OwnService;
use support::process::{granary, run_with_timeout, signal};

#[test]
fn three_workers_spread_blocks_fetch_once_and_survive_a_crash_and_an_etcd_pause() {
    // Ceph RGW: it serves ranged GETs of a large object without reading all of it.
    let s3 = S3Target::rgw();
    let etcd = OwnService::start("etcd");
    let etcd_url = etcd.get("GRANARY_TEST_ETCD");
    let work = tempfile::tempdir().unwrap();
    let tls = cluster_certs(work.path(), 3, &etcd);

    // The dataset: a 512 MiB file and 1,000 small files.
    let prefix = unique("cluster");
    let mut tree = Tree::new();
    tree.insert("big.bin".into(), 512 << 20);
    for i in 0..1000 {
        tree.insert(format!("small/f{i:04}"), 2000 + i * 7);
    }
    let local = work.path().join("local");
    write_local(&local, &tree);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(s3.upload(&prefix, &tree));

    let spec = Spec {
        s3: &s3,
        prefix: &prefix,
        etcd: &etcd_url,
        tls: &tls,
        memory: "384MiB",
        extra: "",
        extra_for: &[],
    };
    let mut workers = start_workers(work.path(), 3, &spec).workers;
    wait_for_members(&etcd_url, 3);

    // Client A reads everything: right bytes, blocks spread over the three workers.
    let mnt_a = work.path().join("mnt-a");
    std::fs::create_dir(&mnt_a).unwrap();
    let a = mount_cluster(&etcd_url, &tls, &mnt_a);
    assert_eq!(
        sha(&mnt_a.join("data/big.bin")),
        sha(&local.join("big.bin"))
    );
    for i in (0..1000).step_by(1) {
        let path = format!("small/f{i:04}");
        assert!(
            std::fs::read(mnt_a.join("data").join(&path)).unwrap() == content(&path, tree[&path]),
            "{path}"
        );
    }
    let s = status(&etcd_url);
    for m in s["members"].as_array().unwrap() {
        assert!(
            m["reads"]["backend"].as_u64().unwrap() > 50,
            "blocks are spread over every worker: {s}"
        );
    }
    let gets: f64 = workers.iter().map(Worker::gets).sum();
    assert_eq!(
        gets,
        128.0 + 1000.0,
        "each block fetched from the backend exactly once"
    );

    // Client B, another mount: zero backend GETs.
    let mnt_b = work.path().join("mnt-b");
    std::fs::create_dir(&mnt_b).unwrap();
    let b = mount_cluster(&etcd_url, &tls, &mnt_b);
    assert_eq!(
        sha(&mnt_b.join("data/big.bin")),
        sha(&local.join("big.bin"))
    );
    for i in (0..1000).step_by(10) {
        let path = format!("small/f{i:04}");
        assert!(
            std::fs::read(mnt_b.join("data").join(&path)).unwrap() == content(&path, tree[&path])
        );
    }
    assert_eq!(
        workers.iter().map(Worker::gets).sum::<f64>(),
        gets,
        "a second client costs no backend GET"
    );

    // kill -9 a worker in the middle of a read: the reader finishes with the right bytes.
    drop_page_cache();
    let reader = {
        let path = mnt_b.join("data/big.bin");
        std::thread::spawn(move || sha(&path))
    };
    std::thread::sleep(Duration::from_millis(300));
    workers[1].kill9();
    assert_eq!(
        reader.join().unwrap(),
        sha(&local.join("big.bin")),
        "bytes after a worker crash"
    );
    wait_for_members(&etcd_url, 2);
    workers[1].spawn();
    wait_for_members(&etcd_url, 3);

    // etcd paused for 10 s: cached data keeps reading; membership recovers after.
    let etcd_pid = etcd.pid();
    signal(etcd_pid, "STOP");
    drop_page_cache();
    let start = Instant::now();
    assert_eq!(
        sha(&mnt_a.join("data/big.bin")),
        sha(&local.join("big.bin")),
        "reads while etcd is down"
    );
    std::thread::sleep(Duration::from_secs(10).saturating_sub(start.elapsed()));
    signal(etcd_pid, "CONT");
    wait_for_members(&etcd_url, 3);

    assert!(a.stop().success());
    assert!(b.stop().success());
    drop(workers);
}

#[test]
fn a_worker_with_a_certificate_from_another_ca_cannot_join() {
    let etcd = OwnService::start("etcd");
    let etcd_url = etcd.get("GRANARY_TEST_ETCD");
    let work = tempfile::tempdir().unwrap();
    // w1's certificate from the cluster's CA (etcd's); w2's from a CA of its own.
    let tls = cluster_certs(work.path(), 1, &etcd);
    let rogue = work.path().join("rogue");
    let out = run_with_timeout(
        granary(&["certs", "--out", rogue.to_str().unwrap(), "w2"], &[]),
        Duration::from_secs(20),
    );
    assert!(out.status.success());
    let source = work.path().join("src");
    std::fs::create_dir(&source).unwrap();
    let config = |id: &str, tls: &Path| {
        let path = work.path().join(format!("{id}.toml"));
        std::fs::write(
            &path,
            format!(
                "node_id = \"{id}\"\nlisten = \"127.0.0.1:{}\"\n[cache]\ndir = \"{}\"\ndisk = \"0\"\n[cluster]\netcd = [\"{}\"]\n[tls]\ndir = \"{}\"\n[[mount]]\npath = \"/\"\nsource = \"{}\"\n",
                free_port(),
                work.path().join(format!("cache-{id}")).display(),
                etcd_url,
                tls.display(),
                source.display()
            ),
        )
        .unwrap();
        path
    };
    let _w1 = Worker::start(
        "w1",
        &config("w1", &tls),
        &format!("127.0.0.1:{}", free_port()),
    );
    wait_for_members(&etcd_url, 1);
    let out = run_with_timeout(
        granary(
            &["server", "--config", config("w2", &rogue).to_str().unwrap()],
            &[],
        ),
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success(),
        "a worker with a foreign certificate joined"
    );
    assert!(
        out.stderr.contains("TLS") || out.stderr.contains("certificate"),
        "says why: {}",
        out.stderr
    );
    let s = status(&etcd_url);
    assert_eq!(s["members"].as_array().unwrap().len(), 1, "{s}");
}
