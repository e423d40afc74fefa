//! Transparent compression of large string values (per-cluster option).
//!
//! A compressed value is stored as `MAGIC algo payload`. Any raw value that
//! happens to begin with `MAGIC` is stored wrapped (`MAGIC 'N' value`), so
//! reading is unambiguous: every stored value starting with `MAGIC` was
//! written by the proxy. Commands that would see or edit the stored bytes
//! (APPEND, GETRANGE, STRLEN, SETRANGE, bit operations…) are refused while
//! compression is on, rather than return wrong answers.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use redmesh_model::Compression;
use redmesh_resp::{parse_frame, Frame, Protocol, Request};

use crate::routing::Serving;

/// Marks a value written by the proxy.
const MAGIC: &[u8; 4] = b"\xffRMC";
const LZ4: u8 = b'L';
const ZSTD: u8 = b'Z';
const STORED: u8 = b'N';
/// Largest value decompression will produce (Redis's own bulk limit).
const MAX_VALUE: usize = 512 * 1024 * 1024;

/// Why a command is refused while compression is on, if it is.
pub fn refused(top: &str) -> Option<String> {
    matches!(
        top,
        "append"
            | "getrange"
            | "setrange"
            | "strlen"
            | "substr"
            | "bitcount"
            | "bitfield"
            | "bitfield_ro"
            | "bitop"
            | "bitpos"
            | "getbit"
            | "setbit"
            | "lcs"
    )
    .then(|| format!("ERR '{top}' is not available while value compression is on for this cluster"))
}

/// Whether a command's reply may carry stored string values.
pub fn has_values(top: &str) -> bool {
    matches!(
        top,
        "get"
            | "getdel"
            | "getex"
            | "getset"
            | "mget"
            | "set"
            | "exec"
            | "eval"
            | "evalsha"
            | "eval_ro"
            | "evalsha_ro"
            | "fcall"
            | "fcall_ro"
    )
}

/// Argument positions of the values a write command stores.
fn value_positions(top: &str, argc: usize) -> Vec<usize> {
    match top {
        "set" | "setnx" | "getset" if argc > 2 => vec![2],
        "setex" | "psetex" if argc > 3 => vec![3],
        "mset" | "msetnx" => (2..argc).step_by(2).collect(),
        _ => Vec::new(),
    }
}

/// Encodes one value for storage.
/// Bytes of values at or above the threshold, before (`stage="raw"`) and
/// after (`stage="stored"`) compression.
pub const COMPRESSION_BYTES: &str = "redmesh_proxy_compression_bytes_total";

pub fn encode(value: &[u8], algo: Compression, threshold: usize) -> Option<Bytes> {
    let wrap = |tag: u8, payload: &[u8]| {
        let mut out = BytesMut::with_capacity(MAGIC.len() + 1 + payload.len());
        out.put_slice(MAGIC);
        out.put_u8(tag);
        out.put_slice(payload);
        out.freeze()
    };
    if value.len() >= threshold && algo != Compression::None {
        let (tag, packed) = match algo {
            Compression::Lz4 => (LZ4, lz4_flex::compress_prepend_size(value)),
            Compression::Zstd => (ZSTD, zstd::bulk::compress(value, 1).ok()?),
            Compression::None => return None,
        };
        // Every value the cluster would compress counts, stored compressed
        // or not: the ratio says what compression saves overall.
        metrics::counter!(COMPRESSION_BYTES, "stage" => "raw").increment(value.len() as u64);
        if packed.len() + MAGIC.len() + 1 < value.len() {
            metrics::counter!(COMPRESSION_BYTES, "stage" => "stored")
                .increment((packed.len() + MAGIC.len() + 1) as u64);
            return Some(wrap(tag, &packed));
        }
        metrics::counter!(COMPRESSION_BYTES, "stage" => "stored").increment(value.len() as u64);
    }
    // Kept as is, unless it could be mistaken for a compressed value.
    value.starts_with(MAGIC).then(|| wrap(STORED, value))
}

/// Decodes a stored value (values without the header are returned as is).
pub fn decode(value: &Bytes) -> Result<Bytes, String> {
    let Some(rest) = value.strip_prefix(MAGIC.as_slice()) else {
        return Ok(value.clone());
    };
    let Some((&tag, payload)) = rest.split_first() else {
        return Err("truncated compressed value".into());
    };
    match tag {
        STORED => Ok(value.slice(MAGIC.len() + 1..)),
        LZ4 => {
            let size = payload
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
            if size.is_none_or(|n| n > MAX_VALUE) {
                return Err("corrupt lz4 value".into());
            }
            lz4_flex::decompress_size_prepended(payload)
                .map(Bytes::from)
                .map_err(|e| format!("corrupt lz4 value: {e}"))
        }
        ZSTD => zstd::bulk::decompress(payload, MAX_VALUE)
            .map(Bytes::from)
            .map_err(|e| format!("corrupt zstd value: {e}")),
        other => Err(format!("unknown compression tag {other}")),
    }
}

/// The request to send: with large values compressed when the cluster
/// compresses, else the request itself.
pub fn request<'a>(c: &Serving, top: &str, req: &'a Request) -> Cow<'a, Request> {
    if c.compression == Compression::None {
        return Cow::Borrowed(req);
    }
    let positions = value_positions(top, req.args().len());
    let mut args: Option<Vec<Bytes>> = None;
    for p in positions {
        if let Some(encoded) = encode(&req.args()[p], c.compression, c.compression_threshold) {
            args.get_or_insert_with(|| req.args().to_vec())[p] = encoded;
        }
    }
    match args {
        Some(a) => Cow::Owned(Request::from_args(&a)),
        None => Cow::Borrowed(req),
    }
}

fn decode_frame(f: Frame) -> Frame {
    match f {
        Frame::Bulk(b) if b.starts_with(MAGIC) => match decode(&b) {
            Ok(v) => Frame::Bulk(v),
            Err(e) => Frame::error(format!("ERR stored value cannot be decompressed: {e}")),
        },
        Frame::Array(items) => Frame::Array(items.into_iter().map(decode_frame).collect()),
        Frame::Set(items) => Frame::Set(items.into_iter().map(decode_frame).collect()),
        Frame::Push(items) => Frame::Push(items.into_iter().map(decode_frame).collect()),
        Frame::Map(pairs) => Frame::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (k, decode_frame(v)))
                .collect(),
        ),
        other => other,
    }
}

/// Decompresses every compressed value in a raw reply; replies without any
/// are returned untouched (no parse).
pub fn decompress_reply(raw: Bytes, proto: Protocol) -> Bytes {
    if !raw.windows(MAGIC.len()).any(|w| w == MAGIC) {
        return raw;
    }
    match parse_frame(&raw) {
        Ok(Some((f, _))) => decode_frame(f).to_bytes(proto),
        _ => raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_escapes() {
        let big = Bytes::from(vec![b'a'; 4096]);
        for algo in [Compression::Lz4, Compression::Zstd] {
            let stored = encode(&big, algo, 256).expect("compressed");
            assert!(stored.len() < 200, "{algo:?}: {}", stored.len());
            assert_eq!(decode(&stored).unwrap(), big);
        }
        // Small values stay as they are.
        assert_eq!(encode(b"small", Compression::Lz4, 256), None);
        // A raw value that looks like ours is wrapped, and unwrapped exactly.
        let tricky = Bytes::from([MAGIC.as_slice(), b"Lnot really"].concat());
        let stored = encode(&tricky, Compression::Lz4, 256).expect("wrapped");
        assert_eq!(decode(&stored).unwrap(), tricky);
        // Incompressible data is not grown.
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        assert!(encode(&noise, Compression::Lz4, 256).is_none_or(|s| s.len() <= noise.len()));
        // Corrupt data is an error, not a panic or a huge allocation.
        let corrupt = Bytes::from([MAGIC.as_slice(), b"L\xff\xff\xff\x7fgarbage"].concat());
        assert!(decode(&corrupt).is_err());
    }

    #[test]
    fn replies_are_decompressed_in_place() {
        let big = Bytes::from(vec![b'z'; 1000]);
        let stored = encode(&big, Compression::Zstd, 100).unwrap();
        let reply = Frame::Array(vec![Frame::Bulk(stored), Frame::Null, Frame::bulk("plain")])
            .to_bytes(Protocol::Resp2);
        let out = decompress_reply(reply, Protocol::Resp2);
        let expected = Frame::Array(vec![Frame::Bulk(big), Frame::Null, Frame::bulk("plain")])
            .to_bytes(Protocol::Resp2);
        assert_eq!(out, expected);
    }
}
