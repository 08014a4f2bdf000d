//! The namespace: one POSIX tree made of mount points, each backed by a source.
//!
//! A namespace path (`/imagenet/train/x.jpg`) resolves to the mount point with the longest
//! matching prefix and a key relative to that mount's source (`train/x.jpg`). Directories above
//! mount points (`/` when mounts are `/a` and `/b/c`) are synthesized: they list the next path
//! component of the mounts below them. Mount points may not nest.

use crate::uri::SourceUri;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPoint {
    /// Normalized absolute path: `/` or `/a/b` (no trailing slash).
    pub path: String,
    pub source: SourceUri,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamespaceError {
    #[error("the namespace has no mount points")]
    Empty,
    #[error("invalid mount path {0:?}: it must be absolute, without '.', '..' or empty components")]
    InvalidMountPath(String),
    #[error("mount paths {0:?} and {1:?} overlap (mounts may not nest)")]
    Overlap(String, String),
    #[error("invalid path {0:?}")]
    InvalidPath(String),
}

/// Where a namespace path leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved<'a> {
    /// Inside mount `mount` at `key` (empty key = the mount's root).
    Mount {
        mount: usize,
        key: String,
        source: &'a SourceUri,
    },
    /// A directory synthesized above mount points, listing these child names.
    Synthetic {
        children: Vec<String>,
    },
    NotFound,
}

#[derive(Debug, Clone)]
pub struct Namespace {
    mounts: Vec<MountPoint>,
}

/// Splits a path into components, rejecting `.`, `..`, empty and NUL-bearing ones.
pub fn components(path: &str) -> Option<Vec<&str>> {
    let trimmed = path.strip_prefix('/')?;
    if trimmed.is_empty() {
        return Some(Vec::new());
    }
    let parts: Vec<&str> = trimmed.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0'))
    {
        return None;
    }
    Some(parts)
}

impl Namespace {
    pub fn new(mounts: Vec<MountPoint>) -> Result<Self, NamespaceError> {
        if mounts.is_empty() {
            return Err(NamespaceError::Empty);
        }
        let mut normalized = Vec::with_capacity(mounts.len());
        for m in mounts {
            let trimmed = if m.path.len() > 1 {
                m.path.trim_end_matches('/')
            } else {
                &m.path
            };
            let parts = components(trimmed)
                .ok_or_else(|| NamespaceError::InvalidMountPath(m.path.clone()))?;
            normalized.push(MountPoint {
                path: format!("/{}", parts.join("/")),
                source: m.source,
            });
        }
        for (i, a) in normalized.iter().enumerate() {
            for b in &normalized[i + 1..] {
                if is_within(&a.path, &b.path) || is_within(&b.path, &a.path) {
                    return Err(NamespaceError::Overlap(a.path.clone(), b.path.clone()));
                }
            }
        }
        Ok(Namespace { mounts: normalized })
    }

    /// A namespace of a single source mounted at `/`.
    pub fn single(source: SourceUri) -> Self {
        Namespace {
            mounts: vec![MountPoint {
                path: "/".into(),
                source,
            }],
        }
    }

    pub fn mounts(&self) -> &[MountPoint] {
        &self.mounts
    }

    pub fn resolve(&self, path: &str) -> Result<Resolved<'_>, NamespaceError> {
        let parts =
            components(path).ok_or_else(|| NamespaceError::InvalidPath(path.to_string()))?;
        let path = format!("/{}", parts.join("/"));
        for (i, m) in self.mounts.iter().enumerate() {
            if is_within(&path, &m.path) {
                let key = path[m.path.len()..].trim_start_matches('/').to_string();
                return Ok(Resolved::Mount {
                    mount: i,
                    key,
                    source: &m.source,
                });
            }
        }
        let mut children: Vec<String> = self
            .mounts
            .iter()
            .filter(|m| is_within(&m.path, &path) && m.path != path)
            .filter_map(|m| {
                let rest = if path == "/" {
                    &m.path[1..]
                } else {
                    &m.path[path.len() + 1..]
                };
                rest.split('/').next().map(str::to_string)
            })
            .collect();
        if children.is_empty() {
            return Ok(Resolved::NotFound);
        }
        children.sort();
        children.dedup();
        Ok(Resolved::Synthetic { children })
    }
}

/// `path` equals `dir` or lies below it (both normalized).
pub fn is_within(path: &str, dir: &str) -> bool {
    dir == "/"
        || path == dir
        || (path.starts_with(dir) && path.as_bytes().get(dir.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mp(path: &str, src: &str) -> MountPoint {
        MountPoint {
            path: path.into(),
            source: src.parse().unwrap(),
        }
    }

    #[test]
    fn resolves_longest_mount() {
        let ns = Namespace::new(vec![
            mp("/imagenet", "s3://bkt/in"),
            mp("/text/c4/", "/mnt/gluster/c4"),
        ])
        .unwrap();
        match ns.resolve("/imagenet/train/a.jpg").unwrap() {
            Resolved::Mount { mount, key, .. } => {
                assert_eq!(mount, 0);
                assert_eq!(key, "train/a.jpg");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(ns.resolve("/imagenet").unwrap(), Resolved::Mount { key, .. } if key.is_empty())
        );
        assert_eq!(
            ns.resolve("/").unwrap(),
            Resolved::Synthetic {
                children: vec!["imagenet".into(), "text".into()]
            }
        );
        assert_eq!(
            ns.resolve("/text").unwrap(),
            Resolved::Synthetic {
                children: vec!["c4".into()]
            }
        );
        assert_eq!(ns.resolve("/imagenetx").unwrap(), Resolved::NotFound);
        assert_eq!(ns.resolve("/nope").unwrap(), Resolved::NotFound);
        assert!(ns.resolve("/imagenet/../etc").is_err());
        assert!(ns.resolve("relative").is_err());
    }

    #[test]
    fn single_mount_at_root() {
        let ns = Namespace::single("s3://bkt".parse().unwrap());
        assert!(matches!(ns.resolve("/").unwrap(), Resolved::Mount { key, .. } if key.is_empty()));
        assert!(
            matches!(ns.resolve("/a b/ü").unwrap(), Resolved::Mount { key, .. } if key == "a b/ü")
        );
    }

    #[test]
    fn rejects_bad_tables() {
        assert_eq!(Namespace::new(vec![]).unwrap_err(), NamespaceError::Empty);
        assert!(matches!(
            Namespace::new(vec![mp("/a", "s3://bkt"), mp("/a/b", "s3://bkt2")]),
            Err(NamespaceError::Overlap(..))
        ));
        assert!(matches!(
            Namespace::new(vec![mp("/", "s3://bkt"), mp("/a", "s3://bkt2")]),
            Err(NamespaceError::Overlap(..))
        ));
        assert!(matches!(
            Namespace::new(vec![mp("a", "s3://bkt")]),
            Err(NamespaceError::InvalidMountPath(_))
        ));
        assert!(matches!(
            Namespace::new(vec![mp("/a/../b", "s3://bkt")]),
            Err(NamespaceError::InvalidMountPath(_))
        ));
    }
}
