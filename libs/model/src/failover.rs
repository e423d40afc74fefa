//! Failover as pure cluster transformations: promoting replicas away from a
//! failed proxy, swapping roles for a manual failover, and filling the hole
//! a failed proxy leaves in its chunk with a proxy from the pool.
//!
//! The coordinator decides *when*; these functions decide *what*, so every
//! rule (which replica, which node of the newcomer replicates what) is
//! testable without etcd or processes.

use crate::{Chunk, Cluster, ModelError, NodeRef, ProxyId, ShardId};

/// What [`fail_proxy`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverOutcome {
    /// The cluster with replicas promoted and the failed proxy's nodes gone
    /// from every shard. The proxy stays in its chunk as a hole.
    pub cluster: Cluster,
    /// Shards whose master moved, with the promoted node.
    pub promoted: Vec<(ShardId, NodeRef)>,
    /// Shards that lost a replica on the failed proxy.
    pub lost_replicas: Vec<ShardId>,
}

/// Takes `failed` out of every shard of `cluster`: each shard it masters is
/// taken over by its first replica on a proxy `usable` accepts, and its
/// replicas are dropped. Refused (nothing changes) if a shard it masters has
/// no usable replica: promoting nothing would only make its slots
/// unreachable for good, while waiting keeps them for when the proxy returns.
pub fn fail_proxy(
    cluster: &Cluster,
    failed: &ProxyId,
    usable: impl Fn(&NodeRef) -> bool,
) -> Result<FailoverOutcome, ModelError> {
    if !cluster.has_proxy(failed) {
        return Err(ModelError::FailedPrecondition(format!(
            "proxy {failed} is not part of cluster {}",
            cluster.name
        )));
    }
    let mut next = cluster.clone();
    let mut promoted = Vec::new();
    let mut lost_replicas = Vec::new();
    for shard in &mut next.shards {
        let before = shard.replicas.len();
        shard.replicas.retain(|r| &r.proxy_id != failed);
        if shard.replicas.len() != before {
            lost_replicas.push(shard.id);
        }
        if &shard.master.proxy_id == failed {
            let Some(pos) = shard.replicas.iter().position(&usable) else {
                return Err(ModelError::FailedPrecondition(format!(
                    "shard {} of cluster {} has no live replica to promote; its slots stay with \
                     proxy {failed} until it or its chunk partner returns",
                    shard.id, cluster.name
                )));
            };
            shard.master = shard.replicas.remove(pos);
            promoted.push((shard.id, shard.master.clone()));
        }
    }
    next.check()?;
    Ok(FailoverOutcome {
        cluster: next,
        promoted,
        lost_replicas,
    })
}

/// Swaps master and replica of every shard `proxy` masters, keeping every
/// node in the cluster: the manual failover that keeps the proxy.
pub fn switch_roles(
    cluster: &Cluster,
    proxy: &ProxyId,
) -> Result<(Cluster, Vec<(ShardId, NodeRef)>), ModelError> {
    let mut next = cluster.clone();
    let mut promoted = Vec::new();
    for shard in next
        .shards
        .iter_mut()
        .filter(|s| &s.master.proxy_id == proxy)
    {
        let Some(pos) = shard.replicas.iter().position(|r| &r.proxy_id != proxy) else {
            return Err(ModelError::FailedPrecondition(format!(
                "shard {} has no replica on another proxy to take over",
                shard.id
            )));
        };
        let new_master = shard.replicas.remove(pos);
        let old = std::mem::replace(&mut shard.master, new_master);
        shard.replicas.insert(pos, old);
        promoted.push((shard.id, shard.master.clone()));
    }
    if promoted.is_empty() {
        return Err(ModelError::FailedPrecondition(format!(
            "proxy {proxy} masters no shard of cluster {}; nothing to fail over",
            cluster.name
        )));
    }
    next.check()?;
    Ok((next, promoted))
}

/// The chunk partner of `proxy` in `cluster`.
pub fn partner_of<'a>(cluster: &'a Cluster, proxy: &ProxyId) -> Option<&'a ProxyId> {
    cluster.chunks.iter().find_map(|c| match &c.proxies {
        [a, b] if a == proxy => Some(b),
        [a, b] if b == proxy => Some(a),
        _ => None,
    })
}

/// Puts `newcomer` in `hole`'s place in its chunk. Its two nodes become
/// replicas of the chunk's shards that have none, node 0 first, so the
/// chunk is back to one master and one replica per shard on two hosts.
/// `hole` must already be out of every shard ([`fail_proxy`]).
pub fn replace_proxy(
    cluster: &Cluster,
    hole: &ProxyId,
    newcomer: &ProxyId,
) -> Result<Cluster, ModelError> {
    let Some(partner) = partner_of(cluster, hole).cloned() else {
        return Err(ModelError::FailedPrecondition(format!(
            "proxy {hole} is not part of cluster {}",
            cluster.name
        )));
    };
    // The hole's own proxy may come back through the pool and fill it.
    if newcomer != hole && cluster.has_proxy(newcomer) {
        return Err(ModelError::FailedPrecondition(format!(
            "proxy {newcomer} already serves cluster {}",
            cluster.name
        )));
    }
    let mut next = cluster.clone();
    if next.shards.iter().any(|s| {
        std::iter::once(&s.master)
            .chain(&s.replicas)
            .any(|n| &n.proxy_id == hole)
    }) {
        return Err(ModelError::FailedPrecondition(format!(
            "proxy {hole} still holds nodes of cluster {}; fail it over first",
            cluster.name
        )));
    }
    for chunk in &mut next.chunks {
        if let Some(slot) = chunk.proxies.iter_mut().find(|p| *p == hole) {
            *slot = newcomer.clone();
        }
    }
    let mut free_nodes = [0u8, 1].into_iter();
    for shard in next
        .shards
        .iter_mut()
        .filter(|s| s.master.proxy_id == partner && s.replicas.is_empty())
    {
        let Some(node_index) = free_nodes.next() else {
            return Err(ModelError::Corrupt(format!(
                "chunk of {partner} has more than two shards without replicas"
            )));
        };
        shard.replicas.push(NodeRef {
            proxy_id: newcomer.clone(),
            node_index,
        });
    }
    next.check()?;
    Ok(next)
}

/// Chunk members `is_member` rejects: holes left by failed or removed proxies.
pub fn holes(cluster: &Cluster, is_member: impl Fn(&ProxyId) -> bool) -> Vec<(ProxyId, ProxyId)> {
    cluster
        .chunks
        .iter()
        .flat_map(|Chunk { proxies: [a, b] }| [(a, b), (b, a)])
        .filter(|(p, _)| !is_member(p))
        .map(|(p, partner)| (p.clone(), partner.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{ClusterConfig, ClusterName, NodeRole};

    fn pid(s: &str) -> ProxyId {
        ProxyId::parse(s).unwrap()
    }

    fn one_chunk() -> Cluster {
        Cluster::new_layout(
            ClusterName::parse("c").unwrap(),
            "uid".into(),
            "s".into(),
            ClusterConfig::default(),
            vec![Chunk {
                proxies: [pid("a"), pid("b")],
            }],
            1,
            SystemTime::UNIX_EPOCH,
        )
        .unwrap()
    }

    #[test]
    fn failing_a_proxy_promotes_its_partner_and_replacement_restores_redundancy() {
        let c = one_chunk();
        let out = fail_proxy(&c, &pid("a"), |_| true).unwrap();
        assert_eq!(
            out.promoted,
            vec![(
                0,
                NodeRef {
                    proxy_id: pid("b"),
                    node_index: 1
                }
            )]
        );
        assert_eq!(out.lost_replicas, vec![1]);
        // b now masters both shards, with no replicas; a is a hole.
        assert!(out
            .cluster
            .shards
            .iter()
            .all(|s| s.master.proxy_id == pid("b")));
        assert!(out.cluster.shards.iter().all(|s| s.replicas.is_empty()));
        assert_eq!(
            holes(&out.cluster, |p| p != &pid("a")),
            vec![(pid("a"), pid("b"))]
        );

        let r = replace_proxy(&out.cluster, &pid("a"), &pid("n")).unwrap();
        assert_eq!(r.chunks[0].proxies, [pid("n"), pid("b")]);
        let roles = r.node_roles(&pid("n"));
        assert!(roles.iter().all(
            |role| matches!(role, NodeRole::Replica { master, .. } if master.proxy_id == pid("b"))
        ));
        assert_ne!(roles[0], roles[1]);
        assert!(r.shards.iter().all(|s| s.replicas.len() == 1));
    }

    #[test]
    fn no_promotion_without_a_usable_replica() {
        let c = one_chunk();
        let e = fail_proxy(&c, &pid("a"), |n| n.proxy_id != pid("b")).unwrap_err();
        assert!(e.to_string().contains("no live replica"), "{e}");
    }

    #[test]
    fn replacing_requires_the_hole_to_be_failed_over_first() {
        let c = one_chunk();
        let e = replace_proxy(&c, &pid("a"), &pid("n")).unwrap_err();
        assert!(e.to_string().contains("fail it over first"), "{e}");
        let e = replace_proxy(&c, &pid("x"), &pid("n")).unwrap_err();
        assert!(e.to_string().contains("not part"), "{e}");
    }

    #[test]
    fn switching_roles_keeps_every_node() {
        let c = one_chunk();
        let (s, promoted) = switch_roles(&c, &pid("a")).unwrap();
        assert_eq!(promoted.len(), 1);
        let shard0 = s.shard(0).unwrap();
        assert_eq!(shard0.master.proxy_id, pid("b"));
        assert_eq!(shard0.replicas[0].proxy_id, pid("a"));
        // b now masters both shards; switching it hands both to a.
        let (back, promoted) = switch_roles(&s, &pid("b")).unwrap();
        assert_eq!(promoted.len(), 2);
        assert!(back.shards.iter().all(|s| s.master.proxy_id == pid("a")));
        // A proxy that masters nothing has nothing to switch.
        let failed = fail_proxy(&c, &pid("a"), |_| true).unwrap().cluster;
        assert!(switch_roles(&failed, &pid("a")).is_err());
    }
}
