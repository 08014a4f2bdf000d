//! Object identity and block cache keys.
//!
//! An object is identified by where it lives (backend id + key) AND which version of it we saw
//! (ETag, version id, size, mtime). The fingerprint of that identity is part of every block key,
//! so a changed object never shares a cached block with its previous version: a reader holding
//! the old identity gets either old bytes or an error, never a mix.

use xxhash_rust::xxh3::xxh3_128;

/// The identity of one version of one object, as seen when it was listed or opened.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectId {
    /// Stable id of the backend (e.g. `s3://bucket/prefix`).
    pub backend: String,
    /// Key of the object inside the backend, relative to the backend's prefix.
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
    pub version: Option<String>,
    /// Last modification, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

impl ObjectId {
    /// A 128-bit fingerprint of everything that identifies this version.
    pub fn fingerprint(&self) -> u128 {
        let mut buf = Vec::with_capacity(self.backend.len() + self.key.len() + 96);
        for part in [
            self.backend.as_bytes(),
            self.key.as_bytes(),
            self.etag.as_deref().unwrap_or("").as_bytes(),
            self.version.as_deref().unwrap_or("").as_bytes(),
        ] {
            buf.extend_from_slice(&(part.len() as u64).to_le_bytes());
            buf.extend_from_slice(part);
        }
        buf.extend_from_slice(&self.size.to_le_bytes());
        buf.extend_from_slice(&self.mtime_ns.to_le_bytes());
        xxh3_128(&buf)
    }
}

/// The cache key of one block of one object version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(pub u128);

impl BlockKey {
    pub fn new(fingerprint: u128, index: u64) -> Self {
        let mut buf = [0u8; 24];
        buf[..16].copy_from_slice(&fingerprint.to_le_bytes());
        buf[16..].copy_from_slice(&index.to_le_bytes());
        BlockKey(xxh3_128(&buf))
    }
}

/// CRC32C of a block's bytes: computed once when fetched, checked wherever the bytes land.
pub fn checksum(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// The [`checksum`] of some bytes followed by `data`, from the checksum `crc` of those bytes
/// (0 for none): a block's checksum computed piece by piece as it arrives.
pub fn checksum_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn id(etag: &str) -> ObjectId {
        ObjectId {
            backend: "s3://b/p".into(),
            key: "dir/file".into(),
            size: 10,
            etag: Some(etag.into()),
            version: None,
            mtime_ns: 1,
        }
    }

    #[test]
    fn versions_differ() {
        assert_ne!(id("a").fingerprint(), id("b").fingerprint());
        let mut other = id("a");
        other.size = 11;
        assert_ne!(id("a").fingerprint(), other.fingerprint());
        // Field boundaries are length-prefixed: moving bytes between fields changes the key.
        let mut shifted = id("a");
        shifted.backend = "s3://b/pd".into();
        shifted.key = "ir/file".into();
        assert_ne!(id("a").fingerprint(), shifted.fingerprint());
        assert_eq!(id("a").fingerprint(), id("a").fingerprint());
    }

    proptest! {
        #[test]
        fn block_keys_are_distinct(fp in any::<u128>(), n in 1u64..2000) {
            let keys: HashSet<_> = (0..n).map(|i| BlockKey::new(fp, i)).collect();
            prop_assert_eq!(keys.len() as u64, n);
        }
    }

    #[test]
    fn checksum_detects_a_flipped_bit() {
        let mut data = vec![7u8; 4096];
        let sum = checksum(&data);
        data[1234] ^= 1;
        assert_ne!(sum, checksum(&data));
    }
}
