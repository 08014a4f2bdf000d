//! What a pod asks of the hook, read from its annotations, labels and GPU requests
//! (docs/SCHEDULING.md lists them).

use crate::extender::{BadRequest, Pod, pod_gpus};
use std::time::Duration;

/// The dataset the pod reads.
pub const DATASET: &str = "granary.io/dataset";
/// The pod's gang (with [`GANG_SIZE`]).
pub const GANG: &str = "granary.io/gang";
/// Members the gang needs before it is planned.
pub const GANG_SIZE: &str = "granary.io/gang-size";
/// Volcano's PodGroup annotation (minMember from the PodGroup, or [`GANG_SIZE`]).
pub const VOLCANO_GROUP: &str = "scheduling.k8s.io/group-name";
/// The scheduler-plugins PodGroup label (minMember from the PodGroup, or [`GANG_SIZE`]).
pub const POD_GROUP_LABEL: &str = "scheduling.x-k8s.io/pod-group";
/// Percent of the dataset on the planned nodes needed before the gang binds (default 100).
pub const MIN_READY_PERCENT: &str = "granary.io/min-ready-percent";
/// After this long warming (e.g. `10m`), the gang starts anyway, with an Event saying so.
pub const READY_TIMEOUT: &str = "granary.io/ready-timeout";
/// Written by the hook on gang members: the gang's phase (a change requeues the pod).
pub const GANG_PHASE: &str = "granary.io/gang-phase";

/// Where the gang's name came from (and so where its size may be found).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GangSource {
    Granary,
    Volcano,
    PodGroup,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GangRef {
    pub name: String,
    /// From `granary.io/gang-size`; Volcano and PodGroup gangs may take it from their PodGroup.
    pub size: Option<usize>,
    pub source: GangSource,
}

/// A pod as the hook sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub uid: String,
    pub gpus: u32,
    pub dataset: Option<String>,
    pub gang: Option<GangRef>,
    pub min_ready_percent: u8,
    pub ready_timeout: Option<Duration>,
    /// The node it is bound to.
    pub node: Option<String>,
    /// Succeeded or Failed: holds nothing.
    pub finished: bool,
    /// The phase annotation the hook last wrote.
    pub phase_note: Option<String>,
}

fn non_empty(v: Option<&str>) -> Option<String> {
    v.map(str::trim).filter(|s| !s.is_empty()).map(String::from)
}

/// Reads a pod's intent. Bad annotation values are errors (the filter answers with them).
pub fn intent(pod: &Pod) -> Result<Intent, BadRequest> {
    let m = &pod.metadata;
    let bad = |key: &str, error: String| BadRequest::Annotation {
        key: key.into(),
        error,
    };
    let size = match non_empty(m.annotation(GANG_SIZE)) {
        Some(s) => Some(
            s.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| bad(GANG_SIZE, format!("{s:?} is not a positive whole number")))?,
        ),
        None => None,
    };
    let gang = if let Some(name) = non_empty(m.annotation(GANG)) {
        Some(GangRef {
            name,
            size,
            source: GangSource::Granary,
        })
    } else if let Some(name) = non_empty(m.annotation(VOLCANO_GROUP)) {
        Some(GangRef {
            name,
            size,
            source: GangSource::Volcano,
        })
    } else {
        non_empty(m.label(POD_GROUP_LABEL)).map(|name| GangRef {
            name,
            size,
            source: GangSource::PodGroup,
        })
    };
    let min_ready_percent = match non_empty(m.annotation(MIN_READY_PERCENT)) {
        Some(s) => s
            .trim_end_matches('%')
            .parse::<u8>()
            .ok()
            .filter(|&p| p <= 100)
            .ok_or_else(|| bad(MIN_READY_PERCENT, format!("{s:?} is not a percent (0-100)")))?,
        None => 100,
    };
    let ready_timeout = match non_empty(m.annotation(READY_TIMEOUT)) {
        Some(s) => {
            Some(granary_core::parse_duration(&s).map_err(|e| bad(READY_TIMEOUT, e.to_string()))?)
        }
        None => None,
    };
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    Ok(Intent {
        key: pod.key(),
        namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
        uid: m.uid.clone().unwrap_or_default(),
        gpus: pod_gpus(pod)?,
        dataset: non_empty(m.annotation(DATASET)),
        gang,
        min_ready_percent,
        ready_timeout,
        node: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        finished: matches!(phase, Some("Succeeded") | Some("Failed")),
        phase_note: non_empty(m.annotation(GANG_PHASE)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: &str) -> Pod {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn reads_every_spelling_of_a_gang() {
        let p = pod(
            r#"{"metadata":{"name":"a","namespace":"ml","annotations":{"granary.io/gang":"g",
            "granary.io/gang-size":"4","granary.io/dataset":"imagenet","granary.io/min-ready-percent":"80",
            "granary.io/ready-timeout":"10m"}},
            "spec":{"containers":[{"resources":{"limits":{"nvidia.com/gpu":"2"}}}]}}"#,
        );
        let i = intent(&p).unwrap();
        assert_eq!(i.key, "ml/a");
        assert_eq!(i.gpus, 2);
        assert_eq!(i.dataset.as_deref(), Some("imagenet"));
        assert_eq!(
            i.gang,
            Some(GangRef {
                name: "g".into(),
                size: Some(4),
                source: GangSource::Granary
            })
        );
        assert_eq!(i.min_ready_percent, 80);
        assert_eq!(i.ready_timeout, Some(Duration::from_secs(600)));
        let v = intent(&pod(
            r#"{"metadata":{"name":"a","annotations":{"scheduling.k8s.io/group-name":"vg"}}}"#,
        ))
        .unwrap();
        assert_eq!(v.gang.unwrap().source, GangSource::Volcano);
        let l = intent(&pod(
            r#"{"metadata":{"name":"a","labels":{"scheduling.x-k8s.io/pod-group":"pg"}}}"#,
        ))
        .unwrap();
        assert_eq!(l.gang.as_ref().unwrap().name, "pg");
        assert_eq!(l.min_ready_percent, 100);
        let plain = intent(&pod(r#"{"metadata":{"name":"a"}}"#)).unwrap();
        assert!(plain.gang.is_none() && plain.dataset.is_none() && plain.gpus == 0);
    }

    #[test]
    fn bad_annotations_are_named() {
        for (k, v) in [
            (GANG_SIZE, "0"),
            (GANG_SIZE, "four"),
            (MIN_READY_PERCENT, "101"),
            (READY_TIMEOUT, "soon"),
        ] {
            let p = pod(&format!(
                r#"{{"metadata":{{"name":"a","annotations":{{"{k}":"{v}"}}}}}}"#
            ));
            let e = intent(&p).unwrap_err().to_string();
            assert!(e.starts_with(&format!("annotation {k}:")), "{e}");
        }
    }
}
