//! MULTI/EXEC/DISCARD/WATCH/UNWATCH within one slot.
//!
//! Queued commands are checked as Redis Cluster does (unknown command,
//! arity, CROSSSLOT, MOVED doom the transaction: EXEC answers EXECABORT) and
//! kept by the proxy; EXEC sends `MULTI`, the queue and `EXEC` in one write
//! on a dedicated connection to the slot's owner, so Redis runs them
//! atomically. WATCH pins that connection from the WATCH on, because
//! watched keys live on the connection. Every step runs in order (`Later`),
//! so a WATCH has completed before its EXEC starts.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use redmesh_model::{Compression, Slot};
use redmesh_resp::command::{flags, CommandInfo};
use redmesh_resp::{Frame, Protocol, Request};

use super::commands::{ready, top_name};
use super::route::{single_slot, target_for_slot, tryagain_moving};
use super::{backend_failure, err, Dispatch, Pending, Session};
use crate::compress;
use crate::dedicated::{Dedicated, DedicatedPool};
use crate::routing::{RouteTable, Serving, Target};

/// The connection holding WATCHed keys, filled in once WATCH has run.
type Pinned = Arc<Mutex<Option<Dedicated>>>;

struct Watch {
    target: Target,
    pool: Arc<DedicatedPool>,
    conn: Pinned,
}

/// Transaction state of a session.
#[derive(Default)]
pub(crate) struct Tx {
    multi: bool,
    failed: bool,
    slot: Option<Slot>,
    queued: Vec<Request>,
    watch: Option<Watch>,
}

impl Tx {
    /// Inside MULTI.
    pub fn in_multi(&self) -> bool {
        self.multi
    }

    /// Commands queued so far.
    pub fn queued_len(&self) -> usize {
        self.queued.len()
    }

    /// An error while queuing dooms the transaction (as in Redis).
    pub fn fail_if_queuing(&mut self) {
        if self.multi {
            self.failed = true;
        }
    }
}

fn take_conn(pinned: &Pinned) -> Option<Dedicated> {
    pinned.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// UNWATCHes a pinned connection and returns it to its pool.
async fn release(watch: Watch) {
    if let Some(mut conn) = take_conn(&watch.conn) {
        if conn
            .call(&Bytes::from_static(b"*1\r\n$7\r\nUNWATCH\r\n"))
            .await
            .is_ok()
        {
            watch.pool.put(conn);
        }
    }
}

/// Checks keys against the transaction's slot and returns the target.
fn slot_target(
    c: &Serving,
    s: &mut Session,
    cmd: &CommandInfo,
    req: &Request,
) -> Result<Option<Target>, Frame> {
    let positions = redmesh_resp::command::key_positions(cmd, req.args())
        .map_err(|e| err(format!("ERR {e}")))?;
    let slot = match single_slot(req.args(), &positions) {
        Ok(Some(slot)) => slot,
        Ok(None) => return Ok(None),
        Err(()) => return Err(err("CROSSSLOT Keys in request don't hash to the same slot")),
    };
    if s.tx.slot.is_some_and(|t| t != slot) {
        return Err(err("CROSSSLOT Keys in request don't hash to the same slot"));
    }
    if c.slot(slot).moving() {
        return Err(tryagain_moving(slot));
    }
    let target = target_for_slot(c, s, slot, false, false)?;
    s.tx.slot = Some(slot);
    Ok(Some(target))
}

/// Queues a command inside MULTI.
pub(super) fn queue(
    table: &Arc<RouteTable>,
    s: &mut Session,
    cmd: &'static CommandInfo,
    req: &Request,
) -> Dispatch {
    let Ok(c) = &table.serving else {
        s.tx.failed = true;
        return ready(err("CLUSTERDOWN the proxy serves no cluster"), s);
    };
    let top = top_name(cmd);
    let refused = if cmd.has(flags::NO_MULTI) {
        Some("ERR Command not allowed inside a transaction".to_owned())
    } else if cmd.has(flags::ADMIN) || matches!(top, "move" | "swapdb" | "migrate" | "select") {
        Some(format!("ERR '{}' is not allowed through redmesh", cmd.name))
    } else if c.compression != Compression::None {
        compress::refused(top)
    } else {
        None
    };
    if let Some(why) = refused {
        s.tx.failed = true;
        return ready(err(why), s);
    }
    if let Err(reply) = slot_target(c, s, cmd, req) {
        s.tx.failed = true;
        return ready(reply, s);
    }
    let req = compress::request(c, top, req);
    s.tx.queued.push(req.into_owned());
    ready(Frame::simple("QUEUED"), s)
}

/// MULTI, EXEC, DISCARD, WATCH and UNWATCH.
pub(super) fn command(
    table: &Arc<RouteTable>,
    s: &mut Session,
    top: &str,
    req: &Request,
) -> Dispatch {
    let proto = s.protocol;
    match top {
        "multi" => {
            if s.tx.multi {
                return ready(err("ERR MULTI calls can not be nested"), s);
            }
            s.tx.multi = true;
            ready(Frame::ok(), s)
        }
        "discard" => {
            if !s.tx.multi {
                return ready(err("ERR DISCARD without MULTI"), s);
            }
            let watch = std::mem::take(&mut s.tx).watch;
            later_ok(watch, proto)
        }
        "unwatch" => {
            let watch = s.tx.watch.take();
            if !s.tx.multi {
                s.tx.slot = None;
            }
            later_ok(watch, proto)
        }
        "watch" => watch(table, s, req),
        _ => exec(table, s),
    }
}

/// Replies +OK after releasing a pinned connection, in order.
fn later_ok(watch: Option<Watch>, proto: Protocol) -> Dispatch {
    Dispatch::Reply(Pending::Later(Box::pin(async move {
        if let Some(w) = watch {
            release(w).await;
        }
        Frame::ok().to_bytes(proto)
    })))
}

fn watch(table: &Arc<RouteTable>, s: &mut Session, req: &Request) -> Dispatch {
    if s.tx.multi {
        return ready(err("ERR WATCH inside MULTI is not allowed"), s);
    }
    let Ok(c) = &table.serving else {
        return ready(err("CLUSTERDOWN the proxy serves no cluster"), s);
    };
    let Some(cmd) = redmesh_resp::command::lookup(req.args()) else {
        return ready(err("ERR unknown command 'watch'"), s);
    };
    let target = match slot_target(c, s, cmd, req) {
        Ok(Some(t)) => t,
        Ok(None) => return ready(Frame::ok(), s),
        Err(reply) => return ready(reply, s),
    };
    if s.tx.watch.as_ref().is_some_and(|w| w.target != target) {
        return ready(
            err("CROSSSLOT Keys in request don't hash to the same slot"),
            s,
        );
    }
    let Some(pool) = c.link(target).map(|l| l.dedicated(s.protocol).clone()) else {
        return ready(err("CLUSTERDOWN no connection to the owner"), s);
    };
    let conn: Pinned =
        s.tx.watch
            .get_or_insert_with(|| Watch {
                target,
                pool: pool.clone(),
                conn: Arc::default(),
            })
            .conn
            .clone();
    let raw = req.raw().clone();
    let proto = s.protocol;
    Dispatch::Reply(Pending::Later(Box::pin(async move {
        let mut dedicated = match take_conn(&conn) {
            Some(d) => d,
            None => match pool.get().await {
                Ok(d) => d,
                Err(e) => return backend_failure(&e).to_bytes(proto),
            },
        };
        match dedicated.call(&raw).await {
            Ok(reply) => {
                *conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(dedicated);
                reply
            }
            // The connection and whatever it watched are gone: EXEC will
            // run unwatched on a new one, so fail it loudly instead.
            Err(e) => backend_failure(&e).to_bytes(proto),
        }
    })))
}

fn exec(table: &Arc<RouteTable>, s: &mut Session) -> Dispatch {
    if !s.tx.multi {
        return ready(err("ERR EXEC without MULTI"), s);
    }
    let tx = std::mem::take(&mut s.tx);
    let proto = s.protocol;
    if tx.failed {
        return Dispatch::Reply(Pending::Later(Box::pin(async move {
            if let Some(w) = tx.watch {
                release(w).await;
            }
            err("EXECABORT Transaction discarded because of previous errors.").to_bytes(proto)
        })));
    }
    let Ok(c) = &table.serving else {
        return ready(err("CLUSTERDOWN the proxy serves no cluster"), s);
    };
    if let Some(why) = s.fenced.clone() {
        return Dispatch::Reply(Pending::Later(Box::pin(async move {
            if let Some(w) = tx.watch {
                release(w).await;
            }
            err(why).to_bytes(proto)
        })));
    }
    // A slot that started moving since the transaction's keys were checked.
    if let Some(slot) = tx.slot.filter(|&slot| c.slot(slot).moving()) {
        return Dispatch::Reply(Pending::Later(Box::pin(async move {
            if let Some(w) = tx.watch {
                release(w).await;
            }
            tryagain_moving(slot).to_bytes(proto)
        })));
    }
    // The transaction's owner; a keyless one runs on a local master.
    let target = match tx.slot {
        Some(slot) => match target_for_slot(c, s, slot, false, false) {
            Ok(t) => t,
            Err(reply) => return ready(reply, s),
        },
        None => match c.local_masters.first() {
            Some(&n) => Target::Local(n),
            None => return ready(err("CLUSTERDOWN this proxy serves no slots right now"), s),
        },
    };
    let (pool, pinned) = match tx.watch {
        Some(w) if w.target == target => (w.pool, Some(w.conn)),
        Some(_) => {
            return ready(
                err("CROSSSLOT Keys in request don't hash to the same slot"),
                s,
            )
        }
        None => match c.link(target) {
            Some(l) => (l.dedicated(proto).clone(), None),
            None => return ready(err("CLUSTERDOWN no connection to the owner"), s),
        },
    };
    let ack = match (c.replica_ack_ms, target) {
        (Some(ms), Target::Local(n)) => {
            if !c.node_has_replica[usize::from(n)] {
                return ready(
                    err("NOREPLICAS the transaction's shard has no replica right now (durability replica_ack); nothing was applied"),
                    s,
                );
            }
            Some(ms)
        }
        _ => None,
    };
    let was_watched = pinned.is_some();
    let decompress = c.compression != Compression::None;
    let queued = tx.queued;
    // Held until EXEC is done, for the migration barrier (`admin::barrier`).
    let table = table.clone();
    Dispatch::Reply(Pending::Later(Box::pin(async move {
        let _table = table;
        let conn = match pinned.as_ref().and_then(take_conn) {
            Some(c) => Ok(c),
            None if was_watched => {
                // WATCH failed to pin a connection (its reply said so).
                return err("EXECABORT Transaction discarded because WATCH failed.")
                    .to_bytes(proto);
            }
            None => pool.get().await,
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => return backend_failure(&e).to_bytes(proto),
        };
        let multi = Bytes::from_static(b"*1\r\n$5\r\nMULTI\r\n");
        let exec = Bytes::from_static(b"*1\r\n$4\r\nEXEC\r\n");
        let mut batch: Vec<&Bytes> = vec![&multi];
        batch.extend(queued.iter().map(Request::raw));
        batch.push(&exec);
        if let Err(e) = conn.send(&batch).await {
            return backend_failure(&e).to_bytes(proto);
        }
        // MULTI's +OK and one +QUEUED (or error) per command, then EXEC's.
        let mut last = Bytes::new();
        for _ in 0..batch.len() {
            match conn.reply().await {
                Ok(r) => last = r,
                Err(e) => return backend_failure(&e).to_bytes(proto),
            }
        }
        if let Some(ms) = ack {
            last = match super::route::replica_ack(&mut conn, &last, ms, proto).await {
                Ok(r) => r,
                Err(e) => return e,
            };
        }
        pool.put(conn);
        if decompress {
            compress::decompress_reply(last, proto)
        } else {
            last
        }
    })))
}
