//! The leader's work: whenever anything changes in etcd, re-read health
//! votes and metadata and act on them — fail over proxies a quorum of
//! checkers declares down, then fill the holes they leave from the pool.
//!
//! Every decision is derived from stored state, not remembered: a failed
//! proxy is a hole in its chunk until a replacement commits, so a new
//! leader after a crash between the two steps simply sees the hole and
//! finishes the job. Every write is guarded by the leadership, so a deposed
//! leader cannot write anything.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redmesh_api::v1::CoordinatorEventKind as Kind;
use redmesh_model::{
    failover::{fail_proxy, holes, replace_proxy},
    Cluster, ClusterName, ClusterTask, ClusterTaskKind, ModelError, NodeRef, Proxy, ProxyId,
    ProxyState, ShardId,
};
use redmesh_store::{Change, Keys, Leadership, MetaError, MetaRepo, MetaStore, Snapshot};
use tokio_util::sync::CancellationToken;

use crate::events::{event, EventLog};
use crate::health::Votes;

/// What the coordinator needs to act.
#[derive(Clone)]
pub struct Actor {
    /// Typed metadata.
    pub repo: MetaRepo,
    /// Raw store (votes).
    pub store: Arc<dyn MetaStore>,
    /// Key layout.
    pub keys: Keys,
    /// Decision history.
    pub events: EventLog,
    /// Minimum agreeing checkers.
    pub min_votes: usize,
    /// How long a failure must have been seen before a promotion (the
    /// proxies' fencing time; see `Config::fence_wait`).
    pub fence_wait: Duration,
    /// Test hook: exit right after committing a promotion, before replacing.
    pub exit_after_promotion: bool,
}

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor").finish_non_exhaustive()
    }
}

/// Memory of the current term: events already announced, and when each
/// failure was first seen (a new leader starts counting afresh, which only
/// makes it wait longer before it promotes).
#[derive(Debug, Default)]
struct Incidents {
    /// When each failing proxy was first seen failing.
    detected: HashMap<ProxyId, Instant>,
    /// Events already announced for a condition that still holds.
    announced: HashSet<String>,
}

impl Incidents {
    /// True the first time `key` is announced while its condition holds.
    fn first(&mut self, key: String) -> bool {
        self.announced.insert(key)
    }

    fn clear(&mut self, prefix: &str) {
        self.announced.retain(|k| !k.starts_with(prefix));
    }
}

/// Result of a failover commit.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Epoch of the commit.
    pub epoch: u64,
    /// Shards whose master moved.
    pub promoted: Vec<(ShardId, NodeRef)>,
}

fn allocated_to(p: Option<&Proxy>, cluster: &ClusterName) -> bool {
    p.is_some_and(|p| p.state == ProxyState::Allocated && p.cluster.as_ref() == Some(cluster))
}

impl Actor {
    /// Acts on changes until `stop` (leadership lost or shutdown).
    pub async fn supervise(&self, leadership: &Leadership, stop: CancellationToken) {
        let mut changes = redmesh_store::changes(self.store.clone(), self.keys.root());
        let mut incidents = Incidents::default();
        let mut retry_in: Option<Duration> = None;
        loop {
            let wait = async {
                match retry_in {
                    Some(d) => {
                        let _ = tokio::time::timeout(d, changes.changed()).await;
                    }
                    None => {
                        let _ = changes.changed().await;
                    }
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = wait => {}
            }
            match self.evaluate(leadership, &mut incidents).await {
                Ok(wake) => retry_in = wake,
                Err(MetaError::GuardFailed(_)) => {
                    tracing::warn!("leadership lost while acting; stopping");
                    return;
                }
                Err(e) => {
                    // Nothing may change in etcd to wake us; retry on a timer.
                    tracing::warn!(error = %e, "evaluation failed; retrying");
                    retry_in = Some(Duration::from_millis(500));
                }
            }
        }
    }

    /// Acts on the current state; returns when to look again if nothing
    /// changes (a failure waiting out the fencing time).
    async fn evaluate(
        &self,
        leadership: &Leadership,
        inc: &mut Incidents,
    ) -> Result<Option<Duration>, MetaError> {
        let mut wake: Option<Duration> = None;
        let snap = self.repo.snapshot().await?;
        let votes = Votes::read(&*self.store, &self.keys, self.min_votes).await?;
        metrics::gauge!("redmesh_coordinator_live_checkers").set(votes.live.len() as f64);
        let mut acted = false;
        let mut failing = HashSet::new();
        for cluster in snap.clusters.values() {
            for pid in cluster.proxy_ids() {
                if !allocated_to(snap.proxies.get(pid), &cluster.name) {
                    continue;
                }
                let Some(reason) = votes.failure(pid, cluster) else {
                    continue;
                };
                failing.insert(pid.clone());
                let detected = *inc.detected.entry(pid.clone()).or_insert_with(Instant::now);
                let tag = format!("{}/{pid}/", cluster.name);
                if inc.first(format!("{tag}detected")) {
                    self.events
                        .record(event(
                            Kind::FailureDetected,
                            cluster.name.as_str(),
                            pid.as_str(),
                            &reason,
                        ))
                        .await;
                }
                // The proxy may only be cut off from the control plane, not
                // from its clients: its shards move once it has surely
                // fenced itself, or writes it takes in between are lost.
                // It lost the broker no later than the checkers' first
                // failed probe, which came at least (failures − 1) probe
                // intervals before this leader saw the verdict.
                let waited = detected.elapsed();
                if waited < self.fence_wait {
                    let rest = self.fence_wait - waited;
                    wake = Some(wake.map_or(rest, |w| w.min(rest)));
                    continue;
                }
                match self
                    .fail_over(leadership, &cluster.name, pid, &votes, &reason)
                    .await
                {
                    Ok(done) => {
                        acted = true;
                        inc.clear(&tag);
                        if let Some(p) = snap.proxies.get(pid) {
                            tokio::spawn(crate::switchover::detach_replicas(
                                p.spec.redis_nodes.clone(),
                            ));
                        }
                        let elapsed = detected.elapsed();
                        metrics::histogram!("redmesh_coordinator_failover_duration_seconds")
                            .record(elapsed.as_secs_f64());
                        let detail = if done.promoted.is_empty() {
                            format!("{reason}; it held replicas only, masters untouched")
                        } else {
                            let moved: Vec<String> = done
                                .promoted
                                .iter()
                                .map(|(s, n)| {
                                    format!("shard {s} → {}/{}", n.proxy_id, n.node_index)
                                })
                                .collect();
                            format!("{reason}; promoted {}", moved.join(", "))
                        };
                        let mut ev = event(
                            Kind::MasterPromoted,
                            cluster.name.as_str(),
                            pid.as_str(),
                            detail,
                        );
                        ev.epoch = done.epoch;
                        ev.duration_ms = elapsed.as_millis() as u64;
                        self.events.record(ev).await;
                        if self.exit_after_promotion {
                            tracing::error!(
                                "test hook: exiting after the promotion, before the replacement"
                            );
                            std::process::exit(3);
                        }
                    }
                    Err(MetaError::Model(ModelError::FailedPrecondition(why))) => {
                        if inc.first(format!("{tag}stuck")) {
                            self.events
                                .record(event(
                                    Kind::FailureDetected,
                                    cluster.name.as_str(),
                                    pid.as_str(),
                                    why,
                                ))
                                .await;
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        inc.detected.retain(|p, _| failing.contains(p));
        let snap = if acted {
            self.repo.snapshot().await?
        } else {
            snap
        };
        self.fill_holes(leadership, &snap, &votes, inc).await?;
        let degraded = snap
            .clusters
            .values()
            .filter(|c| is_degraded(c, &snap, &votes))
            .count();
        metrics::gauge!("redmesh_coordinator_degraded_clusters").set(degraded as f64);
        metrics::gauge!("redmesh_coordinator_free_proxies").set(
            snap.proxies
                .values()
                .filter(|p| p.state == ProxyState::Free)
                .count() as f64,
        );
        Ok(wake)
    }

    /// Commits the failover of `pid`: replicas promoted, the proxy marked
    /// failed and left as a hole in its chunk.
    pub async fn fail_over(
        &self,
        leadership: &Leadership,
        name: &ClusterName,
        pid: &ProxyId,
        votes: &Votes,
        reason: &str,
    ) -> Result<Committed, MetaError> {
        self.repo
            .update_guarded(vec![leadership.guard()], |snap, epoch| {
                let cluster = snap.clusters.get(name).ok_or_else(|| {
                    ModelError::FailedPrecondition(format!("cluster {name} is gone"))
                })?;
                let proxy = snap
                    .proxies
                    .get(pid)
                    .filter(|p| allocated_to(Some(p), name))
                    .ok_or_else(|| {
                        ModelError::FailedPrecondition(format!(
                            "proxy {pid} no longer serves cluster {name}"
                        ))
                    })?;
                let out = fail_proxy(cluster, pid, |n| {
                    votes.usable(n) && allocated_to(snap.proxies.get(&n.proxy_id), name)
                })?;
                let mut next = out.cluster;
                // A running migration keeps its mark: it is what tells the
                // migrator the task still owns the cluster and refuses a
                // second scale meanwhile. (The failover is in the events.)
                if next.task.kind != ClusterTaskKind::Migrating {
                    next.task = ClusterTask {
                        kind: ClusterTaskKind::FailingOver,
                        id: format!("failover-{pid}-{epoch}"),
                        detail: format!(
                            "proxy {pid} failed ({reason}); replacing it from the pool"
                        ),
                    };
                }
                let failed = Proxy {
                    state: ProxyState::Failed,
                    cluster: None,
                    ..proxy.clone()
                };
                Ok((
                    Change {
                        put_proxies: vec![failed],
                        put_clusters: vec![next],
                        ..Change::default()
                    },
                    Committed {
                        epoch,
                        promoted: out.promoted,
                    },
                ))
            })
            .await
    }

    async fn fill_holes(
        &self,
        leadership: &Leadership,
        snap: &Snapshot,
        votes: &Votes,
        inc: &mut Incidents,
    ) -> Result<(), MetaError> {
        for cluster in snap.clusters.values() {
            for (hole, partner) in holes(cluster, |p| {
                allocated_to(snap.proxies.get(p), &cluster.name)
            }) {
                let tag = format!("{}/{hole}/", cluster.name);
                if !allocated_to(snap.proxies.get(&partner), &cluster.name) {
                    // Both proxies of the chunk are gone: nothing to pair with.
                    if inc.first(format!("{tag}orphan")) {
                        let ev = event(Kind::ReplacementUnavailable, cluster.name.as_str(), hole.as_str(),
                            format!("both proxies of the chunk of {hole} and {partner} are out; its slots are unavailable"));
                        self.events.record(ev).await;
                    }
                    continue;
                }
                let started = Instant::now();
                match self
                    .replace(leadership, &cluster.name, &hole, &partner, votes)
                    .await
                {
                    Ok((newcomer, epoch)) => {
                        inc.clear(&tag);
                        let mut ev = event(Kind::ProxyReplaced, cluster.name.as_str(), hole.as_str(),
                            format!("proxy {newcomer} replaces {hole}; its nodes replicate {partner}'s masters"));
                        ev.epoch = epoch;
                        ev.duration_ms = started.elapsed().as_millis() as u64;
                        self.events.record(ev).await;
                    }
                    Err(MetaError::Model(ModelError::FailedPrecondition(why))) => {
                        if inc.first(format!("{tag}unavailable")) {
                            self.mark_degraded(leadership, &cluster.name, &why).await?;
                            self.events
                                .record(event(
                                    Kind::ReplacementUnavailable,
                                    cluster.name.as_str(),
                                    hole.as_str(),
                                    why,
                                ))
                                .await;
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    async fn replace(
        &self,
        leadership: &Leadership,
        name: &ClusterName,
        hole: &ProxyId,
        partner: &ProxyId,
        votes: &Votes,
    ) -> Result<(ProxyId, u64), MetaError> {
        self.repo
            .update_guarded(vec![leadership.guard()], |snap, epoch| {
                let cluster = snap
                    .clusters
                    .get(name)
                    .ok_or_else(|| ModelError::FailedPrecondition(format!("cluster {name} is gone")))?;
                let partner_host = snap
                    .proxies
                    .get(partner)
                    .map(|p| p.spec.host.clone())
                    .ok_or_else(|| ModelError::FailedPrecondition(format!("partner {partner} is gone")))?;
                let newcomer = snap
                    .proxies
                    .values()
                    .filter(|p| p.state == ProxyState::Free && p.spec.host != partner_host)
                    .find(|p| votes.healthy(p))
                    .ok_or_else(|| {
                        ModelError::FailedPrecondition(format!(
                            "no free proxy that a quorum of checkers sees healthy on a host other than \
                             {partner_host} (where {partner} runs); cluster {name} runs without replicas \
                             for {partner}'s shards until one is registered"
                        ))
                    })?;
                let mut next = replace_proxy(cluster, hole, newcomer.id())?;
                let joined = Proxy {
                    state: ProxyState::Allocated,
                    cluster: Some(name.clone()),
                    ..newcomer.clone()
                };
                let remaining = holes(&next, |p| p == joined.id() || allocated_to(snap.proxies.get(p), name));
                if remaining.is_empty() && next.task.kind == ClusterTaskKind::FailingOver {
                    next.task = ClusterTask::default();
                }
                Ok((
                    Change {
                        put_proxies: vec![joined],
                        put_clusters: vec![next],
                        ..Change::default()
                    },
                    (newcomer.id().clone(), epoch),
                ))
            })
            .await
    }

    async fn mark_degraded(
        &self,
        leadership: &Leadership,
        name: &ClusterName,
        why: &str,
    ) -> Result<(), MetaError> {
        self.repo
            .update_guarded(vec![leadership.guard()], |snap, _| {
                let Some(cluster) = snap.clusters.get(name) else {
                    return Ok((Change::default(), ()));
                };
                let detail = format!("degraded: {why}");
                if cluster.task.detail == detail || cluster.task.kind == ClusterTaskKind::Migrating
                {
                    return Ok((Change::default(), ()));
                }
                let mut next = cluster.clone();
                next.task = ClusterTask {
                    kind: ClusterTaskKind::FailingOver,
                    id: cluster.task.id.clone(),
                    detail,
                };
                Ok((
                    Change {
                        put_clusters: vec![next],
                        ..Change::default()
                    },
                    (),
                ))
            })
            .await
    }
}

/// Whether `cluster` runs without full redundancy: a hole left by a failed
/// proxy, a shard without replica, or a member a quorum of checkers sees
/// down that could not be failed over (e.g. both proxies of a chunk).
pub fn is_degraded(cluster: &Cluster, snap: &Snapshot, votes: &Votes) -> bool {
    !holes(cluster, |p| {
        allocated_to(snap.proxies.get(p), &cluster.name)
    })
    .is_empty()
        || cluster.shards.iter().any(|s| s.replicas.is_empty())
        || cluster
            .proxy_ids()
            .any(|p| votes.failure(p, cluster).is_some())
}
