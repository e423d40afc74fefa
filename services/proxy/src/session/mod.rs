//! One client connection: decode pipelined requests, dispatch each, and
//! write the replies strictly in request order.
//!
//! Dispatch never waits: a forwarded request only queues on a backend and
//! leaves a pending reply in the client's queue, so a pipeline of N commands
//! reaches Redis as one batch. Two Redis behaviours need holding back:
//! after a blocking command nothing else from the client runs until it
//! returns (`hold`), and subscription commands wait until earlier replies are
//! out so confirmations and messages never overtake them (`Dispatch::Later`).
//! Reading pauses while too many replies are pending, bounding the memory
//! one client can hold.
//!
//! Submodules: `commands` (answered by the proxy), `route` (keyed and
//! keyless commands, plain-mode forwarding), `tx` (MULTI/EXEC/WATCH),
//! `pubsub` (subscriptions and PUBLISH fan-out).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redmesh_model::ProxyId;
use redmesh_resp::{Frame, Limits, Protocol, Request, RequestDecoder};
use redmesh_runtime::tls::TlsServer;
use redmesh_runtime::CancellationToken;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::backend::{BackendError, ReplyRx};
use crate::routing::{RouteTable, Serving};

mod commands;
mod pubsub;
mod route;
mod tally;
mod tx;

/// Clients the proxy refused or closed, by `reason` (`max_clients`, `idle`,
/// `request_timeout`).
pub const CLIENTS_REJECTED: &str = "redmesh_proxy_clients_rejected_total";

/// Clients whose TLS handshake failed or timed out.
pub const TLS_HANDSHAKE_FAILURES: &str = "redmesh_proxy_tls_handshake_failures_total";

/// Longest a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most replies pending per client before the proxy stops reading from it.
const MAX_PENDING: usize = 1024;

/// How long a draining proxy waits for sessions to deliver owed replies.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// State shared by every session of the proxy.
pub struct Shared {
    /// This proxy.
    pub proxy_id: ProxyId,
    /// Latest route table.
    pub table: watch::Receiver<Arc<RouteTable>>,
    /// Protocol limits.
    pub limits: Limits,
    /// Next client id.
    pub next_client_id: AtomicU64,
    /// Connected clients (for metrics and GetInfo).
    pub clients: AtomicU64,
    /// The topology subscription (its freshness decides fencing).
    pub feed: crate::topology::TopologyFeed,
    /// Refuse writes after this long without word from any broker.
    pub fence_after: std::time::Duration,
    /// Trace one command in this many (0: none).
    pub trace_every: u64,
    /// Key locks of migrating slots.
    pub locks: Arc<crate::locks::KeyLocks>,
    /// Most client connections at once.
    pub max_clients: usize,
    /// Close clients idle this long (`None`: never).
    pub client_timeout: Option<Duration>,
    /// A begun request must be complete within this (`None`: no limit).
    pub request_timeout: Option<Duration>,
}

impl Shared {
    /// Why writes are refused right now, if they are: no broker has vouched
    /// for the topology for `fence_after`, so a failover may already have
    /// moved this proxy's masters elsewhere (DESIGN.md §5).
    pub fn fenced(&self) -> Option<String> {
        let age = self.feed.age()?;
        (age > self.fence_after).then(|| {
            format!(
                "CLUSTERDOWN proxy {} is fenced: no word from any broker for {} ms; writes are refused until one answers",
                self.proxy_id,
                age.as_millis()
            )
        })
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("proxy_id", &self.proxy_id)
            .finish()
    }
}

/// How a listener presents the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerMode {
    /// As the cluster's config says (cluster protocol unless plain).
    Configured,
    /// Always plain: every key served here by forwarding.
    Plain,
}

/// A future producing an encoded reply.
pub(crate) type ReplyFuture = Pin<Box<dyn Future<Output = Bytes> + Send>>;

/// A reply already known, where a future is expected.
pub(crate) fn known(reply: Bytes) -> ReplyFuture {
    Box::pin(std::future::ready(reply))
}

/// A reply slot in the client's queue.
pub(crate) enum Pending {
    /// Already known.
    Ready(Bytes),
    /// Waiting for a shared backend.
    Wait(ReplyRx),
    /// Work that must run in order with the session's other stateful work
    /// (transactions, subscriptions, blocking commands): polled only once it
    /// reaches the front of the queue, and nothing after it is dispatched
    /// until it is done.
    Later(ReplyFuture),
    /// Stateless work (forwarding, gathering) running concurrently, so a
    /// pipeline is not serialised behind it.
    Spawned(tokio::task::JoinHandle<Bytes>),
}

impl Pending {
    /// Runs `fut` concurrently.
    pub fn spawn(fut: ReplyFuture) -> Self {
        Pending::Spawned(tokio::spawn(fut))
    }
}

/// What dispatching one request produced.
pub(crate) enum Dispatch {
    /// A reply, in order.
    Reply(Pending),
    /// A subscription command's confirmations: in order, and messages are
    /// held back until it is delivered.
    Subscription(ReplyFuture),
    /// Run this request only once every earlier reply is delivered.
    AfterQueue,
}

/// Per-connection state.
pub(crate) struct Session {
    pub id: u64,
    pub peer_addr: String,
    pub local_addr: String,
    pub created: Instant,
    pub listener: ListenerMode,
    /// Connected over TLS: peers are shown at their TLS addresses.
    pub tls: bool,
    /// Authenticated for the cluster in `cluster`.
    pub authenticated: bool,
    /// Uid of the cluster this connection is for: the first one that served
    /// it (or that it authenticated with). Should this proxy serve another
    /// cluster later, the connection gets none of that one's keys.
    pub cluster: Option<std::sync::Arc<str>>,
    /// Authenticated as a peer proxy: cluster semantics always, PUBLISH
    /// stays local.
    pub peer: bool,
    pub protocol: Protocol,
    pub name: Option<Bytes>,
    pub readonly: bool,
    pub asking: bool,
    pub closing: bool,
    /// A blocking command is pending: dispatch nothing more until it returns.
    pub hold: bool,
    pub tx: tx::Tx,
    pub subs: pubsub::Subscriptions,
    /// Top-level name of the command being dispatched (`unknown` if it
    /// is not a command), for metrics.
    pub last_command: &'static str,
    /// Set per request: why writes are refused (fencing), if they are.
    pub fenced: Option<String>,
    /// `fenced` is current for this round of dispatching.
    pub fence_checked: bool,
}

impl Session {
    /// Whether keys of other proxies are served here by forwarding.
    pub fn plain(&self, c: &Serving) -> bool {
        !self.peer
            && (self.listener == ListenerMode::Plain
                || c.client_mode == redmesh_model::ClientMode::Plain)
    }
}

pub(crate) fn err(msg: impl Into<String>) -> Frame {
    Frame::error(msg)
}

/// The reply for a failed backend request.
pub(crate) fn backend_failure(e: &BackendError) -> Frame {
    match e {
        // Not sent: safe for the client to retry after refreshing its view.
        BackendError::Unavailable { .. } => err(format!("CLUSTERDOWN {e}")),
        // Sent, outcome unknown: an error, never OK, and no invitation to retry.
        BackendError::Lost { .. } | BackendError::Timeout { .. } => err(format!(
            "ERR {e}; the command may or may not have been applied"
        )),
    }
}

pub(crate) fn reply_bytes(r: Result<Bytes, BackendError>, proto: Protocol) -> Bytes {
    match r {
        Ok(b) => b,
        Err(e) => backend_failure(&e).to_bytes(proto),
    }
}

pub(crate) fn lost_reply(proto: Protocol) -> Bytes {
    err("ERR the proxy lost the backend reply; the command may or may not have been applied")
        .to_bytes(proto)
}

/// Awaits a shared-backend reply, encoding failures for `proto`.
pub(crate) async fn await_reply(rx: ReplyRx, proto: Protocol) -> Bytes {
    match rx.await {
        Ok(r) => reply_bytes(r, proto),
        Err(_) => lost_reply(proto),
    }
}

struct Slot {
    pending: Pending,
    subscription: bool,
    /// For metrics: the command, and when its request was read.
    command: &'static str,
    read_at: Instant,
    /// The command's trace span, if it is one of the sampled ones; it ends
    /// when the reply is written.
    span: Option<tracing::Span>,
}

/// Where a client connection comes from and goes to, for CLIENT INFO.
#[derive(Debug, Clone, Default)]
struct Endpoints {
    /// The client's address.
    peer: String,
    /// The proxy's address it connected to.
    local: String,
}

impl Endpoints {
    /// Both ends of `stream` (empty where the OS cannot tell).
    fn of(stream: &TcpStream) -> Self {
        let text =
            |a: std::io::Result<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        Self {
            peer: text(stream.peer_addr()),
            local: text(stream.local_addr()),
        }
    }
}

/// Serves one plaintext client until it quits, errs, or `shutdown` (after
/// which the replies already owed are still delivered).
pub async fn serve(
    stream: TcpStream,
    listener: ListenerMode,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let ends = Endpoints::of(&stream);
    // Owned halves: no lock between reading and writing on the hot path.
    let (rd, wr) = stream.into_split();
    serve_io(rd, wr, ends, false, listener, shared, shutdown).await;
}

/// Serves one client connecting over TLS: the handshake (bounded, as the
/// client holds a connection slot meanwhile; a failed one is counted and
/// the connection dropped), then as [`serve`].
pub async fn serve_tls(
    stream: TcpStream,
    server: &TlsServer,
    listener: ListenerMode,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let ends = Endpoints::of(&stream);
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, server.acceptor().accept(stream)).await {
        Ok(Ok(tls)) => {
            let (rd, wr) = tokio::io::split(tls);
            serve_io(rd, wr, ends, true, listener, shared, shutdown).await;
        }
        Ok(Err(e)) => {
            metrics::counter!(TLS_HANDSHAKE_FAILURES).increment(1);
            tracing::debug!(peer = %ends.peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            metrics::counter!(TLS_HANDSHAKE_FAILURES).increment(1);
            tracing::debug!(peer = %ends.peer, "TLS handshake timed out");
        }
    }
}

async fn serve_io<R, W>(
    mut rd: R,
    mut wr: W,
    ends: Endpoints,
    tls: bool,
    listener: ListenerMode,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (push_tx, mut push_rx) = mpsc::channel::<Bytes>(1024);
    let mut s = Session {
        id: shared.next_client_id.fetch_add(1, Ordering::Relaxed),
        peer_addr: ends.peer,
        local_addr: ends.local,
        created: Instant::now(),
        listener,
        tls,
        authenticated: false,
        cluster: None,
        peer: false,
        protocol: Protocol::Resp2,
        name: None,
        readonly: false,
        asking: false,
        closing: false,
        hold: false,
        tx: tx::Tx::default(),
        subs: pubsub::Subscriptions::new(push_tx),
        last_command: "",
        fenced: None,
        fence_checked: false,
    };
    let mut decoder = RequestDecoder::new(shared.limits);
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut queue: VecDeque<Slot> = VecDeque::new();
    let mut stalled: Option<Request> = None;
    let mut subs_pending = 0usize;
    let mut reading = true;
    let mut tally = tally::Tally::default();
    let mut read_at = Instant::now();
    let mut commands_seen = 0u64;
    let mut in_flight = 0usize;
    // When the request now in `inbuf` began arriving (`None`: none begun).
    let mut partial_since: Option<Instant> = None;
    // Last request or reply, for the idle timeout.
    let mut active_at = Instant::now();
    loop {
        // Move every reply that is ready, in order, into the output.
        while let Some(front) = queue.front_mut() {
            let bytes = match &mut front.pending {
                Pending::Ready(b) => std::mem::take(b),
                Pending::Wait(rx) => match rx.try_recv() {
                    Ok(r) => reply_bytes(r, s.protocol),
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                        lost_reply(s.protocol)
                    }
                },
                Pending::Later(_) => break,
                Pending::Spawned(h) => match futures::FutureExt::now_or_never(h) {
                    Some(Ok(b)) => b,
                    Some(Err(_)) => lost_reply(s.protocol),
                    None => break,
                },
            };
            let result = tally.reply(front.command, &bytes, front.read_at);
            if let Some(span) = front.span.take() {
                span.record("redmesh.result", result);
            }
            out.extend_from_slice(&bytes);
            if front.subscription {
                subs_pending -= 1;
            }
            queue.pop_front();
        }
        if !out.is_empty() {
            active_at = Instant::now();
            // flush: a no-op on TCP, and pushes out a TLS record.
            if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                break;
            }
            metrics::counter!(tally::BYTES_OUT).increment(out.len() as u64);
            tally.flush(Instant::now());
            out.clear();
        }
        if queue.is_empty() {
            s.hold = false;
            if s.closing {
                break;
            }
        }
        // Dispatch what is buffered, as far as holds allow.
        let mut progressed = false;
        s.fence_checked = false;
        while !s.hold && !s.closing && queue.len() < MAX_PENDING {
            let req = match stalled.take() {
                Some(r) => r,
                None => match decoder.decode_request(&mut inbuf) {
                    Ok(Some(r)) => {
                        partial_since = None;
                        active_at = read_at;
                        r
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(client = s.id, error = %e, "protocol error; closing");
                        close_with(&mut queue, &mut s, e.to_frame(), read_at);
                        progressed = true;
                        break;
                    }
                },
            };
            let table = shared.table.borrow().clone();
            s.last_command = "unknown";
            let dispatched = commands::dispatch(&shared, &table, &mut s, &req, queue.is_empty());
            let command = s.last_command;
            commands_seen += 1;
            let sampled =
                shared.trace_every > 0 && commands_seen.is_multiple_of(shared.trace_every);
            let client = s.id;
            let span = || sampled.then(|| tally::command_span(command, client));
            match dispatched {
                Dispatch::Reply(pending) => {
                    // Stateful work runs only at the front of the queue, so
                    // later requests must wait for it, or they would reach
                    // Redis first (a GET overtaking the EXEC before it).
                    if matches!(pending, Pending::Later(_)) {
                        s.hold = true;
                    }
                    queue.push_back(Slot {
                        pending,
                        subscription: false,
                        command,
                        read_at,
                        span: span(),
                    })
                }
                Dispatch::Subscription(fut) => {
                    subs_pending += 1;
                    queue.push_back(Slot {
                        pending: Pending::Later(fut),
                        subscription: true,
                        command,
                        read_at,
                        span: span(),
                    });
                }
                Dispatch::AfterQueue => {
                    stalled = Some(req);
                    break;
                }
            }
            progressed = true;
        }
        if progressed {
            continue;
        }
        // Nothing left to answer and no more input can arrive (a partial
        // request in the buffer can never complete).
        if queue.is_empty() && !reading && stalled.is_none() {
            break;
        }
        if inbuf.capacity() > 1 << 20 && inbuf.is_empty() {
            // Give back the memory of a past huge request.
            inbuf = BytesMut::with_capacity(16 * 1024);
        }
        // Published only when the session is about to wait, so a pipeline
        // costs one update, not one per request.
        if queue.len() != in_flight {
            let gauge = metrics::gauge!(tally::IN_FLIGHT);
            gauge.increment(queue.len() as f64 - in_flight as f64);
            in_flight = queue.len();
        }
        let can_read =
            reading && !s.closing && !s.hold && stalled.is_none() && queue.len() < MAX_PENDING;
        let deliver_messages = subs_pending == 0 && s.subs.active();
        let (deadline, expiry) = deadline(
            &shared,
            &mut partial_since,
            Waiting {
                on_client: can_read,
                partial: !inbuf.is_empty(),
                idle: queue.is_empty() && !s.subs.active() && stalled.is_none(),
            },
            read_at,
            active_at,
        );
        tokio::select! {
            _ = wait_front(queue.front_mut(), s.protocol), if !queue.is_empty() => {}
            read = rd.read_buf(&mut inbuf), if can_read => match read {
                Ok(0) | Err(_) => reading = false,
                Ok(n) => {
                    read_at = Instant::now();
                    metrics::counter!(tally::BYTES_IN).increment(n as u64);
                }
            },
            msg = push_rx.recv(), if deliver_messages => match msg {
                // An empty message means a subscription connection died:
                // close, as a Redis node would, so the client resubscribes.
                Some(m) if !m.is_empty() => {
                    if wr.write_all(&m).await.is_err() || wr.flush().await.is_err() {
                        break;
                    }
                    metrics::counter!(tally::BYTES_OUT).increment(m.len() as u64);
                }
                _ => s.closing = true,
            },
            _ = tokio::time::sleep_until(deadline.into()), if expiry.is_some() => {
                match expiry {
                    Some(Expiry::Request(limit)) => {
                        tracing::debug!(client = s.id, "request not completed in time; closing");
                        metrics::counter!(CLIENTS_REJECTED, "reason" => "request_timeout").increment(1);
                        let reply = err(format!(
                            "ERR timed out reading a request: it was not complete within {} ms",
                            limit.as_millis()
                        ));
                        close_with(&mut queue, &mut s, reply, read_at);
                        reading = false;
                    }
                    Some(Expiry::Idle) => {
                        tracing::debug!(client = s.id, "idle client timed out; closing");
                        metrics::counter!(CLIENTS_REJECTED, "reason" => "idle").increment(1);
                        break;
                    }
                    None => {}
                }
            }
            _ = shutdown.cancelled(), if reading => reading = false,
            // Unreachable by the checks above; ending the session beats
            // spinning if a future change breaks them.
            else => break,
        }
    }
    metrics::gauge!(tally::IN_FLIGHT).decrement(in_flight as f64);
}

/// Queues `reply` after what is owed and closes once it is written: how
/// the session answers a request it cannot read (protocol error, timeout).
fn close_with(queue: &mut VecDeque<Slot>, s: &mut Session, reply: Frame, read_at: Instant) {
    queue.push_back(Slot {
        pending: Pending::Ready(reply.to_bytes(s.protocol)),
        subscription: false,
        command: "protocol_error",
        read_at,
        span: None,
    });
    s.closing = true;
}

/// What a session waits for, for its timeouts.
struct Waiting {
    /// Reading from the client (nothing holds its requests back).
    on_client: bool,
    /// Part of a request is buffered.
    partial: bool,
    /// Nothing is owed to the client and it is not subscribed or blocked.
    idle: bool,
}

/// Which timeout a session's deadline is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// A begun request was not completed within the limit.
    Request(Duration),
    /// No request for the client timeout.
    Idle,
}

/// The session's next deadline, if a timeout applies: the rest of a begun
/// request, else the idle limit. Tracks when the partial request began.
fn deadline(
    shared: &Shared,
    partial_since: &mut Option<Instant>,
    w: Waiting,
    read_at: Instant,
    active_at: Instant,
) -> (Instant, Option<Expiry>) {
    if !(w.on_client && w.partial) {
        *partial_since = None;
    }
    let far = Instant::now() + Duration::from_secs(86_400);
    if w.on_client && w.partial {
        let since = *partial_since.get_or_insert(read_at);
        if let Some(limit) = shared.request_timeout {
            return (since + limit, Some(Expiry::Request(limit)));
        }
    }
    match shared.client_timeout {
        Some(limit) if w.on_client && w.idle => (active_at + limit, Some(Expiry::Idle)),
        _ => (far, None),
    }
}

/// Resolves when the front reply is ready (storing it), or at once if it is.
async fn wait_front(front: Option<&mut Slot>, proto: Protocol) {
    let Some(slot) = front else { return };
    let ready = match &mut slot.pending {
        Pending::Ready(_) => return,
        Pending::Wait(rx) => await_reply_mut(rx, proto).await,
        Pending::Later(fut) => fut.await,
        Pending::Spawned(h) => h.await.unwrap_or_else(|_| lost_reply(proto)),
    };
    slot.pending = Pending::Ready(ready);
}

async fn await_reply_mut(rx: &mut ReplyRx, proto: Protocol) -> Bytes {
    match rx.await {
        Ok(r) => reply_bytes(r, proto),
        Err(_) => lost_reply(proto),
    }
}
