//! Typed metadata over a `MetaStore`: proxies and clusters stored as the
//! API's protobuf messages, read as a snapshot and changed only through
//! transactions guarded by the global epoch key.
//!
//! Every change compares the epoch key's revision and increments the epoch,
//! so concurrent writers (brokers, coordinator, migrator) are serialised and
//! each record written carries the new, unique epoch. A conflict simply
//! re-runs the change on a fresh snapshot. Nothing is ever half-written.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use redmesh_api::{convert, v1};
use redmesh_model::{Cluster, ClusterName, Epoch, ModelError, Proxy, ProxyId};

use crate::{Compare, Keys, MetaStore, Op, Revision, StoreError, Txn};

/// Attempts before giving up on a contended change.
const MAX_ATTEMPTS: u32 = 20;

/// Failures of typed metadata access.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaError {
    /// A domain rule refused the change, or a stored record is corrupt.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Other writers kept winning the race.
    #[error("metadata kept changing concurrently; gave up after {0} attempts, retry the request")]
    Contention(u32),
    /// A caller-supplied guard (e.g. leadership) no longer holds.
    #[error("guard no longer holds: {0}")]
    GuardFailed(String),
}

/// Everything the control plane decides on, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Global epoch at the time of reading.
    pub epoch: Epoch,
    epoch_revision: Revision,
    /// Every proxy by id.
    pub proxies: BTreeMap<ProxyId, Proxy>,
    /// Every cluster by name.
    pub clusters: BTreeMap<ClusterName, Cluster>,
}

impl Snapshot {
    /// A cluster by name, `NotFound` if there is none.
    pub fn cluster(&self, name: &ClusterName) -> Result<&Cluster, ModelError> {
        self.clusters.get(name).ok_or_else(|| ModelError::NotFound {
            kind: "cluster",
            name: name.to_string(),
        })
    }

    /// Proxies of a cluster, in chunk order.
    pub fn cluster_proxies(&self, cluster: &Cluster) -> Vec<Proxy> {
        cluster
            .proxy_ids()
            .filter_map(|id| self.proxies.get(id).cloned())
            .collect()
    }
}

/// Records to write in one transaction. Written records get the new epoch.
#[derive(Debug, Default)]
pub struct Change {
    /// Proxies to create or overwrite.
    pub put_proxies: Vec<Proxy>,
    /// Proxies to delete.
    pub delete_proxies: Vec<ProxyId>,
    /// Clusters to create or overwrite.
    pub put_clusters: Vec<Cluster>,
    /// Clusters to delete.
    pub delete_clusters: Vec<ClusterName>,
    /// Other records written in the same transaction (e.g. a migration
    /// task), as key and encoded value.
    pub put_raw: Vec<(String, Bytes)>,
}

impl Change {
    /// Whether nothing would be written.
    pub fn is_empty(&self) -> bool {
        self.put_proxies.is_empty()
            && self.delete_proxies.is_empty()
            && self.put_clusters.is_empty()
            && self.delete_clusters.is_empty()
            && self.put_raw.is_empty()
    }
}

/// Typed access to redmesh metadata.
#[derive(Clone)]
pub struct MetaRepo {
    store: Arc<dyn MetaStore>,
    keys: Keys,
}

impl std::fmt::Debug for MetaRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaRepo")
            .field("keys", &self.keys)
            .finish()
    }
}

/// Decodes a stored proxy record.
pub fn decode_proxy(key: &str, value: &[u8]) -> Result<Proxy, ModelError> {
    let msg: v1::Proxy = convert::decode(key, value)?;
    Proxy::try_from(&msg).map_err(|e| ModelError::Corrupt(format!("{key}: {e}")))
}

/// Decodes a stored cluster record.
pub fn decode_cluster(key: &str, value: &[u8]) -> Result<Cluster, ModelError> {
    let msg: v1::Cluster = convert::decode(key, value)?;
    Cluster::try_from(&msg).map_err(|e| ModelError::Corrupt(format!("{key}: {e}")))
}

/// Decodes the epoch record (absent key: epoch 0).
pub fn decode_epoch(key: &str, value: &[u8]) -> Result<Epoch, ModelError> {
    let msg: v1::EpochRecord = convert::decode(key, value)?;
    Ok(msg.epoch)
}

impl MetaRepo {
    /// Typed access under `keys`.
    pub fn new(store: Arc<dyn MetaStore>, keys: Keys) -> Self {
        Self { store, keys }
    }

    /// The untyped store.
    pub fn store(&self) -> &Arc<dyn MetaStore> {
        &self.store
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Reads epoch, proxies and clusters. The epoch is read first: if
    /// anything changes while the lists are read, a commit based on this
    /// snapshot fails its epoch guard and is retried.
    pub async fn snapshot(&self) -> Result<Snapshot, MetaError> {
        let epoch_kv = self.store.get(&self.keys.epoch()).await?;
        let (epoch, epoch_revision) = match &epoch_kv {
            Some(kv) => (decode_epoch(&kv.key, &kv.value)?, kv.mod_revision),
            None => (0, 0),
        };
        let (proxies_prefix, clusters_prefix) = (self.keys.proxies(), self.keys.clusters());
        let (proxies, clusters) = futures::try_join!(
            self.store.list(&proxies_prefix),
            self.store.list(&clusters_prefix)
        )?;
        let mut snap = Snapshot {
            epoch,
            epoch_revision,
            ..Snapshot::default()
        };
        for kv in &proxies.kvs {
            let p = decode_proxy(&kv.key, &kv.value)?;
            snap.proxies.insert(p.id().clone(), p);
        }
        for kv in &clusters.kvs {
            let c = decode_cluster(&kv.key, &kv.value)?;
            snap.clusters.insert(c.name.clone(), c);
        }
        Ok(snap)
    }

    /// Reads one proxy.
    pub async fn proxy(&self, id: &ProxyId) -> Result<Option<Proxy>, MetaError> {
        let key = self.keys.proxy(id.as_str());
        Ok(match self.store.get(&key).await? {
            Some(kv) => Some(decode_proxy(&key, &kv.value)?),
            None => None,
        })
    }

    /// Reads one cluster.
    pub async fn cluster(&self, name: &ClusterName) -> Result<Option<Cluster>, MetaError> {
        let key = self.keys.cluster(name.as_str());
        Ok(match self.store.get(&key).await? {
            Some(kv) => Some(decode_cluster(&key, &kv.value)?),
            None => None,
        })
    }

    /// Runs `decide` on a fresh snapshot and commits the change it returns
    /// together with the epoch increment, retrying on conflicts. `decide`
    /// receives the epoch its records will carry.
    pub async fn update<T>(
        &self,
        decide: impl FnMut(&Snapshot, Epoch) -> Result<(Change, T), ModelError>,
    ) -> Result<T, MetaError> {
        self.update_guarded(Vec::new(), decide).await
    }

    /// Like [`update`](Self::update), with extra guards (e.g. an election
    /// leadership) that must hold for the commit; if one fails the update
    /// ends with `GuardFailed` instead of retrying.
    pub async fn update_guarded<T>(
        &self,
        guards: Vec<Compare>,
        mut decide: impl FnMut(&Snapshot, Epoch) -> Result<(Change, T), ModelError>,
    ) -> Result<T, MetaError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let snap = self.snapshot().await?;
            let next = snap.epoch + 1;
            let (change, out) = decide(&snap, next)?;
            if change.is_empty() {
                return Ok(out);
            }
            let epoch_key = self.keys.epoch();
            let mut compares = vec![Compare::mod_revision(&epoch_key, snap.epoch_revision)];
            compares.extend(guards.iter().cloned());
            let mut success = vec![Op::put(
                &epoch_key,
                convert::encode(&v1::EpochRecord { epoch: next }),
            )];
            for mut p in change.put_proxies {
                p.epoch = next;
                success.push(Op::put(
                    self.keys.proxy(p.id().as_str()),
                    Bytes::from(convert::encode(&v1::Proxy::from(&p))),
                ));
            }
            for id in &change.delete_proxies {
                success.push(Op::delete(self.keys.proxy(id.as_str())));
            }
            for mut c in change.put_clusters {
                c.epoch = next;
                c.check()?;
                success.push(Op::put(
                    self.keys.cluster(c.name.as_str()),
                    Bytes::from(convert::encode(&v1::Cluster::from(&c))),
                ));
            }
            for name in &change.delete_clusters {
                success.push(Op::delete(self.keys.cluster(name.as_str())));
            }
            for (key, value) in change.put_raw {
                success.push(Op::put(key, value));
            }
            // On failure, read the guards back to tell a lost race from a lost guard.
            let failure = guards.iter().map(|g| Op::get(&g.key)).collect();
            let res = self
                .store
                .txn(Txn {
                    compares,
                    success,
                    failure,
                })
                .await?;
            if res.succeeded {
                return Ok(out);
            }
            if let Some(lost) = guards
                .iter()
                .zip(&res.gets)
                .find(|(g, kv)| !g.holds_for(kv.as_ref()))
            {
                return Err(MetaError::GuardFailed(lost.0.key.clone()));
            }
            let pause = rand::rng().random_range(1..=10u64) * u64::from(attempt.min(5));
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        Err(MetaError::Contention(MAX_ATTEMPTS))
    }
}
