//! Conversions between wire messages and API types, and the one ApiError <-> Status mapping.

use crate::{ApiError, Entry, EntryKind, NodeStats, ObjectRef, pb};
use granary_core::ObjectId;
use tonic::{Code, Status};

impl From<&ObjectRef> for pb::ObjectRef {
    fn from(o: &ObjectRef) -> Self {
        pb::ObjectRef {
            mount: o.mount,
            backend: o.id.backend.clone(),
            key: o.id.key.clone(),
            size: o.id.size,
            etag: o.id.etag.clone(),
            version: o.id.version.clone(),
            mtime_ns: o.id.mtime_ns,
        }
    }
}

impl From<pb::ObjectRef> for ObjectRef {
    fn from(o: pb::ObjectRef) -> Self {
        ObjectRef {
            mount: o.mount,
            id: ObjectId {
                backend: o.backend,
                key: o.key,
                size: o.size,
                etag: o.etag,
                version: o.version,
                mtime_ns: o.mtime_ns,
            },
        }
    }
}

impl From<&Entry> for pb::Entry {
    fn from(e: &Entry) -> Self {
        pb::Entry {
            name: e.name.clone(),
            kind: match e.kind {
                EntryKind::File => pb::Kind::File,
                EntryKind::Dir => pb::Kind::Dir,
            } as i32,
            size: e.size,
            mtime_ns: e.mtime_ns,
            object: e.object.as_ref().map(Into::into),
            pinned: e.pinned,
            owner: e.owner.map(|o| pb::Owner {
                mode: o.mode,
                uid: o.uid,
                gid: o.gid,
            }),
        }
    }
}

impl TryFrom<pb::Entry> for Entry {
    type Error = ApiError;

    fn try_from(e: pb::Entry) -> Result<Self, ApiError> {
        let kind = match pb::Kind::try_from(e.kind) {
            Ok(pb::Kind::File) => EntryKind::File,
            Ok(pb::Kind::Dir) => EntryKind::Dir,
            _ => {
                return Err(ApiError::Invalid(format!(
                    "entry {:?} has unknown kind {}",
                    e.name, e.kind
                )));
            }
        };
        if kind == EntryKind::File && e.object.is_none() {
            return Err(ApiError::Invalid(format!(
                "file entry {:?} has no object",
                e.name
            )));
        }
        Ok(Entry {
            name: e.name,
            kind,
            size: e.size,
            mtime_ns: e.mtime_ns,
            object: e.object.map(Into::into),
            pinned: e.pinned,
            // Only permission bits: never a file type, setuid, setgid or sticky.
            owner: e.owner.map(|o| crate::Owner {
                mode: o.mode & 0o777,
                uid: o.uid,
                gid: o.gid,
            }),
        })
    }
}

impl From<&NodeStats> for pb::NodeStats {
    fn from(s: &NodeStats) -> Self {
        pb::NodeStats {
            memory_used: s.memory_used,
            membership_epoch: s.membership_epoch,
            members: s.members,
            reads_memory: s.reads_memory,
            reads_disk: s.reads_disk,
            reads_backend: s.reads_backend,
            reads_peer: s.reads_peer,
            bytes_memory: s.bytes_memory,
            bytes_disk: s.bytes_disk,
            bytes_backend: s.bytes_backend,
            bytes_peer: s.bytes_peer,
        }
    }
}

impl From<pb::NodeStats> for NodeStats {
    fn from(s: pb::NodeStats) -> Self {
        NodeStats {
            memory_used: s.memory_used,
            membership_epoch: s.membership_epoch,
            members: s.members,
            reads_memory: s.reads_memory,
            reads_disk: s.reads_disk,
            reads_backend: s.reads_backend,
            reads_peer: s.reads_peer,
            bytes_memory: s.bytes_memory,
            bytes_disk: s.bytes_disk,
            bytes_backend: s.bytes_backend,
            bytes_peer: s.bytes_peer,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::NotADirectory(m) => Status::failed_precondition(m),
            ApiError::Stale(m) => Status::aborted(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Invalid(m) => Status::invalid_argument(m),
            ApiError::Corrupt(m) => Status::data_loss(m),
            ApiError::Internal(m) => Status::internal(m),
            ApiError::Denied(m) => Status::permission_denied(m),
            ApiError::Exhausted(m) => Status::resource_exhausted(m),
        }
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        let m = s.message().to_string();
        match s.code() {
            Code::NotFound => ApiError::NotFound(m),
            Code::FailedPrecondition => ApiError::NotADirectory(m),
            Code::Aborted => ApiError::Stale(m),
            Code::InvalidArgument => ApiError::Invalid(m),
            Code::DataLoss => ApiError::Corrupt(m),
            Code::PermissionDenied | Code::Unauthenticated => ApiError::Denied(m),
            Code::ResourceExhausted => ApiError::Exhausted(m),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                ApiError::Unavailable(format!("{m} ({:?})", s.code()))
            }
            other => ApiError::Internal(format!("{m} ({other:?})")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_wire() {
        for e in [
            ApiError::NotFound("a".into()),
            ApiError::NotADirectory("b".into()),
            ApiError::Stale("c".into()),
            ApiError::Invalid("d".into()),
            ApiError::Corrupt("e".into()),
        ] {
            assert_eq!(ApiError::from(Status::from(e.clone())), e);
        }
        assert!(matches!(
            ApiError::from(Status::unavailable("x")),
            ApiError::Unavailable(_)
        ));
    }

    #[test]
    fn entries_round_trip_and_reject_garbage() {
        let e = Entry {
            name: "ü b".into(),
            kind: EntryKind::File,
            size: 3,
            mtime_ns: 5,
            object: Some(ObjectRef {
                mount: 0,
                id: ObjectId {
                    backend: "s3://b".into(),
                    key: "ü b".into(),
                    size: 3,
                    etag: Some("e".into()),
                    version: None,
                    mtime_ns: 5,
                },
            }),
            pinned: true,
            owner: Some(crate::Owner {
                mode: 0o640,
                uid: 1000,
                gid: 100,
            }),
        };
        assert_eq!(Entry::try_from(pb::Entry::from(&e)).unwrap(), e);
        let mut setuid = pb::Entry::from(&e);
        setuid.owner.as_mut().unwrap().mode = 0o104_755;
        assert_eq!(
            Entry::try_from(setuid).unwrap().owner.unwrap().mode,
            0o755,
            "only permission bits cross"
        );
        let unpinned = Entry {
            pinned: false,
            ..e.clone()
        };
        assert_eq!(
            Entry::try_from(pb::Entry::from(&unpinned)).unwrap(),
            unpinned
        );
        let mut bad = pb::Entry::from(&e);
        bad.kind = 17;
        assert!(Entry::try_from(bad).is_err());
        let mut bad = pb::Entry::from(&e);
        bad.object = None;
        assert!(Entry::try_from(bad).is_err());
    }
}
