//! Fuzzes `parse_frame` and `Frame::to_bytes`: any frame parsed from arbitrary bytes, re-encoded
//! for RESP3 and for RESP2, parses back to the same frame modulo each protocol's documented
//! downgrade (the `resp3_view` / `resp2_view` of `libs/resp/tests/properties.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use redmesh_resp::{parse_frame, Frame, Protocol};

/// RESP3 has one null: `NullArray` (`*-1`) is written `_` and reads back as `Null`.
fn resp3_view(f: &Frame) -> Frame {
    let all = |v: &[Frame]| v.iter().map(resp3_view).collect();
    match f {
        Frame::NullArray => Frame::Null,
        Frame::Array(v) => Frame::Array(all(v)),
        Frame::Set(v) => Frame::Set(all(v)),
        Frame::Push(v) => Frame::Push(all(v)),
        Frame::Map(p) => Frame::Map(
            p.iter()
                .map(|(k, v)| (resp3_view(k), resp3_view(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// RESP2 flattens maps, turns sets and pushes into arrays, booleans into integers, and doubles,
/// big numbers and verbatim strings into bulk strings; an error holding CRLF (from a `!` blob
/// error) gets spaces for CR and LF, as Redis writes errors.
fn resp2_view(f: &Frame) -> Frame {
    let all = |v: &[Frame]| v.iter().map(resp2_view).collect();
    match f {
        Frame::Array(v) | Frame::Set(v) | Frame::Push(v) => Frame::Array(all(v)),
        Frame::Map(p) => Frame::Array(
            p.iter()
                .flat_map(|(k, v)| [resp2_view(k), resp2_view(v)])
                .collect(),
        ),
        Frame::Boolean(b) => Frame::Integer(i64::from(*b)),
        Frame::Double(t) | Frame::BigNumber(t) | Frame::Verbatim(_, t) => Frame::Bulk(t.clone()),
        Frame::Error(e) if e.windows(2).any(|w| w == b"\r\n") => Frame::Error(
            e.iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b })
                .collect(),
        ),
        other => other.clone(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(Some((frame, len))) = parse_frame(data) else {
        return;
    };
    assert!(0 < len && len <= data.len());
    for (proto, view) in [
        (Protocol::Resp3, resp3_view(&frame)),
        (Protocol::Resp2, resp2_view(&frame)),
    ] {
        let bytes = frame.to_bytes(proto);
        assert_eq!(
            parse_frame(&bytes),
            Ok(Some((view, bytes.len()))),
            "{proto:?}: {bytes:?}"
        );
    }
});
