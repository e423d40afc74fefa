//! `ProxyAdmin` gRPC service: what the proxy is serving (for operators,
//! health checks and the migrator's step confirmations) and `MigrateBatch`,
//! the data movement of live migration.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use redmesh_api::{convert, v1};
use redmesh_model::{NodeRole, SlotRange};
use redmesh_resp::Frame;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::migrate::{Batch, MigrateError, Mover};
use crate::nodes::NodeReport;
use crate::routing::RouteTable;
use crate::session::Shared;
use crate::topology::TopologyFeed;

/// The admin service.
#[derive(Clone)]
pub struct Admin {
    pub(crate) shared: Arc<Shared>,
    pub(crate) feed: TopologyFeed,
    pub(crate) table: watch::Receiver<Arc<RouteTable>>,
    pub(crate) reports: Arc<Mutex<Vec<NodeReport>>>,
    pub(crate) started_at: SystemTime,
    pub(crate) mover: Arc<Mover>,
}

/// Longest a request waits for the proxy to reach a topology epoch.
const EPOCH_WAIT: Duration = Duration::from_secs(10);

impl Admin {
    /// The table in use once it is at least `epoch` new.
    async fn table_at(&self, epoch: u64) -> Result<Arc<RouteTable>, Status> {
        let mut rx = self.table.clone();
        let waited = tokio::time::timeout(EPOCH_WAIT, async {
            rx.wait_for(|t| t.epoch >= epoch).await.map(|t| t.clone())
        })
        .await;
        match waited {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(_)) => Err(Status::unavailable("the proxy is shutting down")),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the proxy still serves epoch {} after {} s, not {epoch}",
                self.table.borrow().epoch,
                EPOCH_WAIT.as_secs()
            ))),
        }
    }
}

/// What GetInfo reports of a local node's data.
#[derive(Debug, Default, Clone, Copy)]
struct NodeData {
    keys: u64,
    used_memory_bytes: u64,
    synced: bool,
}

/// DBSIZE, INFO memory's used_memory and replication state of a local
/// node; zeros and not synced if unknown.
async fn node_data(table: &RouteTable, index: usize) -> NodeData {
    let Ok(c) = &table.serving else {
        return NodeData::default();
    };
    let Some(link) = c.nodes.get(index) else {
        return NodeData::default();
    };
    let (keys, memory, replication) = futures::join!(
        link.admin().call(&["DBSIZE"]),
        link.admin().call(&["INFO", "memory"]),
        link.admin().call(&["INFO", "replication"])
    );
    let text = |r: Result<Frame, _>| {
        r.ok()
            .and_then(|f| f.as_bytes().cloned())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let memory = text(memory);
    let replication = text(replication);
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| Some(l.strip_prefix(name)?.strip_prefix(':')?.trim().to_owned()))
    };
    NodeData {
        keys: match keys {
            Ok(Frame::Integer(n)) => n.max(0) as u64,
            _ => 0,
        },
        used_memory_bytes: field(&memory, "used_memory")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        // Redis reports the link up only once the first sync has loaded.
        synced: match field(&replication, "role").as_deref() {
            Some("master") => true,
            Some("slave") => {
                field(&replication, "master_link_status").as_deref() == Some("up")
                    && field(&replication, "master_sync_in_progress").as_deref() == Some("0")
            }
            _ => false,
        },
    }
}

fn migrate_status(e: MigrateError) -> Status {
    match e {
        MigrateError::Precondition(m) => Status::failed_precondition(m),
        MigrateError::Backend(m) => Status::unavailable(m),
    }
}

#[tonic::async_trait]
impl v1::proxy_admin_server::ProxyAdmin for Admin {
    async fn get_info(
        &self,
        req: Request<v1::GetInfoRequest>,
    ) -> Result<Response<v1::GetInfoResponse>, Status> {
        let table = self.table_at(req.get_ref().wait_for_epoch).await?;
        let data = futures::join!(node_data(&table, 0), node_data(&table, 1));
        let data = [data.0, data.1];
        let reports = self
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let nodes = reports
            .iter()
            .zip(data)
            .map(|(r, d)| v1::LocalNode {
                address: r.addr.clone(),
                desired_role: match r.role {
                    NodeRole::Master { .. } => v1::NodeRole::Master,
                    NodeRole::Replica { .. } => v1::NodeRole::Replica,
                    NodeRole::Idle => v1::NodeRole::Unspecified,
                } as i32,
                master_address: r.master_addr.clone().unwrap_or_default(),
                applied: r.outcome.is_ok(),
                error: r.outcome.clone().err().unwrap_or_default(),
                keys: d.keys,
                used_memory_bytes: d.used_memory_bytes,
                synced: d.synced,
            })
            .collect();
        Ok(Response::new(v1::GetInfoResponse {
            proxy_id: self.shared.proxy_id.to_string(),
            cluster: table
                .serving
                .as_ref()
                .map(|s| s.name.to_string())
                .unwrap_or_default(),
            // What is being served, not merely received.
            epoch: table.epoch,
            topology_age_seconds: self.feed.age().map_or(-1.0, |a| a.as_secs_f64()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: Some(convert::timestamp(self.started_at)),
            client_connections: self.shared.clients.load(Ordering::Relaxed),
            nodes,
            fenced: self.shared.fenced().is_some(),
        }))
    }

    async fn migrate_batch(
        &self,
        req: Request<v1::MigrateBatchRequest>,
    ) -> Result<Response<v1::MigrateBatchResponse>, Status> {
        let req = req.into_inner();
        let range = req
            .range
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("range: missing"))
            .and_then(|r| {
                SlotRange::new(r.start, r.end)
                    .map_err(|e| Status::invalid_argument(format!("range: {e}")))
            })?;
        if req.task_id.is_empty() {
            return Err(Status::invalid_argument("task_id: empty"));
        }
        if !(1..=100_000).contains(&req.max_keys) {
            return Err(Status::invalid_argument(format!(
                "max_keys: {} is not in 1..=100000",
                req.max_keys
            )));
        }
        let table = self.table_at(req.epoch).await?;
        match &table.serving {
            Ok(c) if c.name.as_str() == req.cluster => {}
            Ok(c) => {
                return Err(Status::failed_precondition(format!(
                    "this proxy serves cluster {}, not {:?}",
                    c.name, req.cluster
                )))
            }
            Err(why) => return Err(Status::failed_precondition(why.clone())),
        }
        let moved = self
            .mover
            .run(
                table,
                Batch {
                    task_id: req.task_id,
                    range,
                    cursor: req.cursor,
                    max_keys: u64::from(req.max_keys),
                    max_bytes: req.max_bytes,
                },
            )
            .await
            .map_err(migrate_status)?;
        Ok(Response::new(v1::MigrateBatchResponse {
            next_cursor: moved.next_cursor,
            keys_moved: moved.keys,
            bytes_moved: moved.bytes,
            keys_skipped: moved.skipped,
            keys_scanned: moved.scanned,
        }))
    }
}
