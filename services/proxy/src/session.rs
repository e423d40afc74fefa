//! One client connection: decode pipelined requests, dispatch each, and
//! write the replies strictly in request order.
//!
//! Dispatch never waits: a forwarded request only queues on a backend and
//! leaves a pending reply in the client's queue, so a pipeline of N commands
//! reaches Redis as one batch. Reading pauses while too many replies are
//! pending, which bounds the memory one client can hold.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redmesh_model::{key_slot, node_id, password_digest, ProxyId};
use redmesh_resp::command::{self, flags, CommandInfo};
use redmesh_resp::{Frame, Limits, Protocol, Request, RequestDecoder};
use redmesh_runtime::CancellationToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::backend::{BackendError, ReplyRx};
use crate::routing::{RouteTable, Serving, SlotRoute};

/// Most replies pending per client before the proxy stops reading from it.
const MAX_PENDING: usize = 1024;

/// State shared by every session of the proxy.
pub struct Shared {
    /// This proxy.
    pub proxy_id: ProxyId,
    /// Latest route table.
    pub table: watch::Receiver<Arc<RouteTable>>,
    /// Protocol limits.
    pub limits: Limits,
    /// Next client id.
    pub next_client_id: std::sync::atomic::AtomicU64,
    /// Connected clients (for metrics and GetInfo).
    pub clients: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("proxy_id", &self.proxy_id)
            .finish()
    }
}

/// A reply slot in the client's queue.
enum Pending {
    /// Already known.
    Ready(Bytes),
    /// Waiting for a backend.
    Wait(ReplyRx),
}

/// Per-connection state.
struct Session {
    id: u64,
    authenticated: bool,
    protocol: Protocol,
    name: Option<Bytes>,
    closing: bool,
}

fn err(msg: impl Into<String>) -> Frame {
    Frame::error(msg)
}

fn backend_failure(e: &BackendError) -> Frame {
    match e {
        // Not sent: safe for the client to retry after refreshing its view.
        BackendError::Unavailable { .. } => err(format!("CLUSTERDOWN {e}")),
        // Sent, outcome unknown: an error, never OK, and no invitation to retry.
        BackendError::Lost { .. } | BackendError::Timeout { .. } => err(format!(
            "ERR {e}; the command may or may not have been applied"
        )),
    }
}

/// Serves one client until it quits, errs, or `shutdown` (after which the
/// replies already owed are still delivered).
pub async fn serve(stream: TcpStream, shared: Arc<Shared>, shutdown: CancellationToken) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut session = Session {
        id: shared
            .next_client_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        authenticated: false,
        protocol: Protocol::Resp2,
        name: None,
        closing: false,
    };
    let mut decoder = RequestDecoder::new(shared.limits);
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut queue: VecDeque<Pending> = VecDeque::new();
    let mut reading = true;
    loop {
        // Move every reply that is ready, in order, into the output.
        while let Some(front) = queue.front_mut() {
            let bytes = match front {
                Pending::Ready(b) => std::mem::take(b),
                Pending::Wait(rx) => match rx.try_recv() {
                    Ok(r) => reply_bytes(r, session.protocol),
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                        lost_reply(session.protocol)
                    }
                },
            };
            out.extend_from_slice(&bytes);
            queue.pop_front();
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        if (session.closing || !reading) && queue.is_empty() {
            break;
        }
        let can_read = reading && !session.closing && queue.len() < MAX_PENDING;
        tokio::select! {
            _ = wait_front(queue.front_mut(), session.protocol), if !queue.is_empty() => {}
            read = rd.read_buf(&mut inbuf), if can_read => {
                match read {
                    Ok(0) | Err(_) => reading = false,
                    Ok(_) => {
                        let table = shared.table.borrow().clone();
                        loop {
                            match decoder.decode_request(&mut inbuf) {
                                Ok(Some(req)) => {
                                    queue.push_back(dispatch(&shared, &table, &mut session, &req));
                                    if session.closing {
                                        break;
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::debug!(client = session.id, error = %e, "protocol error; closing");
                                    queue.push_back(Pending::Ready(e.to_frame().to_bytes(session.protocol)));
                                    session.closing = true;
                                    break;
                                }
                            }
                        }
                        if inbuf.capacity() > 1 << 20 && inbuf.is_empty() {
                            // Give back the memory of a past huge request.
                            inbuf = BytesMut::with_capacity(16 * 1024);
                        }
                    }
                }
            }
            _ = shutdown.cancelled(), if reading => reading = false,
        }
    }
}

/// Resolves when the front reply is ready (storing it), or at once if it is.
async fn wait_front(front: Option<&mut Pending>, proto: Protocol) {
    let Some(p) = front else { return };
    if let Pending::Wait(rx) = p {
        let r = rx.await;
        *p = Pending::Ready(match r {
            Ok(r) => reply_bytes(r, proto),
            Err(_) => lost_reply(proto),
        });
    }
}

fn reply_bytes(r: Result<Bytes, BackendError>, proto: Protocol) -> Bytes {
    match r {
        Ok(b) => b,
        Err(e) => backend_failure(&e).to_bytes(proto),
    }
}

fn lost_reply(proto: Protocol) -> Bytes {
    err("ERR the proxy lost the backend reply; the command may or may not have been applied")
        .to_bytes(proto)
}

fn ready(f: Frame, s: &Session) -> Pending {
    Pending::Ready(f.to_bytes(s.protocol))
}

fn lower(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_lowercase()
}

/// Redis's reply to an unknown command.
fn unknown_command(req: &Request) -> Frame {
    let args: String = req.args()[1..]
        .iter()
        .take(20)
        .map(|a| format!("'{}' ", String::from_utf8_lossy(&a[..a.len().min(128)])))
        .collect();
    err(format!(
        "ERR unknown command '{}', with args beginning with: {args}",
        String::from_utf8_lossy(&req.name()[..req.name().len().min(128)])
    ))
}

fn wrong_arity(cmd: &CommandInfo) -> Frame {
    err(format!(
        "ERR wrong number of arguments for '{}' command",
        cmd.name
    ))
}

/// Decides what to do with one request.
fn dispatch(shared: &Shared, table: &RouteTable, s: &mut Session, req: &Request) -> Pending {
    let args = req.args();
    let Some(cmd) = command::lookup(args) else {
        return ready(unknown_command(req), s);
    };
    if !cmd.arity_ok(args.len()) {
        return ready(wrong_arity(cmd), s);
    }
    let serving = table.serving.as_ref().ok();
    let needs_auth = serving.is_some_and(|c| c.password_sha256.is_some());
    if needs_auth && !s.authenticated && !cmd.has(flags::NO_AUTH) {
        return ready(err("NOAUTH Authentication required."), s);
    }
    let top = cmd.name.split('|').next().unwrap_or(cmd.name);
    match top {
        "ping" => ready(
            match args.get(1) {
                Some(msg) => Frame::Bulk(msg.clone()),
                None => Frame::simple("PONG"),
            },
            s,
        ),
        "echo" => ready(Frame::Bulk(args[1].clone()), s),
        "quit" => {
            s.closing = true;
            ready(Frame::ok(), s)
        }
        "select" => ready(
            if args[1].as_ref() == b"0" {
                Frame::ok()
            } else {
                err("ERR SELECT is not allowed in cluster mode")
            },
            s,
        ),
        "auth" => ready(auth(s, serving, &args[1..]), s),
        "hello" => ready(hello(s, serving, &args[1..]), s),
        "asking" | "readonly" | "readwrite" => ready(Frame::ok(), s),
        "cluster" => ready(cluster(shared, table, args), s),
        "client" => ready(client(s, args), s),
        "command" => match serving.and_then(any_ready_node) {
            // Redis's own metadata, from a local node.
            Some(n) => Pending::Wait(n.get(s.protocol).send(req.raw().clone())),
            None => ready(not_serving(table), s),
        },
        _ => route(table, s, cmd, req),
    }
}

fn not_serving(table: &RouteTable) -> Frame {
    match &table.serving {
        Ok(_) => err("CLUSTERDOWN no local Redis node is ready"),
        Err(reason) => err(format!("CLUSTERDOWN {reason}")),
    }
}

fn any_ready_node(c: &Serving) -> Option<&crate::backend::NodeLink> {
    (0..2)
        .find(|&i| c.node_ready[i].is_ok())
        .map(|i| &c.nodes[i])
}

/// Commands that carry connection state, block, or reconfigure the server
/// cannot share a multiplexed backend connection; this version refuses them
/// by name rather than misroute them.
fn refusal(cmd: &CommandInfo) -> Option<String> {
    let top = cmd.name.split('|').next().unwrap_or(cmd.name);
    if matches!(top, "multi" | "exec" | "discard" | "watch" | "unwatch") {
        return Some(format!(
            "ERR '{top}' (transactions) is not supported by this version of redmesh"
        ));
    }
    if cmd.has(flags::BLOCKING)
        || matches!(
            top,
            "blpop"
                | "brpop"
                | "brpoplpush"
                | "blmove"
                | "bzpopmin"
                | "bzpopmax"
                | "blmpop"
                | "bzmpop"
                | "wait"
                | "waitaof"
        )
    {
        return Some(format!(
            "ERR blocking command '{}' is not supported by this version of redmesh",
            cmd.name
        ));
    }
    if cmd.has(flags::PUBSUB) {
        return Some(format!(
            "ERR pub/sub command '{}' is not supported by this version of redmesh",
            cmd.name
        ));
    }
    if matches!(
        top,
        "move" | "swapdb" | "monitor" | "sync" | "psync" | "replconf" | "reset"
    ) || cmd.has(flags::ADMIN)
    {
        return Some(format!("ERR '{}' is not allowed through redmesh", cmd.name));
    }
    None
}

/// Routes a data command by the slot of its keys.
fn route(table: &RouteTable, s: &Session, cmd: &CommandInfo, req: &Request) -> Pending {
    if let Some(why) = refusal(cmd) {
        return ready(err(why), s);
    }
    let c = match &table.serving {
        Ok(c) => c,
        Err(_) => return ready(not_serving(table), s),
    };
    let args = req.args();
    let positions = match command::key_positions(cmd, args) {
        Ok(p) => p,
        Err(e) => return ready(err(format!("ERR {e}")), s),
    };
    let mut slot = None;
    for &p in &positions {
        let Some(key) = args.get(p) else { continue };
        let k = key_slot(key);
        match slot {
            None => slot = Some(k),
            Some(prev) if prev != k => {
                return ready(
                    err("CROSSSLOT Keys in request don't hash to the same slot"),
                    s,
                );
            }
            _ => {}
        }
    }
    let Some(slot) = slot else {
        // Keyless data commands (DBSIZE, SCAN, RANDOMKEY, ...) act on this
        // proxy's local master, as on one node of a Redis Cluster.
        return match (0..2)
            .find(|&i| c.node_ready[i].is_ok() && c.slots.contains(&SlotRoute::Local(i as u8)))
        {
            Some(i) => Pending::Wait(c.nodes[i].get(s.protocol).send(req.raw().clone())),
            None => ready(err("CLUSTERDOWN this proxy serves no slots right now"), s),
        };
    };
    match c.slots[usize::from(slot)] {
        SlotRoute::Local(n) => match &c.node_ready[usize::from(n)] {
            Ok(()) => Pending::Wait(
                c.nodes[usize::from(n)]
                    .get(s.protocol)
                    .send(req.raw().clone()),
            ),
            Err(why) => ready(
                err(format!("CLUSTERDOWN slot {slot} is not available: {why}")),
                s,
            ),
        },
        SlotRoute::Moved(i) => {
            let peer = &c.peers[usize::from(i)];
            ready(err(format!("MOVED {slot} {}", peer.addr)), s)
        }
        SlotRoute::Down => ready(err("CLUSTERDOWN Hash slot not served"), s),
    }
}

fn auth(s: &mut Session, serving: Option<&Serving>, args: &[Bytes]) -> Frame {
    let (user, pass) = match args {
        [pass] => (None, pass),
        [user, pass] => (Some(user), pass),
        _ => return err("ERR syntax error"),
    };
    let Some(want) = serving.and_then(|c| c.password_sha256) else {
        return err(
            "ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        );
    };
    let user_ok = user.is_none_or(|u| u.as_ref() == b"default");
    if user_ok && password_digest(pass) == want {
        s.authenticated = true;
        Frame::ok()
    } else {
        err("WRONGPASS invalid username-password pair or user is disabled.")
    }
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`, as Redis 7: the
/// protocol switches only if everything else succeeded, and the reply is
/// already in the new protocol.
fn hello(s: &mut Session, serving: Option<&Serving>, args: &[Bytes]) -> Frame {
    let mut i = 0;
    let mut protocol = s.protocol;
    if let Some(v) = args.first() {
        protocol = match v.as_ref() {
            b"2" => Protocol::Resp2,
            b"3" => Protocol::Resp3,
            _ => return err("NOPROTO unsupported protocol version"),
        };
        i = 1;
    }
    let mut name = None;
    while i < args.len() {
        match lower(&args[i]).as_str() {
            "auth" if i + 2 < args.len() => {
                let reply = auth(s, serving, &args[i + 1..i + 3]);
                if reply.is_error() {
                    return reply;
                }
                i += 3;
            }
            "setname" if i + 1 < args.len() => {
                name = Some(args[i + 1].clone());
                i += 2;
            }
            other => return err(format!("ERR Syntax error in HELLO option '{other}'")),
        }
    }
    if serving.is_some_and(|c| c.password_sha256.is_some()) && !s.authenticated {
        return err("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
    }
    if name.is_some() {
        s.name = name;
    }
    s.protocol = protocol;
    Frame::Map(vec![
        (Frame::bulk("server"), Frame::bulk("redis")),
        (Frame::bulk("version"), Frame::bulk("7.0.15")),
        (
            Frame::bulk("proto"),
            Frame::Integer(if protocol == Protocol::Resp3 { 3 } else { 2 }),
        ),
        (Frame::bulk("id"), Frame::Integer(s.id as i64)),
        (Frame::bulk("mode"), Frame::bulk("cluster")),
        (Frame::bulk("role"), Frame::bulk("master")),
        (Frame::bulk("modules"), Frame::Array(Vec::new())),
    ])
}

fn client(s: &mut Session, args: &[Bytes]) -> Frame {
    let sub = args.get(1).map(|a| lower(a)).unwrap_or_default();
    match (sub.as_str(), args.len()) {
        ("setname", 3) => {
            if args[2].iter().any(|b| *b <= b' ' || *b > b'~') {
                return err(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                );
            }
            s.name = (!args[2].is_empty()).then(|| args[2].clone());
            Frame::ok()
        }
        ("getname", 2) => s.name.clone().map_or(Frame::Null, Frame::Bulk),
        ("id", 2) => Frame::Integer(s.id as i64),
        // redis-py and other libraries announce themselves; accept quietly.
        ("setinfo", 4) => Frame::ok(),
        _ => err(format!(
            "ERR CLIENT {} is not supported by this version of redmesh",
            sub.to_ascii_uppercase()
        )),
    }
}

fn cluster(shared: &Shared, table: &RouteTable, args: &[Bytes]) -> Frame {
    let sub = args.get(1).map(|a| lower(a)).unwrap_or_default();
    let serving = table.serving.as_ref();
    match sub.as_str() {
        "myid" => Frame::bulk(node_id(&shared.proxy_id)),
        "keyslot" => Frame::Integer(i64::from(key_slot(&args[2]))),
        "info" => match serving {
            Ok(c) => Frame::Verbatim(Bytes::from_static(b"txt"), c.cluster_info.clone()),
            Err(_) => Frame::Verbatim(
                Bytes::from_static(b"txt"),
                Bytes::from_static(b"cluster_state:fail\r\ncluster_slots_assigned:0\r\ncluster_slots_ok:0\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:1\r\ncluster_size:0\r\ncluster_current_epoch:0\r\ncluster_my_epoch:0\r\ncluster_stats_messages_sent:0\r\ncluster_stats_messages_received:0\r\ntotal_cluster_links_buffer_limit_exceeded:0\r\n"),
            ),
        },
        "nodes" | "slots" | "shards" => match serving {
            Ok(c) => match sub.as_str() {
                "nodes" => Frame::Verbatim(Bytes::from_static(b"txt"), c.cluster_nodes.clone()),
                "slots" => c.cluster_slots.clone(),
                _ => c.cluster_shards.clone(),
            },
            Err(reason) => err(format!("CLUSTERDOWN {reason}")),
        },
        "help" => Frame::Array(
            [
                "CLUSTER <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "INFO", "    Return information about the cluster.",
                "KEYSLOT <key>", "    Return the hash slot for <key>.",
                "MYID", "    Return the node id.",
                "NODES", "    Return cluster configuration seen by node.",
                "SHARDS", "    Return information about slot range mappings and the nodes associated with them.",
                "SLOTS", "    Return information about slots range mappings.",
                "HELP", "    Print this help.",
            ]
            .into_iter()
            .map(Frame::simple)
            .collect(),
        ),
        _ => err(format!(
            "ERR unknown subcommand '{}'. Try CLUSTER HELP.",
            String::from_utf8_lossy(args.get(1).map_or(&b""[..], |a| a.as_ref()))
        )),
    }
}

/// How long a draining proxy waits for sessions to deliver owed replies.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
