//! In-memory `MetaStore` with etcd's semantics (revisions, CAS, watch
//! history, compaction, leases), for unit tests and single-process runs.
//!
//! It must behave like etcd wherever the conformance suite looks; it is not
//! durable and not shared between processes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::{
    Compare, EventKind, KeyValue, LeaseId, Listing, MetaStore, Op, Revision, StoreError, Txn,
    TxnResult, WatchBatch, WatchEvent, WatchStream,
};

/// Batches kept for watches that start in the past.
const HISTORY: usize = 10_000;

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<String>,
}

#[derive(Debug, Default)]
struct Inner {
    revision: Revision,
    /// Oldest revision a watch may start from (etcd's compact revision).
    compacted: Revision,
    data: BTreeMap<String, KeyValue>,
    history: VecDeque<Arc<WatchBatch>>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
}

/// The in-memory store. Cloning shares the data.
#[derive(Clone)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<Arc<WatchBatch>>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore").finish_non_exhaustive()
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemStore {
    /// An empty store. Lease expiry runs on a background task of the current
    /// Tokio runtime, which ends when the store is dropped.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(1024);
        let store = Self {
            inner: Arc::new(Mutex::new(Inner {
                next_lease: 0x1000,
                ..Inner::default()
            })),
            events,
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&store.inner);
            let events = store.events.clone();
            rt.spawn(expire_leases(weak, events));
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every mutation completes before unlocking), so poisoning is moot.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn expire_leases(inner: Weak<Mutex<Inner>>, events: broadcast::Sender<Arc<WatchBatch>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let mut g = inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let expired: Vec<LeaseId> = g
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            revoke_locked(&mut g, &events, id);
        }
    }
}

fn revoke_locked(g: &mut Inner, events: &broadcast::Sender<Arc<WatchBatch>>, id: LeaseId) -> bool {
    let Some(lease) = g.leases.remove(&id) else {
        return false;
    };
    let mut keys: Vec<String> = lease.keys.into_iter().collect();
    keys.sort();
    let ops: Vec<Op> = keys.into_iter().map(Op::delete).collect();
    if !ops.is_empty() {
        apply_ops(g, events, &ops);
    }
    true
}

fn compare_holds(g: &Inner, c: &Compare) -> bool {
    c.holds_for(g.data.get(&c.key))
}

/// Applies ops as one revision (if any of them writes); returns the Gets.
fn apply_ops(
    g: &mut Inner,
    events: &broadcast::Sender<Arc<WatchBatch>>,
    ops: &[Op],
) -> Vec<Option<KeyValue>> {
    let writes = ops.iter().any(|op| match op {
        Op::Put { .. } => true,
        Op::Delete { key } => g.data.contains_key(key),
        Op::Get { .. } => false,
    });
    let rev = if writes { g.revision + 1 } else { g.revision };
    let mut batch = Vec::new();
    let mut gets = Vec::new();
    for op in ops {
        match op {
            Op::Put { key, value, lease } => {
                let prev = g.data.get(key).cloned();
                if let Some(old) = prev.as_ref().filter(|p| p.lease != 0) {
                    if let Some(l) = g.leases.get_mut(&old.lease) {
                        l.keys.remove(key);
                    }
                }
                let lease = lease.unwrap_or(0);
                if let Some(l) = g.leases.get_mut(&lease) {
                    l.keys.insert(key.clone());
                }
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                    mod_revision: rev,
                    version: prev.as_ref().map_or(0, |p| p.version) + 1,
                    lease,
                };
                g.data.insert(key.clone(), kv.clone());
                batch.push(WatchEvent {
                    kind: EventKind::Put,
                    kv,
                });
            }
            Op::Delete { key } => {
                if let Some(old) = g.data.remove(key) {
                    if let Some(l) = g.leases.get_mut(&old.lease) {
                        l.keys.remove(key);
                    }
                    batch.push(WatchEvent {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            key: key.clone(),
                            value: Bytes::new(),
                            create_revision: 0,
                            mod_revision: rev,
                            version: 0,
                            lease: 0,
                        },
                    });
                }
            }
            Op::Get { key } => gets.push(g.data.get(key).cloned()),
        }
    }
    if writes {
        g.revision = rev;
        let batch = Arc::new(WatchBatch {
            revision: rev,
            events: batch,
        });
        g.history.push_back(batch.clone());
        while g.history.len() > HISTORY {
            if let Some(old) = g.history.pop_front() {
                g.compacted = g.compacted.max(old.revision + 1);
            }
        }
        // No receivers is fine: nobody watches.
        let _ = events.send(batch);
    }
    gets
}

fn filter_batch(batch: &WatchBatch, prefix: &str) -> Option<WatchBatch> {
    let events: Vec<WatchEvent> = batch
        .events
        .iter()
        .filter(|e| e.kv.key.starts_with(prefix))
        .cloned()
        .collect();
    (!events.is_empty()).then(|| WatchBatch {
        revision: batch.revision,
        events,
    })
}

#[async_trait]
impl MetaStore for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().data.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let g = self.lock();
        let kvs = g
            .data
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok(Listing {
            kvs,
            revision: g.revision,
        })
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let mut g = self.lock();
        if let Some(id) = lease {
            if !g.leases.contains_key(&id) {
                return Err(StoreError::LeaseNotFound(id));
            }
        }
        apply_ops(
            &mut g,
            &self.events,
            &[Op::Put {
                key: key.to_owned(),
                value,
                lease,
            }],
        );
        Ok(g.revision)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut g = self.lock();
        let existed = g.data.contains_key(key);
        apply_ops(&mut g, &self.events, &[Op::delete(key)]);
        Ok(existed)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let mut g = self.lock();
        let succeeded = txn.compares.iter().all(|c| compare_holds(&g, c));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        for op in ops {
            if let Op::Put {
                lease: Some(id), ..
            } = op
            {
                if !g.leases.contains_key(id) {
                    return Err(StoreError::LeaseNotFound(*id));
                }
            }
        }
        let gets = apply_ops(&mut g, &self.events, ops);
        Ok(TxnResult {
            succeeded,
            revision: g.revision,
            gets,
        })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        // Subscribe before reading history, under the lock, so no batch falls
        // between the replay and the live feed.
        let (replay, rx, last) = {
            let g = self.lock();
            let from = if from <= 0 { g.revision + 1 } else { from };
            if from < g.compacted {
                return Err(StoreError::Compacted {
                    requested: from,
                    compact_revision: g.compacted,
                });
            }
            let replay: Vec<WatchBatch> = g
                .history
                .iter()
                .filter(|b| b.revision >= from)
                .filter_map(|b| filter_batch(b, prefix))
                .collect();
            (replay, self.events.subscribe(), g.revision)
        };
        let prefix = prefix.to_owned();
        let live = futures::stream::unfold((rx, false), move |(mut rx, done)| {
            let prefix = prefix.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    match rx.recv().await {
                        Ok(b) if b.revision <= last => continue,
                        Ok(b) => {
                            if let Some(f) = filter_batch(&b, &prefix) {
                                return Some((Ok(f), (rx, false)));
                            }
                        }
                        // A reader too slow for the channel lost events; like a
                        // compacted etcd watch, it must resync from a snapshot.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            let err = StoreError::Compacted {
                                requested: last + 1,
                                compact_revision: last + 1,
                            };
                            return Some((Err(err), (rx, true)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        Ok(futures::stream::iter(replay.into_iter().map(Ok))
            .chain(live)
            .boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut g = self.lock();
        g.next_lease += 1;
        let id = g.next_lease;
        g.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: HashSet::new(),
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        let mut g = self.lock();
        let l = g
            .leases
            .get_mut(&lease)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut g = self.lock();
        if revoke_locked(&mut g, &self.events, lease) {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(lease))
        }
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut g = self.lock();
        if revision > g.revision {
            return Err(StoreError::Rejected(format!(
                "cannot compact to future revision {revision} (current {})",
                g.revision
            )));
        }
        g.compacted = g.compacted.max(revision);
        let keep = g.compacted;
        g.history.retain(|b| b.revision >= keep);
        Ok(())
    }
}
