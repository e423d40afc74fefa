//! What the checker knows: one probing task per proxy of the pool (free or
//! allocated), the verdict on each of its four targets, and the publication
//! of verdict changes to etcd and to `WatchHealth` subscribers.
//!
//! A target turns DOWN after `failures` consecutive failed probes,
//! NOT_SERVING after as many answers that it cannot serve, and UP on the
//! first answer that it can. Only changes are written to etcd (one record per
//! proxy, under the checker's lease), so a healthy pool costs no writes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use redmesh_api::{convert, v1};
use redmesh_model::{Proxy, ProxyId, ProxySpec, ProxyState};
use redmesh_runtime::backoff::reconnect_delays;
use redmesh_store::{meta::decode_proxy, Keys, LeaseKeeper, MetaStore, StoreError};
use tokio::sync::{broadcast, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::probe::{Answer, Probe};

/// Probe timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Time between probes of one target.
    pub interval: Duration,
    /// Deadline of one probe.
    pub timeout: Duration,
    /// Consecutive failures that make a target DOWN.
    pub failures: u32,
}

/// Verdict on one target.
#[derive(Debug, Clone)]
struct TargetState {
    kind: v1::TargetKind,
    node_index: u32,
    address: String,
    status: v1::HealthStatus,
    consecutive_failures: u32,
    /// Consecutive answers that the target cannot serve.
    consecutive_not_serving: u32,
    last_rtt_us: u64,
    last_error: String,
    since: SystemTime,
}

impl TargetState {
    fn new(kind: v1::TargetKind, node_index: u32, address: &str) -> Self {
        Self {
            kind,
            node_index,
            address: address.to_owned(),
            status: v1::HealthStatus::Unspecified,
            consecutive_failures: 0,
            consecutive_not_serving: 0,
            last_rtt_us: 0,
            last_error: String::new(),
            since: SystemTime::now(),
        }
    }

    /// Records a probe result; returns whether the verdict changed.
    fn record(&mut self, result: Result<Answer, String>, failures: u32) -> bool {
        let before = self.status;
        match result {
            Ok(answer) => {
                self.consecutive_failures = 0;
                self.last_rtt_us = answer.rtt.as_micros() as u64;
                if answer.serving {
                    self.consecutive_not_serving = 0;
                    self.status = v1::HealthStatus::Up;
                } else {
                    self.consecutive_not_serving = self.consecutive_not_serving.saturating_add(1);
                    self.last_error = "answers that it cannot serve (health NOT_SERVING)".into();
                    if self.consecutive_not_serving >= failures {
                        self.status = v1::HealthStatus::NotServing;
                    }
                }
            }
            Err(e) => {
                self.consecutive_not_serving = 0;
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.last_error = e;
                if self.consecutive_failures >= failures {
                    self.status = v1::HealthStatus::Down;
                }
            }
        }
        if self.status != before {
            self.since = SystemTime::now();
            true
        } else {
            false
        }
    }

    fn to_proto(&self, proxy: &ProxyId) -> v1::TargetHealth {
        v1::TargetHealth {
            proxy_id: proxy.to_string(),
            kind: self.kind as i32,
            node_index: self.node_index,
            address: self.address.clone(),
            status: self.status as i32,
            consecutive_failures: self.consecutive_failures,
            last_rtt_us: self.last_rtt_us,
            last_error: self.last_error.clone(),
            since: Some(convert::timestamp(self.since)),
        }
    }
}

struct Watched {
    spec: ProxySpec,
    targets: Vec<TargetState>,
    task: JoinHandle<()>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The checker's state, shared by probing tasks, the publisher and gRPC.
pub struct Monitor {
    /// This checker's identity.
    pub checker_id: String,
    timing: Timing,
    proxies: Mutex<BTreeMap<ProxyId, Watched>>,
    /// Proxies whose record must be (re)written or deleted.
    dirty: Mutex<BTreeSet<ProxyId>>,
    wake_publisher: Notify,
    changes: broadcast::Sender<v1::TargetHealth>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("checker_id", &self.checker_id)
            .finish_non_exhaustive()
    }
}

impl Monitor {
    /// A monitor watching nothing yet.
    pub fn new(checker_id: String, timing: Timing) -> Arc<Self> {
        Arc::new(Self {
            checker_id,
            timing,
            proxies: Mutex::new(BTreeMap::new()),
            dirty: Mutex::new(BTreeSet::new()),
            wake_publisher: Notify::new(),
            changes: broadcast::channel(1024).0,
        })
    }

    /// Subscribes to verdict changes.
    pub fn subscribe(&self) -> broadcast::Receiver<v1::TargetHealth> {
        self.changes.subscribe()
    }

    /// Current verdicts, sorted by proxy and target.
    pub fn report(&self, only: Option<&ProxyId>) -> Vec<v1::TargetHealth> {
        let proxies = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        proxies
            .iter()
            .filter(|(id, _)| only.is_none_or(|o| o == *id))
            .flat_map(|(id, w)| w.targets.iter().map(move |t| t.to_proto(id)))
            .collect()
    }

    /// The record this checker publishes for `proxy`, if it watches it.
    fn record(&self, proxy: &ProxyId) -> Option<v1::ProxyHealth> {
        let proxies = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        proxies.get(proxy).map(|w| v1::ProxyHealth {
            checker_id: self.checker_id.clone(),
            proxy_id: proxy.to_string(),
            targets: w.targets.iter().map(|t| t.to_proto(proxy)).collect(),
            updated_at: Some(convert::timestamp(SystemTime::now())),
        })
    }

    fn mark_dirty(&self, proxy: ProxyId) {
        self.dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(proxy);
        self.wake_publisher.notify_one();
    }

    /// Makes the probed set match the pool: every free or allocated proxy,
    /// restarted when its addresses change.
    pub fn reconcile(self: &Arc<Self>, pool: &[Proxy]) {
        let wanted: BTreeMap<&ProxyId, &ProxySpec> = pool
            .iter()
            .filter(|p| p.state != ProxyState::Failed)
            .map(|p| (p.id(), &p.spec))
            .collect();
        let mut proxies = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<ProxyId> = proxies
            .iter()
            .filter(|(id, w)| wanted.get(id).is_none_or(|spec| **spec != w.spec))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            proxies.remove(&id);
            tracing::info!(proxy = %id, "no longer probing");
            metrics::gauge!("redmesh_health_checker_proxies").decrement(1.0);
            self.mark_dirty(id);
        }
        for (id, spec) in wanted {
            if proxies.contains_key(id) {
                continue;
            }
            let targets = vec![
                TargetState::new(v1::TargetKind::ProxyResp, 0, spec.resp_address.as_str()),
                TargetState::new(v1::TargetKind::ProxyAdmin, 0, spec.admin_address.as_str()),
                TargetState::new(v1::TargetKind::RedisNode, 0, spec.redis_nodes[0].as_str()),
                TargetState::new(v1::TargetKind::RedisNode, 1, spec.redis_nodes[1].as_str()),
            ];
            let task = tokio::spawn(probe_loop(self.clone(), id.clone(), spec.clone()));
            tracing::info!(proxy = %id, "probing");
            metrics::gauge!("redmesh_health_checker_proxies").increment(1.0);
            proxies.insert(
                id.clone(),
                Watched {
                    spec: spec.clone(),
                    targets,
                    task,
                },
            );
        }
    }

    /// Applies one round of probe results of `proxy`.
    fn apply(&self, proxy: &ProxyId, spec: &ProxySpec, results: Vec<Result<Answer, String>>) {
        let mut changed = Vec::new();
        {
            let mut proxies = self.proxies.lock().unwrap_or_else(|e| e.into_inner());
            // The proxy may have been removed or re-registered meanwhile.
            let Some(w) = proxies.get_mut(proxy).filter(|w| &w.spec == spec) else {
                return;
            };
            for (t, r) in w.targets.iter_mut().zip(results) {
                let kind = t.kind.as_str_name();
                let result = match &r {
                    Ok(a) if a.serving => "ok",
                    Ok(_) => "not_serving",
                    Err(_) => "error",
                };
                metrics::counter!("redmesh_health_checker_probes_total", "target" => kind, "result" => result).increment(1);
                if t.record(r, self.timing.failures) {
                    metrics::counter!("redmesh_health_checker_verdicts_total", "target" => kind, "status" => t.status.as_str_name()).increment(1);
                    changed.push(t.to_proto(proxy));
                }
            }
        }
        if changed.is_empty() {
            return;
        }
        for t in changed {
            tracing::info!(proxy = %proxy, target = t.kind().as_str_name(), node = t.node_index,
                address = %t.address, status = t.status().as_str_name(), error = %t.last_error, "verdict changed");
            let _ = self.changes.send(t);
        }
        self.mark_dirty(proxy.clone());
    }
}

/// Probes the four targets of one proxy every interval, concurrently.
async fn probe_loop(monitor: Arc<Monitor>, proxy: ProxyId, spec: ProxySpec) {
    let timing = monitor.timing;
    let mut probes = [
        Probe::resp(spec.resp_address.as_str()),
        Probe::grpc(spec.admin_address.as_str()),
        Probe::resp(spec.redis_nodes[0].as_str()),
        Probe::resp(spec.redis_nodes[1].as_str()),
    ];
    let mut tick = tokio::time::interval(timing.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let [a, b, c, d] = &mut probes;
        let (ra, rb, rc, rd) = tokio::join!(
            a.check(timing.timeout),
            b.check(timing.timeout),
            c.check(timing.timeout),
            d.check(timing.timeout)
        );
        monitor.apply(&proxy, &spec, vec![ra, rb, rc, rd]);
    }
}

/// Follows the pool in etcd and keeps the probed set in line with it.
pub async fn follow_pool(
    monitor: Arc<Monitor>,
    store: Arc<dyn MetaStore>,
    keys: Keys,
    shutdown: CancellationToken,
) {
    let mut changes = redmesh_store::changes(store.clone(), keys.proxies());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
        match list_pool(&*store, &keys).await {
            Ok(pool) => monitor.reconcile(&pool),
            Err(e) => {
                // The next change notification (at the latest when the watch
                // is re-established) triggers another attempt.
                tracing::warn!(error = %e, "cannot read the proxy pool; probing the last known set");
            }
        }
    }
}

async fn list_pool(store: &dyn MetaStore, keys: &Keys) -> Result<Vec<Proxy>, String> {
    let listing = store
        .list(&keys.proxies())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for kv in &listing.kvs {
        match decode_proxy(&kv.key, &kv.value) {
            Ok(p) => out.push(p),
            Err(e) => {
                tracing::error!(key = %kv.key, error = %e, "skipping an unreadable proxy record")
            }
        }
    }
    Ok(out)
}

/// Writes verdict changes to etcd under the checker's lease, plus the
/// checker's presence record. When the lease is lost (etcd unreachable for a
/// whole TTL), it takes a new one and rewrites everything.
pub async fn publish(
    monitor: Arc<Monitor>,
    store: Arc<dyn MetaStore>,
    keys: Keys,
    presence: v1::CheckerRecord,
    lease_ttl: Duration,
    shutdown: CancellationToken,
) {
    let mut delays = reconnect_delays(Duration::from_millis(100), Duration::from_secs(2));
    while !shutdown.is_cancelled() {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = publish_under_one_lease(&monitor, &store, &keys, &presence, lease_ttl) => r,
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "publishing verdicts failed; retrying with a new lease");
        }
        let pause = delays.next().unwrap_or(Duration::from_secs(2));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

async fn publish_under_one_lease(
    monitor: &Monitor,
    store: &Arc<dyn MetaStore>,
    keys: &Keys,
    presence: &v1::CheckerRecord,
    lease_ttl: Duration,
) -> Result<(), StoreError> {
    let lease = LeaseKeeper::start(store.clone(), lease_ttl).await?;
    // Verdicts first, presence last: a coordinator that sees this checker
    // also sees its current votes.
    {
        let all: Vec<ProxyId> = monitor
            .proxies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut dirty = monitor.dirty.lock().unwrap_or_else(|e| e.into_inner());
        dirty.extend(all);
    }
    flush_dirty(monitor, store, keys, lease.id()).await?;
    store
        .put(
            &keys.checker(&monitor.checker_id),
            Bytes::from(convert::encode(presence)),
            Some(lease.id()),
        )
        .await?;
    tracing::info!(lease = format!("{:x}", lease.id()), "publishing verdicts");
    loop {
        tokio::select! {
            _ = lease.lost() => return Err(StoreError::LeaseNotFound(lease.id())),
            _ = monitor.wake_publisher.notified() => {}
        }
        flush_dirty(monitor, store, keys, lease.id()).await?;
    }
}

async fn flush_dirty(
    monitor: &Monitor,
    store: &Arc<dyn MetaStore>,
    keys: &Keys,
    lease: i64,
) -> Result<(), StoreError> {
    let batch: Vec<ProxyId> =
        std::mem::take(&mut *monitor.dirty.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect();
    for (i, proxy) in batch.iter().enumerate() {
        let key = keys.health_verdict(&monitor.checker_id, proxy.as_str());
        let result = match monitor.record(proxy) {
            Some(rec) => store
                .put(&key, Bytes::from(convert::encode(&rec)), Some(lease))
                .await
                .map(|_| ()),
            None => store.delete(&key).await.map(|_| ()),
        };
        if let Err(e) = result {
            // Keep what was not written for the next attempt.
            monitor
                .dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(batch[i..].iter().cloned());
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(serving: bool) -> Result<Answer, String> {
        Ok(Answer {
            rtt: Duration::from_micros(50),
            serving,
        })
    }

    #[test]
    fn a_target_is_not_serving_after_as_many_such_answers_as_failures_make_it_down() {
        let mut t = TargetState::new(v1::TargetKind::ProxyAdmin, 0, "127.0.0.1:1");
        assert!(t.record(answer(true), 3));
        assert_eq!(t.status, v1::HealthStatus::Up);
        assert!(!t.record(answer(false), 3));
        assert!(!t.record(answer(false), 3));
        assert_eq!(t.status, v1::HealthStatus::Up);
        assert!(t.record(answer(false), 3));
        assert_eq!(t.status, v1::HealthStatus::NotServing);
        assert!(t.last_error.contains("NOT_SERVING"), "{}", t.last_error);
        // Silence then counts as failures from zero.
        assert!(!t.record(Err("no answer".into()), 3));
        assert!(!t.record(Err("no answer".into()), 3));
        assert!(t.record(Err("no answer".into()), 3));
        assert_eq!(t.status, v1::HealthStatus::Down);
        // One serving answer brings it back.
        assert!(t.record(answer(true), 3));
        assert_eq!(t.status, v1::HealthStatus::Up);
    }
}
