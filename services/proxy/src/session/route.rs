//! Data commands: keyed commands routed by slot (local node, `-MOVED`, a
//! local replica after `READONLY`, or — in plain mode — forwarded to the
//! owning proxy following its redirects), blocking commands on dedicated
//! connections, keyless commands over this proxy's masters (or the whole
//! cluster in plain mode), and plain-mode splitting of multi-key commands.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use redmesh_model::{key_slot, Compression, Slot};
use redmesh_resp::command::{self, flags, CommandInfo};
use redmesh_resp::{encode_command, parse_frame, Frame, Protocol, Request};

use super::commands::{cluster_local, lower, ready, top_name};
use super::{
    await_reply, backend_failure, err, known, Dispatch, Pending, ReplyFuture, Session, Shared,
};
use tokio::sync::watch;

use crate::compress;
use crate::locks::KeyLocks;
use crate::routing::{RouteTable, Serving, SlotRoute, Target};

/// Hops a forwarded request may take following redirects.
const MAX_HOPS: usize = 3;

fn not_serving(table: &RouteTable) -> Frame {
    match &table.serving {
        Ok(_) => err("CLUSTERDOWN no local Redis node is ready"),
        Err(reason) => err(format!("CLUSTERDOWN {reason}")),
    }
}

/// The reply to a connection made for a cluster this proxy no longer
/// serves: a cluster client is sent on to where the key's slot went, as far
/// as this proxy knows (docs/ARCHITECTURE.md); anything else is refused.
pub(super) fn stray(table: &RouteTable, s: &Session, cmd: &CommandInfo, args: &[Bytes]) -> Frame {
    let former = table
        .former
        .as_deref()
        .filter(|f| s.cluster.as_deref() == Some(&*f.uid));
    let Some(f) = former else {
        return err(
            "CLUSTERDOWN this connection was made for a cluster this proxy no longer serves; \
             connect to one of its members",
        );
    };
    if f.password && !s.authenticated {
        return err("NOAUTH Authentication required.");
    }
    let redirectable = !s.peer
        && s.listener == super::ListenerMode::Configured
        && f.client_mode == redmesh_model::ClientMode::Cluster;
    let slot = routing_positions(cmd, args)
        .ok()
        .and_then(|p| args.get(*p.first()?))
        .map(|key| key_slot(key));
    match slot.filter(|_| redirectable) {
        Some(slot) => match f.redirect(slot, s.tls) {
            Some(addr) => err(format!("MOVED {slot} {addr}")),
            None => err(format!(
                "CLUSTERDOWN slot {slot} of cluster {} has no owner this proxy knows of",
                f.name
            )),
        },
        None => err(format!(
            "CLUSTERDOWN this proxy no longer serves cluster {}; connect to one of its members",
            f.name
        )),
    }
}

/// Commands that must not pass: they reconfigure or bypass the servers
/// redmesh manages, or need a database other than 0.
fn refusal(cmd: &CommandInfo) -> Option<String> {
    let top = top_name(cmd);
    if matches!(
        top,
        "move" | "swapdb" | "monitor" | "sync" | "psync" | "replconf" | "migrate"
    ) || cmd.has(flags::ADMIN)
    {
        return Some(format!("ERR '{}' is not allowed through redmesh", cmd.name));
    }
    None
}

/// Whether this invocation blocks: BLOCKING commands always, except
/// XREAD/XREADGROUP which only block with a BLOCK option.
fn blocks(cmd: &CommandInfo, args: &[Bytes]) -> bool {
    if !cmd.has(flags::BLOCKING) {
        return false;
    }
    match top_name(cmd) {
        "xread" | "xreadgroup" => args
            .iter()
            .skip(1)
            .any(|a| a.eq_ignore_ascii_case(b"block")),
        _ => true,
    }
}

/// Key positions, plus the channel of SPUBLISH, which Redis Cluster routes
/// by slot although its key-spec marks it "not a key".
fn routing_positions(cmd: &CommandInfo, args: &[Bytes]) -> Result<Vec<usize>, String> {
    if top_name(cmd) == "spublish" {
        return Ok(vec![1]);
    }
    command::key_positions(cmd, args).map_err(|e| format!("ERR {e}"))
}

/// The single slot of the keys at `positions`, `Ok(None)` if there are none.
pub(super) fn single_slot(args: &[Bytes], positions: &[usize]) -> Result<Option<Slot>, ()> {
    let mut slot = None;
    for &p in positions {
        let Some(key) = args.get(p) else { continue };
        let k = key_slot(key);
        match slot {
            None => slot = Some(k),
            Some(prev) if prev != k => return Err(()),
            _ => {}
        }
    }
    Ok(slot)
}

/// Where a command for `slot` runs for this session, or the error reply.
/// `asking`: the client sent `ASKING` first, so an importing slot is
/// served here.
pub(super) fn target_for_slot(
    c: &Serving,
    s: &Session,
    slot: Slot,
    read_only: bool,
    asking: bool,
) -> Result<Target, Frame> {
    let entry = c.slot(slot);
    if let (true, Some(n)) = (asking, entry.importing) {
        return local_target(c, slot, n);
    }
    match entry.route {
        SlotRoute::Local(n) => local_target(c, slot, n),
        SlotRoute::Moved(i) => {
            if let (true, true, Some(r)) = (s.readonly, read_only, entry.replica) {
                return Ok(Target::Local(r));
            }
            if s.plain(c) {
                Ok(Target::Peer(i))
            } else {
                Err(err(format!(
                    "MOVED {slot} {}",
                    c.peers[usize::from(i)].client_addr(s.tls)
                )))
            }
        }
        SlotRoute::Down => Err(err("CLUSTERDOWN Hash slot not served")),
    }
}

fn local_target(c: &Serving, slot: Slot, n: u8) -> Result<Target, Frame> {
    match &c.node_ready[usize::from(n)] {
        Ok(()) => Ok(Target::Local(n)),
        Err(why) => Err(err(format!(
            "CLUSTERDOWN slot {slot} is not available: {why}"
        ))),
    }
}

/// The reply to a transaction step on a slot being migrated: Redis Cluster
/// cannot promise a transaction's keys stay on one node then either.
pub(super) fn tryagain_moving(slot: Slot) -> Frame {
    err(format!(
        "TRYAGAIN slot {slot} is being migrated; retry the transaction when it is done"
    ))
}

/// What a blocking command on a local node keeps an eye on while it
/// waits: if its slot leaves the node (a migration commits, a failover
/// moves it), Redis Cluster answers `-MOVED`; a plain Redis node would keep
/// the client blocked on keys that now live elsewhere, for ever with a zero
/// timeout. So the proxy unblocks it and redirects.
#[derive(Clone)]
struct SlotWatch {
    slot: Slot,
    node: u8,
    tables: watch::Receiver<Arc<RouteTable>>,
    /// A plain client cannot follow `-MOVED`; it gets `-TRYAGAIN`.
    plain: bool,
    /// The client is on TLS: `-MOVED` names TLS addresses.
    tls: bool,
}

impl SlotWatch {
    /// Resolves, with the client's reply, once the slot is no longer
    /// served by the node; never while it is (a migration in progress
    /// keeps it, as in Redis Cluster).
    async fn left(&mut self) -> Frame {
        loop {
            let table = self.tables.borrow_and_update().clone();
            if let Ok(c) = &table.serving {
                match c.slot(self.slot).route {
                    SlotRoute::Local(n) if n == self.node => {}
                    SlotRoute::Moved(i) if !self.plain => {
                        return err(format!(
                            "MOVED {} {}",
                            self.slot,
                            c.peers[usize::from(i)].client_addr(self.tls)
                        ))
                    }
                    _ => {
                        return err(format!(
                            "TRYAGAIN slot {} moved while the command was blocked; retry it",
                            self.slot
                        ))
                    }
                }
            }
            if self.tables.changed().await.is_err() {
                // The proxy is shutting down; the connection goes with it.
                return std::future::pending().await;
            }
        }
    }
}

/// How a command runs once its target is known.
#[derive(Clone)]
struct Exec {
    raw: Bytes,
    proto: Protocol,
    /// A blocking command (dedicated connection, no reply timeout).
    blocking: bool,
    /// For a blocking command on a local node: its slot, watched.
    watch: Option<SlotWatch>,
    /// `replica_ack`: confirm the write with `WAIT 1 <ms>`.
    ack: Option<u32>,
    /// Values in the reply may be compressed.
    decompress: bool,
}

impl Exec {
    /// Whether later requests of the client must wait for this one.
    fn holds(&self) -> bool {
        self.blocking || self.ack.is_some()
    }
}

/// Sends the command to `target` now and returns its pending reply.
fn execute(table: &Arc<RouteTable>, target: Target, e: Exec) -> Pending {
    let Ok(c) = &table.serving else {
        return Pending::Ready(not_serving(table).to_bytes(e.proto));
    };
    let Exec {
        raw,
        proto,
        blocking,
        watch,
        ack,
        decompress,
    } = e;
    if blocking || ack.is_some() {
        let pool = c.link(target).map(|l| l.dedicated(proto).clone());
        // Non-blocking work keeps the table alive until it is done, so a
        // migration barrier knows when requests routed by an older table
        // have finished (see `admin::barrier`).
        let keep = (!blocking).then(|| table.clone());
        return Pending::Later(Box::pin(async move {
            let reply = match pool {
                Some(pool) => match (blocking, watch, target) {
                    (true, Some(w), Target::Local(n)) if n == w.node => {
                        blocking_call(&pool, raw, w, proto).await
                    }
                    _ => dedicated_call(&pool, raw, blocking, ack, proto).await,
                },
                None => err("CLUSTERDOWN no connection to the owner").to_bytes(proto),
            };
            drop(keep);
            if decompress {
                compress::decompress_reply(reply, proto)
            } else {
                reply
            }
        }));
    }
    match target {
        Target::Local(n) => {
            let rx = c.nodes[usize::from(n)].shared(proto).send(raw);
            if !decompress {
                return Pending::Wait(rx);
            }
            Pending::spawn(Box::pin(async move {
                compress::decompress_reply(await_reply(rx, proto).await, proto)
            }))
        }
        Target::Peer(_) => {
            let fut = forward(table.clone(), target, raw, proto);
            Pending::spawn(Box::pin(async move {
                let reply = fut.await;
                if decompress {
                    compress::decompress_reply(reply, proto)
                } else {
                    reply
                }
            }))
        }
    }
}

/// Waits for a pending reply.
async fn resolve(p: Pending, proto: Protocol) -> Bytes {
    match p {
        Pending::Ready(b) => b,
        Pending::Wait(rx) => await_reply(rx, proto).await,
        Pending::Later(f) => f.await,
        Pending::Spawned(h) => h.await.unwrap_or_else(|_| super::lost_reply(proto)),
    }
}

/// Routes a data command.
pub(super) fn data(
    shared: &Shared,
    table: &Arc<RouteTable>,
    s: &mut Session,
    cmd: &'static CommandInfo,
    req: &Request,
    asking: bool,
) -> Dispatch {
    if let Some(why) = refusal(cmd) {
        return ready(err(why), s);
    }
    let Ok(c) = &table.serving else {
        return ready(not_serving(table), s);
    };
    if c.compression != Compression::None {
        if let Some(why) = compress::refused(top_name(cmd)) {
            return ready(err(why), s);
        }
    }
    let args = req.args();
    let positions = match routing_positions(cmd, args) {
        Ok(p) => p,
        Err(e) => return ready(err(e), s),
    };
    let slot = match single_slot(args, &positions) {
        Ok(Some(slot)) => slot,
        Ok(None) => return keyless(table, s, cmd, req),
        Err(()) => {
            if s.plain(c) && splittable(top_name(cmd)) {
                return Dispatch::Reply(Pending::spawn(split(
                    shared,
                    table.clone(),
                    s,
                    cmd,
                    req,
                    &positions,
                )));
            }
            return ready(
                err("CROSSSLOT Keys in request don't hash to the same slot"),
                s,
            );
        }
    };
    let target = match target_for_slot(c, s, slot, cmd.is_readonly(), asking) {
        Ok(t) => t,
        Err(reply) => return ready(reply, s),
    };
    let writes = writes(cmd);
    if writes {
        if let Some(why) = &s.fenced {
            return ready(err(why.clone()), s);
        }
    }
    // With replica_ack, a local write is confirmed by its replica (WAIT 1)
    // before the client hears OK.
    let ack = match (c.replica_ack_ms, target) {
        (Some(ms), Target::Local(n)) if writes => {
            if !c.node_has_replica[usize::from(n)] {
                return ready(err(format!(
                    "NOREPLICAS slot {slot} has no replica right now (durability replica_ack); the write was not applied"
                )), s);
            }
            Some(ms)
        }
        _ => None,
    };
    let blocking = blocks(cmd, args);
    let watch = match target {
        Target::Local(node) if blocking => Some(SlotWatch {
            slot,
            node,
            tables: shared.table.clone(),
            plain: s.plain(c),
            tls: s.tls,
        }),
        _ => None,
    };
    let exec = Exec {
        raw: compress::request(c, top_name(cmd), req).raw().clone(),
        proto: s.protocol,
        blocking,
        watch,
        ack,
        decompress: c.compression != Compression::None && compress::has_values(top_name(cmd)),
    };
    if let (Some(dst), Target::Local(n)) = (c.slot(slot).migrating, target) {
        if !asking || c.slot(slot).importing != Some(n) {
            // The key may have moved: decided under its lock, in order.
            s.hold = true;
            let keys = positions
                .iter()
                .filter_map(|&p| args.get(p).cloned())
                .collect();
            let plain = s.plain(c);
            let may_block = exec.blocking && matches!(top_name(cmd), "xread" | "xreadgroup");
            return Dispatch::Reply(Pending::Later(migrating(
                shared.locks.clone(),
                table.clone(),
                Moving {
                    slot,
                    node: n,
                    dst,
                    keys,
                    plain,
                    tls: s.tls,
                    may_block,
                },
                exec,
            )));
        }
    }
    if exec.holds() {
        // Redis runs nothing else from this client until the reply comes;
        // an acknowledged write likewise holds the client's later requests,
        // so they cannot overtake it on another connection.
        s.hold = true;
    }
    Dispatch::Reply(execute(table, target, exec))
}

/// A command on a slot this proxy is migrating out.
struct Moving {
    slot: Slot,
    /// Local node holding the slot's remaining keys.
    node: u8,
    /// Peer importing the slot.
    dst: u16,
    keys: Vec<Bytes>,
    /// Forward instead of redirecting.
    plain: bool,
    /// The client is on TLS: `-ASK` names a TLS address.
    tls: bool,
    /// A stream read with BLOCK: it may wait for new entries even though
    /// its keys exist (list and sorted-set pops on existing keys return at
    /// once).
    may_block: bool,
}

/// Serves a command on a migrating slot (DESIGN.md §6): under its keys'
/// locks, keys all still here run here; keys all gone are the
/// destination's (`-ASK`, or forwarded with `ASKING` for plain clients);
/// a mix answers `-TRYAGAIN` until the move of the rest completes.
fn migrating(locks: Arc<KeyLocks>, table: Arc<RouteTable>, m: Moving, exec: Exec) -> ReplyFuture {
    Box::pin(async move {
        let proto = exec.proto;
        let Ok(c) = &table.serving else {
            return not_serving(&table).to_bytes(proto);
        };
        let mut keys = m.keys;
        keys.sort_unstable();
        keys.dedup();
        let _held = locks.lock(&keys).await;
        let mut exists = bytes::BytesMut::new();
        let mut args: Vec<&[u8]> = vec![b"EXISTS"];
        args.extend(keys.iter().map(|k| k.as_ref()));
        encode_command(&args, &mut exists);
        let reply = await_reply(
            c.nodes[usize::from(m.node)]
                .shared(proto)
                .send(exists.freeze()),
            proto,
        )
        .await;
        let present = match parse_frame(&reply) {
            Ok(Some((Frame::Integer(n), _))) => n,
            _ => return reply,
        };
        if present == keys.len() as i64 {
            if m.may_block {
                // Holding the keys while blocked would stall the move.
                return err(format!(
                    "TRYAGAIN slot {} is being migrated; retry the blocking command",
                    m.slot
                ))
                .to_bytes(proto);
            }
            return resolve(execute(&table, Target::Local(m.node), exec), proto).await;
        }
        if present > 0 {
            return err("TRYAGAIN Multiple keys request during rehashing of slot").to_bytes(proto);
        }
        if m.plain || usize::from(m.dst) == c.me {
            let reply = if usize::from(m.dst) == c.me {
                match c.slot(m.slot).importing {
                    Some(n) => {
                        resolve(execute(&table, Target::Local(n), exec.clone()), proto).await
                    }
                    None => {
                        err(format!("TRYAGAIN slot {} is being migrated", m.slot)).to_bytes(proto)
                    }
                }
            } else {
                asking(c, Target::Peer(m.dst), exec.raw.clone(), proto).await
            };
            return if exec.decompress {
                compress::decompress_reply(reply, proto)
            } else {
                reply
            };
        }
        err(format!(
            "ASK {} {}",
            m.slot,
            c.peers[usize::from(m.dst)].client_addr(m.tls)
        ))
        .to_bytes(proto)
    })
}

/// Whether a command changes data (and so is fenced, and acknowledged
/// under `replica_ack`). Scripts and functions may write; FCALL_RO and
/// EVAL_RO are read-only by contract.
fn writes(cmd: &CommandInfo) -> bool {
    cmd.has(flags::WRITE) || matches!(top_name(cmd), "eval" | "evalsha" | "fcall")
}

/// Runs a command on a dedicated connection: a blocking one (dropping the
/// future — client gone — drops the connection, which unblocks Redis), or
/// one whose write must be confirmed by the replica (`ack`: WAIT timeout).
async fn dedicated_call(
    pool: &crate::dedicated::DedicatedPool,
    raw: Bytes,
    blocking: bool,
    ack: Option<u32>,
    proto: Protocol,
) -> Bytes {
    let mut conn = match pool.get().await {
        Ok(c) => c,
        Err(e) => return backend_failure(&e).to_bytes(proto),
    };
    if let Err(e) = conn.send(&[&raw]).await {
        return backend_failure(&e).to_bytes(proto);
    }
    let reply = if blocking {
        conn.reply_blocking().await
    } else {
        conn.reply().await
    };
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => return backend_failure(&e).to_bytes(proto),
    };
    let Some(ms) = ack else {
        pool.put(conn);
        return reply;
    };
    let confirmed = replica_ack(&mut conn, &reply, ms, proto).await;
    if confirmed.is_ok() {
        pool.put(conn);
    }
    confirmed.unwrap_or_else(|e| e)
}

/// Runs a blocking command that gives way when its slot leaves the node
/// (see [`SlotWatch`]): the connection's `CLIENT ID` is asked for in the
/// same write, and if the slot leaves first, `CLIENT UNBLOCK <id> ERROR`
/// from another connection ends the wait. Whatever the node answers then
/// is the answer: a pop that happened just before is delivered, never lost;
/// only the unblocked error turns into the redirection.
async fn blocking_call(
    pool: &crate::dedicated::DedicatedPool,
    raw: Bytes,
    mut w: SlotWatch,
    proto: Protocol,
) -> Bytes {
    let mut conn = match pool.get().await {
        Ok(c) => c,
        Err(e) => return backend_failure(&e).to_bytes(proto),
    };
    let client_id = Bytes::from_static(b"*2\r\n$6\r\nCLIENT\r\n$2\r\nID\r\n");
    if let Err(e) = conn.send(&[&client_id, &raw]).await {
        return backend_failure(&e).to_bytes(proto);
    }
    let id = match conn.reply().await.map(|r| parse_frame(&r)) {
        Ok(Ok(Some((Frame::Integer(id), _)))) => id,
        Ok(_) => return err("ERR unexpected reply to CLIENT ID").to_bytes(proto),
        Err(e) => return backend_failure(&e).to_bytes(proto),
    };
    let (reply, redirect) = tokio::select! {
        r = conn.reply_blocking() => (r, None),
        redirect = w.left() => {
            let mut unblock = bytes::BytesMut::new();
            let id = id.to_string();
            encode_command(&[b"CLIENT".as_slice(), b"UNBLOCK", id.as_bytes(), b"ERROR"], &mut unblock);
            let unblock = unblock.freeze();
            match pool.get().await {
                Ok(mut other) => {
                    if other.send(&[&unblock]).await.is_ok() && other.reply().await.is_ok() {
                        pool.put(other);
                    }
                }
                Err(e) => return backend_failure(&e).to_bytes(proto),
            }
            (conn.reply_blocking().await, Some(redirect))
        }
    };
    match (reply, redirect) {
        (Ok(r), Some(redirect)) if r.starts_with(b"-UNBLOCKED") => redirect.to_bytes(proto),
        (Ok(r), _) => {
            pool.put(conn);
            r
        }
        (Err(e), _) => backend_failure(&e).to_bytes(proto),
    }
}

/// After a write's `reply` on `conn`: `WAIT 1 ms`, and the reply only if
/// the replica confirmed. An error reply needs no confirmation.
pub(super) async fn replica_ack(
    conn: &mut crate::dedicated::Dedicated,
    reply: &Bytes,
    ms: u32,
    proto: Protocol,
) -> Result<Bytes, Bytes> {
    if reply.first() == Some(&b'-') || reply.first() == Some(&b'!') {
        return Ok(reply.clone());
    }
    let mut wait = bytes::BytesMut::new();
    encode_command(
        &[b"WAIT".as_slice(), b"1", ms.to_string().as_bytes()],
        &mut wait,
    );
    let wait = wait.freeze();
    let acks = match conn.send(&[&wait]).await {
        Ok(()) => conn.reply().await,
        Err(e) => Err(e),
    };
    match acks {
        Ok(a) if matches!(parse_frame(&a), Ok(Some((Frame::Integer(n), _))) if n >= 1) => {
            Ok(reply.clone())
        }
        Ok(_) => {
            metrics::counter!("redmesh_proxy_replica_ack_failures_total").increment(1);
            Err(err(format!(
                "NOREPLICAS the write was applied on the master but its replica did not confirm it within {ms} ms \
                 (durability replica_ack); it may be lost if the master fails"
            ))
            .to_bytes(proto))
        }
        Err(e) => Err(err(format!(
            "ERR the write's replica confirmation failed ({e}); the write may or may not be durable"
        ))
        .to_bytes(proto)),
    }
}

/// Sends `raw` to `target` and follows `-MOVED`/`-ASK` answers (the owner's
/// view may be newer than ours) for at most `MAX_HOPS` hops.
pub(super) fn forward(
    table: Arc<RouteTable>,
    target: Target,
    raw: Bytes,
    proto: Protocol,
) -> ReplyFuture {
    // The first hop is queued now, not when the future first runs: requests
    // of one client must reach a node in the order the client sent them.
    let first = match &table.serving {
        Ok(c) => c.link(target).map(|l| l.shared(proto).send(raw.clone())),
        Err(_) => None,
    };
    Box::pin(async move {
        let Ok(c) = &table.serving else {
            return not_serving(&table).to_bytes(proto);
        };
        let Some(first) = first else {
            return err("CLUSTERDOWN no connection to the owner").to_bytes(proto);
        };
        let mut reply = await_reply(first, proto).await;
        for _ in 1..MAX_HOPS {
            let Some((kind, addr)) = redirect(&reply) else {
                return reply;
            };
            let next = if addr == c.peers[c.me].addr.as_str() {
                // Back to us: our own view must have changed meanwhile, or
                // the owner is migrating the slot to us.
                let Some(entry) = redirect_slot(&reply).map(|s| c.slot(s)) else {
                    return reply;
                };
                match (kind, entry.importing, entry.route) {
                    ("ASK", Some(n), _) => {
                        let rx = c.nodes[usize::from(n)].shared(proto).send(raw.clone());
                        return await_reply(rx, proto).await;
                    }
                    // A slot we are migrating out needs its key locks, which
                    // a forwarded request does not hold: the client retries.
                    (_, _, SlotRoute::Local(_)) if entry.migrating.is_some() => {
                        return err("TRYAGAIN the slot is being migrated").to_bytes(proto)
                    }
                    (_, _, SlotRoute::Local(n)) => Target::Local(n),
                    _ => return reply,
                }
            } else {
                match c.peer_by_addr(&addr) {
                    Some(i) => Target::Peer(i as u16),
                    None => return reply,
                }
            };
            if kind == "ASK" {
                return asking(c, next, raw, proto).await;
            }
            let Some(link) = c.link(next) else {
                return err("CLUSTERDOWN no connection to the owner").to_bytes(proto);
            };
            reply = await_reply(link.shared(proto).send(raw.clone()), proto).await;
        }
        reply
    })
}

/// `ASKING` must immediately precede the command on one connection, which a
/// shared connection cannot promise: use a dedicated one.
async fn asking(c: &Serving, target: Target, raw: Bytes, proto: Protocol) -> Bytes {
    let Some(pool) = c.link(target).map(|l| l.dedicated(proto).clone()) else {
        return err("CLUSTERDOWN no connection to the importing node").to_bytes(proto);
    };
    let mut conn = match pool.get().await {
        Ok(c) => c,
        Err(e) => return backend_failure(&e).to_bytes(proto),
    };
    let asking = Bytes::from_static(b"*1\r\n$6\r\nASKING\r\n");
    if let Err(e) = conn.send(&[&asking, &raw]).await {
        return backend_failure(&e).to_bytes(proto);
    }
    let first = conn.reply().await;
    let second = conn.reply().await;
    match (first, second) {
        (Ok(_), Ok(reply)) => {
            pool.put(conn);
            reply
        }
        (Err(e), _) | (_, Err(e)) => backend_failure(&e).to_bytes(proto),
    }
}

/// `("MOVED"|"ASK", "host:port")` of a redirect error reply.
fn redirect(reply: &[u8]) -> Option<(&'static str, String)> {
    let text = std::str::from_utf8(reply.strip_prefix(b"-")?)
        .ok()?
        .trim_end();
    let mut parts = text.split(' ');
    let kind = match parts.next()? {
        "MOVED" => "MOVED",
        "ASK" => "ASK",
        _ => return None,
    };
    let _slot = parts.next()?;
    Some((kind, parts.next()?.to_owned()))
}

fn redirect_slot(reply: &[u8]) -> Option<Slot> {
    std::str::from_utf8(reply)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// Targets of keyless commands: this proxy's masters, and in plain mode
/// every other proxy too (which each answer for their own masters).
fn keyless_targets(c: &Serving, s: &Session) -> Vec<Target> {
    let mut out: Vec<Target> = c.local_masters.iter().map(|&n| Target::Local(n)).collect();
    if s.plain(c) {
        out.extend(
            (0..c.peers.len())
                .filter(|&i| i != c.me)
                .map(|i| Target::Peer(i as u16)),
        );
    }
    out
}

/// Queues `raw` for `target` now and returns its reply's future.
pub(super) fn send_one(
    table: &Arc<RouteTable>,
    target: Target,
    raw: Bytes,
    proto: Protocol,
) -> ReplyFuture {
    let Ok(c) = &table.serving else {
        return known(not_serving(table).to_bytes(proto));
    };
    match (target, c.link(target)) {
        (Target::Local(_), Some(l)) => Box::pin(await_reply(l.shared(proto).send(raw), proto)),
        (Target::Peer(_), Some(_)) => forward(table.clone(), target, raw, proto),
        (_, None) => known(err("CLUSTERDOWN no connection").to_bytes(proto)),
    }
}

/// Queues `raw` for each target now; the future gathers the replies.
fn send_all(
    table: &Arc<RouteTable>,
    targets: &[Target],
    raw: &Bytes,
    proto: Protocol,
) -> futures::future::JoinAll<ReplyFuture> {
    futures::future::join_all(
        targets
            .iter()
            .map(|t| send_one(table, *t, raw.clone(), proto))
            .collect::<Vec<_>>(),
    )
}

fn frame_of(raw: &[u8]) -> Frame {
    match parse_frame(raw) {
        Ok(Some((f, _))) => f,
        _ => err("ERR unparseable reply from a backend"),
    }
}

/// How the replies of a keyless command sent to several targets combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Combine {
    /// Only the first target runs it.
    First,
    /// All run it; the first reply (or first error) answers.
    AllFirst,
    /// All run it; integers are summed.
    Sum,
    /// All run it; arrays are concatenated.
    Concat,
}

/// Keyless data commands.
fn keyless(table: &Arc<RouteTable>, s: &mut Session, cmd: &CommandInfo, req: &Request) -> Dispatch {
    let Ok(c) = &table.serving else {
        return ready(not_serving(table), s);
    };
    let top = top_name(cmd);
    let sub = req.args().get(1).map(|a| lower(a)).unwrap_or_default();
    let combine = match (top, sub.as_str()) {
        ("dbsize", _) => Combine::Sum,
        ("keys", _) => Combine::Concat,
        ("flushall" | "flushdb", _) => Combine::AllFirst,
        ("script", "load" | "flush") | ("function", "load" | "delete" | "flush" | "restore") => {
            Combine::AllFirst
        }
        _ => Combine::First,
    };
    let mut targets = keyless_targets(c, s);
    if targets.is_empty() {
        return ready(err("CLUSTERDOWN this proxy serves no slots right now"), s);
    }
    let proto = s.protocol;
    if top == "scan" {
        // One target after the other, the cursor saying which.
        return Dispatch::Reply(Pending::spawn(scan(table, &targets, req.args(), proto)));
    }
    let is_info = top == "info";
    if combine == Combine::First {
        targets.truncate(1);
        if !is_info {
            if let Target::Local(n) = targets[0] {
                return Dispatch::Reply(Pending::Wait(
                    c.nodes[usize::from(n)]
                        .shared(proto)
                        .send(req.raw().clone()),
                ));
            }
        }
    }
    // FLUSHALL would also empty database 1, where the node's ownership
    // marker lives (a node with keys and no marker is refused as foreign);
    // clients only ever see database 0, so FLUSHDB is the same to them.
    let raw = if top == "flushall" {
        let mut args = req.args().to_vec();
        args[0] = Bytes::from_static(b"FLUSHDB");
        Request::from_args(&args).raw().clone()
    } else {
        req.raw().clone()
    };
    let sent = send_all(table, &targets, &raw, proto);
    Dispatch::Reply(Pending::spawn(Box::pin(async move {
        let replies = sent.await;
        if let Some(bad) = replies.iter().find(|r| r.first() == Some(&b'-')) {
            return bad.clone();
        }
        match combine {
            Combine::First | Combine::AllFirst if is_info => info_reply(&replies[0], proto),
            Combine::First | Combine::AllFirst => replies[0].clone(),
            Combine::Sum => {
                let total: i64 = replies
                    .iter()
                    .map(|r| match frame_of(r) {
                        Frame::Integer(n) => n,
                        _ => 0,
                    })
                    .sum();
                Frame::Integer(total).to_bytes(proto)
            }
            Combine::Concat => {
                let mut all = Vec::new();
                for r in &replies {
                    if let Frame::Array(items) | Frame::Set(items) = frame_of(r) {
                        all.extend(items);
                    }
                }
                Frame::Array(all).to_bytes(proto)
            }
        }
    })))
}

/// INFO from a node, marked as cluster-enabled (clients check it), without
/// the internal database.
fn info_reply(raw: &Bytes, proto: Protocol) -> Bytes {
    match frame_of(raw) {
        f @ (Frame::Bulk(_) | Frame::Verbatim(_, _)) => {
            let text = f
                .as_bytes()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            // Database 1 holds the proxy's ownership marker, not user data:
            // a cluster only has database 0.
            let patched: String = text
                .replace("cluster_enabled:0", "cluster_enabled:1")
                .split_inclusive('\n')
                .filter(|line| !line.starts_with("db") || line.starts_with("db0:"))
                .collect();
            Frame::Verbatim(Bytes::from_static(b"txt"), Bytes::from(patched)).to_bytes(proto)
        }
        _ => raw.clone(),
    }
}

/// Bits of the client cursor naming the target; the node's cursor above.
const SCAN_TARGET_BITS: u32 = 8;

/// SCAN over several targets in turn: the low bits of the cursor say which
/// target, the rest is that target's own cursor.
fn scan(
    table: &Arc<RouteTable>,
    targets: &[Target],
    args: &[Bytes],
    proto: Protocol,
) -> ReplyFuture {
    let invalid = || known(err("ERR invalid cursor").to_bytes(proto));
    let Some(cursor) = std::str::from_utf8(&args[1])
        .ok()
        .and_then(|c| c.parse::<u64>().ok())
    else {
        return invalid();
    };
    let mask = (1u64 << SCAN_TARGET_BITS) - 1;
    let index = (cursor & mask) as usize;
    let inner = cursor >> SCAN_TARGET_BITS;
    let Some(&target) = targets.get(index) else {
        return invalid();
    };
    let mut sub: Vec<Bytes> = args.to_vec();
    sub[1] = Bytes::from(inner.to_string());
    let mut raw = bytes::BytesMut::new();
    encode_command(&sub, &mut raw);
    let sent = send_one(table, target, raw.freeze(), proto);
    let count = targets.len();
    Box::pin(async move { scan_reply(sent.await, index, count, proto) })
}

/// Rewrites one node's SCAN reply with the client-facing cursor.
fn scan_reply(reply: Bytes, index: usize, count: usize, proto: Protocol) -> Bytes {
    let Frame::Array(mut parts) = frame_of(&reply) else {
        return reply;
    };
    if parts.len() != 2 {
        return reply;
    }
    let next_inner = parts[0]
        .as_bytes()
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|c| c.parse::<u64>().ok())
        .unwrap_or(0);
    let next = if next_inner != 0 {
        (next_inner << SCAN_TARGET_BITS) | index as u64
    } else if index + 1 < count {
        (index + 1) as u64
    } else {
        0
    };
    parts[0] = Frame::bulk(next.to_string());
    Frame::Array(parts).to_bytes(proto)
}

/// Multi-key commands plain mode splits by slot and gathers in order.
fn splittable(top: &str) -> bool {
    matches!(top, "mget" | "mset" | "del" | "unlink" | "exists" | "touch")
}

/// One slot's part of a split command: reply positions, target, request,
/// slot and keys.
type Part = (Vec<usize>, Result<Target, Frame>, Bytes, Slot, Vec<Bytes>);

/// Splits a multi-key command by slot, runs the parts where they belong,
/// and assembles one reply in the original key order.
fn split(
    shared: &Shared,
    table: Arc<RouteTable>,
    s: &Session,
    cmd: &CommandInfo,
    req: &Request,
    positions: &[usize],
) -> ReplyFuture {
    let proto = s.protocol;
    let top = top_name(cmd);
    let args = req.args();
    let pairs = top == "mset";
    if pairs && args.len().is_multiple_of(2) {
        // MSET's arity only says "at least one pair"; Redis checks the
        // pairing itself, and so must a split that reads the values.
        return known(err("ERR wrong number of arguments for 'mset' command").to_bytes(proto));
    }
    // Group key positions by slot, remembering each key's index in the reply.
    let mut groups: BTreeMap<Slot, Vec<(usize, usize)>> = BTreeMap::new();
    for (i, &p) in positions.iter().enumerate() {
        groups.entry(key_slot(&args[p])).or_default().push((i, p));
    }
    let mut parts: Vec<Part> = Vec::new();
    let Ok(c) = &table.serving else {
        return known(not_serving(&table).to_bytes(proto));
    };
    for (slot, keys) in &groups {
        let mut sub: Vec<Bytes> = vec![args[0].clone()];
        for &(_, p) in keys {
            sub.push(args[p].clone());
            if pairs {
                sub.push(args[p + 1].clone());
            }
        }
        let sub = Request::from_args(&sub);
        let sub = compress::request(c, top, &sub);
        let target = target_for_slot(c, s, *slot, cmd.is_readonly(), false);
        parts.push((
            keys.iter().map(|(i, _)| *i).collect(),
            target,
            sub.raw().clone(),
            *slot,
            keys.iter().map(|&(_, p)| args[p].clone()).collect(),
        ));
    }
    let decompress = c.compression != Compression::None && top == "mget";
    let top = top.to_owned();
    let total = positions.len();
    // Every part is queued now, in order with the client's other requests.
    let (indexes, sent): (Vec<Vec<usize>>, Vec<ReplyFuture>) = parts
        .into_iter()
        .map(|(indexes, target, raw, slot, keys)| {
            let fut = match (target, c.slot(slot).migrating) {
                (Ok(Target::Local(node)), Some(dst)) => migrating(
                    shared.locks.clone(),
                    table.clone(),
                    Moving {
                        slot,
                        node,
                        dst,
                        keys,
                        plain: true,
                        tls: false,
                        may_block: false,
                    },
                    Exec {
                        raw,
                        proto,
                        blocking: false,
                        watch: None,
                        ack: None,
                        decompress: false,
                    },
                ),
                (Ok(t), _) => send_one(&table, t, raw, proto),
                (Err(e), _) => known(e.to_bytes(proto)),
            };
            (indexes, fut)
        })
        .unzip();
    Box::pin(async move {
        let replies = futures::future::join_all(sent).await;
        let results: Vec<(Vec<usize>, Bytes)> = indexes.into_iter().zip(replies).collect();
        if let Some((_, bad)) = results.iter().find(|(_, r)| r.first() == Some(&b'-')) {
            return bad.clone();
        }
        match top.as_str() {
            "mget" => {
                let mut values = vec![Frame::Null; total];
                for (indexes, reply) in &results {
                    let reply = if decompress {
                        compress::decompress_reply(reply.clone(), proto)
                    } else {
                        reply.clone()
                    };
                    if let Frame::Array(items) = frame_of(&reply) {
                        for (i, v) in indexes.iter().zip(items) {
                            values[*i] = v;
                        }
                    }
                }
                Frame::Array(values).to_bytes(proto)
            }
            "mset" => Frame::ok().to_bytes(proto),
            _ => {
                let sum: i64 = results
                    .iter()
                    .map(|(_, r)| match frame_of(r) {
                        Frame::Integer(n) => n,
                        _ => 0,
                    })
                    .sum();
                Frame::Integer(sum).to_bytes(proto)
            }
        }
    })
}

/// CLUSTER subcommands; COUNTKEYSINSLOT/GETKEYSINSLOT scan the node that
/// holds the slot (plain Redis keeps no per-slot index), through its owner
/// in plain mode.
pub(super) fn cluster(
    shared: &Shared,
    table: &Arc<RouteTable>,
    s: &mut Session,
    args: &[Bytes],
) -> Dispatch {
    if let Some(f) = cluster_local(shared, table, s.tls, args) {
        return ready(f, s);
    }
    let count_only = lower(&args[1]) == "countkeysinslot";
    let Some(slot) = std::str::from_utf8(&args[2])
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|v| *v < 16384)
    else {
        return ready(err("ERR Invalid slot"), s);
    };
    let slot = slot as Slot;
    let limit = if count_only {
        u64::MAX
    } else {
        match std::str::from_utf8(&args[3])
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
        {
            Some(n) if n >= 0 => n as u64,
            _ => return ready(err("ERR Invalid number of keys"), s),
        }
    };
    let Ok(c) = &table.serving else {
        return ready(not_serving(table), s);
    };
    let proto = s.protocol;
    let node = match c.slot(slot).route {
        SlotRoute::Local(n) if c.node_ready[usize::from(n)].is_ok() => {
            c.nodes[usize::from(n)].admin().clone()
        }
        // Plain mode: the owner answers.
        SlotRoute::Moved(i) if s.plain(c) => {
            let mut raw = bytes::BytesMut::new();
            encode_command(args, &mut raw);
            return Dispatch::Reply(Pending::spawn(forward(
                table.clone(),
                Target::Peer(i),
                raw.freeze(),
                proto,
            )));
        }
        // Like a Redis Cluster node: no keys of slots it does not serve.
        _ => {
            let empty = if count_only {
                Frame::Integer(0)
            } else {
                Frame::Array(Vec::new())
            };
            return ready(empty, s);
        }
    };
    Dispatch::Reply(Pending::Later(Box::pin(async move {
        let mut cursor = String::from("0");
        let mut keys: Vec<Frame> = Vec::new();
        let mut count: i64 = 0;
        loop {
            let reply = match node.call(&["SCAN", cursor.as_str(), "COUNT", "1000"]).await {
                Ok(f) => f,
                Err(e) => return backend_failure(&e).to_bytes(proto),
            };
            let Frame::Array(parts) = reply else {
                return err("ERR unexpected SCAN reply").to_bytes(proto);
            };
            let (Some(next), Some(Frame::Array(batch))) =
                (parts.first().and_then(Frame::as_bytes), parts.get(1))
            else {
                return err("ERR unexpected SCAN reply").to_bytes(proto);
            };
            for k in batch.iter().filter_map(Frame::as_bytes) {
                if key_slot(k) == slot {
                    count += 1;
                    if (keys.len() as u64) < limit && !count_only {
                        keys.push(Frame::Bulk(k.clone()));
                    }
                }
            }
            cursor = String::from_utf8_lossy(next).into_owned();
            if cursor == "0" || (!count_only && keys.len() as u64 >= limit) {
                break;
            }
        }
        if count_only {
            Frame::Integer(count).to_bytes(proto)
        } else {
            Frame::Array(keys).to_bytes(proto)
        }
    })))
}
