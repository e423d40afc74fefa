//! RESP values (RESP2 and RESP3) and their encoding.
//!
//! The proxy forwards most replies as raw bytes and builds `Frame`s only for
//! what it answers itself or has to inspect, so this type favours clarity
//! over zero-copy tricks. Parsing of untrusted requests lives in `decode`.

use bytes::{BufMut, Bytes, BytesMut};

/// A RESP value.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// `+OK`
    Simple(Bytes),
    /// `-ERR ...` (without the leading `-`).
    Error(Bytes),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo`
    Bulk(Bytes),
    /// `$-1` (RESP2) or `_` (RESP3).
    Null,
    /// `*-1` (RESP2 null array).
    NullArray,
    /// `*N` followed by N frames.
    Array(Vec<Frame>),
    /// RESP3 `%N` map.
    Map(Vec<(Frame, Frame)>),
    /// RESP3 `~N` set.
    Set(Vec<Frame>),
    /// RESP3 `>N` push (pub/sub messages).
    Push(Vec<Frame>),
    /// RESP3 `#t` / `#f`.
    Boolean(bool),
    /// RESP3 `,1.5` (kept as text to round-trip exactly).
    Double(Bytes),
    /// RESP3 `(123...` big number (text).
    BigNumber(Bytes),
    /// RESP3 `=N\r\ntxt:...` verbatim string (format and text).
    Verbatim(Bytes, Bytes),
}

/// RESP protocol version a client speaks (chosen with `HELLO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// RESP2 (default).
    #[default]
    Resp2,
    /// RESP3.
    Resp3,
}

impl Frame {
    /// `+OK`.
    pub fn ok() -> Self {
        Frame::Simple(Bytes::from_static(b"OK"))
    }

    /// A simple string.
    pub fn simple(s: &'static str) -> Self {
        Frame::Simple(Bytes::from_static(s.as_bytes()))
    }

    /// An error reply; `msg` must start with the error code (`ERR ...`,
    /// `MOVED ...`) and contain no CR/LF (they are replaced by spaces).
    pub fn error(msg: impl Into<String>) -> Self {
        let mut s: String = msg.into();
        if s.contains(['\r', '\n']) {
            s = s.replace(['\r', '\n'], " ");
        }
        Frame::Error(Bytes::from(s))
    }

    /// A bulk string.
    pub fn bulk(b: impl Into<Bytes>) -> Self {
        Frame::Bulk(b.into())
    }

    /// An array of bulk strings.
    pub fn bulk_array<I, B>(items: I) -> Self
    where
        I: IntoIterator<Item = B>,
        B: Into<Bytes>,
    {
        Frame::Array(items.into_iter().map(|b| Frame::Bulk(b.into())).collect())
    }

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        matches!(self, Frame::Error(_))
    }

    /// Bytes of a simple, bulk or verbatim string.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Frame::Simple(b) | Frame::Bulk(b) | Frame::Verbatim(_, b) => Some(b),
            _ => None,
        }
    }

    /// Encodes for a client speaking `proto`: RESP3-only types are
    /// downgraded for RESP2 the way Redis does (maps and sets become flat
    /// arrays, booleans integers, doubles bulk strings, null `$-1`).
    pub fn encode(&self, proto: Protocol, out: &mut BytesMut) {
        match self {
            Frame::Simple(s) => line(out, b'+', s),
            // A simple line ends at the first CRLF (a parsed `!` blob error
            // may hold one): RESP3 gets a blob error, RESP2 spaces for CR
            // and LF, as Redis writes errors.
            Frame::Error(s) if s.windows(2).any(|w| w == b"\r\n") => match proto {
                Protocol::Resp3 => {
                    int_line(out, b'!', s.len() as i64);
                    out.put_slice(s);
                    out.put_slice(b"\r\n");
                }
                Protocol::Resp2 => {
                    let clean: Vec<u8> = s
                        .iter()
                        .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b })
                        .collect();
                    line(out, b'-', &clean);
                }
            },
            Frame::Error(s) => line(out, b'-', s),
            Frame::Integer(i) => int_line(out, b':', *i),
            Frame::Bulk(b) => bulk(out, b),
            Frame::Null => match proto {
                Protocol::Resp2 => out.put_slice(b"$-1\r\n"),
                Protocol::Resp3 => out.put_slice(b"_\r\n"),
            },
            Frame::NullArray => match proto {
                Protocol::Resp2 => out.put_slice(b"*-1\r\n"),
                Protocol::Resp3 => out.put_slice(b"_\r\n"),
            },
            Frame::Array(items) => {
                int_line(out, b'*', items.len() as i64);
                items.iter().for_each(|f| f.encode(proto, out));
            }
            Frame::Map(pairs) => {
                match proto {
                    Protocol::Resp2 => int_line(out, b'*', pairs.len() as i64 * 2),
                    Protocol::Resp3 => int_line(out, b'%', pairs.len() as i64),
                }
                for (k, v) in pairs {
                    k.encode(proto, out);
                    v.encode(proto, out);
                }
            }
            Frame::Set(items) | Frame::Push(items) => {
                let tag = match (self, proto) {
                    (_, Protocol::Resp2) => b'*',
                    (Frame::Set(_), _) => b'~',
                    _ => b'>',
                };
                int_line(out, tag, items.len() as i64);
                items.iter().for_each(|f| f.encode(proto, out));
            }
            Frame::Boolean(b) => match proto {
                Protocol::Resp2 => int_line(out, b':', i64::from(*b)),
                Protocol::Resp3 => out.put_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
            },
            Frame::Double(d) => match proto {
                Protocol::Resp2 => bulk(out, d),
                Protocol::Resp3 => line(out, b',', d),
            },
            Frame::BigNumber(n) => match proto {
                Protocol::Resp2 => bulk(out, n),
                Protocol::Resp3 => line(out, b'(', n),
            },
            Frame::Verbatim(fmt, text) => match proto {
                Protocol::Resp2 => bulk(out, text),
                Protocol::Resp3 => {
                    int_line(out, b'=', (fmt.len() + 1 + text.len()) as i64);
                    out.put_slice(fmt);
                    out.put_u8(b':');
                    out.put_slice(text);
                    out.put_slice(b"\r\n");
                }
            },
        }
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self, proto: Protocol) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(proto, &mut out);
        out.freeze()
    }
}

fn line(out: &mut BytesMut, tag: u8, s: &[u8]) {
    out.reserve(s.len() + 3);
    out.put_u8(tag);
    out.put_slice(s);
    out.put_slice(b"\r\n");
}

fn int_line(out: &mut BytesMut, tag: u8, n: i64) {
    let mut buf = itoa::Buffer::new();
    line(out, tag, buf.format(n).as_bytes());
}

fn bulk(out: &mut BytesMut, b: &[u8]) {
    int_line(out, b'$', b.len() as i64);
    out.reserve(b.len() + 2);
    out.put_slice(b);
    out.put_slice(b"\r\n");
}

/// Encodes a command (array of bulk strings), as sent to a Redis server.
pub fn encode_command<A: AsRef<[u8]>>(args: &[A], out: &mut BytesMut) {
    int_line(out, b'*', args.len() as i64);
    for a in args {
        bulk(out, a.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_redis() {
        let f = Frame::Array(vec![
            Frame::bulk("a"),
            Frame::Integer(-3),
            Frame::Null,
            Frame::ok(),
            Frame::error("ERR x\r\ny"),
        ]);
        assert_eq!(
            f.to_bytes(Protocol::Resp2),
            Bytes::from_static(b"*5\r\n$1\r\na\r\n:-3\r\n$-1\r\n+OK\r\n-ERR x  y\r\n")
        );
        let m = Frame::Map(vec![(Frame::bulk("k"), Frame::Boolean(true))]);
        assert_eq!(
            m.to_bytes(Protocol::Resp2),
            Bytes::from_static(b"*2\r\n$1\r\nk\r\n:1\r\n")
        );
        assert_eq!(
            m.to_bytes(Protocol::Resp3),
            Bytes::from_static(b"%1\r\n$1\r\nk\r\n#t\r\n")
        );
        let mut out = BytesMut::new();
        encode_command(&["GET", "k"], &mut out);
        assert_eq!(&out[..], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
    }
}
