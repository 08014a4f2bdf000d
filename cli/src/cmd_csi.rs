//! `granary csi`: the node plugin of the CSI driver `csi.granary.io`. kubelet (through the
//! node-driver-registrar) calls it on a unix socket; `NodePublishVolume` bind-mounts, read-only,
//! one directory of the node's Granary mount (a dataset's root or a namespace path) onto the
//! pod's target path, after checking that the pod's namespace belongs to a tenant that may see
//! it. Nothing else of the namespace is visible in the pod.
//!
//! Volume attributes: `dataset: NAME` (with `waitReady: "true"`: published only once the dataset
//! is ready on this node) or `path: /mount/dir`. The pod's namespace comes from
//! `csi.storage.k8s.io/pod.namespace` (the CSIDriver's `podInfoOnMount`).

use anyhow::Context;
use clap::Args;
use granary_cache_server::config::ConfigFile;
use granary_cache_server::tenant_view::MountTenants;
use granary_net::datasets::DatasetClient;
use granary_proto::csi;
use granary_proto::csi::identity_server::{Identity, IdentityServer};
use granary_proto::csi::node_server::{Node, NodeServer};
use serde::Deserialize;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The driver's name, as pods' volumes and the CSIDriver object name it.
pub const DRIVER: &str = "csi.granary.io";
const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
const POD_UID: &str = "csi.storage.k8s.io/pod.uid";

#[derive(Args, Debug)]
pub struct CsiArgs {
    /// The unix socket to serve (`unix:///csi/csi.sock` or a path): where the
    /// node-driver-registrar tells kubelet to call.
    #[arg(long, value_name = "PATH", default_value = "/csi/csi.sock")]
    pub endpoint: String,
    /// This node's id: the name of the node (and of its Granary worker).
    #[arg(long, value_name = "ID", env = "NODE_NAME")]
    pub node_id: String,
    /// The node's Granary mount (the worker's `[fuse] mount`), whose directories are published.
    #[arg(long, value_name = "DIR", default_value = "/mnt/granary")]
    pub node_mount: PathBuf,
    /// The driver's config: tenants, the namespaces that belong to each and the paths each may
    /// see (docs/KUBERNETES.md). Without it every namespace may see everything.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The worker API to look datasets up at (the node's worker).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:7070")]
    pub server: String,
    /// The workers' config (their `[[tenant]]` and `[[mount]] tenants` sections): a pod is given
    /// a directory only if every mount in it is one its tenant may read, the rule the workers
    /// apply to tenants' tokens; the driver's tenants must be the workers'.
    #[arg(long, value_name = "FILE")]
    pub worker_config: Option<PathBuf>,
    /// A token that may read every dataset's status (the scheduler's or the admin's), from a
    /// file.
    #[arg(long, value_name = "FILE", env = "GRANARY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub tls: crate::tls_args::TlsArgs,
    /// Where to record each published pod's `namespace/job` (the volume's `job` attribute, else
    /// the pod's name), for the node mount's `pods_dir`: reads by the pod then carry its job in
    /// the data-stall metrics. A record goes once none of its pod's volumes is mounted.
    #[arg(long, value_name = "DIR")]
    pub pods_dir: Option<PathBuf>,
    /// How long `waitReady` volumes wait for their dataset before failing (kubelet retries).
    #[arg(long, value_name = "DURATION", default_value = "100s")]
    pub wait_timeout: String,
    /// Only check --config and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// The driver config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CsiConfig {
    #[serde(default, rename = "tenant")]
    tenants: Vec<TenantSection>,
}

/// A tenant: its pods' namespaces, and the namespace paths its pods may mount with `path`
/// (its own datasets are always allowed). Without `paths`, the workers' `[[mount]] tenants`
/// (`--worker-config`) alone decide; with both, a path must pass both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantSection {
    name: String,
    #[serde(default)]
    namespaces: Vec<String>,
    paths: Option<Vec<String>>,
}

struct Plugin {
    node_id: String,
    /// The node mount, resolved.
    node_mount: PathBuf,
    /// `None`: no config, every namespace sees everything.
    tenants: Option<Vec<TenantSection>>,
    /// Who may read each mount, from the workers' config (`--worker-config`).
    mounts: Option<MountTenants>,
    datasets: DatasetClient,
    wait_timeout: Duration,
    /// Where pods' jobs are recorded (`--pods-dir`).
    pods_dir: Option<PathBuf>,
}

pub async fn run(args: CsiArgs) -> anyhow::Result<()> {
    let tenants = match &args.config {
        Some(path) => Some(load_config(path)?),
        None => None,
    };
    let mounts = match &args.worker_config {
        Some(path) => Some(load_worker_config(
            path,
            tenants.as_deref().unwrap_or_default(),
        )?),
        None => None,
    };
    if args.check_config {
        let n = tenants.as_ref().map_or(0, Vec::len);
        println!(
            "{}: ok ({n} tenants)",
            args.config
                .as_deref()
                .unwrap_or(Path::new("(none)"))
                .display()
        );
        return Ok(());
    }
    if tenants.is_none() {
        tracing::warn!("no --config: every pod may mount every path and dataset");
    }
    let node_mount = args
        .node_mount
        .canonicalize()
        .with_context(|| format!("node mount {}", args.node_mount.display()))?;
    let token = args
        .token_file
        .as_deref()
        .map(crate::cmd_dataset::read_token_file)
        .transpose()?;
    let tls = args.tls.identity()?;
    let datasets = DatasetClient::connect_with(&args.server, tls.as_ref(), token.as_deref())
        .await
        .with_context(|| format!("the worker API at {}", args.server))?;
    let plugin = std::sync::Arc::new(Plugin {
        node_id: args.node_id.clone(),
        node_mount,
        tenants,
        mounts,
        datasets,
        wait_timeout: granary_core::parse_duration(&args.wait_timeout).context("--wait-timeout")?,
        pods_dir: args.pods_dir.clone(),
    });
    let socket = PathBuf::from(
        args.endpoint
            .strip_prefix("unix://")
            .unwrap_or(&args.endpoint),
    );
    // A socket left by an earlier run is replaced; anything else at that path is not ours.
    match std::fs::symlink_metadata(&socket) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(&socket)
                .with_context(|| format!("cannot remove {}", socket.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "--endpoint {}: something other than a socket is there",
            socket.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("--endpoint {}", socket.display())),
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    // Who may call: root (kubelet) alone; the plugin mounts and unmounts what it is told.
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", socket.display()))?;
    println!("granary: CSI driver {DRIVER} on {}", socket.display());
    tonic::transport::Server::builder()
        .add_service(IdentityServer::from_arc(plugin.clone()))
        .add_service(NodeServer::from_arc(plugin))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            crate::runtime::shutdown_signal(),
        )
        .await?;
    Ok(())
}

/// The tenants of the driver config at `path`, checked.
fn load_config(path: &Path) -> anyhow::Result<Vec<TenantSection>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let config: CsiConfig = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let mut seen = std::collections::HashMap::new();
    for t in &config.tenants {
        for p in t.paths.iter().flatten() {
            namespace_path(p)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{}: tenant {:?}: paths", path.display(), t.name))?;
        }
        for n in &t.namespaces {
            if let Some(other) = seen.insert(n.clone(), t.name.clone()) {
                anyhow::bail!(
                    "{}: namespace {n:?} is given to both tenant {other:?} and tenant {:?}",
                    path.display(),
                    t.name
                );
            }
        }
    }
    Ok(config.tenants)
}

/// Who may read each mount, from the workers' config at `path`, whose `[[tenant]]`s must include
/// each of the driver's `tenants`.
fn load_worker_config(path: &Path, tenants: &[TenantSection]) -> anyhow::Result<MountTenants> {
    let file = ConfigFile::load(path)?;
    for t in tenants {
        if !file.tenants.iter().any(|w| w.name == t.name) {
            anyhow::bail!(
                "tenant {:?} of the driver config is no [[tenant]] of the workers' config {}",
                t.name,
                path.display()
            );
        }
    }
    Ok(MountTenants::from_config(&file))
}

/// A namespace path as a volume names it: absolute, no `.` or `..`, not the root; as the
/// components beneath the root.
fn namespace_path(path: &str) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("path {path:?} is not absolute"));
    }
    // By text: `Path::components` drops a `.` in the middle.
    if path.split('/').any(|c| c == "." || c == "..") {
        return Err(format!("path {path:?} has a `.` or `..` component"));
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            _ => return Err(format!("path {path:?} has a `.` or `..` component")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("path {path:?} names the whole namespace"));
    }
    Ok(out)
}

/// `path` (beneath the namespace's root) lies within one of the tenant's paths, component by
/// component (`true` when the tenant has no `paths`: the workers' rule decides).
fn within_paths(tenant: &TenantSection, path: &Path) -> bool {
    let Some(paths) = &tenant.paths else {
        return true;
    };
    paths
        .iter()
        .filter_map(|p| namespace_path(p).ok())
        .any(|p| path.starts_with(&p))
}

/// What a volume asks for.
#[derive(Debug, PartialEq, Eq)]
enum Wanted {
    Dataset { name: String, wait_ready: bool },
    Path(PathBuf),
}

fn wanted(context: &std::collections::HashMap<String, String>) -> Result<Wanted, Status> {
    let wait_ready = match context.get("waitReady").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Status::invalid_argument(format!(
                "volumeAttributes.waitReady = {other:?}: give \"true\" or \"false\""
            )));
        }
    };
    match (context.get("dataset"), context.get("path")) {
        (Some(name), None) if !name.is_empty() => Ok(Wanted::Dataset {
            name: name.clone(),
            wait_ready,
        }),
        (None, Some(path)) if !wait_ready => namespace_path(path)
            .map(Wanted::Path)
            .map_err(|e| Status::invalid_argument(format!("volumeAttributes.path: {e}"))),
        (None, Some(_)) => Err(Status::invalid_argument(
            "volumeAttributes.waitReady applies to a dataset, not a path",
        )),
        _ => Err(Status::invalid_argument(
            "volumeAttributes: give exactly one of dataset (a pinned dataset's name) or path (/mount/dir)",
        )),
    }
}

impl Plugin {
    /// Whether the tenant may be given directory `path` (beneath the namespace's root): within
    /// its `paths` if it has some, and wholly of mounts it may read if the workers' config is
    /// known; with neither, only its datasets.
    fn may_publish(
        &self,
        tenant: &TenantSection,
        path: &Path,
        dataset: bool,
    ) -> Result<(), Status> {
        let refused = |why: &str| {
            Err(Status::permission_denied(format!(
                "tenant {:?} may not see /{}{why}",
                tenant.name,
                path.display()
            )))
        };
        if !dataset && tenant.paths.is_none() && self.mounts.is_none() {
            return refused(": it has no paths in the driver config");
        }
        if !dataset && !within_paths(tenant, path) {
            return refused("");
        }
        if let Some(mounts) = &self.mounts
            && !mounts.may_publish(&tenant.name, &format!("/{}", path.display()))
        {
            return refused(": a mount there is not the tenant's ([[mount]] tenants)");
        }
        Ok(())
    }

    /// The tenant of the pod's namespace; `Ok(None)` when the driver has no tenants.
    fn tenant_of<'a>(
        &'a self,
        context: &std::collections::HashMap<String, String>,
    ) -> Result<Option<&'a TenantSection>, Status> {
        let Some(tenants) = &self.tenants else {
            return Ok(None);
        };
        let namespace = context.get(POD_NAMESPACE).ok_or_else(|| {
            Status::permission_denied(format!(
                "no pod namespace in the request ({POD_NAMESPACE}): the CSIDriver object must set podInfoOnMount: true"
            ))
        })?;
        tenants
            .iter()
            .find(|t| t.namespaces.iter().any(|n| n == namespace))
            .map(Some)
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "namespace {namespace:?} belongs to no tenant of the Granary CSI driver"
                ))
            })
    }

    /// The directory of the node mount to publish, once the tenant may see it.
    async fn source(
        &self,
        wanted: &Wanted,
        tenant: Option<&TenantSection>,
    ) -> Result<PathBuf, Status> {
        let relative = match wanted {
            Wanted::Path(path) => {
                if let Some(t) = tenant {
                    self.may_publish(t, path, false)?;
                }
                path.clone()
            }
            Wanted::Dataset { name, wait_ready } => {
                let status = self.datasets.status(name).await.map_err(|e| match e {
                    granary_proto::ApiError::NotFound(_) => {
                        Status::not_found(format!("no dataset named {name:?}"))
                    }
                    e => Status::unavailable(format!("dataset {name:?}: {e}")),
                })?;
                if let Some(t) = tenant
                    && status.tenant != t.name
                {
                    return Err(Status::permission_denied(format!(
                        "dataset {name:?} belongs to another tenant than {:?}",
                        t.name
                    )));
                }
                if *wait_ready {
                    self.wait_ready(name).await?;
                }
                namespace_path(&status.path)
                    .map_err(|e| Status::internal(format!("dataset {name:?}: {e}")))?
            }
        };
        // Resolved beneath the node mount: a symlink in the namespace cannot lead out of it.
        let source = self
            .node_mount
            .join(&relative)
            .canonicalize()
            .map_err(|e| Status::not_found(format!("/{}: {e}", relative.display())))?;
        let resolved = source.strip_prefix(&self.node_mount).map_err(|_| {
            Status::permission_denied(format!(
                "/{} leads out of the Granary namespace",
                relative.display()
            ))
        })?;
        if !source.is_dir() {
            return Err(Status::not_found(format!(
                "/{} is not a directory of the Granary namespace",
                relative.display()
            )));
        }
        // What the request named, resolved, must still be the tenant's (a link inside one of
        // its paths may point elsewhere).
        if let Some(t) = tenant {
            self.may_publish(t, resolved, matches!(wanted, Wanted::Dataset { .. }))?;
        }
        Ok(source)
    }

    /// Records the pod's job (the `job` attribute, else the pod's name) for the node mount's
    /// metrics, when the driver keeps records and kubelet named the pod.
    fn record_pod(
        &self,
        context: &std::collections::HashMap<String, String>,
    ) -> Result<(), Status> {
        let (Some(dir), Some(uid), Some(namespace)) = (
            &self.pods_dir,
            context.get(POD_UID),
            context.get(POD_NAMESPACE),
        ) else {
            return Ok(());
        };
        let Some(job) = context.get("job").or(context.get(POD_NAME)) else {
            return Ok(());
        };
        let label = granary_fuse_client::pods::label_of(uid, namespace, job)
            .map_err(Status::invalid_argument)?;
        granary_fuse_client::pods::record(dir, uid, &label).map_err(|e| {
            Status::internal(format!("cannot record pod {uid} in {}: {e}", dir.display()))
        })
    }

    /// Waits until dataset `name` is ready on this node, up to the wait timeout.
    async fn wait_ready(&self, name: &str) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + self.wait_timeout;
        loop {
            let status = self
                .datasets
                .status(name)
                .await
                .map_err(|e| Status::unavailable(format!("dataset {name:?}: {e}")))?;
            if !status.nodes.is_empty() && !status.nodes.contains(&self.node_id) {
                return Err(Status::failed_precondition(format!(
                    "dataset {name:?} is loaded onto {} and not onto this node ({}): waitReady cannot be met here",
                    status.nodes.join(", "),
                    self.node_id
                )));
            }
            let here = status.node_progress.iter().find(|p| p.node == self.node_id);
            if here.is_some_and(|p| p.state.as_str() == "ready") {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let state = here.map_or("not started", |p| p.state.as_str());
                return Err(Status::deadline_exceeded(format!(
                    "dataset {name:?} is not ready on {} after {:?} (state {state}, {:.0}% cluster-wide)",
                    self.node_id, self.wait_timeout, status.percent
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[tonic::async_trait]
impl Identity for Plugin {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER.into(),
            vendor_version: crate::VERSION.into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        // A node plugin alone: no controller service, no topology.
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        // Ready while the node mount answers.
        let mount = self.node_mount.clone();
        let ready = tokio::task::spawn_blocking(move || nix::sys::statfs::statfs(&mount).is_ok())
            .await
            .unwrap_or(false);
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}

#[tonic::async_trait]
impl Node for Plugin {
    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let target = target_path(&r.target_path)?;
        let capability = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        match capability.access_type {
            Some(csi::volume_capability::AccessType::Mount(_)) => {}
            Some(csi::volume_capability::AccessType::Block(_)) => {
                return Err(Status::invalid_argument(
                    "a Granary volume is a file system, not a block device",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "volume_capability: no access type",
                ));
            }
        }
        use csi::volume_capability::access_mode::Mode;
        let mode = capability.access_mode.as_ref().map(|m| m.mode());
        if matches!(
            mode,
            Some(
                Mode::SingleNodeWriter
                    | Mode::MultiNodeSingleWriter
                    | Mode::MultiNodeMultiWriter
                    | Mode::SingleNodeSingleWriter
                    | Mode::SingleNodeMultiWriter
            )
        ) {
            return Err(Status::invalid_argument(
                "Granary volumes are read-only: ask for a reader-only access mode",
            ));
        }
        let wanted = wanted(&r.volume_context)?;
        let tenant = self.tenant_of(&r.volume_context)?;
        let source = self.source(&wanted, tenant).await?;
        self.record_pod(&r.volume_context)?;
        let node_mount = self.node_mount.clone();
        tokio::task::spawn_blocking(move || {
            crate::csi_mount::publish(&node_mount, &source, &target)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(volume = %r.volume_id, target = %r.target_path, ?wanted, "published");
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let target = target_path(&r.target_path)?;
        let pods_dir = self.pods_dir.clone();
        tokio::task::spawn_blocking(move || {
            crate::csi_mount::unpublish(&target)?;
            if let Some(dir) = pods_dir {
                let mounted = crate::csi_mount::pods_with_mounts()?;
                granary_fuse_client::pods::forget_unmounted(&dir, |uid| mounted.contains(uid));
            }
            Ok::<_, Status>(())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        tracing::info!(volume = %r.volume_id, target = %r.target_path, "unpublished");
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        // No staging: each publish is a bind mount of the node mount, which is always there.
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

/// A target path as kubelet gives it: absolute, with no `.` or `..`.
fn target_path(path: &str) -> Result<PathBuf, Status> {
    if path.is_empty() {
        return Err(Status::invalid_argument("target_path is required"));
    }
    let p = Path::new(path);
    // By text: `Path::components` drops a `.` in the middle.
    if !p.is_absolute() || path.split('/').any(|c| c == "." || c == "..") {
        return Err(Status::invalid_argument(format!(
            "target_path {path:?} must be absolute, without `.` or `..`"
        )));
    }
    Ok(p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn volume_attributes_name_one_dataset_or_one_path() {
        assert_eq!(
            wanted(&ctx(&[("dataset", "imagenet"), ("waitReady", "true")])).unwrap(),
            Wanted::Dataset {
                name: "imagenet".into(),
                wait_ready: true
            }
        );
        assert_eq!(
            wanted(&ctx(&[("path", "/data/team-a")])).unwrap(),
            Wanted::Path("data/team-a".into())
        );
        for bad in [
            ctx(&[]),
            ctx(&[("dataset", "a"), ("path", "/b")]),
            ctx(&[("path", "/data/../etc")]),
            ctx(&[("path", "/data/./x")]),
            ctx(&[("path", "data")]),
            ctx(&[("path", "/")]),
            ctx(&[("path", "/a"), ("waitReady", "true")]),
            ctx(&[("dataset", "a"), ("waitReady", "yes")]),
        ] {
            assert_eq!(
                wanted(&bad).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn target_paths_are_absolute_and_plain() {
        assert!(target_path("/var/lib/kubelet/pods/x/volumes/y/mount").is_ok());
        for bad in ["", "relative/x", "/a/../b", "/a/./b"] {
            assert!(target_path(bad).is_err(), "{bad}");
        }
    }
}
