//! The `[datasets]` and `[[tenant]]` sections: capacities, load limits, and the bearer tokens,
//! each from exactly one of its inline value, a file or an environment variable.

use super::{ConfigError, ConfigFile, DatasetSettings, Tenant, field};
use crate::dataset_api::Token;
use granary_core::ByteSize;
use std::path::PathBuf;

impl ConfigFile {
    pub(super) fn dataset_settings(&self) -> Result<DatasetSettings, ConfigError> {
        let d = &self.datasets;
        let mut out = DatasetSettings::default();
        if let Some(c) = &d.capacity {
            out.capacity = field("datasets.capacity", c, |s| s.parse::<ByteSize>())?;
        }
        if let Some(n) = d.load_concurrency {
            if n == 0 || n > 256 {
                return Err(ConfigError::Invalid(
                    "datasets.load_concurrency must be 1-256".into(),
                ));
            }
            out.load_concurrency = n;
        }
        if let Some(n) = d.load_threads {
            if n == 0 || n > 64 {
                return Err(ConfigError::Invalid(
                    "datasets.load_threads must be 1-64".into(),
                ));
            }
            out.load_threads = n;
        }
        out.admin_token = token(
            "datasets.admin_token",
            &d.admin_token,
            &d.admin_token_file,
            &d.admin_token_env,
        )?;
        out.scheduler_token = token(
            "datasets.scheduler_token",
            &d.scheduler_token,
            &d.scheduler_token_file,
            &d.scheduler_token_env,
        )?;
        if out.admin_token.is_some() && out.admin_token == out.scheduler_token {
            return Err(ConfigError::Invalid(
                "datasets.scheduler_token: the scheduler's token must differ from the admin's"
                    .into(),
            ));
        }
        for t in &self.tenants {
            granary_core::dataset::check_name(&t.name)
                .map_err(|e| ConfigError::Invalid(format!("tenant name: {e}")))?;
            let what = format!("tenant {:?} token", t.name);
            let token = token(&what, &t.token, &t.token_file, &t.token_env)?.ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "tenant {:?}: give its token as token_file (a Secret), token_env or token",
                    t.name
                ))
            })?;
            if out
                .tenants
                .iter()
                .any(|o| o.name == t.name || o.token == token)
                || out.admin_token.as_ref() == Some(&token)
                || out.scheduler_token.as_ref() == Some(&token)
            {
                return Err(ConfigError::Invalid(format!(
                    "tenant {:?}: names and tokens must be unique",
                    t.name
                )));
            }
            let quota = t
                .quota
                .as_deref()
                .map(|q| {
                    field(&format!("tenant {:?} quota", t.name), q, |s| {
                        s.parse::<ByteSize>()
                    })
                })
                .transpose()?
                .map(|b| b.bytes());
            out.tenants.push(Tenant {
                name: t.name.clone(),
                token,
                quota,
                quota_files: t.quota_files,
            });
        }
        Ok(out)
    }
}

/// A bearer token from at most one of its sources: inline `value`, the file `file` (one line; a
/// trailing newline is dropped) or the environment variable `env`. `key` names the inline key
/// (`..._file` and `..._env` are the others) in errors.
fn token(
    key: &str,
    value: &Option<String>,
    file: &Option<PathBuf>,
    env: &Option<String>,
) -> Result<Option<Token>, ConfigError> {
    let text = match (value, file, env) {
        (None, None, None) => return Ok(None),
        (Some(v), None, None) => v.clone(),
        (None, Some(path), None) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Invalid(format!("{key}_file: cannot read {}: {e}", path.display()))
            })?;
            let mode = std::fs::metadata(path).map_or(0, |m| {
                std::os::unix::fs::PermissionsExt::mode(&m.permissions())
            });
            if mode & 0o077 != 0 {
                tracing::warn!(
                    file = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "{key}_file is readable by others than its owner: give it mode 0400 (a Secret volume's defaultMode)"
                );
            }
            let line = text.strip_suffix('\n').unwrap_or(&text);
            line.strip_suffix('\r').unwrap_or(line).to_string()
        }
        (None, None, Some(var)) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => v,
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "{key}_env: the environment variable {var:?} is not set"
                )));
            }
        },
        _ => {
            return Err(ConfigError::Invalid(format!(
                "{key}: give one of {key}, {key}_file and {key}_env"
            )));
        }
    };
    if text.len() < 16
        || text.len() > 4096
        || text.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ConfigError::Invalid(format!(
            "{key}: a token must be at least 16 (at most 4096) characters without spaces"
        )));
    }
    Ok(Some(Token::new(&text)))
}
