//! Property tests for the RESP codec: encoding (`Frame::encode`,
//! `encode_command`) against decoding (`parse_frame`, `ReplyDecoder`,
//! `RequestDecoder`), resumability under arbitrary splits, and the promises
//! `decode.rs` makes about hostile input (no panics, progress, memory bounded
//! by the configured `Limits`).
//!
//! The case count is modest (256 by default) so the file stays fast in a
//! debug build; set `PROPTEST_CASES` for a longer soak. Failures are not
//! persisted to `proptest-regressions/`: every real bug these properties
//! found is pinned below as a plain `#[test]` with its minimal input, which
//! is the record we want to keep.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use redmesh_resp::{
    encode_command, parse_frame, Frame, Limits, Protocol, ReplyDecoder, Request, RequestDecoder,
};
use tokio_util::codec::Decoder;

const DEFAULT_CASES: u32 = 256;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Bytes biased towards the ones that matter to RESP framing, so CR, LF and
/// `:` show up inside payloads far more often than 3/256 of the time.
fn edge_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        6 => any::<u8>(),
        1 => Just(b'\r'),
        1 => Just(b'\n'),
        1 => Just(b':'),
    ]
}

/// Payload of a line type (`+`, `-`, `,`, `(`): anything but the `\r\n`
/// terminator. A lone CR or LF (even a trailing CR, giving `\r\r\n`) is
/// framed correctly by the first-CRLF rule, so those are kept.
fn line_text() -> impl Strategy<Value = Bytes> {
    vec(edge_byte(), 0..16).prop_map(|mut v| {
        for i in 1..v.len() {
            if v[i - 1] == b'\r' && v[i] == b'\n' {
                v[i] = b' ';
            }
        }
        Bytes::from(v)
    })
}

fn blob() -> impl Strategy<Value = Bytes> {
    vec(edge_byte(), 0..48).prop_map(Bytes::from)
}

/// Integers with the boundaries spelled out (uniform `i64`s never hit them).
/// `i64::MIN` is deliberately absent: `parse_frame` cannot read it back, see
/// `bug_integer_reply_i64_min_does_not_parse`.
fn integer() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => any::<i64>(),
        1 => Just(0),
        1 => Just(-1),
        1 => Just(i64::MAX),
        1 => Just(i64::MIN + 1),
    ]
}

/// A verbatim string's format: exactly 3 bytes without `:`, because
/// `parse_frame` recognises `=` payloads as verbatim only when the first `:`
/// is at offset 3 (anything else is read back as a plain bulk string).
fn verbatim_format() -> impl Strategy<Value = Bytes> {
    vec(
        any::<u8>().prop_filter("no ':' in format", |b| *b != b':'),
        3,
    )
    .prop_map(Bytes::from)
}

/// Frames every RESP version can express.
fn resp2_leaf() -> impl Strategy<Value = Frame> {
    prop_oneof![
        line_text().prop_map(Frame::Simple),
        line_text().prop_map(Frame::Error),
        integer().prop_map(Frame::Integer),
        blob().prop_map(Frame::Bulk),
        Just(Frame::Null),
        Just(Frame::NullArray),
    ]
}

/// RESP2-only frames: the leaves above nested in arrays, up to depth 4.
fn resp2_frame() -> impl Strategy<Value = Frame> {
    resp2_leaf().prop_recursive(4, 48, 6, |inner| vec(inner, 0..6).prop_map(Frame::Array))
}

/// Any frame, every variant, nested up to depth 4.
fn frame() -> impl Strategy<Value = Frame> {
    let leaf = prop_oneof![
        6 => resp2_leaf(),
        1 => any::<bool>().prop_map(Frame::Boolean),
        1 => line_text().prop_map(Frame::Double),
        1 => line_text().prop_map(Frame::BigNumber),
        1 => (verbatim_format(), blob()).prop_map(|(f, t)| Frame::Verbatim(f, t)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Frame::Array),
            vec((inner.clone(), inner.clone()), 0..4).prop_map(Frame::Map),
            vec(inner.clone(), 0..6).prop_map(Frame::Set),
            vec(inner, 0..6).prop_map(Frame::Push),
        ]
    })
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Resp2), Just(Protocol::Resp3)]
}

/// Arguments of a command: 1..20 arbitrary (binary) strings.
fn args() -> impl Strategy<Value = Vec<Vec<u8>>> {
    vec(vec(edge_byte(), 0..40), 1..20)
}

/// Chunk sizes to split a byte stream at (cycled; 1 means byte by byte).
fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        1 => Just(vec![1]),
        4 => vec(1usize..=64, 1..8),
    ]
}

/// Text for a length/count header: well-formed, negative, huge, overflowing,
/// with leading zeros, or junk.
fn num_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => (-2i64..24).prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => "0[0-9]{1,3}",
        1 => Just("-0".to_string()),
        1 => "[0-9]{19,21}",
        1 => "[-+ 0-9a-z]{0,4}",
    ]
    .boxed()
}

/// A pipelined item with the requests it must decode to.
#[derive(Debug, Clone)]
enum Item {
    /// `encode_command(args)`.
    Multibulk(Vec<Vec<u8>>),
    /// A line of plain tokens; decodes to the tokens, re-encoded as multibulk.
    Inline(Vec<String>, &'static str, &'static str),
    /// Bytes Redis skips without a reply: blank lines, `*0`, `*-1`.
    Noise(&'static str),
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        4 => vec(vec(edge_byte(), 0..24), 1..6).prop_map(Item::Multibulk),
        2 => (
            vec("[A-Za-z0-9_]{1,8}", 1..5),
            select(vec![" ", "\t", "  "]),
            select(vec!["\r\n", "\n"]),
        )
            .prop_map(|(t, sep, eol)| Item::Inline(t, sep, eol)),
        1 => select(vec!["\r\n", "\n", "  \t\r\n", "*0\r\n", "*-1\r\n"]).prop_map(Item::Noise),
    ]
}

impl Item {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Item::Multibulk(a) => encode(a),
            Item::Inline(t, sep, eol) => format!("{}{eol}", t.join(sep)).into_bytes(),
            Item::Noise(s) => s.as_bytes().to_vec(),
        }
    }

    fn expected(&self) -> Option<Request> {
        match self {
            Item::Multibulk(a) => Some(Request::from_args(a)),
            Item::Inline(t, _, _) => Some(Request::from_args(t)),
            Item::Noise(_) => None,
        }
    }
}

/// Request-side garbage built from RESP-looking pieces, so random inputs get
/// past the first byte and exercise the multibulk states.
fn hostile_requests() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => item().prop_map(|i| i.bytes()),
        2 => num_text().prop_map(|n| format!("*{n}\r\n").into_bytes()),
        3 => num_text().prop_map(|n| format!("${n}\r\n").into_bytes()),
        2 => vec(any::<u8>(), 0..64),
        1 => vec(any::<u8>(), 0..400),
        1 => Just(b"\r\n".to_vec()),
        1 => "[a-z\"' \\\\]{0,12}\r?\n".prop_map(String::into_bytes),
    ];
    let pieces = vec(piece, 0..24).prop_map(|p| p.concat());
    prop_oneof![
        1 => vec(any::<u8>(), 0..4096),
        3 => pieces.clone(),
        // Often without a prefix: garbage before the tail usually errors
        // out before the tail is reached.
        2 => (prop_oneof![Just(Vec::new()), pieces], unterminated_tail())
            .prop_map(|(p, t)| [p, t].concat()),
    ]
}

/// An input's end that never completes: a long inline line without `\n`, a
/// `*` count line or, inside a multibulk, a `$` length line without CRLF.
/// Only the length limits stop the decoder from buffering these forever,
/// and random concatenation almost never ends on one.
fn unterminated_tail() -> impl Strategy<Value = Vec<u8>> {
    (
        0..3u8,
        1usize..3,
        vec(vec(any::<u8>(), 0..8), 0..2),
        "[0-9a-z]{0,1500}",
    )
        .prop_map(|(kind, count, bulks, junk)| match kind {
            0 => junk.into_bytes(),
            1 => format!("*{junk}").into_bytes(),
            _ => {
                let mut v = format!("*{}\r\n", count + bulks.len()).into_bytes();
                for b in &bulks {
                    v.extend_from_slice(&encode(&[b])[4..]); // the bulk after `*1\r\n`
                }
                v.push(b'$');
                v.extend_from_slice(junk.as_bytes());
                v
            }
        })
}

/// Reply-side garbage: real encodings mixed with headers of every tag
/// (including `|` attributes and an invalid `?`) and random bytes.
fn hostile_replies() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => (frame(), protocol()).prop_map(|(f, p)| f.to_bytes(p).to_vec()),
        4 => (select(b"+-:$*%~>|#,_(=!?".to_vec()), num_text())
            .prop_map(|(t, n)| [&[t][..], n.as_bytes(), b"\r\n"].concat()),
        2 => vec(any::<u8>(), 0..32),
        1 => Just(b"\r\n".to_vec()),
    ];
    prop_oneof![
        1 => vec(any::<u8>(), 0..4096),
        3 => vec(piece, 0..24).prop_map(|p| p.concat()),
    ]
}

/// Small limits (the first is the example set of the test plan; the second
/// is tiny, so inputs of a few KB can actually exceed the memory bound if
/// the decoder ever kept more than it should), or random small ones.
fn small_limits() -> impl Strategy<Value = Limits> {
    let limits = |b, m, i| Limits {
        max_bulk_len: b,
        max_multibulk_len: m,
        max_inline_len: i,
        max_depth: 8,
    };
    prop_oneof![
        Just(limits(1024, 64, 256)),
        Just(limits(16, 4, 32)),
        // The inline limit also bounds header lines; keep it above the
        // longest header `parse_int` accepts (`-` + 19 digits), or whether a
        // header is "too long" would depend on how the bytes were split.
        (1usize..=64, 1usize..=8, 24usize..=300).prop_map(move |(b, m, i)| limits(b, m, i)),
    ]
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_command(args, &mut out);
    out.to_vec()
}

/// Splits `data` into chunks of the (cycled, clamped to >= 1) `sizes`.
fn split_by<'a>(data: &'a [u8], sizes: &'a [usize]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = data;
    let mut i = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = sizes[i % sizes.len()].clamp(1, rest.len());
        i += 1;
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// Sorted, deduplicated cut points strictly inside `0..len`.
fn cut_points(len: usize, idx: &[Index]) -> Vec<usize> {
    let mut cuts: Vec<usize> = if len == 0 {
        Vec::new()
    } else {
        idx.iter().map(|i| i.index(len)).collect()
    };
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// What a frame reads back as after a RESP3 round trip. The one legitimate
/// difference: RESP3 has a single null, so `NullArray` (RESP2's `*-1`) is
/// encoded as `_` and parsed as `Null`, at any depth.
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

/// What a frame reads back as after a RESP2 round trip: the downgrade
/// `Frame::encode` documents (the way Redis answers RESP2 clients).
/// Maps flatten to `[k1, v1, k2, v2, ..]`; sets and pushes become arrays;
/// booleans become integers 0/1; doubles, big numbers and verbatim strings
/// become bulk strings (verbatim loses its format). Nulls keep their kind:
/// `$-1` reads back as `Null`, `*-1` as `NullArray`.
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
        // A RESP2 error is one line: with a CRLF inside, CR and LF become
        // spaces, as Redis writes.
        Frame::Error(e) if e.windows(2).any(|w| w == b"\r\n") => Frame::Error(
            e.iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Upper bound on the bytes `RequestDecoder` may leave buffered while it
/// answers `Ok(None)`, derived from `decode_request`:
/// - waiting for an inline line or for the `*N` header's CRLF: at most
///   `max_inline_len` bytes, else it errors;
/// - inside a multibulk: the completed arguments (at most
///   `max_multibulk_len - 1` of them, each a header of at most 23 bytes,
///   since `parse_int` takes at most 20 characters, plus at most
///   `max_bulk_len + 2` bytes) plus either a pending bulk header (at most
///   `max_inline_len` bytes without CRLF) or a pending bulk body (less than
///   23 + `max_bulk_len` + 2 bytes), after a `*N` header of at most 23.
///
/// Everything above fits in `max_inline_len + max_multibulk_len *
/// (max_bulk_len + 32)`.
fn retained_bound(l: &Limits) -> usize {
    l.max_inline_len + l.max_multibulk_len * (l.max_bulk_len + 32)
}

/// How decoding a stream ended: the requests, then either the unconsumed
/// tail (`Ok`) or a protocol error (`Err`, the message is not compared since
/// it may legitimately differ with the split, e.g. "too big mbulk count
/// string" vs "invalid multibulk length").
#[derive(Debug, PartialEq)]
struct Outcome {
    requests: Vec<Request>,
    end: Result<Vec<u8>, ()>,
}

/// Feeds `chunks` to a fresh decoder, checking the per-call invariants of
/// `decode_request` on every call, and stops at the first error.
fn decode_stream<'a>(limits: Limits, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut d = RequestDecoder::new(limits);
    let mut buf = BytesMut::new();
    let mut requests = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.to_vec();
            match d.decode_request(&mut buf) {
                Err(_) => {
                    return Outcome {
                        requests,
                        end: Err(()),
                    }
                }
                Ok(Some(req)) => {
                    // Progress: it consumed a non-empty prefix, and the
                    // request has a name (`Request::name` indexes args[0]).
                    assert!(buf.len() < before.len(), "a request consumed nothing");
                    assert!(before.ends_with(&buf), "consumed something but a prefix");
                    assert!(!req.args().is_empty(), "request without arguments");
                    // What the proxy forwards means what it understood:
                    // `raw()` decodes on its own to the same request.
                    let mut raw = BytesMut::from(&req.raw()[..]);
                    let again = RequestDecoder::default().decode_request(&mut raw);
                    assert_eq!(again, Ok(Some(req.clone())));
                    assert!(raw.is_empty(), "raw() holds more than one request");
                    requests.push(req);
                }
                Ok(None) => {
                    // Asking for more is stable: without new bytes, asking
                    // again changes nothing.
                    let kept = buf.to_vec();
                    assert!(before.ends_with(&kept), "Ok(None) rewrote the buffer");
                    assert_eq!(d.decode_request(&mut buf), Ok(None));
                    assert_eq!(&buf[..], &kept[..], "a second Ok(None) consumed bytes");
                    // Bounded memory: what stays buffered is a request in
                    // progress, never more than the limits allow.
                    assert!(
                        buf.len() <= retained_bound(&limits),
                        "kept {} bytes, bound {} for {limits:?}",
                        buf.len(),
                        retained_bound(&limits)
                    );
                    break;
                }
            }
        }
    }
    Outcome {
        requests,
        end: Ok(buf.to_vec()),
    }
}

/// Scans `data` fed as growing prefixes (cut at `cuts`, then whole) with one
/// decoder; stops at the first answer that is not `Ok(None)`.
fn scan_prefixes(
    limits: Limits,
    data: &[u8],
    cuts: &[usize],
) -> Result<Option<usize>, redmesh_resp::ProtocolError> {
    let mut d = ReplyDecoder::new(limits);
    for &c in cuts.iter().chain(std::iter::once(&data.len())) {
        match d.scan(&data[..c]) {
            Ok(None) => continue,
            other => {
                if let Ok(Some(len)) = other {
                    assert!(len <= c, "frame of {len} bytes found in {c}");
                }
                return other;
            }
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------
// Properties: frames
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// RESP3 can express every frame: encoding then parsing gives the frame
    /// back (modulo `resp3_view`'s null normalisation) and consumes exactly
    /// the encoding, even with more replies behind it.
    #[test]
    fn resp3_round_trip(f in frame(), tail in frame()) {
        let bytes = f.to_bytes(Protocol::Resp3);
        prop_assert_eq!(parse_frame(&bytes), Ok(Some((resp3_view(&f), bytes.len()))));
        let mut two = bytes.to_vec();
        two.extend_from_slice(&tail.to_bytes(Protocol::Resp3));
        prop_assert_eq!(parse_frame(&two), Ok(Some((resp3_view(&f), bytes.len()))));
    }

    /// Frames made only of RESP2 types round-trip through RESP2 exactly
    /// (both nulls included: `$-1` and `*-1` keep their kind).
    #[test]
    fn resp2_round_trip(f in resp2_frame()) {
        let bytes = f.to_bytes(Protocol::Resp2);
        prop_assert_eq!(parse_frame(&bytes), Ok(Some((f, bytes.len()))));
    }

    /// Any frame sent to a RESP2 client reads back as its documented
    /// downgrade, and the downgrade is exactly what the encoder wrote.
    #[test]
    fn resp2_downgrade(f in frame()) {
        let bytes = f.to_bytes(Protocol::Resp2);
        let down = resp2_view(&f);
        prop_assert_eq!(&down.to_bytes(Protocol::Resp2), &bytes);
        prop_assert_eq!(parse_frame(&bytes), Ok(Some((down, bytes.len()))));
    }

    /// `ReplyDecoder::scan` finds the same boundary `parse_frame` does, and
    /// is resumable: fed growing prefixes cut at arbitrary points, it (and
    /// `parse_frame`) says "incomplete" until the last byte arrives, then
    /// gives the exact length, even with garbage behind the frame.
    #[test]
    fn scan_agrees_with_parse_at_any_split(
        f in frame(),
        proto in protocol(),
        cuts in vec(any::<Index>(), 0..8),
        garbage in vec(any::<u8>(), 0..8),
    ) {
        let bytes = f.to_bytes(proto);
        let (_, parsed) = parse_frame(&bytes).unwrap().unwrap();
        prop_assert_eq!(parsed, bytes.len());
        prop_assert_eq!(ReplyDecoder::default().scan(&bytes), Ok(Some(bytes.len())));

        let mut d = ReplyDecoder::default();
        for c in cut_points(bytes.len(), &cuts) {
            prop_assert_eq!(d.scan(&bytes[..c]), Ok(None), "prefix of {} bytes", c);
            prop_assert_eq!(parse_frame(&bytes[..c]), Ok(None), "prefix of {} bytes", c);
        }
        let mut more = bytes.to_vec();
        more.extend_from_slice(&garbage);
        prop_assert_eq!(d.scan(&more), Ok(Some(bytes.len())));
        // The decoder is reset after a hit: the next frame starts fresh.
        prop_assert_eq!(d.scan(&bytes), Ok(Some(bytes.len())));
    }

    /// A stream of replies read through the `Decoder` impl in arbitrary
    /// chunks comes out as the same replies, in order, byte for byte.
    #[test]
    fn reply_stream_in_chunks(
        frames in vec((frame(), protocol()), 1..8),
        sizes in chunk_sizes(),
    ) {
        let encoded: Vec<Bytes> = frames.iter().map(|(f, p)| f.to_bytes(*p)).collect();
        let stream = encoded.concat();
        let mut d = ReplyDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in split_by(&stream, &sizes) {
            buf.extend_from_slice(chunk);
            while let Some(reply) = d.decode(&mut buf).unwrap() {
                out.push(reply);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(out, encoded);
    }
}

// ---------------------------------------------------------------------------
// Properties: requests
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Any argument vector encoded as Redis clients do decodes back to the
    /// same arguments with `raw()` equal to the encoding, whether it arrives
    /// at once, byte by byte, or in random chunks; and only the last byte
    /// completes it.
    #[test]
    fn request_round_trip(args in args(), sizes in chunk_sizes()) {
        let bytes = encode(&args);
        let want = Request::from_args(&args);
        prop_assert_eq!(&want.raw()[..], &bytes[..]);

        let mut buf = BytesMut::from(&bytes[..]);
        let got = RequestDecoder::default().decode_request(&mut buf).unwrap();
        prop_assert_eq!(got.as_ref(), Some(&want));
        prop_assert!(buf.is_empty());

        for sizes in [&[1][..], &sizes[..]] {
            let mut d = RequestDecoder::default();
            let mut buf = BytesMut::new();
            let mut fed = 0;
            for chunk in split_by(&bytes, sizes) {
                buf.extend_from_slice(chunk);
                fed += chunk.len();
                let got = d.decode_request(&mut buf).unwrap();
                if fed < bytes.len() {
                    prop_assert_eq!(got, None, "complete after {} of {} bytes", fed, bytes.len());
                } else {
                    prop_assert_eq!(got.as_ref(), Some(&want));
                    prop_assert!(buf.is_empty());
                }
            }
        }
    }

    /// Pipelined multibulk and inline requests, with blank lines, `*0` and
    /// `*-1` between them, come out in order (inline ones re-encoded as
    /// multibulk), however the buffer is split.
    #[test]
    fn pipelined_requests_in_order(items in vec(item(), 1..12), sizes in chunk_sizes()) {
        let stream: Vec<u8> = items.iter().flat_map(Item::bytes).collect();
        let want: Vec<Request> = items.iter().filter_map(Item::expected).collect();
        for sizes in [&[usize::MAX][..], &sizes[..]] {
            let got = decode_stream(Limits::default(), split_by(&stream, sizes));
            prop_assert_eq!(&got.requests, &want);
            prop_assert_eq!(got.end, Ok(Vec::new()));
        }
    }
}

// ---------------------------------------------------------------------------
// Properties: hostile input
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes never panic `RequestDecoder`; every call errors,
    /// makes progress or asks for more (see `decode_stream`), and asking for
    /// more never leaves more than `retained_bound` bytes buffered. The
    /// outcome does not depend on how the input was split.
    #[test]
    fn request_decoder_survives_anything(
        input in hostile_requests(),
        limits in small_limits(),
        sizes in chunk_sizes(),
    ) {
        let whole = decode_stream(limits, [&input[..]]);
        let chunked = decode_stream(limits, split_by(&input, &sizes));
        prop_assert_eq!(whole, chunked);
    }

    /// A declared bulk length above `max_bulk_len` (or a multibulk count
    /// above `max_multibulk_len`) is rejected as soon as its header line is
    /// complete, before any of the announced data arrives; lengths within
    /// the limit are waited for.
    #[test]
    fn oversized_declarations_fail_before_the_data(
        limits in small_limits(),
        before in vec(vec(any::<u8>(), 0..16), 0..3),
        extra_args in 1usize..4,
        excess in prop_oneof![1u64..4, 1u64..1_000_000, Just(u64::MAX / 4)],
        within in any::<Index>(),
    ) {
        let before: Vec<Vec<u8>> = before
            .into_iter()
            .map(|mut a| { a.truncate(limits.max_bulk_len); a })
            .take(limits.max_multibulk_len.saturating_sub(1))
            .collect();
        let count = (before.len() + extra_args).min(limits.max_multibulk_len);
        let mut prefix = format!("*{count}\r\n").into_bytes();
        for a in &before {
            prefix.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            prefix.extend_from_slice(a);
            prefix.extend_from_slice(b"\r\n");
        }

        let over = limits.max_bulk_len as u64 + excess;
        let header = format!("${over}\r\n").into_bytes();
        let input = [&prefix[..], &header[..]].concat();
        let mut d = RequestDecoder::new(limits);
        let mut buf = BytesMut::new();
        for (i, b) in input.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let r = d.decode_request(&mut buf);
            if i + 1 < input.len() {
                prop_assert_eq!(r, Ok(None), "after {} bytes", i + 1);
            } else {
                prop_assert!(r.is_err(), "length {} above {} accepted", over, limits.max_bulk_len);
            }
        }

        let ok_len = within.index(limits.max_bulk_len + 1);
        let mut buf = BytesMut::from(&[&prefix[..], format!("${ok_len}\r\n").as_bytes()].concat()[..]);
        prop_assert_eq!(RequestDecoder::new(limits).decode_request(&mut buf), Ok(None));

        let n = limits.max_multibulk_len as u64 + excess;
        let mut buf = BytesMut::from(format!("*{n}\r\n").as_bytes());
        prop_assert!(RequestDecoder::new(limits).decode_request(&mut buf).is_err());
    }

    /// With the default limits (512 MB bulks), a header alone never makes
    /// the decoder reserve more than about 1 MB, however often it is asked.
    #[test]
    fn header_alone_reserves_at_most_a_megabyte(
        len in prop_oneof![0usize..4096, 0usize..=512 * 1024 * 1024],
    ) {
        let mut buf = BytesMut::from(format!("*1\r\n${len}\r\n").as_bytes());
        let header = buf.len();
        let mut d = RequestDecoder::default();
        for _ in 0..4 {
            prop_assert_eq!(d.decode_request(&mut buf), Ok(None));
        }
        // Vec-style growth may double the small header allocation.
        let allowed = 2 * header + (len + 2).min(1 << 20);
        prop_assert!(buf.capacity() <= allowed, "capacity {} > {}", buf.capacity(), allowed);
    }

    /// Arbitrary bytes never panic `ReplyDecoder::scan` or `parse_frame`.
    /// `scan` gives the same answer in one call or resumed over arbitrary
    /// prefixes; and whenever both `scan` and `parse_frame` succeed they
    /// agree on the frame's length (or both say "incomplete"). They may
    /// legitimately differ in failing: `scan` does not validate scalar
    /// payloads (`:x`, `#x`) and `parse_frame` does not apply `max_bulk_len`.
    #[test]
    fn reply_decoders_survive_anything(
        input in hostile_replies(),
        cuts in vec(any::<Index>(), 0..8),
        limits in small_limits(),
    ) {
        let cuts = cut_points(input.len(), &cuts);
        for limits in [Limits::default(), limits] {
            let once = ReplyDecoder::new(limits).scan(&input);
            let resumed = scan_prefixes(limits, &input, &cuts);
            match (&once, &resumed) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                _ => prop_assert!(false, "one call {:?} vs resumed {:?}", once, resumed),
            }
        }
        let scanned = ReplyDecoder::default().scan(&input);
        let parsed = parse_frame(&input);
        if let (Ok(s), Ok(p)) = (&scanned, &parsed) {
            prop_assert_eq!(*s, p.as_ref().map(|(_, len)| *len), "parsed {:?}", parsed);
        }
        // Whatever `parse_frame` builds can be sent on: encoding it reads
        // back as the same value (modulo the views' documented downgrades).
        if let Ok(Some((f, _))) = &parsed {
            for (proto, view) in [
                (Protocol::Resp3, resp3_view(f)),
                (Protocol::Resp2, resp2_view(f)),
            ] {
                let bytes = f.to_bytes(proto);
                prop_assert_eq!(parse_frame(&bytes), Ok(Some((view, bytes.len()))));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Fixed cases
// ---------------------------------------------------------------------------

/// The memory bound is tight enough to mean something: a maximal request in
/// progress under the tiny limits stays within it, and the same bytes plus
/// one more argument's worth are refused rather than buffered.
#[test]
fn retained_bound_holds_for_a_maximal_request() {
    let limits = Limits {
        max_bulk_len: 16,
        max_multibulk_len: 4,
        max_inline_len: 32,
        max_depth: 8,
    };
    let arg = vec![b'x'; 16];
    let full = encode(&[&arg, &arg, &arg, &arg]);
    let pending = &full[..full.len() - 1];
    let out = decode_stream(limits, [pending]);
    assert_eq!(out.end.as_deref(), Ok(pending));
    assert!(pending.len() <= retained_bound(&limits));
    let too_many = encode(&[&arg, &arg, &arg, &arg, &arg]);
    assert_eq!(decode_stream(limits, [&too_many[..5]]).end, Err(()));
}

// ---------------------------------------------------------------------------
// Regressions: minimal inputs of bugs these properties found.
// ---------------------------------------------------------------------------

/// `parse_int` accumulated the magnitude as a positive `i64` before
/// negating, so the valid integer reply i64::MIN (`INCRBY k 0` on a key
/// holding it) did not parse.
#[test]
fn integer_reply_i64_min_parses() {
    let bytes = Frame::Integer(i64::MIN).to_bytes(Protocol::Resp3);
    assert_eq!(&bytes[..], b":-9223372036854775808\r\n");
    assert_eq!(ReplyDecoder::default().scan(&bytes), Ok(Some(bytes.len())));
    assert_eq!(
        parse_frame(&bytes),
        Ok(Some((Frame::Integer(i64::MIN), bytes.len())))
    );
}

/// An empty RESP3 attribute (`|0`) is a prefix of the reply that follows.
/// `ReplyDecoder::scan` took it for a whole reply, which would have paired
/// every later reply on the connection with the wrong request.
#[test]
fn empty_attribute_is_a_prefix_not_a_reply() {
    let input = b"|0\r\n+a\r\n";
    assert_eq!(
        parse_frame(input),
        Ok(Some((Frame::Simple(Bytes::from_static(b"a")), 8)))
    );
    assert_eq!(ReplyDecoder::default().scan(b"|0\r\n"), Ok(None));
    assert_eq!(ReplyDecoder::default().scan(input), Ok(Some(8)));
}

/// Redis (`string2ll`) rejects lengths with leading zeros and `-0`; the
/// decoder accepted them and would have forwarded a request that makes the
/// Redis node close a connection shared with other clients.
#[test]
fn non_canonical_lengths_are_refused() {
    let inputs: [&[u8]; 3] = [
        b"*1\r\n$04\r\nPING\r\n",
        b"*01\r\n$4\r\nPING\r\n",
        b"*2\r\n$4\r\nECHO\r\n$-0\r\n\r\n",
    ];
    for input in inputs {
        let mut buf = BytesMut::from(input);
        let got = RequestDecoder::default().decode_request(&mut buf);
        assert!(
            got.is_err(),
            "{:?} accepted as {got:?}",
            String::from_utf8_lossy(input)
        );
    }
}

/// A RESP3 blob error (`!N`) may contain CRLF; written back as a simple
/// `-` line it became two replies. It is now written as a blob error in
/// RESP3 and with spaces for CR/LF in RESP2, as Redis does.
#[test]
fn blob_error_with_crlf_reencodes_as_one_reply() {
    let (f, _) = parse_frame(b"!5\r\na\r\n+b\r\n").unwrap().unwrap();
    assert_eq!(f, Frame::Error(Bytes::from_static(b"a\r\n+b")));
    let bytes = f.to_bytes(Protocol::Resp3);
    assert_eq!(parse_frame(&bytes), Ok(Some((f.clone(), bytes.len()))));
    assert_eq!(&f.to_bytes(Protocol::Resp2)[..], b"-a  +b\r\n");
}
