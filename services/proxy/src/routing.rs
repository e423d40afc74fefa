//! The route table: where each slot is served, built once per topology
//! epoch, with the CLUSTER replies that describe it precomputed.
//!
//! Clients see each proxy as a Redis Cluster master owning the slots of
//! every shard whose master node it hosts. A proxy also hosts a replica of
//! its partner's shard and serves reads of those slots from it after
//! `READONLY`, but it is not listed as that shard's replica: it is a master
//! itself, and cluster clients key nodes by address, so one address cannot
//! be both (redis-py would lose the master).
//! The data path only reads this immutable table; a new epoch swaps in a
//! new one.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redmesh_model::{
    node_id, Address, ClientMode, ClusterName, Compression, Durability, MigrationStage, NodeRole,
    ProxyId, ProxyState, ProxyView, Slot, SlotRange, SLOT_COUNT,
};
use redmesh_resp::Frame;

use crate::link::Link;
use crate::nodes::NodeReport;

/// Who serves one slot's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRoute {
    /// This proxy's local node (0 or 1).
    Local(u8),
    /// Another proxy (index into `Serving::peers`).
    Moved(u16),
    /// Nobody reachable (inconsistent metadata).
    Down,
}

/// One slot: its owner, the local node holding a replica of it (for
/// `READONLY` reads), and its part in a live migration, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotEntry {
    /// Owner.
    pub route: SlotRoute,
    /// Local node replicating the slot's shard.
    pub replica: Option<u8>,
    /// This proxy is the migration source: keys it no longer holds are at
    /// this peer (index into `Serving::peers`; may be this proxy itself).
    pub migrating: Option<u16>,
    /// This proxy is the migration destination: after `ASKING` the slot is
    /// served by this local node.
    pub importing: Option<u8>,
}

impl SlotEntry {
    /// Whether the slot takes part in a migration on this proxy.
    pub fn moving(&self) -> bool {
        self.migrating.is_some() || self.importing.is_some()
    }
}

/// A slot range this proxy is moving out: what `MigrateBatch` needs.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The slots.
    pub range: SlotRange,
    /// Migration task.
    pub task_id: String,
    /// Local node holding the keys.
    pub node: u8,
    /// Connections to it.
    pub source: Link,
    /// Whether the source shard has a replica (to confirm deletions).
    pub source_has_replica: bool,
    /// The destination shard's master Redis node.
    pub target: Link,
    /// Whether the destination shard has a replica (to confirm copies).
    pub target_has_replica: bool,
}

/// Where a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// A local Redis node.
    Local(u8),
    /// A peer proxy (index into `Serving::peers`), in plain-client mode.
    Peer(u16),
}

/// A proxy of the cluster as clients see it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Proxy id.
    pub id: ProxyId,
    /// 40-hex node id.
    pub node_id: String,
    /// RESP address clients connect to.
    pub addr: Address,
    /// RESP-over-TLS address, if it listens for TLS clients.
    pub tls_addr: Option<Address>,
    /// Connections to it as a peer (None for this proxy itself).
    pub link: Option<Link>,
}

/// Of a proxy's plaintext and TLS addresses, the one a client sees.
fn client_addr<'a>(addr: &'a Address, tls_addr: Option<&'a Address>, tls: bool) -> &'a Address {
    match tls_addr {
        Some(a) if tls => a,
        _ => addr,
    }
}

impl Peer {
    /// The address a client sees: over TLS, the TLS listener's (a proxy
    /// without one is shown at its plaintext address, which is all it has).
    pub fn client_addr(&self, tls: bool) -> &Address {
        client_addr(&self.addr, self.tls_addr.as_ref(), tls)
    }
}

/// `CLUSTER NODES`, `SLOTS` and `SHARDS` as one kind of client (plaintext
/// or TLS) sees them.
#[derive(Debug, Clone)]
pub struct ClusterReplies {
    /// `CLUSTER NODES` text.
    pub nodes: Bytes,
    /// `CLUSTER SLOTS` reply.
    pub slots: Frame,
    /// `CLUSTER SHARDS` reply.
    pub shards: Frame,
}

/// Everything needed to serve a cluster.
#[derive(Debug)]
pub struct Serving {
    /// Cluster name.
    pub name: ClusterName,
    /// Cluster uid: a connection belongs to the cluster it was first served
    /// by (a deleted cluster's name may be reused; its uid is not).
    pub uid: Arc<str>,
    /// Required password digest.
    pub password_sha256: Option<[u8; 32]>,
    /// Secret peer proxies present (`AUTH redmesh-peer <secret>`).
    pub peer_secret: String,
    /// Cluster or plain client protocol on the main listener.
    pub client_mode: ClientMode,
    /// Value compression.
    pub compression: Compression,
    /// Smallest value compressed.
    pub compression_threshold: usize,
    /// With `replica_ack` durability: how long a write waits for its
    /// replica (ms).
    pub replica_ack_ms: Option<u32>,
    /// Per local node: whether the shard it masters has a replica to wait for.
    pub node_has_replica: [bool; 2],
    /// Per local node: the peer holding the replica of the shard it masters
    /// (index into `peers`), which takes the shard over if this proxy fails.
    pub successors: [Option<u16>; 2],
    /// Every slot.
    pub slots: Vec<SlotEntry>,
    /// Ranges being moved out of this proxy.
    pub outgoing: Vec<Outgoing>,
    /// All proxies of the cluster, sorted by id.
    pub peers: Vec<Peer>,
    /// Index of this proxy in `peers`.
    pub me: usize,
    /// Connections to the local nodes.
    pub nodes: [Link; 2],
    /// Whether each local node may serve (with the reason if not).
    pub node_ready: [Result<(), String>; 2],
    /// Local master nodes that serve slots, ready ones only, ascending.
    pub local_masters: Vec<u8>,
    /// Local node carrying this proxy's cluster-wide pub/sub: the first
    /// local master. Every proxy computes every proxy's choice the same way.
    pub pubsub_node: Option<u8>,
    /// The topology replies for plaintext clients, then for TLS clients.
    pub cluster_replies: [ClusterReplies; 2],
    /// `CLUSTER INFO` text.
    pub cluster_info: Bytes,
}

impl Serving {
    /// The connections of a target (peers always have a link).
    pub fn link(&self, t: Target) -> Option<&Link> {
        match t {
            Target::Local(n) => self.nodes.get(usize::from(n)),
            Target::Peer(i) => self.peers.get(usize::from(i)).and_then(|p| p.link.as_ref()),
        }
    }

    /// The topology replies a plaintext or TLS client sees.
    pub fn cluster_replies(&self, tls: bool) -> &ClusterReplies {
        &self.cluster_replies[usize::from(tls)]
    }

    /// The entry of `slot`.
    pub fn slot(&self, slot: Slot) -> SlotEntry {
        self.slots[usize::from(slot)]
    }

    /// Index of the member proxy whose RESP address is `addr`.
    pub fn peer_by_addr(&self, addr: &str) -> Option<usize> {
        self.peers.iter().position(|p| p.addr.as_str() == addr)
    }
}

/// What a proxy that stopped serving a cluster still knows of it, so the
/// connections made for that cluster are sent on with `-MOVED` rather than
/// refused: a client routing by an old slot map (one idle through a
/// scale-in, or connected to a proxy that was paused and failed over) then
/// refreshes its map, as it does when a Redis Cluster master has lost its
/// slots. A `-CLUSTERDOWN` there kept redis-rs retrying the same proxy for
/// ever. Kept, also once the proxy serves another cluster, until it leaves
/// that one; a restarted process has none (its clients' connections broke,
/// which makes them look again).
#[derive(Debug)]
pub struct Former {
    /// The cluster's uid.
    pub uid: Arc<str>,
    /// Its name, for error replies.
    pub name: ClusterName,
    /// Its client protocol: plain-mode clients cannot follow a redirect.
    pub client_mode: ClientMode,
    /// Whether it requires a password (redirects go to authenticated
    /// connections only).
    pub password: bool,
    /// Per slot: the proxy it is sent to (index into `to`).
    slots: Vec<Option<u16>>,
    /// Those proxies' plaintext and TLS addresses.
    to: Vec<(Address, Option<Address>)>,
}

impl Former {
    /// What `c` tells of where each slot goes once this proxy is gone: its
    /// owner, or for this proxy's own slots, the peer holding their replica
    /// (the failover target).
    fn of(c: &Serving) -> Self {
        let slots = c
            .slots
            .iter()
            .map(|e| match e.route {
                SlotRoute::Moved(i) => Some(i),
                SlotRoute::Local(n) => c.successors[usize::from(n)],
                SlotRoute::Down => None,
            })
            .collect();
        Self {
            uid: c.uid.clone(),
            name: c.name.clone(),
            client_mode: c.client_mode,
            password: c.password_sha256.is_some(),
            slots,
            to: c
                .peers
                .iter()
                .map(|p| (p.addr.clone(), p.tls_addr.clone()))
                .collect(),
        }
    }

    /// Where a client of this cluster finds `slot` now, as far as this
    /// proxy knows.
    pub fn redirect(&self, slot: Slot, tls: bool) -> Option<&Address> {
        let i = (*self.slots.get(usize::from(slot))?)?;
        let (addr, tls_addr) = self.to.get(usize::from(i))?;
        Some(client_addr(addr, tls_addr.as_ref(), tls))
    }
}

/// Tables replaced by newer ones, watched until everything routed by them
/// is done (requests hold their table until then): a migration batch must
/// not copy a key that a request routed without the key locks may still
/// change.
#[derive(Debug, Default)]
pub struct Retired {
    tables: std::sync::Mutex<Vec<std::sync::Weak<RouteTable>>>,
}

impl Retired {
    /// Records a table just replaced.
    pub fn retire(&self, old: &std::sync::Arc<RouteTable>) {
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|w| w.strong_count() > 0);
        t.push(std::sync::Arc::downgrade(old));
    }

    fn in_use(&self) -> bool {
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        t.retain(|w| w.strong_count() > 0);
        !t.is_empty()
    }

    /// Waits until no retired table is in use; false after `limit`.
    pub async fn drained(&self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.in_use() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            // Requests finish in microseconds to milliseconds; this runs
            // once per migrated range, not per request.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        true
    }
}

/// The table for one epoch.
#[derive(Debug)]
pub struct RouteTable {
    /// Topology epoch it was built from.
    pub epoch: u64,
    /// The cluster served, or `Err(reason)` when not serving.
    pub serving: Result<Serving, String>,
    /// The last cluster served other than the one served now, if any.
    pub former: Option<Arc<Former>>,
}

/// Where the table finds connections: one `Link` per address and identity,
/// kept across epochs so a topology change does not reconnect everything.
pub trait Links {
    /// Links to a local Redis node.
    fn node(&mut self, addr: &str) -> Link;
    /// Links to another proxy's Redis node (a migration target), as its
    /// default user: moving keys is the proxy's own work.
    fn remote_node(&mut self, addr: &str) -> Link;
    /// Links to a peer proxy, authenticated with the cluster's peer secret.
    fn peer(&mut self, addr: &str, secret: &str) -> Link;
}

impl RouteTable {
    /// The table before any topology arrived.
    pub fn empty() -> Self {
        Self {
            epoch: 0,
            serving: Err("the proxy has not received its topology yet".into()),
            former: None,
        }
    }

    /// The table of a proxy the broker does not know.
    pub fn build_unregistered(view: &ProxyView) -> Self {
        Self {
            epoch: view.epoch(),
            serving: Err(format!(
                "proxy {} is not registered with the broker",
                view.proxy_id
            )),
            former: None,
        }
    }

    /// Builds the table for `view` given the reconciled local nodes.
    pub fn build(view: &ProxyView, links: &mut dyn Links, reports: &[NodeReport]) -> Self {
        Self {
            epoch: view.epoch(),
            serving: build_serving(view, links, reports),
            former: None,
        }
    }

    /// This table as the one after `prev`: a proxy keeps what it knew of
    /// the last cluster it served other than the one it serves now.
    pub fn after(mut self, prev: &RouteTable) -> Self {
        let now = self.serving.as_ref().ok().map(|c| &c.uid);
        let former = match &prev.serving {
            Ok(p) if now != Some(&p.uid) => Some(Arc::new(Former::of(p))),
            _ => prev.former.clone(),
        };
        self.former = former.filter(|f| now != Some(&f.uid));
        self
    }
}

/// The user name peer proxies authenticate with.
pub const PEER_USER: &str = "redmesh-peer";

fn build_serving(
    view: &ProxyView,
    links: &mut dyn Links,
    reports: &[NodeReport],
) -> Result<Serving, String> {
    let me = &view.proxy_id;
    let proxy = view
        .proxy
        .as_ref()
        .ok_or_else(|| format!("proxy {me} is not registered with the broker"))?;
    let cluster = match (proxy.state, view.cluster.as_ref()) {
        (ProxyState::Allocated, Some(c)) => c,
        (ProxyState::Failed, _) => return Err(format!("proxy {me} was failed out of its cluster")),
        _ => return Err(format!("proxy {me} is not part of any cluster")),
    };
    // Members failed out of the cluster (holes awaiting replacement) are
    // neither listed to clients nor connected to.
    let peers: Vec<Peer> = view
        .members
        .iter()
        .filter(|p| {
            p.id() == me
                || (p.state == ProxyState::Allocated && p.cluster.as_ref() == Some(&cluster.name))
        })
        .map(|p| Peer {
            id: p.id().clone(),
            node_id: node_id(p.id()),
            addr: p.spec.resp_address.clone(),
            tls_addr: p.spec.resp_tls_address.clone(),
            link: (p.id() != me)
                .then(|| links.peer(p.spec.resp_address.as_str(), &cluster.peer_secret)),
        })
        .collect();
    let my_index = peers
        .iter()
        .position(|p| &p.id == me)
        .ok_or_else(|| format!("proxy {me} is missing from its cluster's members"))?;
    let nodes = proxy
        .spec
        .redis_nodes
        .clone()
        .map(|a| links.node(a.as_str()));
    let node_ready = [0, 1].map(|i| {
        reports.get(i).map_or_else(
            || Err("local node not configured yet".to_owned()),
            |r| r.outcome.clone(),
        )
    });
    let peer_index = |id: &ProxyId| peers.iter().position(|p| &p.id == id);

    // Per shard: owner route and local replica node.
    let mut slots = vec![
        SlotEntry {
            route: SlotRoute::Down,
            replica: None,
            migrating: None,
            importing: None,
        };
        usize::from(SLOT_COUNT)
    ];
    let mut outgoing = Vec::new();
    for a in &cluster.slots {
        let Some(shard) = cluster.shard(a.shard) else {
            continue;
        };
        let mut route = if &shard.master.proxy_id == me {
            SlotRoute::Local(shard.master.node_index)
        } else {
            peer_index(&shard.master.proxy_id)
                .map_or(SlotRoute::Down, |i| SlotRoute::Moved(i as u16))
        };
        let mut replica = shard
            .replicas
            .iter()
            .find(|r| &r.proxy_id == me)
            .map(|r| r.node_index)
            .filter(|n| node_ready[usize::from(*n)].is_ok());
        let (mut migrating, mut importing) = (None, None);
        if let Some((m, target)) = a
            .migration
            .as_ref()
            .and_then(|m| Some((m, cluster.shard(m.target_shard)?)))
        {
            let source_here = &shard.master.proxy_id == me;
            let target_here = &target.master.proxy_id == me;
            let target_node = target.master.node_index;
            if m.stage != MigrationStage::Prepare {
                // A replica may lag behind keys moving in or out: reads go
                // to the owner while the slots move.
                replica = None;
                if source_here {
                    migrating = peer_index(&target.master.proxy_id).map(|i| i as u16);
                    let target_link = if target_here {
                        proxy
                            .spec
                            .redis_nodes
                            .get(usize::from(target_node))
                            .map(|a| links.node(a.as_str()))
                    } else {
                        view.member(&target.master.proxy_id)
                            .and_then(|p| p.spec.redis_nodes.get(usize::from(target_node)))
                            .map(|a| links.remote_node(a.as_str()))
                    };
                    if let Some(target_link) = target_link {
                        outgoing.push(Outgoing {
                            range: a.range,
                            task_id: m.task_id.clone(),
                            node: shard.master.node_index,
                            source: nodes[usize::from(shard.master.node_index)].clone(),
                            source_has_replica: !shard.replicas.is_empty(),
                            target: target_link,
                            target_has_replica: !target.replicas.is_empty(),
                        });
                    }
                }
            }
            if target_here {
                if m.stage == MigrationStage::Commit {
                    route = SlotRoute::Local(target_node);
                } else {
                    importing = Some(target_node);
                }
            }
        }
        for s in a.range.slots() {
            slots[usize::from(s)] = SlotEntry {
                route,
                replica,
                migrating,
                importing,
            };
        }
    }
    let roles = cluster.node_roles(me);
    let local_masters: Vec<u8> = (0..2u8)
        .filter(|&n| matches!(roles[usize::from(n)], NodeRole::Master { .. }))
        .filter(|&n| node_ready[usize::from(n)].is_ok())
        .filter(|&n| slots.iter().any(|e| e.route == SlotRoute::Local(n)))
        .collect();
    let pubsub_node = local_masters.first().copied();
    let successors = [0u8, 1].map(|n| {
        cluster
            .shards
            .iter()
            .find(|s| &s.master.proxy_id == me && s.master.node_index == n)
            .and_then(|s| {
                s.replicas
                    .iter()
                    .filter(|r| &r.proxy_id != me)
                    .find_map(|r| peer_index(&r.proxy_id))
            })
            .map(|i| i as u16)
    });
    let node_has_replica = [0u8, 1].map(|n| {
        cluster
            .shards
            .iter()
            .any(|s| &s.master.proxy_id == me && s.master.node_index == n && !s.replicas.is_empty())
    });

    let owner = |s: usize| match slots[s].route {
        SlotRoute::Local(_) => Some(my_index),
        SlotRoute::Moved(i) => Some(usize::from(i)),
        SlotRoute::Down => None,
    };
    // Consecutive slots with the same owner, as Redis groups them.
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for s in 0..usize::from(SLOT_COUNT) {
        let Some(o) = owner(s) else { continue };
        match runs.last_mut() {
            Some((_, end, last)) if *last == o && *end + 1 == s => *end = s,
            _ => runs.push((s, s, o)),
        }
    }
    let ranges: Vec<(SlotRange, usize)> = runs
        .into_iter()
        .filter_map(|(start, end, o)| Some((SlotRange::new(start as u32, end as u32).ok()?, o)))
        .collect();
    let epoch = view.epoch();
    let cluster_replies = [false, true].map(|tls| ClusterReplies {
        nodes: render_nodes(&peers, my_index, &ranges, epoch, tls),
        slots: render_slots(&peers, &ranges, tls),
        shards: render_shards(&peers, &ranges, tls),
    });
    let assigned: usize = ranges.iter().map(|(r, _)| r.len()).sum();
    let size = {
        let mut owners: Vec<usize> = ranges.iter().map(|(_, o)| *o).collect();
        owners.sort_unstable();
        owners.dedup();
        owners.len()
    };
    let state = if assigned == usize::from(SLOT_COUNT) {
        "ok"
    } else {
        "fail"
    };
    let cluster_info = Bytes::from(format!(
        "cluster_state:{state}\r\ncluster_slots_assigned:{assigned}\r\ncluster_slots_ok:{assigned}\r\n\
         cluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:{}\r\ncluster_size:{size}\r\n\
         cluster_current_epoch:{epoch}\r\ncluster_my_epoch:{epoch}\r\ncluster_stats_messages_sent:0\r\n\
         cluster_stats_messages_received:0\r\ntotal_cluster_links_buffer_limit_exceeded:0\r\n",
        peers.len()
    ));
    Ok(Serving {
        name: cluster.name.clone(),
        uid: Arc::from(cluster.uid.as_str()),
        password_sha256: cluster.config.password_sha256,
        peer_secret: cluster.peer_secret.clone(),
        client_mode: cluster.config.client_mode,
        compression: cluster.config.compression,
        compression_threshold: cluster.config.compression_threshold as usize,
        replica_ack_ms: (cluster.config.durability == Durability::ReplicaAck)
            .then_some(cluster.config.replica_ack_timeout_ms.max(1)),
        node_has_replica,
        successors,
        slots,
        outgoing,
        peers,
        me: my_index,
        nodes,
        node_ready,
        local_masters,
        pubsub_node,
        cluster_replies,
        cluster_info,
    })
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

type Ranges = [(SlotRange, usize)];

/// `CLUSTER NODES`: one line per proxy, every proxy a master, the cluster
/// bus port shown as the Redis convention port + 10000 (no bus exists;
/// clients never connect to it).
fn render_nodes(peers: &[Peer], me: usize, ranges: &Ranges, epoch: u64, tls: bool) -> Bytes {
    let mut out = String::new();
    let pong = now_ms();
    for (i, p) in peers.iter().enumerate() {
        let flags = if i == me { "myself,master" } else { "master" };
        let pong = if i == me { 0 } else { pong };
        let addr = p.client_addr(tls);
        let cport = u32::from(addr.port()) + 10000;
        out.push_str(&format!(
            "{} {addr}@{cport} {flags} - 0 {pong} {epoch} connected",
            p.node_id
        ));
        for (r, _) in ranges.iter().filter(|(_, o)| *o == i) {
            out.push(' ');
            out.push_str(&r.to_string());
        }
        out.push('\n');
    }
    Bytes::from(out)
}

fn node_entry(p: &Peer, tls: bool) -> Frame {
    let addr = p.client_addr(tls);
    Frame::Array(vec![
        Frame::bulk(addr.host().to_owned()),
        Frame::Integer(i64::from(addr.port())),
        Frame::bulk(p.node_id.clone()),
        Frame::Map(Vec::new()),
    ])
}

/// `CLUSTER SLOTS`: `[start, end, master]` per range, each node
/// `[ip, port, id, {}]`.
fn render_slots(peers: &[Peer], ranges: &Ranges, tls: bool) -> Frame {
    Frame::Array(
        ranges
            .iter()
            .map(|(r, o)| {
                Frame::Array(vec![
                    Frame::Integer(i64::from(r.start())),
                    Frame::Integer(i64::from(r.end())),
                    node_entry(&peers[*o], tls),
                ])
            })
            .collect(),
    )
}

/// `CLUSTER SHARDS`: one shard per proxy with its slot ranges and itself as
/// the only (master) node.
fn render_shards(peers: &[Peer], ranges: &Ranges, tls: bool) -> Frame {
    Frame::Array(
        peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let slots = ranges
                    .iter()
                    .filter(|(_, o)| *o == i)
                    .flat_map(|(r, _)| {
                        [
                            Frame::Integer(i64::from(r.start())),
                            Frame::Integer(i64::from(r.end())),
                        ]
                    })
                    .collect();
                // As Redis 7: `port` and, with a TLS listener, `tls-port`.
                let host = p.client_addr(tls).host().to_owned();
                let mut node = vec![
                    (Frame::bulk("id"), Frame::bulk(p.node_id.clone())),
                    (
                        Frame::bulk("port"),
                        Frame::Integer(i64::from(p.addr.port())),
                    ),
                ];
                if let Some(t) = &p.tls_addr {
                    node.push((Frame::bulk("tls-port"), Frame::Integer(i64::from(t.port()))));
                }
                node.extend([
                    (Frame::bulk("ip"), Frame::bulk(host.clone())),
                    (Frame::bulk("endpoint"), Frame::bulk(host)),
                    (Frame::bulk("role"), Frame::bulk("master")),
                    (Frame::bulk("replication-offset"), Frame::Integer(0)),
                    (Frame::bulk("health"), Frame::bulk("online")),
                ]);
                Frame::Map(vec![
                    (Frame::bulk("slots"), Frame::Array(slots)),
                    (Frame::bulk("nodes"), Frame::Array(vec![Frame::Map(node)])),
                ])
            })
            .collect(),
    )
}
