//! Node certificates through the Kubernetes CSR API, against a real kube-apiserver 1.20 with RBAC
//! enforced (scripts/services/kube.sh) and the roles of deploy/k8s/rbac.yaml and signer.yaml.
//!
//! `granary signer` (the only holder of the CA key, acting as the granary-signer service
//! account) signs a request made with a worker pod's bound token for the node that pod runs on;
//! `granary certs --csr` writes files that openssl verifies against the CA, and with --renew
//! replaces them before they expire. Requests for another node, from another service account or
//! a user, with a token bound to no pod, or asking for CA rights are denied with the reason on
//! the request and in the signer's log; a request for another signer is left alone; none gets a
//! certificate. The worker's own account can neither approve its request nor create one without
//! the role.

mod support;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::own::OwnService;
use support::process::{Finished, Logged, granary, granary_bin, run_with_timeout};
use support::{free_port, http_get, metric, wait_until};

const NS: &str = "granary";
const SIGNER: &str = "granary.io/node";

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/k8s")
        .join(file)
}

/// A child process killed (SIGINT, then SIGKILL) when the test ends, whatever happens.
/// `granary ARGS` in the background, logging at info level to `log`.
fn spawn(args: &[&str], log: &Path) -> Logged {
    let mut cmd = Command::new(granary_bin());
    cmd.args(args)
        .env("GRANARY_LOG", "info")
        .env("NO_COLOR", "1");
    Logged::spawn(cmd, log)
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// An apiserver of this test's own with the granary namespace, the RBAC of deploy/k8s, two
/// nodes and three pods: worker-n1 and worker-n2 (worker account) and intruder-n1.
struct Cluster {
    _svc: OwnService,
    rt: tokio::runtime::Runtime,
    admin: kube::Client,
    admin_kubeconfig: String,
    server: String,
    work: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let svc = OwnService::start("kube");
        let admin_kubeconfig = svc.get("GRANARY_TEST_KUBECONFIG");
        let text = std::fs::read_to_string(&admin_kubeconfig).unwrap();
        let server = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .unwrap()
            .to_string();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let admin = rt.block_on(client(Path::new(&admin_kubeconfig)));
        let c = Cluster {
            _svc: svc,
            rt,
            admin,
            admin_kubeconfig,
            server,
            work: tempfile::tempdir().unwrap(),
        };
        c.kubectl(&["apply", "-f", deploy("namespace.yaml").to_str().unwrap()]);
        c.kubectl(&[
            "apply",
            "-n",
            NS,
            "-f",
            deploy("rbac.yaml").to_str().unwrap(),
            "-f",
            deploy("signer.yaml").to_str().unwrap(),
        ]);
        let nodes: Api<Node> = Api::all(c.admin.clone());
        let pods: Api<Pod> = Api::namespaced(c.admin.clone(), NS);
        let sas: Api<ServiceAccount> = Api::namespaced(c.admin.clone(), NS);
        c.rt.block_on(async {
            for (name, ip) in [("n1", "10.0.0.1"), ("n2", "10.0.0.2")] {
                let node: Node = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                             {"type": "Hostname", "address": name}]},
                }))
                .unwrap();
                nodes.create(&PostParams::default(), &node).await.unwrap();
            }
            let intruder: ServiceAccount =
                serde_json::from_value(json!({"metadata": {"name": "intruder"}})).unwrap();
            sas.create(&PostParams::default(), &intruder).await.unwrap();
            for (pod, sa, node) in [
                ("worker-n1", "granary-worker", "n1"),
                ("worker-n2", "granary-worker", "n2"),
                ("intruder-n1", "intruder", "n1"),
            ] {
                let p: Pod = serde_json::from_value(json!({
                    "metadata": {"name": pod},
                    "spec": {"serviceAccountName": sa, "nodeName": node,
                             "containers": [{"name": "c", "image": "granary:latest"}]},
                }))
                .unwrap();
                pods.create(&PostParams::default(), &p).await.unwrap();
            }
        });
        c
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new("kubectl")
            .args(["--kubeconfig", &self.admin_kubeconfig])
            .args(args)
            .output()
            .expect("kubectl is installed (scripts/services/kube.sh install)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kubectl {args:?}: {text}");
        text
    }

    /// A token of service account `sa`, bound to `pod` when given (TokenRequest API).
    fn token(&self, sa: &str, pod: Option<&str>) -> String {
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), NS);
        let pods: Api<Pod> = Api::namespaced(self.admin.clone(), NS);
        self.rt.block_on(async {
            let mut spec = json!({"expirationSeconds": 3600});
            if let Some(pod) = pod {
                let uid = pods.get(pod).await.unwrap().metadata.uid.unwrap();
                spec["boundObjectRef"] =
                    json!({"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid});
            }
            let request = serde_json::from_value(json!({"spec": spec})).unwrap();
            let answer = sas
                .create_token_request(sa, &PostParams::default(), &request)
                .await
                .unwrap();
            answer.status.unwrap().token
        })
    }

    /// A kubeconfig file that authenticates with `token`.
    fn kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        let path = self.work.path().join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {}\n    \
             insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: {token}\n\
             contexts:\n- name: t\n  context:\n    cluster: t\n    user: u\n    namespace: {NS}\n\
             current-context: t\n",
            self.server
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn as_client(&self, kubeconfig: &Path) -> kube::Client {
        self.rt.block_on(client(kubeconfig))
    }

    /// A CA made with `granary certs` (development), and `granary signer` over it, running as
    /// the granary-signer service account; returns once the CA certificate is published, with
    /// the CA's directory and the signer's metrics address.
    fn signer(&self, lifetime: &str) -> (Logged, PathBuf, String) {
        let ca_dir = self.work.path().join("ca");
        let out = run_with_timeout(
            granary(&["certs", "--out", ca_dir.to_str().unwrap(), "dev"], &[]),
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "granary certs: {}", out.stderr);
        let kc = self.kubeconfig("signer", &self.token("granary-signer", None));
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let mut signer = spawn(
            &[
                "signer",
                "--ca-dir",
                ca_dir.to_str().unwrap(),
                "--kubeconfig",
                kc.to_str().unwrap(),
                "--lifetime",
                lifetime,
                "--metrics-addr",
                &metrics_addr,
                "--service-name",
                "granary-workers.granary.svc",
            ],
            &self.work.path().join("signer.log"),
        );
        let cms: Api<ConfigMap> = Api::namespaced(self.admin.clone(), NS);
        wait_until(
            "the CA certificate published",
            Duration::from_secs(30),
            || {
                assert!(signer.running(), "signer exited: {}", signer.log());
                self.rt
                    .block_on(cms.get_opt("granary-ca-cert"))
                    .unwrap()
                    .is_some()
            },
        );
        (signer, ca_dir, metrics_addr)
    }

    fn csr(&self, name: &str) -> CertificateSigningRequest {
        let api: Api<CertificateSigningRequest> = Api::all(self.admin.clone());
        self.rt.block_on(api.get(name)).unwrap()
    }

    fn csrs(&self) -> Vec<CertificateSigningRequest> {
        let api: Api<CertificateSigningRequest> = Api::all(self.admin.clone());
        self.rt
            .block_on(api.list(&Default::default()))
            .unwrap()
            .items
    }

    /// Creates a CSR as `as_user` with a PKCS#10 request made by openssl.
    fn create_csr(
        &self,
        as_user: &kube::Client,
        name: &str,
        signer: &str,
        openssl_extra: &[&str],
        usages: &[&str],
    ) -> Result<(), kube::Error> {
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (key, req) = (dir.join("key.pem"), dir.join("req.pem"));
        let mut args = vec![
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            req.to_str().unwrap(),
        ];
        args.extend_from_slice(openssl_extra);
        let (ok, text) = openssl(&args);
        assert!(ok, "openssl req: {text}");
        let pem = std::fs::read(&req).unwrap();
        let object: CertificateSigningRequest = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"request": k8s_openapi::ByteString(pem), "signerName": signer,
                     "usages": usages},
        }))
        .unwrap();
        let api: Api<CertificateSigningRequest> = Api::all(as_user.clone());
        self.rt
            .block_on(api.create(&PostParams::default(), &object))
            .map(|_| ())
    }

    /// `granary certs --csr --node NODE --out OUT` with `kubeconfig`.
    fn certs_csr(&self, kubeconfig: &Path, node: &str, out: &Path) -> Finished {
        run_with_timeout(
            granary(
                &[
                    "certs",
                    "--csr",
                    "--node",
                    node,
                    "--out",
                    out.to_str().unwrap(),
                    "--kubeconfig",
                    kubeconfig.to_str().unwrap(),
                    "--timeout",
                    "60s",
                ],
                &[],
            ),
            Duration::from_secs(90),
        )
    }
}

async fn client(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn conditions(csr: &CertificateSigningRequest) -> Vec<(String, String, String)> {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            (
                c.type_,
                c.reason.unwrap_or_default(),
                c.message.unwrap_or_default(),
            )
        })
        .collect()
}

fn certificate(csr: &CertificateSigningRequest) -> Vec<u8> {
    csr.status
        .as_ref()
        .and_then(|s| s.certificate.clone())
        .map(|b| b.0)
        .unwrap_or_default()
}

/// openssl's text of a certificate file.
fn x509_text(path: &Path) -> String {
    let (ok, text) = openssl(&["x509", "-in", path.to_str().unwrap(), "-noout", "-text"]);
    assert!(ok, "openssl x509: {text}");
    text
}

/// The certificate in `dir` verifies against `dir/ca.pem`, names `node` with the node's
/// addresses, is no CA, and belongs to the key beside it (0600). Returns its serial.
fn check_node_files(dir: &Path, node: &str, ip: &str) -> String {
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join(format!("{node}.pem")),
        dir.join(format!("{node}.key")),
    );
    let (ok, text) = openssl(&[
        "verify",
        "-CAfile",
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
    ]);
    assert!(ok, "openssl verify: {text}");
    let text = x509_text(&cert);
    assert!(text.contains(&format!("Subject: CN = {node}")), "{text}");
    for san in [
        format!("DNS:{node}"),
        "DNS:localhost".to_string(),
        "IP Address:127.0.0.1".to_string(),
        format!("IP Address:{ip}"),
        // Added by the signer, never asked: the Service in front of every worker.
        "DNS:granary-workers.granary.svc".to_string(),
    ] {
        assert!(text.contains(&san), "{san} in {text}");
    }
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    let (_, cert_pub) = openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-pubkey"]);
    let (ok, key_pub) = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]);
    assert!(ok, "{key_pub}");
    assert_eq!(
        cert_pub, key_pub,
        "the certificate is for the key beside it"
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} mode", key.display());
    assert!(!dir.join("ca.key").exists(), "no CA key on the node");
    let (_, serial) = openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-serial"]);
    serial.trim().to_string()
}

/// Seconds a certificate file is valid for (notAfter - notBefore).
fn lifetime_secs(cert: &Path) -> i64 {
    let (_, text) = openssl(&[
        "x509",
        "-in",
        cert.to_str().unwrap(),
        "-noout",
        "-startdate",
        "-enddate",
    ]);
    let date = |key: &str| {
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .to_string();
        let out = Command::new("date")
            .args(["-u", "-d", &v, "+%s"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    date("notAfter=") - date("notBefore=")
}

#[test]
fn a_worker_pod_gets_its_nodes_certificate_and_renews_it_without_the_ca_key() {
    let c = Cluster::start();
    let (signer, ca_dir, _) = c.signer("30s");
    let worker = c.kubeconfig("worker-n1", &c.token("granary-worker", Some("worker-n1")));
    let tls = c.work.path().join("tls");

    let out = c.certs_csr(&worker, "n1", &tls);
    assert!(out.status.success(), "granary certs --csr: {}", out.stderr);
    for file in ["ca.pem", "n1.pem", "n1.key"] {
        assert!(
            out.stdout
                .contains(&format!("{}", tls.join(file).display())),
            "{}",
            out.stdout
        );
    }
    let first = check_node_files(&tls, "n1", "10.0.0.1");
    // ca.pem is the signer's CA, taken from the ConfigMap it publishes.
    assert_eq!(
        std::fs::read(tls.join("ca.pem")).unwrap(),
        std::fs::read(ca_dir.join("ca.pem")).unwrap()
    );
    // Lifetime 30s, plus a backdate of a tenth of it for clock skew.
    assert_eq!(lifetime_secs(&tls.join("n1.pem")), 33);
    // The request: approved by the signer with its reason, and carrying that certificate.
    let ours: Vec<_> = c
        .csrs()
        .into_iter()
        .filter(|r| r.spec.signer_name == SIGNER)
        .collect();
    assert_eq!(ours.len(), 1);
    let conds = conditions(&ours[0]);
    assert!(
        conds
            .iter()
            .any(|(t, r, _)| t == "Approved" && r == "GranaryNodeCertificate"),
        "{conds:?}"
    );
    assert_eq!(
        certificate(&ours[0]),
        std::fs::read(tls.join("n1.pem")).unwrap()
    );
    assert!(
        signer.log().contains("CSR approved and signed"),
        "{}",
        signer.log()
    );

    // --renew: the files in place are kept at first, then replaced at 2/3 of the lifetime
    // (about 22s after issue) by a new key and certificate, with no leftover temporary file.
    let old_key = std::fs::read(tls.join("n1.key")).unwrap();
    let renew_log = c.work.path().join("renew.log");
    let mut renewer = spawn(
        &[
            "certs",
            "--csr",
            "--renew",
            "--node",
            "n1",
            "--out",
            tls.to_str().unwrap(),
            "--kubeconfig",
            worker.to_str().unwrap(),
        ],
        &renew_log,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(renewer.running(), "{}", renewer.log());
    assert_eq!(
        std::fs::read(tls.join("n1.key")).unwrap(),
        old_key,
        "kept at first"
    );
    let start = Instant::now();
    let mut serial = first.clone();
    wait_until("the certificate renewed", Duration::from_secs(60), || {
        assert!(renewer.running(), "renewer exited: {}", renewer.log());
        // Read the pair as a reloading worker would: both files of one issue.
        let (ok, _) = openssl(&[
            "x509",
            "-in",
            tls.join("n1.pem").to_str().unwrap(),
            "-noout",
        ]);
        if ok {
            serial = openssl(&[
                "x509",
                "-in",
                tls.join("n1.pem").to_str().unwrap(),
                "-noout",
                "-serial",
            ])
            .1
            .trim()
            .to_string();
        }
        serial != first
    });
    assert!(
        start.elapsed() > Duration::from_secs(8),
        "renewed too early: {:?}",
        start.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    let second = check_node_files(&tls, "n1", "10.0.0.1");
    assert_ne!(second, first);
    assert_ne!(std::fs::read(tls.join("n1.key")).unwrap(), old_key);
    let mut names: Vec<String> = std::fs::read_dir(&tls)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ca.pem", "n1.key", "n1.pem"]);
    assert!(
        renewer.log().contains("certificate written"),
        "{}",
        renewer.log()
    );
    drop(renewer);
    drop(signer);
}

#[test]
fn requests_for_another_node_account_or_signer_or_with_ca_rights_get_no_certificate() {
    let c = Cluster::start();
    let (signer, _ca, metrics_addr) = c.signer("24h");
    let usages = [
        "digital signature",
        "key encipherment",
        "server auth",
        "client auth",
    ];
    let node_req = ["-subj", "/CN=n1", "-addext", "subjectAltName=DNS:n1"];

    // A worker pod on n2 asks for n1: denied, with the reason, and nothing written.
    let on_n2 = c.kubeconfig("worker-n2", &c.token("granary-worker", Some("worker-n2")));
    let stolen = c.work.path().join("stolen");
    let out = c.certs_csr(&on_n2, "n1", &stolen);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("was denied: WrongNode") && out.stderr.contains("runs on node \"n2\""),
        "{}",
        out.stderr
    );
    assert!(!stolen.join("n1.pem").exists() && !stolen.join("n1.key").exists());

    // Another service account cannot even ask without the role...
    let intruder_kc = c.kubeconfig("intruder", &c.token("intruder", Some("intruder-n1")));
    let out = c.certs_csr(&intruder_kc, "n1", &stolen);
    assert!(!out.status.success());
    assert!(out.stderr.contains("forbidden"), "{}", out.stderr);
    // ...and with it (an admin's mistake), the signer still refuses it.
    c.kubectl(&[
        "create",
        "clusterrolebinding",
        "intruder-csr",
        "--clusterrole=granary-node-csr-requester",
        "--serviceaccount=granary:intruder",
    ]);
    let out = c.certs_csr(&intruder_kc, "n1", &stolen);
    assert!(
        out.stderr.contains("was denied: NotWorkerAccount"),
        "{}",
        out.stderr
    );

    // A user (the cluster admin) asks for n1.
    c.create_csr(&c.admin, "admin-for-n1", SIGNER, &node_req, &usages)
        .unwrap();
    // The worker account with a token bound to no pod.
    let unbound = c.as_client(&c.kubeconfig("unbound", &c.token("granary-worker", None)));
    c.create_csr(&unbound, "unbound-for-n1", SIGNER, &node_req, &usages)
        .unwrap();
    // The worker pod on n1, asking for CA rights, then for certificate signing usage.
    let on_n1 =
        c.as_client(&c.kubeconfig("worker-n1", &c.token("granary-worker", Some("worker-n1"))));
    let ca_req = [
        "-subj",
        "/CN=n1",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
    ];
    c.create_csr(&on_n1, "n1-ca-true", SIGNER, &ca_req, &usages)
        .unwrap();
    let mut cert_sign = usages.to_vec();
    cert_sign.push("cert sign");
    c.create_csr(&on_n1, "n1-cert-sign", SIGNER, &node_req, &cert_sign)
        .unwrap();
    // The worker pod on n1 asking another signer: not the Granary signer's business.
    c.create_csr(
        &on_n1,
        "n1-other-signer",
        "kubernetes.io/kube-apiserver-client",
        &["-subj", "/CN=n1"],
        &["digital signature", "client auth"],
    )
    .unwrap();
    // The worker cannot approve its own request: approval is the signer's alone.
    let api: Api<CertificateSigningRequest> = Api::all(on_n1.clone());
    let approve = json!({"status": {"conditions": [{"type": "Approved", "status": "True",
        "reason": "Self", "message": "self-approved"}]}});
    let err =
        c.rt.block_on(api.patch_approval(
            "n1-ca-true",
            &PatchParams::default(),
            &Patch::Merge(&approve),
        ))
        .unwrap_err();
    assert!(err.to_string().contains("forbidden"), "{err}");

    let want = [
        ("admin-for-n1", "NotWorkerAccount"),
        ("unbound-for-n1", "NoPodBinding"),
        ("n1-ca-true", "CANotAllowed"),
        ("n1-cert-sign", "UsageNotAllowed"),
    ];
    wait_until("every request denied", Duration::from_secs(60), || {
        want.iter().all(|(name, _)| {
            conditions(&c.csr(name))
                .iter()
                .any(|(t, _, _)| t == "Denied")
        })
    });
    for (name, reason) in want {
        let csr = c.csr(name);
        let conds = conditions(&csr);
        assert!(
            conds
                .iter()
                .any(|(t, r, m)| t == "Denied" && r == reason && !m.is_empty()),
            "{name}: {conds:?}"
        );
        assert!(
            !conds.iter().any(|(t, _, _)| t == "Approved"),
            "{name}: {conds:?}"
        );
        assert!(certificate(&csr).is_empty(), "{name} got a certificate");
        assert!(
            signer.log().contains(&format!("reason=\"{reason}\""))
                || signer.log().contains(&format!("reason={reason}")),
            "{reason} in the signer's log: {}",
            signer.log()
        );
    }

    // The signer counts its decisions by reason.
    let text = http_get(&metrics_addr, "/metrics");
    for (reason, n) in [
        ("WrongNode", 1.0),
        ("NotWorkerAccount", 2.0),
        ("NoPodBinding", 1.0),
        ("CANotAllowed", 1.0),
        ("UsageNotAllowed", 1.0),
    ] {
        let got = metric(
            &text,
            "granary_csr_decisions_total",
            &[("decision", "denied"), ("reason", reason)],
        );
        assert_eq!(got, n, "{reason}: {text}");
    }
    assert_eq!(
        metric(
            &text,
            "granary_csr_decisions_total",
            &[("decision", "issued")]
        ),
        0.0
    );

    // A request nobody answers (no signer of that name) fails after --timeout, naming it.
    let out = run_with_timeout(
        granary(
            &[
                "certs",
                "--csr",
                "--node",
                "n1",
                "--out",
                stolen.to_str().unwrap(),
                "--kubeconfig",
                on_n2.to_str().unwrap(),
                "--signer-name",
                "granary.io/nobody",
                "--timeout",
                "3s",
            ],
            &[],
        ),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("was not answered within 3s"),
        "{}",
        out.stderr
    );

    // While the signer is down, the admin approves a request the policy refuses: the signer,
    // back, marks it Failed with the reason and signs nothing.
    drop(signer);
    c.create_csr(&c.admin, "admin-approved", SIGNER, &node_req, &usages)
        .unwrap();
    let admin_api: Api<CertificateSigningRequest> = Api::all(c.admin.clone());
    c.rt.block_on(admin_api.patch_approval(
        "admin-approved",
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {"conditions": [{"type": "Approved",
            "status": "True", "reason": "AdminSaysSo", "message": "approved by hand"}]}})),
    ))
    .unwrap();
    let (signer, _ca, metrics_addr) = c.signer("24h");
    wait_until(
        "the approved request failed",
        Duration::from_secs(60),
        || {
            conditions(&c.csr("admin-approved"))
                .iter()
                .any(|(t, r, _)| t == "Failed" && r == "NotWorkerAccount")
        },
    );
    assert!(certificate(&c.csr("admin-approved")).is_empty());

    // The signer works: the rightful request, made after all of these, is signed...
    let tls = c.work.path().join("tls");
    let worker = c.kubeconfig(
        "worker-n1-cli",
        &c.token("granary-worker", Some("worker-n1")),
    );
    let out = c.certs_csr(&worker, "n1", &tls);
    assert!(out.status.success(), "{}", out.stderr);
    check_node_files(&tls, "n1", "10.0.0.1");
    // ...and the other signer's request was left alone.
    let other = c.csr("n1-other-signer");
    assert_eq!(conditions(&other), Vec::<(String, String, String)>::new());
    assert!(certificate(&other).is_empty());
    // In all, exactly one certificate was issued.
    let issued: Vec<Value> = c
        .csrs()
        .iter()
        .filter(|r| !certificate(r).is_empty())
        .map(|r| json!(r.metadata.name))
        .collect();
    assert_eq!(issued.len(), 1, "{issued:?}");
    let text = http_get(&metrics_addr, "/metrics");
    let count = |labels: &[(&str, &str)]| metric(&text, "granary_csr_decisions_total", labels);
    assert_eq!(
        count(&[("decision", "failed"), ("reason", "NotWorkerAccount")]),
        1.0
    );
    assert_eq!(count(&[("decision", "issued"), ("reason", "granted")]), 1.0);
    drop(signer);
}

#[test]
fn bad_signer_and_csr_flags_are_refused_naming_the_problem() {
    let work = tempfile::tempdir().unwrap();
    let ca_dir = work.path().join("ca");
    let run = |args: &[&str]| run_with_timeout(granary(args, &[]), Duration::from_secs(30));
    let missing = run(&["signer", "--ca-dir", ca_dir.to_str().unwrap()]);
    assert!(!missing.status.success());
    assert!(
        missing
            .stderr
            .contains(&format!("{}", ca_dir.join("ca.pem").display())),
        "{}",
        missing.stderr
    );
    let ca = ca_dir.to_str().unwrap();
    for (args, want) in [
        (
            vec!["signer", "--ca-dir", ca, "--lifetime", "1s"],
            "--lifetime 1s is out of range",
        ),
        (
            vec!["signer", "--ca-dir", ca, "--lifetime", "1000d"],
            "--lifetime 1000d is out of range",
        ),
        (
            vec!["signer", "--ca-dir", ca, "--worker-account", "admin"],
            "--worker-account",
        ),
        (
            vec!["signer", "--ca-dir", ca, "--signer-name", "node"],
            "is not DOMAIN/NAME",
        ),
        (
            vec!["signer", "--ca-dir", ca, "--ca-configmap", "granary"],
            "--ca-configmap",
        ),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(out.stderr.contains(want), "{args:?}: {}", out.stderr);
    }
    let out_dir = work.path().join("tls");
    let out = out_dir.to_str().unwrap();
    for (args, want) in [
        (vec!["certs", "--csr", "--out", out], "--node"),
        (
            vec!["certs", "--csr", "--node", "N1/x", "--out", out],
            "is not a Kubernetes node name",
        ),
        (
            vec![
                "certs",
                "--csr",
                "--node",
                "n1",
                "--out",
                out,
                "--timeout",
                "0s",
            ],
            "--timeout 0s is out of range",
        ),
        (
            vec!["certs", "--csr", "--node", "n1", "--out", out, "extra"],
            "cannot be used with",
        ),
        (vec!["certs", "--renew", "--out", out, "n1"], "--csr"),
        (
            vec![
                "certs",
                "--csr",
                "--node",
                "n1",
                "--out",
                out,
                "--kubeconfig",
                "/nonexistent/kc",
            ],
            "/nonexistent/kc",
        ),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(out.stderr.contains(want), "{args:?}: {}", out.stderr);
    }
    assert!(!out_dir.join("n1.key").exists() && !out_dir.join("ca.pem").exists());
    // The development contract is unchanged.
    let dev = run(&["certs", "--out", out, "n1"]);
    assert!(dev.status.success(), "{}", dev.stderr);
    for file in ["ca.pem", "ca.key", "n1.pem", "n1.key"] {
        assert!(out_dir.join(file).exists(), "{file}");
    }
}

#[test]
fn only_the_signer_mounts_the_ca_key_and_nodes_ask_through_the_csr_api() {
    let out = Command::new("kubectl")
        .args(["kustomize", deploy("").to_str().unwrap()])
        .output()
        .expect("kubectl is installed (scripts/services/kube.sh install)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<&str> = rendered.split("\n---\n").collect();
    let named = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| {
                d.lines().any(|l| l == format!("kind: {kind}"))
                    && d.contains(&format!("\n  name: {name}\n"))
            })
            .unwrap_or_else(|| panic!("{kind} {name} in deploy/k8s"))
            .to_string()
    };
    let with_ca_key: Vec<&&str> = docs
        .iter()
        .filter(|d| d.lines().any(|l| l.trim() == "secretName: granary-ca"))
        .collect();
    assert_eq!(with_ca_key.len(), 1, "{with_ca_key:?}");
    assert!(with_ca_key[0].contains("\n  name: granary-signer\n"));
    let ds = named("DaemonSet", "granary-worker");
    assert!(
        !ds.contains("ca.key") && !ds.lines().any(|l| l.trim() == "secretName: granary-ca"),
        "{ds}"
    );
    assert_eq!(
        ds.matches("- --csr").count(),
        2,
        "init container and renewal sidecar"
    );
    assert!(ds.contains("- --renew"));
    assert!(
        ds.contains("serviceAccountToken:"),
        "a pod-bound token for the CSR"
    );
}
