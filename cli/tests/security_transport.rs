//! The attacks on Granary's transport, against a running cluster on loopback (etcd with TLS and
//! client-certificate auth, two workers, an S3 server): each is refused with an error naming the
//! reason, and nothing changes.
//!
//! - the worker API read without credentials (plaintext, TLS without a certificate, a
//!   certificate from another CA), and `granary mount --server` without TLS;
//! - a bearer token sent in clear;
//! - etcd reached without a client certificate, or over plain HTTP;
//! - forged, duplicated and deleted member records, a forged `--local-node`, a forged pin.

mod support;

use granary_net::client::GrpcCache;
use granary_net::tls::{TlsFiles, TlsIdentity};
use granary_proto::{ApiError, CacheApi, ObjectRef};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::backends::{S3Target, unique};
use support::cluster::{Spec, cluster_certs, mount_cluster_with, start_workers, wait_for_members};
use support::own::OwnService;
use support::process::{granary, run_with_timeout};
use support::{http_get, metric, wait_until};

const ADMIN: &str = "admin-token-0123456789";

/// `etcdctl` against the test's etcd with `flags` (certificates), returning (ok, output).
fn etcdctl(url: &str, flags: &[String], args: &[&str]) -> (bool, String) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={url}"))
        .args(["--dial-timeout=3s", "--command-timeout=5s"])
        .args(flags)
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn members(etcd: &str) -> Vec<String> {
    let s = support::cluster::status(etcd);
    s["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node_id"].as_str().unwrap().to_string())
        .collect()
}

/// The fewest records of `kind` any one worker refused.
fn refused_by_each(metrics: &[String], kind: &str) -> f64 {
    metrics
        .iter()
        .map(|m| {
            metric(
                &http_get(m, "/metrics"),
                "granary_etcd_records_refused_total",
                &[("kind", kind)],
            )
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
fn the_worker_api_and_etcd_refuse_whoever_lacks_the_credential_they_need() {
    let s3 = S3Target::moto();
    let etcd = OwnService::start("etcd");
    let etcd_url = etcd.get("GRANARY_TEST_ETCD");
    let etcd_tls = Path::new(&etcd.get("GRANARY_TEST_ETCD_TLS")).to_path_buf();
    let work = tempfile::tempdir().unwrap();
    let tls = cluster_certs(work.path(), 2, &etcd);
    let prefix = unique("transport");
    support::keys::put(
        &s3.boto3(),
        &prefix,
        &[
            ("a.bin".to_string(), vec![7u8; 100_000]),
            ("dir/b.txt".to_string(), b"hello".to_vec()),
        ],
    );
    let extra = format!("[datasets]\nadmin_token = \"{ADMIN}\"\n");
    let spec = Spec {
        s3: &s3,
        prefix: &prefix,
        etcd: &etcd_url,
        tls: &tls,
        memory: "64MiB",
        extra: &extra,
        extra_for: &[],
    };
    let started = start_workers(work.path(), 2, &spec);
    wait_for_members(&etcd_url, 2);
    let api = started.api[0].clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t = Duration::from_secs(5);

    // 1. Plaintext gRPC to a TLS worker: no answer, and the error says to use TLS.
    let e = rt
        .block_on(GrpcCache::connect(&api, None, None, t))
        .unwrap_err();
    assert!(e.to_string().contains("--tls-dir"), "{e}");

    // 2. TLS with only the CA (no client certificate): Info answers (for status), but
    //    listings, block reads and LocalCopy are for nodes only.
    let ca_only = TlsIdentity::trust_only(&tls.join("ca.pem")).unwrap();
    let anonymous = rt
        .block_on(GrpcCache::connect(&api, Some(&ca_only), None, t))
        .unwrap();
    assert_eq!(
        anonymous.dataset_store(),
        None,
        "the store's path is for nodes"
    );
    let object = ObjectRef {
        mount: 0,
        id: granary_core::ObjectId {
            backend: s3.uri(&prefix),
            key: format!("{prefix}/a.bin"),
            size: 100_000,
            etag: None,
            version: None,
            mtime_ns: 0,
        },
    };
    for (what, result) in [
        ("list", rt.block_on(anonymous.list("/data")).map(|_| ())),
        (
            "stat",
            rt.block_on(anonymous.stat("/data/a.bin")).map(|_| ()),
        ),
        (
            "read_block",
            rt.block_on(anonymous.read_block(&object, 0)).map(|_| ()),
        ),
        (
            "local_copy",
            rt.block_on(anonymous.local_copy(&object)).map(|_| ()),
        ),
    ] {
        match result {
            Err(ApiError::Denied(m)) => {
                assert!(m.contains("client certificate"), "{what}: {m}")
            }
            other => panic!("{what} without a certificate: {other:?}"),
        }
    }
    // With the client's certificate the same calls work.
    let client = TlsIdentity::load(&TlsFiles::in_dir(&tls, "client")).unwrap();
    let node = rt
        .block_on(GrpcCache::connect(&api, Some(&client), None, t))
        .unwrap();
    assert!(node.dataset_store().is_some());
    let listed = rt.block_on(node.list("/data")).unwrap();
    assert!(listed.iter().any(|e| e.name == "a.bin"), "{listed:?}");

    // 3. A certificate from another CA: the handshake fails.
    let rogue_dir = work.path().join("rogue");
    let out = run_with_timeout(
        granary(
            &["certs", "--out", rogue_dir.to_str().unwrap(), "client"],
            &[],
        ),
        Duration::from_secs(20),
    );
    assert!(out.status.success());
    let rogue = TlsIdentity::load(&TlsFiles::in_dir(&rogue_dir, "client")).unwrap();
    let e = rt
        .block_on(GrpcCache::connect(&api, Some(&rogue), None, t))
        .unwrap_err();
    assert!(matches!(e, ApiError::Unavailable(_)), "{e:?}");

    // 4. `granary mount --server` without TLS: refused before mounting.
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = run_with_timeout(
        granary(&["mount", "--server", &api, mnt.to_str().unwrap()], &[]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "mounted without TLS");
    assert!(out.stderr.contains("--tls-dir"), "{}", out.stderr);
    assert!(!support::is_mounted(&mnt));

    // 5. A bearer token never travels in clear: plaintext is refused, TLS with the CA works.
    let out = run_with_timeout(
        granary(
            &["dataset", "--server", &api, "--token", ADMIN, "list"],
            &[],
        ),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "a token was accepted in clear");
    let ca_dir = work.path().join("ca-only");
    std::fs::create_dir(&ca_dir).unwrap();
    std::fs::copy(tls.join("ca.pem"), ca_dir.join("ca.pem")).unwrap();
    let out = run_with_timeout(
        granary(
            &[
                "dataset",
                "--server",
                &api,
                "--tls-dir",
                ca_dir.to_str().unwrap(),
                "--token",
                ADMIN,
                "list",
            ],
            &[],
        ),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", out.stderr);

    // 6. etcd without a client certificate, or over plain HTTP: refused.
    let ca_flag = vec![format!("--cacert={}", etcd_tls.join("ca.pem").display())];
    let (ok, text) = etcdctl(&etcd_url, &ca_flag, &["get", "--prefix", "/granary/"]);
    assert!(!ok, "etcd answered without a client certificate: {text}");
    let plain = etcd_url.replace("https://", "http://");
    let (ok, text) = etcdctl(&plain, &[], &["get", "--prefix", "/granary/"]);
    assert!(!ok, "etcd answered over plain HTTP: {text}");

    // 7. Forged and duplicated member records (written with a certificate etcd accepts: an
    //    attacker holding some cluster credential) are ignored by every reader; a deleted
    //    record is written again by its worker.
    let node_flags = vec![
        format!("--cacert={}", etcd_tls.join("ca.pem").display()),
        format!("--cert={}", etcd_tls.join("etcd.pem").display()),
        format!("--key={}", etcd_tls.join("etcd.key").display()),
    ];
    let forged = format!(
        "{{\"node_id\":\"evil\",\"data_addr\":\"127.0.0.1:{p}\",\"api_addr\":\"127.0.0.1:{p}\",\"memory_capacity\":0,\"disk_capacity\":0}}",
        p = support::free_port()
    );
    let (ok, text) = etcdctl(
        &etcd_url,
        &node_flags,
        &["put", "/granary/members/evil", &forged],
    );
    assert!(ok, "{text}");
    let (ok, w1_record) = etcdctl(
        &etcd_url,
        &node_flags,
        &["get", "--print-value-only", "/granary/members/w1"],
    );
    assert!(ok && w1_record.contains("\"record\""), "{w1_record}");
    let (ok, text) = etcdctl(
        &etcd_url,
        &node_flags,
        &["put", "/granary/members/w3", w1_record.trim()],
    );
    assert!(ok, "{text}");
    wait_until(
        "each worker refused both records",
        Duration::from_secs(10),
        || refused_by_each(&started.metrics, "member") >= 2.0,
    );
    let log = started.workers[0].log();
    assert!(log.contains("not a signed member record"), "{log}");
    assert!(log.contains("under another node's key"), "{log}");
    assert_eq!(members(&etcd_url), ["w1", "w2"]);

    let (ok, text) = etcdctl(&etcd_url, &node_flags, &["del", "/granary/members/w2"]);
    assert!(ok, "{text}");
    wait_until("w2 wrote its record again", Duration::from_secs(10), || {
        etcdctl(
            &etcd_url,
            &node_flags,
            &["get", "--keys-only", "/granary/members/w2"],
        )
        .1
        .contains("/granary/members/w2")
    });
    assert_eq!(members(&etcd_url), ["w1", "w2"]);

    // 8. A client told that the forged member is its local worker never trusts it: it reads
    //    the right bytes from the real workers.
    let mnt = work.path().join("mnt-local");
    std::fs::create_dir(&mnt).unwrap();
    let m = mount_cluster_with(&etcd_url, &tls, &mnt, &["--local-node", "evil"]);
    assert_eq!(
        std::fs::read(mnt.join("data/a.bin")).unwrap(),
        vec![7u8; 100_000]
    );
    drop(m);

    // 9. A forged pin whose manifest walks out of the store is ignored (logged, counted), and
    //    nothing is written outside the store.
    let outside = work.path().join("outside");
    let pin = serde_json::json!({
        "name": "evil", "tenant": "default", "nodes": ["w1", "w2"], "replicas": 1,
        "expires_at": null, "created_at": 1, "load": true, "mount": 0,
        "root_key": prefix, "backend": s3.uri(&prefix),
        "manifest": {"root": "/data", "files": [
            {"path": format!("../../../../../..{}", outside.display()), "size": 5,
             "etag": null, "version": null, "mtime_ns": 0}
        ]},
        "exact_names": true
    });
    let (ok, text) = etcdctl(
        &etcd_url,
        &node_flags,
        &["put", "/granary/pins/evil", &pin.to_string()],
    );
    assert!(ok, "{text}");
    wait_until(
        "each worker refused the pin",
        Duration::from_secs(10),
        || refused_by_each(&started.metrics, "pin") >= 1.0,
    );
    let log = started.workers[0].log();
    assert!(
        log.contains("ignoring a pin that does not pass its checks")
            && log.contains("manifest path"),
        "{log}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!outside.exists(), "a file was written outside the store");
}
