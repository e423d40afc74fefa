//! gRPC adapter: validates requests into domain types, calls `Ops` / `Index`,
//! and maps errors onto precise status codes. No decisions are made here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use redmesh_api::convert::{self, public_cluster, status_of};
use redmesh_api::v1::{self, broker_server::Broker, topology_server::Topology};
use redmesh_model::{ClusterName, ModelError, ProxyId};
use redmesh_runtime::{grpc, CancellationToken};
use redmesh_store::MetaError;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::index::ClusterEvent;
use crate::ops::ConfigPatch;
use crate::{Index, Ops};

/// Keepalive period of watch streams (DESIGN.md §3).
const KEEPALIVE: Duration = Duration::from_millis(250);

type StatusStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Clone)]
pub(crate) struct Api {
    pub ops: Ops,
    pub index: Index,
    /// Scale requests are the migrator's to plan and run.
    pub migrator:
        v1::migrator_client::MigratorClient<redmesh_runtime::trace_context::TracedChannel>,
    pub shutdown: CancellationToken,
}

fn status(e: MetaError) -> Status {
    grpc::meta_status(e)
}

fn invalid(e: ModelError) -> Status {
    status_of(&e)
}

fn cluster_name(name: &str) -> Result<ClusterName, Status> {
    ClusterName::parse(name).map_err(invalid)
}

fn proxy_id(field: &str, id: &str) -> Result<ProxyId, Status> {
    ProxyId::parse_field(field, id).map_err(invalid)
}

fn keepalive(epoch: u64) -> v1::Keepalive {
    v1::Keepalive {
        epoch,
        server_time: Some(convert::timestamp(SystemTime::now())),
    }
}

#[tonic::async_trait]
impl Broker for Api {
    async fn register_proxy(
        &self,
        req: Request<v1::RegisterProxyRequest>,
    ) -> Result<Response<v1::RegisterProxyResponse>, Status> {
        let req = req.into_inner();
        let spec = req
            .proxy
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("invalid proxy: missing"))?;
        let spec = convert::proxy_spec(spec, "proxy").map_err(invalid)?;
        let (proxy, changed) = self.ops.register_proxy(spec).await.map_err(status)?;
        if changed {
            tracing::info!(proxy = %proxy.id(), epoch = proxy.epoch, "proxy registered");
        }
        Ok(Response::new(v1::RegisterProxyResponse {
            proxy: Some((&proxy).into()),
            changed,
        }))
    }

    async fn deregister_proxy(
        &self,
        req: Request<v1::DeregisterProxyRequest>,
    ) -> Result<Response<v1::DeregisterProxyResponse>, Status> {
        let id = proxy_id("id", &req.get_ref().id)?;
        self.ops.deregister_proxy(&id).await.map_err(status)?;
        tracing::info!(proxy = %id, "proxy deregistered");
        Ok(Response::new(v1::DeregisterProxyResponse {}))
    }

    async fn list_proxies(
        &self,
        req: Request<v1::ListProxiesRequest>,
    ) -> Result<Response<v1::ListProxiesResponse>, Status> {
        let state = convert::proxy_state_filter(req.get_ref().state).map_err(invalid)?;
        let proxies = self.ops.list_proxies(state).await.map_err(status)?;
        Ok(Response::new(v1::ListProxiesResponse {
            proxies: proxies.iter().map(Into::into).collect(),
        }))
    }

    async fn get_proxy(
        &self,
        req: Request<v1::GetProxyRequest>,
    ) -> Result<Response<v1::GetProxyResponse>, Status> {
        let id = proxy_id("id", &req.get_ref().id)?;
        let proxy = self.ops.get_proxy(&id).await.map_err(status)?;
        Ok(Response::new(v1::GetProxyResponse {
            proxy: Some((&proxy).into()),
        }))
    }

    async fn create_cluster(
        &self,
        req: Request<v1::CreateClusterRequest>,
    ) -> Result<Response<v1::CreateClusterResponse>, Status> {
        let req = req.into_inner();
        let name = cluster_name(&req.name)?;
        let raw = req.config.unwrap_or_default();
        if !raw.password_sha256.is_empty() {
            return Err(Status::invalid_argument(
                "invalid config.password_sha256: output only; set config.password instead",
            ));
        }
        let config = convert::cluster_config(&raw, "config").map_err(invalid)?;
        let cluster = self
            .ops
            .create_cluster(name, req.node_count, config)
            .await
            .map_err(status)?;
        tracing::info!(cluster = %cluster.name, nodes = cluster.node_count(), epoch = cluster.epoch, "cluster created");
        Ok(Response::new(v1::CreateClusterResponse {
            cluster: Some(public_cluster(&cluster)),
        }))
    }

    async fn get_cluster(
        &self,
        req: Request<v1::GetClusterRequest>,
    ) -> Result<Response<v1::GetClusterResponse>, Status> {
        let name = cluster_name(&req.get_ref().name)?;
        let (cluster, proxies) = self.ops.get_cluster(&name).await.map_err(status)?;
        Ok(Response::new(v1::GetClusterResponse {
            cluster: Some(public_cluster(&cluster)),
            proxies: proxies.iter().map(Into::into).collect(),
        }))
    }

    async fn list_clusters(
        &self,
        _req: Request<v1::ListClustersRequest>,
    ) -> Result<Response<v1::ListClustersResponse>, Status> {
        let clusters = self.ops.list_clusters().await.map_err(status)?;
        Ok(Response::new(v1::ListClustersResponse {
            clusters: clusters.iter().map(public_cluster).collect(),
        }))
    }

    async fn delete_cluster(
        &self,
        req: Request<v1::DeleteClusterRequest>,
    ) -> Result<Response<v1::DeleteClusterResponse>, Status> {
        let name = cluster_name(&req.get_ref().name)?;
        let freed = self.ops.delete_cluster(&name).await.map_err(status)?;
        tracing::info!(cluster = %name, freed = freed.len(), "cluster deleted");
        Ok(Response::new(v1::DeleteClusterResponse {
            freed_proxies: freed.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn scale_cluster(
        &self,
        req: Request<v1::ScaleClusterRequest>,
    ) -> Result<Response<v1::ScaleClusterResponse>, Status> {
        let req = req.into_inner();
        let name = cluster_name(&req.name)?;
        crate::ops::check_node_count(req.node_count).map_err(invalid)?;
        // Validate that the cluster exists so the error is the precise one.
        self.ops.get_cluster(&name).await.map_err(status)?;
        let started = self
            .migrator
            .clone()
            .start_migration(v1::StartMigrationRequest {
                cluster: name.to_string(),
                node_count: req.node_count,
                dry_run: req.dry_run,
                rate: req.rate,
            })
            .await
            .map_err(|e| match e.code() {
                tonic::Code::Unavailable | tonic::Code::Unknown => Status::unavailable(format!(
                    "the migrator, which runs scale tasks, is unreachable: {}",
                    e.message()
                )),
                _ => e,
            })?
            .into_inner();
        Ok(Response::new(v1::ScaleClusterResponse {
            plan: started.plan,
            task_id: started.task.map(|t| t.id).unwrap_or_default(),
        }))
    }

    async fn update_cluster_config(
        &self,
        req: Request<v1::UpdateClusterConfigRequest>,
    ) -> Result<Response<v1::UpdateClusterConfigResponse>, Status> {
        let req = req.into_inner();
        let name = cluster_name(&req.name)?;
        let raw = req.config.unwrap_or_default();
        let patch = config_patch(&raw, &req.update_paths)?;
        let cluster = self.ops.update_config(&name, patch).await.map_err(status)?;
        tracing::info!(cluster = %name, fields = ?req.update_paths, "cluster config updated");
        Ok(Response::new(v1::UpdateClusterConfigResponse {
            cluster: Some(public_cluster(&cluster)),
        }))
    }
}

/// Builds a patch from the named fields of `raw`.
fn config_patch(raw: &v1::ClusterConfig, paths: &[String]) -> Result<ConfigPatch, Status> {
    if paths.is_empty() {
        return Err(Status::invalid_argument(
            "invalid update_paths: name at least one config field, e.g. \"password\"",
        ));
    }
    // Converting the whole message validates every enum value once.
    let parsed = convert::cluster_config(raw, "config").map_err(invalid)?;
    let mut patch = ConfigPatch::default();
    for path in paths {
        match path.trim_start_matches("config.") {
            "password" => patch.password_sha256 = Some(parsed.password_sha256),
            "compression" => patch.compression = Some(parsed.compression),
            "compression_threshold" => {
                patch.compression_threshold = Some(parsed.compression_threshold)
            }
            "durability" => patch.durability = Some(parsed.durability),
            "replica_ack_timeout_ms" => {
                patch.replica_ack_timeout_ms = Some(parsed.replica_ack_timeout_ms)
            }
            "client_mode" => patch.client_mode = Some(parsed.client_mode),
            other => {
                return Err(Status::invalid_argument(format!(
                    "invalid update_paths: unknown config field {other:?} (password, compression, \
                     compression_threshold, durability, replica_ack_timeout_ms, client_mode)"
                )))
            }
        }
    }
    Ok(patch)
}

#[tonic::async_trait]
impl Topology for Api {
    type WatchTopologyStream = StatusStream<v1::WatchTopologyResponse>;
    type WatchClustersStream = StatusStream<v1::WatchClustersResponse>;

    async fn watch_topology(
        &self,
        req: Request<v1::WatchTopologyRequest>,
    ) -> Result<Response<Self::WatchTopologyStream>, Status> {
        let id = proxy_id("proxy_id", &req.get_ref().proxy_id)?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(stream_topology(
            self.index.clone(),
            id,
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn watch_clusters(
        &self,
        req: Request<v1::WatchClustersRequest>,
    ) -> Result<Response<Self::WatchClustersStream>, Status> {
        let filter = match req.get_ref().name.as_str() {
            "" => None,
            name => Some(cluster_name(name)?),
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(stream_clusters(
            self.index.clone(),
            filter,
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Tx<T> = mpsc::Sender<Result<T, Status>>;

/// One WatchTopology subscription: newest view on change, keepalives while
/// the index is current, never an older epoch than already sent.
///
/// Views, too, go out only while the index is current. A proxy trusts the
/// first message of a new stream (DESIGN.md §5), so a broker cut off from
/// etcd must not hand out its possibly stale view even then: a proxy whose
/// stream was reopened would otherwise count it as fresh contact and keep
/// taking writes while a failover it cannot see moves its slots elsewhere.
async fn stream_topology(
    index: Index,
    id: ProxyId,
    tx: Tx<v1::WatchTopologyResponse>,
    shutdown: CancellationToken,
) {
    use v1::watch_topology_response::Event;
    let mut rx = index.subscribe(&id);
    let mut unsent = true;
    let mut tick = tokio::time::interval(KEEPALIVE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_epoch: Option<u64> = None;
    let mut published_at = None;
    loop {
        let mut event = None;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                unsent = true;
            }
            _ = tick.tick() => {
                if let Some(epoch) = last_epoch.filter(|_| !unsent && index.is_current()) {
                    event = Some(Event::Keepalive(keepalive(epoch)));
                }
            }
        }
        if unsent && index.is_current() {
            unsent = false;
            if let Some(view) = rx.borrow_and_update().clone() {
                let epoch = view.message.epoch;
                if last_epoch.is_some_and(|last| epoch < last) {
                    tracing::warn!(proxy = %id, epoch, last = ?last_epoch, "not sending a view older than one already sent");
                } else {
                    last_epoch = Some(epoch);
                    event = Some(Event::View(view.message.clone()));
                    published_at = Some(view.published_at);
                }
            }
        }
        let Some(event) = event else { continue };
        if tx
            .send(Ok(v1::WatchTopologyResponse { event: Some(event) }))
            .await
            .is_err()
        {
            return;
        }
        // From the metadata change reaching this broker to the new view
        // being handed to this proxy's stream.
        if let Some(at) = published_at.take() {
            metrics::histogram!("redmesh_broker_topology_push_delay_seconds")
                .record(at.elapsed().as_secs_f64());
        }
    }
}

async fn stream_clusters(
    index: Index,
    filter: Option<ClusterName>,
    tx: Tx<v1::WatchClustersResponse>,
    shutdown: CancellationToken,
) {
    use v1::watch_clusters_response::Event;
    let mut events = index.cluster_events();
    index.wait_loaded().await;
    let wanted = |name: &ClusterName| filter.as_ref().is_none_or(|f| f == name);
    let send = |event: Event| {
        let tx = tx.clone();
        async move {
            tx.send(Ok(v1::WatchClustersResponse { event: Some(event) }))
                .await
                .is_ok()
        }
    };
    // Initial state, and again after falling behind the event channel.
    let mut known: std::collections::HashMap<ClusterName, String> = Default::default();
    let mut resync = true;
    let mut tick = tokio::time::interval(KEEPALIVE);
    loop {
        if resync {
            resync = false;
            let current: Vec<Arc<redmesh_model::Cluster>> = index
                .clusters()
                .into_iter()
                .filter(|c| wanted(&c.name))
                .collect();
            let gone: Vec<(ClusterName, String)> = known
                .iter()
                .filter(|(n, _)| !current.iter().any(|c| &c.name == *n))
                .map(|(n, u)| (n.clone(), u.clone()))
                .collect();
            for (name, uid) in gone {
                known.remove(&name);
                if !send(Event::Deleted(v1::ClusterDeleted {
                    name: name.to_string(),
                    uid,
                }))
                .await
                {
                    return;
                }
            }
            for c in current {
                known.insert(c.name.clone(), c.uid.clone());
                if !send(Event::Updated(public_cluster(&c))).await {
                    return;
                }
            }
        }
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            ev = events.recv() => match ev {
                Ok(ClusterEvent::Updated(c)) if wanted(&c.name) => {
                    known.insert(c.name.clone(), c.uid.clone());
                    Event::Updated(public_cluster(&c))
                }
                Ok(ClusterEvent::Deleted { name, uid }) if wanted(&name) => {
                    known.remove(&name);
                    Event::Deleted(v1::ClusterDeleted { name: name.to_string(), uid })
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    resync = true;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => {
                if !index.is_current() {
                    continue;
                }
                Event::Keepalive(keepalive(0))
            }
        };
        if !send(event).await {
            return;
        }
    }
}
