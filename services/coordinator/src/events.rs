//! The coordinator's decisions, recorded in etcd (`<prefix>/events/<id>`) so
//! every coordinator — leader or standby — can stream them, and a new leader
//! continues the same history. Ids sort by time; the newest `KEEP` stay.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use redmesh_api::{convert, v1};
use redmesh_store::{EventKind, Keys, MetaStore, StoreError};

/// Events kept in etcd; older ones are pruned.
const KEEP: usize = 500;

/// Records events.
#[derive(Clone)]
pub struct EventLog {
    store: Arc<dyn MetaStore>,
    keys: Keys,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

/// A new event with a fresh, time-ordered id.
pub fn event(
    kind: v1::CoordinatorEventKind,
    cluster: &str,
    proxy: &str,
    detail: impl Into<String>,
) -> v1::CoordinatorEvent {
    let now = SystemTime::now();
    let ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    v1::CoordinatorEvent {
        id: format!("{ms:015}-{}", &rand[..8]),
        kind: kind as i32,
        cluster: cluster.to_owned(),
        proxy_id: proxy.to_owned(),
        detail: detail.into(),
        epoch: 0,
        time: Some(convert::timestamp(now)),
        duration_ms: 0,
    }
}

impl EventLog {
    /// A log under `keys`.
    pub fn new(store: Arc<dyn MetaStore>, keys: Keys) -> Self {
        Self { store, keys }
    }

    /// Logs and stores `ev`. A failure to store is logged, not fatal: the
    /// decision itself is already committed.
    pub async fn record(&self, ev: v1::CoordinatorEvent) {
        tracing::info!(kind = ev.kind().as_str_name(), cluster = %ev.cluster, proxy = %ev.proxy_id,
            epoch = ev.epoch, duration_ms = ev.duration_ms, detail = %ev.detail, "coordinator event");
        metrics::counter!("redmesh_coordinator_events_total", "kind" => ev.kind().as_str_name())
            .increment(1);
        let key = self.keys.event(&ev.id);
        if let Err(e) = self
            .store
            .put(&key, Bytes::from(convert::encode(&ev)), None)
            .await
        {
            tracing::warn!(error = %e, "could not store the event");
            return;
        }
        if let Err(e) = self.prune().await {
            tracing::debug!(error = %e, "could not prune old events");
        }
    }

    async fn prune(&self) -> Result<(), StoreError> {
        let listing = self.store.list(&self.keys.events()).await?;
        let excess = listing.kvs.len().saturating_sub(KEEP);
        for kv in listing.kvs.into_iter().take(excess) {
            self.store.delete(&kv.key).await?;
        }
        Ok(())
    }

    /// Up to `recent` of the latest recorded events (oldest first), then
    /// the events recorded from then on; optionally of one cluster only.
    /// The watch starts right after the listing's revision, so nothing falls
    /// between the replay and the stream.
    pub async fn watch(
        &self,
        cluster: Option<String>,
        recent: usize,
    ) -> Result<
        impl Stream<Item = Result<v1::CoordinatorEvent, StoreError>> + Send + 'static,
        StoreError,
    > {
        let listing = self.store.list(&self.keys.events()).await?;
        let wanted = |ev: &v1::CoordinatorEvent| cluster.as_ref().is_none_or(|c| c == &ev.cluster);
        let mut past: Vec<v1::CoordinatorEvent> = listing
            .kvs
            .iter()
            .filter_map(|kv| convert::decode::<v1::CoordinatorEvent>(&kv.key, &kv.value).ok())
            .filter(|ev| wanted(ev))
            .collect();
        past.drain(..past.len().saturating_sub(recent));
        let stream = self
            .store
            .watch(&self.keys.events(), listing.revision + 1)
            .await?;
        let live = stream
            .map(
                move |batch| -> Vec<Result<v1::CoordinatorEvent, StoreError>> {
                    match batch {
                        Err(e) => vec![Err(e)],
                        Ok(b) => b
                            .events
                            .into_iter()
                            .filter(|e| e.kind == EventKind::Put)
                            .filter_map(|e| {
                                convert::decode::<v1::CoordinatorEvent>(&e.kv.key, &e.kv.value).ok()
                            })
                            .filter(|ev| cluster.as_ref().is_none_or(|c| c == &ev.cluster))
                            .map(Ok)
                            .collect(),
                    }
                },
            )
            .flat_map(futures::stream::iter);
        Ok(futures::stream::iter(past.into_iter().map(Ok)).chain(live))
    }
}
