//! Bad input: each gets one clear line on stderr and a non-zero exit within seconds, and leaves
//! nothing mounted.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::backends::S3Target;
use support::is_mounted;
use support::process::{granary, run_with_timeout};

/// Runs `granary args...` and checks the failure: exit code, the message, time, nothing mounted.
fn fails(args: &[&str], envs: &[(String, String)], mount: Option<&Path>, needle: &str) {
    let out = run_with_timeout(granary(args, envs), Duration::from_secs(25));
    assert!(!out.status.success(), "{args:?} succeeded");
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("granary: error:") || l.starts_with("error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "{args:?}: one error line expected, got:\n{}",
        out.stderr
    );
    assert!(
        errors[0].contains(needle),
        "{args:?}: expected {needle:?} in the error, got:\n{}",
        out.stderr
    );
    assert!(
        out.elapsed < Duration::from_secs(20),
        "{args:?} took {:?}",
        out.elapsed
    );
    if let Some(dir) = mount {
        assert!(!is_mounted(dir), "{} left mounted", dir.display());
    }
}

fn up(source: &str, mount: &Path, cache: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["up", "--source", source, "--mount"]
        .map(String::from)
        .to_vec();
    v.push(mount.to_str().unwrap().into());
    v.push("--cache-dir".into());
    v.push(cache.to_str().unwrap().into());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn check(source: &str, extra: &[&str], envs: &[(String, String)], needle: &str) {
    let mnt = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let args = up(source, mnt.path(), cache.path(), extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails(&args, envs, Some(mnt.path()), needle);
}

#[test]
fn bad_uris() {
    check("gs://bucket/x", &[], &[], "unknown URI scheme");
    check("s3://", &[], &[], "missing bucket");
    check("relative/path", &[], &[], "not an absolute path");
    check("/no/such/dir", &[], &[], "No such file or directory");
}

#[test]
fn bad_sizes() {
    check("/tmp", &["--memory-cache", "lots"], &[], "invalid size");
    check("/tmp", &["--disk-cache", "12XB"], &[], "invalid size");
    check("/tmp", &["--block-size", "3MiB"], &[], "invalid block size");
    check("/tmp", &["--metadata-ttl", "soon"], &[], "invalid duration");
    check(
        "/tmp",
        &["--pinned-ttl", "5x"],
        &[],
        "--pinned-ttl: invalid duration",
    );
    check(
        "/tmp",
        &["--metrics-addr", "nowhere"],
        &[],
        "invalid socket address",
    );
}

#[test]
fn bad_mount_points() {
    let cache = tempfile::tempdir().unwrap();
    let missing = Path::new("/tmp/granary-no-such-mount-point");
    let args = up("/tmp", missing, cache.path(), &[]);
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        None,
        "does not exist",
    );
    let full = tempfile::tempdir().unwrap();
    std::fs::write(full.path().join("x"), b"x").unwrap();
    let args = up("/tmp", full.path(), cache.path(), &[]);
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        Some(full.path()),
        "is not empty",
    );
    let file = full.path().join("x");
    let args = up("/tmp", &file, cache.path(), &[]);
    fails(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        None,
        "is not a directory",
    );
}

#[test]
fn no_permission_on_dev_fuse() {
    let mnt = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    for dir in [mnt.path(), cache.path()] {
        Command::new("chmod").arg("0777").arg(dir).status().unwrap();
    }
    let args = up("/tmp", mnt.path(), cache.path(), &[]);
    // The machine's /dev/fuse may be world-writable (udev's default rule makes it 0666): run as
    // nobody in a private mount namespace where /dev/fuse is a 0600 node of our own, so the test
    // does not depend on (or change) the host's permissions.
    let node = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "d=$1; shift; mknod -m 600 \"$d/fuse\" c 10 229 && mount --bind \"$d/fuse\" /dev/fuse \
             && exec setpriv --reuid=65534 --regid=65534 --clear-groups -- \"$@\"",
        )
        .arg("sh")
        .arg(node.path())
        .arg(support::process::granary_bin())
        .args(&args)
        .env("GRANARY_LOG", "warn");
    let out = run_with_timeout(cmd, Duration::from_secs(20));
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("no permission to open /dev/fuse"),
        "{}",
        out.stderr
    );
    assert!(!is_mounted(mnt.path()));
}

#[test]
fn bad_s3_endpoints_and_credentials() {
    let moto = S3Target::moto();
    check(
        "s3://granary-no-such-bucket",
        &[],
        &moto.env(),
        "bucket does not exist",
    );
    let mut dead = moto.env();
    dead[0].1 = format!("http://127.0.0.1:{}", support::free_port());
    check(&moto.uri(""), &[], &dead, "cannot connect");
    check(
        "s3://granary-test/data/../etc",
        &[],
        &moto.env(),
        "the prefix \"data/../etc\" cannot be a path: it has a '.' or '..' segment",
    );
    let rgw = S3Target::rgw();
    let mut wrong = rgw.env();
    wrong[2].1 = "wrong-secret".into();
    check(&rgw.uri(""), &[], &wrong, "access denied");
    let no_keys: Vec<(String, String)> = vec![("AWS_ENDPOINT_URL".into(), moto.endpoint.clone())];
    let mnt = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let args = up(&moto.uri(""), mnt.path(), cache.path(), &[]);
    let mut cmd = granary(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &no_keys,
    );
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    let out = run_with_timeout(cmd, Duration::from_secs(20));
    assert!(!out.status.success());
    assert!(out.stderr.contains("no credentials"), "{}", out.stderr);
}

#[test]
fn bad_configs() {
    fails(
        &["server", "--config", "/no/such/config.toml"],
        &[],
        None,
        "cannot read config file",
    );
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let unknown = write(
        "unknown.toml",
        "bogus = 1\n[[mount]]\npath = \"/a\"\nsource = \"/tmp\"\n",
    );
    fails(
        &["server", "--config", &unknown, "--check-config"],
        &[],
        None,
        "unknown field",
    );
    let garbage = write("garbage.toml", "this is [not toml");
    fails(&["server", "--config", &garbage], &[], None, "garbage.toml");
    let no_mounts = write("none.toml", "listen = \"127.0.0.1:7070\"\n");
    fails(
        &["server", "--config", &no_mounts],
        &[],
        None,
        "no [[mount]] sections",
    );
    let bad_fuse = write(
        "fuse.toml",
        "[fuse]\nmount = \"/mnt/x\"\nreadahead = \"lots\"\n[[mount]]\npath = \"/a\"\nsource = \"/tmp\"\n",
    );
    fails(
        &["server", "--config", &bad_fuse, "--check-config"],
        &[],
        None,
        "[fuse] readahead = \"lots\"",
    );
    let zero = write(
        "zero.toml",
        "[backend]\ncluster_max_concurrency = 0\n[[mount]]\npath = \"/a\"\nsource = \"/tmp\"\n",
    );
    fails(
        &["server", "--config", &zero, "--check-config"],
        &[],
        None,
        "cluster_max_concurrency must be at least 1",
    );
    let ok = write("ok.toml", "[[mount]]\npath = \"/a\"\nsource = \"/tmp\"\n");
    let out = run_with_timeout(
        granary(&["server", "--config", &ok, "--check-config"], &[]),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{}", out.stderr);
}

#[test]
fn example_configs_in_deploy_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut checked = 0;
    let entries = ["config", "k8s/config"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap());
    // The examples read their tokens from a Secret's files: stand-ins here, where they point.
    let secrets = tempfile::tempdir().unwrap();
    for name in ["admin", "scheduler", "vision"] {
        std::fs::write(
            secrets.path().join(name),
            format!("{name}-example-token-0123456789\n"),
        )
        .unwrap();
    }
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            // No token in an example (in Kubernetes the file is a ConfigMap): files only.
            for line in text.lines() {
                let key = line.split('=').next().unwrap_or("").trim();
                assert!(
                    !["admin_token", "scheduler_token", "token"].contains(&key),
                    "{}: an inline token: {line}",
                    path.display()
                );
            }
            let dir = secrets.path().to_str().unwrap();
            let text = text
                .replace("/var/run/granary/secrets", dir)
                .replace("/etc/granary/secrets", dir);
            let copy = secrets.path().join(path.file_name().unwrap());
            std::fs::write(&copy, text).unwrap();
            // csi.toml is the CSI node plugin's; every other file a worker's.
            let args: &[&str] = if path.file_name().is_some_and(|n| n == "csi.toml") {
                &["csi", "--node-id", "n", "--check-config", "--config"]
            } else {
                &["server", "--check-config", "--config"]
            };
            let mut args = args.to_vec();
            args.push(copy.to_str().unwrap());
            let out = run_with_timeout(granary(&args, &[]), Duration::from_secs(10));
            assert!(out.status.success(), "{}: {}", path.display(), out.stderr);
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "example configs missing under {}",
        root.display()
    );
}

#[test]
fn bad_dataset_commands() {
    let port = support::free_port().to_string();
    let server = format!("127.0.0.1:{port}");
    let base = ["dataset", "--server", server.as_str()];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    for (args, needle) in [
        (
            with(&["pin", "Bad", "--path", "/x"]),
            "invalid dataset name",
        ),
        (
            with(&["pin", "ok", "--path", "/x", "--ttl", "soon"]),
            "--ttl",
        ),
        (
            with(&["pin", "ok", "--path", "/x", "--replicas", "0"]),
            "--replicas",
        ),
        (
            with(&["wait", "ok", "--min-percent", "150"]),
            "--min-percent",
        ),
        (with(&["wait", "ok", "--timeout", "forever"]), "--timeout"),
        (with(&["status", "ok"]), "cannot reach the worker"),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&args, &[], None, needle);
    }
    fails(
        &["dataset", "--server", "not an address", "list"],
        &[],
        None,
        "server address",
    );
}

/// Out-of-range requests and a missing token file: refused before any worker is asked (none
/// listens at the address), each naming the flag and the limit.
#[test]
fn out_of_range_dataset_requests() {
    let server = format!("127.0.0.1:{}", support::free_port());
    let with = |extra: &[&'static str]| -> Vec<String> {
        ["dataset", "--server", server.as_str()]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    for (args, needle) in [
        (
            with(&["pin", "ok", "--path", "/x", "--ttl", "999999999999h"]),
            "--ttl: ttl of 3599999999996400s is over the limit of 315360000s (10 years)",
        ),
        (
            with(&["pin", "ok", "--path", "/x", "--ttl", "3651d"]),
            "over the limit",
        ),
        (
            with(&["pin", "ok", "--path", "/x", "--replicas", "4294967295"]),
            "--replicas: replicas 4294967295 is out of range: give 1 to 1024",
        ),
        (
            with(&["pin", "ok", "--path", "/x", "--nodes", "a b"]),
            "--nodes: invalid node id",
        ),
        (
            with(&["list", "--token-file", "/no/such/token"]),
            "--token-file /no/such/token",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&args, &[], None, needle);
    }
}
