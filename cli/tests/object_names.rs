//! Object names as other clients write them, through a real mount and a real dataset load.
//!
//! Keys reach S3 (moto and Ceph RGW) through boto3, as users upload them: raw UTF-8, with `%`,
//! `#`, `?`, non-ASCII, NFC beside NFD, 200-byte names, and folder markers (zero-byte keys ending
//! in `/`). Files reach a POSIX source as plain files. Through `granary up` the tree must be the
//! keys' tree exactly (no decoded, missing or phantom names) and every file its bytes; pinned and
//! loaded onto two workers, every file must be ready and stored byte for byte. Python's buffered
//! `open()` (an `isatty()` ioctl each) must not log.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use support::backends::{S3Target, unique};
use support::cluster::{Spec, Started, cluster_certs, start_workers, tls_flags, wait_for_members};
use support::keys::{self, hostile_names};
use support::metric;
use support::own::OwnService;
use support::process::{Finished, Mount, UpOptions, granary, run_with_timeout};

/// The files of the test tree (relative path -> bytes), every name in [`hostile_names`] at the
/// top and two levels down.
fn files() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, name) in hostile_names().iter().enumerate() {
        let body = |salt: usize| {
            format!("{salt}:{i}:{name}\n")
                .repeat(1 + i * 37)
                .into_bytes()
        };
        out.push((name.clone(), body(0)));
        out.push((format!("日本/✨ q%20/{name}"), body(1)));
    }
    out
}

/// Folder markers and what they make: (keys to write, each with its bytes) and the paths
/// (relative, `/` at the end for a directory) the mount must show for them.
fn markers() -> (Vec<(String, Vec<u8>)>, Vec<String>) {
    let keys = [
        // A directory that exists only through its marker: empty.
        ("markers/only/", ""),
        // A marker and an empty sub-directory's marker.
        ("markers/a/", ""),
        ("markers/a/b/", ""),
        // A marker beside real content.
        ("markers/c/", ""),
        ("markers/c/d/", ""),
        ("markers/c/d/e.txt", "e"),
        // An object whose key is also a prefix: the directory.
        ("markers/f", "shadowed"),
        ("markers/f/g.txt", "g"),
    ];
    let shown = [
        "markers/",
        "markers/only/",
        "markers/a/",
        "markers/a/b/",
        "markers/c/",
        "markers/c/d/",
        "markers/c/d/e.txt",
        "markers/f/",
        "markers/f/g.txt",
    ];
    (
        keys.iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        shown.iter().map(|s| s.to_string()).collect(),
    )
}

/// Every path below `root` (directories with a trailing `/`), as `find` walks it.
fn tree(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            // symlink_metadata: a stat of each name, as `ls -l` makes.
            if std::fs::symlink_metadata(&path).unwrap().is_dir() {
                out.insert(format!("{rel}/"));
                dirs.push(path);
            } else {
                out.insert(rel);
            }
        }
    }
    out
}

/// The paths a set of files makes (their directories included).
fn paths_of(files: &[(String, Vec<u8>)]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (path, _) in files {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            out.insert(path[..at + i + 1].to_string());
            at += i + 1;
        }
        out.insert(path.clone());
    }
    out
}

/// Checks the mounted tree against `expected` and every file's bytes.
fn check_mount(mnt: &Path, expected: &BTreeSet<String>, files: &[(String, Vec<u8>)]) {
    let seen = tree(mnt);
    let missing: Vec<_> = expected.difference(&seen).collect();
    let extra: Vec<_> = seen.difference(expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the mount's tree is not the keys' tree: missing {missing:?}, unexpected {extra:?}"
    );
    for (path, data) in files {
        let got = std::fs::read(mnt.join(path)).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
        assert!(got == *data, "{path:?}: {} bytes differ", got.len());
    }
}

fn up(source: String, envs: Vec<(String, String)>, cache: &Path, mnt: &Path) -> Mount {
    Mount::up(UpOptions {
        source,
        envs,
        cache_dir: cache,
        mount_dir: mnt,
        extra: vec!["--memory-cache".into(), "64MiB".into()],
    })
}

/// Uploads `objects` with boto3 under `prefix`.
fn upload(s3: &S3Target, prefix: &str, objects: &[(String, Vec<u8>)]) {
    keys::put(&s3.boto3(), prefix, objects);
}

fn s3_names_and_markers(s3: S3Target, name: &str) {
    let prefix = unique(name);
    let files = files();
    let (marker_keys, marker_paths) = markers();
    upload(&s3, &prefix, &files);
    upload(&s3, &prefix, &marker_keys);

    let mut expected = paths_of(&files);
    expected.extend(marker_paths);
    let readable: Vec<_> = files
        .iter()
        .cloned()
        .chain([
            ("markers/c/d/e.txt".to_string(), b"e".to_vec()),
            ("markers/f/g.txt".to_string(), b"g".to_vec()),
        ])
        .collect();
    let (cache, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mount = up(s3.uri(&prefix), s3.env(), cache.path(), mnt.path());
    check_mount(mnt.path(), &expected, &readable);
    // `ls -R` shows the same names: no phantom file inside a marked directory.
    let ls = std::process::Command::new("ls")
        .arg("-R")
        .current_dir(mnt.path())
        .arg("markers")
        .output()
        .unwrap();
    assert!(ls.status.success());
    let ls = String::from_utf8(ls.stdout).unwrap();
    let names: Vec<&str> = ls
        .lines()
        .filter(|l| !l.is_empty() && !l.ends_with(':'))
        .collect();
    assert_eq!(
        names.len(),
        expected
            .iter()
            .filter(|p| p.starts_with("markers/"))
            .count()
            - 1,
        "ls -R markers:\n{ls}"
    );
    assert_eq!(
        metric(
            &mount.metrics(),
            "granary_backend_requests_total",
            &[("op", "get"), ("outcome", "error")]
        ),
        0.0,
        "a GET failed: {}",
        mount.stderr()
    );
    assert!(mount.stop().success());
}

#[test]
fn s3_server_moto_names_and_folder_markers() {
    s3_names_and_markers(S3Target::moto(), "names-moto");
}

#[test]
fn ceph_rgw_names_and_folder_markers() {
    s3_names_and_markers(S3Target::rgw(), "names-rgw");
}

/// A POSIX source: names are the files' names (`a%20b` is `a%20b`), and 1,000 Python opens
/// (each an `isatty()` ioctl) are answered ENOTTY without a log line.
#[test]
fn posix_names_and_python_opens_without_ioctl_logs() {
    let source = tempfile::tempdir().unwrap();
    let mut files = files();
    for i in 0..1000 {
        files.push((format!("many/{i:04}.bin"), format!("{i}").into_bytes()));
    }
    for (path, data) in &files {
        let full = source.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, data).unwrap();
    }
    let (cache, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mount = up(
        format!("file://{}", source.path().display()),
        vec![],
        cache.path(),
        mnt.path(),
    );
    check_mount(mnt.path(), &paths_of(&files), &files);

    let script = format!(
        "import os\n\
         d = {dir:?}\n\
         n = 0\n\
         for name in sorted(os.listdir(d)):\n\
         \x20   with open(os.path.join(d, name)) as f:\n\
         \x20       n += len(f.read())\n\
         print(n)\n",
        dir = mnt.path().join("many").to_str().unwrap()
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ioctls = metric(
        &mount.metrics(),
        "granary_fuse_unsupported_ioctls_total",
        &[],
    );
    assert!(
        ioctls >= 1000.0,
        "Python's opens sent {ioctls} ioctls: the test no longer exercises them"
    );
    let stderr = mount.stderr();
    assert!(
        !stderr.to_lowercase().contains("ioctl"),
        "the mount logged ioctls:\n{}",
        stderr.lines().take(5).collect::<Vec<_>>().join("\n")
    );
    assert!(mount.stop().success());
}

const ADMIN: &str = "admin-token-0123456789";

fn dataset(api: &str, args: &[&str]) -> Finished {
    let tls = tls_flags(api);
    let mut all = vec!["dataset", "--server", api, "--token", ADMIN];
    all.extend(tls.iter().map(String::as_str));
    all.extend_from_slice(args);
    run_with_timeout(granary(&all, &[]), Duration::from_secs(180))
}

/// Every name pinned and loaded onto two workers (Ceph RGW, etcd, mutual TLS): 100% ready on
/// both, and each store holds every file byte for byte under its exact name.
#[test]
fn names_pinned_and_loaded_onto_two_workers() {
    let s3 = S3Target::rgw();
    let etcd = OwnService::start("etcd");
    let etcd_url = etcd.get("GRANARY_TEST_ETCD");
    let work = tempfile::tempdir().unwrap();
    let tls = cluster_certs(work.path(), 2, &etcd);
    let prefix = unique("names-ds");
    let files = files();
    upload(
        &s3,
        &prefix,
        &files
            .iter()
            .map(|(p, d)| (format!("ds/{p}"), d.clone()))
            .collect::<Vec<_>>(),
    );
    let extra = format!("[datasets]\ncapacity = \"1GiB\"\nadmin_token = \"{ADMIN}\"\n");
    let spec = Spec {
        s3: &s3,
        prefix: &prefix,
        etcd: &etcd_url,
        tls: &tls,
        memory: "64MiB",
        extra: &extra,
        extra_for: &[],
    };
    let Started {
        workers: _workers,
        api,
        caches,
        ..
    } = start_workers(work.path(), 2, &spec);
    wait_for_members(&etcd_url, 2);

    let pin = dataset(
        &api[0],
        &[
            "pin",
            "names",
            "--path",
            "/data/ds",
            "--nodes",
            "w1,w2",
            "--replicas",
            "2",
        ],
    );
    assert!(pin.status.success(), "pin: {}", pin.stderr);
    let load = dataset(
        &api[0],
        &[
            "load",
            "names",
            "--wait",
            "--fail-fast",
            "--timeout",
            "120s",
        ],
    );
    assert!(
        load.status.success(),
        "load: {}\n{}",
        load.stderr,
        load.stdout
    );
    let status = dataset(&api[0], &["status", "names", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    for node in ["w1", "w2"] {
        let progress = status["node_progress"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"] == node)
            .unwrap_or_else(|| panic!("{node} not in {status}"));
        assert_eq!(progress["state"], "ready", "{node}: {progress}");
        assert_eq!(progress["files_ready"], files.len(), "{node}: {progress}");
    }
    for cache in &caches {
        let store = cache.join("datasets/names/files");
        for (path, data) in &files {
            let got = std::fs::read(store.join(path))
                .unwrap_or_else(|e| panic!("{}: {path:?}: {e}", store.display()));
            assert!(got == *data, "{}: {path:?} differs", store.display());
        }
    }
}
