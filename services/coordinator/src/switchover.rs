//! Graceful switchover: move mastership off a proxy without losing a write.
//!
//! For each shard the proxy masters: pause writes on the master
//! (`CLIENT PAUSE … WRITE`, with a deadline so a crash here cannot leave it
//! paused), wait until the replica has processed the master's whole
//! replication stream, commit the role swap, demote the old master to a
//! replica of the new one *before* unpausing it — so writes held by the
//! pause fail with `READONLY` instead of landing on a node that is about to
//! be resynchronised — and only then unpause.

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redmesh_model::{failover::switch_roles, Address, ClusterName, ModelError, ProxyId};
use redmesh_store::{Change, Leadership, MetaError, MetaRepo};

use crate::leader::Committed;

/// Longest time writes stay paused; also Redis's own deadline for the pause.
const PAUSE: Duration = Duration::from_secs(5);

/// Switchover failures.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// A Redis node could not be reached or refused a command.
    #[error("redis node {addr}: {msg}")]
    Node {
        /// Node address.
        addr: String,
        /// What failed.
        msg: String,
    },
    /// The replica did not catch up in time; nothing was changed.
    #[error(
        "replica {replica} did not catch up with master {master} within {PAUSE:?}; nothing changed"
    )]
    Lagging {
        /// Replica address.
        replica: String,
        /// Master address.
        master: String,
    },
    /// Metadata refused or failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
}

struct Pair {
    master: Address,
    replica: Address,
    conn: MultiplexedConnection,
}

async fn connect(addr: &Address) -> Result<MultiplexedConnection, SwitchError> {
    let node_err = |e: redis::RedisError| SwitchError::Node {
        addr: addr.to_string(),
        msg: e.to_string(),
    };
    let client = redis::Client::open(format!("redis://{addr}/")).map_err(node_err)?;
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(2)));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(node_err)
}

async fn run(
    conn: &mut MultiplexedConnection,
    addr: &Address,
    cmd: &redis::Cmd,
) -> Result<redis::Value, SwitchError> {
    cmd.query_async(conn).await.map_err(|e| SwitchError::Node {
        addr: addr.to_string(),
        msg: e.to_string(),
    })
}

/// `master_repl_offset` from `INFO replication`: on a master, how far its
/// stream reaches; on a replica, how far it has processed it.
async fn offset(addr: &Address) -> Result<i64, SwitchError> {
    let mut conn = connect(addr).await?;
    let info = run(&mut conn, addr, redis::cmd("INFO").arg("replication")).await?;
    let text: String = redis::from_redis_value(info).map_err(|e| SwitchError::Node {
        addr: addr.to_string(),
        msg: e.to_string(),
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("master_repl_offset:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| SwitchError::Node {
            addr: addr.to_string(),
            msg: "INFO replication lacks master_repl_offset".into(),
        })
}

/// Commits the role swap of every shard `pid` masters, guarded by the
/// leadership: the whole of a forced switch, the middle step of a graceful one.
pub async fn commit_switch(
    repo: &MetaRepo,
    leadership: &Leadership,
    name: &ClusterName,
    pid: &ProxyId,
) -> Result<Committed, MetaError> {
    repo.update_guarded(vec![leadership.guard()], |snap, epoch| {
        let cluster = snap
            .clusters
            .get(name)
            .ok_or_else(|| ModelError::FailedPrecondition(format!("cluster {name} is gone")))?;
        let (next, promoted) = switch_roles(cluster, pid)?;
        Ok((
            Change {
                put_clusters: vec![next],
                ..Change::default()
            },
            Committed { epoch, promoted },
        ))
    })
    .await
}

/// Switches every shard `pid` masters in `name` to its replica, gracefully.
pub async fn switchover(
    repo: &MetaRepo,
    leadership: &Leadership,
    name: &ClusterName,
    pid: &ProxyId,
) -> Result<Committed, SwitchError> {
    let snap = repo.snapshot().await?;
    let cluster = snap.clusters.get(name).ok_or_else(|| {
        MetaError::Model(ModelError::FailedPrecondition(format!(
            "cluster {name} is gone"
        )))
    })?;
    // Validates there is something to switch, before pausing anything.
    let (_, promoted) = switch_roles(cluster, pid).map_err(MetaError::Model)?;
    let addr_of = |proxy: &ProxyId, node: u8| -> Result<Address, SwitchError> {
        snap.proxies
            .get(proxy)
            .and_then(|p| p.node_address(node))
            .cloned()
            .ok_or_else(|| {
                MetaError::Model(ModelError::Corrupt(format!(
                    "node {proxy}/{node} has no address"
                )))
                .into()
            })
    };
    let mut pairs = Vec::new();
    for (shard, new_master) in &promoted {
        let old = cluster
            .shard(*shard)
            .map(|s| s.master.clone())
            .ok_or_else(|| {
                MetaError::Model(ModelError::Corrupt(format!("shard {shard} vanished")))
            })?;
        let master = addr_of(&old.proxy_id, old.node_index)?;
        let replica = addr_of(&new_master.proxy_id, new_master.node_index)?;
        let conn = connect(&master).await?;
        pairs.push(Pair {
            master,
            replica,
            conn,
        });
    }
    let pause_ms = PAUSE.as_millis().to_string();
    for p in &mut pairs {
        run(
            &mut p.conn,
            &p.master,
            redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(&pause_ms)
                .arg("WRITE"),
        )
        .await?;
    }
    let outcome = async {
        let deadline = Instant::now() + PAUSE - Duration::from_millis(500);
        for p in &pairs {
            let target = offset(&p.master).await?;
            loop {
                if offset(&p.replica).await? >= target {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(SwitchError::Lagging {
                        replica: p.replica.to_string(),
                        master: p.master.to_string(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let committed = commit_switch(repo, leadership, name, pid).await?;
        for p in &mut pairs {
            run(
                &mut p.conn,
                &p.master,
                redis::cmd("REPLICAOF")
                    .arg(p.replica.host())
                    .arg(p.replica.port()),
            )
            .await?;
        }
        Ok(committed)
    }
    .await;
    for p in &mut pairs {
        if let Err(e) = run(&mut p.conn, &p.master, redis::cmd("CLIENT").arg("UNPAUSE")).await {
            tracing::warn!(error = %e, "could not unpause; the pause ends by itself after {PAUSE:?}");
        }
    }
    outcome
}

/// After a failover, best effort: turns the failed proxy's nodes that still
/// replicate into stand-alone nodes (their data is kept). A proxy can fail
/// while its Redis nodes live on (the process crashed, hung or was paused);
/// such a node stays attached to a healthy master next to the replacement
/// replica, and `WAIT 1` on that master could then be answered by it, not
/// by the replica a failover would promote. Nothing is lost if this fails:
/// the proxy detaches them itself when it runs again and reads that it
/// failed.
pub async fn detach_replicas(nodes: [Address; 2]) {
    for addr in &nodes {
        let outcome = async {
            let mut conn = connect(addr).await?;
            let role = run(&mut conn, addr, &redis::cmd("ROLE")).await?;
            let is_replica = matches!(&role, redis::Value::Array(items)
                if matches!(items.first(), Some(redis::Value::BulkString(r)) if r.as_slice() == b"slave"));
            if is_replica {
                run(&mut conn, addr, redis::cmd("REPLICAOF").arg("NO").arg("ONE")).await?;
            }
            Ok::<_, SwitchError>(is_replica)
        }
        .await;
        match outcome {
            Ok(true) => {
                tracing::info!(node = %addr, "detached a failed proxy's replica node from its master")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(node = %addr, error = %e, "could not reach a failed proxy's node")
            }
        }
    }
}
