//! Moving keys of a migrating slot range to the destination shard, one
//! batch per `ProxyAdmin.MigrateBatch` call (DESIGN.md §6).
//!
//! Per round: one `SCAN` of the source node, keep the keys of the range,
//! lock them, `DUMP`+`PTTL` them pipelined, `RESTORE … REPLACE` them
//! pipelined at the destination master (then `WAIT` for its replica), and
//! `UNLINK` them at the source (then `WAIT` again). A key is deleted at the
//! source only once its copy is confirmed, and no client command touches it
//! in between (the locks), so no acknowledged write is lost.
//!
//! Rounds are fenced like client writes: before each write at the
//! destination, delete at the source, or discard of copies, the proxy
//! checks that a broker vouched for its view within `fence_after` and that
//! the current view still moves these slots, from the same node to the same
//! destination. A round that outlived its view (the process was paused, or
//! the source shard failed over to another proxy that now moves the same
//! keys) could otherwise discard the copies the new source made, the only
//! ones left.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redmesh_model::{key_slot, SlotRange};
use redmesh_resp::{encode_command, parse_frame, Frame, Protocol};
use tokio::task::JoinSet;

use crate::dedicated::{Dedicated, DedicatedPool};
use crate::link::Link;
use crate::routing::{Outgoing, Retired, RouteTable};
use crate::session::Shared;

/// How long `WAIT` gives a replica to confirm a batch.
const CONFIRM_MS: u32 = 2000;

/// Reads every key in `KEYS` in one call: three entries per key, a kind
/// ([`KIND_STRING`]: the value follows; [`KIND_LONG_STRING`]: a string to
/// GET afterwards; [`KIND_DUMP`]: a DUMP payload follows; [`KIND_BIG`]: the
/// key uses more than `ARGV[1]` bytes and is copied in pieces instead; 0:
/// gone), the payload, and the PTTL.
///
/// Strings travel as values (GET here, SET at the destination): DUMP would
/// serialize, checksum and try to LZF-compress them, RESTORE undo it all,
/// for the same result. Sizes are checked only where they can be large: a
/// `raw` string by its length, a collection not in a compact encoding by
/// MEMORY USAGE (sampled, so cheap even for a huge one). One call per round
/// costs the source node much less than several commands per key.
const READ_SCRIPT: &str = "local out = {}
local limit = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  local enc = redis.call('OBJECT', 'ENCODING', k)
  local kind, payload = 0, false
  if not enc then
    kind = 0
  elseif enc == 'int' or enc == 'embstr' or enc == 'raw' then
    local n = 0
    if enc == 'raw' then
      n = redis.call('STRLEN', k)
    end
    if n > limit then
      kind = 3
    elseif n > 1024 then
      kind = 4
    else
      kind, payload = 1, redis.call('GET', k)
    end
  elseif enc == 'listpack' or enc == 'intset' or enc == 'ziplist' then
    kind, payload = 2, redis.call('DUMP', k)
  elseif redis.call('MEMORY', 'USAGE', k, 'SAMPLES', '5') > limit then
    kind = 3
  else
    kind, payload = 2, redis.call('DUMP', k)
  end
  out[3 * i - 2] = kind
  out[3 * i - 1] = payload
  if kind == 1 or kind == 2 or kind == 4 then
    out[3 * i] = redis.call('PTTL', k)
  else
    out[3 * i] = -2
  end
end
return out";

/// [`READ_SCRIPT`]: a string value.
const KIND_STRING: i64 = 1;
/// [`READ_SCRIPT`]: a DUMP payload.
const KIND_DUMP: i64 = 2;
/// [`READ_SCRIPT`]: too big to copy at once.
const KIND_BIG: i64 = 3;
/// [`READ_SCRIPT`]: a string of more than 1 KiB, read by a GET of its own
/// after the script (copying it into Lua and out again costs the source
/// several times what the command does).
const KIND_LONG_STRING: i64 = 4;

/// Elements per command when a big collection is copied in pieces.
const PIECE: u64 = 1000;
/// Bytes per command when a big string is copied in pieces.
const PIECE_BYTES: u64 = 512 * 1024;
/// Temporary keys of piecewise copies are `TEMP_PREFIX<task>:<key>`: a name
/// no client key is expected to have, and per task, so a retry of the same
/// task finds (and clears) what an interrupted attempt left.
const TEMP_PREFIX: &[u8] = b"redmesh:migrating:";
/// A temporary key expires this long after its last piece, so a copy
/// abandoned by a crash does not stay behind.
const TEMP_TTL_MS: u64 = 60_000;

/// How a big key is read in pieces.
#[derive(Debug, Clone, Copy)]
enum Piecewise {
    /// A SCAN-family cursor; `swap` turns (member, score) into (score, member).
    Scan { swap: bool },
    /// LRANGE by index.
    Range,
    /// GETRANGE by byte offset.
    Bytes,
}

/// SCAN rounds moving keys at the same time within one batch.
const PARALLEL_ROUNDS: usize = 4;

/// Most keys examined per call, as a multiple of the keys asked for: a
/// source holding few keys of the range still answers promptly.
const SCAN_FACTOR: u64 = 16;

/// What went wrong with a batch.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The request does not match what this proxy is doing.
    #[error("{0}")]
    Precondition(String),
    /// A Redis node failed; the batch may be retried.
    #[error("{0}")]
    Backend(String),
}

/// One batch request.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Task moving the range.
    pub task_id: String,
    /// Slots to move (within one outgoing range).
    pub range: SlotRange,
    /// SCAN cursor of the source node.
    pub cursor: u64,
    /// Keys to move at most (roughly: whole SCAN rounds are moved).
    pub max_keys: u64,
    /// Bytes to move at most (0: no limit).
    pub max_bytes: u64,
}

/// What one batch did.
#[derive(Debug, Clone, Default)]
pub struct Moved {
    /// Cursor to continue from; 0 when the pass is complete.
    pub next_cursor: u64,
    /// Keys copied and deleted at the source.
    pub keys: u64,
    /// Serialized bytes of those keys.
    pub bytes: u64,
    /// Keys found but gone by the time they were locked.
    pub skipped: u64,
    /// Keys of the source examined.
    pub scanned: u64,
    /// Keys left for a copy in pieces (a round's result only).
    big: Vec<Bytes>,
}

/// Moves batches for one proxy.
pub struct Mover {
    /// What client sessions share: key locks, the current table, the
    /// topology's freshness.
    pub shared: Arc<Shared>,
    /// Tables replaced by newer ones.
    pub retired: Arc<Retired>,
    /// Epoch of the table whose barrier has passed.
    pub barrier_epoch: Mutex<u64>,
    /// Keys using more memory than this are copied in pieces.
    pub big_key_bytes: u64,
}

impl std::fmt::Debug for Mover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mover").finish_non_exhaustive()
    }
}

fn cmd(args: &[&[u8]]) -> Bytes {
    let mut out = BytesMut::new();
    encode_command(args, &mut out);
    out.freeze()
}

fn frame(raw: &[u8]) -> Frame {
    match parse_frame(raw) {
        Ok(Some((f, _))) => f,
        _ => Frame::Error(Bytes::from_static(b"ERR unparseable reply")),
    }
}

fn reply_error(what: &str, f: &Frame) -> Option<String> {
    match f {
        Frame::Error(e) => Some(format!("{what}: {}", String::from_utf8_lossy(e))),
        _ => None,
    }
}

async fn connect(pool: &DedicatedPool) -> Result<Dedicated, MigrateError> {
    pool.get()
        .await
        .map_err(|e| MigrateError::Backend(e.to_string()))
}

/// Sends `reqs` in one write and reads as many replies.
async fn pipeline(conn: &mut Dedicated, reqs: &[Bytes]) -> Result<Vec<Frame>, MigrateError> {
    let refs: Vec<&Bytes> = reqs.iter().collect();
    conn.send(&refs)
        .await
        .map_err(|e| MigrateError::Backend(e.to_string()))?;
    let mut out = Vec::with_capacity(reqs.len());
    for _ in reqs {
        let r = conn
            .reply()
            .await
            .map_err(|e| MigrateError::Backend(e.to_string()))?;
        out.push(frame(&r));
    }
    Ok(out)
}

impl Mover {
    /// Runs one batch against the table in use.
    ///
    /// Each SCAN round's keys move in a task of their own, up to
    /// [`PARALLEL_ROUNDS`] at once, while the next SCAN runs: a round spends
    /// most of its time waiting for one node or replica, so rounds in
    /// parallel keep every node and core busy. Rounds hold disjoint key
    /// locks (taken in a global order), and each has its own connections.
    pub async fn run(
        self: &Arc<Self>,
        table: Arc<RouteTable>,
        b: Batch,
    ) -> Result<Moved, MigrateError> {
        let c = table
            .serving
            .as_ref()
            .map_err(|why| MigrateError::Precondition(why.clone()))?;
        let out = c
            .outgoing
            .iter()
            .find(|o| {
                o.task_id == b.task_id
                    && o.range.start() <= b.range.start()
                    && b.range.end() <= o.range.end()
            })
            .ok_or_else(|| {
                let doing: Vec<String> = c
                    .outgoing
                    .iter()
                    .map(|o| format!("{} (task {})", o.range, o.task_id))
                    .collect();
                MigrateError::Precondition(format!(
                    "slots {} are not migrating out of this proxy for task {} at epoch {}; migrating: [{}]",
                    b.range,
                    b.task_id,
                    table.epoch,
                    doing.join(", ")
                ))
            })?
            .clone();
        // Rounds check that the slots they move are still theirs: the
        // batch's, not the whole outgoing range (which the next view may
        // split).
        let out = Outgoing {
            range: b.range,
            ..out
        };
        if c.node_ready[usize::from(out.node)].is_err() {
            return Err(MigrateError::Backend(format!(
                "the source node is not ready: {:?}",
                c.node_ready[usize::from(out.node)]
            )));
        }
        let source = &c.nodes[usize::from(out.node)];
        self.barrier(table.epoch, source).await?;
        let source_pool = source.dedicated(Protocol::Resp2).clone();
        let target_pool = out.target.dedicated(Protocol::Resp2).clone();
        let mut scanner = connect(&source_pool).await?;
        let mut moved = Moved {
            next_cursor: b.cursor,
            ..Moved::default()
        };
        let require_replica = c.replica_ack_ms.is_some();
        let scan_limit = b.max_keys.max(1).saturating_mul(SCAN_FACTOR);
        let mut claimed = 0u64;
        let mut rounds = Rounds(JoinSet::new());
        let mut failure = None;
        loop {
            let count = b.max_keys.clamp(16, 1000).to_string();
            let cursor = moved.next_cursor.to_string();
            let scan = pipeline(
                &mut scanner,
                &[cmd(&[
                    b"SCAN",
                    cursor.as_bytes(),
                    b"COUNT",
                    count.as_bytes(),
                ])],
            )
            .await
            .and_then(|reply| parse_scan(&reply[0]));
            let (next, keys) = match scan {
                Ok(found) => found,
                Err(e) => {
                    // Rounds in flight finish first (below).
                    failure.get_or_insert(e);
                    break;
                }
            };
            moved.next_cursor = next;
            moved.scanned += keys.len() as u64;
            let mut ours: Vec<Bytes> = keys
                .into_iter()
                .filter(|k| b.range.contains(key_slot(k)))
                .collect();
            ours.sort_unstable();
            ours.dedup();
            if !ours.is_empty() {
                claimed += ours.len() as u64;
                let round = Round {
                    mover: Arc::clone(self),
                    out: out.clone(),
                    source: source_pool.clone(),
                    target: target_pool.clone(),
                    require_replica,
                };
                rounds.0.spawn(round.run(ours));
            }
            while rounds.0.len() >= PARALLEL_ROUNDS && failure.is_none() {
                if let Some(r) = rounds.0.join_next().await {
                    collect(r, &mut moved, &mut failure);
                }
            }
            if failure.is_some()
                || moved.next_cursor == 0
                || claimed >= b.max_keys
                || (b.max_bytes > 0 && moved.bytes >= b.max_bytes)
                || moved.scanned >= scan_limit
            {
                break;
            }
        }
        while let Some(r) = rounds.0.join_next().await {
            collect(r, &mut moved, &mut failure);
        }
        source_pool.put(scanner);
        metrics::counter!("redmesh_proxy_migrated_keys_total").increment(moved.keys);
        metrics::counter!("redmesh_proxy_migrated_bytes_total").increment(moved.bytes);
        match failure {
            // The caller keeps its cursor and repeats the batch: keys moved
            // already are gone from the source, the others move again.
            Some(e) => Err(e),
            None => Ok(moved),
        }
    }

    /// Waits until nothing routed by an older table can still reach the
    /// source node: every older table dropped (their work done or queued),
    /// then a PING through each shared connection (queues are FIFO).
    /// Commands routed by the current table take the key locks.
    async fn barrier(&self, epoch: u64, source: &Link) -> Result<(), MigrateError> {
        if *self.barrier_epoch.lock().unwrap_or_else(|e| e.into_inner()) == epoch {
            return Ok(());
        }
        if !self.retired.drained(Duration::from_secs(10)).await {
            return Err(MigrateError::Backend(
                "requests routed by an older topology are still running after 10 s".into(),
            ));
        }
        for p in [Protocol::Resp2, Protocol::Resp3] {
            source
                .shared(p)
                .send(cmd(&[b"PING"]))
                .await
                .map_err(|_| MigrateError::Backend("barrier PING lost".into()))?
                .map_err(|e| MigrateError::Backend(e.to_string()))?;
        }
        *self.barrier_epoch.lock().unwrap_or_else(|e| e.into_inner()) = epoch;
        Ok(())
    }

    /// Whether this proxy may still act on `out` (see the module comment):
    /// not fenced, and the current table moves `out.range` from the same
    /// local node to the same destination node for the same task.
    fn still_moving(&self, out: &Outgoing) -> Result<(), MigrateError> {
        if let Some(why) = self.shared.fenced() {
            return Err(MigrateError::Precondition(why));
        }
        let table = self.shared.table.borrow().clone();
        let same = table.serving.as_ref().is_ok_and(|c| {
            c.outgoing.iter().any(|o| {
                o.task_id == out.task_id
                    && o.node == out.node
                    && o.target.addr() == out.target.addr()
                    && o.range.start() <= out.range.start()
                    && out.range.end() <= o.range.end()
            })
        });
        if same {
            Ok(())
        } else {
            Err(MigrateError::Precondition(format!(
                "slots {} no longer move from this proxy to {} for task {} (topology epoch {})",
                out.range,
                out.target.addr(),
                out.task_id,
                table.epoch
            )))
        }
    }

    /// Moves `keys` (sorted, distinct) under their locks.
    async fn move_keys(
        &self,
        out: &Outgoing,
        src: &mut Dedicated,
        dst: &mut Dedicated,
        keys: &[Bytes],
        require_replica: bool,
        big_key_bytes: u64,
    ) -> Result<Moved, MigrateError> {
        let _held = self.shared.locks.lock(keys).await;
        let limit = big_key_bytes.to_string();
        let numkeys = keys.len().to_string();
        let mut args: Vec<&[u8]> = Vec::with_capacity(keys.len() + 5);
        args.extend([b"EVAL".as_ref(), READ_SCRIPT.as_bytes(), numkeys.as_bytes()]);
        args.extend(keys.iter().map(|k| k.as_ref()));
        args.push(limit.as_bytes());
        let reply = pipeline(src, &[cmd(&args)]).await?.swap_remove(0);
        let entries = match &reply {
            Frame::Array(items) if items.len() == keys.len() * 3 => items,
            other => {
                return Err(MigrateError::Backend(
                    reply_error("read script", other).unwrap_or_else(|| {
                        format!("unexpected reply to the read script: {other:?}")
                    }),
                ))
            }
        };
        let mut found: Vec<(&Bytes, Bytes)> = Vec::with_capacity(keys.len());
        let mut writes: Vec<Bytes> = Vec::with_capacity(keys.len());
        let mut moved = Moved::default();
        // Long strings, read by GET now (the keys are still locked).
        let long: Vec<&Bytes> = keys
            .iter()
            .zip(entries.chunks(3))
            .filter(|(_, e)| matches!(e[0], Frame::Integer(KIND_LONG_STRING)))
            .map(|(k, _)| k)
            .collect();
        let long_values = if long.is_empty() {
            Vec::new()
        } else {
            let gets: Vec<Bytes> = long.iter().map(|k| cmd(&[b"GET", k])).collect();
            pipeline(src, &gets).await?
        };
        // A key counted as skipped is left where it is; only one that is
        // gone may be (an error must fail the batch, or a pass could end
        // with the key still at the source).
        if let Some(e) = long_values.iter().find_map(|f| reply_error("GET", f)) {
            return Err(MigrateError::Backend(e));
        }
        let mut long_values = long_values.into_iter();
        for (k, e) in keys.iter().zip(entries.chunks(3)) {
            let long_value;
            let value = if matches!(e[0], Frame::Integer(KIND_LONG_STRING)) {
                long_value = long_values.next().unwrap_or(Frame::Null);
                &long_value
            } else {
                &e[1]
            };
            match (&e[0], value, &e[2]) {
                (
                    Frame::Integer(KIND_STRING | KIND_LONG_STRING),
                    Frame::Bulk(value),
                    Frame::Integer(ttl),
                ) if *ttl != -2 => {
                    writes.push(match ttl {
                        // (PTTL 0: expiring this millisecond; PX 0 is refused.)
                        t if *t >= 0 => {
                            cmd(&[b"SET", k, value, b"PX", (*t).max(1).to_string().as_bytes()])
                        }
                        _ => cmd(&[b"SET", k, value]),
                    });
                    found.push((k, value.clone()));
                }
                (Frame::Integer(KIND_DUMP), Frame::Bulk(payload), Frame::Integer(ttl))
                    if *ttl != -2 =>
                {
                    // RESTORE's TTL 0 means none, so PTTL -1 becomes 0 and
                    // PTTL 0 (expiring now) 1.
                    let ttl = if *ttl < 0 { 0 } else { (*ttl).max(1) };
                    writes.push(cmd(&[
                        b"RESTORE",
                        k,
                        ttl.to_string().as_bytes(),
                        payload,
                        b"REPLACE",
                    ]));
                    found.push((k, payload.clone()));
                }
                (Frame::Integer(KIND_BIG), _, _) => moved.big.push(k.clone()),
                _ => moved.skipped += 1,
            }
        }
        if found.is_empty() {
            return Ok(moved);
        }
        let copied: Vec<Bytes> = found.iter().map(|(k, _)| (*k).clone()).collect();
        self.commit(out, src, dst, writes, &copied, require_replica)
            .await?;
        moved.keys = found.len() as u64;
        moved.bytes = found.iter().map(|(_, p)| p.len() as u64).sum();
        Ok(moved)
    }
    /// Completes copies: sends `writes` (which create the copies of
    /// `copied`) to the destination, waits for its replica, then deletes
    /// the keys at the source and waits for the source's replica. A key is
    /// deleted at the source only once its copy is confirmed; on a failure
    /// the source copies stay authoritative and the destination's are
    /// discarded.
    async fn commit(
        &self,
        out: &Outgoing,
        src: &mut Dedicated,
        dst: &mut Dedicated,
        mut writes: Vec<Bytes>,
        copied: &[Bytes],
        require_replica: bool,
    ) -> Result<(), MigrateError> {
        if require_replica && !out.target_has_replica {
            // As client writes get NOREPLICAS: moving keys from a shard
            // with a replica to one without would drop their redundancy.
            return Err(MigrateError::Backend(
                "the destination shard has no replica right now (durability replica_ack); \
                 the keys stay at the source until it has one"
                    .into(),
            ));
        }
        self.still_moving(out)?;
        let n = writes.len();
        if out.target_has_replica {
            writes.push(cmd(&[b"WAIT", b"1", CONFIRM_MS.to_string().as_bytes()]));
        }
        let failure = match pipeline(dst, &writes).await {
            Err(e) => Some(e.to_string()),
            Ok(replies) => {
                let bad = replies[..n]
                    .iter()
                    .find_map(|f| reply_error("copy at the destination", f));
                let unconfirmed = out.target_has_replica
                    && !matches!(replies.last(), Some(Frame::Integer(n)) if *n >= 1);
                if bad.is_none() && unconfirmed {
                    metrics::counter!("redmesh_proxy_migration_unconfirmed_total", "side" => "destination")
                        .increment(1);
                }
                // Whatever the durability: under `async` a client accepts
                // that its own latest writes may die with their master, but
                // these keys are old and safe at the source. A `WAIT` that
                // no replica answers also means the node may have been
                // failed over and detached (its proxy paused, say) while our
                // view still names it: deleting the sources then would leave
                // the keys only on a node that serves nobody.
                bad.or_else(|| {
                    unconfirmed.then(|| {
                        "the destination replica did not confirm the copies; the keys stay at the source"
                            .to_owned()
                    })
                })
            }
        };
        if let Some(why) = failure {
            self.discard(out, copied).await;
            return Err(MigrateError::Backend(why));
        }
        if let Err(e) = self.still_moving(out) {
            // Not ours to delete any more, nor to discard: whoever moves
            // these slots now replaces the copies or moves them back.
            tracing::warn!(error = %e, keys = copied.len(), "stopping a migration round between copy and delete");
            return Err(e);
        }
        let mut unlink: Vec<&[u8]> = vec![b"UNLINK"];
        unlink.extend(copied.iter().map(|k| k.as_ref()));
        let mut dels = vec![cmd(&unlink)];
        if out.source_has_replica {
            dels.push(cmd(&[b"WAIT", b"1", CONFIRM_MS.to_string().as_bytes()]));
        }
        match pipeline(src, &dels).await {
            Ok(replies) => {
                if let Some(e) = reply_error("UNLINK at the source", &replies[0]) {
                    self.discard(out, copied).await;
                    return Err(MigrateError::Backend(e));
                }
                if out.source_has_replica
                    && !matches!(replies.last(), Some(Frame::Integer(n)) if *n >= 1)
                {
                    metrics::counter!("redmesh_proxy_migration_unconfirmed_total", "side" => "source")
                        .increment(1);
                }
                Ok(())
            }
            Err(e) => {
                // The UNLINK may or may not have run: keep the destination
                // copy of every key the source no longer has.
                self.settle(out, copied).await;
                Err(e)
            }
        }
    }

    /// Moves one key too big for a single DUMP/RESTORE, under its lock:
    /// copied piece by piece into a temporary key at the destination (no
    /// command on either node handles more than [`PIECE`] elements or
    /// [`PIECE_BYTES`] bytes), renamed over the key, then confirmed and
    /// deleted at the source like any other. Types that cannot be rebuilt
    /// piecewise without losing state (streams with their consumer groups,
    /// module types) still move by DUMP/RESTORE.
    async fn move_big(
        &self,
        out: &Outgoing,
        src: &mut Dedicated,
        dst: &mut Dedicated,
        key: Bytes,
        require_replica: bool,
    ) -> Result<Moved, MigrateError> {
        // Held by name, not by stripe: the copy takes seconds, and other
        // keys of the stripe must not wait for it.
        let held = self.shared.locks.lock_long(&key).await;
        let r = pipeline(src, &[cmd(&[b"TYPE", &key])]).await?;
        let kind = match &r[0] {
            Frame::Simple(t) => t.clone(),
            f => {
                return Err(MigrateError::Backend(
                    reply_error("TYPE", f)
                        .unwrap_or_else(|| format!("unexpected TYPE reply {f:?}")),
                ))
            }
        };
        let (read, write, step): (&[u8], &[u8], Piecewise) = match kind.as_ref() {
            b"hash" => (b"HSCAN", b"HSET", Piecewise::Scan { swap: false }),
            b"set" => (b"SSCAN", b"SADD", Piecewise::Scan { swap: false }),
            b"zset" => (b"ZSCAN", b"ZADD", Piecewise::Scan { swap: true }),
            b"list" => (b"LRANGE", b"RPUSH", Piecewise::Range),
            b"string" => (b"GETRANGE", b"APPEND", Piecewise::Bytes),
            b"none" => {
                return Ok(Moved {
                    skipped: 1,
                    ..Moved::default()
                })
            }
            _ => {
                drop(held);
                return self
                    .move_keys(out, src, dst, &[key], require_replica, u64::MAX)
                    .await;
            }
        };
        let tmp = Bytes::from([TEMP_PREFIX, out.task_id.as_bytes(), b":", &key].concat());
        let expire = TEMP_TTL_MS.to_string();
        let result = async {
            expect_ok(pipeline(dst, &[cmd(&[b"UNLINK", &tmp])]).await?, "UNLINK")?;
            let mut bytes = 0u64;
            let mut cursor: Bytes = Bytes::from_static(b"0");
            let mut at: u64 = 0;
            loop {
                let (items, done) = match step {
                    Piecewise::Scan { .. } => {
                        let r = pipeline(
                            src,
                            &[cmd(&[
                                read,
                                &key,
                                &cursor,
                                b"COUNT",
                                PIECE.to_string().as_bytes(),
                            ])],
                        )
                        .await?;
                        let (next, items) = parse_scan(&r[0])?;
                        cursor = Bytes::from(next.to_string());
                        (items, next == 0)
                    }
                    Piecewise::Range => {
                        let (a, b) = (at.to_string(), (at + PIECE - 1).to_string());
                        let r = pipeline(src, &[cmd(&[read, &key, a.as_bytes(), b.as_bytes()])])
                            .await?;
                        let items = array_items(&r[0], "LRANGE")?;
                        at += PIECE;
                        let done = (items.len() as u64) < PIECE;
                        (items, done)
                    }
                    Piecewise::Bytes => {
                        let (a, b) = (at.to_string(), (at + PIECE_BYTES - 1).to_string());
                        let r = pipeline(src, &[cmd(&[read, &key, a.as_bytes(), b.as_bytes()])])
                            .await?;
                        let Frame::Bulk(piece) = &r[0] else {
                            return Err(MigrateError::Backend(format!(
                                "unexpected GETRANGE reply {:?}",
                                r[0]
                            )));
                        };
                        at += PIECE_BYTES;
                        let done = (piece.len() as u64) < PIECE_BYTES;
                        (vec![piece.clone()], done)
                    }
                };
                if !items.is_empty() {
                    bytes += items.iter().map(|i| i.len() as u64).sum::<u64>();
                    let mut args: Vec<&[u8]> = Vec::with_capacity(items.len() + 2);
                    args.push(write);
                    args.push(&tmp);
                    if matches!(step, Piecewise::Scan { swap: true }) {
                        // ZSCAN answers member, score; ZADD takes score, member.
                        for pair in items.chunks(2) {
                            args.extend(pair.iter().rev().map(|b| b.as_ref()));
                        }
                    } else {
                        args.extend(items.iter().map(|b| b.as_ref()));
                    }
                    let r = pipeline(
                        dst,
                        &[cmd(&args), cmd(&[b"PEXPIRE", &tmp, expire.as_bytes()])],
                    )
                    .await?;
                    if let Some(e) = r.iter().find_map(|f| reply_error("piecewise copy", f)) {
                        return Err(MigrateError::Backend(e));
                    }
                }
                if done {
                    break;
                }
            }
            // The TTL as it is now (the copy took time), or the key expired
            // meanwhile and there is nothing to move.
            let r = pipeline(src, &[cmd(&[b"PTTL", &key])]).await?;
            let ttl = match r[0] {
                Frame::Integer(t) => t,
                ref f => {
                    return Err(MigrateError::Backend(format!(
                        "unexpected PTTL reply {f:?}"
                    )))
                }
            };
            if ttl == -2 {
                expect_ok(pipeline(dst, &[cmd(&[b"UNLINK", &tmp])]).await?, "UNLINK")?;
                return Ok(None);
            }
            let last = if ttl > 0 {
                cmd(&[b"PEXPIRE", &key, ttl.to_string().as_bytes()])
            } else {
                cmd(&[b"PERSIST", &key])
            };
            let writes = vec![cmd(&[b"UNLINK", &key]), cmd(&[b"RENAME", &tmp, &key]), last];
            self.commit(
                out,
                src,
                dst,
                writes,
                std::slice::from_ref(&key),
                require_replica,
            )
            .await?;
            Ok(Some(bytes))
        }
        .await;
        match result {
            Ok(Some(bytes)) => Ok(Moved {
                keys: 1,
                bytes,
                ..Moved::default()
            }),
            Ok(None) => Ok(Moved {
                skipped: 1,
                ..Moved::default()
            }),
            Err(e) => {
                // Leave no partial copy behind (it would expire anyway).
                self.discard(out, std::slice::from_ref(&tmp)).await;
                Err(e)
            }
        }
    }

    /// After an UNLINK with no answer: discards the destination copies of
    /// the keys the source still holds.
    async fn settle(&self, out: &Outgoing, keys: &[Bytes]) {
        let source = &out.source;
        let reqs: Vec<Bytes> = keys.iter().map(|k| cmd(&[b"EXISTS", k])).collect();
        let still = match connect(source.dedicated(Protocol::Resp2)).await {
            Ok(mut conn) => pipeline(&mut conn, &reqs).await,
            Err(e) => Err(e),
        };
        match still {
            Ok(replies) => {
                let at_source: Vec<Bytes> = keys
                    .iter()
                    .zip(&replies)
                    .filter(|(_, r)| matches!(r, Frame::Integer(1)))
                    .map(|(k, _)| k.clone())
                    .collect();
                if !at_source.is_empty() {
                    self.discard(out, &at_source).await;
                }
            }
            Err(e) => tracing::error!(
                error = %e,
                keys = keys.len(),
                "cannot tell whether moved keys were deleted at the source; both copies are kept and the next pass moves the source's again"
            ),
        }
    }

    /// Best effort: deletes copies at the destination after a failed batch
    /// (the keys' locks are still held, so no client wrote them there).
    async fn discard(&self, out: &Outgoing, keys: &[Bytes]) {
        if let Err(e) = self.still_moving(out) {
            // Another proxy may be moving the same keys now: its copies
            // may be the only ones left.
            tracing::warn!(error = %e, keys = keys.len(), "leaving copies at the migration destination");
            return;
        }
        let mut args: Vec<&[u8]> = vec![b"UNLINK"];
        args.extend(keys.iter().map(|k| k.as_ref()));
        let req = cmd(&args);
        for _ in 0..3 {
            if let Ok(mut conn) = out.target.dedicated(Protocol::Resp2).get().await {
                if let Ok(r) = pipeline(&mut conn, std::slice::from_ref(&req)).await {
                    if !matches!(r[0], Frame::Error(_)) {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::error!(
            keys = keys.len(),
            "could not delete partial copies at the migration destination; they are replaced when the batch is retried"
        );
    }
}

/// A batch's rounds in flight. If the batch is dropped (its caller gave
/// up), they run to their end rather than being cut between the copy and
/// the delete at the source: each round leaves its keys in one place.
struct Rounds(JoinSet<Result<Moved, MigrateError>>);

impl Drop for Rounds {
    fn drop(&mut self) {
        self.0.detach_all();
    }
}

/// One SCAN round's keys on their way to the destination.
struct Round {
    mover: Arc<Mover>,
    out: Outgoing,
    source: Arc<DedicatedPool>,
    target: Arc<DedicatedPool>,
    require_replica: bool,
}

impl Round {
    async fn run(self, keys: Vec<Bytes>) -> Result<Moved, MigrateError> {
        let mut src = connect(&self.source).await?;
        let mut dst = connect(&self.target).await?;
        let mut moved = self
            .mover
            .move_keys(
                &self.out,
                &mut src,
                &mut dst,
                &keys,
                self.require_replica,
                self.mover.big_key_bytes,
            )
            .await?;
        // Big keys after the round's locks are released: the keys sharing
        // their round are not held up while they are copied.
        for key in std::mem::take(&mut moved.big) {
            let m = self
                .mover
                .move_big(&self.out, &mut src, &mut dst, key, self.require_replica)
                .await?;
            moved.keys += m.keys;
            moved.bytes += m.bytes;
            moved.skipped += m.skipped;
        }
        // Only connections whose exchanges completed go back to the pools.
        self.source.put(src);
        self.target.put(dst);
        Ok(moved)
    }
}

/// Adds a finished round to the batch's totals, or keeps its error.
fn collect(
    r: Result<Result<Moved, MigrateError>, tokio::task::JoinError>,
    moved: &mut Moved,
    failure: &mut Option<MigrateError>,
) {
    match r {
        Ok(Ok(m)) => {
            moved.keys += m.keys;
            moved.bytes += m.bytes;
            moved.skipped += m.skipped;
        }
        Ok(Err(e)) => {
            failure.get_or_insert(e);
        }
        Err(e) => {
            failure.get_or_insert(MigrateError::Backend(format!(
                "a migration round failed: {e}"
            )));
        }
    }
}

/// The elements of an array reply.
fn array_items(f: &Frame, what: &str) -> Result<Vec<Bytes>, MigrateError> {
    match f {
        Frame::Array(items) => Ok(items.iter().filter_map(Frame::as_bytes).cloned().collect()),
        other => Err(MigrateError::Backend(
            reply_error(what, other)
                .unwrap_or_else(|| format!("unexpected {what} reply {other:?}")),
        )),
    }
}

/// Fails on an error reply.
fn expect_ok(replies: Vec<Frame>, what: &str) -> Result<(), MigrateError> {
    match replies.iter().find_map(|f| reply_error(what, f)) {
        Some(e) => Err(MigrateError::Backend(e)),
        None => Ok(()),
    }
}

fn parse_scan(f: &Frame) -> Result<(u64, Vec<Bytes>), MigrateError> {
    let bad = || MigrateError::Backend(format!("unexpected SCAN reply {f:?}"));
    let Frame::Array(parts) = f else {
        return Err(reply_error("SCAN", f).map_or_else(bad, MigrateError::Backend));
    };
    let (Some(next), Some(keys)) = (parts.first().and_then(Frame::as_bytes), parts.get(1)) else {
        return Err(bad());
    };
    let next = std::str::from_utf8(next)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((next, array_items(keys, "SCAN")?))
}
