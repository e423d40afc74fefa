//! Proxies of the pool: what is registered about them and their lifecycle.

use std::time::SystemTime;

use crate::{Address, ClusterName, Epoch, HostName, ModelError, ProxyId};

/// Lifecycle state of a proxy in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyState {
    /// Available for allocation.
    Free,
    /// Serving a cluster.
    Allocated,
    /// Taken out of its cluster after a failure; re-enters only by
    /// re-registration.
    Failed,
}

impl ProxyState {
    /// Lower-case name for tables and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::Allocated => "allocated",
            Self::Failed => "failed",
        }
    }
}

/// What is registered about a proxy. Construct with [`ProxySpec::new`],
/// which enforces the invariants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySpec {
    /// Stable identity.
    pub id: ProxyId,
    /// Where clients connect (advertised in redirections).
    pub resp_address: Address,
    /// ProxyAdmin gRPC address.
    pub admin_address: Address,
    /// Failure domain.
    pub host: HostName,
    /// The two local Redis nodes.
    pub redis_nodes: [Address; 2],
    /// Where clients connect over TLS, if the proxy listens for them
    /// (advertised to TLS clients instead of `resp_address`). Set with
    /// [`ProxySpec::with_tls_address`].
    pub resp_tls_address: Option<Address>,
}

impl ProxySpec {
    /// Validates a spec: four distinct addresses.
    pub fn new(
        id: ProxyId,
        resp_address: Address,
        admin_address: Address,
        host: HostName,
        redis_nodes: [Address; 2],
    ) -> Result<Self, ModelError> {
        Self {
            id,
            resp_address,
            admin_address,
            host,
            redis_nodes,
            resp_tls_address: None,
        }
        .checked()
    }

    /// The spec with a RESP-over-TLS listener at `addr` (or none), checked
    /// like the other addresses.
    pub fn with_tls_address(self, addr: Option<Address>) -> Result<Self, ModelError> {
        Self {
            resp_tls_address: addr,
            ..self
        }
        .checked()
    }

    /// Every address the proxy listens on or owns: RESP, admin, both Redis
    /// nodes, and RESP over TLS if it has one.
    pub fn addresses(&self) -> impl Iterator<Item = &Address> {
        [
            &self.resp_address,
            &self.admin_address,
            &self.redis_nodes[0],
            &self.redis_nodes[1],
        ]
        .into_iter()
        .chain(self.resp_tls_address.as_ref())
    }

    fn checked(self) -> Result<Self, ModelError> {
        let all: Vec<&Address> = self.addresses().collect();
        for (i, a) in all.iter().enumerate() {
            if all[..i].contains(a) {
                return Err(ModelError::invalid(
                    "proxy",
                    format!("address {a} is used twice; resp, resp over TLS, admin and both Redis nodes need their own"),
                ));
            }
        }
        Ok(self)
    }
}

/// A registered proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Registration data.
    pub spec: ProxySpec,
    /// Lifecycle state.
    pub state: ProxyState,
    /// Cluster served, when allocated.
    pub cluster: Option<ClusterName>,
    /// Global epoch of the record's last change.
    pub epoch: Epoch,
    /// First registration.
    pub registered_at: SystemTime,
}

impl Proxy {
    /// The record of this proxy back in the free pool.
    pub fn freed(&self) -> Proxy {
        Proxy {
            state: ProxyState::Free,
            cluster: None,
            ..self.clone()
        }
    }

    /// The proxy's id.
    pub fn id(&self) -> &ProxyId {
        &self.spec.id
    }

    /// Address of local node `index` (0 or 1).
    pub fn node_address(&self, index: u8) -> Option<&Address> {
        self.spec.redis_nodes.get(usize::from(index))
    }

    /// Checks state and cluster agree (used when decoding stored records).
    pub fn check(&self) -> Result<(), ModelError> {
        match (self.state, &self.cluster) {
            (ProxyState::Allocated, None) => Err(ModelError::Corrupt(format!(
                "proxy {} is allocated to no cluster",
                self.spec.id
            ))),
            (ProxyState::Free | ProxyState::Failed, Some(c)) => Err(ModelError::Corrupt(format!(
                "proxy {} is {} but names cluster {c}",
                self.spec.id,
                self.state.as_str()
            ))),
            _ => Ok(()),
        }
    }
}
