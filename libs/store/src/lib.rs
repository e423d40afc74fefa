//! Metadata store abstraction: the small slice of etcd's API redmesh needs
//! (get, prefix list, compare-and-swap transactions, watch from a revision,
//! leases), with a real etcd implementation and an in-memory twin that obey
//! one conformance suite. Election is built on top of the trait, so both
//! implementations share it.
//!
//! The trait moves bytes and revisions only; `meta` adds the typed layer
//! (protobuf records, epoch-guarded commits) the services share.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

mod changes;
pub mod conformance;
mod election;
mod etcd;
mod keys;
mod lease;
mod mem;
pub mod meta;

pub use changes::changes;
pub use election::{Election, Leadership};
pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use keys::Keys;
pub use lease::LeaseKeeper;
pub use mem::MemStore;
pub use meta::{Change, MetaError, MetaRepo, Snapshot};

/// An etcd revision: a global, growing counter of changes.
pub type Revision = i64;
/// Lease identifier.
pub type LeaseId = i64;

/// A stored key and its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Key.
    pub key: String,
    /// Value (empty for delete events).
    pub value: Bytes,
    /// Revision of the key's creation.
    pub create_revision: Revision,
    /// Revision of the key's last change.
    pub mod_revision: Revision,
    /// Number of changes since creation (0 means absent).
    pub version: i64,
    /// Attached lease, 0 if none.
    pub lease: LeaseId,
}

/// Keys under a prefix together with the store revision they were read at.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Keys sorted by key.
    pub kvs: Vec<KeyValue>,
    /// Revision of the snapshot; watch from `revision + 1` to miss nothing.
    pub revision: Revision,
}

/// Comparison operator of a transaction guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
    /// `>`
    Greater,
    /// `<`
    Less,
}

/// What a transaction guard compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's version (0 = absent).
    Version(i64),
    /// The key's creation revision (0 = absent).
    CreateRevision(Revision),
    /// The key's last modification revision (0 = absent).
    ModRevision(Revision),
    /// The key's value.
    Value(Bytes),
}

/// A transaction guard on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// Key compared.
    pub key: String,
    /// Operator.
    pub op: CompareOp,
    /// Operand.
    pub target: CompareTarget,
}

impl Compare {
    /// The key was last modified at `revision` (0: the key is absent).
    pub fn mod_revision(key: impl Into<String>, revision: Revision) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::ModRevision(revision),
        }
    }

    /// The key does not exist.
    pub fn missing(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Version(0),
        }
    }

    /// The key exists.
    pub fn exists(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            op: CompareOp::Greater,
            target: CompareTarget::Version(0),
        }
    }

    /// Evaluates the guard against the key's current state (`None`: absent),
    /// with etcd's semantics: a value comparison on a missing key is false.
    pub fn holds_for(&self, kv: Option<&KeyValue>) -> bool {
        let ord = match &self.target {
            CompareTarget::Version(v) => kv.map_or(0, |kv| kv.version).cmp(v),
            CompareTarget::CreateRevision(r) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
            CompareTarget::ModRevision(r) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
            CompareTarget::Value(v) => match kv {
                Some(kv) => kv.value.as_ref().cmp(v.as_ref()),
                None => return false,
            },
        };
        match self.op {
            CompareOp::Equal => ord.is_eq(),
            CompareOp::NotEqual => ord.is_ne(),
            CompareOp::Greater => ord.is_gt(),
            CompareOp::Less => ord.is_lt(),
        }
    }
}

/// One operation of a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write a key, optionally attached to a lease.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Bytes,
        /// Lease to attach.
        lease: Option<LeaseId>,
    },
    /// Delete a key (no error if absent).
    Delete {
        /// Key.
        key: String,
    },
    /// Read a key.
    Get {
        /// Key.
        key: String,
    },
}

impl Op {
    /// A put without lease.
    pub fn put(key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        Self::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    /// A delete.
    pub fn delete(key: impl Into<String>) -> Self {
        Self::Delete { key: key.into() }
    }

    /// A read.
    pub fn get(key: impl Into<String>) -> Self {
        Self::Get { key: key.into() }
    }
}

/// A compare-and-swap transaction: if every guard holds, run `success`,
/// else `failure`. Atomic: all or nothing, one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Guards (all must hold).
    pub compares: Vec<Compare>,
    /// Operations when they hold.
    pub success: Vec<Op>,
    /// Operations when one fails.
    pub failure: Vec<Op>,
}

/// Outcome of a transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the guards held.
    pub succeeded: bool,
    /// Store revision after the transaction.
    pub revision: Revision,
    /// Results of the executed branch's `Get`s, in order.
    pub gets: Vec<Option<KeyValue>>,
}

/// Kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created or updated.
    Put,
    /// Deleted (also by lease expiry).
    Delete,
}

/// One change of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// Kind.
    pub kind: EventKind,
    /// The key after the change (for deletes: key and `mod_revision` only).
    pub kv: KeyValue,
}

/// Changes of one or more consecutive revisions, in order (etcd packs
/// several revisions into one response when a watch catches up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// Newest revision of the changes: resume a watch from `revision + 1`.
    pub revision: Revision,
    /// Changes under the watched prefix.
    pub events: Vec<WatchEvent>,
}

/// A stream of changes; it ends after the first error.
pub type WatchStream = BoxStream<'static, Result<WatchBatch, StoreError>>;

/// Store failures. All say what failed; none is a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or timed out; retry later.
    #[error("metadata store unavailable: {0}")]
    Unavailable(String),
    /// A watch asked for history that was compacted; resync from a snapshot.
    #[error(
        "watch history from revision {requested} is compacted (oldest kept: {compact_revision})"
    )]
    Compacted {
        /// Revision asked for.
        requested: Revision,
        /// Oldest revision still available.
        compact_revision: Revision,
    },
    /// The lease expired or never existed.
    #[error("lease {0:x} not found or expired")]
    LeaseNotFound(LeaseId),
    /// The store refused the request.
    #[error("metadata store rejected the request: {0}")]
    Rejected(String),
}

/// The metadata store: what redmesh needs of etcd.
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Reads a key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Reads every key starting with `prefix`, sorted, with the snapshot revision.
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError>;
    /// Writes a key; returns the new revision.
    async fn put(
        &self,
        key: &str,
        value: Bytes,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError>;
    /// Deletes a key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Runs a compare-and-swap transaction.
    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError>;
    /// Streams changes under `prefix` starting at revision `from` (inclusive;
    /// 0 means from now on).
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;
    /// Grants a lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Refreshes a lease; returns its TTL, or `LeaseNotFound` if it expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError>;
    /// Revokes a lease, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Drops history older than `revision` (watches from before it fail
    /// with `Compacted`).
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;
}
