//! The `Migrator` gRPC service. Any instance answers: starting a task and
//! the operator's controls are compare-and-swap writes of the task record,
//! which the leader picks up; progress is read from (and watched in) etcd.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use redmesh_api::v1::{self, migrator_server::Migrator, MigrationState};
use redmesh_model::ClusterName;
use redmesh_store::MetaRepo;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::plan;
use crate::proxies::ProxyClients;
use crate::tasks::{progress, state_name, terminal, Tasks};

/// The service.
#[derive(Clone)]
pub struct Api {
    /// Typed metadata.
    pub repo: MetaRepo,
    /// Task records.
    pub tasks: Tasks,
    /// Proxy admin clients (estimates).
    pub proxies: Arc<ProxyClients>,
    /// Ends watch streams on shutdown.
    pub shutdown: CancellationToken,
}

type Res<T> = Result<Response<T>, Status>;

fn cluster_name(name: &str) -> Result<ClusterName, Status> {
    ClusterName::parse(name).map_err(|e| Status::invalid_argument(format!("cluster: {e}")))
}

fn check_rate(rate: &Option<v1::MigrationRate>) -> Result<v1::MigrationRate, Status> {
    let r = rate.unwrap_or_default();
    // A key per second at least when limited; absurd values are refused so
    // a typo cannot stall or overflow the throttle.
    if r.keys_per_second > 100_000_000 {
        return Err(Status::invalid_argument(
            "rate.keys_per_second: more than 100000000",
        ));
    }
    if r.bytes_per_second > 1 << 40 {
        return Err(Status::invalid_argument(
            "rate.bytes_per_second: more than 1 TiB/s",
        ));
    }
    Ok(r)
}

impl Api {
    async fn transition(
        &self,
        cluster: &str,
        id: &str,
        verb: &str,
        allowed: &[MigrationState],
        to: MigrationState,
    ) -> Result<v1::MigrationTask, Status> {
        let name = cluster_name(cluster)?;
        self.tasks
            .modify(name.as_str(), id, |t| {
                let now = MigrationState::try_from(t.state).unwrap_or(MigrationState::Unspecified);
                if now == to {
                    return Ok(());
                }
                if !allowed.contains(&now) {
                    return Err(Status::failed_precondition(format!(
                        "cannot {verb} migration task {} of cluster {}: it is {}",
                        t.id,
                        t.cluster,
                        state_name(t.state)
                    )));
                }
                t.state = to as i32;
                Ok(())
            })
            .await
    }
}

#[tonic::async_trait]
impl Migrator for Api {
    type WatchMigrationStream =
        Pin<Box<dyn Stream<Item = Result<v1::WatchMigrationResponse, Status>> + Send>>;

    async fn start_migration(
        &self,
        req: Request<v1::StartMigrationRequest>,
    ) -> Res<v1::StartMigrationResponse> {
        let req = req.into_inner();
        let name = cluster_name(&req.cluster)?;
        let rate = check_rate(&req.rate)?;
        let started = plan::start(
            &self.repo,
            &self.tasks,
            &self.proxies,
            &name,
            req.node_count,
            req.dry_run,
            rate,
        )
        .await?;
        if let Some(t) = &started.task {
            tracing::info!(cluster = %name, task = %t.id, nodes = req.node_count, moves = started.plan.moves.len(), "migration task started");
        }
        Ok(Response::new(v1::StartMigrationResponse {
            plan: Some(started.plan),
            task: started.task,
        }))
    }

    async fn get_migration(
        &self,
        req: Request<v1::GetMigrationRequest>,
    ) -> Res<v1::GetMigrationResponse> {
        let req = req.into_inner();
        let name = cluster_name(&req.cluster)?;
        let s = self.tasks.find(name.as_str(), &req.task_id).await?;
        Ok(Response::new(v1::GetMigrationResponse {
            progress: Some(progress(&s.task)),
        }))
    }

    async fn list_migrations(
        &self,
        req: Request<v1::ListMigrationsRequest>,
    ) -> Res<v1::ListMigrationsResponse> {
        let name = cluster_name(&req.get_ref().cluster)?;
        let tasks = self.tasks.list(name.as_str()).await?;
        Ok(Response::new(v1::ListMigrationsResponse {
            tasks: tasks.into_iter().map(|s| s.task).collect(),
        }))
    }

    async fn watch_migration(
        &self,
        req: Request<v1::WatchMigrationRequest>,
    ) -> Res<Self::WatchMigrationStream> {
        let req = req.into_inner();
        let name = cluster_name(&req.cluster)?;
        let first = self.tasks.find(name.as_str(), &req.task_id).await?;
        let tasks = self.tasks.clone();
        let shutdown = self.shutdown.clone();
        let stream = async_stream_task(tasks, first, shutdown);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn pause_migration(
        &self,
        req: Request<v1::PauseMigrationRequest>,
    ) -> Res<v1::PauseMigrationResponse> {
        let r = req.into_inner();
        let task = self
            .transition(
                &r.cluster,
                &r.task_id,
                "pause",
                &[MigrationState::Pending, MigrationState::Running],
                MigrationState::Paused,
            )
            .await?;
        tracing::info!(cluster = %task.cluster, task = %task.id, "migration paused");
        Ok(Response::new(v1::PauseMigrationResponse {
            task: Some(task),
        }))
    }

    async fn resume_migration(
        &self,
        req: Request<v1::ResumeMigrationRequest>,
    ) -> Res<v1::ResumeMigrationResponse> {
        let r = req.into_inner();
        let task = self
            .transition(
                &r.cluster,
                &r.task_id,
                "resume",
                &[MigrationState::Paused],
                MigrationState::Running,
            )
            .await?;
        tracing::info!(cluster = %task.cluster, task = %task.id, "migration resumed");
        Ok(Response::new(v1::ResumeMigrationResponse {
            task: Some(task),
        }))
    }

    async fn cancel_migration(
        &self,
        req: Request<v1::CancelMigrationRequest>,
    ) -> Res<v1::CancelMigrationResponse> {
        let r = req.into_inner();
        let task = self
            .transition(
                &r.cluster,
                &r.task_id,
                "cancel",
                &[
                    MigrationState::Pending,
                    MigrationState::Running,
                    MigrationState::Paused,
                ],
                MigrationState::Cancelling,
            )
            .await?;
        tracing::info!(cluster = %task.cluster, task = %task.id, "migration cancelled; moving back");
        Ok(Response::new(v1::CancelMigrationResponse {
            task: Some(task),
        }))
    }

    async fn set_migration_rate(
        &self,
        req: Request<v1::SetMigrationRateRequest>,
    ) -> Res<v1::SetMigrationRateResponse> {
        let r = req.into_inner();
        let name = cluster_name(&r.cluster)?;
        let rate = check_rate(&r.rate)?;
        let task = self
            .tasks
            .modify(name.as_str(), &r.task_id, |t| {
                if terminal(t.state) {
                    return Err(Status::failed_precondition(format!(
                        "migration task {} is {}",
                        t.id,
                        state_name(t.state)
                    )));
                }
                t.rate = Some(rate);
                Ok(())
            })
            .await?;
        Ok(Response::new(v1::SetMigrationRateResponse {
            task: Some(task),
        }))
    }
}

/// Progress of one task: now, then on every change of its record, until it
/// ends (or the server shuts down). A broken watch is re-established from
/// a fresh read, so no state is missed for long.
fn async_stream_task(
    tasks: Tasks,
    first: crate::tasks::Stored,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<v1::WatchMigrationResponse, Status>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let cluster = first.task.cluster.clone();
        let id = first.task.id.clone();
        let key = tasks.key(&cluster, &id);
        let mut current = first;
        loop {
            let item = v1::WatchMigrationResponse {
                progress: Some(progress(&current.task)),
            };
            if tx.send(Ok(item)).await.is_err() || terminal(current.task.state) {
                return;
            }
            let mut watch = match tasks.store().watch(&key, current.revision + 1).await {
                Ok(w) => w,
                Err(e) => {
                    let _ = tx.send(Err(crate::tasks::store_status(e))).await;
                    return;
                }
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
                n = watch.next() => n,
            };
            match next {
                Some(Ok(_)) | Some(Err(_)) | None => match tasks.get(&cluster, &id).await {
                    Ok(Some(s)) => current = s,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(Status::not_found(format!(
                                "migration task {id} was deleted"
                            ))))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                },
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
