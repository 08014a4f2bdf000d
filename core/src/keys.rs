//! Object keys and namespace names: the one mapping between them.
//!
//! A backend holds objects by key: any UTF-8 string on S3 (what boto3, the AWS CLI, s3fs and
//! the S3 console store), a path below the source root on POSIX. The namespace shows the key of
//! an object below a mount's prefix as the path of exactly the same bytes: the key
//! `docs/q%20a.txt` is the file `q%20a.txt` in the directory `docs` (never `q a.txt`), and a read
//! of that file asks the backend for exactly the key `docs/q%20a.txt`. Nothing is decoded on the
//! way in or encoded on the way out; the HTTP client alone encodes a key for its request line.
//!
//! Every path that crosses this boundary (listing, stat, read, dataset manifest, load, peer
//! copy) uses these functions:
//! - [`join`] and [`check_key`] for a key to ask for,
//! - [`child`] for what a listed key or common prefix is inside the directory listed.
//!
//! Some keys cannot be a path: an empty segment (`a//b`), a `.` or `..` segment, or a control
//! character (NUL among them). They are left out of listings and never opened.
//!
//! A "folder marker" is an object whose key ends in `/` (what the S3 console's "Create folder",
//! s3fs `mkdir` and Hadoop's s3a write): it makes its directory exist, and is never a file.

use std::fmt;

/// A POSIX file's or directory's permission bits (`0o777` at most) and owner, shown with its
/// name as they are in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Why a key or a name cannot be a namespace path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// An empty key, or an empty segment (`a//b`).
    EmptySegment,
    /// A `.` or `..` segment.
    DotSegment,
    /// A control character (NUL, newline, ...).
    ControlCharacter,
}

impl KeyError {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            KeyError::EmptySegment => "empty_segment",
            KeyError::DotSegment => "dot_segment",
            KeyError::ControlCharacter => "control_character",
        }
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyError::EmptySegment => "it has an empty segment",
            KeyError::DotSegment => "it has a '.' or '..' segment",
            KeyError::ControlCharacter => "it has a control character",
        })
    }
}

/// Checks that `name` can be one component of a namespace path.
pub fn check_name(name: &str) -> Result<(), KeyError> {
    if name.is_empty() {
        return Err(KeyError::EmptySegment);
    }
    if name == "." || name == ".." {
        return Err(KeyError::DotSegment);
    }
    // `/` ends a segment; a control character has no place in a file name shown to tools.
    if name.chars().any(|c| c == '/' || c.is_control()) {
        return Err(KeyError::ControlCharacter);
    }
    Ok(())
}

/// Checks that `key` (relative, `/`-separated) names a path: each segment a valid name.
pub fn check_key(key: &str) -> Result<(), KeyError> {
    key.split('/').try_for_each(check_name)
}

/// The key of `rel` inside the directory whose key is `dir` (`""` is the root).
pub fn join(dir: &str, rel: &str) -> String {
    match (dir.is_empty(), rel.is_empty()) {
        (true, _) => rel.to_string(),
        (false, true) => dir.to_string(),
        (false, false) => format!("{dir}/{rel}"),
    }
}

/// What one key listed inside a directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Child<'a> {
    /// An entry of the directory, by this name.
    Name(&'a str),
    /// The directory's own folder marker (the key `dir/`): no entry.
    Marker,
    /// A key that cannot be shown: left out.
    Invalid(KeyError),
}

/// What `listed` is inside the directory `dir` (both full keys, without a trailing `/` except
/// for a folder marker's own). A common prefix is given the same way (`dir/sub` or `dir/sub/`).
pub fn child<'a>(dir: &str, listed: &'a str) -> Child<'a> {
    let rel = if dir.is_empty() {
        Some(listed)
    } else {
        listed
            .strip_prefix(dir)
            .and_then(|rest| rest.strip_prefix('/'))
    };
    let Some(rel) = rel else {
        // Not below the directory: only the directory's own key can be here.
        return if listed == dir {
            Child::Marker
        } else {
            Child::Invalid(KeyError::EmptySegment)
        };
    };
    if rel.is_empty() {
        return Child::Marker;
    }
    let name = rel.strip_suffix('/').unwrap_or(rel);
    match check_name(name) {
        Ok(()) => Child::Name(name),
        Err(e) => Child::Invalid(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_key_bytes() {
        for name in [
            "café-日本語.txt",
            "icon-✨.png",
            "q%20a.txt",
            "a%2Fb",
            "%",
            "%zz",
            "plus+sign",
            "eq=ual",
            "hash#tag",
            "what?",
            "a&b",
            "with space",
            "e\u{301}",
            "\u{e9}",
            "...",
            ".hidden",
            "..x",
        ] {
            assert_eq!(check_name(name), Ok(()), "{name:?}");
            assert_eq!(child("docs", &format!("docs/{name}")), Child::Name(name));
            assert_eq!(child("", name), Child::Name(name));
        }
        let long = "n".repeat(200);
        assert_eq!(child("a/b", &format!("a/b/{long}")), Child::Name(&long[..]));
    }

    #[test]
    fn keys_that_cannot_be_paths_are_named() {
        assert_eq!(check_key(""), Err(KeyError::EmptySegment));
        assert_eq!(check_key("a//b"), Err(KeyError::EmptySegment));
        assert_eq!(check_key("/a"), Err(KeyError::EmptySegment));
        assert_eq!(check_key("a/"), Err(KeyError::EmptySegment));
        assert_eq!(check_key("a/./b"), Err(KeyError::DotSegment));
        assert_eq!(check_key("dots/../x"), Err(KeyError::DotSegment));
        assert_eq!(check_key(".."), Err(KeyError::DotSegment));
        assert_eq!(check_key("a\0b"), Err(KeyError::ControlCharacter));
        assert_eq!(check_key("line\nbreak"), Err(KeyError::ControlCharacter));
        assert_eq!(check_key("docs/q%20a.txt"), Ok(()));
        assert_eq!(check_key("..%2F..%2Fx"), Ok(()));
        assert_eq!(
            child("d", "d/.."),
            Child::Invalid(KeyError::DotSegment),
            "a `..` entry is never a name"
        );
        assert_eq!(
            child("d", "d/a\nb"),
            Child::Invalid(KeyError::ControlCharacter)
        );
        assert_eq!(child("d", "d//"), Child::Invalid(KeyError::EmptySegment));
        assert_eq!(child("d", "e/x"), Child::Invalid(KeyError::EmptySegment));
    }

    #[test]
    fn folder_markers_are_never_files() {
        // The marker of the listed directory, with or without its trailing slash.
        assert_eq!(child("a/b", "a/b/"), Child::Marker);
        assert_eq!(child("a/b", "a/b"), Child::Marker);
        // A sub-directory's marker or common prefix is the sub-directory's name.
        assert_eq!(child("a", "a/b/"), Child::Name("b"));
        assert_eq!(child("", "a/"), Child::Name("a"));
    }

    #[test]
    fn join_is_plain_concatenation() {
        assert_eq!(join("", "x"), "x");
        assert_eq!(join("p", ""), "p");
        assert_eq!(join("p/q", "r%20s/t"), "p/q/r%20s/t");
    }
}
