//! Every connection to one address (a local Redis node or a peer proxy):
//! shared multiplexed connections and dedicated pools, one of each per
//! protocol, all opened with the same identity, and the connection the
//! proxy administers the address over.

use std::sync::Arc;

use redmesh_resp::Protocol;

use crate::backend::{Backend, BackendOptions, Handshake};
use crate::dedicated::DedicatedPool;

/// Connections to one address. Cheap to clone; connects lazily.
#[derive(Clone)]
pub struct Link {
    addr: String,
    shared: [Backend; 2],
    dedicated: [Arc<DedicatedPool>; 2],
    admin: Backend,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("addr", &self.addr).finish()
    }
}

/// Shared connections and dedicated pools, one of each per protocol, all
/// opened as `auth` (the default user without it).
fn backends(
    addr: &str,
    auth: Option<(String, String)>,
    opts: BackendOptions,
) -> ([Backend; 2], [Arc<DedicatedPool>; 2]) {
    let hs = |protocol| Handshake {
        protocol,
        auth: auth.clone(),
    };
    (
        [Protocol::Resp2, Protocol::Resp3].map(|p| Backend::spawn(addr.to_owned(), hs(p), opts)),
        [Protocol::Resp2, Protocol::Resp3]
            .map(|p| Arc::new(DedicatedPool::new(addr.to_owned(), hs(p), opts))),
    )
}

fn index(p: Protocol) -> usize {
    match p {
        Protocol::Resp2 => 0,
        Protocol::Resp3 => 1,
    }
}

impl Link {
    /// Links to a peer proxy at `addr`, authenticating with `auth`; the
    /// RESP2 shared connection doubles as the admin one.
    pub fn new(addr: &str, auth: (String, String), opts: BackendOptions) -> Self {
        let (shared, dedicated) = backends(addr, Some(auth), opts);
        Self {
            addr: addr.to_owned(),
            admin: shared[0].clone(),
            shared,
            dedicated,
        }
    }

    /// Links to a Redis node at `addr`: client traffic as the restricted
    /// user in `client` (see `nodes::CLIENT_USER`) or, without one, as the
    /// default user; the proxy's own work as the default user, on a
    /// connection of its own.
    pub fn node(addr: &str, client: Option<(String, String)>, opts: BackendOptions) -> Self {
        let (shared, dedicated) = backends(addr, client, opts);
        Self {
            addr: addr.to_owned(),
            shared,
            dedicated,
            admin: Backend::spawn(addr.to_owned(), Handshake::default(), opts),
        }
    }

    /// The address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The shared connection for a client speaking `protocol`.
    pub fn shared(&self, protocol: Protocol) -> &Backend {
        &self.shared[index(protocol)]
    }

    /// Dedicated connections for a client speaking `protocol`.
    pub fn dedicated(&self, protocol: Protocol) -> &Arc<DedicatedPool> {
        &self.dedicated[index(protocol)]
    }

    /// The connection for the proxy's own work (roles, markers, users).
    pub fn admin(&self) -> &Backend {
        &self.admin
    }
}
