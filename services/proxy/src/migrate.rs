//! Moving keys of a migrating slot range to the destination shard, one
//! batch per `ProxyAdmin.MigrateBatch` call (DESIGN.md §6).
//!
//! Per round: one `SCAN` of the source node, keep the keys of the range,
//! lock them, `DUMP`+`PTTL` them pipelined, `RESTORE … REPLACE` them
//! pipelined at the destination master (then `WAIT` for its replica), and
//! `UNLINK` them at the source (then `WAIT` again). A key is deleted at the
//! source only once its copy is confirmed, and no client command touches it
//! in between (the locks), so no acknowledged write is lost.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redmesh_model::{key_slot, SlotRange};
use redmesh_resp::{encode_command, parse_frame, Frame, Protocol};

use crate::dedicated::{Dedicated, DedicatedPool};
use crate::link::Link;
use crate::locks::KeyLocks;
use crate::routing::{Outgoing, Retired, RouteTable};

/// How long `WAIT` gives a replica to confirm a batch.
const CONFIRM_MS: u32 = 2000;

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
}

/// Moves batches for one proxy.
pub struct Mover {
    /// Key locks shared with client sessions.
    pub locks: Arc<KeyLocks>,
    /// Tables replaced by newer ones.
    pub retired: Arc<Retired>,
    /// Epoch of the table whose barrier has passed.
    pub barrier_epoch: Mutex<u64>,
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
    pub async fn run(&self, table: Arc<RouteTable>, b: Batch) -> Result<Moved, MigrateError> {
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
        let mut src = connect(&source_pool).await?;
        let mut dst = connect(&target_pool).await?;
        let mut moved = Moved {
            next_cursor: b.cursor,
            ..Moved::default()
        };
        let require_confirm = c.replica_ack_ms.is_some();
        let scan_limit = b.max_keys.max(1).saturating_mul(SCAN_FACTOR);
        loop {
            let count = b.max_keys.clamp(16, 1000).to_string();
            let cursor = moved.next_cursor.to_string();
            let reply = pipeline(
                &mut src,
                &[cmd(&[
                    b"SCAN",
                    cursor.as_bytes(),
                    b"COUNT",
                    count.as_bytes(),
                ])],
            )
            .await?;
            let (next, keys) = parse_scan(&reply[0])?;
            moved.next_cursor = next;
            moved.scanned += keys.len() as u64;
            let mut ours: Vec<Bytes> = keys
                .into_iter()
                .filter(|k| b.range.contains(key_slot(k)))
                .collect();
            ours.sort_unstable();
            ours.dedup();
            if !ours.is_empty() {
                let r = self
                    .move_keys(&out, &mut src, &mut dst, &ours, require_confirm)
                    .await?;
                moved.keys += r.keys;
                moved.bytes += r.bytes;
                moved.skipped += r.skipped;
            }
            if moved.next_cursor == 0
                || moved.keys >= b.max_keys
                || (b.max_bytes > 0 && moved.bytes >= b.max_bytes)
                || moved.scanned >= scan_limit
            {
                break;
            }
        }
        source_pool.put(src);
        target_pool.put(dst);
        metrics::counter!("redmesh_proxy_migrated_keys_total").increment(moved.keys);
        metrics::counter!("redmesh_proxy_migrated_bytes_total").increment(moved.bytes);
        Ok(moved)
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

    /// Moves `keys` (sorted, distinct) under their locks.
    async fn move_keys(
        &self,
        out: &Outgoing,
        src: &mut Dedicated,
        dst: &mut Dedicated,
        keys: &[Bytes],
        require_confirm: bool,
    ) -> Result<Moved, MigrateError> {
        let _held = self.locks.lock(keys).await;
        let mut reqs = Vec::with_capacity(keys.len() * 2);
        for k in keys {
            reqs.push(cmd(&[b"DUMP", k]));
            reqs.push(cmd(&[b"PTTL", k]));
        }
        let replies = pipeline(src, &reqs).await?;
        let mut found: Vec<(&Bytes, Bytes, i64)> = Vec::with_capacity(keys.len());
        let mut moved = Moved::default();
        for (k, pair) in keys.iter().zip(replies.chunks(2)) {
            if let Some(e) = reply_error("DUMP", &pair[0]).or_else(|| reply_error("PTTL", &pair[1]))
            {
                return Err(MigrateError::Backend(e));
            }
            match (&pair[0], &pair[1]) {
                (Frame::Bulk(payload), Frame::Integer(ttl)) if *ttl != -2 => {
                    found.push((k, payload.clone(), (*ttl).max(0)))
                }
                _ => moved.skipped += 1,
            }
        }
        if found.is_empty() {
            return Ok(moved);
        }
        let mut restores: Vec<Bytes> = found
            .iter()
            .map(|(k, payload, ttl)| {
                cmd(&[
                    b"RESTORE",
                    k,
                    ttl.to_string().as_bytes(),
                    payload,
                    b"REPLACE",
                ])
            })
            .collect();
        if out.target_has_replica {
            restores.push(cmd(&[b"WAIT", b"1", CONFIRM_MS.to_string().as_bytes()]));
        }
        let copied: Vec<Bytes> = found.iter().map(|(k, _, _)| (*k).clone()).collect();
        let failure = match pipeline(dst, &restores).await {
            Err(e) => Some(e.to_string()),
            Ok(replies) => {
                let bad = replies[..found.len()]
                    .iter()
                    .find_map(|f| reply_error("RESTORE at the destination", f));
                let unconfirmed = out.target_has_replica
                    && !matches!(replies.last(), Some(Frame::Integer(n)) if *n >= 1);
                if bad.is_none() && unconfirmed {
                    metrics::counter!("redmesh_proxy_migration_unconfirmed_total", "side" => "destination")
                        .increment(1);
                }
                bad.or_else(|| {
                    (unconfirmed && require_confirm).then(|| {
                        "the destination replica did not confirm the copies (durability replica_ack)"
                            .to_owned()
                    })
                })
            }
        };
        if let Some(why) = failure {
            // The source copies stay authoritative; copies at the
            // destination must not outlive them.
            self.discard(out, &copied).await;
            return Err(MigrateError::Backend(why));
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
                    self.discard(out, &copied).await;
                    return Err(MigrateError::Backend(e));
                }
                if out.source_has_replica
                    && !matches!(replies.last(), Some(Frame::Integer(n)) if *n >= 1)
                {
                    metrics::counter!("redmesh_proxy_migration_unconfirmed_total", "side" => "source")
                        .increment(1);
                }
            }
            Err(e) => {
                // The UNLINK may or may not have run: keep the destination
                // copy of every key the source no longer has.
                self.settle(out, &copied).await;
                return Err(e);
            }
        }
        moved.keys = found.len() as u64;
        moved.bytes = found.iter().map(|(_, p, _)| p.len() as u64).sum();
        Ok(moved)
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

fn parse_scan(f: &Frame) -> Result<(u64, Vec<Bytes>), MigrateError> {
    let bad = || MigrateError::Backend(format!("unexpected SCAN reply {f:?}"));
    let Frame::Array(parts) = f else {
        return Err(reply_error("SCAN", f).map_or_else(bad, MigrateError::Backend));
    };
    let (Some(next), Some(Frame::Array(keys))) =
        (parts.first().and_then(Frame::as_bytes), parts.get(1))
    else {
        return Err(bad());
    };
    let next = std::str::from_utf8(next)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((
        next,
        keys.iter().filter_map(Frame::as_bytes).cloned().collect(),
    ))
}
