//! Path and permission attacks against a real mount (issue 19, items 5 and 6).
//!
//! - Hostile keys uploaded with boto3 (`a//b`, `dots/../x`, `./z`, a control character) to moto
//!   and Ceph RGW: the directory still lists through the mount, the hostile names are absent
//!   (counted in `granary_backend_keys_skipped_total`) and every other file reads byte for byte.
//! - A POSIX source with a 0600 root file, a symlink inside and a symlink leading out: `nobody`
//!   cannot read the 0600 file (the kernel enforces its mode: `default_permissions`), root can; the
//!   inside link reads; the outside link is refused with EACCES for everyone.
//! - A dataset of `%2F` / `..%2F` keys pinned and loaded: every file lands inside the store and
//!   nothing outside it is created or changed (a 0600 sentinel keeps its bytes and mode).

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::backends::{S3Target, unique};
use support::keys;
use support::metric;
use support::process::{Mount, UpOptions, granary, run_with_timeout};

fn up(source: String, envs: Vec<(String, String)>, cache: &Path, mnt: &Path) -> Mount {
    up_with(source, envs, cache, mnt, vec![])
}

fn up_with(
    source: String,
    envs: Vec<(String, String)>,
    cache: &Path,
    mnt: &Path,
    more: Vec<String>,
) -> Mount {
    let mut extra = vec!["--memory-cache".to_string(), "64MiB".into()];
    extra.extend(more);
    Mount::up(UpOptions {
        source,
        envs,
        cache_dir: cache,
        mount_dir: mnt,
        extra,
    })
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// `cat PATH` as `nobody` (uid and gid 65534, no groups): its bytes, or its stderr.
fn read_as_nobody(path: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(path)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn hostile_keys_leave_the_directory_listable(s3: S3Target, name: &str) {
    let prefix = unique(name);
    let good: Vec<(String, Vec<u8>)> = [
        "ok.txt",
        "q%20a.txt",
        "..%2F..%2Fx",
        "%2Ftmp%2Fx",
        "sub/inner.txt",
    ]
    .iter()
    .enumerate()
    .map(|(i, k)| {
        (
            format!("d/{k}"),
            format!("{i}:{k}\n").repeat(100).into_bytes(),
        )
    })
    .collect();
    // Keys object_store cannot parse and no file name can be: each once made `d` unlistable
    // (and one at the top, the source's own listing, once stopped the worker at its probe).
    let hostile: Vec<(String, Vec<u8>)> = [
        "d/x//y",
        "d/dots/../x",
        "d/./z",
        "d/ctl\u{7}bell",
        "top\u{1b}[31mred",
    ]
    .iter()
    .map(|k| (k.to_string(), b"hostile".to_vec()))
    .collect();
    keys::put(&s3.boto3(), &prefix, &good);
    keys::put(&s3.boto3(), &prefix, &hostile);

    let (cache, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mount = up(s3.uri(&prefix), s3.env(), cache.path(), mnt.path());
    assert_eq!(
        names(mnt.path()),
        ["d".to_string()].into(),
        "{}",
        mount.stderr()
    );
    let d = mnt.path().join("d");
    // `dots/` and `x/` are directories (of hostile keys): listed, their hostile children not.
    let want: BTreeSet<String> = [
        "ok.txt",
        "q%20a.txt",
        "..%2F..%2Fx",
        "%2Ftmp%2Fx",
        "sub",
        "x",
        "dots",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names(&d), want, "{}", mount.stderr());
    assert!(names(&d.join("x")).is_empty(), "x//y is no name");
    assert!(names(&d.join("dots")).is_empty(), "dots/../x is no name");
    for (key, data) in &good {
        let got = std::fs::read(mnt.path().join(key)).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(got == *data, "{key}: bytes differ");
    }
    for hidden in ["ctl\u{7}bell", ".", ".."] {
        assert!(!names(&d).contains(hidden));
    }
    let skipped = metric(&mount.metrics(), "granary_backend_keys_skipped_total", &[]);
    assert!(skipped >= 4.0, "skipped keys counted: {skipped}");
    assert!(
        mount.stderr().contains("left out of the listing"),
        "logged: {}",
        mount.stderr()
    );
    assert!(mount.stop().success());
}

#[test]
fn s3_server_moto_hostile_keys_leave_the_directory_listable() {
    hostile_keys_leave_the_directory_listable(S3Target::moto(), "hostile-moto");
}

#[test]
fn ceph_rgw_hostile_keys_leave_the_directory_listable() {
    hostile_keys_leave_the_directory_listable(S3Target::rgw(), "hostile-rgw");
}

/// A POSIX source's modes and owners are shown as they are and enforced by the kernel; a
/// symlink inside the source works, one leading out is refused for everyone (EACCES).
#[test]
fn posix_modes_are_kept_and_links_out_of_the_source_refused() {
    let outer = tempfile::tempdir().unwrap();
    let source = outer.path().join("source");
    std::fs::create_dir(&source).unwrap();
    // Readable by anyone where it is: only the link's leaving the source refuses it.
    let outside = outer.path().join("outside.txt");
    std::fs::write(&outside, b"outside\n").unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(source.join("secret.txt"), b"root only\n").unwrap();
    std::fs::set_permissions(
        source.join("secret.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(source.join("public.txt"), b"everyone\n").unwrap();
    std::fs::set_permissions(
        source.join("public.txt"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::create_dir(source.join("private")).unwrap();
    std::fs::write(source.join("private/inner.txt"), b"inner\n").unwrap();
    std::fs::set_permissions(
        source.join("private"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::os::unix::fs::symlink("public.txt", source.join("inside-link")).unwrap();
    std::os::unix::fs::symlink(&outside, source.join("outside-link")).unwrap();
    std::os::unix::fs::symlink("../outside.txt", source.join("up-link")).unwrap();

    let (cache, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Shared with other users (as the node mount for training pods is): modes still decide.
    let mount = up_with(
        format!("file://{}", source.display()),
        vec![],
        cache.path(),
        mnt.path(),
        vec!["--allow-other".into()],
    );
    let m = mnt.path();
    let mode = |p: &str| std::fs::metadata(m.join(p)).unwrap().mode() & 0o777;
    assert_eq!(mode("secret.txt"), 0o600);
    assert_eq!(mode("public.txt"), 0o644);
    assert_eq!(mode("private"), 0o700);
    assert_eq!(std::fs::metadata(m.join("secret.txt")).unwrap().uid(), 0);

    // Root reads what root may; nobody only what everyone may.
    assert_eq!(std::fs::read(m.join("secret.txt")).unwrap(), b"root only\n");
    let denied = read_as_nobody(&m.join("secret.txt")).unwrap_err();
    assert!(denied.contains("Permission denied"), "{denied}");
    let denied = read_as_nobody(&m.join("private/inner.txt")).unwrap_err();
    assert!(denied.contains("Permission denied"), "{denied}");
    assert_eq!(
        read_as_nobody(&m.join("public.txt")).unwrap(),
        b"everyone\n"
    );

    // A link inside the source works; one leading out is refused, even for root.
    assert_eq!(
        read_as_nobody(&m.join("inside-link")).unwrap(),
        b"everyone\n"
    );
    for link in ["outside-link", "up-link"] {
        let e = std::fs::read(m.join(link)).unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::PermissionDenied,
            "{link}: {e}\n{}",
            mount.stderr()
        );
        assert!(read_as_nobody(&m.join(link)).is_err());
    }
    assert!(
        mount.stderr().contains("leading out of the source"),
        "the link is named in the log: {}",
        mount.stderr()
    );
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside\n");
    assert!(mount.stop().success());

    // Without --allow-other the mount is root's alone: nobody cannot read even a 0644 file.
    let mount = up(
        format!("file://{}", source.display()),
        vec![],
        cache.path(),
        mnt.path(),
    );
    assert_eq!(std::fs::read(m.join("public.txt")).unwrap(), b"everyone\n");
    let denied = read_as_nobody(&m.join("public.txt")).unwrap_err();
    assert!(denied.contains("Permission denied"), "{denied}");
    assert!(mount.stop().success());
}

/// A dataset whose keys look like escapes (`%2Ftmp%2Fx`, `..%2F..%2Fx`), pinned and loaded:
/// every file is stored inside the dataset store under its exact name, and nothing outside the
/// store is created or changed.
#[test]
fn a_dataset_of_escape_like_keys_loads_inside_the_store() {
    let s3 = S3Target::moto();
    let prefix = unique("escape-ds");
    let outer = tempfile::tempdir().unwrap();
    let sentinel = outer.path().join("x");
    std::fs::write(&sentinel, b"sentinel").unwrap();
    std::fs::set_permissions(&sentinel, std::fs::Permissions::from_mode(0o600)).unwrap();
    let files: Vec<(String, Vec<u8>)> = [
        "%2Ftmp%2Fx".to_string(),
        "..%2F..%2Fx".into(),
        "..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2Fx".into(),
        format!("%2F{}", sentinel.display().to_string().replace('/', "%2F")),
        "d/..%2F..%2F..%2Fx".into(),
    ]
    .into_iter()
    .map(|k| (k.clone(), Vec::new()))
    .chain([("big.bin".to_string(), vec![7u8; 300_000])])
    .collect();
    keys::put(
        &s3.boto3(),
        &prefix,
        &files
            .iter()
            .map(|(k, d)| (format!("ds/{k}"), d.clone()))
            .collect::<Vec<_>>(),
    );
    let cache = outer.path().join("cache");
    let mnt = tempfile::tempdir().unwrap();
    std::fs::create_dir(&cache).unwrap();
    let api = format!("127.0.0.1:{}", support::free_port());
    let mount = up_with(
        s3.uri(&prefix),
        s3.env(),
        &cache,
        mnt.path(),
        vec![
            "--listen".into(),
            api.clone(),
            "--block-size".into(),
            "64KiB".into(),
        ],
    );
    let dataset = |args: &[&str]| {
        let mut all = vec!["dataset", "--server", api.as_str()];
        all.extend_from_slice(args);
        run_with_timeout(granary(&all, &[]), Duration::from_secs(60))
    };
    let pin = dataset(&["pin", "escapes", "--path", "/ds"]);
    assert!(
        pin.status.success(),
        "pin: {}\n{}",
        pin.stderr,
        mount.stderr()
    );
    let load = dataset(&[
        "load",
        "escapes",
        "--wait",
        "--fail-fast",
        "--timeout",
        "40s",
    ]);
    assert!(
        load.status.success(),
        "load: {}\n{}",
        load.stderr,
        load.stdout
    );
    let store = cache.join("datasets/escapes/files");
    for (key, data) in &files {
        let got = std::fs::read(store.join(key)).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert!(got == *data, "{key} differs in the store");
        // And through the mount (a pinned file, perhaps opened from the store).
        assert!(std::fs::read(mnt.path().join("ds").join(key)).unwrap() == *data);
    }
    let verify = dataset(&["status", "escapes", "--verify"]);
    assert!(verify.status.success(), "verify: {}", verify.stderr);
    assert!(mount.stop().success());
    assert_eq!(std::fs::read(&sentinel).unwrap(), b"sentinel");
    assert_eq!(std::fs::metadata(&sentinel).unwrap().mode() & 0o777, 0o600);
    assert_eq!(names(outer.path()), ["cache", "x"].map(String::from).into());
    for file in files.iter().filter(|(k, _)| k.contains("%2F")) {
        assert!(store.join(&file.0).is_file(), "{} stored as a name", file.0);
    }
}
