//! Which training job a reader belongs to, for the read metrics' `training_job` label, when
//! pods get their data from the CSI driver: at each publish the driver writes one small file
//! per pod, `<pods dir>/<pod UID>`, holding the pod's `namespace/job`; the FUSE server finds an
//! opener's pod from the pid of its request through `/proc/<pid>/cgroup` (kubelet puts each
//! pod's containers in a cgroup named after the pod's UID, cgroupfs or systemd driver alike).
//! The driver removes the file once none of the pod's volumes is mounted.
//!
//! Both files are checked before use: a UID is 36 characters of a UUID, a label is short and of
//! the characters of Kubernetes names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Pids whose job is remembered at most (the map starts afresh beyond).
const KEPT_PIDS: usize = 4096;

/// How long a pid's job is trusted before `/proc` is read again (a pid may be reused).
const FRESH: Duration = Duration::from_secs(10);

/// The longest label kept: a namespace (63) + `/` + a job name (253).
const MAX_LABEL: usize = 317;

/// The jobs of the pods the CSI driver published, by the pids of their processes.
#[derive(Debug)]
pub struct PodJobs {
    dir: PathBuf,
    by_pid: Mutex<HashMap<u32, Looked>>,
}

/// When a pid's job was looked up, and what was found.
type Looked = (Instant, Option<Arc<str>>);

impl PodJobs {
    /// Reads the driver's pod files in `dir` (`granary csi --pods-dir`).
    pub fn new(dir: PathBuf) -> Self {
        PodJobs {
            dir,
            by_pid: Mutex::new(HashMap::new()),
        }
    }

    /// The `namespace/job` of the pod process `pid` belongs to, if the CSI driver published a
    /// volume for that pod. `pid` 0 (a process the server cannot see) has none.
    pub fn job_of(&self, pid: u32) -> Option<Arc<str>> {
        if pid == 0 {
            return None;
        }
        let now = Instant::now();
        if let Some((at, job)) = self.by_pid.lock().expect("pods lock").get(&pid)
            && now.duration_since(*at) < FRESH
        {
            return job.clone();
        }
        let job = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|cgroups| pod_uid(&cgroups))
            .and_then(|uid| std::fs::read_to_string(self.dir.join(uid)).ok())
            .and_then(|text| label(text.trim()).map(Arc::from));
        let mut by_pid = self.by_pid.lock().expect("pods lock");
        if by_pid.len() >= KEPT_PIDS {
            by_pid.clear();
        }
        by_pid.insert(pid, (now, job.clone()));
        job
    }
}

/// The pod UID in a `/proc/<pid>/cgroup` file: a path component `pod<UID>` (cgroupfs driver,
/// `/kubepods/burstable/pod1b4e...`) or `...-pod<UID with _>.slice` (systemd driver).
pub fn pod_uid(cgroups: &str) -> Option<String> {
    cgroups
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .flat_map(|path| path.split('/'))
        .find_map(|component| {
            let name = component.strip_suffix(".slice").unwrap_or(component);
            let after = match name.strip_prefix("pod") {
                Some(rest) => rest,
                None => &name[name.rfind("-pod")? + 4..],
            };
            let uid = after.replace('_', "-");
            is_uid(&uid).then_some(uid)
        })
}

/// A pod UID as Kubernetes writes it: a UUID, lowercase.
pub fn is_uid(uid: &str) -> bool {
    uid.len() == 36
        && uid.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
        })
}

/// `text` if it is a label this module writes: `namespace/job`, short, of the characters of
/// Kubernetes names.
fn label(text: &str) -> Option<&str> {
    let (namespace, job) = text.split_once('/')?;
    let name_chars = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    };
    (text.len() <= MAX_LABEL && name_chars(namespace) && name_chars(job)).then_some(text)
}

/// The record of pod `uid` of `namespace` running `job`: `namespace/job`, or why one of them
/// is not what it should be.
pub fn label_of(uid: &str, namespace: &str, job: &str) -> Result<String, String> {
    if !is_uid(uid) {
        return Err(format!("pod UID {uid:?} is not a UUID"));
    }
    let text = format!("{namespace}/{job}");
    if label(&text).is_none() {
        return Err(format!(
            "job {job:?} of namespace {namespace:?}: give a name of letters, digits, '-', '.' and '_' ({MAX_LABEL} characters at most with the namespace)"
        ));
    }
    Ok(text)
}

/// Records pod `uid`'s label (from [`label_of`]) in `dir`, for the FUSE server's metrics.
pub fn record(dir: &Path, uid: &str, label: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{uid}.tmp"));
    std::fs::write(&tmp, format!("{label}\n"))?;
    std::fs::rename(&tmp, dir.join(uid))
}

/// Removes the records of pods for which `mounted` is false (none of their volumes is mounted
/// any more).
pub fn forget_unmounted(dir: &Path, mounted: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(uid) = name.to_str() else { continue };
        if is_uid(uid) && !mounted(uid) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";

    #[test]
    fn pod_uids_come_from_either_cgroup_driver() {
        let cgroupfs = "12:pids:/kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427/0f3a\n\
                        0::/kubepods/burstable/pod1b4e28ba-2fa1-11d2-883f-0016d3cca427/0f3a\n";
        assert_eq!(pod_uid(cgroupfs).as_deref(), Some(UID));
        let systemd = "0::/kubepods.slice/kubepods-besteffort.slice/\
                       kubepods-besteffort-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/cri-containerd-9a.scope\n";
        assert_eq!(pod_uid(systemd).as_deref(), Some(UID));
        let guaranteed =
            "0::/kubepods.slice/kubepods-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice/x.scope";
        assert_eq!(pod_uid(guaranteed).as_deref(), Some(UID));
        for none in [
            "0::/user.slice/user-0.slice/session-1.scope\n",
            "0::/kubepods/burstable/podnot-a-uid/x\n",
            "0::/kubepods/pod1B4E28BA-2FA1-11D2-883F-0016D3CCA427/x\n",
            "",
        ] {
            assert_eq!(pod_uid(none), None, "{none:?}");
        }
    }

    #[test]
    fn labels_are_checked_and_records_written_whole_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let pods = dir.path().join("pods");
        let made = label_of(UID, "vision", "resnet-50").unwrap();
        record(&pods, UID, &made).unwrap();
        assert_eq!(
            std::fs::read_to_string(pods.join(UID)).unwrap(),
            "vision/resnet-50\n"
        );
        assert!(label_of("../../etc/passwd", "vision", "x").is_err());
        assert!(label_of(UID, "vision", "a/b").is_err());
        assert!(label_of(UID, "vision", "").is_err());
        assert!(label_of(UID, "vision", &"j".repeat(400)).is_err());
        assert_eq!(label("vision/resnet-50"), Some("vision/resnet-50"));
        assert_eq!(label("vision/a b"), None);
        forget_unmounted(&pods, |uid| uid == UID);
        assert!(pods.join(UID).exists());
        forget_unmounted(&pods, |_| false);
        assert!(!pods.join(UID).exists());
    }

    #[test]
    fn a_process_outside_any_pod_has_no_job() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = PodJobs::new(dir.path().to_path_buf());
        assert_eq!(jobs.job_of(0), None);
        assert_eq!(jobs.job_of(std::process::id()), None);
    }
}
