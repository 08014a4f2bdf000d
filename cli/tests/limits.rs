//! Secrets and limits of the Datasets API against a real worker (one node over a POSIX source,
//! driven by the `granary dataset` CLI and by a raw API client): tokens read from files, the
//! scheduler's limited role, range checks on TTLs, replicas and node lists, the file quota and
//! the dashboard's overview, each refusal a clear error that changes nothing.

mod support;

use granary_net::datasets::DatasetClient;
use granary_proto::datasets::PinRequest;
use serde_json::Value;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::cluster::Worker;
use support::free_port;
use support::process::{Finished, granary, run_with_timeout};

const ADMIN: &str = "admin-token-from-a-file-0123";
const HOOK: &str = "scheduler-token-from-a-file-0123";
const TEAM: &str = "team-a-token-from-a-file-0123";

/// `granary dataset --server api --token-file FILE args...`
fn dataset(api: &str, token_file: Option<&Path>, args: &[&str]) -> Finished {
    let mut all = vec!["dataset", "--server", api];
    if let Some(f) = token_file {
        all.extend(["--token-file", f.to_str().unwrap()]);
    }
    all.extend_from_slice(args);
    let mut cmd = granary(&all, &[]);
    cmd.env_remove("GRANARY_TOKEN")
        .env_remove("GRANARY_TOKEN_FILE");
    run_with_timeout(cmd, Duration::from_secs(60))
}

fn ok(out: Finished, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", out.stderr);
    out.stdout
}

fn refused(out: Finished, what: &str, says: &str) {
    assert!(!out.status.success(), "{what} succeeded: {}", out.stdout);
    assert!(
        out.stderr.contains(says),
        "{what} should say {says:?}: {}",
        out.stderr
    );
}

/// The names of the datasets the admin sees.
fn pinned(api: &str, admin: &Path) -> Vec<String> {
    let list: Value =
        serde_json::from_str(&ok(dataset(api, Some(admin), &["list", "--json"]), "list")).unwrap();
    let mut names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// `GET path` with an optional bearer token: (status code, body).
fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

fn overview_datasets(body: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(body).unwrap();
    v["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn tokens_from_files_a_limited_scheduler_range_checks_and_file_quotas() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for (dir, n) in [("set", 5), ("many", 10)] {
        std::fs::create_dir_all(src.join(dir)).unwrap();
        for i in 0..n {
            std::fs::write(src.join(dir).join(format!("f{i}")), vec![i as u8; 1000]).unwrap();
        }
    }
    // Tokens as a Kubernetes Secret volume holds them: one file each (one with a newline).
    let secrets = work.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    let secret = |name: &str, text: &str| {
        let p = secrets.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let admin = secret("admin", ADMIN);
    let hook = secret("scheduler", &format!("{HOOK}\n"));
    let team = secret("team-a", TEAM);
    let config = work.path().join("w1.toml");
    let api = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &config,
        format!(
            "node_id = \"w1\"\nlisten = \"{api}\"\n\
             [cache]\ndir = \"{cache}\"\nmemory = \"64MiB\"\ndisk = \"0\"\n\
             [datasets]\ncapacity = \"1GiB\"\nadmin_token_file = \"{admin}\"\n\
             scheduler_token_file = \"{hook}\"\n\
             [[tenant]]\nname = \"team-a\"\ntoken_file = \"{team}\"\nquota_files = 12\n\
             [[mount]]\npath = \"/data\"\nsource = \"file://{src}\"\n",
            cache = work.path().join("cache").display(),
            admin = admin.display(),
            hook = hook.display(),
            team = team.display(),
            src = src.display(),
        ),
    )
    .unwrap();
    let _worker = Worker::start("w1", &config, &metrics);
    let api = api.as_str();

    // A token read from a file works, and no token is refused.
    ok(
        dataset(api, Some(&team), &["pin", "set", "--path", "/data/set"]),
        "pin by file token",
    );
    refused(
        dataset(api, None, &["pin", "x", "--path", "/data/many"]),
        "no token",
        "no token",
    );

    // The scheduler's token reads status and loads; it cannot pin, unpin or verify.
    let hook_list = ok(dataset(api, Some(&hook), &["list", "--json"]), "hook list");
    assert!(hook_list.contains("\"set\""), "{hook_list}");
    ok(
        dataset(
            api,
            Some(&hook),
            &["load", "set", "--wait", "--timeout", "30s"],
        ),
        "hook load",
    );
    for args in [
        vec!["pin", "hooked", "--path", "/data/many"],
        vec!["unpin", "set"],
        vec!["status", "set", "--verify"],
    ] {
        refused(
            dataset(api, Some(&hook), &args),
            &format!("hook {args:?}"),
            "role \"scheduler\" may only read status and load pinned datasets",
        );
    }

    // Out of range: the CLI refuses before asking...
    refused(
        dataset(
            api,
            Some(&admin),
            &[
                "pin",
                "long",
                "--path",
                "/data/many",
                "--ttl",
                "999999999999h",
            ],
        ),
        "ttl 999999999999h",
        "--ttl: ttl of 3599999999996400s is over the limit of 315360000s",
    );
    refused(
        dataset(
            api,
            Some(&admin),
            &[
                "pin",
                "wide",
                "--path",
                "/data/many",
                "--replicas",
                "4294967295",
            ],
        ),
        "replicas 4294967295",
        "--replicas: replicas 4294967295 is out of range: give 1 to 1024",
    );
    // ... and the worker refuses what a raw client sends.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt
        .block_on(DatasetClient::connect(api, Some(ADMIN)))
        .unwrap();
    let raw = |name: &str, ttl: Option<Duration>, replicas: usize, nodes: Vec<String>| {
        rt.block_on(client.pin(&PinRequest {
            name: name.into(),
            path: "/data/many".into(),
            tenant: None,
            ttl,
            nodes,
            replicas,
        }))
    };
    let e = raw("wrap", Some(Duration::from_secs(u64::MAX)), 1, vec![]).unwrap_err();
    assert!(e.to_string().contains("over the limit"), "{e}");
    let e = raw("wide", None, u32::MAX as usize, vec![]).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    let e = raw("crowd", None, 1, vec!["w1".to_string(); 5000]).unwrap_err();
    assert!(e.to_string().contains("5000 nodes listed"), "{e}");
    let e = raw("odd", None, 1, vec!["a b".into()]).unwrap_err();
    assert!(e.to_string().contains("invalid node id"), "{e}");
    // A request over the service's decoding limit (2 MiB) is refused before it is decoded.
    let e = raw("huge", None, 1, vec!["n".repeat(1000); 3000]).unwrap_err();
    assert!(e.to_string().contains("2097152"), "{e}");

    // The longest TTL allowed expires ten years on, not at once.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let s = raw("decade", Some(Duration::from_secs(315_360_000)), 1, vec![]).unwrap();
    let expires = s.expires_at.unwrap();
    assert!(
        (now + 315_360_000..now + 315_360_000 + 60).contains(&expires),
        "{expires}"
    );
    ok(dataset(api, Some(&admin), &["unpin", "decade"]), "unpin");

    // The file quota: 5 pinned + 10 more is over 12.
    refused(
        dataset(api, Some(&team), &["pin", "many", "--path", "/data/many"]),
        "over the file quota",
        "tenant \"team-a\" would pin 10 files with 5 already pinned, over its quota of 12 files",
    );

    // Nothing of the refused requests was pinned.
    assert_eq!(pinned(api, &admin), vec!["set".to_string()]);

    // The dashboard's overview: a token's own view, 401 without one.
    let (code, body) = get(&metrics, "/api/overview", None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("no token"), "{body}");
    let (code, body) = get(&metrics, "/api/overview", Some("not-a-token-0123456789"));
    assert_eq!(code, 401, "{body}");
    assert!(!body.contains("\"set\""), "{body}");
    ok(
        dataset(
            api,
            Some(&admin),
            &["pin", "admins", "--path", "/data/many"],
        ),
        "admin pin",
    );
    let (code, body) = get(&metrics, "/api/overview", Some(TEAM));
    assert_eq!(code, 200, "{body}");
    assert_eq!(overview_datasets(&body), vec!["set".to_string()]);
    let (code, body) = get(&metrics, "/api/overview", Some(ADMIN));
    assert_eq!(code, 200, "{body}");
    let mut all = overview_datasets(&body);
    all.sort();
    assert_eq!(all, vec!["admins".to_string(), "set".to_string()]);
}
