//! What a tenant's token may read through the worker API (`[[mount]] tenants`): the mounts that
//! name it (or name no one), the directories above them leading there, nothing else. A caller
//! without a token (a node, with its cluster certificate), or with the admin's or the scheduler's,
//! reads everything. What a tenant may not see does not exist for it (`NotFound`, never a hint);
//! a block of a mount it may not read is refused (`Denied`).

use crate::config::{DatasetSettings, Settings};
use crate::dataset_api::{Caller, authenticate};
use granary_core::namespace::{components, is_within};
use granary_proto::{ApiError, Entry, ObjectRef};
use std::sync::Arc;

pub struct TenantViews {
    datasets: DatasetSettings,
    /// Each mount's path and who may read it (`None`: everyone).
    mounts: Vec<(String, Option<Vec<String>>)>,
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
            mounts,
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

    fn may_read_mount(&self, tenant: &str, mount: usize) -> bool {
        self.mounts
            .get(mount)
            .is_some_and(|(_, t)| t.as_ref().is_none_or(|t| t.iter().any(|x| x == tenant)))
    }

    /// Whether `path` lies in a mount the tenant may read, or above one. An invalid path is
    /// "visible": the API then says why it is invalid.
    pub fn may_see(&self, tenant: &str, path: &str) -> bool {
        let Some(parts) = components(path) else {
            return true;
        };
        let path = format!("/{}", parts.join("/"));
        self.mounts.iter().enumerate().any(|(i, (mount, _))| {
            self.may_read_mount(tenant, i) && (is_within(&path, mount) || is_within(mount, &path))
        })
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
        if self.may_read_mount(tenant, object.mount as usize) {
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
    use crate::config::ConfigFile;

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
}
