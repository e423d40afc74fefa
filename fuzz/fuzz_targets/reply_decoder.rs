//! Fuzzes `ReplyDecoder` (RESP2 and RESP3 replies) with arbitrary server bytes in arbitrary chunks.
//!
//! Input: byte 0 picks the limits, bytes 1..4 the chunk sizes (cycled; 0 = all the rest), the
//! remainder is the stream. Checked: no panic; every reply is a non-empty prefix of what was
//! buffered; whatever `parse_frame` makes of a reply spans all of it (it may only fail, as it
//! checks more than the boundaries); and the outcome does not depend on the split. The decoder
//! never buffers on its own (it only scans and splits the caller's buffer) and its nesting stack
//! is capped by `max_depth`.
#![no_main]

#[path = "common/split.rs"]
mod split;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use redmesh_resp::{parse_frame, Limits, ReplyDecoder};

const fn limits(max_bulk_len: usize, max_depth: usize) -> Limits {
    Limits {
        max_bulk_len,
        max_multibulk_len: 64,
        max_inline_len: 256,
        max_depth,
    }
}

const LIMITS: [Limits; 4] = [
    limits(1024, 8),
    limits(16, 2),
    limits(1, 1),
    limits(512 << 20, 128),
];

/// Replies found, then the unconsumed tail or `Err(())` at the first protocol error.
type Outcome = (Vec<Bytes>, Result<Vec<u8>, ()>);

fn decode<'a>(limits: Limits, chunks: impl Iterator<Item = &'a [u8]>) -> Outcome {
    let mut d = ReplyDecoder::new(limits);
    let mut buf = BytesMut::new();
    let mut replies = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            // What `Decoder::decode` does: scan, then split the reply off.
            match d.scan(&buf) {
                Err(_) => return (replies, Err(())),
                Ok(None) => break,
                Ok(Some(len)) => {
                    assert!(
                        0 < len && len <= buf.len(),
                        "reply of {len} bytes in {}",
                        buf.len()
                    );
                    let reply = buf.split_to(len).freeze();
                    if let Ok(Some((_, len))) = parse_frame(&reply) {
                        assert_eq!(len, reply.len(), "parse_frame and scan disagree");
                    }
                    replies.push(reply);
                }
            }
        }
    }
    (replies, Ok(buf.to_vec()))
}

fuzz_target!(|data: &[u8]| {
    split::same_outcome_at_any_split(data, &LIMITS, |l, chunks| decode(l, chunks));
});
