//! Mount tests over a local POSIX source (no external service): a directory of 10,000 files, a
//! file larger than 4 GiB, a file changed in the backend, the split deployment (`granary
//! server` + `granary mount` over gRPC), `dataset wait` through a file's failed loads, and both
//! kernel transports (FUSE over io_uring and `/dev/fuse`) under concurrent readers.

mod support;

use std::os::unix::fs::FileExt;
use std::time::Duration;
use support::data::{Tree, content, fill, seed_of, standard_tree, write_local};
use support::process::{Mount, UpOptions, granary, run_with_timeout, signal};
use support::{free_port, is_mounted, metric, wait_until};

fn up(
    source: &std::path::Path,
    cache: &std::path::Path,
    mnt: &std::path::Path,
    extra: &[&str],
) -> Mount {
    Mount::up(UpOptions {
        source: source.to_str().unwrap().to_string(),
        envs: vec![],
        cache_dir: cache,
        mount_dir: mnt,
        extra: extra.iter().map(|s| s.to_string()).collect(),
    })
}

#[test]
fn ten_thousand_files_in_one_directory() {
    let source = tempfile::tempdir().unwrap();
    let dir = source.path().join("many");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..10_000 {
        std::fs::write(dir.join(format!("file-{i:05}")), format!("{i}\n")).unwrap();
    }
    let (cache, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mount = up(source.path(), cache.path(), mnt.path(), &[]);
    let mut names: Vec<String> = std::fs::read_dir(mnt.path().join("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 10_000);
    assert_eq!(names[9_999], "file-09999");
    for i in (0..10_000).step_by(97) {
        let text = std::fs::read_to_string(mnt.path().join(format!("many/file-{i:05}"))).unwrap();
        assert_eq!(text, format!("{i}\n"));
    }
    let lists = metric(
        &mount.metrics(),
        "granary_backend_requests_total",
        &[("op", "list")],
    );
    assert!(
        lists <= 3.0,
        "one listing serves every lookup: {lists} LISTs"
    );
    assert!(mount.stop().success());
}

#[test]
fn files_larger_than_4_gib() {
    let source = tempfile::tempdir().unwrap();
    let path = source.path().join("huge.bin");
    let size: u64 = (4 << 30) + (3 << 20) + 7;
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(size).unwrap();
    // Sparse, with real bytes around the 4 GiB boundary and at the end.
    let regions = [
        (0u64, 1u64 << 20),
        ((4 << 30) - 4096, 8192),
        (size - 100_000, 100_000),
    ];
    for (offset, len) in regions {
        let mut buf = vec![0u8; len as usize];
        fill(seed_of("huge"), offset, &mut buf);
        file.write_all_at(&buf, offset).unwrap();
    }
    drop(file);
    let (cache, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mount = up(
        source.path(),
        cache.path(),
        mnt.path(),
        &["--disk-cache", "0"],
    );
    let through = std::fs::File::open(mnt.path().join("huge.bin")).unwrap();
    assert_eq!(through.metadata().unwrap().len(), size);
    for (offset, len) in regions {
        let mut got = vec![0u8; len as usize];
        through.read_exact_at(&mut got, offset).unwrap();
        let mut expected = vec![0u8; len as usize];
        fill(seed_of("huge"), offset, &mut expected);
        assert!(got == expected, "bytes at {offset}");
    }
    let mut zeros = vec![1u8; 4096];
    through.read_exact_at(&mut zeros, 2 << 30).unwrap();
    assert!(
        zeros.iter().all(|&b| b == 0),
        "sparse region reads as zeros"
    );
    let mut tail = vec![0u8; 10];
    assert_eq!(
        through.read_at(&mut tail, size - 3).unwrap(),
        3,
        "short read at EOF"
    );
    assert_eq!(
        through.read_at(&mut tail, size + 10).unwrap(),
        0,
        "read past EOF"
    );
    drop(through);
    assert!(mount.stop().success());
}

#[test]
fn a_file_changed_in_the_backend_is_never_served_mixed() {
    let source = tempfile::tempdir().unwrap();
    let path = source.path().join("f.bin");
    let old = content("old", 8 << 20);
    std::fs::write(&path, &old).unwrap();
    let (cache, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mount = up(
        source.path(),
        cache.path(),
        mnt.path(),
        &["--metadata-ttl", "1s", "--block-size", "1MiB"],
    );
    let through = mnt.path().join("f.bin");
    let open = std::fs::File::open(&through).unwrap();
    let mut first = vec![0u8; 1 << 20];
    open.read_exact_at(&mut first, 0).unwrap();
    assert!(first[..] == old[..1 << 20]);
    // Replace the file (new inode, new size) while it is open.
    let new = content("new", 6 << 20);
    std::fs::write(source.path().join("f.tmp"), &new).unwrap();
    std::fs::rename(source.path().join("f.tmp"), &path).unwrap();
    // The open handle reads its version or fails: never bytes of the new one.
    let mut rest = vec![0u8; 1 << 20];
    match open.read_exact_at(&mut rest, 5 << 20) {
        Ok(()) => assert!(
            rest[..] == old[5 << 20..6 << 20],
            "old handle served other bytes"
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(116), "ESTALE expected, got {e}"),
    }
    drop(open);
    // After the TTL a new open sees the new version, whole.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(std::fs::read(&through).unwrap() == new);
    assert!(mount.stop().success());
}

#[test]
fn split_deployment_server_and_remote_mount() {
    let source = tempfile::tempdir().unwrap();
    let tree: Tree = standard_tree(1 << 20, 24 << 20, 300);
    write_local(source.path(), &tree);
    let cache = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = cache.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"w1\"\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = \"{}\"\nmemory = \"64MiB\"\ndisk = \"256MiB\"\nblock_size = \"1MiB\"\n[[mount]]\npath = \"/data\"\nsource = \"file://{}\"\n",
            cache.path().join("c").display(),
            source.path().display()
        ),
    )
    .unwrap();
    let server_metrics = format!("127.0.0.1:{}", free_port());
    let mut server = granary(
        &[
            "server",
            "--config",
            config.to_str().unwrap(),
            "--metrics-addr",
            &server_metrics,
        ],
        &[],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "server did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mnt = tempfile::tempdir().unwrap();
    let client_metrics = format!("127.0.0.1:{}", free_port());
    let mount = Mount::spawn(
        granary(
            &[
                "mount",
                "--server",
                &format!("127.0.0.1:{port}"),
                mnt.path().to_str().unwrap(),
                "--metrics-addr",
                &client_metrics,
            ],
            &[],
        ),
        mnt.path(),
        client_metrics,
    );
    let root: Vec<String> = std::fs::read_dir(mnt.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        root,
        vec!["data".to_string()],
        "the namespace root lists the mount point"
    );
    for (path, size) in &tree {
        let got = std::fs::read(mnt.path().join("data").join(path)).unwrap();
        assert!(got == content(path, *size), "{path}");
    }
    let server_text = support::http_get(&server_metrics, "/metrics");
    assert!(
        metric(
            &server_text,
            "granary_rpc_requests_total",
            &[("method", "read_block"), ("code", "ok")]
        ) > 0.0
    );
    assert!(mount.stop().success());
    support::process::signal(server.id(), "INT");
    assert!(server.wait().unwrap().success(), "server exits 0 on SIGINT");
}

#[test]
fn dataset_wait_rides_out_a_file_failing_to_load_and_fail_fast_does_not() {
    let source = tempfile::tempdir().unwrap();
    let data = source.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.bin"), content("a", 300 << 10)).unwrap();
    std::fs::write(data.join("b.bin"), content("b", 200 << 10)).unwrap();
    let (cache, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let api = format!("127.0.0.1:{}", free_port());
    let mount = up(source.path(), cache.path(), mnt.path(), &["--listen", &api]);
    let dataset = |args: &[&str], limit: u64| {
        let mut all = vec!["dataset", "--server", &api];
        all.extend_from_slice(args);
        run_with_timeout(granary(&all, &[]), Duration::from_secs(limit))
    };
    assert!(
        dataset(&["pin", "ds", "--path", "/data"], 30)
            .status
            .success()
    );
    // b.bin goes away after the pin (a rename keeps its inode and mtime: the same version when
    // it comes back), so its load fails and is retried.
    let away = source.path().join("b.away");
    std::fs::rename(data.join("b.bin"), &away).unwrap();
    assert!(dataset(&["load", "ds"], 30).status.success());

    let fast = dataset(&["wait", "ds", "--fail-fast", "--timeout", "60s"], 90);
    assert!(!fast.status.success(), "{}", fast.stderr);
    assert!(fast.elapsed < Duration::from_secs(30), "{:?}", fast.elapsed);
    assert!(
        fast.stderr.contains("failed") && fast.stderr.contains("b.bin"),
        "{}",
        fast.stderr
    );
    // Without --fail-fast it waits, says why, and gives up only at the timeout. Meanwhile the
    // worker idles until the file's next try (it once restarted an empty load in a loop,
    // keeping both cores busy: over 3 CPU-seconds in these 3 s).
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", mount.server_pid())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        // utime and stime, in clock ticks (100 a second).
        (fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()) as f64 / 100.0
    };
    let before = cpu();
    let timed_out = dataset(&["wait", "ds", "--timeout", "3s"], 60);
    let busy = cpu() - before;
    assert!(
        busy < 1.0,
        "granary up used {busy} CPU-seconds while waiting"
    );
    assert!(!timed_out.status.success());
    assert!(timed_out.elapsed >= Duration::from_secs(3));
    assert!(
        timed_out.stderr.contains("not ready after") && timed_out.stderr.contains("b.bin"),
        "{}",
        timed_out.stderr
    );
    assert!(
        timed_out.stderr.contains("\"reason\""),
        "JSON lines carry the reason: {}",
        timed_out.stderr
    );

    // The file comes back while wait is waiting: a retry loads it, and wait exits 0.
    let restore = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        std::fs::rename(&away, data.join("b.bin")).unwrap();
    });
    let waited = dataset(&["wait", "ds", "--timeout", "120s"], 180);
    restore.join().unwrap();
    assert!(waited.status.success(), "{}", waited.stderr);
    assert!(
        waited.stdout.contains("ready (100.00%)"),
        "{}",
        waited.stdout
    );
    assert!(std::fs::read(mnt.path().join("data/b.bin")).unwrap() == content("b", 200 << 10));
    assert!(mount.stop().success());
}

/// Whether a mount here takes its requests over io_uring: the kernel has FUSE over io_uring and
/// we are root (the mount turns the module parameter on).
fn io_uring_expected() -> bool {
    std::path::Path::new("/sys/module/fuse/parameters/enable_uring").exists()
        && std::fs::metadata("/proc/self")
            .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
            .unwrap_or(false)
}

#[test]
fn both_kernel_transports_serve_the_same_bytes_to_many_readers() {
    // 150 files from empty to 5 MiB (two 4 MiB blocks), in two directories.
    let source = tempfile::tempdir().unwrap();
    let mut tree = Tree::new();
    for i in 0..150u64 {
        let size = match i % 5 {
            0 => 0,
            1 => 1 + i,
            2 => 128 << 10,
            3 => (1 << 20) + i * 7,
            _ => (5 << 20) - i,
        };
        tree.insert(format!("d{}/f{i:03}", i % 2), size);
    }
    write_local(source.path(), &tree);
    let uring = io_uring_expected();
    for (flags, rings) in [(vec!["--io-uring"], uring), (vec![], false)] {
        let (cache, mnt) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mount = up(source.path(), cache.path(), mnt.path(), &flags);
        let queues = metric(&mount.metrics(), "granary_fuse_io_uring_queues", &[]);
        if rings {
            assert!(
                queues >= 1.0,
                "{flags:?}: io_uring queues {queues}: {}",
                mount.stderr()
            );
        } else {
            assert_eq!(queues, 0.0, "{flags:?}: requests through /dev/fuse");
        }
        // 24 readers (more than the rings' 32 slots can hold when each has reads in flight),
        // each over every file in its own order, in 64 KiB reads: every byte must match.
        let paths: Vec<&String> = tree.keys().collect();
        std::thread::scope(|scope| {
            for reader in 0..24usize {
                let (paths, tree, mnt, flags) = (&paths, &tree, mnt.path(), &flags);
                scope.spawn(move || {
                    for k in 0..paths.len() {
                        let path = paths[(k * 7 + reader * 13) % paths.len()];
                        let file = std::fs::File::open(mnt.join(path)).unwrap();
                        let size = tree[path.as_str()];
                        assert_eq!(file.metadata().unwrap().len(), size, "{path}");
                        let mut got = Vec::with_capacity(size as usize);
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = file.read_at(&mut buf, got.len() as u64).unwrap();
                            if n == 0 {
                                break;
                            }
                            got.extend_from_slice(&buf[..n]);
                        }
                        assert!(got == content(path, size), "{flags:?}: bytes of {path}");
                    }
                });
            }
        });
        for dir in ["d0", "d1"] {
            let mut listed: Vec<String> = std::fs::read_dir(mnt.path().join(dir))
                .unwrap()
                .map(|e| format!("{dir}/{}", e.unwrap().file_name().into_string().unwrap()))
                .collect();
            listed.sort();
            let expected: Vec<&String> = tree.keys().filter(|p| p.starts_with(dir)).collect();
            assert_eq!(
                listed.iter().collect::<Vec<_>>(),
                expected,
                "{flags:?}: {dir}"
            );
        }
        let missing = std::fs::File::open(mnt.path().join("d0/nope")).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        // The cache block (4 MiB by default), capped at 1 MiB, is the filesystem's block size.
        assert_eq!(
            statfs_block_size(mnt.path()),
            1 << 20,
            "{flags:?}: statfs answers"
        );
        assert!(mount.stop().success(), "{flags:?}: unmounts and exits 0");
    }
}

/// `statfs(2)` on `dir`: its block size.
fn statfs_block_size(dir: &std::path::Path) -> u64 {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%S"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "stat -f {}", dir.display());
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `kill -9` of `granary up` leaves a dead mount (reads fail with ENOTCONN); `granary up` on the
/// same directory detaches it, says so and mounts afresh. With `--auto-unmount` the kill leaves
/// no mount at all.
#[test]
fn a_killed_mount_is_detached_by_the_next_and_auto_unmount_leaves_none() {
    let work = tempfile::tempdir().unwrap();
    let (src, mnt) = (work.path().join("src"), work.path().join("mnt"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::write(src.join("a.txt"), b"still here\n").unwrap();
    let start = |cache: &str, extra: &[&str]| {
        let mut more = vec!["--memory-cache".to_string(), "64MiB".into()];
        more.extend(extra.iter().map(|s| s.to_string()));
        Mount::up(UpOptions {
            source: src.display().to_string(),
            envs: vec![],
            cache_dir: &work.path().join(cache),
            mount_dir: &mnt,
            extra: more,
        })
    };
    let dead = |what: &str| {
        let mut last = None;
        for _ in 0..100 {
            match std::fs::read(mnt.join("a.txt")) {
                Err(e) if e.raw_os_error() == Some(107) => return,
                other => last = Some(other),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what}: the mount did not die: {last:?}");
    };

    let first = start("c1", &[]);
    signal(first.pid(), "KILL");
    dead("kill -9");
    let second = start("c2", &[]);
    assert_eq!(std::fs::read(mnt.join("a.txt")).unwrap(), b"still here\n");
    assert!(
        second
            .stderr()
            .contains("detached a dead Granary mount (its daemon is gone); mounting afresh"),
        "{}",
        second.stderr()
    );
    assert!(second.stop().success());

    let third = start("c3", &["--auto-unmount"]);
    assert_eq!(std::fs::read(mnt.join("a.txt")).unwrap(), b"still here\n");
    signal(third.pid(), "KILL");
    wait_until("the killed mount is gone", Duration::from_secs(10), || {
        !is_mounted(&mnt)
    });
    // Nothing dead left: the directory is the plain, empty directory again.
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
    drop(third);
    drop(first);
}
