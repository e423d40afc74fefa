//! Keeping a lease alive in the background and noticing when it is lost.
//!
//! Whoever holds something under a lease (an election candidacy, health
//! verdicts) must stop acting on it the moment the lease may have expired;
//! `LeaseKeeper::lost` says exactly that.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{LeaseId, MetaStore, StoreError};

/// A granted lease refreshed every third of its TTL until dropped or revoked.
pub struct LeaseKeeper {
    id: LeaseId,
    ttl: Duration,
    alive: watch::Receiver<bool>,
    task: JoinHandle<()>,
    store: Arc<dyn MetaStore>,
}

impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("id", &self.id)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl LeaseKeeper {
    /// Grants a lease with `ttl` and starts refreshing it.
    pub async fn start(store: Arc<dyn MetaStore>, ttl: Duration) -> Result<Self, StoreError> {
        let id = store.grant_lease(ttl).await?;
        let (tx, alive) = watch::channel(true);
        let task = tokio::spawn(refresh(store.clone(), id, ttl, tx));
        Ok(Self {
            id,
            ttl,
            alive,
            task,
            store,
        })
    }

    /// The lease id.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Whether the lease is still known to be alive.
    pub fn is_alive(&self) -> bool {
        *self.alive.borrow()
    }

    /// Resolves once the lease is lost (expired, revoked, or unrefreshable
    /// for a whole TTL).
    pub async fn lost(&self) {
        let mut rx = self.alive.clone();
        // An error means the refresher ended: the lease is gone either way.
        let _ = rx.wait_for(|alive| !alive).await;
    }

    /// Stops refreshing and revokes the lease (deleting its keys).
    pub async fn revoke(self) -> Result<(), StoreError> {
        self.task.abort();
        match self.store.revoke_lease(self.id).await {
            Ok(()) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn refresh(
    store: Arc<dyn MetaStore>,
    id: LeaseId,
    ttl: Duration,
    alive: watch::Sender<bool>,
) {
    let period = (ttl / 3).max(Duration::from_millis(50));
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(period).await;
        match store.keep_alive(id).await {
            Ok(_) => last_ok = Instant::now(),
            Err(StoreError::LeaseNotFound(_)) => {
                tracing::warn!(lease = format!("{id:x}"), "lease expired");
                let _ = alive.send(false);
                return;
            }
            Err(e) => {
                if last_ok.elapsed() >= ttl {
                    tracing::warn!(lease = format!("{id:x}"), error = %e, "lease not refreshed for a whole TTL; treating it as lost");
                    let _ = alive.send(false);
                    return;
                }
                tracing::debug!(lease = format!("{id:x}"), error = %e, "lease refresh failed; retrying");
            }
        }
    }
}
