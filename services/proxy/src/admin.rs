//! `ProxyAdmin` gRPC service: what the proxy is serving, for operators and
//! health checks. Data movement (`MigrateBatch`) arrives with live migration.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use redmesh_api::{convert, v1};
use redmesh_model::NodeRole;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

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
}

#[tonic::async_trait]
impl v1::proxy_admin_server::ProxyAdmin for Admin {
    async fn get_info(
        &self,
        _req: Request<v1::GetInfoRequest>,
    ) -> Result<Response<v1::GetInfoResponse>, Status> {
        let table = self.table.borrow().clone();
        let reports = self
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let nodes = reports
            .iter()
            .map(|r| v1::LocalNode {
                address: r.addr.clone(),
                desired_role: match r.role {
                    NodeRole::Master { .. } => v1::NodeRole::Master,
                    NodeRole::Replica { .. } => v1::NodeRole::Replica,
                    NodeRole::Idle => v1::NodeRole::Unspecified,
                } as i32,
                master_address: r.master_addr.clone().unwrap_or_default(),
                applied: r.outcome.is_ok(),
                error: r.outcome.clone().err().unwrap_or_default(),
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
            fenced: false,
        }))
    }

    async fn migrate_batch(
        &self,
        _req: Request<v1::MigrateBatchRequest>,
    ) -> Result<Response<v1::MigrateBatchResponse>, Status> {
        Err(Status::unimplemented(
            "live slot migration is not supported by this version of redmesh",
        ))
    }
}
