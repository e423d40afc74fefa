//! Planning and starting a scale task: which chunks join or leave, which
//! slot ranges move where (with key and byte estimates from the source
//! nodes), and the one transaction that records the task, allocates the new
//! chunks and marks the cluster as migrating.

use std::collections::HashMap;
use std::time::SystemTime;

use bytes::Bytes;
use prost::Message;
use redmesh_api::convert::{self, status_of};
use redmesh_api::v1::{self, MigrationPhase, MigrationState};
use redmesh_model::scale::{check_node_count, plan_moves, Move};
use redmesh_model::{
    pick_chunks, Chunk, Cluster, ClusterName, ClusterTask, ClusterTaskKind, ModelError, Proxy,
    ProxyState, SlotRange,
};
use redmesh_store::{Change, MetaError, MetaRepo, Snapshot};
use tonic::Status;

use crate::proxies::ProxyClients;
use crate::tasks::Tasks;

/// A scale plan over model types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Node count before.
    pub from_nodes: u32,
    /// Node count after.
    pub to_nodes: u32,
    /// Chunks joining (free now).
    pub added: Vec<Chunk>,
    /// Chunks leaving at the end.
    pub removed: Vec<Chunk>,
    /// Moves in execution order.
    pub moves: Vec<Move>,
    /// The cluster with the added chunks (what the moves apply to).
    pub cluster: Cluster,
}

/// Plans scaling `cluster` to `node_count` nodes against `snap`.
pub fn plan(snap: &Snapshot, cluster: &Cluster, node_count: u32) -> Result<Plan, ModelError> {
    let want = check_node_count(node_count)?;
    if cluster.task.kind != ClusterTaskKind::None {
        return Err(ModelError::FailedPrecondition(format!(
            "cluster {} is busy ({:?} {}); wait for it to finish",
            cluster.name, cluster.task.kind, cluster.task.id
        )));
    }
    let have = cluster.chunks.len();
    let (added, removed) = if want > have {
        (pick_chunks(snap.proxies.values(), want - have)?, Vec::new())
    } else {
        (Vec::new(), cluster.chunks[want..].to_vec())
    };
    let grown = cluster.with_chunks(&added)?;
    let moves = plan_moves(&grown, &removed)?;
    Ok(Plan {
        from_nodes: cluster.node_count(),
        to_nodes: node_count,
        added,
        removed,
        moves,
        cluster: grown,
    })
}

/// The API form of a chunk.
pub fn chunk_v1(c: &Chunk) -> v1::Chunk {
    v1::Chunk {
        proxy_ids: c.proxies.iter().map(ToString::to_string).collect(),
    }
}

/// The model form of an API chunk.
pub fn chunk_model(c: &v1::Chunk) -> Result<Chunk, ModelError> {
    match c.proxy_ids.as_slice() {
        [a, b] => Ok(Chunk {
            proxies: [
                redmesh_model::ProxyId::parse_field("chunk.proxy_ids", a)?,
                redmesh_model::ProxyId::parse_field("chunk.proxy_ids", b)?,
            ],
        }),
        _ => Err(ModelError::Corrupt("a chunk needs two proxies".into())),
    }
}

/// A planned move in API form, with estimates.
pub fn move_v1(cluster: &Cluster, m: &Move, estimate: (u64, u64)) -> v1::PlannedMove {
    let proxy = |shard| {
        cluster
            .master_proxy(shard)
            .map(ToString::to_string)
            .unwrap_or_default()
    };
    v1::PlannedMove {
        range: Some(m.range.into()),
        from_shard_id: m.from,
        to_shard_id: m.to,
        from_proxy_id: proxy(m.from),
        to_proxy_id: proxy(m.to),
        estimated_keys: estimate.0,
        estimated_bytes: estimate.1,
    }
}

/// The model form of a planned move.
pub fn move_model(m: &v1::PlannedMove) -> Result<Move, ModelError> {
    let r = m
        .range
        .as_ref()
        .ok_or_else(|| ModelError::Corrupt("planned move without a range".into()))?;
    Ok(Move {
        range: SlotRange::new(r.start, r.end)?,
        from: m.from_shard_id,
        to: m.to_shard_id,
    })
}

/// The plan in API form.
pub fn plan_v1(p: &Plan, estimates: &HashMap<SlotRange, (u64, u64)>) -> v1::ScalePlan {
    v1::ScalePlan {
        from_node_count: p.from_nodes,
        to_node_count: p.to_nodes,
        added_chunks: p.added.iter().map(chunk_v1).collect(),
        removed_chunks: p.removed.iter().map(chunk_v1).collect(),
        moves: p
            .moves
            .iter()
            .map(|m| {
                move_v1(
                    &p.cluster,
                    m,
                    estimates.get(&m.range).copied().unwrap_or((0, 0)),
                )
            })
            .collect(),
    }
}

/// Estimates keys and bytes per move from the source master's size, in
/// proportion to the slots moved.
pub async fn estimate(
    snap: &Snapshot,
    p: &Plan,
    proxies: &ProxyClients,
) -> HashMap<SlotRange, (u64, u64)> {
    let owned = p.cluster.ranges_by_shard();
    let mut out = HashMap::new();
    for m in &p.moves {
        let Some(shard) = p.cluster.shard(m.from) else {
            continue;
        };
        let Some(proxy) = snap.proxies.get(&shard.master.proxy_id) else {
            continue;
        };
        let Some((keys, bytes)) = proxies
            .node_size(proxy.spec.admin_address.as_str(), shard.master.node_index)
            .await
        else {
            continue;
        };
        let slots: usize = owned
            .get(&m.from)
            .map_or(0, |rs| rs.iter().map(SlotRange::len).sum());
        if slots == 0 {
            continue;
        }
        let share = m.range.len() as f64 / slots as f64;
        out.insert(
            m.range,
            (
                (keys as f64 * share).round() as u64,
                (bytes as f64 * share).round() as u64,
            ),
        );
    }
    out
}

/// The outcome of a start request.
#[derive(Debug, Clone)]
pub struct Started {
    /// The plan.
    pub plan: v1::ScalePlan,
    /// The task, unless a dry run or nothing to do.
    pub task: Option<v1::MigrationTask>,
}

fn meta_status(e: MetaError) -> Status {
    match e {
        MetaError::Model(m) => status_of(&m),
        other => redmesh_runtime::grpc::meta_status(other),
    }
}

/// Plans and (unless `dry_run`) records a scale task.
pub async fn start(
    repo: &MetaRepo,
    tasks: &Tasks,
    proxies: &ProxyClients,
    name: &ClusterName,
    node_count: u32,
    dry_run: bool,
    rate: v1::MigrationRate,
) -> Result<Started, Status> {
    check_node_count(node_count).map_err(|e| status_of(&e))?;
    let snap = repo.snapshot().await.map_err(meta_status)?;
    let cluster = snap
        .clusters
        .get(name)
        .ok_or_else(|| Status::not_found(format!("cluster {name:?} not found")))?;
    let first = plan(&snap, cluster, node_count).map_err(|e| status_of(&e))?;
    let estimates = estimate(&snap, &first, proxies).await;
    let plan_out = plan_v1(&first, &estimates);
    if dry_run || first.moves.is_empty() && first.added.is_empty() && first.removed.is_empty() {
        return Ok(Started {
            plan: plan_out,
            task: None,
        });
    }
    let id = format!("m{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let now = convert::timestamp(SystemTime::now());
    let trace_parent = redmesh_runtime::trace_context::current_traceparent();
    let task = repo
        .update(|snap, _epoch| {
            let cluster = snap.cluster(name)?;
            let p = plan(snap, cluster, node_count)?;
            if p != first {
                return Err(ModelError::FailedPrecondition(
                    "the cluster or the pool changed while planning; retry".into(),
                ));
            }
            let mut grown = p.cluster.clone();
            grown.task = ClusterTask {
                kind: ClusterTaskKind::Migrating,
                id: id.clone(),
                detail: format!(
                    "scaling from {} to {} nodes: {} slot range(s) to move",
                    p.from_nodes,
                    p.to_nodes,
                    p.moves.len()
                ),
            };
            let put_proxies: Vec<Proxy> = p
                .added
                .iter()
                .flat_map(|c| c.proxies.iter())
                .filter_map(|id| snap.proxies.get(id))
                .map(|px| Proxy {
                    state: ProxyState::Allocated,
                    cluster: Some(name.clone()),
                    ..px.clone()
                })
                .collect();
            let task = v1::MigrationTask {
                id: id.clone(),
                cluster: name.to_string(),
                state: MigrationState::Pending as i32,
                plan: Some(plan_out.clone()),
                ranges: plan_out
                    .moves
                    .iter()
                    .map(|m| v1::RangeProgress {
                        r#move: Some(m.clone()),
                        phase: MigrationPhase::Queued as i32,
                        ..v1::RangeProgress::default()
                    })
                    .collect(),
                rate: Some(rate),
                error: String::new(),
                created_at: Some(now),
                updated_at: Some(now),
                added_chunks: plan_out.added_chunks.clone(),
                removed_chunks: plan_out.removed_chunks.clone(),
                keys_per_second: 0.0,
                bytes_per_second: 0.0,
                trace_parent: trace_parent.clone(),
            };
            Ok((
                Change {
                    put_proxies,
                    put_clusters: vec![grown],
                    put_raw: vec![(
                        tasks.key(name.as_str(), &id),
                        Bytes::from(task.encode_to_vec()),
                    )],
                    ..Change::default()
                },
                task,
            ))
        })
        .await
        .map_err(meta_status)?;
    Ok(Started {
        plan: plan_out,
        task: Some(task),
    })
}
