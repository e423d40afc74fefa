//! Migration task records in etcd (`migrations/<cluster>/<task>`, protobuf
//! `MigrationTask`): reads, compare-and-swap writes, and the state rules
//! the API and the runner share.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use redmesh_api::v1::{self, MigrationPhase, MigrationState};
use redmesh_store::{Compare, Keys, MetaStore, Op, Revision, StoreError, Txn};
use tonic::Status;

/// A task and the revision it was read at.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The record.
    pub task: v1::MigrationTask,
    /// Its etcd mod revision (the CAS guard of the next write).
    pub revision: Revision,
}

/// Whether a task has ended.
pub fn terminal(state: i32) -> bool {
    matches!(
        MigrationState::try_from(state),
        Ok(MigrationState::Completed | MigrationState::Cancelled | MigrationState::Failed)
    )
}

/// Task access.
#[derive(Clone)]
pub struct Tasks {
    store: Arc<dyn MetaStore>,
    keys: Keys,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").finish_non_exhaustive()
    }
}

/// Store failures as gRPC statuses.
pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(m) => Status::unavailable(m),
        other => Status::internal(other.to_string()),
    }
}

fn decode(key: &str, value: &[u8]) -> Result<v1::MigrationTask, Status> {
    v1::MigrationTask::decode(value)
        .map_err(|e| Status::internal(format!("corrupt migration task at {key}: {e}")))
}

impl Tasks {
    /// Tasks under `keys`.
    pub fn new(store: Arc<dyn MetaStore>, keys: Keys) -> Self {
        Self { store, keys }
    }

    /// Key of a task.
    pub fn key(&self, cluster: &str, id: &str) -> String {
        self.keys.migration(cluster, id)
    }

    /// The raw store.
    pub fn store(&self) -> &Arc<dyn MetaStore> {
        &self.store
    }

    /// One task.
    pub async fn get(&self, cluster: &str, id: &str) -> Result<Option<Stored>, Status> {
        let key = self.key(cluster, id);
        match self.store.get(&key).await.map_err(store_status)? {
            Some(kv) => Ok(Some(Stored {
                task: decode(&key, &kv.value)?,
                revision: kv.mod_revision,
            })),
            None => Ok(None),
        }
    }

    /// Tasks under `prefix`, as stored.
    async fn under(&self, prefix: &str) -> Result<Vec<Stored>, Status> {
        let listing = self.store.list(prefix).await.map_err(store_status)?;
        listing
            .kvs
            .iter()
            .map(|kv| {
                Ok(Stored {
                    task: decode(&kv.key, &kv.value)?,
                    revision: kv.mod_revision,
                })
            })
            .collect()
    }

    /// A cluster's tasks, newest first.
    pub async fn list(&self, cluster: &str) -> Result<Vec<Stored>, Status> {
        let mut out = self.under(&self.keys.migrations(cluster)).await?;
        out.sort_by_key(|s| {
            std::cmp::Reverse(
                s.task
                    .created_at
                    .as_ref()
                    .map_or((0, 0), |t| (t.seconds, t.nanos)),
            )
        });
        Ok(out)
    }

    /// Every task of every cluster.
    pub async fn all(&self) -> Result<Vec<Stored>, Status> {
        self.under(&self.keys.all_migrations()).await
    }

    /// The task `id`, or with an empty id the cluster's running task (else
    /// its newest).
    pub async fn find(&self, cluster: &str, id: &str) -> Result<Stored, Status> {
        if !id.is_empty() {
            return self.get(cluster, id).await?.ok_or_else(|| {
                Status::not_found(format!(
                    "migration task {id:?} of cluster {cluster} not found"
                ))
            });
        }
        let all = self.list(cluster).await?;
        let running = all.iter().find(|s| !terminal(s.task.state)).cloned();
        running
            .or_else(|| all.into_iter().next())
            .ok_or_else(|| Status::not_found(format!("cluster {cluster} has no migration tasks")))
    }

    /// Writes `task` if its record is still at `revision` (and `guards`
    /// hold); returns the new revision, or `None` on a lost race.
    pub async fn put_if(
        &self,
        task: &v1::MigrationTask,
        revision: Revision,
        guards: &[Compare],
    ) -> Result<Option<Revision>, Status> {
        let key = self.key(&task.cluster, &task.id);
        let mut compares = vec![Compare::mod_revision(&key, revision)];
        compares.extend(guards.iter().cloned());
        let res = self
            .store
            .txn(Txn {
                compares,
                success: vec![
                    Op::put(&key, Bytes::from(task.encode_to_vec())),
                    Op::get(&key),
                ],
                failure: vec![],
            })
            .await
            .map_err(store_status)?;
        if !res.succeeded {
            return Ok(None);
        }
        Ok(Some(
            res.gets
                .first()
                .and_then(|kv| kv.as_ref())
                .map_or(revision, |kv| kv.mod_revision),
        ))
    }

    /// Applies `change` to the stored task with compare-and-swap, retrying
    /// lost races; `change` refuses with a status.
    pub async fn modify(
        &self,
        cluster: &str,
        id: &str,
        mut change: impl FnMut(&mut v1::MigrationTask) -> Result<(), Status>,
    ) -> Result<v1::MigrationTask, Status> {
        for _ in 0..20 {
            let mut s = self.find(cluster, id).await?;
            change(&mut s.task)?;
            s.task.updated_at = Some(redmesh_api::convert::timestamp(std::time::SystemTime::now()));
            if self.put_if(&s.task, s.revision, &[]).await?.is_some() {
                return Ok(s.task);
            }
        }
        Err(Status::aborted(
            "the migration task kept changing; try again",
        ))
    }
}

/// The state name without its prefix, for messages.
pub fn state_name(state: i32) -> &'static str {
    MigrationState::try_from(state)
        .map(|s| match s {
            MigrationState::Unspecified => "unspecified",
            MigrationState::Pending => "pending",
            MigrationState::Running => "running",
            MigrationState::Paused => "paused",
            MigrationState::Cancelling => "cancelling",
            MigrationState::Cancelled => "cancelled",
            MigrationState::Completed => "completed",
            MigrationState::Failed => "failed",
        })
        .unwrap_or("unknown")
}

/// Keys and bytes a task moved, and what the plan estimated in total.
pub fn totals(task: &v1::MigrationTask) -> (u64, u64, u64, u64) {
    let mut out = (0, 0, 0, 0);
    for r in &task.ranges {
        out.0 += r.keys_moved;
        out.1 += r.bytes_moved;
        if let Some(m) = &r.r#move {
            out.2 += m.estimated_keys;
            out.3 += m.estimated_bytes;
        }
    }
    // Keys may have been added since the estimate.
    (out.0, out.1, out.2.max(out.0), out.3.max(out.1))
}

/// The live figures of a task.
pub fn progress(task: &v1::MigrationTask) -> v1::MigrationProgress {
    let (keys_moved, bytes_moved, keys_total, bytes_total) = totals(task);
    let running = !terminal(task.state);
    let eta_seconds = if !running {
        0.0
    } else if task.keys_per_second > 0.0 {
        let left = keys_total.saturating_sub(keys_moved) as f64;
        let ranges_left = task
            .ranges
            .iter()
            .filter(|r| r.phase != MigrationPhase::Done as i32)
            .count();
        if ranges_left == 0 {
            0.0
        } else {
            left / task.keys_per_second
        }
    } else {
        -1.0
    };
    v1::MigrationProgress {
        task: Some(task.clone()),
        keys_moved,
        bytes_moved,
        keys_total,
        bytes_total,
        keys_per_second: task.keys_per_second,
        bytes_per_second: task.bytes_per_second,
        eta_seconds,
    }
}
