//! Deterministic test trees: pseudo-random bytes derived from each file's path, so any file's
//! expected content can be recomputed anywhere.

use std::collections::BTreeMap;
use std::path::Path;

/// Fills `buf` with the bytes of stream `seed` starting at byte `offset` (xorshift64*, by
/// 8-byte words: byte i of the stream depends only on seed and i).
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut pos = offset;
    let mut i = 0;
    while i < buf.len() {
        let word = mix(seed ^ (pos / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes();
        let from = (pos % 8) as usize;
        let n = (8 - from).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[from..from + n]);
        i += n;
        pos += n as u64;
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

pub fn seed_of(path: &str) -> u64 {
    path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn content(path: &str, size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    fill(seed_of(path), 0, &mut v);
    v
}

/// A tree: relative path -> size.
pub type Tree = BTreeMap<String, u64>;

/// The tree the mount tests use: nested dirs, 0- and 1-byte files, a file of one block + 1
/// byte, a large file, `small` small files in one directory, names with spaces and non-ASCII.
pub fn standard_tree(block_size: u64, large: u64, small: usize) -> Tree {
    let mut t = Tree::new();
    t.insert("empty".into(), 0);
    t.insert("one-byte".into(), 1);
    t.insert("block-plus-one.bin".into(), block_size + 1);
    t.insert("nested/a/b/c/deep.txt".into(), 4321);
    t.insert("nested/a/sibling.dat".into(), 70_000);
    t.insert("names/with space.txt".into(), 123);
    t.insert("names/ünïcødé-文件.bin".into(), 4567);
    t.insert("names/emoji-🚀.txt".into(), 89);
    t.insert("large/large.bin".into(), large);
    for i in 0..small {
        t.insert(format!("small/f{i:05}.bin"), 1000 + (i as u64 * 37) % 3000);
    }
    t
}

/// Writes the tree under `root` on the local filesystem.
pub fn write_local(root: &Path, tree: &Tree) {
    for (path, size) in tree {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, content(path, *size)).unwrap();
    }
}

/// The sorted list of every directory and file path in a tree (what `find` should print).
pub fn all_paths(tree: &Tree) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    for path in tree.keys() {
        let mut prefix = String::new();
        for part in path.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            out.insert(prefix.clone());
        }
    }
    out.into_iter().collect()
}
