//! Pub/sub: subscriptions on dedicated connections, PUBLISH across the
//! cluster.
//!
//! Classic pub/sub is cluster-wide, as in Redis Cluster: each proxy has one
//! pub/sub node (its first local master, computed identically everywhere),
//! subscribers subscribe there, and PUBLISH reaches every proxy's pub/sub
//! node (peers publish locally when asked by a peer). Sharded pub/sub goes
//! to the slot's owner like a keyed command.
//!
//! A reader task per subscription connection hands confirmations to the
//! command that expects them (so they stay in reply order) and messages to
//! the session, which writes them between replies. When a subscription
//! connection dies the client is disconnected, as a Redis node would, so it
//! resubscribes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use redmesh_model::key_slot;
use redmesh_resp::{parse_frame, Frame, Protocol, Request};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot};

use super::commands::ready;
use super::route::{send_one, target_for_slot};
use super::{backend_failure, err, Dispatch, Pending, ReplyFuture, Session};
use crate::routing::{RouteTable, Target};

/// Confirmations one command waits for.
struct Expect {
    remaining: usize,
    acc: BytesMut,
    done: oneshot::Sender<Bytes>,
}

/// One subscription connection.
struct SubConn {
    wr: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    expects: Arc<Mutex<VecDeque<Expect>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for SubConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A subscription connection shared between the session and its futures
/// (it is opened lazily by the first SUBSCRIBE's future).
type Slot = Arc<tokio::sync::Mutex<Option<SubConn>>>;

/// Subscriptions of a session.
pub(crate) struct Subscriptions {
    push: mpsc::Sender<Bytes>,
    conns: HashMap<Target, Slot>,
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    shard: HashMap<Bytes, Target>,
}

impl Subscriptions {
    /// No subscriptions; messages go to `push`.
    pub fn new(push: mpsc::Sender<Bytes>) -> Self {
        Self {
            push,
            conns: HashMap::new(),
            channels: HashSet::new(),
            patterns: HashSet::new(),
            shard: HashMap::new(),
        }
    }

    /// Whether the client is subscribed to anything.
    pub fn active(&self) -> bool {
        !(self.channels.is_empty() && self.patterns.is_empty() && self.shard.is_empty())
    }

    /// Channel subscriptions.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    /// Pattern subscriptions.
    pub fn patterns(&self) -> usize {
        self.patterns.len()
    }

    /// Shard channel subscriptions.
    pub fn shard_channels(&self) -> usize {
        self.shard.len()
    }

    /// Drops every subscription (closing the connections).
    pub fn clear(&mut self) {
        self.conns.clear();
        self.channels.clear();
        self.patterns.clear();
        self.shard.clear();
    }

    fn slot(&mut self, target: Target) -> Slot {
        self.conns.entry(target).or_default().clone()
    }
}

const CONFIRMATIONS: &[&[u8]] = &[
    b"subscribe",
    b"unsubscribe",
    b"psubscribe",
    b"punsubscribe",
    b"ssubscribe",
    b"sunsubscribe",
];

/// Whether a pushed frame confirms a (un)subscription.
fn is_confirmation(reply: &[u8]) -> bool {
    match parse_frame(reply) {
        Ok(Some((Frame::Array(items) | Frame::Push(items), _))) => items
            .first()
            .and_then(Frame::as_bytes)
            .is_some_and(|k| CONFIRMATIONS.contains(&k.as_ref())),
        _ => false,
    }
}

/// Opens a subscription connection to `target` and starts its reader.
async fn open(
    c_pool: Arc<crate::dedicated::DedicatedPool>,
    push: mpsc::Sender<Bytes>,
) -> Result<SubConn, crate::backend::BackendError> {
    let conn = c_pool.get().await?;
    let (wr, mut reader) = conn.into_split();
    let expects: Arc<Mutex<VecDeque<Expect>>> = Arc::default();
    let exp = expects.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok(reply) = reader.next(None).await else {
                // Connection lost: tell the session to disconnect the client.
                let _ = push.send(Bytes::new()).await;
                return;
            };
            if is_confirmation(&reply) {
                let mut q = exp.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(front) = q.front_mut() {
                    front.acc.extend_from_slice(&reply);
                    front.remaining -= 1;
                    if front.remaining == 0 {
                        if let Some(done) = q.pop_front() {
                            let _ = done.done.send(done.acc.freeze());
                        }
                    }
                    continue;
                }
            }
            // Messages; a slow client backs up to Redis, whose output limit
            // for pub/sub clients then closes the connection.
            if push.send(reply).await.is_err() {
                return;
            }
        }
    });
    Ok(SubConn {
        wr: Arc::new(tokio::sync::Mutex::new(wr)),
        expects,
        reader: task,
    })
}

/// Sends `raw` on the (possibly new) connection in `slot` and waits for
/// `expected` confirmations.
fn subscribe_on(
    slot: Slot,
    pool: Option<Arc<crate::dedicated::DedicatedPool>>,
    push: mpsc::Sender<Bytes>,
    raw: Bytes,
    expected: usize,
    proto: Protocol,
) -> ReplyFuture {
    Box::pin(async move {
        let mut guard = slot.lock().await;
        if guard.is_none() {
            let Some(pool) = pool else {
                return err("CLUSTERDOWN no connection for subscriptions").to_bytes(proto);
            };
            match open(pool, push).await {
                Ok(c) => *guard = Some(c),
                Err(e) => return backend_failure(&e).to_bytes(proto),
            }
        }
        let Some(conn) = guard.as_ref() else {
            return err("CLUSTERDOWN no connection for subscriptions").to_bytes(proto);
        };
        let (done, rx) = oneshot::channel();
        conn.expects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(Expect {
                remaining: expected.max(1),
                acc: BytesMut::new(),
                done,
            });
        if conn.wr.lock().await.write_all(&raw).await.is_err() {
            return err("ERR subscription connection lost").to_bytes(proto);
        }
        drop(guard);
        rx.await
            .unwrap_or_else(|_| err("ERR subscription connection lost").to_bytes(proto))
    })
}

/// Replies Redis gives to an UNSUBSCRIBE-type command with nothing to do.
fn nothing_to_undo(kind: &'static str, args: &[Bytes], count: usize, proto: Protocol) -> Bytes {
    let mut out = BytesMut::new();
    let frame = |ch: Frame| {
        let items = vec![Frame::bulk(kind), ch, Frame::Integer(count as i64)];
        if proto == Protocol::Resp3 {
            Frame::Push(items)
        } else {
            Frame::Array(items)
        }
    };
    if args.is_empty() {
        frame(Frame::Null).encode(proto, &mut out);
    }
    for a in args {
        frame(Frame::Bulk(a.clone())).encode(proto, &mut out);
    }
    out.freeze()
}

/// SUBSCRIBE and friends (dispatched only when no reply is pending).
pub(super) fn command(
    table: &Arc<RouteTable>,
    s: &mut Session,
    top: &str,
    req: &Request,
) -> Dispatch {
    let Ok(c) = &table.serving else {
        return ready(err("CLUSTERDOWN the proxy serves no cluster"), s);
    };
    let proto = s.protocol;
    let args: Vec<Bytes> = req.args()[1..].to_vec();
    let push = s.subs.push.clone();
    let pubsub_target = c.pubsub_node.map(Target::Local);
    let pool_of = |t: Target| c.link(t).map(|l| l.dedicated(proto).clone());
    match top {
        "subscribe" | "psubscribe" => {
            let Some(target) = pubsub_target else {
                return ready(
                    err("CLUSTERDOWN this proxy has no master for pub/sub right now"),
                    s,
                );
            };
            let set = if top == "subscribe" {
                &mut s.subs.channels
            } else {
                &mut s.subs.patterns
            };
            set.extend(args.iter().cloned());
            let slot = s.subs.slot(target);
            Dispatch::Subscription(subscribe_on(
                slot,
                pool_of(target),
                push,
                req.raw().clone(),
                args.len(),
                proto,
            ))
        }
        "unsubscribe" | "punsubscribe" => {
            let set = if top == "unsubscribe" {
                &mut s.subs.channels
            } else {
                &mut s.subs.patterns
            };
            let expected = if args.is_empty() {
                set.len()
            } else {
                args.len()
            };
            if args.is_empty() {
                set.clear();
            } else {
                for a in &args {
                    set.remove(a);
                }
            }
            let target = pubsub_target.filter(|t| s.subs.conns.contains_key(t));
            let kind = if top == "unsubscribe" {
                "unsubscribe"
            } else {
                "punsubscribe"
            };
            match target {
                Some(t) if expected > 0 => {
                    let slot = s.subs.slot(t);
                    Dispatch::Subscription(subscribe_on(
                        slot,
                        None,
                        push,
                        req.raw().clone(),
                        expected,
                        proto,
                    ))
                }
                _ => {
                    let remaining =
                        s.subs.channels.len() + s.subs.patterns.len() + s.subs.shard.len();
                    Dispatch::Reply(Pending::Ready(nothing_to_undo(
                        kind, &args, remaining, proto,
                    )))
                }
            }
        }
        "ssubscribe" => {
            let mut slot = None;
            for a in &args {
                let k = key_slot(a);
                if slot.is_some_and(|x| x != k) {
                    return ready(
                        err("CROSSSLOT Keys in request don't hash to the same slot"),
                        s,
                    );
                }
                slot = Some(k);
            }
            let Some(slot) = slot else {
                return ready(
                    err("ERR wrong number of arguments for 'ssubscribe' command"),
                    s,
                );
            };
            let target = match target_for_slot(c, s, slot, false, false) {
                Ok(t) => t,
                Err(reply) => return ready(reply, s),
            };
            for a in &args {
                s.subs.shard.insert(a.clone(), target);
            }
            let conn = s.subs.slot(target);
            Dispatch::Subscription(subscribe_on(
                conn,
                pool_of(target),
                push,
                req.raw().clone(),
                args.len(),
                proto,
            ))
        }
        _ => {
            // SUNSUBSCRIBE: per connection holding the channels.
            let mut by_target: HashMap<Target, Vec<Bytes>> = HashMap::new();
            if args.is_empty() {
                for (ch, t) in s.subs.shard.drain() {
                    by_target.entry(t).or_default().push(ch);
                }
            } else {
                for a in &args {
                    if let Some(t) = s.subs.shard.remove(a) {
                        by_target.entry(t).or_default().push(a.clone());
                    }
                }
            }
            if by_target.is_empty() {
                let remaining = s.subs.channels.len() + s.subs.patterns.len();
                return Dispatch::Reply(Pending::Ready(nothing_to_undo(
                    "sunsubscribe",
                    &args,
                    remaining,
                    proto,
                )));
            }
            let futs: Vec<ReplyFuture> = by_target
                .into_iter()
                .map(|(t, chans)| {
                    let sub = Request::from_args(
                        &std::iter::once(Bytes::from_static(b"SUNSUBSCRIBE"))
                            .chain(chans.iter().cloned())
                            .collect::<Vec<_>>(),
                    );
                    subscribe_on(
                        s.subs.slot(t),
                        None,
                        push.clone(),
                        sub.raw().clone(),
                        chans.len(),
                        proto,
                    )
                })
                .collect();
            Dispatch::Subscription(Box::pin(async move {
                let mut out = BytesMut::new();
                for f in futs {
                    out.extend_from_slice(&f.await);
                }
                out.freeze()
            }))
        }
    }
}

/// PUBLISH: to every proxy's pub/sub node (a peer's publish stays local).
pub(super) fn publish(table: &Arc<RouteTable>, s: &mut Session, req: &Request) -> Dispatch {
    let Ok(c) = &table.serving else {
        return ready(err("CLUSTERDOWN the proxy serves no cluster"), s);
    };
    let proto = s.protocol;
    let mut targets: Vec<Target> = c.pubsub_node.map(Target::Local).into_iter().collect();
    if !s.peer {
        targets.extend(
            (0..c.peers.len())
                .filter(|&i| i != c.me)
                .map(|i| Target::Peer(i as u16)),
        );
    }
    // Queued now, in order with the client's other requests.
    let futs: Vec<_> = targets
        .into_iter()
        .map(|t| send_one(table, t, req.raw().clone(), proto))
        .collect();
    Dispatch::Reply(Pending::spawn(Box::pin(async move {
        let mut receivers = 0i64;
        for reply in futures::future::join_all(futs).await {
            match parse_frame(&reply) {
                Ok(Some((Frame::Integer(n), _))) => receivers += n,
                // At-most-once, as Redis pub/sub: a proxy that cannot be
                // reached simply has no receivers for this message.
                _ => {
                    tracing::debug!(reply = %String::from_utf8_lossy(&reply), "publish to a proxy failed")
                }
            }
        }
        Frame::Integer(receivers).to_bytes(proto)
    })))
}
