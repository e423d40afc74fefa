//! Clusters: chunks of proxies, shards (replication groups) and the slot map.
//!
//! A cluster is a pure value; every change produces a new value with a
//! higher epoch that the store writes in one transaction. `check` states the
//! invariants every stored cluster satisfies.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::{
    slots::spread_evenly, ClusterName, Epoch, ModelError, Proxy, ProxyId, Slot, SlotRange,
    SLOT_COUNT,
};

/// Identifier of a shard within its cluster; never reused.
pub type ShardId = u32;

/// Redis nodes per chunk.
pub const NODES_PER_CHUNK: u32 = 4;

/// One local Redis node of a proxy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeRef {
    /// Hosting proxy.
    pub proxy_id: ProxyId,
    /// 0 or 1: index into the proxy's `redis_nodes`.
    pub node_index: u8,
}

/// A replication group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Identifier.
    pub id: ShardId,
    /// The writable node.
    pub master: NodeRef,
    /// Its replicas.
    pub replicas: Vec<NodeRef>,
}

/// Two proxies on different hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The pair.
    pub proxies: [ProxyId; 2],
}

impl Chunk {
    /// The chunk's two shards, ids `first` and `first + 1`: each proxy's
    /// node 0 is a master and its node 1 replicates the partner's master.
    pub fn shards(&self, first: ShardId) -> [Shard; 2] {
        let [a, b] = &self.proxies;
        [(a, b, first), (b, a, first + 1)].map(|(master, replica, id)| Shard {
            id,
            master: NodeRef {
                proxy_id: master.clone(),
                node_index: 0,
            },
            replicas: vec![NodeRef {
                proxy_id: replica.clone(),
                node_index: 1,
            }],
        })
    }
}

/// Step of an in-flight slot move (DESIGN.md §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MigrationStage {
    /// The destination accepts `ASKING`; the source serves as before.
    Prepare,
    /// The source serves the keys it holds and sends the rest to the
    /// destination with `-ASK`; keys are being copied.
    #[default]
    Move,
    /// All keys are at the destination, which owns the slots; the source
    /// still answers `-ASK` until it hears of the final state.
    Commit,
}

/// An in-flight move of a slot range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMigration {
    /// Destination shard.
    pub target_shard: ShardId,
    /// Migration task.
    pub task_id: String,
    /// Step of the move.
    pub stage: MigrationStage,
}

/// Ownership of a slot range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotAssignment {
    /// The slots.
    pub range: SlotRange,
    /// Owning shard (the source while migrating).
    pub shard: ShardId,
    /// Set while moving.
    pub migration: Option<SlotMigration>,
}

/// Value compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Stored as sent.
    #[default]
    None,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
}

/// Write acknowledgement policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge when the master has it.
    #[default]
    Async,
    /// Acknowledge after the replica confirmed it.
    ReplicaAck,
}

/// How proxies present the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientMode {
    /// Redis Cluster protocol with redirections.
    #[default]
    Cluster,
    /// Single endpoint; proxies forward.
    Plain,
}

/// Tenant settings of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// SHA-256 of the AUTH password; `None` means no password.
    pub password_sha256: Option<[u8; 32]>,
    /// Value compression.
    pub compression: Compression,
    /// Minimum size of a compressed value.
    pub compression_threshold: u32,
    /// Write acknowledgement policy.
    pub durability: Durability,
    /// Replica wait for `ReplicaAck`.
    pub replica_ack_timeout_ms: u32,
    /// Client protocol.
    pub client_mode: ClientMode,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            password_sha256: None,
            compression: Compression::None,
            compression_threshold: 256,
            durability: Durability::Async,
            replica_ack_timeout_ms: 100,
            client_mode: ClientMode::Cluster,
        }
    }
}

/// SHA-256 of a password, as stored and compared.
pub fn password_digest(password: &[u8]) -> [u8; 32] {
    Sha256::digest(password).into()
}

/// Kind of long operation running on a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClusterTaskKind {
    /// Nothing running.
    #[default]
    None,
    /// Being set up.
    Building,
    /// Moving slots.
    Migrating,
    /// Recovering from a failure.
    FailingOver,
}

/// The long operation attached to a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterTask {
    /// Kind.
    pub kind: ClusterTaskKind,
    /// Task id, if any.
    pub id: String,
    /// Human-readable progress.
    pub detail: String,
}

/// A cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Name.
    pub name: ClusterName,
    /// Unique id of this incarnation.
    pub uid: String,
    /// Tenant settings.
    pub config: ClusterConfig,
    /// Chunks in allocation order.
    pub chunks: Vec<Chunk>,
    /// Replication groups.
    pub shards: Vec<Shard>,
    /// Slot map sorted by range start, covering every slot once.
    pub slots: Vec<SlotAssignment>,
    /// Global epoch of the last change.
    pub epoch: Epoch,
    /// Running operation.
    pub task: ClusterTask,
    /// Creation time.
    pub created_at: SystemTime,
    /// Next shard id to hand out.
    pub next_shard_id: ShardId,
    /// Secret proxies of this cluster use to authenticate to each other.
    pub peer_secret: String,
}

/// What a proxy should make of one of its local Redis nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRole {
    /// Master of a shard: `REPLICAOF NO ONE`.
    Master {
        /// The shard.
        shard: ShardId,
    },
    /// Replica of a shard's master at `master`.
    Replica {
        /// The shard.
        shard: ShardId,
        /// Master node.
        master: NodeRef,
    },
    /// Not part of any shard (e.g. its proxy is free).
    Idle,
}

impl Cluster {
    /// Lays out a new cluster over `chunks`: in every chunk each proxy's node
    /// 0 is a master and its node 1 replicates the partner's master; slots
    /// are spread evenly over the masters in chunk order.
    pub fn new_layout(
        name: ClusterName,
        uid: String,
        peer_secret: String,
        config: ClusterConfig,
        chunks: Vec<Chunk>,
        epoch: Epoch,
        created_at: SystemTime,
    ) -> Result<Self, ModelError> {
        if chunks.is_empty() {
            return Err(ModelError::invalid(
                "node_count",
                "a cluster needs at least one chunk",
            ));
        }
        let shards: Vec<Shard> = chunks
            .iter()
            .enumerate()
            .flat_map(|(i, chunk)| chunk.shards(2 * i as ShardId))
            .collect();
        let slots = spread_evenly(shards.len())
            .into_iter()
            .zip(&shards)
            .map(|(range, shard)| SlotAssignment {
                range,
                shard: shard.id,
                migration: None,
            })
            .collect();
        let next_shard_id = shards.len() as ShardId;
        let cluster = Self {
            name,
            uid,
            config,
            chunks,
            shards,
            slots,
            epoch,
            task: ClusterTask::default(),
            created_at,
            next_shard_id,
            peer_secret,
        };
        cluster.check()?;
        Ok(cluster)
    }

    /// Number of Redis nodes (4 per chunk).
    pub fn node_count(&self) -> u32 {
        self.chunks.len() as u32 * NODES_PER_CHUNK
    }

    /// Every proxy of the cluster, in chunk order.
    pub fn proxy_ids(&self) -> impl Iterator<Item = &ProxyId> {
        self.chunks.iter().flat_map(|c| c.proxies.iter())
    }

    /// Whether `proxy` belongs to the cluster.
    pub fn has_proxy(&self, proxy: &ProxyId) -> bool {
        self.proxy_ids().any(|p| p == proxy)
    }

    /// The shard with id `id`.
    pub fn shard(&self, id: ShardId) -> Option<&Shard> {
        self.shards.iter().find(|s| s.id == id)
    }

    /// The assignment holding `slot`.
    pub fn assignment_of(&self, slot: Slot) -> Option<&SlotAssignment> {
        let idx = self.slots.partition_point(|a| a.range.end() < slot);
        self.slots.get(idx).filter(|a| a.range.contains(slot))
    }

    /// Proxy serving the master of shard `id`.
    pub fn master_proxy(&self, id: ShardId) -> Option<&ProxyId> {
        self.shard(id).map(|s| &s.master.proxy_id)
    }

    /// Whether shard `id` owns slots: it is the owner of a range, or a move
    /// into it reached `Commit` (all the range's keys are there). A shard
    /// only importing (`Prepare`, `Move`) holds copies its source deletes
    /// only once the shard's replica confirmed them, so before that replica
    /// first synced, nothing exists only in this shard.
    pub fn shard_owns_slots(&self, id: ShardId) -> bool {
        self.slots.iter().any(|a| {
            a.shard == id
                || a.migration
                    .as_ref()
                    .is_some_and(|m| m.target_shard == id && m.stage == MigrationStage::Commit)
        })
    }

    /// Slot ranges owned by each shard (migrating ranges count for their source).
    pub fn ranges_by_shard(&self) -> HashMap<ShardId, Vec<SlotRange>> {
        let mut out: HashMap<ShardId, Vec<SlotRange>> = HashMap::new();
        for a in &self.slots {
            out.entry(a.shard).or_default().push(a.range);
        }
        out
    }

    /// Roles of a proxy's two local nodes.
    pub fn node_roles(&self, proxy: &ProxyId) -> [NodeRole; 2] {
        let mut roles = [NodeRole::Idle, NodeRole::Idle];
        for shard in &self.shards {
            if &shard.master.proxy_id == proxy {
                roles[usize::from(shard.master.node_index)] = NodeRole::Master { shard: shard.id };
            }
            for r in shard.replicas.iter().filter(|r| &r.proxy_id == proxy) {
                roles[usize::from(r.node_index)] = NodeRole::Replica {
                    shard: shard.id,
                    master: shard.master.clone(),
                };
            }
        }
        roles
    }

    /// Checks the invariants of a stored cluster; `Corrupt` names the first
    /// violation.
    pub fn check(&self) -> Result<(), ModelError> {
        let corrupt = |what: String| {
            Err(ModelError::Corrupt(format!(
                "cluster {}: {what}",
                self.name
            )))
        };
        let mut proxies = HashSet::new();
        for chunk in &self.chunks {
            if chunk.proxies[0] == chunk.proxies[1] {
                return corrupt(format!("chunk uses proxy {} twice", chunk.proxies[0]));
            }
            for p in &chunk.proxies {
                if !proxies.insert(p) {
                    return corrupt(format!("proxy {p} is in two chunks"));
                }
            }
        }
        let mut nodes = HashSet::new();
        let mut shard_ids = BTreeSet::new();
        for shard in &self.shards {
            if !shard_ids.insert(shard.id) || shard.id >= self.next_shard_id {
                return corrupt(format!(
                    "shard id {} is duplicated or not below next_shard_id",
                    shard.id
                ));
            }
            for node in std::iter::once(&shard.master).chain(&shard.replicas) {
                if node.node_index > 1 || !proxies.contains(&node.proxy_id) {
                    return corrupt(format!(
                        "shard {} uses node {}/{} outside the cluster's chunks",
                        shard.id, node.proxy_id, node.node_index
                    ));
                }
                if !nodes.insert(node) {
                    return corrupt(format!(
                        "node {}/{} is in two shards",
                        node.proxy_id, node.node_index
                    ));
                }
            }
        }
        let mut next: u32 = 0;
        for a in &self.slots {
            if u32::from(a.range.start()) != next {
                return corrupt(format!("slot map has a gap or overlap at slot {next}"));
            }
            next = u32::from(a.range.end()) + 1;
            if !shard_ids.contains(&a.shard) {
                return corrupt(format!(
                    "slots {} belong to unknown shard {}",
                    a.range, a.shard
                ));
            }
            if let Some(m) = &a.migration {
                if !shard_ids.contains(&m.target_shard) || m.target_shard == a.shard {
                    return corrupt(format!(
                        "slots {} migrate to invalid shard {}",
                        a.range, m.target_shard
                    ));
                }
            }
        }
        if next != u32::from(SLOT_COUNT) {
            return corrupt(format!("slot map ends at {next}, not {SLOT_COUNT}"));
        }
        Ok(())
    }
}

/// Everything one proxy needs: its record, its cluster and the cluster's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyView {
    /// Proxy the view is for.
    pub proxy_id: ProxyId,
    /// Its record, if registered.
    pub proxy: Option<Proxy>,
    /// Its cluster, if allocated.
    pub cluster: Option<Cluster>,
    /// The cluster's proxies, sorted by id.
    pub members: Vec<Proxy>,
    /// Lowest epoch the view may carry: for a deregistered proxy, the epoch
    /// of its removal, so the epochs a subscriber sees never go back.
    pub floor_epoch: Epoch,
}

impl ProxyView {
    /// max(epoch of every record in the view): grows with any change to
    /// them because every change stamps a fresh global epoch.
    pub fn epoch(&self) -> Epoch {
        let own = self.proxy.as_ref().map_or(0, |p| p.epoch);
        let cluster = self.cluster.as_ref().map_or(0, |c| c.epoch);
        let members = self.members.iter().map(|p| p.epoch).max().unwrap_or(0);
        own.max(cluster).max(members).max(self.floor_epoch)
    }

    /// A member by id.
    pub fn member(&self, id: &ProxyId) -> Option<&Proxy> {
        self.members.iter().find(|p| p.id() == id)
    }
}

/// 40-hex node id shown in `CLUSTER NODES`/`MYID`: stable per proxy id, so
/// clients that cache ids keep working when addresses change.
pub fn node_id(proxy: &ProxyId) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(b"redmesh-proxy:");
    h.update(proxy.as_str().as_bytes());
    h.digest().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(s: &str) -> ProxyId {
        ProxyId::parse(s).unwrap()
    }

    fn two_chunks() -> Cluster {
        Cluster::new_layout(
            ClusterName::parse("c").unwrap(),
            "uid".into(),
            "secret".into(),
            ClusterConfig::default(),
            vec![
                Chunk {
                    proxies: [pid("a"), pid("b")],
                },
                Chunk {
                    proxies: [pid("c"), pid("d")],
                },
            ],
            7,
            SystemTime::UNIX_EPOCH,
        )
        .unwrap()
    }

    #[test]
    fn layout_pairs_masters_with_partner_replicas() {
        let c = two_chunks();
        assert_eq!(c.node_count(), 8);
        assert_eq!(c.shards.len(), 4);
        assert_eq!(c.slots.len(), 4);
        assert_eq!(c.slots[0].range.to_string(), "0-4095");
        assert_eq!(
            c.node_roles(&pid("a")),
            [
                NodeRole::Master { shard: 0 },
                NodeRole::Replica {
                    shard: 1,
                    master: NodeRef {
                        proxy_id: pid("b"),
                        node_index: 0
                    }
                }
            ]
        );
        assert_eq!(
            c.master_proxy(c.assignment_of(16383).unwrap().shard),
            Some(&pid("d"))
        );
        assert_eq!(c.assignment_of(4096).unwrap().shard, 1);
    }

    #[test]
    fn check_finds_gaps_and_unknown_shards() {
        let mut c = two_chunks();
        c.slots.pop();
        assert!(c.check().unwrap_err().to_string().contains("ends at"));
        let mut c = two_chunks();
        c.slots[1].shard = 99;
        assert!(c.check().unwrap_err().to_string().contains("unknown shard"));
        let mut c = two_chunks();
        c.chunks[1].proxies[0] = pid("a");
        assert!(c.check().is_err());
    }

    #[test]
    fn node_ids_are_stable_hex() {
        let id = node_id(&pid("proxy-1"));
        assert_eq!(id.len(), 40);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id, node_id(&pid("proxy-1")));
        assert_ne!(id, node_id(&pid("proxy-2")));
    }
}
