//! The CSI node plugin driven over its unix socket as kubelet drives it, with a real worker and
//! FUSE node mount (`granary up` over a POSIX tree) and its dataset API: identity and node info,
//! a dataset published with waitReady showing exactly its files, read-only; idempotent repeats;
//! another tenant's dataset and paths refused with PERMISSION_DENIED; bad requests with the
//! spec's codes; unpublish removing only its target; published targets readable across a kill
//! of the node mount's server (its keeper starts another); a pod's reads labelled with its job.

mod support;

use granary_proto::csi;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::process::{Logged, Mount, UpOptions, granary, run_with_timeout, server_of, signal};
use support::{free_port, wait_until};
use tonic::Code;

type NodeClient = csi::node_client::NodeClient<tonic::transport::Channel>;

async fn connect(socket: PathBuf) -> tonic::transport::Channel {
    tonic::transport::Endpoint::try_from("http://csi.sock")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap()
}

fn publish_request(
    target: &Path,
    namespace: &str,
    attributes: &[(&str, &str)],
) -> csi::NodePublishVolumeRequest {
    let mut context: HashMap<String, String> = attributes
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    context.insert(
        "csi.storage.k8s.io/pod.namespace".into(),
        namespace.to_string(),
    );
    context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    csi::NodePublishVolumeRequest {
        volume_id: format!("csi-{}", target.file_name().unwrap().to_string_lossy()),
        target_path: target.to_str().unwrap().to_string(),
        volume_capability: Some(csi::VolumeCapability {
            access_type: Some(csi::volume_capability::AccessType::Mount(
                csi::volume_capability::MountVolume::default(),
            )),
            access_mode: Some(csi::volume_capability::AccessMode {
                mode: csi::volume_capability::access_mode::Mode::SingleNodeReaderOnly as i32,
            }),
        }),
        readonly: true,
        volume_context: context,
        ..Default::default()
    }
}

async fn publish(
    node: &mut NodeClient,
    target: &Path,
    namespace: &str,
    attributes: &[(&str, &str)],
) -> Result<(), tonic::Status> {
    node.node_publish_volume(publish_request(target, namespace, attributes))
        .await
        .map(drop)
}

async fn unpublish(node: &mut NodeClient, target: &Path) -> Result<(), tonic::Status> {
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: "v".into(),
        target_path: target.to_str().unwrap().into(),
    })
    .await
    .map(drop)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn is_mount_point(path: &Path) -> bool {
    mount_options(path).is_some()
}

/// The per-mount options of the mount at `path` (mountinfo's sixth field), if one is there.
fn mount_options(path: &Path) -> Option<Vec<String>> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
        .map(|l| {
            l.split(' ')
                .nth(5)
                .unwrap()
                .split(',')
                .map(String::from)
                .collect()
        })
}

/// Runs `command` with `sh` in a cgroup named as kubelet names pod `uid`'s (cgroupfs driver),
/// beneath a cgroup of this test's own.
fn in_pod_cgroup(uid: &str, command: &str) -> std::process::ExitStatus {
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|r| Path::new(r).join("cgroup.procs").exists())
        .expect("a cgroup v2 hierarchy");
    let ours = Path::new(root).join(format!("granary-test-{}", std::process::id()));
    let pod = ours.join(format!("kubepods/pod{uid}"));
    std::fs::create_dir_all(&pod).unwrap();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {command}",
            pod.display()
        ))
        .status()
        .unwrap();
    for dir in [pod.clone(), ours.join("kubepods"), ours] {
        std::fs::remove_dir(&dir).unwrap();
    }
    status
}

#[test]
fn pods_get_their_tenants_data_read_only_and_nothing_else() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let files: &[(&str, usize)] = &[
        ("team-a/ds/train-0.bin", 3 << 20),
        ("team-a/ds/train-1.bin", 70_000),
        ("team-a/ds/sub/labels.txt", 1_000),
        ("team-a/free/notes.txt", 500),
        ("team-b/secret/weights.bin", 200_000),
        ("team-b/ops/keys.txt", 300),
    ];
    for (i, (path, size)) in files.iter().enumerate() {
        let p = src.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, vec![i as u8 + 1; *size]).unwrap();
    }
    let mnt = work.path().join("node-mount");
    std::fs::create_dir(&mnt).unwrap();
    let pod_records = work.path().join("pod-records");
    let api = format!("127.0.0.1:{}", free_port());
    let node_mount = Mount::up(UpOptions {
        source: src.to_str().unwrap().into(),
        envs: vec![],
        cache_dir: &work.path().join("cache"),
        mount_dir: &mnt,
        extra: vec![
            "--listen".into(),
            api.clone(),
            "--allow-other".into(),
            "--pods-dir".into(),
            pod_records.to_str().unwrap().into(),
        ],
    });
    let node_id = granary_cache_server::config::default_node_id();

    // A dataset of team-a, pinned and loaded onto this node (the worker's API has no tokens:
    // the pin names its tenant).
    let dataset = |args: &[&str]| {
        let mut all = vec!["dataset", "--server", api.as_str()];
        all.extend_from_slice(args);
        let out = run_with_timeout(granary(&all, &[]), Duration::from_secs(60));
        assert!(out.status.success(), "dataset {args:?}: {}", out.stderr);
    };
    dataset(&["pin", "ds-a", "--path", "/team-a/ds", "--tenant", "team-a"]);
    dataset(&[
        "pin",
        "ds-b",
        "--path",
        "/team-b/secret",
        "--tenant",
        "team-b",
    ]);

    let config = work.path().join("csi.toml");
    std::fs::write(
        &config,
        "[[tenant]]\nname = \"team-a\"\nnamespaces = [\"ns-a\"]\npaths = [\"/team-a/free\"]\n\
         [[tenant]]\nname = \"team-b\"\nnamespaces = [\"ns-b\"]\n",
    )
    .unwrap();
    // The workers' rule of who reads which mount: team-b has no `paths` above, so this alone
    // decides what its pods may mount.
    let worker_config = work.path().join("worker.toml");
    let mount = |path: &str, tenant: &str| {
        format!("[[mount]]\npath = \"{path}\"\nsource = \"/unused\"\ntenants = [\"{tenant}\"]\n")
    };
    std::fs::write(
        &worker_config,
        format!(
            "[[tenant]]\nname = \"team-a\"\n[[tenant]]\nname = \"team-b\"\n{}{}{}",
            mount("/team-a", "team-a"),
            mount("/team-b", "team-b"),
            mount("/team-b/ops", "team-a"),
        ),
    )
    .unwrap();
    // The driver's tenants must be the workers'.
    let stranger = work.path().join("stranger.toml");
    std::fs::write(
        &stranger,
        "[[tenant]]\nname = \"team-c\"\nnamespaces = [\"ns-c\"]\n",
    )
    .unwrap();
    let check = run_with_timeout(
        granary(
            &[
                "csi",
                "--node-id",
                "n",
                "--config",
                stranger.to_str().unwrap(),
                "--worker-config",
                worker_config.to_str().unwrap(),
                "--check-config",
            ],
            &[],
        ),
        Duration::from_secs(30),
    );
    assert!(!check.status.success());
    assert!(
        check
            .stderr
            .contains("\"team-c\" of the driver config is no [[tenant]]"),
        "{}",
        check.stderr
    );
    let socket = work.path().join("csi.sock");
    // Interrupted and reaped when dropped, a failed assertion included.
    let csi_plugin = Logged::spawn(
        granary(
            &[
                "csi",
                "--endpoint",
                &format!("unix://{}", socket.display()),
                "--node-id",
                &node_id,
                "--node-mount",
                mnt.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--worker-config",
                worker_config.to_str().unwrap(),
                "--server",
                &api,
                "--wait-timeout",
                "60s",
                "--pods-dir",
                pod_records.to_str().unwrap(),
            ],
            &[],
        ),
        &work.path().join("csi.log"),
    );
    wait_until("the CSI socket", Duration::from_secs(20), || {
        socket.exists()
    });

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = connect(socket.clone()).await;
        let mut identity = csi::identity_client::IdentityClient::new(channel.clone());
        let mut node = NodeClient::new(channel);
        let info = identity
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "csi.granary.io");
        let probe = identity
            .probe(csi::ProbeRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(probe.ready, Some(true));
        let got = node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.node_id, node_id);

        // Kubelet's pod directories: the parent exists, the target may not.
        let pods = work.path().join("pods");
        std::fs::create_dir(&pods).unwrap();
        let t1 = pods.join("t1");
        let t2 = pods.join("t2");

        // The dataset, once ready here: exactly its files, right bytes, read-only.
        dataset(&["load", "ds-a"]);
        let ds_a = [("dataset", "ds-a"), ("waitReady", "true")];
        publish(&mut node, &t1, "ns-a", &ds_a).await.unwrap();
        assert_eq!(names(&t1), ["sub", "train-0.bin", "train-1.bin"]);
        assert_eq!(names(&t1.join("sub")), ["labels.txt"]);
        assert_eq!(
            std::fs::read(t1.join("train-0.bin")).unwrap(),
            std::fs::read(src.join("team-a/ds/train-0.bin")).unwrap()
        );
        let write = std::fs::write(t1.join("new"), b"x").unwrap_err();
        assert_eq!(write.raw_os_error(), Some(libc::EROFS), "{write}");
        // Read-only, no setuid, no devices, as the bind mount's own flags.
        let options = mount_options(&t1).unwrap();
        for flag in ["ro", "nosuid", "nodev"] {
            assert!(options.iter().any(|o| o == flag), "{flag} in {options:?}");
        }
        // The same again: OK; something else onto the same target: ALREADY_EXISTS.
        publish(&mut node, &t1, "ns-a", &ds_a).await.unwrap();
        let other = publish(&mut node, &t1, "ns-a", &[("path", "/team-a/free")]).await;
        assert_eq!(other.unwrap_err().code(), Code::AlreadyExists);

        // A path of the tenant's: OK. Another tenant's data, paths or an unknown namespace:
        // PERMISSION_DENIED, and nothing is mounted.
        publish(&mut node, &t2, "ns-a", &[("path", "/team-a/free")])
            .await
            .unwrap();
        assert_eq!(names(&t2), ["notes.txt"]);
        let t3 = pods.join("t3");
        // Team-b's own mount, by the workers' rule alone.
        publish(&mut node, &t3, "ns-b", &[("path", "/team-b/secret")])
            .await
            .unwrap();
        assert_eq!(names(&t3), ["weights.bin"]);
        unpublish(&mut node, &t3).await.unwrap();
        for (namespace, attrs, says) in [
            ("ns-b", vec![("dataset", "ds-a")], "another tenant"),
            ("ns-a", vec![("dataset", "ds-b")], "another tenant"),
            ("ns-a", vec![("path", "/team-b/secret")], "may not see"),
            ("ns-a", vec![("path", "/team-a")], "may not see"),
            // Within team-b's mount, but over a mount of team-a's.
            ("ns-b", vec![("path", "/team-b")], "[[mount]] tenants"),
            (
                "ns-x",
                vec![("path", "/team-a/free")],
                "belongs to no tenant",
            ),
        ] {
            let err = publish(&mut node, &t3, namespace, &attrs)
                .await
                .unwrap_err();
            assert_eq!(
                err.code(),
                Code::PermissionDenied,
                "{namespace} {attrs:?}: {err}"
            );
            assert!(err.message().contains(says), "{err}");
            assert!(!is_mount_point(&t3));
        }
        // Bad requests: the spec's codes.
        let missing = publish(&mut node, &t3, "ns-a", &[("dataset", "nope")]).await;
        assert_eq!(missing.unwrap_err().code(), Code::NotFound);
        let mut no_id = publish_request(&t3, "ns-a", &[("path", "/team-a/free")]);
        no_id.volume_id.clear();
        let err = node.node_publish_volume(no_id).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let mut no_cap = publish_request(&t3, "ns-a", &[("path", "/team-a/free")]);
        no_cap.volume_capability = None;
        let err = node.node_publish_volume(no_cap).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let mut relative = publish_request(&t3, "ns-a", &[("path", "/team-a/free")]);
        relative.target_path = "pods/t3".into();
        let err = node.node_publish_volume(relative).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        for attrs in [
            vec![("path", "/team-a/../team-b")],
            vec![("path", "/team-a/free"), ("dataset", "ds-a")],
        ] {
            let err = publish(&mut node, &t3, "ns-a", &attrs).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{attrs:?}");
        }
        assert!(!is_mount_point(&t3));

        // A pod's reads carry its job: a volume at kubelet's path for pod UID, its reader in
        // that pod's cgroup; the record goes with the pod's last volume.
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let t4 = pods.join(format!("{uid}/volumes/kubernetes.io~csi/data/mount"));
        std::fs::create_dir_all(t4.parent().unwrap()).unwrap();
        let mut request =
            publish_request(&t4, "ns-a", &[("path", "/team-a/free"), ("job", "resnet")]);
        let bad_job = {
            let mut r = request.clone();
            r.volume_context
                .insert("csi.storage.k8s.io/pod.uid".into(), uid.into());
            r.volume_context.insert("job".into(), "a job".into());
            node.node_publish_volume(r).await.unwrap_err()
        };
        assert_eq!(bad_job.code(), Code::InvalidArgument, "{bad_job}");
        assert!(!is_mount_point(&t4) && !pod_records.join(uid).exists());
        request
            .volume_context
            .insert("csi.storage.k8s.io/pod.uid".into(), uid.into());
        node.node_publish_volume(request).await.unwrap();
        let attributed = |m: &str| {
            support::metric(
                m,
                "granary_fuse_blocks_total",
                &[("dataset", "team-a"), ("training_job", "ns-a/resnet")],
            )
        };
        assert_eq!(attributed(&node_mount.metrics()), 0.0);
        let read = in_pod_cgroup(
            uid,
            &format!(
                "dd if={} of=/dev/null bs=4k iflag=direct",
                t4.join("notes.txt").display()
            ),
        );
        assert!(read.success());
        assert!(
            attributed(&node_mount.metrics()) >= 1.0,
            "{}",
            node_mount.metrics()
        );
        unpublish(&mut node, &t4).await.unwrap();
        assert!(!pod_records.join(uid).exists());

        // The node mount's server dies: its keeper starts another; published targets stay
        // readable.
        let server = server_of(node_mount.pid()).expect("the FUSE server");
        signal(server, "KILL");
        assert_eq!(
            std::fs::read(t1.join("train-1.bin")).unwrap(),
            std::fs::read(src.join("team-a/ds/train-1.bin")).unwrap()
        );
        assert_eq!(names(&t2), ["notes.txt"]);

        // Unpublish removes only its target; again: OK.
        unpublish(&mut node, &t2).await.unwrap();
        assert!(!t2.exists() && !is_mount_point(&t2));
        unpublish(&mut node, &t2).await.unwrap();
        assert_eq!(names(&t1), ["sub", "train-0.bin", "train-1.bin"]);
        unpublish(&mut node, &t1).await.unwrap();
        assert!(!t1.exists());
    });
    drop(csi_plugin);
    drop(node_mount);
}

#[test]
fn a_tenants_token_shows_and_reads_only_its_mounts() {
    use granary_net::client::GrpcCache;
    use granary_proto::CacheApi;
    use support::cluster::Worker;
    let work = tempfile::tempdir().unwrap();
    for (dir, file) in [("a", "a.bin"), ("b", "b.bin"), ("shared", "s.bin")] {
        std::fs::create_dir_all(work.path().join(dir)).unwrap();
        std::fs::write(work.path().join(dir).join(file), vec![7u8; 100_000]).unwrap();
    }
    let api = format!("127.0.0.1:{}", free_port());
    let config = work.path().join("w.toml");
    let w = |d: &str| work.path().join(d).display().to_string();
    std::fs::write(
        &config,
        format!(
            "listen = \"{api}\"\n[cache]\ndir = \"{cache}\"\nmemory = \"64MiB\"\ndisk = \"0\"\n\
             [datasets]\nadmin_token = \"admin-token-0123456789\"\n\
             [[tenant]]\nname = \"team-a\"\ntoken = \"team-a-token-0123456789\"\n\
             [[tenant]]\nname = \"team-b\"\ntoken = \"team-b-token-0123456789\"\n\
             [[mount]]\npath = \"/teams/a\"\nsource = \"{a}\"\ntenants = [\"team-a\"]\n\
             [[mount]]\npath = \"/teams/b\"\nsource = \"{b}\"\ntenants = [\"team-b\"]\n\
             [[mount]]\npath = \"/shared\"\nsource = \"{s}\"\n",
            cache = w("cache"),
            a = w("a"),
            b = w("b"),
            s = w("shared"),
        ),
    )
    .unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let _worker = Worker::start("w", &config, &metrics);
    let token_a = work.path().join("token-a");
    std::fs::write(&token_a, "team-a-token-0123456789\n").unwrap();
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mount_metrics = format!("127.0.0.1:{}", free_port());
    let args = [
        "mount",
        "--server",
        api.as_str(),
        "--token-file",
        token_a.to_str().unwrap(),
        "--no-keeper",
        "--metrics-addr",
        mount_metrics.as_str(),
        mnt.to_str().unwrap(),
    ];
    let mount = Mount::spawn(granary(&args, &[]), &mnt, mount_metrics.clone());
    assert_eq!(names(&mnt), ["shared", "teams"]);
    assert_eq!(names(&mnt.join("teams")), ["a"]);
    assert_eq!(
        std::fs::read(mnt.join("teams/a/a.bin")).unwrap().len(),
        100_000
    );
    assert_eq!(
        std::fs::read(mnt.join("shared/s.bin")).unwrap().len(),
        100_000
    );
    let hidden = std::fs::metadata(mnt.join("teams/b/b.bin")).unwrap_err();
    assert_eq!(hidden.kind(), std::io::ErrorKind::NotFound, "{hidden}");
    drop(mount);
    // The token given inline (`--token`): team-b's view; a token no tenant has: no mount.
    let mount_with = |token: &str| {
        let args = [
            "mount",
            "--server",
            api.as_str(),
            "--token",
            token,
            "--no-keeper",
            mnt.to_str().unwrap(),
        ];
        granary(&args, &[])
    };
    let mount = Mount::spawn(mount_with("team-b-token-0123456789"), &mnt, String::new());
    assert_eq!(names(&mnt.join("teams")), ["b"]);
    assert_eq!(
        std::fs::read(mnt.join("teams/b/b.bin")).unwrap().len(),
        100_000
    );
    drop(mount);
    let refused = run_with_timeout(mount_with("nobody-0123456789"), Duration::from_secs(30));
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("tenant token"),
        "{}",
        refused.stderr
    );
    assert!(!support::is_mounted(&mnt));

    // The worker enforces it, whatever a client asks: a block of team-b's mount, asked for with
    // team-a's token, is refused; with the admin's token (or none, as a node) it is served.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let connect = || GrpcCache::connect(&api, None, None, Duration::from_secs(10));
        let admin = connect()
            .await
            .unwrap()
            .with_token("admin-token-0123456789")
            .unwrap();
        let entries = admin.list("/teams/b").await.unwrap();
        let object = entries[0].object.clone().unwrap();
        assert!(admin.read_block(&object, 0).await.is_ok());
        let a = connect()
            .await
            .unwrap()
            .with_token("team-a-token-0123456789")
            .unwrap();
        let refused = a.read_block(&object, 0).await.unwrap_err();
        assert!(
            matches!(refused, granary_proto::ApiError::Denied(_)),
            "{refused:?}"
        );
        assert!(matches!(
            a.list("/teams/b").await.unwrap_err(),
            granary_proto::ApiError::NotFound(_)
        ));
        assert!(matches!(
            a.stat("/teams/b/b.bin").await.unwrap_err(),
            granary_proto::ApiError::NotFound(_)
        ));
        let stranger = connect()
            .await
            .unwrap()
            .with_token("nobody-0123456789")
            .unwrap();
        assert!(stranger.list("/").await.is_err());
        let node = connect().await.unwrap();
        assert_eq!(node.list("/teams").await.unwrap().len(), 2);
    });
}
