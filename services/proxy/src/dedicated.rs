//! Connections used by one client at a time: transactions (WATCH state lives
//! on the connection), blocking commands (they occupy the connection) and
//! subscriptions (the connection turns into a message stream).
//!
//! A small pool keeps idle ones so a transaction or a blocking pop does not
//! pay a TCP handshake. A connection goes back to the pool only when its
//! owner knows it is clean (no WATCH, no pending reply); anything else is
//! dropped, which closes it and lets Redis forget its state.

use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redmesh_resp::{Limits, ReplyDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::backend::{open, BackendError, BackendOptions, Handshake};

/// Idle connections kept per pool.
const MAX_IDLE: usize = 16;

/// Reading side of a dedicated connection: whole replies as raw bytes.
pub struct ReplyReader {
    addr: String,
    rd: OwnedReadHalf,
    buf: BytesMut,
    decoder: ReplyDecoder,
}

impl ReplyReader {
    /// The next complete reply; `timeout` None waits forever (blocking
    /// commands and subscriptions).
    pub async fn next(&mut self, timeout: Option<Duration>) -> Result<Bytes, BackendError> {
        loop {
            match self.decoder.scan(&self.buf) {
                Ok(Some(len)) => return Ok(self.buf.split_to(len).freeze()),
                Ok(None) => {}
                Err(_) => {
                    return Err(BackendError::Lost {
                        addr: self.addr.clone(),
                    })
                }
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(64 * 1024);
            }
            let read = self.rd.read_buf(&mut self.buf);
            let n = match timeout {
                Some(t) => match tokio::time::timeout(t, read).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(BackendError::Timeout {
                            addr: self.addr.clone(),
                            timeout: t,
                        })
                    }
                },
                None => read.await,
            };
            match n {
                Ok(0) | Err(_) => {
                    return Err(BackendError::Lost {
                        addr: self.addr.clone(),
                    })
                }
                Ok(_) => {}
            }
        }
    }
}

/// A connection owned by one client.
pub struct Dedicated {
    addr: String,
    wr: OwnedWriteHalf,
    reader: ReplyReader,
    reply_timeout: Duration,
}

impl std::fmt::Debug for Dedicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedicated")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Dedicated {
    /// Writes raw requests in one write.
    pub async fn send(&mut self, raws: &[&Bytes]) -> Result<(), BackendError> {
        let mut out = BytesMut::with_capacity(raws.iter().map(|r| r.len()).sum());
        for r in raws {
            out.extend_from_slice(r);
        }
        self.wr
            .write_all(&out)
            .await
            .map_err(|_| BackendError::Lost {
                addr: self.addr.clone(),
            })
    }

    /// The next reply, within the connection's reply timeout.
    pub async fn reply(&mut self) -> Result<Bytes, BackendError> {
        self.reader.next(Some(self.reply_timeout)).await
    }

    /// The next reply, however long it takes (blocking commands).
    pub async fn reply_blocking(&mut self) -> Result<Bytes, BackendError> {
        self.reader.next(None).await
    }

    /// Sends one request and reads its reply.
    pub async fn call(&mut self, raw: &Bytes) -> Result<Bytes, BackendError> {
        self.send(&[raw]).await?;
        self.reply().await
    }

    /// Splits into a writer and a reader (subscriptions read in a task).
    pub fn into_split(self) -> (OwnedWriteHalf, ReplyReader) {
        (self.wr, self.reader)
    }
}

/// Dedicated connections to one address with one handshake.
pub struct DedicatedPool {
    addr: String,
    handshake: Handshake,
    opts: BackendOptions,
    idle: Mutex<Vec<Dedicated>>,
}

impl std::fmt::Debug for DedicatedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedicatedPool")
            .field("addr", &self.addr)
            .finish()
    }
}

impl DedicatedPool {
    /// A pool for `addr`.
    pub fn new(addr: String, handshake: Handshake, opts: BackendOptions) -> Self {
        Self {
            addr,
            handshake,
            opts,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// An idle connection, or a new one.
    pub async fn get(&self) -> Result<Dedicated, BackendError> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(c);
        }
        let stream = open(&self.addr, &self.handshake, self.opts.connect_timeout)
            .await
            .map_err(|reason| BackendError::Unavailable {
                addr: self.addr.clone(),
                reason,
            })?;
        let (rd, wr) = stream.into_split();
        Ok(Dedicated {
            addr: self.addr.clone(),
            wr,
            reader: ReplyReader {
                addr: self.addr.clone(),
                rd,
                buf: BytesMut::with_capacity(16 * 1024),
                decoder: ReplyDecoder::new(Limits::default()),
            },
            reply_timeout: self.opts.reply_timeout,
        })
    }

    /// Returns a clean connection (no WATCH, nothing pending) for reuse.
    pub fn put(&self, conn: Dedicated) {
        if !conn.reader.buf.is_empty() {
            return; // unexpected bytes: not clean, drop it
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}
