//! The Kubernetes manifests in deploy/ against a real kube-apiserver (scripts/services/kube.sh):
//! `kubectl kustomize deploy/k8s` renders, and everything passes `kubectl apply
//! --dry-run=server`, so a schema error fails CI; a deliberately broken copy is refused, which
//! shows the check is real.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use support::backends::env;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("kubectl")
        .args(["--kubeconfig", &env("GRANARY_TEST_KUBECONFIG")])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is installed (scripts/services/kube.sh install)");
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn render() -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy().join("k8s"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/k8s: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn manifests_pass_server_side_dry_run() {
    let rendered = render();
    for kind in [
        "kind: Namespace",
        "kind: DaemonSet",
        "kind: StatefulSet",
        "kind: ConfigMap",
        "kind: Secret",
        "kind: Service",
        "kind: Deployment",
        "kind: ClusterRole",
        "kind: CSIDriver",
        "mountPropagation: Bidirectional",
    ] {
        assert!(rendered.contains(kind), "rendered manifests lack {kind:?}");
    }
    // Namespaced objects need their namespace to exist for a server-side dry run.
    let (ok, text) = kubectl(&["get", "namespace", "granary"], None);
    if !ok {
        let (created, text) = kubectl(&["create", "namespace", "granary"], None);
        assert!(created, "{text}");
    } else {
        assert!(text.contains("granary"), "{text}");
    }
    let (ok, text) = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered));
    assert!(ok, "kubectl apply -k deploy/k8s --dry-run=server:\n{text}");
    assert!(
        text.contains("daemonset.apps/granary-worker created (server dry run)"),
        "{text}"
    );

    let examples = deploy().join("k8s/examples");
    for namespace in ["vision-train"] {
        if !kubectl(&["get", "namespace", namespace], None).0 {
            let (created, text) = kubectl(&["create", "namespace", namespace], None);
            assert!(created, "{text}");
        }
    }
    let (ok, text) = kubectl(
        &[
            "apply",
            "--dry-run=server",
            "-f",
            examples.to_str().unwrap(),
        ],
        None,
    );
    assert!(ok, "examples:\n{text}");
    assert!(
        text.contains("job.batch/resnet-train created (server dry run)"),
        "{text}"
    );
    assert!(
        text.contains("persistentvolume/granary-vision-raw created (server dry run)"),
        "{text}"
    );

    // A type error is refused: the dry run really validates.
    let broken = rendered.replace("hostNetwork: true", "hostNetwork: \"yes\"");
    assert_ne!(broken, rendered);
    let (ok, text) = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&broken));
    assert!(!ok, "a broken DaemonSet passed:\n{text}");
    assert!(text.contains("hostNetwork"), "{text}");
}

/// What the `restricted` Pod Security Standard refuses in `pod` (a pod spec), as reasons. The
/// test's kube-apiserver (1.20) has no PodSecurity admission, so the profile is checked here,
/// rule by rule as the standard states it.
fn restricted_violations(pod: &serde_json::Value) -> Vec<String> {
    let mut why = Vec::new();
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[host] == true {
            why.push(format!("{host}: true"));
        }
    }
    let allowed = [
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    ];
    for v in pod["volumes"].as_array().into_iter().flatten() {
        for key in v.as_object().unwrap().keys().filter(|k| *k != "name") {
            if !allowed.contains(&key.as_str()) {
                why.push(format!("volume {} of type {key}", v["name"]));
            }
        }
    }
    let pod_sc = &pod["securityContext"];
    let containers = ["containers", "initContainers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().cloned().unwrap_or_default());
    for c in containers {
        let sc = &c["securityContext"];
        let name = &c["name"];
        if sc["privileged"] == true {
            why.push(format!("{name}: privileged"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            why.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        let drops = sc["capabilities"]["drop"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !drops.iter().any(|d| d == "ALL") {
            why.push(format!("{name}: capabilities do not drop ALL"));
        }
        for add in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            if add != "NET_BIND_SERVICE" {
                why.push(format!("{name}: adds capability {add}"));
            }
        }
        if sc["runAsNonRoot"] != true && pod_sc["runAsNonRoot"] != true {
            why.push(format!("{name}: runAsNonRoot is not true"));
        }
        if sc["runAsUser"] == 0 || pod_sc["runAsUser"] == 0 {
            why.push(format!("{name}: runAsUser 0"));
        }
        let seccomp = if sc["seccompProfile"].is_null() {
            &pod_sc["seccompProfile"]
        } else {
            &sc["seccompProfile"]
        };
        if !(seccomp["type"] == "RuntimeDefault" || seccomp["type"] == "Localhost") {
            why.push(format!(
                "{name}: no RuntimeDefault or Localhost seccomp profile"
            ));
        }
        for port in c["ports"].as_array().into_iter().flatten() {
            if !port["hostPort"].is_null() {
                why.push(format!("{name}: hostPort"));
            }
        }
    }
    why
}

#[test]
fn training_pods_pass_the_restricted_pod_security_profile() {
    let mut pods = 0;
    for file in ["training-job.yaml", "static-pv.yaml"] {
        let text = std::fs::read_to_string(deploy().join("k8s/examples").join(file)).unwrap();
        for doc in text.split("\n---\n") {
            let v: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
            let spec = match v["kind"].as_str() {
                Some("Pod") => &v["spec"],
                Some("Job") => &v["spec"]["template"]["spec"],
                _ => continue,
            };
            let why = restricted_violations(spec);
            assert!(why.is_empty(), "{file}: {}: {why:?}", v["metadata"]["name"]);
            pods += 1;
        }
    }
    assert_eq!(pods, 2);
    // The checker refuses what the profile refuses: the node-level DaemonSet's pod.
    let rendered = render();
    let ds = rendered
        .split("\n---\n")
        .find(|d| d.contains("kind: DaemonSet"))
        .unwrap();
    let v: serde_json::Value = serde_saphyr::from_str(ds).unwrap();
    let why = restricted_violations(&v["spec"]["template"]["spec"]);
    assert!(why.iter().any(|w| w.contains("hostNetwork")), "{why:?}");
    assert!(why.iter().any(|w| w.contains("hostPath")), "{why:?}");
    assert!(why.iter().any(|w| w.contains("privileged")), "{why:?}");
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool is installed (scripts/install-deps.sh installs prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Metric names in a PromQL expression: `granary_...` and `granary:...` tokens.
fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("granary") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':')
        {
            end += 1;
        }
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let name = &expr[start..end];
        // Label values such as job="granary-workers" are not metric names.
        let in_quotes = expr[..start].matches('"').count() % 2 == 1;
        if before_ok && !in_quotes && (name.starts_with("granary_") || name.starts_with("granary:"))
        {
            out.push(name.to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// Whether `name` is a metric the binaries export (histograms also as _bucket/_sum/_count) or a
/// recording rule of `rules`.
fn known(name: &str, rules: &[String]) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    granary_core::metrics::ALL.contains(&name)
        || granary_core::metrics::ALL.contains(&base)
        || rules.iter().any(|r| r == name)
}

#[test]
fn prometheus_rules_and_the_grafana_dashboard_parse_and_name_real_metrics() {
    let rules_file = deploy().join("prometheus/rules.yml");
    let (ok, text) = promtool(&["check", "rules", rules_file.to_str().unwrap()]);
    assert!(ok, "promtool check rules:\n{text}");
    let (ok, text) = promtool(&[
        "check",
        "config",
        deploy().join("prometheus/prometheus.yml").to_str().unwrap(),
    ]);
    assert!(ok, "promtool check config:\n{text}");

    let rules_text = std::fs::read_to_string(&rules_file).unwrap();
    let recorded: Vec<String> = rules_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(|s| s.trim().to_string())
        .collect();
    assert!(recorded.len() >= 5, "{recorded:?}");
    for name in names_in(&rules_text) {
        assert!(
            known(&name, &recorded),
            "rules.yml names {name:?}, which nothing exports"
        );
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/granary.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 12, "{exprs:?}");
    // Every expression parses: promtool checks them as recording rules.
    let dir = tempfile::tempdir().unwrap();
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        file.push_str(&format!(
            "      - record: dashboard:expr{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
        for name in names_in(e) {
            assert!(
                known(&name, &recorded),
                "the dashboard names {name:?}, which nothing exports"
            );
        }
    }
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, file).unwrap();
    let (ok, text) = promtool(&["check", "rules", path.to_str().unwrap()]);
    assert!(ok, "a dashboard expression does not parse:\n{text}");
    // And a broken one would be caught.
    std::fs::write(
        &path,
        "groups:\n  - name: x\n    rules:\n      - record: x:y\n        expr: \"sum(rate(granary_block_reads_total[5m])\"\n",
    )
    .unwrap();
    assert!(!promtool(&["check", "rules", path.to_str().unwrap()]).0);
    assert_eq!(
        names_in("sum(up{job=\"granary-workers\"})"),
        Vec::<String>::new()
    );
}
