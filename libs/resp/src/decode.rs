//! Decoding RESP from the network: client requests (untrusted) and server
//! replies (found by boundary, forwarded as raw bytes).
//!
//! Both decoders are resumable: a partially received frame is never
//! rescanned from the start, so a huge pipelined `MSET` or a 100 MB reply
//! costs linear time. Limits are enforced on declared lengths *before*
//! buffering, so a hostile header cannot make the proxy allocate. Nothing
//! here panics on any input; errors carry Redis's own wording.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

use crate::frame::{encode_command, Frame};

/// Redis's protocol limits, configurable per listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string accepted (Redis `proto-max-bulk-len`, 512 MB).
    pub max_bulk_len: usize,
    /// Most arguments in one request (Redis accepts up to 2^31; we default to 1M).
    pub max_multibulk_len: usize,
    /// Longest inline request line (Redis `PROTO_INLINE_MAX_SIZE`, 64 KB).
    pub max_inline_len: usize,
    /// Deepest reply nesting accepted from a server.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bulk_len: 512 * 1024 * 1024,
            max_multibulk_len: 1024 * 1024,
            max_inline_len: 64 * 1024,
            max_depth: 128,
        }
    }
}

/// A protocol violation; the text is Redis's (without `ERR Protocol error: `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

impl ProtocolError {
    fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The `-ERR Protocol error: ...` reply Redis sends before closing.
    pub fn to_frame(&self) -> Frame {
        Frame::error(format!("ERR {self}"))
    }
}

/// Errors of the tokio codecs: I/O or protocol.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Socket error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Malformed input.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// A client request: its arguments and the frame to forward as-is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    raw: Bytes,
    args: Vec<Bytes>,
}

impl Request {
    /// Builds a request from arguments (encodes the raw frame).
    pub fn from_args<A: AsRef<[u8]>>(args: &[A]) -> Self {
        let mut out = BytesMut::new();
        encode_command(args, &mut out);
        Self {
            raw: out.freeze(),
            args: args
                .iter()
                .map(|a| Bytes::copy_from_slice(a.as_ref()))
                .collect(),
        }
    }

    /// The multibulk frame, ready to send to a Redis server.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// Arguments; `args()[0]` is the command name. Never empty.
    pub fn args(&self) -> &[Bytes] {
        &self.args
    }

    /// The command name as sent (any case).
    pub fn name(&self) -> &[u8] {
        &self.args[0]
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\r\n")
        .map(|p| from + p)
}

/// Parses a RESP integer line body strictly (optional `-`, digits only).
fn parse_int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    // Canonical form only, as Redis's string2ll: no leading zeros, no "-0"
    // (a request Redis would reject must not reach a shared connection).
    match digits {
        [] => return None,
        [b'0'] => return (!neg).then_some(0),
        [b'0', ..] => return None,
        _ if digits.len() > 19 => return None,
        _ => {}
    }
    // Accumulated on the sign's side, so i64::MIN parses too.
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        v = v.checked_mul(10)?;
        v = if neg {
            v.checked_sub(d)?
        } else {
            v.checked_add(d)?
        };
    }
    Some(v)
}

#[derive(Debug, Default)]
enum ReqState {
    #[default]
    Idle,
    MultiBulk {
        count: usize,
        pos: usize,
    },
}

/// Decoder of client requests (multibulk and inline), with limits.
#[derive(Debug, Default)]
pub struct RequestDecoder {
    limits: Limits,
    state: ReqState,
    /// Argument ranges of the request being read; kept between requests so
    /// decoding allocates only the request's own argument list.
    ranges: Vec<(usize, usize)>,
}

impl RequestDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: ReqState::Idle,
            ranges: Vec::new(),
        }
    }

    /// Takes the next complete request off `buf`, `Ok(None)` if more bytes
    /// are needed. Empty requests (`*0`, blank inline lines) are skipped.
    pub fn decode_request(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, ProtocolError> {
        loop {
            if let ReqState::Idle = self.state {
                let Some(&first) = buf.first() else {
                    return Ok(None);
                };
                if first != b'*' {
                    match self.inline(buf)? {
                        Some(Some(req)) => return Ok(Some(req)),
                        Some(None) => continue, // blank line
                        None => return Ok(None),
                    }
                }
                let Some(eol) = find_crlf(buf, 1) else {
                    if buf.len() > self.limits.max_inline_len {
                        return Err(ProtocolError::new("too big mbulk count string"));
                    }
                    return Ok(None);
                };
                let count = parse_int(&buf[1..eol])
                    .filter(|n| *n <= self.limits.max_multibulk_len as i64)
                    .ok_or_else(|| ProtocolError::new("invalid multibulk length"))?;
                if count <= 0 {
                    let _ = buf.split_to(eol + 2);
                    continue;
                }
                self.state = ReqState::MultiBulk {
                    count: count as usize,
                    pos: eol + 2,
                };
                self.ranges.clear();
                // Capacity is kept between requests, but a huge one's is
                // given back.
                self.ranges.shrink_to(64);
            }
            let args = &mut self.ranges;
            let ReqState::MultiBulk { count, pos } = &mut self.state else {
                continue; // Idle was handled above; loop back defensively.
            };
            while args.len() < *count {
                let Some(&tag) = buf.get(*pos) else {
                    return Ok(None);
                };
                if tag != b'$' {
                    let got = char::from(tag);
                    self.state = ReqState::Idle;
                    return Err(ProtocolError(format!("expected '$', got '{got}'")));
                }
                let Some(eol) = find_crlf(buf, *pos + 1) else {
                    if buf.len() - *pos > self.limits.max_inline_len {
                        self.state = ReqState::Idle;
                        return Err(ProtocolError::new("too big bulk count string"));
                    }
                    return Ok(None);
                };
                let Some(len) = parse_int(&buf[*pos + 1..eol])
                    .filter(|n| *n >= 0 && *n as u64 <= self.limits.max_bulk_len as u64)
                else {
                    self.state = ReqState::Idle;
                    return Err(ProtocolError::new("invalid bulk length"));
                };
                let start = eol + 2;
                let end = start + len as usize;
                if buf.len() < end + 2 {
                    // Grow towards the announced size, but never reserve
                    // more than 1 MB on the word of a header alone.
                    let want = (end + 2 - buf.len()).min(1 << 20);
                    buf.reserve(want);
                    return Ok(None);
                }
                args.push((start, end));
                *pos = end + 2;
            }
            let pos = *pos;
            self.state = ReqState::Idle;
            let raw = buf.split_to(pos).freeze();
            let args = args.iter().map(|&(s, e)| raw.slice(s..e)).collect();
            return Ok(Some(Request { raw, args }));
        }
    }

    /// Inline request: `Some(Some(req))`, `Some(None)` for a blank line,
    /// `None` if the line is incomplete.
    fn inline(&mut self, buf: &mut BytesMut) -> Result<Option<Option<Request>>, ProtocolError> {
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            if buf.len() > self.limits.max_inline_len {
                return Err(ProtocolError::new("too big inline request"));
            }
            return Ok(None);
        };
        if nl > self.limits.max_inline_len {
            return Err(ProtocolError::new("too big inline request"));
        }
        let line = buf.split_to(nl + 1);
        let line = line.strip_suffix(b"\n").unwrap_or(&line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let args =
            split_args(line).ok_or_else(|| ProtocolError::new("unbalanced quotes in request"))?;
        if args.is_empty() {
            return Ok(Some(None));
        }
        Ok(Some(Some(Request::from_args(&args))))
    }
}

/// Splits an inline command line like Redis's `sdssplitargs`: whitespace
/// separated, with "double quotes" (C escapes, `\xHH`) and 'single quotes'.
/// `None` on unbalanced quotes or a closing quote not followed by a space.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= n {
            return Some(args);
        }
        let mut cur = Vec::new();
        let (mut in_dq, mut in_sq) = (false, false);
        loop {
            if in_dq {
                let c = *line.get(i)?;
                if c == b'\\'
                    && i + 3 < n
                    && line[i + 1] == b'x'
                    && line[i + 2].is_ascii_hexdigit()
                    && line[i + 3].is_ascii_hexdigit()
                {
                    let hex = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
                    cur.push(hex(line[i + 2]) * 16 + hex(line[i + 3]));
                    i += 3;
                } else if c == b'\\' && i + 1 < n {
                    i += 1;
                    cur.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                } else if c == b'"' {
                    // The closing quote must be followed by a space or the end.
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else if in_sq {
                let c = *line.get(i)?;
                if c == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    i += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else {
                match line.get(i) {
                    None => break,
                    Some(c) if c.is_ascii_whitespace() => break,
                    Some(b'"') => in_dq = true,
                    Some(b'\'') => in_sq = true,
                    Some(&c) => cur.push(c),
                }
            }
            i += 1;
        }
        args.push(cur);
    }
}

impl Decoder for RequestDecoder {
    type Item = Request;
    type Error = CodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, CodecError> {
        Ok(self.decode_request(buf)?)
    }
}

#[derive(Debug, Clone, Copy)]
struct Level {
    remaining: u64,
    attribute: bool,
}

/// Finds the end of complete reply frames in a server's byte stream without
/// building values, so replies can be forwarded untouched.
#[derive(Debug, Default)]
pub struct ReplyDecoder {
    limits: Limits,
    offset: usize,
    stack: Vec<Level>,
}

impl ReplyDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            offset: 0,
            stack: Vec::new(),
        }
    }

    /// Length of the first complete frame in `buf`, resuming where the
    /// previous call stopped; `Ok(None)` if incomplete.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
        loop {
            let Some(&tag) = buf.get(self.offset) else {
                return Ok(None);
            };
            let Some(eol) = find_crlf(buf, self.offset + 1) else {
                if buf.len() - self.offset > self.limits.max_inline_len.max(1 << 20) {
                    return Err(ProtocolError::new("reply line too long"));
                }
                return Ok(None);
            };
            let header = &buf[self.offset + 1..eol];
            let bad = || {
                ProtocolError(format!(
                    "invalid length {:?} in reply",
                    String::from_utf8_lossy(header)
                ))
            };
            match tag {
                b'+' | b'-' | b':' | b',' | b'#' | b'_' | b'(' => self.offset = eol + 2,
                b'$' | b'=' | b'!' => {
                    let len = parse_int(header).ok_or_else(bad)?;
                    if len < 0 {
                        self.offset = eol + 2;
                    } else {
                        if len as u64 > self.limits.max_bulk_len as u64 {
                            return Err(bad());
                        }
                        let end = eol + 2 + len as usize + 2;
                        if buf.len() < end {
                            return Ok(None);
                        }
                        self.offset = end;
                    }
                }
                b'*' | b'~' | b'>' | b'%' | b'|' => {
                    let n = parse_int(header).ok_or_else(bad)?;
                    self.offset = eol + 2;
                    let n = if matches!(tag, b'%' | b'|') {
                        n.saturating_mul(2)
                    } else {
                        n
                    };
                    if n > 0 {
                        if self.stack.len() >= self.limits.max_depth {
                            return Err(ProtocolError::new("reply nested too deeply"));
                        }
                        self.stack.push(Level {
                            remaining: n as u64,
                            attribute: tag == b'|',
                        });
                        continue;
                    }
                    if tag == b'|' && n == 0 {
                        // An empty attribute: a prefix of the element that
                        // follows, not an element itself (`|-1` is a null,
                        // as `parse_frame` reads it).
                        continue;
                    }
                }
                other => {
                    return Err(ProtocolError(format!(
                        "unexpected byte {:?} at the start of a reply",
                        char::from(other)
                    )))
                }
            }
            // One element finished: close every aggregate it completes.
            let mut counts = true;
            while let Some(top) = self.stack.last_mut() {
                if counts {
                    top.remaining -= 1;
                }
                if top.remaining > 0 {
                    break;
                }
                // A finished attribute is a prefix, not an element.
                counts = !top.attribute;
                self.stack.pop();
            }
            if self.stack.is_empty() && counts {
                let len = self.offset;
                self.offset = 0;
                return Ok(Some(len));
            }
        }
    }
}

impl Decoder for ReplyDecoder {
    type Item = Bytes;
    type Error = CodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        Ok(self.scan(buf)?.map(|len| buf.split_to(len).freeze()))
    }
}

/// Parses one complete frame into a value; `Ok(None)` if `buf` holds less
/// than a frame. For inspecting replies the proxy must understand.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Frame, usize)>, ProtocolError> {
    if depth > Limits::default().max_depth {
        return Err(ProtocolError::new("reply nested too deeply"));
    }
    let Some(&tag) = buf.get(at) else {
        return Ok(None);
    };
    let Some(eol) = find_crlf(buf, at + 1) else {
        return Ok(None);
    };
    let header = &buf[at + 1..eol];
    let text = || Bytes::copy_from_slice(header);
    let bad = || {
        ProtocolError(format!(
            "invalid header {:?}",
            String::from_utf8_lossy(header)
        ))
    };
    let next = eol + 2;
    let simple = |f: Frame| Ok(Some((f, next)));
    match tag {
        b'+' => simple(Frame::Simple(text())),
        b'-' => simple(Frame::Error(text())),
        b':' => simple(Frame::Integer(parse_int(header).ok_or_else(bad)?)),
        b',' => simple(Frame::Double(text())),
        b'(' => simple(Frame::BigNumber(text())),
        b'_' => simple(Frame::Null),
        b'#' => match header {
            b"t" => simple(Frame::Boolean(true)),
            b"f" => simple(Frame::Boolean(false)),
            _ => Err(bad()),
        },
        b'$' | b'=' | b'!' => {
            let len = parse_int(header).ok_or_else(bad)?;
            if len < 0 {
                return simple(Frame::Null);
            }
            let end = next + len as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            let body = Bytes::copy_from_slice(&buf[next..end]);
            let f = match tag {
                b'$' => Frame::Bulk(body),
                b'!' => Frame::Error(body),
                _ => match body.iter().position(|&b| b == b':') {
                    Some(3) => Frame::Verbatim(body.slice(..3), body.slice(4..)),
                    _ => Frame::Bulk(body),
                },
            };
            Ok(Some((f, end + 2)))
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = parse_int(header).ok_or_else(bad)?;
            if n < 0 {
                return simple(Frame::NullArray);
            }
            let items_n = if matches!(tag, b'%' | b'|') {
                n.saturating_mul(2)
            } else {
                n
            } as usize;
            let mut items = Vec::with_capacity(items_n.min(1024));
            let mut pos = next;
            for _ in 0..items_n {
                match parse_at(buf, pos, depth + 1)? {
                    Some((f, p)) => {
                        items.push(f);
                        pos = p;
                    }
                    None => return Ok(None),
                }
            }
            let f = match tag {
                b'*' => Frame::Array(items),
                b'~' => Frame::Set(items),
                b'>' => Frame::Push(items),
                b'|' => {
                    // Attributes annotate the following reply; skip them.
                    return parse_at(buf, pos, depth + 1);
                }
                _ => {
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    Frame::Map(pairs)
                }
            };
            Ok(Some((f, pos)))
        }
        other => Err(ProtocolError(format!(
            "unexpected byte {:?}",
            char::from(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Protocol;

    fn decode_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, ProtocolError> {
        let mut d = RequestDecoder::default();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(r) = d.decode_request(&mut buf)? {
            out.push(r.args().iter().map(|a| a.to_vec()).collect());
        }
        Ok(out)
    }

    #[test]
    fn multibulk_and_inline() {
        let got = decode_all(
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n\r\nset a \"b c\\x41\" 'd\\'e'\r\n*0\r\n",
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                vec![b"GET".to_vec(), b"k".to_vec()],
                vec![b"PING".to_vec()],
                vec![
                    b"set".to_vec(),
                    b"a".to_vec(),
                    b"b cA".to_vec(),
                    b"d'e".to_vec()
                ],
            ]
        );
    }

    #[test]
    fn resumes_byte_by_byte() {
        let input = b"*3\r\n$3\r\nSET\r\n$5\r\nhello\r\n$10\r\n0123456789\r\n";
        let mut d = RequestDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = None;
        for (i, b) in input.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            if let Some(r) = d.decode_request(&mut buf).unwrap() {
                assert_eq!(i, input.len() - 1, "complete only at the last byte");
                got = Some(r);
            }
        }
        let r = got.unwrap();
        assert_eq!(r.raw().as_ref(), &input[..]);
        assert_eq!(r.args()[2].as_ref(), b"0123456789");
        assert!(buf.is_empty());
    }

    #[test]
    fn protocol_errors_use_redis_wording() {
        let err = |i: &[u8]| decode_all(i).unwrap_err().to_string();
        assert_eq!(err(b"*x\r\n"), "Protocol error: invalid multibulk length");
        assert_eq!(
            err(b"*1\r\n+x\r\n"),
            "Protocol error: expected '$', got '+'"
        );
        assert_eq!(err(b"*1\r\n$-5\r\n"), "Protocol error: invalid bulk length");
        assert_eq!(
            err(b"*1\r\n$999999999999\r\n"),
            "Protocol error: invalid bulk length"
        );
        assert_eq!(
            err(b"*99999999\r\n"),
            "Protocol error: invalid multibulk length"
        );
        assert_eq!(
            err(b"set \"a\r\n"),
            "Protocol error: unbalanced quotes in request"
        );
        assert_eq!(
            err(&vec![b'a'; 70_000]),
            "Protocol error: too big inline request"
        );
        assert_eq!(
            err(&[b"*".as_ref(), &vec![b'1'; 70_000]].concat()),
            "Protocol error: too big mbulk count string"
        );
    }

    #[test]
    fn reply_boundaries() {
        let replies: &[&[u8]] = &[
            b"+OK\r\n",
            b"-ERR x\r\n",
            b":5\r\n",
            b"$-1\r\n",
            b"$3\r\nabc\r\n",
            b"*-1\r\n",
            b"*0\r\n",
            b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
            b"%1\r\n+k\r\n~2\r\n#t\r\n,1.5\r\n",
            b"|1\r\n+a\r\n+b\r\n$1\r\nx\r\n",
            b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
            b"=8\r\ntxt:abcd\r\n",
            b"_\r\n",
        ];
        let stream: Vec<u8> = replies.concat();
        let mut d = ReplyDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in &stream {
            buf.extend_from_slice(&[*b]);
            while let Some(f) = d.decode(&mut buf).unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out.len(), replies.len());
        for (got, want) in out.iter().zip(replies) {
            assert_eq!(got.as_ref(), *want);
            let (frame, len) = parse_frame(got).unwrap().unwrap();
            assert_eq!(len, want.len());
            // Nulls normalise to `_` in RESP3 and attributes are dropped.
            if !want.starts_with(b"|")
                && !want.starts_with(b"*-1")
                && !want.starts_with(b"$-1")
                && !want.starts_with(b"_")
            {
                assert_eq!(frame.to_bytes(Protocol::Resp3).as_ref(), *want, "{frame:?}");
            }
        }
    }

    #[test]
    fn hostile_replies_fail_cleanly() {
        let mut d = ReplyDecoder::default();
        assert!(d.scan(b"?\r\n").is_err());
        let mut d = ReplyDecoder::default();
        assert!(d.scan(b"$abc\r\n").is_err());
        let deep: Vec<u8> = b"*1\r\n".repeat(200);
        let mut d = ReplyDecoder::default();
        assert!(d.scan(&deep).is_err());
        assert!(parse_frame(&deep).is_err());
    }
}
