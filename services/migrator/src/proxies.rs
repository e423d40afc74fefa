//! `ProxyAdmin` clients by admin address: step confirmations (a proxy has
//! applied an epoch), node sizes for estimates, and `MigrateBatch`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use redmesh_api::v1::{self, proxy_admin_client::ProxyAdminClient};
use redmesh_runtime::trace_context::{traced, TracedChannel};
use tonic::Status;

/// Admin clients, one lazily connected channel per address.
#[derive(Debug, Default)]
pub struct ProxyClients {
    cache: Mutex<HashMap<String, ProxyAdminClient<TracedChannel>>>,
}

impl ProxyClients {
    /// The client of the proxy whose admin API is at `addr`.
    pub fn client(&self, addr: &str) -> Result<ProxyAdminClient<TracedChannel>, Status> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(addr) {
            return Ok(c.clone());
        }
        let channel = redmesh_runtime::tls::endpoint(addr)
            .map_err(|e| Status::internal(format!("bad proxy admin address: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        let client = ProxyAdminClient::new(traced(channel))
            // DUMP payloads are not in replies, but be generous with errors.
            .max_decoding_message_size(16 << 20);
        cache.insert(addr.to_owned(), client.clone());
        Ok(client)
    }

    /// Returns once the proxy serves at least `epoch`.
    pub async fn wait_epoch(&self, addr: &str, epoch: u64) -> Result<(), Status> {
        let mut c = self.client(addr)?;
        let mut req = tonic::Request::new(v1::GetInfoRequest {
            wait_for_epoch: epoch,
        });
        req.set_timeout(Duration::from_secs(12));
        c.get_info(req).await.map(|_| ())
    }

    /// Keys and used memory of one of the proxy's local nodes.
    pub async fn node_size(&self, addr: &str, node: u8) -> Option<(u64, u64)> {
        let mut c = self.client(addr).ok()?;
        let mut req = tonic::Request::new(v1::GetInfoRequest { wait_for_epoch: 0 });
        req.set_timeout(Duration::from_secs(3));
        let info = c.get_info(req).await.ok()?.into_inner();
        let n = info.nodes.get(usize::from(node))?;
        Some((n.keys, n.used_memory_bytes))
    }
}
