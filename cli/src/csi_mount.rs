//! The CSI node plugin's mounts: a read-only bind mount of a directory of the node's Granary
//! mount onto a pod's target path, and its removal, both idempotent as the CSI spec asks (a
//! repeated publish of the same source is OK, of another source ALREADY_EXISTS; an unpublish of
//! a target that is gone is OK). What is mounted where is read from /proc/self/mountinfo, so a
//! restarted plugin knows what it published before.

use nix::mount::{MntFlags, MsFlags};
use std::path::{Path, PathBuf};
use tonic::Status;

/// One line of /proc/self/mountinfo: the mount's root within its file system, where it is
/// mounted, and the file system's source.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    root: PathBuf,
    mount_point: PathBuf,
    source: String,
    read_only: bool,
}

/// `\040`-style escapes of mountinfo paths, undone.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                root: PathBuf::from(unescape(f.get(3)?)),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                read_only: f.get(5)?.split(',').any(|o| o == "ro"),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

/// The mount at `point` (the last one mounted there), if any.
fn mounted_at(point: &Path) -> Result<Option<MountEntry>, Status> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Status::internal(format!("/proc/self/mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rfind(|m| m.mount_point == point))
}

/// The UIDs of the pods that have a volume mounted where kubelet puts them
/// (`.../pods/<UID>/volumes/...`).
pub fn pods_with_mounts() -> Result<std::collections::HashSet<String>, Status> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Status::internal(format!("/proc/self/mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .filter_map(|m| pod_of_target(&m.mount_point))
        .collect())
}

/// The pod UID of a target path of kubelet's form, `.../pods/<UID>/volumes/...`.
pub fn pod_of_target(target: &Path) -> Option<String> {
    let parts: Vec<_> = target.iter().filter_map(|c| c.to_str()).collect();
    parts.windows(3).find_map(|w| {
        (w[0] == "pods" && w[2] == "volumes" && granary_fuse_client::pods::is_uid(w[1]))
            .then(|| w[1].to_string())
    })
}

/// Bind-mounts `source` (a directory beneath `node_mount`, both resolved) read-only onto
/// `target`, creating `target` if need be.
pub fn publish(node_mount: &Path, source: &Path, target: &Path) -> Result<(), Status> {
    let node = mounted_at(node_mount)?.ok_or_else(|| {
        Status::unavailable(format!(
            "the node mount {} is not mounted",
            node_mount.display()
        ))
    })?;
    let within = source
        .strip_prefix(node_mount)
        .map_err(|_| Status::internal("source outside the node mount"))?;
    let root = node.root.join(within);
    if let Some(existing) = mounted_at(target)? {
        if existing.source == node.source && existing.root == root && existing.read_only {
            return Ok(());
        }
        return Err(Status::already_exists(format!(
            "{} already has another volume mounted ({} of {})",
            target.display(),
            existing.root.display(),
            existing.source
        )));
    }
    match std::fs::create_dir(target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Status::internal(format!(
                "cannot create {}: {e}",
                target.display()
            )));
        }
    }
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| Status::internal(format!("bind mount onto {}: {e}", target.display())))?;
    let read_only = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, read_only, None::<&str>) {
        let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
        return Err(Status::internal(format!(
            "cannot make {} read-only: {e}",
            target.display()
        )));
    }
    Ok(())
}

/// Unmounts `target` if something is mounted there and removes the directory; OK when it is
/// already gone.
pub fn unpublish(target: &Path) -> Result<(), Status> {
    while mounted_at(target)?.is_some() {
        nix::mount::umount2(target, MntFlags::MNT_DETACH)
            .map_err(|e| Status::internal(format!("unmount {}: {e}", target.display())))?;
    }
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Status::internal(format!(
            "cannot remove {}: {e}",
            target.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_targets_name_their_pod() {
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let target = format!("/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/data/mount");
        assert_eq!(pod_of_target(Path::new(&target)).as_deref(), Some(uid));
        assert_eq!(pod_of_target(Path::new("/mnt/x/pods/abc/volumes/v")), None);
        assert_eq!(pod_of_target(Path::new("/tmp/target")), None);
    }

    #[test]
    fn mountinfo_lines_give_root_point_source_and_mode() {
        let text = "36 35 98:0 / /mnt/granary ro,nosuid,nodev,noatime - fuse granary:node ro,user_id=0\n\
                    40 36 98:0 /data/team\\040a /var/lib/kubelet/pods/p/mount ro,nosuid - fuse granary:node ro\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].root, PathBuf::from("/data/team a"));
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/p/mount")
        );
        assert_eq!(m[1].source, "granary:node");
        assert!(m[1].read_only);
    }
}
