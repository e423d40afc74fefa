//! Every connection to one address (a local Redis node or a peer proxy):
//! shared multiplexed connections and dedicated pools, one of each per
//! protocol, all opened with the same identity.

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
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("addr", &self.addr).finish()
    }
}

fn index(p: Protocol) -> usize {
    match p {
        Protocol::Resp2 => 0,
        Protocol::Resp3 => 1,
    }
}

impl Link {
    /// Links to `addr`, authenticating with `auth` when given.
    pub fn new(addr: &str, auth: Option<(String, String)>, opts: BackendOptions) -> Self {
        let hs = |protocol| Handshake {
            protocol,
            auth: auth.clone(),
        };
        Self {
            addr: addr.to_owned(),
            shared: [Protocol::Resp2, Protocol::Resp3]
                .map(|p| Backend::spawn(addr.to_owned(), hs(p), opts)),
            dedicated: [Protocol::Resp2, Protocol::Resp3]
                .map(|p| Arc::new(DedicatedPool::new(addr.to_owned(), hs(p), opts))),
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

    /// The RESP2 shared connection (administration).
    pub fn admin(&self) -> &Backend {
        &self.shared[0]
    }
}
