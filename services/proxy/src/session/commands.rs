//! The dispatcher and the commands the proxy answers itself: connection
//! commands (PING, AUTH, HELLO, SELECT, CLIENT, RESET…) and CLUSTER.
//! Everything else goes to `route`, `tx` or `pubsub`.

use std::sync::Arc;

use bytes::Bytes;
use redmesh_model::{key_slot, node_id, password_digest};
use redmesh_resp::command::{self, flags, CommandInfo};
use redmesh_resp::{Frame, Protocol, Request};

use super::{err, pubsub, route, tx, Dispatch, Pending, Session, Shared};
use crate::routing::{RouteTable, Serving, PEER_USER};

pub(super) fn ready(f: Frame, s: &Session) -> Dispatch {
    Dispatch::Reply(Pending::Ready(f.to_bytes(s.protocol)))
}

pub(super) fn lower(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_lowercase()
}

/// The command's top-level name (`object|encoding` → `object`).
pub(super) fn top_name(cmd: &CommandInfo) -> &'static str {
    cmd.top_name()
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

pub(super) fn wrong_arity(cmd: &CommandInfo) -> Frame {
    err(format!(
        "ERR wrong number of arguments for '{}' command",
        cmd.name
    ))
}

const SUBSCRIBE_CONTEXT: &[&str] = &[
    "subscribe",
    "psubscribe",
    "ssubscribe",
    "unsubscribe",
    "punsubscribe",
    "sunsubscribe",
    "ping",
    "quit",
    "reset",
];

/// Commands a connection may send whatever cluster the proxy serves: they
/// touch no cluster's data.
const CONNECTION_LEVEL: [&str; 11] = [
    "ping",
    "echo",
    "quit",
    "reset",
    "select",
    "auth",
    "hello",
    "asking",
    "readonly",
    "readwrite",
    "client",
];

/// Decides what to do with one request. `idle`: no reply is pending.
pub(super) fn dispatch(
    shared: &Shared,
    table: &Arc<RouteTable>,
    s: &mut Session,
    req: &Request,
    idle: bool,
) -> Dispatch {
    let args = req.args();
    let Some(cmd) = command::lookup(args) else {
        // Inside MULTI an unknown command also dooms the transaction.
        s.tx.fail_if_queuing();
        return ready(unknown_command(req), s);
    };
    s.last_command = cmd.top_name();
    if !cmd.arity_ok(args.len()) {
        s.tx.fail_if_queuing();
        return ready(wrong_arity(cmd), s);
    }
    let current = table.serving.as_ref().ok();
    if let (None, Some(c)) = (&s.cluster, current) {
        s.cluster = Some(c.uid.clone());
    }
    // Only the cluster the connection is for serves it: a proxy moved to
    // another tenant's cluster must not serve it to this connection.
    let serving = current.filter(|c| s.cluster.as_deref() == Some(&*c.uid));
    let needs_auth = serving.is_some_and(|c| c.password_sha256.is_some());
    if needs_auth && !s.authenticated && !cmd.has(flags::NO_AUTH) {
        return ready(err("NOAUTH Authentication required."), s);
    }
    let top = top_name(cmd);
    if serving.is_none() && s.cluster.is_some() && !CONNECTION_LEVEL.contains(&top) {
        s.tx.fail_if_queuing();
        return ready(route::stray(table, s, cmd, args), s);
    }
    if s.subs.active() && s.protocol == Protocol::Resp2 && !SUBSCRIBE_CONTEXT.contains(&top) {
        return ready(
            err(format!(
                "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                cmd.name
            )),
            s,
        );
    }
    if s.tx.in_multi()
        && !matches!(
            top,
            "exec" | "discard" | "multi" | "watch" | "quit" | "reset"
        )
    {
        return tx::queue(table, s, cmd, req);
    }
    // Asked once per round of buffered requests, not per request: it reads
    // the clock, and a round takes microseconds.
    if !s.fence_checked {
        s.fenced = shared.fenced();
        s.fence_checked = true;
    }
    // ASKING applies to the very next command only.
    let asking = std::mem::take(&mut s.asking);
    match top {
        "ping" => ready(ping(s, args), s),
        "echo" => ready(Frame::Bulk(args[1].clone()), s),
        "quit" => {
            s.closing = true;
            ready(Frame::ok(), s)
        }
        "reset" => {
            reset(s);
            ready(Frame::simple("RESET"), s)
        }
        "select" => ready(
            if args[1].as_ref() == b"0" {
                Frame::ok()
            } else {
                err("ERR SELECT is not allowed in cluster mode")
            },
            s,
        ),
        // Against the cluster served now: authenticating with its password
        // makes the connection one of its own.
        "auth" => ready(auth(s, current, &args[1..]), s),
        "hello" => ready(hello(s, current, &args[1..]), s),
        "asking" => {
            s.asking = true;
            ready(Frame::ok(), s)
        }
        "readonly" => {
            s.readonly = true;
            ready(Frame::ok(), s)
        }
        "readwrite" => {
            s.readonly = false;
            ready(Frame::ok(), s)
        }
        "cluster" => route::cluster(shared, table, s, args),
        "client" => ready(client(s, args), s),
        "multi" | "exec" | "discard" | "watch" | "unwatch" => tx::command(table, s, top, req),
        "subscribe" | "psubscribe" | "ssubscribe" | "unsubscribe" | "punsubscribe" | "sunsubscribe" => {
            if !idle {
                return Dispatch::AfterQueue;
            }
            pubsub::command(table, s, top, req)
        }
        "publish" => pubsub::publish(table, s, req),
        "wait" | "waitaof" => ready(
            err(format!(
                "ERR '{top}' is not available through redmesh: replication acknowledgement is a per-cluster durability setting"
            )),
            s,
        ),
        _ => route::data(shared, table, s, cmd, req, asking),
    }
}

fn ping(s: &Session, args: &[Bytes]) -> Frame {
    let msg = args.get(1).cloned();
    if s.subs.active() && s.protocol == Protocol::Resp2 {
        // Redis answers PING in subscribed mode with a pong message.
        return Frame::Array(vec![
            Frame::bulk("pong"),
            Frame::Bulk(msg.unwrap_or_default()),
        ]);
    }
    msg.map_or(Frame::simple("PONG"), Frame::Bulk)
}

/// `RESET`: back to a fresh connection's state.
fn reset(s: &mut Session) {
    s.tx = tx::Tx::default();
    s.subs.clear();
    s.readonly = false;
    s.asking = false;
    s.protocol = Protocol::Resp2;
    s.name = None;
    s.authenticated = false;
    s.cluster = None;
    s.peer = false;
}

/// Constant-time equality, so a peer secret cannot be guessed by timing.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn auth(s: &mut Session, serving: Option<&Serving>, args: &[Bytes]) -> Frame {
    let (user, pass) = match args {
        [pass] => (None, pass),
        [user, pass] => (Some(user), pass),
        _ => return err("ERR syntax error"),
    };
    let wrongpass = || err("WRONGPASS invalid username-password pair or user is disabled.");
    if user.is_some_and(|u| u.as_ref() == PEER_USER.as_bytes()) {
        return match serving {
            Some(c) if !c.peer_secret.is_empty() && same_secret(pass, c.peer_secret.as_bytes()) => {
                s.peer = true;
                s.authenticated = true;
                s.cluster = Some(c.uid.clone());
                Frame::ok()
            }
            _ => wrongpass(),
        };
    }
    let Some((uid, want)) = serving.and_then(|c| Some((&c.uid, c.password_sha256?))) else {
        return err(
            "ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        );
    };
    let user_ok = user.is_none_or(|u| u.as_ref() == b"default");
    if user_ok && same_secret(&password_digest(pass), &want) {
        s.authenticated = true;
        s.cluster = Some(uid.clone());
        Frame::ok()
    } else {
        wrongpass()
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
    let authenticated =
        s.authenticated && serving.is_some_and(|c| s.cluster.as_deref() == Some(&*c.uid));
    if serving.is_some_and(|c| c.password_sha256.is_some()) && !authenticated {
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
                return err("ERR Client names cannot contain spaces, newlines or special characters.");
            }
            s.name = (!args[2].is_empty()).then(|| args[2].clone());
            Frame::ok()
        }
        ("getname", 2) => s.name.clone().map_or(Frame::Null, Frame::Bulk),
        ("id", 2) => Frame::Integer(s.id as i64),
        ("info", 2) => Frame::Verbatim(Bytes::from_static(b"txt"), Bytes::from(client_info_line(s))),
        // redis-py and other libraries announce themselves; accept quietly.
        ("setinfo", 4) => Frame::ok(),
        ("no-evict" | "no-touch", 3) => Frame::ok(),
        _ => err(format!(
            "ERR CLIENT {} is not supported by redmesh (supported: SETNAME, GETNAME, ID, INFO, SETINFO)",
            sub.to_ascii_uppercase()
        )),
    }
}

/// The `CLIENT INFO` line, in Redis 7's field order.
fn client_info_line(s: &Session) -> String {
    let age = s.created.elapsed().as_secs();
    let name = s
        .name
        .as_ref()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .unwrap_or_default();
    let multi = if s.tx.in_multi() {
        s.tx.queued_len() as i64
    } else {
        -1
    };
    let flags = if s.tx.in_multi() {
        "x"
    } else if s.subs.active() {
        "P"
    } else if s.readonly {
        "r"
    } else {
        "N"
    };
    let resp = if s.protocol == Protocol::Resp3 { 3 } else { 2 };
    format!(
        "id={} addr={} laddr={} fd=0 name={name} age={age} idle=0 flags={flags} db=0 sub={} psub={} ssub={} \
         multi={multi} qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 \
         events=r cmd=client|info user=default redir=-1 resp={resp}\n",
        s.id,
        s.peer_addr,
        s.local_addr,
        s.subs.channels(),
        s.subs.patterns(),
        s.subs.shard_channels(),
    )
}

/// CLUSTER subcommands answered from the route table.
/// `tls`: the client is connected over TLS, so it is shown TLS addresses.
pub(super) fn cluster_local(
    shared: &Shared,
    table: &RouteTable,
    tls: bool,
    args: &[Bytes],
) -> Option<Frame> {
    let sub = args.get(1).map(|a| lower(a)).unwrap_or_default();
    let serving = table.serving.as_ref();
    Some(match sub.as_str() {
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
            Ok(c) => {
                let r = c.cluster_replies(tls);
                match sub.as_str() {
                    "nodes" => Frame::Verbatim(Bytes::from_static(b"txt"), r.nodes.clone()),
                    "slots" => r.slots.clone(),
                    _ => r.shards.clone(),
                }
            }
            Err(reason) => err(format!("CLUSTERDOWN {reason}")),
        },
        "help" => Frame::Array(
            [
                "CLUSTER <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "COUNTKEYSINSLOT <slot>",
                "    Return the number of keys in <slot>.",
                "GETKEYSINSLOT <slot> <count>",
                "    Return key names stored by current node in a slot.",
                "INFO",
                "    Return information about the cluster.",
                "KEYSLOT <key>",
                "    Return the hash slot for <key>.",
                "MYID",
                "    Return the node id.",
                "NODES",
                "    Return cluster configuration seen by node.",
                "SHARDS",
                "    Return information about slot range mappings and the nodes associated with them.",
                "SLOTS",
                "    Return information about slots range mappings.",
                "HELP",
                "    Print this help.",
            ]
            .into_iter()
            .map(Frame::simple)
            .collect(),
        ),
        "countkeysinslot" | "getkeysinslot" => return None,
        _ => err(format!(
            "ERR unknown subcommand '{}'. Try CLUSTER HELP.",
            String::from_utf8_lossy(args.get(1).map_or(&b""[..], |a| a.as_ref()))
        )),
    })
}
