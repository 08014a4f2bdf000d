//! What a tenant's token may read through the worker API (`[[mount]] tenants`): the mounts that
//! name it (or name no one), the directories above them leading there, nothing else. A caller
//! without a token (a node, with its cluster certificate), or with the admin's or the scheduler's,
//! reads everything. What a tenant may not see does not exist for it (`NotFound`, never a hint);
//! a block of a mount it may not read is refused (`Denied`). The innermost mount holding a path
//! decides. The CSI driver applies the same rule ([`MountTenants::may_publish`]) to the
//! directories it gives pods.

use crate::config::{ConfigFile, DatasetSettings, Settings};
use crate::dataset_api::{Caller, authenticate};
use granary_core::namespace::{components, is_within};
use granary_proto::{ApiError, Entry, ObjectRef};
use std::sync::Arc;

/// Who may read each mount (the workers' `[[mount]] tenants`): the one rule the worker API and the
/// CSI driver both apply.
#[derive(Debug, Clone, Default)]
pub struct MountTenants {
    /// Each mount's path (normalised) and who may read it (`None`: everyone).
    mounts: Vec<(String, Option<Vec<String>>)>,
}

impl MountTenants {
    pub fn new(mounts: Vec<(String, Option<Vec<String>>)>) -> Self {
        MountTenants { mounts }
    }

    /// The rule of a worker config file's `[[mount]]` sections (read by the CSI driver).
    pub fn from_config(file: &ConfigFile) -> Self {
        MountTenants::new(
            file.mounts
                .iter()
                .filter_map(|m| Some((normal(&m.path)?, m.tenants.clone())))
                .collect(),
        )
    }

    fn may_read_mount(&self, tenant: &str, mount: usize) -> bool {
        self.mounts
            .get(mount)
            .is_some_and(|(_, t)| t.as_ref().is_none_or(|t| t.iter().any(|x| x == tenant)))
    }

    /// The innermost mount holding `path` (normalised).
    fn mount_of(&self, path: &str) -> Option<usize> {
        (0..self.mounts.len())
            .filter(|&i| is_within(path, &self.mounts[i].0))
            .max_by_key(|&i| self.mounts[i].0.len())
    }

    /// Whether `path` lies in a mount the tenant may read, or above one. An invalid path is
    /// "visible": the API then says why it is invalid.
    pub fn may_see(&self, tenant: &str, path: &str) -> bool {
        let Some(path) = normal(path) else {
            return true;
        };
        self.mount_of(&path)
            .is_some_and(|i| self.may_read_mount(tenant, i))
            || self
                .mounts
                .iter()
                .enumerate()
                .any(|(i, (mount, _))| is_within(mount, &path) && self.may_read_mount(tenant, i))
    }

    /// Whether the tenant may be given the whole directory `path` (a CSI volume): the mount
    /// holding it is one the tenant may read, and so is every mount beneath it.
    pub fn may_publish(&self, tenant: &str, path: &str) -> bool {
        let Some(path) = normal(path) else {
            return false;
        };
        self.mount_of(&path)
            .is_some_and(|i| self.may_read_mount(tenant, i))
            && self
                .mounts
                .iter()
                .enumerate()
                .filter(|(_, (mount, _))| is_within(mount, &path))
                .all(|(i, _)| self.may_read_mount(tenant, i))
    }
}

/// `path` as `/a/b`, or `None` if it is not an absolute path without `.`, `..` or `//`.
fn normal(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let trimmed = path.trim_end_matches('/');
    let parts = components(if trimmed.is_empty() { "/" } else { trimmed })?;
    Some(format!("/{}", parts.join("/")))
}

pub struct TenantViews {
    datasets: DatasetSettings,
    mounts: MountTenants,
}

impl TenantViews {
    pub fn new(settings: &Settings) -> Self {
        let mounts = settings
            .namespace
            .mounts()
            .iter()
            .zip(&settings.mount_tenants)
            .map(|(m, t)| (m.path.clone(), t.clone()))
            .collect();
        TenantViews {
            datasets: settings.datasets.clone(),
            mounts: MountTenants::new(mounts),
        }
    }

    /// The tenant whose view a caller presenting `token` gets: `None` (everything) without a
    /// token, with the admin's or the scheduler's, or when the API has no tokens at all; a token
    /// that matches no one is refused.
    pub fn caller(&self, token: Option<&str>) -> Result<Option<String>, ApiError> {
        if token.is_none() {
            return Ok(None);
        }
        match authenticate(&self.datasets, token)? {
            Caller::Tenant(name) => Ok(Some(name)),
            Caller::Admin | Caller::Scheduler => Ok(None),
        }
    }

    /// Whether `path` lies in a mount the tenant may read, or above one.
    pub fn may_see(&self, tenant: &str, path: &str) -> bool {
        self.mounts.may_see(tenant, path)
    }

    /// `path` if the tenant may see it, else `NotFound`.
    pub fn check_path(&self, tenant: &str, path: &str) -> Result<(), ApiError> {
        if self.may_see(tenant, path) {
            Ok(())
        } else {
            Err(ApiError::NotFound(path.to_string()))
        }
    }

    /// The entries of directory `path` the tenant may see.
    pub fn filter(&self, tenant: &str, path: &str, entries: Arc<Vec<Entry>>) -> Arc<Vec<Entry>> {
        let dir = path.trim_end_matches('/');
        let kept: Vec<Entry> = entries
            .iter()
            .filter(|e| self.may_see(tenant, &format!("{dir}/{}", e.name)))
            .cloned()
            .collect();
        if kept.len() == entries.len() {
            entries
        } else {
            Arc::new(kept)
        }
    }

    /// A block of `object` if the tenant may read its mount, else `Denied`.
    pub fn check_object(&self, tenant: &str, object: &ObjectRef) -> Result<(), ApiError> {
        if self.mounts.may_read_mount(tenant, object.mount as usize) {
            return Ok(());
        }
        Err(ApiError::Denied(format!(
            "tenant {tenant:?} may not read {:?}: its mount does not name the tenant",
            object.id.key
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views() -> TenantViews {
        let file: ConfigFile = toml::from_str(
            r#"
            [[tenant]]
            name = "a"
            token = "token-of-a-0123456789"
            [[tenant]]
            name = "b"
            token = "token-of-b-0123456789"
            [[mount]]
            path = "/teams/a"
            source = "/tmp"
            tenants = ["a"]
            [[mount]]
            path = "/teams/b"
            source = "/tmp"
            tenants = ["b"]
            [[mount]]
            path = "/shared"
            source = "/tmp"
            "#,
        )
        .unwrap();
        TenantViews::new(&file.settings().unwrap())
    }

    #[test]
    fn a_tenant_sees_its_mounts_the_open_ones_and_the_way_to_them() {
        let v = views();
        assert_eq!(v.caller(None).unwrap(), None);
        assert_eq!(
            v.caller(Some("token-of-a-0123456789")).unwrap(),
            Some("a".into())
        );
        assert!(v.caller(Some("nobody's")).is_err());
        for (path, seen) in [
            ("/", true),
            ("/teams", true),
            ("/teams/a", true),
            ("/teams/a/x/y", true),
            ("/teams/b", false),
            ("/teams/b/x", false),
            ("/teams/bb", false),
            ("/shared/z", true),
            ("/other", false),
        ] {
            assert_eq!(v.may_see("a", path), seen, "{path}");
        }
    }

    fn rule() -> MountTenants {
        let file: ConfigFile = toml::from_str(
            r#"
            [[mount]]
            path = "/teams/a"
            source = "/tmp"
            tenants = ["a"]
            [[mount]]
            path = "/teams/a/private/"
            source = "/tmp"
            tenants = ["admin-only"]
            [[mount]]
            path = "/shared"
            source = "/tmp"
            "#,
        )
        .unwrap();
        MountTenants::from_config(&file)
    }

    #[test]
    fn a_tenant_is_given_only_directories_wholly_its_own() {
        let r = rule();
        for (path, given) in [
            ("/teams/a", false), // holds /teams/a/private
            ("/teams/a/data", true),
            ("/teams/a/data/", true),
            ("/teams/a/private", false),
            ("/teams/a/private/x", false),
            ("/shared/x", true),
            ("/teams", false), // above mounts, in none
            ("/", false),
            ("/teams/a/../b", false),
            ("teams/a/data", false),
        ] {
            assert_eq!(r.may_publish("a", path), given, "{path}");
        }
        assert!(!r.may_publish("b", "/teams/a/data"));
        // The innermost mount decides what is seen, too.
        assert!(!r.may_see("a", "/teams/a/private/x"));
        assert!(r.may_see("a", "/teams/a/x") && r.may_see("a", "/teams"));
    }
}
