//! `granary hint`: tells a mount the order in which the next epoch will read its files, so that
//! it fetches them ahead (see `granary_fuse_client::hint`).

use anyhow::{Context, bail};
use clap::Args;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct HintArgs {
    /// The Granary mount the job reads through.
    #[arg(long, value_name = "DIR")]
    mount: PathBuf,
    /// The files in the order they will be read, one per line: paths inside the mount, either
    /// absolute (under DIR) or relative to DIR. `-` reads the list from stdin. An empty list
    /// clears the hint.
    #[arg(value_name = "FILE")]
    list: PathBuf,
}

pub fn run(args: HintArgs) -> anyhow::Result<()> {
    let mut text = String::new();
    if args.list == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the list from stdin")?;
    } else {
        std::fs::File::open(&args.list)
            .and_then(|mut f| f.read_to_string(&mut text))
            .with_context(|| format!("cannot read {}", args.list.display()))?;
    }
    let relative = relative_to_mount(&args.mount, &text)?;
    let accepted = granary_fuse_client::hint::send(&args.mount, relative.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.mount.display()))?;
    println!(
        "granary: {} will fetch {} file{} ahead in this order, at most {} bytes ahead of the reader",
        args.mount.display(),
        accepted.paths,
        if accepted.paths == 1 { "" } else { "s" },
        accepted.budget
    );
    Ok(())
}

/// The list with absolute paths made relative to the mount point (as given, or as resolved:
/// the mount's own path is never stat'ed, so that a hung mount cannot hang the command).
fn relative_to_mount(mount: &Path, text: &str) -> anyhow::Result<String> {
    let given = std::path::absolute(mount)?;
    let resolved = granary_fuse_client::hint::mount_point(mount)
        .with_context(|| format!("cannot resolve {}", mount.display()))?;
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        let path = Path::new(line);
        let rel = if path.is_absolute() {
            match path
                .strip_prefix(&resolved)
                .or_else(|_| path.strip_prefix(&given))
            {
                Ok(rel) => rel,
                Err(_) => bail!(
                    "line {}: {line:?} is not under the mount {}",
                    n + 1,
                    resolved.display()
                ),
            }
        } else {
            path
        };
        let Some(rel) = rel.to_str() else {
            bail!("line {}: not UTF-8", n + 1);
        };
        out.push_str(rel);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_paths_become_relative_and_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        let text = format!("{}/a/b.jpg\nc/d.jpg\n\n", mnt.display());
        assert_eq!(
            relative_to_mount(&mnt, &text).unwrap(),
            "a/b.jpg\nc/d.jpg\n"
        );
        let err = relative_to_mount(&mnt, "/etc/passwd\n").unwrap_err();
        assert!(err.to_string().contains("not under the mount"), "{err}");
    }
}
