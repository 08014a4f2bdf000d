//! Paths that stay beneath a root, by resolution rather than by text: each is opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` relative to the root's directory, so no
//! `..`, absolute symlink or symlink leading out of the root is followed. The relative path
//! must also be a checked key ([`granary_core::keys::check_key`]).
//!
//! Used for POSIX sources (symlinks inside the root are followed) and for the dataset store
//! (no symlinks at all: the store makes none).

use granary_core::keys;
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

/// How symlinks below the root are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Links {
    /// Followed while they stay beneath the root (POSIX sources).
    Inside,
    /// Never followed (the dataset store).
    None,
}

impl Links {
    fn resolve(self) -> ResolveFlags {
        let base = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        match self {
            Links::Inside => base,
            Links::None => base | ResolveFlags::NO_SYMLINKS,
        }
    }
}

/// Opens the root directory itself (to resolve paths beneath it).
pub(crate) fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn checked(rel: &str) -> io::Result<()> {
    keys::check_key(rel).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{rel:?} cannot be a path: {e}"),
        )
    })
}

/// Opens `rel` (a checked key; `""` is the root itself) beneath `root` with `flags` (and
/// `mode` when it creates). A path that would leave the root fails with `EXDEV`.
pub(crate) fn open_at(
    root: impl AsFd,
    rel: &str,
    flags: OFlags,
    mode: u32,
    links: Links,
) -> io::Result<File> {
    let rel = if rel.is_empty() {
        "."
    } else {
        checked(rel)?;
        rel
    };
    let fd = rustix::fs::openat2(
        root,
        rel,
        flags | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
        links.resolve(),
    )?;
    Ok(File::from(fd))
}

/// Opens `rel` beneath the directory `root`.
#[cfg(test)]
pub(crate) fn open(
    root: &Path,
    rel: &str,
    flags: OFlags,
    mode: u32,
    links: Links,
) -> io::Result<File> {
    open_at(open_root(root)?, rel, flags, mode, links)
}

/// The directory holding `rel` beneath `root` (the root itself for a top-level name: no
/// open) and `rel`'s last component.
fn parent_at<'a>(root: &OwnedFd, rel: &'a str) -> io::Result<(Option<File>, &'a str)> {
    checked(rel)?;
    Ok(match rel.rsplit_once('/') {
        None => (None, rel),
        Some((dir, name)) => (
            Some(open_at(
                root,
                dir,
                OFlags::PATH | OFlags::DIRECTORY,
                0,
                Links::None,
            )?),
            name,
        ),
    })
}

/// Creates the directory `rel` beneath `root` and those above it, one component at a time,
/// each resolved beneath the root (no symlink followed).
pub(crate) fn create_dirs_at(root: &OwnedFd, rel: &str) -> io::Result<()> {
    if rel.is_empty() {
        return Ok(());
    }
    checked(rel)?;
    let mut dir: Option<OwnedFd> = None;
    for name in rel.split('/') {
        let at = dir.as_ref().unwrap_or(root);
        match rustix::fs::mkdirat(at, name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        dir = Some(rustix::fs::openat2(
            at,
            name,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            Links::None.resolve(),
        )?);
    }
    Ok(())
}

/// Creates (`create`), or opens, the file `rel` beneath `root` for `flags`, making its
/// directories; never through a symlink. One `openat2` when its directory is there.
pub(crate) fn open_file_at(
    root: &OwnedFd,
    rel: &str,
    flags: OFlags,
    create: bool,
) -> io::Result<File> {
    let flags = flags
        | OFlags::NOFOLLOW
        | if create {
            OFlags::CREATE
        } else {
            OFlags::empty()
        };
    // (openat2 takes a mode only with O_CREAT.)
    let mode = if create { 0o644 } else { 0 };
    match open_at(root, rel, flags, mode, Links::None) {
        // The directory is there but for a file's first in its directory.
        Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
            if let Some((dir, _)) = rel.rsplit_once('/') {
                create_dirs_at(root, dir)?;
            }
            open_at(root, rel, flags, mode, Links::None)
        }
        other => other,
    }
}

/// [`open_file_at`] beneath the directory `root`.
#[cfg(test)]
pub(crate) fn open_file(root: &Path, rel: &str, flags: OFlags, create: bool) -> io::Result<File> {
    open_file_at(&open_root(root)?, rel, flags, create)
}

/// Renames `from` to `to`, both beneath `root`.
pub(crate) fn rename_at(root: &OwnedFd, from: &str, to: &str) -> io::Result<()> {
    let (fd, fname) = parent_at(root, from)?;
    let same_dir = from.rsplit_once('/').map(|(d, _)| d) == to.rsplit_once('/').map(|(d, _)| d);
    let (td, tname) = if same_dir {
        checked(to)?;
        (None, to.rsplit_once('/').map_or(to, |(_, n)| n))
    } else {
        parent_at(root, to)?
    };
    let fd = fd.as_ref().map_or(root.as_fd(), |f| f.as_fd());
    let td = match (&td, same_dir) {
        (Some(t), _) => t.as_fd(),
        (None, true) => fd,
        (None, false) => root.as_fd(),
    };
    Ok(rustix::fs::renameat(fd, fname, td, tname)?)
}

/// [`rename_at`] beneath the directory `root`.
#[cfg(test)]
pub(crate) fn rename(root: &Path, from: &str, to: &str) -> io::Result<()> {
    rename_at(&open_root(root)?, from, to)
}

/// Removes the file `rel` beneath `root` (never what a symlink names).
pub(crate) fn remove_file_at(root: &OwnedFd, rel: &str) -> io::Result<()> {
    let (d, name) = parent_at(root, rel)?;
    let d = d.as_ref().map_or(root.as_fd(), |f| f.as_fd());
    Ok(rustix::fs::unlinkat(d, name, AtFlags::empty())?)
}

/// [`remove_file_at`] beneath the directory `root`.
pub(crate) fn remove_file(root: &Path, rel: &str) -> io::Result<()> {
    remove_file_at(&open_root(root)?, rel)
}

/// Whether `e` says a path left its root (a symlink out, or `..` above it).
pub(crate) fn escaped(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_beneath_the_root() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let outside = outer.path().join("secret");
        std::fs::write(&outside, b"secret").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("out")).unwrap();
        std::os::unix::fs::symlink("../secret", root.join("up")).unwrap();
        std::fs::write(root.join("in"), b"inside").unwrap();
        std::os::unix::fs::symlink("in", root.join("link")).unwrap();

        let read = |rel: &str, links| open(&root, rel, OFlags::RDONLY, 0, links);
        assert!(read("link", Links::Inside).is_ok(), "an inside link works");
        for bad in ["out", "up"] {
            let e = read(bad, Links::Inside).unwrap_err();
            assert!(escaped(&e), "{bad}: {e}");
        }
        assert!(read("link", Links::None).is_err(), "no links in the store");
        for bad in ["../secret", "/etc/passwd", "a//b", "."] {
            assert_eq!(
                read(bad, Links::Inside).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad}"
            );
        }
        // Names that look like escapes are plain names.
        let f = open_file(&root, "d/..%2F..%2Fx", OFlags::WRONLY, true).unwrap();
        drop(f);
        assert!(root.join("d/..%2F..%2Fx").is_file());
        // A symlinked directory in the store is not followed to create, rename or remove.
        std::os::unix::fs::symlink(outer.path(), root.join("esc")).unwrap();
        assert!(open_file(&root, "esc/new", OFlags::WRONLY, true).is_err());
        assert!(!outer.path().join("new").exists());
        assert!(remove_file(&root, "esc/secret").is_err());
        assert!(rename(&root, "in", "esc/moved").is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
        // Opened again without creating (an append, as a journal is).
        let mut f = open_file(
            &root,
            "d/..%2F..%2Fx",
            OFlags::WRONLY | OFlags::APPEND,
            false,
        )
        .unwrap();
        std::io::Write::write_all(&mut f, b"x").unwrap();
        assert!(open_file(&root, "d/missing", OFlags::WRONLY, false).is_err());
        remove_file(&root, "d/..%2F..%2Fx").unwrap();
        rename(&root, "in", "d/in").unwrap();
        assert!(root.join("d/in").is_file());
    }
}
