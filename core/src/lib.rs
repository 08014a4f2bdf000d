//! Granary's pure logic.
//!
//! Everything in this crate is deterministic and free of I/O: block arithmetic, cache keys, the
//! readahead window, source URIs, the object key <-> name mapping, the namespace table, the
//! pins-epoch trust rules of the FUSE client, the retry backoff, humane sizes and durations, and
//! the metric catalogue. Services (`cache-server`, `fuse-client`) drive
//! these types; they are tested here with plain unit and property tests, without a runtime, a
//! network or a kernel.

pub mod backoff;
pub mod block;
pub mod dataset;
pub mod gang;
pub mod keys;
pub mod metrics;
pub mod namespace;
pub mod object;
pub mod placement;
pub mod rate;
pub mod readahead;
pub mod trust;
pub mod units;
pub mod uri;

pub use block::{BlockSize, BlockSpan};
pub use namespace::{MountPoint, Namespace, NamespaceError, Resolved};
pub use object::{BlockKey, ObjectId};
pub use readahead::Readahead;
pub use units::{ByteSize, format_duration, parse_duration};
pub use uri::{SourceUri, UriError};
