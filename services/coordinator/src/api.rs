//! The `Coordinator` gRPC service: status, manual failover and the event
//! stream. Any coordinator answers status and events; only the leader
//! carries out a failover, and a standby says who leads.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use redmesh_api::convert;
use redmesh_api::v1::{
    self, coordinator_server::Coordinator, CoordinatorEventKind as Kind, FailoverMode,
};
use redmesh_model::{ClusterName, ModelError, ProxyId, ProxyState};
use redmesh_store::{Election, Leadership, MetaError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::events::event;
use crate::health::Votes;
use crate::leader::{is_degraded, Actor, Committed};
use crate::switchover::{commit_switch, switchover, SwitchError};

/// The service.
pub struct Api {
    /// What acts.
    pub actor: Actor,
    /// This coordinator's id.
    pub self_id: String,
    /// The election (to name the leader).
    pub election: Election,
    /// Current leadership, if this coordinator leads.
    pub leadership: watch::Receiver<Option<Leadership>>,
    /// Ends streams.
    pub shutdown: CancellationToken,
}

fn meta_status(e: MetaError) -> Status {
    redmesh_runtime::grpc::meta_status(e)
}

impl Api {
    async fn leader(&self) -> Result<Option<v1::Candidate>, Status> {
        let kv = self
            .election
            .leader()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(kv.and_then(|kv| convert::decode::<v1::Candidate>(&kv.key, &kv.value).ok()))
    }

    async fn require_leadership(&self) -> Result<Leadership, Status> {
        if let Some(l) = self.leadership.borrow().clone() {
            return Ok(l);
        }
        let who = match self.leader().await? {
            Some(c) => format!("the leader is {} at {}", c.id, c.address),
            None => "no coordinator leads right now; retry shortly".to_owned(),
        };
        Err(Status::failed_precondition(format!(
            "coordinator {} is a standby; {who}",
            self.self_id
        )))
    }
}

#[tonic::async_trait]
impl Coordinator for Api {
    type WatchEventsStream =
        Pin<Box<dyn Stream<Item = Result<v1::WatchEventsResponse, Status>> + Send>>;

    async fn get_status(
        &self,
        _: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::GetStatusResponse>, Status> {
        let leader = self.leader().await?;
        let snap = self.actor.repo.snapshot().await.map_err(meta_status)?;
        let votes = Votes::read(&*self.actor.store, &self.actor.keys, self.actor.min_votes)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let degraded_clusters = snap
            .clusters
            .values()
            .filter(|c| is_degraded(c, &snap, &votes))
            .map(|c| c.name.to_string())
            .collect();
        let in_progress = snap
            .clusters
            .values()
            .filter(|c| c.task.kind == redmesh_model::ClusterTaskKind::FailingOver)
            .map(|c| {
                let mut ev = event(
                    Kind::FailureDetected,
                    c.name.as_str(),
                    "",
                    c.task.detail.clone(),
                );
                ev.id = c.task.id.clone();
                ev.epoch = c.epoch;
                ev
            })
            .collect();
        // Leadership may have been won since the election was read: the
        // answer must not say "leader" and name nobody (or someone else).
        let is_leader = self.leadership.borrow().is_some();
        let leader_id = if is_leader {
            self.self_id.clone()
        } else {
            leader.map(|c| c.id).unwrap_or_default()
        };
        Ok(Response::new(v1::GetStatusResponse {
            self_id: self.self_id.clone(),
            is_leader,
            leader_id,
            degraded_clusters,
            free_proxies: snap
                .proxies
                .values()
                .filter(|p| p.state == ProxyState::Free)
                .count() as u32,
            in_progress,
        }))
    }

    async fn failover(
        &self,
        req: Request<v1::FailoverRequest>,
    ) -> Result<Response<v1::FailoverResponse>, Status> {
        let req = req.into_inner();
        let name = ClusterName::parse_field("cluster", &req.cluster)
            .map_err(|e| convert::status_of(&e))?;
        let pid =
            ProxyId::parse_field("proxy_id", &req.proxy_id).map_err(|e| convert::status_of(&e))?;
        let mode = FailoverMode::try_from(req.mode).map_err(|_| {
            Status::invalid_argument(format!("mode: unknown failover mode {}", req.mode))
        })?;
        let leadership = self.require_leadership().await?;
        let snap = self.actor.repo.snapshot().await.map_err(meta_status)?;
        let cluster = snap
            .clusters
            .get(&name)
            .ok_or_else(|| Status::not_found(format!("cluster {name} not found")))?;
        let serves = snap
            .proxies
            .get(&pid)
            .is_some_and(|p| p.state == ProxyState::Allocated && p.cluster.as_ref() == Some(&name));
        if !serves {
            return Err(Status::failed_precondition(format!(
                "proxy {pid} does not serve cluster {name}"
            )));
        }
        let masters = cluster.shards.iter().any(|s| s.master.proxy_id == pid);
        let started = std::time::Instant::now();
        let forced = mode == FailoverMode::Force;
        let mut committed: Option<Committed> = None;
        if masters && !forced {
            committed = Some(
                switchover(&self.actor.repo, &leadership, &name, &pid)
                    .await
                    .map_err(|e| match e {
                        SwitchError::Meta(m) => meta_status(m),
                        SwitchError::Lagging { .. } => Status::failed_precondition(e.to_string()),
                        SwitchError::Node { .. } => Status::unavailable(e.to_string()),
                    })?,
            );
        }
        if req.replace {
            // Whatever the proxy still masters (forced mode) is promoted away
            // like for a failure; the leader then replaces it from the pool.
            let votes = Votes::read(&*self.actor.store, &self.actor.keys, self.actor.min_votes)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let done = self
                .actor
                .fail_over(
                    &leadership,
                    &name,
                    &pid,
                    &votes,
                    "manual failover with replacement",
                )
                .await
                .map_err(meta_status)?;
            committed = Some(match committed {
                Some(mut c) => {
                    c.epoch = done.epoch;
                    c.promoted.extend(done.promoted);
                    c
                }
                None => done,
            });
        } else if forced {
            if !masters {
                return Err(convert::status_of(&ModelError::FailedPrecondition(
                    format!("proxy {pid} masters no shard of cluster {name}; nothing to fail over"),
                )));
            }
            committed = Some(
                commit_switch(&self.actor.repo, &leadership, &name, &pid)
                    .await
                    .map_err(meta_status)?,
            );
        }
        let Some(done) = committed else {
            return Err(Status::failed_precondition(format!(
                "proxy {pid} masters no shard of cluster {name}; nothing to fail over (set replace to swap it out)"
            )));
        };
        let moved: Vec<String> = done
            .promoted
            .iter()
            .map(|(s, n)| format!("shard {s} → {}/{}", n.proxy_id, n.node_index))
            .collect();
        let mut ev = event(
            Kind::ManualFailover,
            name.as_str(),
            pid.as_str(),
            format!(
                "{} failover{}; promoted {}",
                if forced { "forced" } else { "graceful" },
                if req.replace { " with replacement" } else { "" },
                if moved.is_empty() {
                    "nothing".to_owned()
                } else {
                    moved.join(", ")
                }
            ),
        );
        ev.epoch = done.epoch;
        ev.duration_ms = started.elapsed().as_millis() as u64;
        self.actor.events.record(ev.clone()).await;
        Ok(Response::new(v1::FailoverResponse { event: Some(ev) }))
    }

    async fn watch_events(
        &self,
        req: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let cluster = match req.get_ref().cluster.as_str() {
            "" => None,
            c => Some(
                ClusterName::parse_field("cluster", c)
                    .map_err(|e| convert::status_of(&e))?
                    .to_string(),
            ),
        };
        let stream = self
            .actor
            .events
            .watch(cluster, req.get_ref().recent.min(1000) as usize)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .map(|r| {
                r.map(|ev| v1::WatchEventsResponse { event: Some(ev) })
                    .map_err(|e| Status::unavailable(format!("event stream interrupted: {e}")))
            })
            .take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }
}
