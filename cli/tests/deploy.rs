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

    // A type error is refused: the dry run really validates.
    let broken = rendered.replace("hostNetwork: true", "hostNetwork: \"yes\"");
    assert_ne!(broken, rendered);
    let (ok, text) = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&broken));
    assert!(!ok, "a broken DaemonSet passed:\n{text}");
    assert!(text.contains("hostNetwork"), "{text}");
}
