//! The route table: where each slot is served, built once per topology
//! epoch, with the CLUSTER replies that describe it precomputed.
//!
//! Clients see each proxy as a Redis Cluster master owning the slots of
//! every shard whose master node it hosts. The data path only reads this
//! immutable table; a new epoch swaps in a new one.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redmesh_model::{
    node_id, Address, ClusterName, ProxyId, ProxyState, ProxyView, Slot, SlotRange, SLOT_COUNT,
};
use redmesh_resp::Frame;

use crate::backend::NodeLink;
use crate::nodes::NodeReport;

/// Where one slot is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRoute {
    /// By this proxy's local node (0 or 1).
    Local(u8),
    /// By another proxy (index into `Serving::peers`).
    Moved(u16),
    /// By nobody reachable (inconsistent metadata).
    Down,
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
}

/// Everything needed to serve a cluster.
#[derive(Debug)]
pub struct Serving {
    /// Cluster name.
    pub name: ClusterName,
    /// Required password digest.
    pub password_sha256: Option<[u8; 32]>,
    /// Route of every slot.
    pub slots: Vec<SlotRoute>,
    /// All proxies of the cluster, sorted by id.
    pub peers: Vec<Peer>,
    /// Index of this proxy in `peers`.
    pub me: usize,
    /// Connections to the local nodes.
    pub nodes: [NodeLink; 2],
    /// Whether each local node may serve (with the reason if not).
    pub node_ready: [Result<(), String>; 2],
    /// `CLUSTER NODES` text.
    pub cluster_nodes: Bytes,
    /// `CLUSTER SLOTS` reply.
    pub cluster_slots: Frame,
    /// `CLUSTER SHARDS` reply.
    pub cluster_shards: Frame,
    /// `CLUSTER INFO` text.
    pub cluster_info: Bytes,
}

/// The table for one epoch.
#[derive(Debug)]
pub struct RouteTable {
    /// Topology epoch it was built from.
    pub epoch: u64,
    /// The cluster served, or `Err(reason)` when not serving.
    pub serving: Result<Serving, String>,
}

impl RouteTable {
    /// The table before any topology arrived.
    pub fn empty() -> Self {
        Self {
            epoch: 0,
            serving: Err("the proxy has not received its topology yet".into()),
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
        }
    }

    /// Builds the table for `view` given the reconciled local nodes.
    pub fn build(view: &ProxyView, nodes: &[NodeLink; 2], reports: &[NodeReport]) -> Self {
        Self {
            epoch: view.epoch(),
            serving: build_serving(view, nodes, reports),
        }
    }
}

fn build_serving(
    view: &ProxyView,
    nodes: &[NodeLink; 2],
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
    let peers: Vec<Peer> = view
        .members
        .iter()
        .map(|p| Peer {
            id: p.id().clone(),
            node_id: node_id(p.id()),
            addr: p.spec.resp_address.clone(),
        })
        .collect();
    let my_index = peers
        .iter()
        .position(|p| &p.id == me)
        .ok_or_else(|| format!("proxy {me} is missing from its cluster's members"))?;
    let mut slots = vec![SlotRoute::Down; usize::from(SLOT_COUNT)];
    for a in &cluster.slots {
        let route = match cluster.shard(a.shard) {
            Some(shard) if &shard.master.proxy_id == me => {
                SlotRoute::Local(shard.master.node_index)
            }
            Some(shard) => peers
                .iter()
                .position(|p| p.id == shard.master.proxy_id)
                .map_or(SlotRoute::Down, |i| SlotRoute::Moved(i as u16)),
            None => SlotRoute::Down,
        };
        for s in a.range.slots() {
            slots[usize::from(s)] = route;
        }
    }
    let node_ready = [0, 1].map(|i| {
        reports.get(i).map_or_else(
            || Err("local node not configured yet".to_owned()),
            |r| r.outcome.clone(),
        )
    });
    let owner = |s: Slot| match slots[usize::from(s)] {
        SlotRoute::Local(_) => Some(my_index),
        SlotRoute::Moved(i) => Some(usize::from(i)),
        SlotRoute::Down => None,
    };
    // Consecutive slots with the same owner, as Redis groups them.
    let mut ranges: Vec<(SlotRange, usize)> = Vec::new();
    for s in 0..SLOT_COUNT {
        let Some(o) = owner(s) else { continue };
        match ranges.last_mut() {
            Some((r, last)) if *last == o && r.end() + 1 == s => {
                *r = SlotRange::new(u32::from(r.start()), u32::from(s)).unwrap_or(*r);
            }
            _ => ranges.push((
                SlotRange::new(u32::from(s), u32::from(s)).unwrap_or(SlotRange::all()),
                o,
            )),
        }
    }
    let epoch = view.epoch();
    let cluster_nodes = render_nodes(&peers, my_index, &ranges, epoch);
    let cluster_slots = render_slots(&peers, &ranges);
    let cluster_shards = render_shards(&peers, &ranges);
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
        password_sha256: cluster.config.password_sha256,
        slots,
        peers,
        me: my_index,
        nodes: nodes.clone(),
        node_ready,
        cluster_nodes,
        cluster_slots,
        cluster_shards,
        cluster_info,
    })
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// `CLUSTER NODES`: one line per proxy, every proxy a master, the cluster
/// bus port shown as the Redis convention port + 10000 (no bus exists;
/// clients never connect to it).
fn render_nodes(peers: &[Peer], me: usize, ranges: &[(SlotRange, usize)], epoch: u64) -> Bytes {
    let mut out = String::new();
    let pong = now_ms();
    for (i, p) in peers.iter().enumerate() {
        let flags = if i == me { "myself,master" } else { "master" };
        let pong = if i == me { 0 } else { pong };
        let cport = u32::from(p.addr.port()) + 10000;
        out.push_str(&format!(
            "{} {}@{cport} {flags} - 0 {pong} {epoch} connected",
            p.node_id, p.addr
        ));
        for (r, _) in ranges.iter().filter(|(_, o)| *o == i) {
            out.push(' ');
            out.push_str(&r.to_string());
        }
        out.push('\n');
    }
    Bytes::from(out)
}

fn node_entry(p: &Peer) -> Frame {
    Frame::Array(vec![
        Frame::bulk(p.addr.host().to_owned()),
        Frame::Integer(i64::from(p.addr.port())),
        Frame::bulk(p.node_id.clone()),
        Frame::Map(Vec::new()),
    ])
}

/// `CLUSTER SLOTS`: `[start, end, [ip, port, id, {}]]` per range.
fn render_slots(peers: &[Peer], ranges: &[(SlotRange, usize)]) -> Frame {
    Frame::Array(
        ranges
            .iter()
            .map(|(r, o)| {
                Frame::Array(vec![
                    Frame::Integer(i64::from(r.start())),
                    Frame::Integer(i64::from(r.end())),
                    node_entry(&peers[*o]),
                ])
            })
            .collect(),
    )
}

/// `CLUSTER SHARDS`: one shard per proxy with its slot ranges and itself as
/// the only (master) node.
fn render_shards(peers: &[Peer], ranges: &[(SlotRange, usize)]) -> Frame {
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
                let node = Frame::Map(vec![
                    (Frame::bulk("id"), Frame::bulk(p.node_id.clone())),
                    (
                        Frame::bulk("port"),
                        Frame::Integer(i64::from(p.addr.port())),
                    ),
                    (Frame::bulk("ip"), Frame::bulk(p.addr.host().to_owned())),
                    (
                        Frame::bulk("endpoint"),
                        Frame::bulk(p.addr.host().to_owned()),
                    ),
                    (Frame::bulk("role"), Frame::bulk("master")),
                    (Frame::bulk("replication-offset"), Frame::Integer(0)),
                    (Frame::bulk("health"), Frame::bulk("online")),
                ]);
                Frame::Map(vec![
                    (Frame::bulk("slots"), Frame::Array(slots)),
                    (Frame::bulk("nodes"), Frame::Array(vec![node])),
                ])
            })
            .collect(),
    )
}
