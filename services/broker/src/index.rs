//! The topology index: an in-memory copy of proxies and clusters fed by a
//! single etcd watch, fanned out as per-proxy views and cluster events.
//!
//! Each proxy's view lives in a `tokio::sync::watch` channel, which only
//! keeps the newest value: a slow subscriber skips intermediate views and
//! can never hold up the others or the watch. On start, on watch errors and
//! on compaction the index resyncs from a fresh snapshot. It never writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use redmesh_api::v1;
use redmesh_model::{Cluster, ClusterName, Epoch, Proxy, ProxyId, ProxyState, ProxyView};
use redmesh_runtime::{backoff::reconnect_delays, CancellationToken};
use redmesh_store::{
    meta::{decode_cluster, decode_epoch, decode_proxy},
    EventKind, KeyValue, Keys, MetaRepo, Revision, StoreError,
};
use tokio::sync::{broadcast, watch};

/// How often the index confirms etcd is reachable.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// Without a confirmation for this long, the index stops vouching for its
/// views (no keepalives), so proxies can tell a broker cut off from etcd.
const STALE_AFTER: Duration = Duration::from_millis(1500);

/// A view ready to send: the domain value (to detect changes) and its wire form.
#[derive(Debug)]
pub struct PublishedView {
    /// Domain view.
    pub view: ProxyView,
    /// Wire message.
    pub message: v1::ProxyView,
    /// When the broker computed it (for the push-delay metric).
    pub published_at: std::time::Instant,
}

/// A change of one cluster.
#[derive(Debug, Clone)]
pub enum ClusterEvent {
    /// Created or changed.
    Updated(Arc<Cluster>),
    /// Deleted.
    Deleted {
        /// Name.
        name: ClusterName,
        /// Uid of the deleted incarnation.
        uid: String,
    },
}

#[derive(Debug, Default)]
struct State {
    loaded: bool,
    revision: Revision,
    epoch: Epoch,
    proxies: BTreeMap<ProxyId, Proxy>,
    clusters: BTreeMap<ClusterName, Cluster>,
    /// Epoch at which a proxy's record disappeared (views never go back).
    tombstones: HashMap<ProxyId, Epoch>,
}

#[derive(Debug)]
struct Liveness {
    watching: bool,
    last_confirmed: Option<Instant>,
}

/// The index. Cheap to clone (shared).
#[derive(Clone)]
pub struct Index {
    inner: Arc<Inner>,
}

struct Inner {
    repo: MetaRepo,
    state: Mutex<State>,
    views: Mutex<HashMap<ProxyId, watch::Sender<Option<Arc<PublishedView>>>>>,
    clusters: broadcast::Sender<ClusterEvent>,
    loaded: watch::Sender<bool>,
    liveness: Mutex<Liveness>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections only assign whole values; a poisoned lock holds a
    // consistent value.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn view_of(&self, id: &ProxyId) -> ProxyView {
        let proxy = self.proxies.get(id).cloned();
        let cluster = proxy
            .as_ref()
            .filter(|p| p.state == ProxyState::Allocated)
            .and_then(|p| p.cluster.as_ref())
            .and_then(|name| self.clusters.get(name))
            .filter(|c| c.has_proxy(id))
            .cloned();
        let mut members: Vec<Proxy> = cluster
            .iter()
            .flat_map(|c| c.proxy_ids())
            .filter_map(|m| self.proxies.get(m).cloned())
            .collect();
        members.sort_by(|a, b| a.id().cmp(b.id()));
        ProxyView {
            proxy_id: id.clone(),
            floor_epoch: if proxy.is_none() {
                self.tombstones.get(id).copied().unwrap_or(0)
            } else {
                0
            },
            proxy,
            cluster,
            members,
        }
    }
}

impl Index {
    /// An empty index over `repo`; call [`run`](Self::run) to fill it.
    pub fn new(repo: MetaRepo) -> Self {
        let (clusters, _) = broadcast::channel(256);
        let (loaded, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                repo,
                state: Mutex::default(),
                views: Mutex::default(),
                clusters,
                loaded,
                liveness: Mutex::new(Liveness {
                    watching: false,
                    last_confirmed: None,
                }),
            }),
        }
    }

    /// Whether the index is loaded, watching, and recently confirmed etcd
    /// is reachable: only then are its views vouched for with keepalives.
    pub fn is_current(&self) -> bool {
        let l = lock(&self.inner.liveness);
        *self.inner.loaded.borrow()
            && l.watching
            && l.last_confirmed.is_some_and(|t| t.elapsed() < STALE_AFTER)
    }

    /// Resolves once the first snapshot is loaded.
    pub async fn wait_loaded(&self) {
        let mut rx = self.inner.loaded.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Latest-value channel of `proxy`'s view (`None` until loaded).
    pub fn subscribe(&self, proxy: &ProxyId) -> watch::Receiver<Option<Arc<PublishedView>>> {
        let mut views = lock(&self.inner.views);
        if let Some(tx) = views.get(proxy) {
            return tx.subscribe();
        }
        let state = lock(&self.inner.state);
        let initial = state.loaded.then(|| publish_form(state.view_of(proxy)));
        let (tx, rx) = watch::channel(initial);
        views.insert(proxy.clone(), tx);
        rx
    }

    /// Cluster events from now on.
    pub fn cluster_events(&self) -> broadcast::Receiver<ClusterEvent> {
        self.inner.clusters.subscribe()
    }

    /// Current clusters.
    pub fn clusters(&self) -> Vec<Arc<Cluster>> {
        lock(&self.inner.state)
            .clusters
            .values()
            .map(|c| Arc::new(c.clone()))
            .collect()
    }

    /// Number of live topology subscriptions (for metrics).
    pub fn subscriber_count(&self) -> usize {
        lock(&self.inner.views)
            .values()
            .map(|tx| tx.receiver_count())
            .sum()
    }

    /// Keeps the index in sync with etcd until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let probe = tokio::spawn(self.clone().probe(shutdown.clone()));
        let keys = self.inner.repo.keys().clone();
        let store = self.inner.repo.store().clone();
        let root = keys.root();
        let mut delays = reconnect_delays(Duration::from_millis(100), Duration::from_secs(3));
        'resync: while !shutdown.is_cancelled() {
            let listing = match store.list(&root).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "topology index cannot read etcd; retrying");
                    if sleep_or_cancel(delays.next(), &shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            self.load_snapshot(&keys, &listing.kvs, listing.revision);
            let mut revision = listing.revision;
            while !shutdown.is_cancelled() {
                let mut stream = match store.watch(&root, revision + 1).await {
                    Ok(s) => s,
                    Err(StoreError::Compacted { .. }) => continue 'resync,
                    Err(e) => {
                        tracing::warn!(error = %e, "topology watch cannot start; retrying");
                        if sleep_or_cancel(delays.next(), &shutdown).await {
                            break 'resync;
                        }
                        continue;
                    }
                };
                lock(&self.inner.liveness).watching = true;
                loop {
                    let item = tokio::select! {
                        _ = shutdown.cancelled() => break 'resync,
                        item = stream.next() => item,
                    };
                    match item {
                        Some(Ok(batch)) => {
                            delays = reconnect_delays(
                                Duration::from_millis(100),
                                Duration::from_secs(3),
                            );
                            revision = batch.revision;
                            self.apply(
                                &keys,
                                batch.events.iter().map(|e| (e.kind, &e.kv)),
                                revision,
                            );
                        }
                        Some(Err(StoreError::Compacted { .. })) => {
                            tracing::warn!(revision, "topology watch history compacted; resyncing");
                            lock(&self.inner.liveness).watching = false;
                            continue 'resync;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, revision, "topology watch broke; resuming");
                            break;
                        }
                        None => break,
                    }
                }
                lock(&self.inner.liveness).watching = false;
                if sleep_or_cancel(delays.next(), &shutdown).await {
                    break 'resync;
                }
            }
        }
        probe.abort();
    }

    /// Confirms etcd answers; `is_current` depends on it.
    async fn probe(self, shutdown: CancellationToken) {
        let store = self.inner.repo.store().clone();
        let key = self.inner.repo.keys().epoch();
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let res = tokio::time::timeout(STALE_AFTER, store.get(&key)).await;
            if matches!(res, Ok(Ok(_))) {
                lock(&self.inner.liveness).last_confirmed = Some(Instant::now());
            }
        }
    }

    fn load_snapshot(&self, keys: &Keys, kvs: &[KeyValue], revision: Revision) {
        {
            let mut s = lock(&self.inner.state);
            let tombstones = std::mem::take(&mut s.tombstones);
            *s = State {
                tombstones,
                ..State::default()
            };
        }
        self.apply(keys, kvs.iter().map(|kv| (EventKind::Put, kv)), revision);
        lock(&self.inner.liveness).last_confirmed = Some(Instant::now());
        lock(&self.inner.state).loaded = true;
        self.inner.loaded.send_replace(true);
        self.publish();
        tracing::info!(revision, "topology index loaded");
    }

    /// Applies changes, emits cluster events and publishes changed views.
    fn apply<'a>(
        &self,
        keys: &Keys,
        events: impl Iterator<Item = (EventKind, &'a KeyValue)>,
        revision: Revision,
    ) {
        let (proxies_prefix, clusters_prefix, epoch_key) =
            (keys.proxies(), keys.clusters(), keys.epoch());
        let mut cluster_events = Vec::new();
        {
            let mut s = lock(&self.inner.state);
            s.revision = revision;
            let mut removed_proxies = Vec::new();
            for (kind, kv) in events {
                if kv.key == epoch_key {
                    if kind == EventKind::Put {
                        match decode_epoch(&kv.key, &kv.value) {
                            Ok(e) => s.epoch = s.epoch.max(e),
                            Err(e) => {
                                tracing::error!(error = %e, "ignoring unreadable epoch record")
                            }
                        }
                    }
                } else if let Some(id) = Keys::suffix(&kv.key, &proxies_prefix) {
                    let Ok(id) = ProxyId::parse(id) else {
                        tracing::error!(key = %kv.key, "ignoring proxy record with an invalid id");
                        continue;
                    };
                    match kind {
                        EventKind::Put => match decode_proxy(&kv.key, &kv.value) {
                            Ok(p) => {
                                s.tombstones.remove(&id);
                                s.proxies.insert(id, p);
                            }
                            Err(e) => tracing::error!(error = %e, "ignoring corrupt proxy record"),
                        },
                        EventKind::Delete => {
                            s.proxies.remove(&id);
                            removed_proxies.push(id);
                        }
                    }
                } else if let Some(name) = Keys::suffix(&kv.key, &clusters_prefix) {
                    let Ok(name) = ClusterName::parse(name) else {
                        tracing::error!(key = %kv.key, "ignoring cluster record with an invalid name");
                        continue;
                    };
                    match kind {
                        EventKind::Put => match decode_cluster(&kv.key, &kv.value) {
                            Ok(c) => {
                                if s.clusters.get(&name) != Some(&c) {
                                    cluster_events.push(ClusterEvent::Updated(Arc::new(c.clone())));
                                }
                                s.clusters.insert(name, c);
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "ignoring corrupt cluster record")
                            }
                        },
                        EventKind::Delete => {
                            if let Some(old) = s.clusters.remove(&name) {
                                cluster_events.push(ClusterEvent::Deleted { name, uid: old.uid });
                            }
                        }
                    }
                }
            }
            // The deregistration transaction bumped the epoch in the same
            // batch, so s.epoch is already the removal's epoch.
            let epoch = s.epoch;
            for id in removed_proxies {
                s.tombstones.insert(id, epoch);
            }
        }
        for ev in cluster_events {
            // No receivers is fine.
            let _ = self.inner.clusters.send(ev);
        }
        self.publish();
    }

    /// Recomputes every subscribed view and wakes the subscribers of those
    /// that changed; drops channels nobody listens to any more.
    fn publish(&self) {
        let mut views = lock(&self.inner.views);
        let state = lock(&self.inner.state);
        if !state.loaded {
            return;
        }
        views.retain(|_, tx| tx.receiver_count() > 0);
        for (id, tx) in views.iter() {
            let view = state.view_of(id);
            tx.send_if_modified(|cur| {
                if cur.as_ref().is_some_and(|c| c.view == view) {
                    return false;
                }
                *cur = Some(publish_form(view.clone()));
                true
            });
        }
        metrics::gauge!("redmesh_broker_topology_subscribers")
            .set(views.values().map(|t| t.receiver_count()).sum::<usize>() as f64);
        metrics::gauge!("redmesh_broker_metadata_epoch").set(state.epoch as f64);
    }
}

fn publish_form(view: ProxyView) -> Arc<PublishedView> {
    Arc::new(PublishedView {
        message: v1::ProxyView::from(&view),
        view,
        published_at: std::time::Instant::now(),
    })
}

/// Sleeps for `delay` unless cancelled first; returns true if cancelled.
async fn sleep_or_cancel(delay: Option<Duration>, shutdown: &CancellationToken) -> bool {
    let delay = delay.unwrap_or(Duration::from_secs(1));
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}
