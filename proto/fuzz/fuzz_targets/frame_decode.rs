//! Fuzz the data-plane frame decoders: any input must decode, ask for more, or fail cleanly.
//! Run: `cargo +nightly fuzz run frame_decode` in proto/ (needs cargo-fuzz and a nightly toolchain).
#![no_main]

use bytes::BytesMut;
use granary_proto::frame::{decode_request, decode_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = decode_request(&mut buf) {}
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = decode_response(&mut buf) {}
});
