//! The block frame codec of the data plane (sans-IO: bytes in, frames out).
//!
//! One block read is one bidirectional stream: the client writes a request frame, the server
//! answers with a response frame and finishes the stream.
//!
//! ```text
//! request:  "GRQ1" | kind u8 (1 = read block, 2 = read block only if held) | len u32 BE | protobuf ReadBlockRequest (len bytes)
//! response: "GRS2" | status u8 (0 = ok, else an ApiError kind) | origin u8 (where the worker
//!           found the block: 0 unknown, 1 memory, 2 disk, 3 backend) | len u32 BE | crc32c u32 BE | body
//!           body = the block's bytes when ok (crc32c covers them), else a UTF-8 message
//! ```
//!
//! Every length is checked against a limit before anything is allocated, and the decoder never
//! panics on any input (property-tested here; `proto/fuzz` has a cargo-fuzz target). A receiver
//! verifies the CRC32C of every block before using it.

use crate::{ApiError, Block, ObjectRef, pb};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

pub const REQUEST_MAGIC: &[u8; 4] = b"GRQ1";
pub const RESPONSE_MAGIC: &[u8; 4] = b"GRS2";
/// Largest request payload accepted (an object reference is a few hundred bytes).
pub const MAX_REQUEST: usize = 64 << 10;
/// Largest response body accepted: the largest block.
pub const MAX_BODY: usize = granary_core::BlockSize::MAX as usize;
const REQUEST_HEADER: usize = 9;
pub const RESPONSE_HEADER: usize = 14;
/// The highest status code (`ApiError` kinds 1-9).
const MAX_STATUS: u8 = 9;
const KIND_READ_BLOCK: u8 = 1;
const KIND_READ_HELD: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:?}")]
    BadMagic([u8; 4]),
    #[error("unknown request kind {0}")]
    UnknownKind(u8),
    #[error("unknown response status {0}")]
    UnknownStatus(u8),
    #[error("frame length {len} exceeds the limit of {limit} bytes")]
    TooLong { len: usize, limit: usize },
    #[error("malformed request payload: {0}")]
    BadPayload(String),
    #[error("block checksum mismatch (expected {expected:08x}, got {actual:08x})")]
    Checksum { expected: u32, actual: u32 },
    #[error("stream ended inside a frame")]
    Truncated,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBlock {
    pub object: ObjectRef,
    pub index: u64,
    /// Answer only from the server's own cache (`NotFound` when it does not hold the block),
    /// never fetching it: how a client asks its local worker before going to the owner.
    pub held_only: bool,
}

pub fn encode_request(req: &ReadBlock, out: &mut BytesMut) {
    let msg = pb::ReadBlockRequest {
        object: Some((&req.object).into()),
        index: req.index,
    };
    let len = msg.encoded_len();
    out.reserve(REQUEST_HEADER + len);
    out.put_slice(REQUEST_MAGIC);
    out.put_u8(if req.held_only {
        KIND_READ_HELD
    } else {
        KIND_READ_BLOCK
    });
    out.put_u32(len as u32);
    msg.encode(out).expect("reserved");
}

/// Decodes one request from the front of `buf`: `Ok(None)` when more bytes are needed.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<ReadBlock>, FrameError> {
    if buf.len() < REQUEST_HEADER {
        return check_prefix(buf, REQUEST_MAGIC).map(|()| None);
    }
    let magic: [u8; 4] = buf[..4].try_into().expect("4 bytes");
    if &magic != REQUEST_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let held_only = match buf[4] {
        KIND_READ_BLOCK => false,
        KIND_READ_HELD => true,
        other => return Err(FrameError::UnknownKind(other)),
    };
    let len = u32::from_be_bytes(buf[5..9].try_into().expect("4 bytes")) as usize;
    if len > MAX_REQUEST {
        return Err(FrameError::TooLong {
            len,
            limit: MAX_REQUEST,
        });
    }
    if buf.len() < REQUEST_HEADER + len {
        return Ok(None);
    }
    buf.advance(REQUEST_HEADER);
    let payload = buf.split_to(len);
    let msg = pb::ReadBlockRequest::decode(payload.freeze())
        .map_err(|e| FrameError::BadPayload(e.to_string()))?;
    let object = msg
        .object
        .ok_or_else(|| FrameError::BadPayload("no object".into()))?;
    Ok(Some(ReadBlock {
        object: object.into(),
        index: msg.index,
        held_only,
    }))
}

fn status_of(e: &ApiError) -> u8 {
    match e {
        ApiError::NotFound(_) => 1,
        ApiError::NotADirectory(_) => 2,
        ApiError::Stale(_) => 3,
        ApiError::Unavailable(_) => 4,
        ApiError::Invalid(_) => 5,
        ApiError::Corrupt(_) => 6,
        ApiError::Internal(_) => 7,
        ApiError::Denied(_) => 8,
        ApiError::Exhausted(_) => 9,
    }
}

fn error_of(status: u8, message: String) -> Result<ApiError, FrameError> {
    Ok(match status {
        1 => ApiError::NotFound(message),
        2 => ApiError::NotADirectory(message),
        3 => ApiError::Stale(message),
        4 => ApiError::Unavailable(message),
        5 => ApiError::Invalid(message),
        6 => ApiError::Corrupt(message),
        7 => ApiError::Internal(message),
        8 => ApiError::Denied(message),
        9 => ApiError::Exhausted(message),
        other => return Err(FrameError::UnknownStatus(other)),
    })
}

/// The response header for `result`; for a block, the body to send after it is `block.data`.
pub fn encode_response_header(
    result: &Result<Block, ApiError>,
    out: &mut BytesMut,
) -> Option<Bytes> {
    out.put_slice(RESPONSE_MAGIC);
    match result {
        Ok(block) => {
            out.put_u8(0);
            out.put_u8(block.origin.code());
            out.put_u32(block.data.len() as u32);
            out.put_u32(block.crc32c);
            Some(block.data.clone())
        }
        Err(e) => {
            let message = e.to_string();
            let message = &message.as_bytes()[..message.len().min(MAX_REQUEST)];
            out.put_u8(status_of(e));
            out.put_u8(0);
            out.put_u32(message.len() as u32);
            out.put_u32(0);
            out.put_slice(message);
            None
        }
    }
}

/// The body length a response announces, once `buf` holds its header.
pub fn response_body_len(buf: &[u8]) -> Option<usize> {
    (buf.len() >= RESPONSE_HEADER)
        .then(|| u32::from_be_bytes(buf[6..10].try_into().expect("4 bytes")) as usize)
}

/// The body length a response announces once `buf` holds its header, refused when over what it
/// may be: `max_block` (the largest block the caller expects, at most [`MAX_BODY`]) for a block,
/// [`MAX_REQUEST`] for an error message. Call it before reserving room for the body.
pub fn checked_body_len(buf: &[u8], max_block: usize) -> Result<Option<usize>, FrameError> {
    let Some(len) = response_body_len(buf) else {
        return Ok(None);
    };
    let limit = if buf[4] == 0 {
        max_block.min(MAX_BODY)
    } else {
        MAX_REQUEST
    };
    if len > limit {
        return Err(FrameError::TooLong { len, limit });
    }
    Ok(Some(len))
}

/// Decodes one response from the front of `buf`, verifying a block's checksum.
pub fn decode_response(buf: &mut BytesMut) -> Result<Option<Result<Block, ApiError>>, FrameError> {
    decode_response_within(buf, MAX_BODY)
}

/// [`decode_response`] for a caller that expects blocks of at most `max_block` bytes: a longer
/// one is refused as soon as its header is in, before anything is reserved for it.
pub fn decode_response_within(
    buf: &mut BytesMut,
    max_block: usize,
) -> Result<Option<Result<Block, ApiError>>, FrameError> {
    decode_response_checked(buf, max_block, None)
}

/// [`decode_response_within`] for a receiver that computed the CRC32C of the body as its bytes
/// came in (`body_crc`: of the `len` bytes after the header, none other), so the block is not
/// read again to verify it. `None`: computed here.
pub fn decode_response_checked(
    buf: &mut BytesMut,
    max_block: usize,
    body_crc: Option<u32>,
) -> Result<Option<Result<Block, ApiError>>, FrameError> {
    if buf.len() < RESPONSE_HEADER {
        return check_prefix(buf, RESPONSE_MAGIC).map(|()| None);
    }
    let magic: [u8; 4] = buf[..4].try_into().expect("4 bytes");
    if &magic != RESPONSE_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let status = buf[4];
    let origin = crate::Origin::from_code(buf[5]);
    let len = u32::from_be_bytes(buf[6..10].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_be_bytes(buf[10..14].try_into().expect("4 bytes"));
    let limit = if status == 0 {
        max_block.min(MAX_BODY)
    } else {
        MAX_REQUEST
    };
    if len > limit {
        return Err(FrameError::TooLong { len, limit });
    }
    if status > MAX_STATUS {
        return Err(FrameError::UnknownStatus(status));
    }
    if buf.len() < RESPONSE_HEADER + len {
        buf.reserve(RESPONSE_HEADER + len - buf.len());
        return Ok(None);
    }
    buf.advance(RESPONSE_HEADER);
    let body = buf.split_to(len).freeze();
    if status != 0 {
        let message = String::from_utf8_lossy(&body).into_owned();
        return error_of(status, message).map(|e| Some(Err(e)));
    }
    let block = Block {
        data: body,
        crc32c: crc,
        origin,
    };
    let actual = body_crc.unwrap_or_else(|| granary_core::object::checksum(&block.data));
    if actual != crc {
        return Err(FrameError::Checksum {
            expected: crc,
            actual,
        });
    }
    Ok(Some(Ok(block)))
}

/// Rejects a partial header early when the bytes seen so far cannot start a frame.
fn check_prefix(buf: &BytesMut, magic: &[u8; 4]) -> Result<(), FrameError> {
    let n = buf.len().min(4);
    if buf[..n] != magic[..n] {
        let mut seen = [0u8; 4];
        seen[..n].copy_from_slice(&buf[..n]);
        return Err(FrameError::BadMagic(seen));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_core::ObjectId;
    use proptest::prelude::*;

    fn object() -> ObjectRef {
        ObjectRef {
            mount: 2,
            id: ObjectId {
                backend: "s3://b/p".into(),
                key: "ü/x".into(),
                size: 123,
                etag: Some("\"e\"".into()),
                version: None,
                mtime_ns: 9,
            },
        }
    }

    #[test]
    fn requests_round_trip_in_pieces() {
        for held_only in [false, true] {
            let req = ReadBlock {
                object: object(),
                index: 7,
                held_only,
            };
            let mut whole = BytesMut::new();
            encode_request(&req, &mut whole);
            let mut buf = BytesMut::new();
            for (i, b) in whole.iter().enumerate() {
                buf.put_u8(*b);
                let got = decode_request(&mut buf).unwrap();
                if i + 1 < whole.len() {
                    assert!(got.is_none());
                } else {
                    assert_eq!(got, Some(req.clone()));
                }
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn responses_round_trip_and_checksums_are_checked() {
        let block = Block::new(Bytes::from_static(b"hello block"));
        let mut buf = BytesMut::new();
        let body = encode_response_header(&Ok(block.clone()), &mut buf).unwrap();
        buf.put_slice(&body);
        let got = decode_response(&mut buf).unwrap().unwrap().unwrap();
        assert_eq!(got.data, block.data);
        // Where the worker found it travels with it.
        let mut buf = BytesMut::new();
        let from_disk = block.clone().with_origin(crate::Origin::Disk);
        let body = encode_response_header(&Ok(from_disk), &mut buf).unwrap();
        buf.put_slice(&body);
        let got = decode_response(&mut buf).unwrap().unwrap().unwrap();
        assert_eq!(got.origin, crate::Origin::Disk);

        let mut bad = BytesMut::new();
        let body = encode_response_header(&Ok(block), &mut bad).unwrap();
        bad.put_slice(&body);
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert!(matches!(
            decode_response(&mut bad),
            Err(FrameError::Checksum { .. })
        ));

        let mut err = BytesMut::new();
        assert!(
            encode_response_header(&Err(ApiError::Stale("changed".into())), &mut err).is_none()
        );
        assert_eq!(
            decode_response(&mut err).unwrap().unwrap().unwrap_err(),
            ApiError::Stale("stale: changed".into())
        );
    }

    #[test]
    fn rejects_oversize_and_garbage_before_allocating() {
        let mut huge = BytesMut::from(&b"GRQ1\x01\xff\xff\xff\xff"[..]);
        assert!(matches!(
            decode_request(&mut huge),
            Err(FrameError::TooLong { .. })
        ));
        let mut huge = BytesMut::from(&b"GRS2\x00\x01\xff\xff\xff\xff\0\0\0\0"[..]);
        assert!(matches!(
            decode_response(&mut huge),
            Err(FrameError::TooLong { .. })
        ));
        assert!(huge.capacity() < 1 << 20);
        let mut garbage = BytesMut::from(&b"HTTP/1.1 200"[..]);
        assert!(matches!(
            decode_request(&mut garbage),
            Err(FrameError::BadMagic(_))
        ));
        let mut early = BytesMut::from(&b"GX"[..]);
        assert!(matches!(
            decode_response(&mut early),
            Err(FrameError::BadMagic(_))
        ));
        let mut kind = BytesMut::from(&b"GRQ1\x09\0\0\0\0"[..]);
        assert!(matches!(
            decode_request(&mut kind),
            Err(FrameError::UnknownKind(9))
        ));
        let mut payload = BytesMut::from(&b"GRQ1\x01\0\0\0\x03\xff\xff\xff"[..]);
        assert!(matches!(
            decode_request(&mut payload),
            Err(FrameError::BadPayload(_))
        ));
    }

    #[test]
    fn a_body_over_the_callers_block_size_is_refused_from_the_header() {
        let block = Block::new(Bytes::from(vec![7u8; 5000]));
        let mut buf = BytesMut::new();
        let body = encode_response_header(&Ok(block), &mut buf).unwrap();
        assert_eq!(
            checked_body_len(&buf[..RESPONSE_HEADER - 1], 4096),
            Ok(None)
        );
        assert_eq!(checked_body_len(&buf, 8192), Ok(Some(5000)));
        assert_eq!(
            checked_body_len(&buf, 4096),
            Err(FrameError::TooLong {
                len: 5000,
                limit: 4096
            })
        );
        // Refused from the header alone, before the body arrives or is reserved.
        let mut header = buf.clone();
        assert!(matches!(
            decode_response_within(&mut header, 4096),
            Err(FrameError::TooLong { .. })
        ));
        assert!(header.capacity() < 4096);
        buf.put_slice(&body);
        let got = decode_response_within(&mut buf, 8192).unwrap().unwrap();
        assert_eq!(got.unwrap().data.len(), 5000);
        // An error message is bounded by MAX_REQUEST, whatever the block size.
        let mut err = BytesMut::from(&b"GRS2\x05\x00\xff\xff\xff\xff\0\0\0\0"[..]);
        assert!(matches!(
            checked_body_len(&err, MAX_BODY),
            Err(FrameError::TooLong {
                limit: MAX_REQUEST,
                ..
            })
        ));
        assert!(decode_response_within(&mut err, MAX_BODY).is_err());
    }

    #[test]
    fn a_checksum_computed_on_arrival_is_checked_against_the_header() {
        let block = Block::new(Bytes::from(vec![3u8; 5000]));
        let mut buf = BytesMut::new();
        let body = encode_response_header(&Ok(block.clone()), &mut buf).unwrap();
        buf.put_slice(&body);
        let mut right = buf.clone();
        let got = decode_response_checked(&mut right, MAX_BODY, Some(block.crc32c));
        assert_eq!(got.unwrap().unwrap().unwrap().data, block.data);
        assert!(matches!(
            decode_response_checked(&mut buf, MAX_BODY, Some(block.crc32c ^ 1)),
            Err(FrameError::Checksum { .. })
        ));
    }

    proptest! {
        /// Any bytes: the decoders answer (a frame, "need more", or an error) and never panic.
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512), prefix in 0usize..3) {
            let mut bytes = BytesMut::new();
            match prefix {
                0 => bytes.put_slice(REQUEST_MAGIC),
                1 => bytes.put_slice(RESPONSE_MAGIC),
                _ => {}
            }
            bytes.put_slice(&data);
            let _ = decode_request(&mut bytes.clone());
            let _ = decode_response(&mut bytes);
        }
    }
}
