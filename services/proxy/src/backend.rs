//! A multiplexed, pipelined connection to one Redis server, shared by every
//! client of the proxy.
//!
//! Requests from all clients are queued to one writer, which sends whatever
//! has accumulated in a single write; a reader task matches replies to
//! requests in FIFO order (Redis answers in order). Only commands without
//! connection state may use it (no MULTI, SELECT, blocking or pub/sub).
//!
//! Failure rules: a request never written is failed with `Unavailable`; a
//! request written whose reply did not arrive is failed with `Lost` or
//! `Timeout` — its outcome is unknown, so it must never be reported as OK.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redmesh_resp::{encode_command, parse_frame, Frame, Limits, Protocol, ReplyDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Most bytes sent in one write; keeps a huge queue from starving the reader.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Backend failures, each naming the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// Could not connect; the request was not sent.
    #[error("Redis node {addr} is unavailable: {reason}")]
    Unavailable {
        /// Server.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The connection broke after the request was sent: outcome unknown.
    #[error("connection to Redis node {addr} was lost before it replied")]
    Lost {
        /// Server.
        addr: String,
    },
    /// No reply in time; the connection was reset: outcome unknown.
    #[error("Redis node {addr} did not reply within {timeout:?}")]
    Timeout {
        /// Server.
        addr: String,
        /// The limit.
        timeout: Duration,
    },
}

/// Connection settings.
#[derive(Debug, Clone, Copy)]
pub struct BackendOptions {
    /// TCP connect deadline.
    pub connect_timeout: Duration,
    /// Longest wait for one reply before the connection is declared dead.
    pub reply_timeout: Duration,
    /// After a failed connect, fail requests at once for this long instead
    /// of hammering a dead server.
    pub retry_after: Duration,
}

/// What a new connection says before it carries requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Handshake {
    /// `HELLO 3` for RESP3 (Redis then shapes replies for RESP3 clients).
    pub protocol: Protocol,
    /// `AUTH user password` (peer proxies).
    pub auth: Option<(String, String)>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(500),
            reply_timeout: Duration::from_secs(5),
            retry_after: Duration::from_millis(100),
        }
    }
}

type ReplyTx = oneshot::Sender<Result<Bytes, BackendError>>;

struct Cmd {
    raw: Bytes,
    reply: ReplyTx,
}

/// Handle to one backend connection (cheap to clone).
#[derive(Clone)]
pub struct Backend {
    addr: String,
    tx: mpsc::UnboundedSender<Cmd>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("addr", &self.addr).finish()
    }
}

/// A pending reply.
pub type ReplyRx = oneshot::Receiver<Result<Bytes, BackendError>>;

impl Backend {
    /// Starts the connection driver for `addr` (connects on first use,
    /// saying `handshake` first). The driver ends when every handle is dropped.
    pub fn spawn(addr: String, handshake: Handshake, opts: BackendOptions) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(addr.clone(), handshake, opts, rx));
        Self { addr, tx }
    }

    /// The server address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Queues a raw RESP request; the receiver yields its raw reply.
    pub fn send(&self, raw: Bytes) -> ReplyRx {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(cmd)) = self.tx.send(Cmd { raw, reply }) {
            let _ = cmd.reply.send(Err(self.lost()));
        }
        rx
    }

    /// Sends a command built from `args` and parses the reply.
    pub async fn call<A: AsRef<[u8]>>(&self, args: &[A]) -> Result<Frame, BackendError> {
        let mut buf = BytesMut::new();
        encode_command(args, &mut buf);
        let raw = self.send(buf.freeze()).await.map_err(|_| self.lost())??;
        match parse_frame(&raw) {
            Ok(Some((frame, _))) => Ok(frame),
            _ => Err(BackendError::Unavailable {
                addr: self.addr.clone(),
                reason: "unparseable reply".into(),
            }),
        }
    }

    /// The error for a request whose reply channel closed.
    pub fn lost(&self) -> BackendError {
        BackendError::Lost {
            addr: self.addr.clone(),
        }
    }
}

async fn drive(
    addr: String,
    handshake: Handshake,
    opts: BackendOptions,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut failed: Option<(Instant, String)> = None;
    let mut next: Option<Cmd> = None;
    loop {
        let cmd = match next.take() {
            Some(c) => c,
            None => match rx.recv().await {
                Some(c) => c,
                None => return,
            },
        };
        if let Some((at, reason)) = &failed {
            if at.elapsed() < opts.retry_after {
                let _ = cmd.reply.send(Err(BackendError::Unavailable {
                    addr: addr.clone(),
                    reason: reason.clone(),
                }));
                continue;
            }
        }
        let stream = match open(&addr, &handshake, opts.connect_timeout).await {
            Ok(s) => s,
            Err(reason) => {
                fail_connect(&addr, cmd, reason, &mut failed);
                continue;
            }
        };
        failed = None;
        metrics::counter!("redmesh_proxy_backend_connects_total").increment(1);
        tracing::debug!(%addr, "backend connected");
        next = run_connection(&addr, stream, cmd, &mut rx, opts.reply_timeout).await;
        metrics::counter!("redmesh_proxy_backend_disconnects_total").increment(1);
    }
}

/// Connects to `addr` and performs `handshake` (AUTH, then HELLO 3), all
/// within `timeout`. Errors are the reason, for `Unavailable`.
pub async fn open(
    addr: &str,
    handshake: &Handshake,
    timeout: Duration,
) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, open_inner(addr, handshake)).await {
        Ok(r) => r,
        Err(_) => Err(format!("connect timed out after {timeout:?}")),
    }
}

async fn open_inner(addr: &str, handshake: &Handshake) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let mut hello = BytesMut::new();
    let mut expected = Vec::new();
    if let Some((user, pass)) = &handshake.auth {
        encode_command(&["AUTH", user.as_str(), pass.as_str()], &mut hello);
        expected.push("AUTH");
    }
    if handshake.protocol == Protocol::Resp3 {
        encode_command(&["HELLO", "3"], &mut hello);
        expected.push("HELLO 3");
    }
    if expected.is_empty() {
        return Ok(stream);
    }
    stream.write_all(&hello).await.map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut decoder = ReplyDecoder::new(Limits::default());
    for what in expected {
        let len = loop {
            if let Some(len) = decoder.scan(&buf).map_err(|e| e.to_string())? {
                break len;
            }
            if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err(format!("connection closed during {what}"));
            }
        };
        let reply = buf.split_to(len);
        if reply.first() == Some(&b'-') {
            return Err(format!(
                "{what} refused: {}",
                String::from_utf8_lossy(&reply[1..]).trim_end()
            ));
        }
    }
    Ok(stream)
}

fn fail_connect(addr: &str, cmd: Cmd, reason: String, failed: &mut Option<(Instant, String)>) {
    tracing::warn!(%addr, %reason, "cannot connect to Redis node");
    metrics::counter!("redmesh_proxy_backend_errors_total", "kind" => "connect").increment(1);
    let _ = cmd.reply.send(Err(BackendError::Unavailable {
        addr: addr.to_owned(),
        reason: reason.clone(),
    }));
    *failed = Some((Instant::now(), reason));
}

/// Pipelines commands over `stream` until it fails. Returns a command taken
/// off the queue but not yet written, to retry on the next connection.
async fn run_connection(
    addr: &str,
    stream: TcpStream,
    first: Cmd,
    rx: &mut mpsc::UnboundedReceiver<Cmd>,
    reply_timeout: Duration,
) -> Option<Cmd> {
    let (rd, mut wr) = stream.into_split();
    let (inflight_tx, inflight_rx) = mpsc::unbounded_channel::<Vec<ReplyTx>>();
    let mut reader = tokio::spawn(read_replies(
        addr.to_owned(),
        rd,
        inflight_rx,
        reply_timeout,
    ));
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut pending = Some(first);
    loop {
        let cmd = match pending.take() {
            Some(c) => c,
            None => tokio::select! {
                // The reader ended: the connection is dead.
                _ = &mut reader => return None,
                c = rx.recv() => match c {
                    Some(c) => c,
                    None => {
                        reader.abort();
                        return None;
                    }
                },
            },
        };
        // Let the other runnable sessions queue their requests first, so
        // one write carries many clients' pipelines (cheap when none are).
        tokio::task::yield_now().await;
        // Batch everything already queued into one write; the reader gets
        // the batch's reply slots in one message.
        buf.clear();
        let mut slots = Vec::new();
        let mut next = Some(cmd);
        while let Some(c) = next.take() {
            buf.extend_from_slice(&c.raw);
            slots.push(c.reply);
            if buf.len() < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if let Err(mpsc::error::SendError(slots)) = inflight_tx.send(slots) {
            // Reader gone: the connection is dead and these were not written.
            for reply in slots {
                let _ = reply.send(Err(BackendError::Lost {
                    addr: addr.to_owned(),
                }));
            }
            return None;
        }
        if let Err(e) = wr.write_all(&buf).await {
            tracing::warn!(%addr, error = %e, "write to Redis node failed");
            metrics::counter!("redmesh_proxy_backend_errors_total", "kind" => "write").increment(1);
            // Dropping the reader's queue fails every in-flight request.
            reader.abort();
            return None;
        }
    }
}

async fn read_replies(
    addr: String,
    mut rd: tokio::net::tcp::OwnedReadHalf,
    mut inflight: mpsc::UnboundedReceiver<Vec<ReplyTx>>,
    reply_timeout: Duration,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut decoder = ReplyDecoder::new(Limits::default());
    // Reply slots of written requests, oldest first. Dropped slots (when
    // this task ends) tell their sessions the reply was lost.
    let mut waiting: std::collections::VecDeque<ReplyTx> = Default::default();
    loop {
        let Some(reply) = waiting.pop_front() else {
            // While idle, keep reading too: a server that closes an idle
            // connection is noticed now, so the next request is never
            // written to a dead socket (it gets a retriable `Unavailable`
            // instead of an unknown outcome).
            let batch = tokio::select! {
                biased;
                next = inflight.recv() => match next {
                    Some(b) => b,
                    None => return,
                },
                read = rd.read_buf(&mut buf) => match read {
                    Ok(n) if n > 0 => match inflight.try_recv() {
                        // The reply raced ahead of our wake-up; it is in `buf`.
                        Ok(b) => b,
                        Err(_) => {
                            tracing::error!(%addr, "Redis node sent data nobody asked for; resetting the connection");
                            return;
                        }
                    },
                    _ => {
                        tracing::debug!(%addr, "idle connection to Redis node closed");
                        return;
                    }
                },
            };
            waiting.extend(batch);
            continue;
        };
        let frame = loop {
            match decoder.scan(&buf) {
                Ok(Some(len)) => break Ok(buf.split_to(len).freeze()),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(%addr, error = %e, "Redis node sent an unparseable reply; resetting");
                    break Err(BackendError::Lost { addr: addr.clone() });
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(64 * 1024);
            }
            match tokio::time::timeout(reply_timeout, rd.read_buf(&mut buf)).await {
                Ok(Ok(0)) => break Err(BackendError::Lost { addr: addr.clone() }),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%addr, error = %e, "read from Redis node failed");
                    break Err(BackendError::Lost { addr: addr.clone() });
                }
                Err(_) => {
                    metrics::counter!("redmesh_proxy_backend_errors_total", "kind" => "timeout")
                        .increment(1);
                    break Err(BackendError::Timeout {
                        addr: addr.clone(),
                        timeout: reply_timeout,
                    });
                }
            }
        };
        let failed = frame.is_err();
        let _ = reply.send(frame);
        if failed {
            // The remaining in-flight requests are failed (lost) when
            // `waiting` and `inflight` are dropped here.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A fake server answering "+<n>" for the n-th request received,
    /// reading everything it is sent before answering.
    async fn counting_server() -> (String, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut n = 0u32;
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok(k) = s.read(&mut buf).await else {
                    return;
                };
                if k == 0 {
                    return;
                }
                let reqs = buf[..k].iter().filter(|&&b| b == b'*').count();
                let mut out = String::new();
                for _ in 0..reqs {
                    n += 1;
                    out.push_str(&format!("+{n}\r\n"));
                }
                if s.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        (addr, h)
    }

    #[tokio::test]
    async fn replies_come_back_in_order() {
        let (addr, _srv) = counting_server().await;
        let b = Backend::spawn(addr, Handshake::default(), BackendOptions::default());
        let rxs: Vec<ReplyRx> = (0..100)
            .map(|_| b.send(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n")))
            .collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            assert_eq!(
                rx.await.unwrap().unwrap(),
                Bytes::from(format!("+{}\r\n", i + 1))
            );
        }
    }

    #[tokio::test]
    async fn dead_server_fails_fast_and_names_it() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let b = Backend::spawn(
            format!("127.0.0.1:{port}"),
            Handshake::default(),
            BackendOptions::default(),
        );
        let err = b.call(&["PING"]).await.unwrap_err();
        assert!(matches!(err, BackendError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains(&port.to_string()), "{err}");
    }

    #[tokio::test]
    async fn a_server_closing_an_idle_connection_is_noticed_before_the_next_request() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let srv = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            s.write_all(b"+PONG\r\n").await.unwrap();
            // Close while idle, and stop listening: the next request cannot
            // be delivered anywhere.
        });
        let b = Backend::spawn(addr, Handshake::default(), BackendOptions::default());
        assert_eq!(
            b.send(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"))
                .await
                .unwrap()
                .unwrap(),
            "+PONG\r\n"
        );
        srv.await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let err = b.call(&["PING"]).await.unwrap_err();
        assert!(
            matches!(err, BackendError::Unavailable { .. }),
            "not sent, so retriable: {err}"
        );
    }

    #[tokio::test]
    async fn silent_server_times_out_instead_of_hanging() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let _srv = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            std::future::pending::<()>().await;
        });
        let opts = BackendOptions {
            reply_timeout: Duration::from_millis(200),
            ..BackendOptions::default()
        };
        let b = Backend::spawn(addr, Handshake::default(), opts);
        let first = b.send(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"));
        let second = b.send(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"));
        assert!(matches!(
            first.await.unwrap(),
            Err(BackendError::Timeout { .. })
        ));
        // The second was written too: its outcome is unknown, never OK.
        assert!(!matches!(second.await, Ok(Ok(_))));
    }
}
