//! Object keys as users' tools store them, and uploads through boto3 (`scripts/s3-put.py`), the
//! client users upload with: keys stored as raw UTF-8, folder markers as zero-byte keys ending in
//! `/`. Data that reaches the backend this way proves what object_store's own uploads cannot:
//! that Granary reads what other clients wrote. Shared by the cli and cache-server tests.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Where an S3 server is and who may write to it.
#[derive(Debug)]
pub struct Boto3Target<'a> {
    pub endpoint: &'a str,
    pub access_key: &'a str,
    pub secret_key: &'a str,
    pub bucket: &'a str,
}

/// Puts each (key, bytes) under `prefix` with boto3 (through a staging directory); a key ending
/// in `/` with no bytes is a folder marker. Panics with boto3's stderr.
pub fn put(target: &Boto3Target, prefix: &str, objects: &[(String, Vec<u8>)]) {
    let staging = tempfile::tempdir().unwrap();
    let list: Vec<(String, String)> = objects
        .iter()
        .enumerate()
        .map(|(i, (key, data))| {
            let file = staging.path().join(i.to_string());
            std::fs::write(&file, data).unwrap();
            (
                format!("{prefix}/{key}"),
                file.to_str().unwrap().to_string(),
            )
        })
        .collect();
    let python = std::env::var("GRANARY_TEST_BOTO3_PYTHON").unwrap_or_else(|_| {
        panic!("GRANARY_TEST_BOTO3_PYTHON is not set: run the tests with scripts/test.sh")
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-put.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg(target.endpoint)
        .arg(target.bucket)
        .env("AWS_ACCESS_KEY_ID", target.access_key)
        .env("AWS_SECRET_ACCESS_KEY", target.secret_key)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(serde_json::to_string(&list).unwrap().as_bytes())
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "boto3 upload of {} objects to {}: {}",
        objects.len(),
        target.endpoint,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// File names of every shape S3 clients store: non-ASCII (Latin, CJK, emoji, combining marks),
/// a literal `%20` and `%2F`, `%` alone, `+`, `=`, `#`, `?`, `&`, space, a 200-byte name, and one
/// name in NFC and in NFD (two different keys). Each must list and read as itself.
pub fn hostile_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "café-日本語.txt",
        "icon-✨.png",
        "q%20a.txt",
        "q a.txt",
        "a%2Fb.txt",
        "100%.txt",
        "%zz%.bin",
        "plus+sign.txt",
        "eq=ual.txt",
        "hash#tag.txt",
        "what?.txt",
        "a&b.txt",
        "with space.txt",
        "Ω-ñ-ü-ß.dat",
        "combining-a\u{30a}\u{301}.txt",
        "r\u{e9}sum\u{e9}.txt",
        "re\u{301}sume\u{301}.txt",
        "..%2F..%2Fx",
        "...",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let long = format!("{}.bin", "l".repeat(196));
    assert_eq!(long.len(), 200);
    names.push(long);
    names
}
