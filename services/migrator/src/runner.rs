//! The leader's work: run every active task's step machine (DESIGN.md §6).
//!
//! Per slot range: PREPARE (the destination imports; confirmed by its proxy
//! reaching the epoch) → MOVE (the source migrates; `MigrateBatch` until a
//! complete SCAN pass finds nothing) → COMMIT (the destination owns;
//! confirmed) → DONE (the source redirects with MOVED). Every step is
//! persisted before the next begins and each is idempotent, so a new leader
//! resumes a task wherever the last one stopped. Cluster changes are guarded
//! by the leadership, so a deposed leader changes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use redmesh_api::convert;
use redmesh_api::v1::{self, MigrationPhase, MigrationState};
use redmesh_model::scale::Move;
use redmesh_model::{Chunk, Cluster, ClusterName, ClusterTask, MigrationStage, ModelError, Proxy};
use redmesh_runtime::backoff::reconnect_delays;
use redmesh_runtime::trace_context::continue_trace;
use redmesh_store::{Change, Leadership, MetaError, MetaRepo};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::Instrument;

use crate::plan::{chunk_model, move_model};
use crate::proxies::ProxyClients;
use crate::tasks::{terminal, Stored, Tasks};

/// Keys per batch when no rate limits it. Each batch costs a gRPC call and
/// reads of the task and the cluster, so batches are large: about 0.1 s of
/// work at full speed, short enough for pause and cancel to act at once.
pub const DEFAULT_BATCH_KEYS: u32 = 10_000;
/// Batches per second a rate limit is split into.
const BATCHES_PER_SECOND: u64 = 10;
/// How often progress is persisted while moving.
const SAVE_EVERY: Duration = Duration::from_millis(250);

/// What the leader needs.
#[derive(Clone)]
pub struct Runner {
    /// Typed metadata.
    pub repo: MetaRepo,
    /// Task records.
    pub tasks: Tasks,
    /// Proxy admin clients.
    pub proxies: Arc<ProxyClients>,
    /// Keys per batch.
    pub batch_keys: u32,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").finish_non_exhaustive()
    }
}

/// Why a task run stopped early.
#[derive(Debug)]
enum Stop {
    /// Paused, ended, or leadership lost: nothing to do now.
    Idle,
    /// A failure worth retrying later.
    Retry(String),
    /// Leadership lost.
    Deposed,
}

impl From<Status> for Stop {
    fn from(s: Status) -> Self {
        Stop::Retry(format!("{}: {}", s.code(), s.message()))
    }
}

impl From<MetaError> for Stop {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::GuardFailed(_) => Stop::Deposed,
            other => Stop::Retry(other.to_string()),
        }
    }
}

fn now() -> Option<pbjson_types::Timestamp> {
    Some(convert::timestamp(SystemTime::now()))
}

fn state(t: &v1::MigrationTask) -> MigrationState {
    MigrationState::try_from(t.state).unwrap_or(MigrationState::Unspecified)
}

fn phase(r: &v1::RangeProgress) -> MigrationPhase {
    MigrationPhase::try_from(r.phase).unwrap_or(MigrationPhase::Queued)
}

/// Recent rate over a sliding window of samples.
#[derive(Debug, Default)]
struct Rate {
    samples: Vec<(Instant, u64, u64)>,
}

impl Rate {
    fn add(&mut self, keys: u64, bytes: u64) -> (f64, f64) {
        let now = Instant::now();
        self.samples.push((now, keys, bytes));
        self.samples
            .retain(|(t, _, _)| now.duration_since(*t) < Duration::from_secs(5));
        let first = self.samples.first().map_or(now, |s| s.0);
        let span = now.duration_since(first).as_secs_f64().max(0.2);
        let keys: u64 = self.samples.iter().map(|s| s.1).sum();
        let bytes: u64 = self.samples.iter().map(|s| s.2).sum();
        (keys as f64 / span, bytes as f64 / span)
    }
}

impl Runner {
    /// Runs active tasks whenever something changes, until `stop`.
    pub async fn supervise(&self, leadership: &Leadership, stop: CancellationToken) {
        let mut changes =
            redmesh_store::changes(self.tasks.store().clone(), self.repo.keys().root());
        let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut retry = tokio::time::interval(Duration::from_secs(1));
        loop {
            match self.tasks.all().await {
                Ok(all) => {
                    export_task_states(&all);
                    running.retain(|_, h| !h.is_finished());
                    for s in all {
                        let st = state(&s.task);
                        if terminal(s.task.state) || st == MigrationState::Paused {
                            continue;
                        }
                        let key = format!("{}/{}", s.task.cluster, s.task.id);
                        if running.contains_key(&key) {
                            continue;
                        }
                        let me = self.clone();
                        let l = leadership.clone();
                        let stop = stop.child_token();
                        // The work joins the trace of the request that
                        // started the task, so one scale is one trace.
                        let span = tracing::info_span!(
                            "migration task",
                            otel.name = "migration task",
                            task = %s.task.id,
                            cluster = %s.task.cluster,
                        );
                        continue_trace(&span, &s.task.trace_parent);
                        running.insert(
                            key,
                            tokio::spawn(
                                async move {
                                    me.run_task(&l, &s.task.cluster, &s.task.id, stop).await
                                }
                                .instrument(span),
                            ),
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list migration tasks"),
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = changes.changed() => {}
                // Failed runs are restarted by this tick.
                _ = retry.tick() => {}
            }
        }
        for (_, h) in running {
            h.abort();
        }
    }

    /// Runs one task until it ends, pauses, or fails for now.
    async fn run_task(&self, l: &Leadership, cluster: &str, id: &str, stop: CancellationToken) {
        let mut delays = reconnect_delays(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                o = self.drive(l, cluster, id) => o,
            };
            match outcome {
                Ok(()) | Err(Stop::Idle) => return,
                Err(Stop::Deposed) => {
                    tracing::warn!(
                        task = id,
                        "leadership lost; leaving the task to the next leader"
                    );
                    return;
                }
                Err(Stop::Retry(why)) => {
                    tracing::warn!(task = id, cluster, error = %why, "migration step failed; retrying");
                    let _ = self
                        .tasks
                        .modify(cluster, id, |t| {
                            t.error = why.clone();
                            Ok(())
                        })
                        .await;
                    let pause = delays.next().unwrap_or(Duration::from_secs(5));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// Reads the task and advances it step by step.
    async fn drive(&self, l: &Leadership, cluster: &str, id: &str) -> Result<(), Stop> {
        let mut s = self.tasks.get(cluster, id).await?.ok_or(Stop::Idle)?;
        if terminal(s.task.state) {
            // Ended meanwhile (the supervisor may start a run from a listing
            // older than the end). Its cluster no longer carries its mark,
            // which the check below would take for an orphaned task.
            return Err(Stop::Idle);
        }
        let name = ClusterName::parse(cluster)
            .map_err(|e| Stop::Retry(format!("task of an invalid cluster name: {e}")))?;
        if let Some(why) = self.orphaned(&name, id).await? {
            // Nothing of this cluster is the task's any more: going on
            // could only change a cluster that is not its own.
            tracing::error!(task = id, cluster, reason = %why, "migration task failed");
            s.task.state = MigrationState::Failed as i32;
            s.task.error = why;
            s.task.keys_per_second = 0.0;
            s.task.bytes_per_second = 0.0;
            self.save(l, &mut s).await?;
            return Err(Stop::Idle);
        }
        loop {
            match state(&s.task) {
                MigrationState::Pending => {
                    s.task.state = MigrationState::Running as i32;
                    self.save(l, &mut s).await?;
                }
                MigrationState::Running | MigrationState::Cancelling => {}
                MigrationState::Paused
                    if s.task.keys_per_second != 0.0 || s.task.bytes_per_second != 0.0 =>
                {
                    // Paused between batches (or while retrying): the
                    // record shows it is not moving.
                    s.task.keys_per_second = 0.0;
                    s.task.bytes_per_second = 0.0;
                    self.save(l, &mut s).await?;
                    return Err(Stop::Idle);
                }
                _ => return Err(Stop::Idle),
            }
            if state(&s.task) == MigrationState::Cancelling {
                self.plan_cancel(l, &name, &mut s).await?;
            }
            match next_step(&s.task.ranges) {
                Next::Finish => return self.finish(l, &name, &mut s).await,
                Next::Step(i) => self.step(l, &name, &mut s, i).await?,
                Next::Move(idxs) => self.move_phase(l, &name, &mut s, idxs).await?,
            }
        }
    }

    /// Why the task can no longer run, if so: its cluster was deleted, or
    /// no longer carries the task's mark (deleted and created again).
    async fn orphaned(&self, name: &ClusterName, id: &str) -> Result<Option<String>, Stop> {
        let snap = self.repo.snapshot().await?;
        Ok(match snap.clusters.get(name) {
            None => Some(format!("cluster {name} was deleted while the task ran")),
            Some(c) if c.task.id != id => Some(format!(
                "cluster {name} is no longer marked as migrated by this task (it now shows {:?} {:?}); it was deleted and created again, or its record was edited",
                c.task.kind, c.task.id
            )),
            Some(_) => None,
        })
    }

    /// Persists the task: progress is the runner's, state changes by the
    /// API (pause, cancel) and the rate are the operator's and kept.
    async fn save(&self, l: &Leadership, s: &mut Stored) -> Result<(), Stop> {
        for _ in 0..20 {
            s.task.updated_at = now();
            if let Some(rev) = self.tasks.put_if(&s.task, s.revision, &[l.guard()]).await? {
                s.revision = rev;
                return Ok(());
            }
            let fresh = self
                .tasks
                .get(&s.task.cluster, &s.task.id)
                .await?
                .ok_or(Stop::Idle)?;
            let mine = state(&s.task);
            let theirs = state(&fresh.task);
            if matches!(theirs, MigrationState::Paused | MigrationState::Cancelling)
                && !terminal(s.task.state)
                && mine != MigrationState::Cancelling
            {
                s.task.state = fresh.task.state;
            }
            s.task.rate = fresh.task.rate;
            s.revision = fresh.revision;
        }
        Err(Stop::Retry("the task record kept changing".into()))
    }

    /// Commits a cluster change guarded by the leadership; returns the
    /// epoch it carries.
    async fn change_cluster(
        &self,
        l: &Leadership,
        name: &ClusterName,
        f: impl Fn(&Cluster) -> Result<Option<Cluster>, ModelError>,
    ) -> Result<u64, Stop> {
        let epoch = self
            .repo
            .update_guarded(vec![l.guard()], |snap, epoch| {
                let c = snap.cluster(name)?;
                match f(c)? {
                    Some(next) if next != *c => Ok((
                        Change {
                            put_clusters: vec![next],
                            ..Change::default()
                        },
                        epoch,
                    )),
                    _ => Ok((Change::default(), c.epoch)),
                }
            })
            .await?;
        Ok(epoch)
    }

    async fn cluster(&self, name: &ClusterName) -> Result<(Cluster, HashMap<String, Proxy>), Stop> {
        let snap = self.repo.snapshot().await?;
        let c = snap
            .clusters
            .get(name)
            .cloned()
            .ok_or_else(|| Stop::Retry(format!("cluster {name} no longer exists")))?;
        let proxies = snap
            .proxies
            .into_iter()
            .map(|(id, p)| (id.to_string(), p))
            .collect();
        Ok((c, proxies))
    }

    /// Admin address of the proxy mastering `shard`.
    async fn master_admin(&self, name: &ClusterName, shard: u32) -> Result<(String, String), Stop> {
        let (c, proxies) = self.cluster(name).await?;
        let id = c
            .master_proxy(shard)
            .ok_or_else(|| Stop::Retry(format!("shard {shard} no longer exists")))?;
        let p = proxies
            .get(id.as_str())
            .ok_or_else(|| Stop::Retry(format!("proxy {id} is not registered")))?;
        Ok((id.to_string(), p.spec.admin_address.to_string()))
    }

    /// Waits until the master proxy of `shard` serves `epoch` (it may move
    /// by failover meanwhile: the address is looked up again each try).
    async fn confirm(&self, name: &ClusterName, shard: u32, epoch: u64) -> Result<(), Stop> {
        let (id, addr) = self.master_admin(name, shard).await?;
        self.proxies.wait_epoch(&addr, epoch).await.map_err(|e| {
            Stop::Retry(format!(
                "proxy {id} did not confirm epoch {epoch}: {}",
                e.message()
            ))
        })
    }

    async fn step(
        &self,
        l: &Leadership,
        name: &ClusterName,
        s: &mut Stored,
        i: usize,
    ) -> Result<(), Stop> {
        let task_id = s.task.id.clone();
        let mv = range_move(&s.task.ranges[i])?;
        match phase(&s.task.ranges[i]) {
            MigrationPhase::Unspecified | MigrationPhase::Queued | MigrationPhase::Prepare => {
                if s.task.ranges[i].phase != MigrationPhase::Prepare as i32 {
                    s.task.ranges[i].phase = MigrationPhase::Prepare as i32;
                    self.save(l, s).await?;
                }
                let e1 = self
                    .change_cluster(l, name, |c| {
                        if moved_already(c, &mv, &task_id) {
                            return Ok(None);
                        }
                        c.begin_move(&mv, &task_id).map(Some)
                    })
                    .await?;
                self.confirm(name, mv.to, e1).await?;
                self.change_cluster(l, name, |c| match stage_of(c, &mv, &task_id) {
                    Some(MigrationStage::Prepare) => c
                        .set_move_stage(mv.range, &task_id, MigrationStage::Move)
                        .map(Some),
                    _ => Ok(None),
                })
                .await?;
                let r = &mut s.task.ranges[i];
                r.phase = MigrationPhase::Move as i32;
                r.cursor = 0;
                r.pass = 0;
                r.pass_keys_moved = 0;
                r.cursor_proxy_id.clear();
                self.save(l, s).await
            }
            MigrationPhase::Move => self.move_phase(l, name, s, vec![i]).await,
            MigrationPhase::Commit => {
                let (c, _) = self.cluster(name).await?;
                if stage_of(&c, &mv, &task_id).is_some() {
                    self.confirm(name, mv.to, c.epoch).await?;
                    self.change_cluster(l, name, |c| {
                        Ok(Some(c.end_move(mv.range, &task_id, true)))
                    })
                    .await?;
                }
                s.task.ranges[i].phase = MigrationPhase::Done as i32;
                s.task.error.clear();
                self.save(l, s).await?;
                tracing::info!(task = %task_id, range = %mv.range, from = mv.from, to = mv.to, "slot range moved");
                Ok(())
            }
            MigrationPhase::Done => Ok(()),
        }
    }

    /// Moves the keys of ranges `idxs` (all in the MOVE phase, no shard in
    /// two of them) until a complete pass of each finds none, then marks
    /// each for commit.
    async fn move_phase(
        &self,
        l: &Leadership,
        name: &ClusterName,
        s: &mut Stored,
        idxs: Vec<usize>,
    ) -> Result<(), Stop> {
        let task_id = s.task.id.clone();
        // A crash may have come between a cluster change and the task
        // record saying so.
        let (c, _) = self.cluster(name).await?;
        let mut active = Vec::new();
        for i in idxs {
            let mv = range_move(&s.task.ranges[i])?;
            match stage_of(&c, &mv, &task_id) {
                None => {
                    s.task.ranges[i].phase = MigrationPhase::Done as i32;
                    self.save(l, s).await?;
                }
                Some(MigrationStage::Commit) => {
                    s.task.ranges[i].phase = MigrationPhase::Commit as i32;
                    self.save(l, s).await?;
                }
                Some(MigrationStage::Prepare) => {
                    self.change_cluster(l, name, |c| {
                        c.set_move_stage(mv.range, &task_id, MigrationStage::Move)
                            .map(Some)
                    })
                    .await?;
                    active.push((i, mv));
                }
                Some(MigrationStage::Move) => active.push((i, mv)),
            }
        }
        self.move_ranges(l, name, s, active).await
    }

    /// The batch loop of [`Self::move_phase`]: one `MigrateBatch` per
    /// active range at a time, all ranges' calls in parallel (their source
    /// and destination nodes differ, so they do not slow each other down
    /// beyond sharing the machine).
    async fn move_ranges(
        &self,
        l: &Leadership,
        name: &ClusterName,
        s: &mut Stored,
        mut active: Vec<(usize, Move)>,
    ) -> Result<(), Stop> {
        let task_id = s.task.id.clone();
        let mut rate = Rate::default();
        let mut last_save = Instant::now();
        while !active.is_empty() {
            // Operator changes (pause, cancel, rate) are read between batches.
            if let Some(fresh) = self.tasks.get(&s.task.cluster, &s.task.id).await? {
                if fresh.revision != s.revision {
                    s.task.rate = fresh.task.rate;
                    if matches!(
                        state(&fresh.task),
                        MigrationState::Paused | MigrationState::Cancelling
                    ) {
                        s.task.state = fresh.task.state;
                    }
                    s.revision = fresh.revision;
                }
            }
            // Checked on the task's own state: a pause or cancel may also
            // have come in through a save (which takes the operator's
            // state), after which the record read above looks unchanged.
            match state(&s.task) {
                MigrationState::Paused => {
                    s.task.keys_per_second = 0.0;
                    s.task.bytes_per_second = 0.0;
                    self.save(l, s).await?;
                    return Err(Stop::Idle);
                }
                MigrationState::Cancelling if !s.task.ranges.iter().any(|r| r.reverse) => {
                    // Cancelled mid-move: the caller turns the moves around
                    // rather than finish them (one may never finish: its
                    // destination's replica never confirming a copy).
                    self.save(l, s).await?;
                    return Ok(());
                }
                _ => {}
            }
            let (c, proxies) = self.cluster(name).await?;
            let limits = s.task.rate.unwrap_or_default();
            // A rate limit is shared by the ranges moving together.
            let share = active.len() as u64;
            let mut max_keys = u64::from(self.batch_keys);
            if limits.keys_per_second > 0 {
                max_keys =
                    max_keys.min((limits.keys_per_second / BATCHES_PER_SECOND / share).max(1));
            }
            let max_bytes = if limits.bytes_per_second > 0 {
                (limits.bytes_per_second / BATCHES_PER_SECOND / share).max(1)
            } else {
                64 << 20
            };
            let mut calls = Vec::with_capacity(active.len());
            for (i, mv) in &active {
                let src = c
                    .master_proxy(mv.from)
                    .ok_or_else(|| Stop::Retry(format!("shard {} no longer exists", mv.from)))?
                    .to_string();
                let admin = proxies
                    .get(&src)
                    .map(|p| p.spec.admin_address.to_string())
                    .ok_or_else(|| Stop::Retry(format!("proxy {src} is not registered")))?;
                let r = &mut s.task.ranges[*i];
                if r.cursor_proxy_id != src {
                    // A new source node (failover): its own pass, and the
                    // old one's result proves nothing about it.
                    if !r.cursor_proxy_id.is_empty() {
                        r.pass_keys_moved = r.pass_keys_moved.max(1);
                    }
                    r.cursor = 0;
                    r.cursor_proxy_id = src.clone();
                }
                let mut req = tonic::Request::new(v1::MigrateBatchRequest {
                    cluster: name.to_string(),
                    task_id: task_id.clone(),
                    epoch: c.epoch,
                    range: Some(mv.range.into()),
                    cursor: r.cursor,
                    max_keys: max_keys as u32,
                    max_bytes,
                });
                req.set_timeout(Duration::from_secs(60));
                let client = self.proxies.client(&admin)?;
                calls.push(async move {
                    let mut client = client;
                    let reply = client.migrate_batch(req).await;
                    (src, reply)
                });
            }
            let started = Instant::now();
            let replies = futures::future::join_all(calls).await;
            metrics::histogram!("redmesh_migrator_batch_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            let (mut keys, mut bytes) = (0, 0);
            let mut failure = None;
            let mut pass_end = false;
            let mut finished = Vec::new();
            for ((i, mv), (src, reply)) in active.iter().zip(replies) {
                let reply = match reply {
                    Ok(r) => r.into_inner(),
                    Err(e) => {
                        // FAILED_PRECONDITION: the proxy's view lags or
                        // moved on; anything else: it failed. Either way the
                        // cluster is read again and the batch retried.
                        failure.get_or_insert_with(|| {
                            format!("MigrateBatch on {src}: {}", e.message())
                        });
                        continue;
                    }
                };
                keys += reply.keys_moved;
                bytes += reply.bytes_moved;
                let r = &mut s.task.ranges[*i];
                r.keys_moved += reply.keys_moved;
                r.bytes_moved += reply.bytes_moved;
                r.pass_keys_moved += reply.keys_moved;
                r.cursor = reply.next_cursor;
                if reply.next_cursor == 0 {
                    pass_end = true;
                    if r.pass_keys_moved == 0 {
                        finished.push((*i, mv.clone()));
                    } else {
                        r.pass += 1;
                        r.pass_keys_moved = 0;
                    }
                }
            }
            metrics::counter!("redmesh_migrator_keys_moved_total").increment(keys);
            metrics::counter!("redmesh_migrator_bytes_moved_total").increment(bytes);
            let (kps, bps) = rate.add(keys, bytes);
            s.task.keys_per_second = kps;
            s.task.bytes_per_second = bps;
            let progress = crate::tasks::progress(&s.task);
            metrics::gauge!("redmesh_migrator_eta_seconds", "cluster" => name.to_string())
                .set(progress.eta_seconds.max(0.0));
            for (i, mv) in finished {
                // A complete pass found nothing: no key of the range is left
                // at the source, so clients may now be sent to the
                // destination for good.
                s.task.error.clear();
                self.save(l, s).await?;
                let e3 = self
                    .change_cluster(l, name, |c| {
                        if stage_of(c, &mv, &task_id).is_none() {
                            return Ok(None);
                        }
                        c.set_move_stage(mv.range, &task_id, MigrationStage::Commit)
                            .map(Some)
                    })
                    .await?;
                s.task.ranges[i].phase = MigrationPhase::Commit as i32;
                self.save(l, s).await?;
                last_save = Instant::now();
                active.retain(|(j, _)| *j != i);
                tracing::debug!(epoch = e3, range = %mv.range, "commit stage written");
            }
            if let Some(why) = failure {
                // Keep what the other ranges did.
                self.save(l, s).await?;
                return Err(Stop::Retry(why));
            }
            if pass_end || last_save.elapsed() >= SAVE_EVERY {
                s.task.error.clear();
                self.save(l, s).await?;
                last_save = Instant::now();
            }
            // Throttle: the batches may not finish sooner than their share
            // of the rate allows.
            let mut due = Duration::ZERO;
            if limits.keys_per_second > 0 {
                due = due.max(Duration::from_secs_f64(
                    keys as f64 / limits.keys_per_second as f64,
                ));
            }
            if limits.bytes_per_second > 0 {
                due = due.max(Duration::from_secs_f64(
                    bytes as f64 / limits.bytes_per_second as f64,
                ));
            }
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        Ok(())
    }

    /// On cancel: drop queued moves, abandon a move still preparing, finish
    /// a move already committing, turn a move under way around (its keys
    /// that moved go back, see [`Cluster::turn_back_move`]), then queue the
    /// moves back of everything moved.
    async fn plan_cancel(
        &self,
        l: &Leadership,
        name: &ClusterName,
        s: &mut Stored,
    ) -> Result<(), Stop> {
        if s.task.ranges.iter().any(|r| r.reverse) {
            return Ok(());
        }
        let task_id = s.task.id.clone();
        let mut keep = Vec::new();
        for r in std::mem::take(&mut s.task.ranges) {
            match phase(&r) {
                MigrationPhase::Unspecified | MigrationPhase::Queued => {}
                MigrationPhase::Prepare => {
                    if let Some(mv) = r.r#move.as_ref().and_then(|m| move_model(m).ok()) {
                        self.change_cluster(l, name, |c| {
                            Ok(Some(c.end_move(mv.range, &task_id, false)))
                        })
                        .await?;
                    }
                }
                _ => keep.push(r),
            }
        }
        s.task.ranges = keep;
        // Commits first: their keys are all at the destination already.
        while let Some(i) = s
            .task
            .ranges
            .iter()
            .position(|r| phase(r) == MigrationPhase::Commit)
        {
            self.step(l, name, s, i).await?;
        }
        // Moves under way turn around where they stand.
        let (moving, done): (Vec<_>, Vec<_>) = std::mem::take(&mut s.task.ranges)
            .into_iter()
            .partition(|r| phase(r) == MigrationPhase::Move);
        for r in &moving {
            let mv = range_move(r)?;
            self.change_cluster(l, name, |c| {
                if stage_of(c, &mv, &task_id).is_none() {
                    return Ok(None);
                }
                c.turn_back_move(&mv, &task_id).map(Some)
            })
            .await?;
        }
        // Every range is done or turned around now: queue the ways back of
        // the done ones, last first; the turned ones are moving back already.
        let (c, _) = self.cluster(name).await?;
        let back: Vec<v1::RangeProgress> = done
            .iter()
            .rev()
            .filter_map(|r| way_back(&c, r, MigrationPhase::Queued))
            .chain(
                moving
                    .iter()
                    .filter_map(|r| way_back(&c, r, MigrationPhase::Move)),
            )
            .collect();
        s.task.ranges = done;
        // Even with nothing to move back, mark the plan as made.
        if back.is_empty() {
            s.task.ranges.push(v1::RangeProgress {
                phase: MigrationPhase::Done as i32,
                reverse: true,
                ..v1::RangeProgress::default()
            });
        }
        s.task.ranges.extend(back);
        self.save(l, s).await
    }

    /// All ranges done: return the leaving chunks (or, after a cancel, the
    /// added ones) to the pool and end the task, in one transaction.
    async fn finish(&self, l: &Leadership, name: &ClusterName, s: &mut Stored) -> Result<(), Stop> {
        let cancelled = state(&s.task) == MigrationState::Cancelling;
        let leaving: Vec<Chunk> = if cancelled {
            &s.task.added_chunks
        } else {
            &s.task.removed_chunks
        }
        .iter()
        .map(chunk_model)
        .collect::<Result<_, _>>()
        .map_err(|e| Stop::Retry(e.to_string()))?;
        // The shards the task emptied: the sources of a scale-in, the
        // destinations of a cancelled scale-out.
        let emptied: Vec<u32> = s
            .task
            .plan
            .iter()
            .flat_map(|p| p.moves.iter())
            .map(|m| {
                if cancelled {
                    m.to_shard_id
                } else {
                    m.from_shard_id
                }
            })
            .collect();
        let mut done = s.task.clone();
        done.state = if cancelled {
            MigrationState::Cancelled
        } else {
            MigrationState::Completed
        } as i32;
        done.updated_at = now();
        done.error.clear();
        done.keys_per_second = 0.0;
        done.bytes_per_second = 0.0;
        let key = self.tasks.key(&done.cluster, &done.id);
        let value = bytes::Bytes::from(prost::Message::encode_to_vec(&done));
        let task_id = s.task.id.clone();
        self.repo
            .update_guarded(
                vec![
                    l.guard(),
                    redmesh_store::Compare::mod_revision(key.clone(), s.revision),
                ],
                |snap, _| {
                    let c = snap.cluster(name)?;
                    let present = c.leaving_chunks(&leaving, &emptied);
                    let mut next = c.without_chunks(&present)?;
                    if next.task.id == task_id {
                        next.task = ClusterTask::default();
                    }
                    let freed = present
                        .iter()
                        .flat_map(|ch| ch.proxies.iter())
                        .filter_map(|id| snap.proxies.get(id))
                        .filter(|p| p.cluster.as_ref() == Some(name))
                        .map(Proxy::freed)
                        .collect();
                    Ok((
                        Change {
                            put_proxies: freed,
                            put_clusters: vec![next],
                            put_raw: vec![(key.clone(), value.clone())],
                            ..Change::default()
                        },
                        (),
                    ))
                },
            )
            .await
            .map_err(|e| match e {
                // The task record changed (an operator call): re-read.
                MetaError::GuardFailed(k) if k == key => Stop::Retry("task changed".into()),
                other => Stop::from(other),
            })?;
        tracing::info!(task = %s.task.id, cluster = %name, cancelled, "migration task finished");
        metrics::gauge!("redmesh_migrator_eta_seconds", "cluster" => name.to_string()).set(0.0);
        s.task = done;
        Err(Stop::Idle)
    }
}

/// The move of a range of the task record.
fn range_move(r: &v1::RangeProgress) -> Result<Move, Stop> {
    let m = r
        .r#move
        .as_ref()
        .ok_or_else(|| Stop::Retry("range without a move".into()))?;
    move_model(m).map_err(|e| Stop::Retry(e.to_string()))
}

/// What the runner does next with a task.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Every range is done.
    Finish,
    /// Advance this range by one step.
    Step(usize),
    /// Move the keys of these ranges together.
    Move(Vec<usize>),
}

/// Picks the next step. Ranges whose shards differ from those of every
/// range under way are prepared too, so their keys move in parallel (a
/// scale-out from 2 shards to 4 moves from both old shards at once); a
/// range sharing a source or destination with one under way waits for it.
fn next_step(ranges: &[v1::RangeProgress]) -> Next {
    let shards = |r: &v1::RangeProgress| -> Vec<u32> {
        r.r#move
            .as_ref()
            .and_then(|m| move_model(m).ok())
            .map_or_else(Vec::new, |mv| vec![mv.from, mv.to])
    };
    let waiting = |r: &v1::RangeProgress| {
        matches!(
            phase(r),
            MigrationPhase::Queued | MigrationPhase::Unspecified
        )
    };
    // A range caught half-prepared (by a crash) is finished first.
    if let Some(i) = ranges
        .iter()
        .position(|r| phase(r) == MigrationPhase::Prepare)
    {
        return Next::Step(i);
    }
    let busy: Vec<u32> = ranges
        .iter()
        .filter(|r| phase(r) != MigrationPhase::Done && !waiting(r))
        .flat_map(shards)
        .collect();
    if let Some(i) = ranges
        .iter()
        .position(|r| waiting(r) && shards(r).iter().all(|s| !busy.contains(s)))
    {
        return Next::Step(i);
    }
    let moving: Vec<usize> = (0..ranges.len())
        .filter(|&i| phase(&ranges[i]) == MigrationPhase::Move)
        .collect();
    if !moving.is_empty() {
        return Next::Move(moving);
    }
    match ranges.iter().position(|r| phase(r) != MigrationPhase::Done) {
        Some(i) => Next::Step(i),
        None => Next::Finish,
    }
}

/// The move of `r`'s range back to where it came from, at `phase`, with
/// what `r` moved as its estimate.
fn way_back(
    c: &Cluster,
    r: &v1::RangeProgress,
    phase: MigrationPhase,
) -> Option<v1::RangeProgress> {
    let mv = move_model(r.r#move.as_ref()?).ok()?;
    let back = Move {
        range: mv.range,
        from: mv.to,
        to: mv.from,
    };
    Some(v1::RangeProgress {
        r#move: Some(crate::plan::move_v1(
            c,
            &back,
            (r.keys_moved, r.bytes_moved),
        )),
        phase: phase as i32,
        reverse: true,
        ..v1::RangeProgress::default()
    })
}

/// Stage of `task`'s move of `mv.range`, if it is still marked.
fn stage_of(c: &Cluster, mv: &Move, task: &str) -> Option<MigrationStage> {
    c.slots
        .iter()
        .find(|a| a.range.start() <= mv.range.start() && mv.range.start() <= a.range.end())
        .and_then(|a| a.migration.as_ref())
        .filter(|m| m.task_id == task)
        .map(|m| m.stage)
}

/// Whether the range already belongs to the destination (a repeated step
/// after the move ended).
fn moved_already(c: &Cluster, mv: &Move, task: &str) -> bool {
    stage_of(c, mv, task).is_none()
        && c.slots
            .iter()
            .filter(|a| a.range.start() <= mv.range.end() && mv.range.start() <= a.range.end())
            .all(|a| a.shard == mv.to && a.migration.is_none())
}

/// Exports how many tasks are in each state.
pub fn export_task_states(all: &[Stored]) {
    let mut counts: HashMap<i32, u64> = HashMap::new();
    for s in all {
        *counts.entry(s.task.state).or_default() += 1;
    }
    for st in (1..).map_while(|k| MigrationState::try_from(k).ok()) {
        metrics::gauge!("redmesh_migrator_tasks", "state" => crate::tasks::state_name(st as i32))
            .set(counts.get(&(st as i32)).copied().unwrap_or(0) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(from: u32, to: u32, start: u16, p: MigrationPhase) -> v1::RangeProgress {
        v1::RangeProgress {
            r#move: Some(v1::PlannedMove {
                range: Some(v1::SlotRange {
                    start: u32::from(start),
                    end: u32::from(start) + 99,
                }),
                from_shard_id: from,
                to_shard_id: to,
                ..v1::PlannedMove::default()
            }),
            phase: p as i32,
            ..v1::RangeProgress::default()
        }
    }

    #[test]
    fn disjoint_ranges_are_prepared_then_moved_together() {
        use MigrationPhase::*;
        // Scale-out 2 -> 4 shards: 0 -> 2 and 1 -> 3 share nothing.
        let mut r = vec![range(0, 2, 0, Queued), range(1, 3, 200, Queued)];
        assert_eq!(next_step(&r), Next::Step(0));
        r[0].phase = Move as i32;
        assert_eq!(next_step(&r), Next::Step(1));
        r[1].phase = Prepare as i32;
        assert_eq!(next_step(&r), Next::Step(1), "a half-prepared range first");
        r[1].phase = Move as i32;
        assert_eq!(next_step(&r), Next::Move(vec![0, 1]));
        r[0].phase = Commit as i32;
        r[1].phase = Commit as i32;
        assert_eq!(next_step(&r), Next::Step(0));
        r[0].phase = Done as i32;
        r[1].phase = Done as i32;
        assert_eq!(next_step(&r), Next::Finish);
    }

    #[test]
    fn a_range_sharing_a_shard_waits_for_the_one_under_way() {
        use MigrationPhase::*;
        // Two moves out of shard 0 (a scale-out to many shards).
        let mut r = vec![range(0, 2, 0, Move), range(0, 3, 200, Queued)];
        assert_eq!(next_step(&r), Next::Move(vec![0]));
        r[0].phase = Commit as i32;
        assert_eq!(next_step(&r), Next::Step(0));
        r[0].phase = Done as i32;
        assert_eq!(next_step(&r), Next::Step(1));
    }
}
