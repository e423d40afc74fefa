//! Broker operations on the proxy pool and clusters.
//!
//! Each operation is a pure decision over a metadata snapshot, committed as
//! one epoch-guarded transaction (retried on conflict). Refusals are
//! `ModelError`s whose text tells the operator what to do next.

use std::collections::HashSet;
use std::time::SystemTime;

use redmesh_model::{
    pick_chunks, ClientMode, Cluster, ClusterConfig, ClusterName, ClusterTaskKind, Compression,
    Durability, ModelError, Proxy, ProxyId, ProxySpec, ProxyState,
};
use redmesh_store::{Change, MetaError, MetaRepo, Snapshot};

pub use redmesh_model::scale::{check_node_count, MAX_NODE_COUNT};

/// Changes to a cluster's settings; `None` leaves a field alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigPatch {
    /// New password digest (`Some(None)` removes the password).
    pub password_sha256: Option<Option<[u8; 32]>>,
    /// New compression.
    pub compression: Option<Compression>,
    /// New compression threshold.
    pub compression_threshold: Option<u32>,
    /// New durability.
    pub durability: Option<Durability>,
    /// New replica wait.
    pub replica_ack_timeout_ms: Option<u32>,
    /// New client mode.
    pub client_mode: Option<ClientMode>,
}

/// The broker's operations.
#[derive(Debug, Clone)]
pub struct Ops {
    repo: MetaRepo,
}

/// Longest replica confirmation wait a cluster may configure.
const MAX_REPLICA_ACK_TIMEOUT_MS: u32 = 10_000;

/// Checks settings beyond what decoding checks: a replica_ack wait must be
/// short enough that a write never hangs a client for long.
fn check_supported(config: &ClusterConfig) -> Result<(), ModelError> {
    if config.replica_ack_timeout_ms > MAX_REPLICA_ACK_TIMEOUT_MS {
        return Err(ModelError::invalid(
            "config.replica_ack_timeout_ms",
            format!(
                "{} ms exceeds the maximum of {MAX_REPLICA_ACK_TIMEOUT_MS} ms",
                config.replica_ack_timeout_ms
            ),
        ));
    }
    Ok(())
}

fn not_found(kind: &'static str, name: &str) -> ModelError {
    ModelError::NotFound {
        kind,
        name: name.to_owned(),
    }
}

impl Ops {
    /// Operations over `repo`.
    pub fn new(repo: MetaRepo) -> Self {
        Self { repo }
    }

    /// Adds a proxy, or updates a registered one. Returns the stored record
    /// and whether anything changed.
    pub async fn register_proxy(&self, spec: ProxySpec) -> Result<(Proxy, bool), MetaError> {
        self.repo
            .update(|snap, epoch| {
                check_addresses_unused(snap, &spec)?;
                let (proxy, changed) = match snap.proxies.get(&spec.id) {
                    None => (
                        Proxy {
                            spec: spec.clone(),
                            state: ProxyState::Free,
                            cluster: None,
                            epoch,
                            registered_at: SystemTime::now(),
                        },
                        true,
                    ),
                    Some(p) if p.spec == spec && p.state != ProxyState::Failed => (p.clone(), false),
                    Some(p) => {
                        if p.state == ProxyState::Allocated && p.spec.host != spec.host {
                            return Err(ModelError::FailedPrecondition(format!(
                                "proxy {} serves cluster {}; its host can only change while it is free",
                                spec.id,
                                p.cluster.as_ref().map(ToString::to_string).unwrap_or_default()
                            )));
                        }
                        let mut next = p.clone();
                        next.spec = spec.clone();
                        next.epoch = epoch;
                        if p.state == ProxyState::Failed {
                            // A failed proxy re-enters only through the pool.
                            next.state = ProxyState::Free;
                            next.cluster = None;
                        }
                        (next, true)
                    }
                };
                let change = if changed {
                    Change {
                        put_proxies: vec![proxy.clone()],
                        ..Change::default()
                    }
                } else {
                    Change::default()
                };
                Ok((change, (proxy, changed)))
            })
            .await
    }

    /// Removes a proxy that serves no cluster.
    pub async fn deregister_proxy(&self, id: &ProxyId) -> Result<(), MetaError> {
        self.repo
            .update(|snap, _| {
                let p = snap
                    .proxies
                    .get(id)
                    .ok_or_else(|| not_found("proxy", id.as_str()))?;
                if let Some(cluster) = p
                    .cluster
                    .as_ref()
                    .filter(|_| p.state == ProxyState::Allocated)
                {
                    return Err(ModelError::FailedPrecondition(format!(
                        "proxy {id} serves cluster {cluster}; delete or shrink the cluster first"
                    )));
                }
                Ok((
                    Change {
                        delete_proxies: vec![id.clone()],
                        ..Change::default()
                    },
                    (),
                ))
            })
            .await
    }

    /// Proxies sorted by id, optionally only in one state.
    pub async fn list_proxies(&self, state: Option<ProxyState>) -> Result<Vec<Proxy>, MetaError> {
        let snap = self.repo.snapshot().await?;
        Ok(snap
            .proxies
            .into_values()
            .filter(|p| state.is_none_or(|s| p.state == s))
            .collect())
    }

    /// One proxy.
    pub async fn get_proxy(&self, id: &ProxyId) -> Result<Proxy, MetaError> {
        Ok(self
            .repo
            .proxy(id)
            .await?
            .ok_or_else(|| not_found("proxy", id.as_str()))?)
    }

    /// Creates a cluster of `node_count` nodes from free proxies.
    pub async fn create_cluster(
        &self,
        name: ClusterName,
        node_count: u32,
        config: ClusterConfig,
    ) -> Result<Cluster, MetaError> {
        let chunk_count = check_node_count(node_count)?;
        check_supported(&config)?;
        let uid = uuid::Uuid::new_v4().to_string();
        // Two v4 UUIDs: 244 random bits from the OS generator.
        let peer_secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        self.repo
            .update(|snap, epoch| {
                if snap.clusters.contains_key(&name) {
                    return Err(ModelError::AlreadyExists {
                        kind: "cluster",
                        name: name.to_string(),
                    });
                }
                let chunks = pick_chunks(snap.proxies.values(), chunk_count)?;
                let cluster = Cluster::new_layout(
                    name.clone(),
                    uid.clone(),
                    peer_secret.clone(),
                    config.clone(),
                    chunks,
                    epoch,
                    SystemTime::now(),
                )?;
                let put_proxies = cluster
                    .proxy_ids()
                    .filter_map(|id| snap.proxies.get(id))
                    .map(|p| Proxy {
                        state: ProxyState::Allocated,
                        cluster: Some(name.clone()),
                        ..p.clone()
                    })
                    .collect();
                Ok((
                    Change {
                        put_proxies,
                        put_clusters: vec![cluster.clone()],
                        ..Change::default()
                    },
                    cluster,
                ))
            })
            .await
    }

    /// A cluster and its proxies.
    pub async fn get_cluster(
        &self,
        name: &ClusterName,
    ) -> Result<(Cluster, Vec<Proxy>), MetaError> {
        let snap = self.repo.snapshot().await?;
        let cluster = snap
            .clusters
            .get(name)
            .cloned()
            .ok_or_else(|| not_found("cluster", name.as_str()))?;
        let mut proxies = snap.cluster_proxies(&cluster);
        proxies.sort_by(|a, b| a.id().cmp(b.id()));
        Ok((cluster, proxies))
    }

    /// Clusters sorted by name.
    pub async fn list_clusters(&self) -> Result<Vec<Cluster>, MetaError> {
        Ok(self.repo.snapshot().await?.clusters.into_values().collect())
    }

    /// Deletes a cluster and returns its proxies to the pool (the proxies
    /// wipe their Redis nodes when they see themselves free).
    pub async fn delete_cluster(&self, name: &ClusterName) -> Result<Vec<ProxyId>, MetaError> {
        self.repo
            .update(|snap, _| {
                let cluster = snap
                    .clusters
                    .get(name)
                    .ok_or_else(|| not_found("cluster", name.as_str()))?;
                if cluster.task.kind == ClusterTaskKind::Migrating {
                    // Its proxies would return to the pool while keys are
                    // on their way between them.
                    return Err(ModelError::FailedPrecondition(format!(
                        "cluster {name} is being scaled by migration task {}; cancel it \
                         (redmeshctl migration cancel {name}) or let it finish first",
                        cluster.task.id
                    )));
                }
                let freed: Vec<Proxy> = snap
                    .proxies
                    .values()
                    .filter(|p| p.cluster.as_ref() == Some(name))
                    .map(Proxy::freed)
                    .collect();
                let ids = freed.iter().map(|p| p.id().clone()).collect();
                Ok((
                    Change {
                        put_proxies: freed,
                        delete_clusters: vec![cluster.name.clone()],
                        ..Change::default()
                    },
                    ids,
                ))
            })
            .await
    }

    /// Applies `patch` to a cluster's settings.
    pub async fn update_config(
        &self,
        name: &ClusterName,
        patch: ConfigPatch,
    ) -> Result<Cluster, MetaError> {
        self.repo
            .update(|snap, epoch| {
                let mut cluster = snap
                    .clusters
                    .get(name)
                    .cloned()
                    .ok_or_else(|| not_found("cluster", name.as_str()))?;
                let c = &mut cluster.config;
                let before = c.clone();
                if let Some(v) = patch.password_sha256 {
                    c.password_sha256 = v;
                }
                if let Some(v) = patch.compression {
                    // Stored values may be compressed: without it proxies
                    // would hand clients the compressed bytes. Switching
                    // algorithm is fine, every proxy reads both.
                    if v == Compression::None && c.compression != Compression::None {
                        return Err(ModelError::FailedPrecondition(format!(
                            "config.compression: cluster {name} may hold compressed values, \
                             so compression cannot be turned off"
                        )));
                    }
                    c.compression = v;
                }
                if let Some(v) = patch.compression_threshold {
                    c.compression_threshold = v;
                }
                if let Some(v) = patch.durability {
                    c.durability = v;
                }
                if let Some(v) = patch.replica_ack_timeout_ms {
                    c.replica_ack_timeout_ms = v;
                }
                if let Some(v) = patch.client_mode {
                    c.client_mode = v;
                }
                check_supported(c)?;
                if *c == before {
                    return Ok((Change::default(), cluster));
                }
                cluster.epoch = epoch;
                Ok((
                    Change {
                        put_clusters: vec![cluster.clone()],
                        ..Change::default()
                    },
                    cluster,
                ))
            })
            .await
    }
}

/// Two proxies sharing a Redis node would have two clusters writing one
/// server; refuse any address another proxy already uses.
fn check_addresses_unused(snap: &Snapshot, spec: &ProxySpec) -> Result<(), ModelError> {
    let mine: HashSet<&str> = spec.addresses().map(|a| a.as_str()).collect();
    for other in snap.proxies.values().filter(|p| p.id() != &spec.id) {
        if let Some(a) = other.spec.addresses().find(|a| mine.contains(a.as_str())) {
            return Err(ModelError::FailedPrecondition(format!(
                "address {a} is already used by proxy {}",
                other.id()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use redmesh_model::{Address, HostName};
    use redmesh_store::{Keys, MemStore};

    use super::*;

    fn spec(id: &str, host: &str, base: u16) -> ProxySpec {
        let a = |p: u16| Address::parse_field("a", &format!("127.0.0.1:{p}")).unwrap();
        ProxySpec::new(
            ProxyId::parse(id).unwrap(),
            a(base),
            a(base + 1),
            HostName::parse(host).unwrap(),
            [a(base + 2), a(base + 3)],
        )
        .unwrap()
    }

    fn ops() -> Ops {
        Ops::new(MetaRepo::new(Arc::new(MemStore::new()), Keys::new("/t")))
    }

    async fn pool(ops: &Ops, n: u16) {
        for i in 0..n {
            let host = if i % 2 == 0 { "host-a" } else { "host-b" };
            ops.register_proxy(spec(&format!("p{i}"), host, 1000 + i * 10))
                .await
                .unwrap();
        }
    }

    fn name(s: &str) -> ClusterName {
        ClusterName::parse(s).unwrap()
    }

    #[tokio::test]
    async fn register_is_idempotent_and_checks_addresses() {
        let ops = ops();
        let (p, changed) = ops.register_proxy(spec("p1", "h", 1000)).await.unwrap();
        assert!(changed && p.state == ProxyState::Free && p.epoch == 1);
        let (again, changed) = ops.register_proxy(spec("p1", "h", 1000)).await.unwrap();
        assert!(!changed);
        assert_eq!(again.epoch, 1);
        let err = ops.register_proxy(spec("p2", "h", 1002)).await.unwrap_err();
        assert!(
            err.to_string().contains("already used by proxy p1"),
            "{err}"
        );
        let (moved, changed) = ops.register_proxy(spec("p1", "h", 2000)).await.unwrap();
        assert!(changed && moved.epoch == 2);
    }

    #[tokio::test]
    async fn create_allocates_across_hosts_and_delete_frees() {
        let ops = ops();
        pool(&ops, 4).await;
        let c = ops
            .create_cluster(name("demo"), 8, ClusterConfig::default())
            .await
            .unwrap();
        assert_eq!((c.node_count(), c.shards.len()), (8, 4));
        let allocated = ops.list_proxies(Some(ProxyState::Allocated)).await.unwrap();
        assert_eq!(allocated.len(), 4);
        assert!(allocated.iter().all(|p| p.epoch == c.epoch));
        let dup = ops
            .create_cluster(name("demo"), 4, ClusterConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(
            dup,
            MetaError::Model(ModelError::AlreadyExists { .. })
        ));
        let err = ops
            .create_cluster(name("more"), 4, ClusterConfig::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not enough free proxies"), "{err}");
        let err = ops
            .deregister_proxy(&ProxyId::parse("p0").unwrap())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("serves cluster demo"), "{err}");
        let freed = ops.delete_cluster(&name("demo")).await.unwrap();
        assert_eq!(freed.len(), 4);
        assert_eq!(
            ops.list_proxies(Some(ProxyState::Free))
                .await
                .unwrap()
                .len(),
            4
        );
        ops.deregister_proxy(&ProxyId::parse("p0").unwrap())
            .await
            .unwrap();
        assert!(matches!(
            ops.delete_cluster(&name("demo")).await.unwrap_err(),
            MetaError::Model(ModelError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn returned_records_carry_the_committed_epoch() {
        let ops = ops();
        pool(&ops, 2).await;
        let created = ops
            .create_cluster(name("e"), 4, ClusterConfig::default())
            .await
            .unwrap();
        let patch = ConfigPatch {
            password_sha256: Some(Some([7; 32])),
            ..ConfigPatch::default()
        };
        let updated = ops.update_config(&name("e"), patch).await.unwrap();
        let (stored, proxies) = ops.get_cluster(&name("e")).await.unwrap();
        assert!(updated.epoch > created.epoch);
        assert_eq!(updated, stored);
        assert!(proxies.iter().all(|p| p.epoch == created.epoch));
    }

    #[tokio::test]
    async fn node_count_and_options_are_validated() {
        assert!(check_node_count(0).is_err());
        assert!(check_node_count(6).is_err());
        assert!(check_node_count(u32::MAX - 3)
            .unwrap_err()
            .to_string()
            .contains("maximum"));
        assert_eq!(check_node_count(8).unwrap(), 2);
        let ops = ops();
        pool(&ops, 2).await;
        let cfg = ClusterConfig {
            durability: Durability::ReplicaAck,
            replica_ack_timeout_ms: 60_000,
            ..ClusterConfig::default()
        };
        let err = ops.create_cluster(name("c"), 4, cfg).await.unwrap_err();
        assert!(
            matches!(err, MetaError::Model(ModelError::InvalidArgument { .. })),
            "{err}"
        );
        // Compression can change algorithm but never be turned off.
        let cfg = ClusterConfig {
            compression: Compression::Lz4,
            ..ClusterConfig::default()
        };
        ops.create_cluster(name("c"), 4, cfg).await.unwrap();
        let off = ConfigPatch {
            compression: Some(Compression::None),
            ..ConfigPatch::default()
        };
        let err = ops.update_config(&name("c"), off).await.unwrap_err();
        assert!(
            matches!(err, MetaError::Model(ModelError::FailedPrecondition(_))),
            "{err}"
        );
        let zstd = ConfigPatch {
            compression: Some(Compression::Zstd),
            ..ConfigPatch::default()
        };
        let c = ops.update_config(&name("c"), zstd).await.unwrap();
        assert_eq!(c.config.compression, Compression::Zstd);
    }

    #[tokio::test]
    async fn concurrent_creates_never_share_proxies() {
        let ops = ops();
        pool(&ops, 8).await;
        let mut tasks = Vec::new();
        for i in 0..6 {
            let ops = ops.clone();
            tasks.push(tokio::spawn(async move {
                ops.create_cluster(name(&format!("c{i}")), 4, ClusterConfig::default())
                    .await
            }));
        }
        let mut seen = HashSet::new();
        let mut created = 0;
        for t in tasks {
            if let Ok(c) = t.await.unwrap() {
                created += 1;
                for p in c.proxy_ids() {
                    assert!(seen.insert(p.clone()), "proxy {p} allocated twice");
                }
            }
        }
        assert_eq!(created, 4, "8 proxies make exactly 4 one-chunk clusters");
    }
}
