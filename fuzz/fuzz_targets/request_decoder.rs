//! Fuzzes `RequestDecoder` with arbitrary client bytes in arbitrary chunks under small `Limits`.
//!
//! Input: byte 0 picks the limits, bytes 1..4 the chunk sizes (cycled; 0 = all the rest), the
//! remainder is the stream. Checked, as in `libs/resp/tests/properties.rs`: no panic, every
//! request consumes bytes and its `raw()` decodes to itself, `Ok(None)` keeps at most
//! `retained_bound` bytes, one call reserves at most `min(max_bulk_len + 2, 1 MB)` beyond
//! Vec-style doubling, and the outcome does not depend on the split.
#![no_main]

#[path = "common/split.rs"]
mod split;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use redmesh_resp::{Limits, Request, RequestDecoder};

const fn limits(max_bulk_len: usize, max_multibulk_len: usize, max_inline_len: usize) -> Limits {
    Limits {
        max_bulk_len,
        max_multibulk_len,
        max_inline_len,
        max_depth: 8,
    }
}

/// Small limits, so inputs of a few KB hit them. The inline limit stays at or above 24 (the
/// longest header `parse_int` accepts plus CRLF), else "too long" would depend on the split.
const LIMITS: [Limits; 4] = [
    limits(1024, 64, 256),
    limits(16, 4, 32),
    limits(1, 1, 24),
    limits(64, 8, 300),
];

/// Same bound as `retained_bound` in `libs/resp/tests/properties.rs`.
fn retained_bound(l: &Limits) -> usize {
    l.max_inline_len + l.max_multibulk_len * (l.max_bulk_len + 32)
}

/// Requests decoded, then the unconsumed tail or `Err(())` at the first protocol error.
type Outcome = (Vec<Request>, Result<Vec<u8>, ()>);

fn decode<'a>(limits: Limits, chunks: impl Iterator<Item = &'a [u8]>) -> Outcome {
    let mut d = RequestDecoder::new(limits);
    let mut pending = Vec::new();
    let mut requests = Vec::new();
    for chunk in chunks {
        pending.extend_from_slice(chunk);
        loop {
            // A fresh, exactly sized buffer per call, so its capacity shows what the call reserved.
            let mut buf = BytesMut::from(&pending[..]);
            let result = d.decode_request(&mut buf);
            let allowed = 2 * pending.len() + (limits.max_bulk_len + 2).min(1 << 20) + 64;
            assert!(
                buf.capacity() <= allowed,
                "reserved {} > {allowed}",
                buf.capacity()
            );
            match result {
                Err(_) => return (requests, Err(())),
                Ok(Some(req)) => {
                    assert!(buf.len() < pending.len() && !req.args().is_empty());
                    let mut raw = BytesMut::from(&req.raw()[..]);
                    let again = RequestDecoder::default().decode_request(&mut raw);
                    assert_eq!(
                        again,
                        Ok(Some(req.clone())),
                        "raw() is not what was understood"
                    );
                    assert!(raw.is_empty(), "raw() holds more than one request");
                    requests.push(req);
                    pending = buf.to_vec();
                }
                Ok(None) => {
                    assert!(
                        buf.len() <= retained_bound(&limits),
                        "kept {} bytes",
                        buf.len()
                    );
                    pending = buf.to_vec();
                    break;
                }
            }
        }
    }
    (requests, Ok(pending))
}

fuzz_target!(|data: &[u8]| {
    split::same_outcome_at_any_split(data, &LIMITS, |l, chunks| decode(l, chunks));
});
