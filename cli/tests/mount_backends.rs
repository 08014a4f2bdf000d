//! Mount tests through a real FUSE mount, once per real backend: an S3 server (moto), Ceph RGW,
//! and a GlusterFS volume read as a POSIX path. Each uploads the standard tree, mounts it with
//! `granary up`, and checks listings, every file's sha256, POSIX tools, Python reads and mmap,
//! 1,000 random preads, EROFS on writes, and that a second full read costs no backend GET.

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use support::backends::{S3Target, gluster_dir, unique};
use support::data::{Tree, all_paths, fill, seed_of, standard_tree, write_local};
use support::metric;
use support::process::{Mount, UpOptions};

const BLOCK: u64 = 1 << 20;

fn tree() -> Tree {
    standard_tree(BLOCK, 100 << 20, 2000)
}

fn sh(script: &str) -> String {
    let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn checksums(root: &Path) -> String {
    sh(&format!(
        "cd '{}' && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum",
        root.display()
    ))
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        let rel = entry
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        out.push((rel, if meta.is_dir() { u64::MAX } else { meta.len() }));
        if meta.is_dir() {
            walk(root, &entry.path(), out);
        }
    }
}

fn backend_gets(mount: &Mount) -> f64 {
    metric(
        &mount.metrics(),
        "granary_backend_requests_total",
        &[("op", "get")],
    )
}

/// Everything a user does with a mounted tree, checked against the local copy.
fn exercise(mount: &Mount, local: &Path, tree: &Tree) {
    let mnt = &mount.dir;

    // Listing: every path, with the right kind and size (readdir + lookup + getattr).
    let mut seen = Vec::new();
    walk(mnt, mnt, &mut seen);
    seen.sort();
    let names: std::collections::BTreeSet<String> = seen.iter().map(|(p, _)| p.clone()).collect();
    let expected: std::collections::BTreeSet<String> = all_paths(tree).into_iter().collect();
    let missing: Vec<_> = expected.difference(&names).take(10).collect();
    let extra: Vec<_> = names.difference(&expected).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "listing differs: missing {missing:?}, unexpected {extra:?}"
    );
    assert_eq!(names.len(), expected.len());
    for (path, size) in &seen {
        if let Some(expected) = tree.get(path) {
            assert_eq!(size, expected, "size of {path}");
        }
    }
    assert_eq!(
        sh(&format!("find '{}' -type f | wc -l", mnt.display())).trim(),
        tree.len().to_string()
    );
    sh(&format!("ls -lR '{}' > /dev/null", mnt.display()));

    // Every byte: sha256 of every file equals the source.
    assert_eq!(checksums(mnt), checksums(local), "sha256 of every file");

    // cp -r, and Python reads and mmap.
    let copy = tempfile::tempdir().unwrap();
    sh(&format!(
        "cp -r '{}/nested' '{}/names' '{}/'",
        mnt.display(),
        mnt.display(),
        copy.path().display()
    ));
    sh(&format!(
        "diff -r '{}/nested' '{}/nested'",
        local.display(),
        copy.path().display()
    ));
    sh(&format!(
        "diff -r '{}/names' '{}/names'",
        local.display(),
        copy.path().display()
    ));
    let py = format!(
        "import hashlib, mmap\n\
         p = '{}/block-plus-one.bin'\n\
         with open(p, 'rb') as f:\n    d = f.read()\n    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n    assert m[:] == d\n    assert m[len(d)-1:] == d[-1:]\n\
         print(len(d), hashlib.sha256(d).hexdigest())",
        mnt.display()
    );
    let out = sh(&format!("python3 -c \"{py}\""));
    assert!(out.starts_with(&format!("{} ", BLOCK + 1)), "{out}");

    // 1,000 random preads of the large file.
    let large = "large/large.bin";
    let size = tree[large];
    let file = std::fs::File::open(mnt.join(large)).unwrap();
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..1000 {
        let offset = next() % size;
        let len = (next() % (3 << 20)) as usize + 1;
        let mut got = vec![0u8; len];
        let n = file.read_at(&mut got, offset).unwrap();
        let expected_len = len.min((size - offset) as usize);
        assert_eq!(n, expected_len, "pread length at {offset}+{len}");
        let mut expected = vec![0u8; expected_len];
        fill(seed_of(large), offset, &mut expected);
        assert!(got[..n] == expected[..], "pread bytes at {offset}+{len}");
    }

    // Read-only: writes, creates, renames, removals fail with EROFS.
    let erofs = Some(libc_erofs());
    assert_eq!(
        std::fs::write(mnt.join("new-file"), b"x")
            .unwrap_err()
            .raw_os_error(),
        erofs
    );
    assert_eq!(
        std::fs::OpenOptions::new()
            .append(true)
            .open(mnt.join("one-byte"))
            .unwrap_err()
            .raw_os_error(),
        erofs
    );
    assert_eq!(
        std::fs::create_dir(mnt.join("new-dir"))
            .unwrap_err()
            .raw_os_error(),
        erofs
    );
    assert_eq!(
        std::fs::rename(mnt.join("one-byte"), mnt.join("two"))
            .unwrap_err()
            .raw_os_error(),
        erofs
    );
    assert_eq!(
        std::fs::remove_file(mnt.join("one-byte"))
            .unwrap_err()
            .raw_os_error(),
        erofs
    );
    assert_eq!(
        std::fs::metadata(mnt.join("no-such")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );

    // A second full read, with the kernel's page cache dropped, is served by Granary's cache.
    let gets = backend_gets(mount);
    assert!(gets > 0.0, "the first read fetched from the backend");
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert_eq!(checksums(mnt), checksums(local));
    assert_eq!(backend_gets(mount), gets, "second read made backend GETs");
    let text = mount.metrics();
    let hits = metric(&text, "granary_block_reads_total", &[("tier", "memory")])
        + metric(&text, "granary_block_reads_total", &[("tier", "disk")]);
    assert!(hits > 0.0, "no cache hits recorded");
}

fn libc_erofs() -> i32 {
    30 // EROFS on Linux
}

fn mount_and_exercise(source: String, envs: Vec<(String, String)>, local: &Path, tree: &Tree) {
    let cache = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let mount = Mount::up(UpOptions {
        source,
        envs,
        cache_dir: cache.path(),
        mount_dir: mnt.path(),
        extra: vec![
            "--block-size".into(),
            "1MiB".into(),
            "--memory-cache".into(),
            "256MiB".into(),
            "--disk-cache".into(),
            "512MiB".into(),
        ],
    });
    exercise(&mount, local, tree);
    assert!(mount.stop().success(), "granary up exits 0 on SIGINT");
}

async fn s3_backend(target: S3Target, name: &str) {
    let tree = tree();
    let local = tempfile::tempdir().unwrap();
    write_local(local.path(), &tree);
    let prefix = unique(name);
    target.upload(&prefix, &tree).await;
    let envs = target.env();
    let uri = target.uri(&prefix);
    let local_path = local.path().to_path_buf();
    tokio::task::spawn_blocking(move || mount_and_exercise(uri, envs, &local_path, &tree))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_server_moto() {
    s3_backend(S3Target::moto(), "moto").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ceph_rgw() {
    s3_backend(S3Target::rgw(), "rgw").await;
}

#[test]
fn glusterfs_volume() {
    let tree = tree();
    let local = tempfile::tempdir().unwrap();
    write_local(local.path(), &tree);
    let root = gluster_dir().join(unique("gluster"));
    write_local(&root, &tree);
    mount_and_exercise(
        format!("file://{}", root.display()),
        vec![],
        local.path(),
        &tree,
    );
    std::fs::remove_dir_all(&root).unwrap();
}
