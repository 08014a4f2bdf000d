//! The built-in dashboard at `/` of a worker's metrics port, opened in a real headless Chromium
//! against a running three-worker cluster with a loaded dataset: the numbers on the rendered
//! page are those of `granary status --json` and `granary dataset status --json`; without a
//! token the page asks for one and shows no dataset, a tenant's token shows its own pins only; a
//! screenshot is saved as target/dashboard.png.

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::backends::{S3Target, unique};
use support::cluster::{
    Spec, Started, cluster_certs, drop_page_cache, mount_cluster, start_workers, status, tls_flags,
    wait_for_members,
};
use support::data::{Tree, content};
use support::own::OwnService;
use support::process::{granary, run_with_timeout};

const ADMIN: &str = "dashboard-admin-token-0123";
const TEAM: &str = "dashboard-team-token-0123";

/// The page after its scripts ran: Chromium's DOM dump.
fn rendered(url: &str) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=6000",
            "--dump-dom",
            url,
        ])
        .output()
        .expect("chromium is installed (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The text of the element after `marker` (up to the next `<`).
fn after<'a>(dom: &'a str, marker: &str) -> &'a str {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} not on the page"));
    let rest = &dom[at + marker.len()..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap();
    rest[start..start + end].trim()
}

/// The `data-value` attribute after `marker`.
fn value_after<'a>(dom: &'a str, marker: &str) -> &'a str {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} not on the page"));
    let rest = &dom[at..];
    let v = rest.find("data-value=\"").unwrap() + "data-value=\"".len();
    let end = rest[v..].find('"').unwrap();
    &rest[v..v + end]
}

#[test]
fn the_dashboard_shows_what_status_says() {
    let s3 = S3Target::moto();
    let etcd = OwnService::start("etcd");
    let etcd_url = etcd.get("GRANARY_TEST_ETCD");
    let work = tempfile::tempdir().unwrap();
    let tls = cluster_certs(work.path(), 3, &etcd);
    let prefix = unique("dashboard");
    let mut tree = Tree::new();
    for i in 0..12 {
        tree.insert(format!("read/f{i:02}"), 600_000 + i * 100);
    }
    for i in 0..8 {
        tree.insert(format!("set/s{i}"), 70_000 + i);
    }
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(s3.upload(&prefix, &tree));

    let spec = Spec {
        s3: &s3,
        prefix: &prefix,
        etcd: &etcd_url,
        tls: &tls,
        memory: "64MiB",
        extra: &format!(
            "[datasets]\nadmin_token = \"{ADMIN}\"\n\
             [[tenant]]\nname = \"team-a\"\ntoken = \"{TEAM}\"\n"
        ),
        extra_for: &[],
    };
    let Started {
        workers,
        api: apis,
        metrics,
        ..
    } = start_workers(work.path(), 3, &spec);
    wait_for_members(&etcd_url, 3);

    // A workload (every file read cold, then again from the caches) and a loaded dataset.
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let client = mount_cluster(&etcd_url, &tls, &mnt);
    for _ in 0..2 {
        drop_page_cache();
        for (path, size) in tree.iter().filter(|(p, _)| p.starts_with("read/")) {
            assert!(std::fs::read(mnt.join("data").join(path)).unwrap() == content(path, *size));
        }
    }
    assert!(client.stop().success());
    let api = apis[0].clone();
    for (token, args) in [
        (
            ADMIN,
            vec!["pin", "train", "--path", "/data/set", "--nodes", "w2,w3"],
        ),
        (ADMIN, vec!["load", "train", "--wait", "--timeout", "60s"]),
        (TEAM, vec!["pin", "mine", "--path", "/data/read"]),
    ] {
        let tls = tls_flags(&api);
        let mut all = vec!["dataset", "--server", api.as_str(), "--token", token];
        all.extend(tls.iter().map(String::as_str));
        all.extend(args);
        let out = run_with_timeout(granary(&all, &[]), Duration::from_secs(90));
        assert!(out.status.success(), "{all:?}: {}", out.stderr);
    }

    // Without a token the page asks for one and shows no dataset.
    let page = format!("http://{}/", metrics[0]);
    let dom = rendered(&page);
    assert!(dom.contains("data-auth=\"needed\""), "{dom}");
    assert!(
        after(&dom, "id=\"auth-error\"").contains("no token"),
        "{dom}"
    );
    for name in ["train", "mine"] {
        assert!(!dom.contains(&format!("data-dataset=\"{name}\"")), "{dom}");
    }
    // A tenant's token: its own pin only.
    let dom = rendered(&format!("{page}#token={TEAM}"));
    assert!(dom.contains("data-dataset=\"mine\""), "{dom}");
    assert!(!dom.contains("data-dataset=\"train\""), "{dom}");
    assert_eq!(after(&dom, "id=\"dataset-count\""), "1");

    // The page with the admin's token, rendered by Chromium, against the CLI's view of the same
    // quiet cluster.
    let dom = rendered(&format!("{page}#token={ADMIN}"));
    let s = status(&etcd_url);
    assert_eq!(after(&dom, "id=\"members-up\""), "3/3", "{dom}");
    // The page shows the serving worker's own view of the membership.
    let w1 = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["node_id"] == "w1")
        .unwrap();
    assert_eq!(
        after(&dom, "id=\"epoch\""),
        w1["membership_epoch"].to_string()
    );
    let (mut hits, mut all) = (0u64, 0u64);
    for m in s["members"].as_array().unwrap() {
        let id = m["node_id"].as_str().unwrap();
        let row = &dom[dom.find(&format!("data-node=\"{id}\"")).expect(id)..];
        for tier in ["memory", "disk", "backend", "peer"] {
            assert_eq!(
                after(row, &format!("data-field=\"reads_{tier}\"")),
                m["reads"][tier].to_string(),
                "{id} reads {tier}"
            );
        }
        hits += m["reads"]["memory"].as_u64().unwrap() + m["reads"]["disk"].as_u64().unwrap();
        all += m["reads"]["memory"].as_u64().unwrap()
            + m["reads"]["disk"].as_u64().unwrap()
            + m["reads"]["backend"].as_u64().unwrap();
    }
    assert!(
        all > 0 && hits * 2 == all,
        "a cold and a hot pass: {hits}/{all}"
    );
    assert_eq!(
        after(&dom, "id=\"cluster-hit-ratio\""),
        format!("{:.1}%", 100.0 * hits as f64 / all as f64)
    );
    let out = run_with_timeout(
        granary(
            &[
                "dataset",
                "--server",
                &api,
                "--tls-dir",
                tls.to_str().unwrap(),
                "--token",
                ADMIN,
                "status",
                "train",
                "--json",
            ],
            &[],
        ),
        Duration::from_secs(20),
    );
    let d: Value = serde_json::from_str(&out.stdout).unwrap();
    let row = &dom[dom.find("data-dataset=\"train\"").expect("dataset row")..];
    assert_eq!(
        after(row, "data-field=\"state\""),
        d["state"].as_str().unwrap()
    );
    assert_eq!(
        value_after(row, "data-field=\"percent\"")
            .parse::<f64>()
            .unwrap(),
        d["percent"].as_f64().unwrap()
    );
    for node in ["w2", "w3"] {
        assert_eq!(
            value_after(row, &format!("data-dataset-node=\"{node}\"")),
            "100.00"
        );
    }
    assert_eq!(after(&dom, "id=\"dataset-count\""), "2");

    // The screenshot, for people.
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard.png");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,1400",
            "--virtual-time-budget=6000",
            &format!("--screenshot={}", shot.display()),
            &format!("{page}#token={ADMIN}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a real screenshot"
    );
    drop(workers);
}
