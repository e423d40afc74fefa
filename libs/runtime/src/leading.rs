//! The campaign → lead → campaign-again loop of the leader-elected services
//! (coordinator, migrator): one implementation of leases, resignation on
//! shutdown and backoff, with the service's own work plugged in.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redmesh_api::{convert, v1};
use redmesh_store::{Election, Leadership, LeaseKeeper, MetaStore};
use tokio_util::sync::CancellationToken;

use crate::backoff::reconnect_delays;

/// Refuses a lease TTL etcd cannot keep: its leases count whole seconds.
pub fn check_lease_ttl(ttl: Duration) -> Result<(), String> {
    if ttl < Duration::from_secs(1) {
        return Err("--lease-ttl must be at least 1s (etcd leases count whole seconds)".into());
    }
    Ok(())
}

/// Who campaigns: the service's identity ([`crate::args::service_id`]),
/// reached at `advertise`, else at the address its listener is bound to.
pub fn candidate(
    role: &str,
    id: Option<&str>,
    listen: &str,
    advertise: Option<&str>,
    bound: SocketAddr,
) -> v1::Candidate {
    v1::Candidate {
        id: crate::args::service_id(role, id, listen),
        address: advertise.map_or_else(|| bound.to_string(), str::to_owned),
    }
}

/// What a leader-elected service does with its leadership.
pub trait Lead: Send + Sync {
    /// Who is campaigning, for logs ("coordinator", "migrator").
    fn role(&self) -> &'static str;
    /// Just elected, before leading (metrics, events, announcements).
    fn elected(&self, leadership: &Leadership) -> impl Future<Output = ()> + Send;
    /// Leads until `stop` is cancelled; returning earlier means it cannot
    /// lead any more (the loop campaigns again).
    fn lead(
        &self,
        leadership: &Leadership,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send;
    /// Leadership ended, or a campaign failed.
    fn deposed(&self);
}

/// Campaigns, leads while the lease lives, and campaigns again after losing
/// it, until `shutdown` (when a leader resigns so a standby takes over at
/// once instead of after the lease's TTL).
pub async fn campaign_forever<L: Lead>(
    leader: L,
    store: Arc<dyn MetaStore>,
    election: Election,
    candidate: v1::Candidate,
    ttl: Duration,
    shutdown: CancellationToken,
) {
    let fresh = || reconnect_delays(Duration::from_millis(100), Duration::from_secs(2));
    let mut delays = fresh();
    while !shutdown.is_cancelled() {
        match lead_once(&leader, &store, &election, &candidate, ttl, &shutdown).await {
            Ok(()) => delays = fresh(),
            Err(e) => {
                tracing::warn!(error = %e, role = leader.role(), "election failed; campaigning again")
            }
        }
        leader.deposed();
        let pause = delays.next().unwrap_or(Duration::from_secs(2));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

async fn lead_once<L: Lead>(
    leader: &L,
    store: &Arc<dyn MetaStore>,
    election: &Election,
    candidate: &v1::Candidate,
    ttl: Duration,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let lease = LeaseKeeper::start(store.clone(), ttl)
        .await
        .map_err(|e| e.to_string())?;
    let value = Bytes::from(convert::encode(candidate));
    let leadership = tokio::select! {
        _ = shutdown.cancelled() => {
            let _ = lease.revoke().await;
            return Ok(());
        }
        _ = lease.lost() => return Err("lease lost while campaigning".into()),
        l = election.campaign(lease.id(), value) => l.map_err(|e| e.to_string())?,
    };
    tracing::info!(id = %candidate.id, role = leader.role(), "leading");
    leader.elected(&leadership).await;
    let stop = CancellationToken::new();
    let lead = leader.lead(&leadership, stop.clone());
    tokio::pin!(lead);
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => {
            stop.cancel();
            leader.deposed();
            let _ = election.resign(&leadership).await;
            let _ = lease.revoke().await;
            Ok(())
        }
        _ = lease.lost() => Err("leadership lease lost".into()),
        _ = &mut lead => Err("stopped leading".into()),
    };
    stop.cancel();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_defaults_to_role_and_port_and_its_bound_address() {
        let bound: SocketAddr = "10.0.0.5:7420".parse().unwrap();
        let c = candidate("migrator", None, "0.0.0.0:7420", None, bound);
        assert_eq!(
            (c.id.as_str(), c.address.as_str()),
            ("migrator-7420", "10.0.0.5:7420")
        );
        let c = candidate(
            "migrator",
            Some("mg-1"),
            "0.0.0.0:7420",
            Some("mg.svc:7420"),
            bound,
        );
        assert_eq!((c.id.as_str(), c.address.as_str()), ("mg-1", "mg.svc:7420"));
        assert!(check_lease_ttl(Duration::from_millis(900)).is_err());
        assert!(check_lease_ttl(Duration::from_secs(1)).is_ok());
    }
}
