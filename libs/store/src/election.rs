//! Leader election on any `MetaStore`: etcd's concurrency recipe.
//!
//! Each candidate creates `<prefix><lease-id>` under its lease; the key with
//! the lowest creation revision leads. A waiting candidate watches only its
//! predecessor, so a leader change wakes one candidate, not all. A leader
//! guards its writes with [`Leadership::guard`], so a deposed leader whose
//! lease expired cannot write anything.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use crate::{
    Compare, CompareOp, CompareTarget, EventKind, KeyValue, LeaseId, MetaStore, Op, Revision,
    StoreError, Txn,
};

/// One election (e.g. the coordinator's).
#[derive(Clone)]
pub struct Election {
    store: Arc<dyn MetaStore>,
    prefix: String,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Proof of leadership, valid while its lease lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The candidate key.
    pub key: String,
    /// Its creation revision.
    pub create_revision: Revision,
    /// The lease it lives under.
    pub lease: LeaseId,
}

impl Leadership {
    /// A transaction guard that holds only while this leadership does.
    pub fn guard(&self) -> Compare {
        Compare {
            key: self.key.clone(),
            op: CompareOp::Equal,
            target: CompareTarget::CreateRevision(self.create_revision),
        }
    }
}

impl Election {
    /// An election whose candidates live under `prefix` (ending in `/`).
    pub fn new(store: Arc<dyn MetaStore>, prefix: impl Into<String>) -> Self {
        Self {
            store,
            prefix: prefix.into(),
        }
    }

    /// Becomes a candidate with `value` (e.g. the candidate's id) and waits
    /// until it leads. Cancel-safe: drop the future to stop waiting (the
    /// candidacy ends with the lease).
    pub async fn campaign(&self, lease: LeaseId, value: Bytes) -> Result<Leadership, StoreError> {
        let key = format!("{}{lease:016x}", self.prefix);
        let res = self
            .store
            .txn(Txn {
                compares: vec![Compare::missing(&key)],
                success: vec![
                    Op::Put {
                        key: key.clone(),
                        value,
                        lease: Some(lease),
                    },
                    Op::get(&key),
                ],
                failure: vec![Op::get(&key)],
            })
            .await?;
        let create_revision = res
            .gets
            .first()
            .and_then(|kv| kv.as_ref())
            .map(|kv| kv.create_revision)
            .ok_or(StoreError::LeaseNotFound(lease))?;
        loop {
            let listing = self.store.list(&self.prefix).await?;
            let mut candidates = listing.kvs;
            candidates.sort_by_key(|kv| kv.create_revision);
            let Some(pos) = candidates.iter().position(|kv| kv.key == key) else {
                // Our key vanished: the lease expired while we waited.
                return Err(StoreError::LeaseNotFound(lease));
            };
            if pos == 0 {
                return Ok(Leadership {
                    key,
                    create_revision,
                    lease,
                });
            }
            let predecessor = candidates[pos - 1].key.clone();
            let mut watch = match self.store.watch(&predecessor, listing.revision + 1).await {
                Ok(w) => w,
                Err(StoreError::Compacted { .. }) => continue,
                Err(e) => return Err(e),
            };
            while let Some(batch) = watch.next().await {
                match batch {
                    Ok(b)
                        if b.events
                            .iter()
                            .any(|e| e.kind == EventKind::Delete && e.kv.key == predecessor) =>
                    {
                        break
                    }
                    Ok(_) => {}
                    Err(StoreError::Compacted { .. }) => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// The current leader's key and value, if any.
    pub async fn leader(&self) -> Result<Option<KeyValue>, StoreError> {
        let listing = self.store.list(&self.prefix).await?;
        Ok(listing.kvs.into_iter().min_by_key(|kv| kv.create_revision))
    }

    /// Gives up leadership (or candidacy) at once.
    pub async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        self.store
            .txn(Txn {
                compares: vec![leadership.guard()],
                success: vec![Op::delete(&leadership.key)],
                failure: vec![],
            })
            .await
            .map(|_| ())
    }
}
