//! The checkers' votes, read from etcd at one moment: which checkers are
//! alive, and what each of them says about each target.
//!
//! A verdict counts only while its checker's presence record lives, and a
//! decision needs `quorum` agreeing checkers: at least the configured
//! minimum and a majority of the live ones. One checker that lost its
//! network therefore cannot fail anything over, and a dead checker's votes
//! vanish with its lease.

use std::collections::{BTreeMap, BTreeSet};

use redmesh_api::{convert, v1};
use redmesh_model::{Cluster, NodeRef, NodeRole, Proxy, ProxyId};
use redmesh_store::{Keys, MetaStore, StoreError};

/// Votes of the live checkers.
#[derive(Debug, Clone, Default)]
pub struct Votes {
    /// Live checkers.
    pub live: BTreeSet<String>,
    /// (checker, proxy) → that checker's record.
    records: BTreeMap<(String, String), v1::ProxyHealth>,
    /// Smallest number of agreeing checkers the configuration demands.
    min_votes: usize,
}

/// Counts of one target's verdicts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Checkers saying DOWN.
    pub down: usize,
    /// Checkers saying UP.
    pub up: usize,
    /// Checkers saying NOT_SERVING (it answers that it cannot serve).
    pub not_serving: usize,
}

impl Votes {
    /// Reads presence records and verdicts.
    pub async fn read(
        store: &dyn MetaStore,
        keys: &Keys,
        min_votes: usize,
    ) -> Result<Self, StoreError> {
        let checkers_prefix = keys.checkers();
        let health_prefix = keys.health();
        let (checkers, health) =
            futures::try_join!(store.list(&checkers_prefix), store.list(&health_prefix))?;
        let live: BTreeSet<String> = checkers
            .kvs
            .iter()
            .filter_map(|kv| Keys::suffix(&kv.key, &checkers_prefix).map(str::to_owned))
            .collect();
        let mut records = BTreeMap::new();
        for kv in &health.kvs {
            let Some(rest) = kv.key.strip_prefix(&health_prefix) else {
                continue;
            };
            let Some((checker, proxy)) = rest.split_once('/') else {
                continue;
            };
            if !live.contains(checker) {
                continue;
            }
            match convert::decode::<v1::ProxyHealth>(&kv.key, &kv.value) {
                Ok(rec) => {
                    records.insert((checker.to_owned(), proxy.to_owned()), rec);
                }
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "ignoring an unreadable verdict")
                }
            }
        }
        Ok(Self {
            live,
            records,
            min_votes,
        })
    }

    /// Agreeing checkers a decision needs.
    pub fn quorum(&self) -> usize {
        self.min_votes.max(self.live.len() / 2 + 1)
    }

    /// Verdicts on one target of `proxy` (`node` for Redis nodes).
    pub fn tally(&self, proxy: &ProxyId, kind: v1::TargetKind, node: u32) -> Tally {
        let mut t = Tally::default();
        for ((_, p), rec) in &self.records {
            if p != proxy.as_str() {
                continue;
            }
            for target in &rec.targets {
                if target.kind() == kind
                    && (kind != v1::TargetKind::RedisNode || target.node_index == node)
                {
                    match target.status() {
                        v1::HealthStatus::Down => t.down += 1,
                        v1::HealthStatus::Up => t.up += 1,
                        v1::HealthStatus::NotServing => t.not_serving += 1,
                        v1::HealthStatus::Unspecified => {}
                    }
                }
            }
        }
        t
    }

    fn down(&self, proxy: &ProxyId, kind: v1::TargetKind, node: u32) -> Option<usize> {
        let t = self.tally(proxy, kind, node);
        (t.down >= self.quorum()).then_some(t.down)
    }

    /// Why `proxy` must be failed out of `cluster`, if it must: its RESP
    /// listener, or a Redis node that is a master in the cluster, is DOWN
    /// for a quorum, or the proxy answers a quorum that it cannot serve
    /// (admin health NOT_SERVING: a master node of its lost its shard's
    /// data, which its replica holds). A dead replica node alone fails
    /// nothing over: the masters keep serving and the proxy re-applies the
    /// role when the node returns. An admin server that does not answer
    /// fails nothing over either (only a proxy's own word does): a
    /// misconfigured admin port must not take every proxy out.
    pub fn failure(&self, proxy: &ProxyId, cluster: &Cluster) -> Option<String> {
        let of = self.live.len();
        if let Some(n) = self.down(proxy, v1::TargetKind::ProxyResp, 0) {
            return Some(format!(
                "RESP listener of proxy {proxy} is down ({n} of {of} checkers)"
            ));
        }
        let n = self.tally(proxy, v1::TargetKind::ProxyAdmin, 0).not_serving;
        if n >= self.quorum() {
            return Some(format!(
                "proxy {proxy} answers that it cannot serve (health NOT_SERVING, {n} of {of} \
                 checkers): a master node of its lost its shard's data"
            ));
        }
        for (i, role) in cluster.node_roles(proxy).iter().enumerate() {
            if let NodeRole::Master { shard } = role {
                if let Some(n) = self.down(proxy, v1::TargetKind::RedisNode, i as u32) {
                    return Some(format!(
                        "master node {i} (shard {shard}) of proxy {proxy} is down ({n} of {of} checkers)"
                    ));
                }
            }
        }
        None
    }

    /// Whether a node may take over as master: its proxy's listener and the
    /// node itself are not DOWN for a quorum.
    pub fn usable(&self, node: &NodeRef) -> bool {
        self.down(&node.proxy_id, v1::TargetKind::ProxyResp, 0)
            .is_none()
            && self
                .down(
                    &node.proxy_id,
                    v1::TargetKind::RedisNode,
                    u32::from(node.node_index),
                )
                .is_none()
    }

    /// Whether a free proxy is fit to join a cluster: a quorum sees all
    /// four of its targets UP.
    pub fn healthy(&self, proxy: &Proxy) -> bool {
        let q = self.quorum();
        let id = proxy.id();
        [
            (v1::TargetKind::ProxyResp, 0),
            (v1::TargetKind::ProxyAdmin, 0),
            (v1::TargetKind::RedisNode, 0),
            (v1::TargetKind::RedisNode, 1),
        ]
        .iter()
        .all(|(k, n)| self.tally(id, *k, *n).up >= q)
    }
}
