//! The redmesh domain model: hash slots, proxies, clusters and the allocation
//! planner. Pure values and functions only — no I/O, no generated types — so
//! the rules of the system can be tested in isolation.

mod allocate;
mod cluster;
pub mod failover;
mod names;
mod proxy;
pub mod scale;
pub mod slots;

pub use allocate::pick_chunks;
pub use cluster::{
    node_id, password_digest, Chunk, ClientMode, Cluster, ClusterConfig, ClusterTask,
    ClusterTaskKind, Compression, Durability, MigrationStage, NodeRef, NodeRole, ProxyView, Shard,
    ShardId, SlotAssignment, SlotMigration, NODES_PER_CHUNK,
};
pub use names::{Address, ClusterName, HostName, ProxyId};
pub use proxy::{Proxy, ProxySpec, ProxyState};
pub use slots::{key_slot, Slot, SlotRange, SLOT_COUNT};

/// Global metadata epoch: bumped by every metadata transaction, so any
/// record's epoch is newer than every record written before it.
pub type Epoch = u64;

/// Errors of domain rules, mapped one-to-one onto gRPC status codes at the API edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A request field is malformed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field, as named in the API.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A named thing does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// "cluster", "proxy", …
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A thing with this name exists already.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// "cluster", "proxy", …
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The operation is refused in the current state; the text says why.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Stored metadata violates an invariant.
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
    /// A valid request for something this version does not do yet.
    #[error("{0}")]
    Unsupported(String),
}

impl ModelError {
    /// An `InvalidArgument` for `field`.
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}
