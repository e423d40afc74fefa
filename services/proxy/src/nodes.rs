//! Reconciling the proxy's two local Redis nodes with the topology: roles
//! (`REPLICAOF`), ownership, and wiping when the proxy returns to the pool.
//!
//! Ownership: a master node carries the uid of the cluster whose data it
//! holds in a marker key in database 1 (clients only ever see database 0).
//! A node holding another cluster's marker has stale data from a deleted
//! cluster and is flushed before it serves; a node holding keys but no
//! marker has data redmesh did not write, and is never served nor flushed —
//! the operator must decide. This is what keeps one tenant's keys from ever
//! reaching another tenant.

use redmesh_model::{Address, NodeRole, ProxyState, ProxyView, ShardId};
use redmesh_resp::Frame;

use crate::backend::{Backend, BackendError};

/// Marker key (database 1) holding the owning cluster's uid.
pub const MARKER_KEY: &str = "redmesh:cluster-uid";

/// Key (database 1) beside the marker holding the id of the shard whose
/// data the node holds. Within one cluster a node holds one shard's data;
/// a node that holds another shard's — left over from a role its proxy
/// had before it left the cluster and came back without hearing it was
/// freed (paused, or cut off) — must not serve that data as this shard's.
pub const SHARD_KEY: &str = "redmesh:shard";

/// Claims an empty node for a cluster's shard, or reports who owns it. Runs
/// as one script so the check and the claim are atomic; SELECT inside a
/// script does not change the connection's database (Redis >= 7). A node
/// marked before shards were (no shard key) gets the shard's.
const CLAIM_SCRIPT: &str = r#"
redis.call('select', 1)
local cur = redis.call('get', KEYS[1])
if cur == ARGV[1] then
  local shard = redis.call('get', KEYS[2])
  if shard == ARGV[2] then return 'same' end
  if shard then return 'other-shard' end
  redis.call('set', KEYS[2], ARGV[2])
  return 'same'
end
if cur then return 'other' end
redis.call('select', 0)
if redis.call('dbsize') > 0 then return 'foreign' end
redis.call('select', 1)
redis.call('set', KEYS[1], ARGV[1])
redis.call('set', KEYS[2], ARGV[2])
return 'claimed'
"#;

/// Tells whether a node holds redmesh data (a marker).
const HAS_MARKER_SCRIPT: &str = r#"
redis.call('select', 1)
return redis.call('exists', KEYS[1])
"#;

/// Reads a node's marker and shard key (nil when missing). Read-only, so
/// it also runs on a replica.
const GET_MARKER_SCRIPT: &str = r#"
redis.call('select', 1)
return redis.call('mget', KEYS[1], KEYS[2])
"#;

/// What the proxy wants of one local node, and how applying it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    /// Node address.
    pub addr: String,
    /// Desired role.
    pub role: NodeRole,
    /// For a replica: its master's address.
    pub master_addr: Option<String>,
    /// `Ok` once the role is applied and (for masters) ownership verified.
    pub outcome: Result<(), String>,
}

impl NodeReport {
    /// Whether the node may serve clients.
    pub fn ready(&self) -> bool {
        self.outcome.is_ok()
    }

    /// Whether the node is a master that lost its shard's data (its Redis
    /// restarted empty) while the shard's replica holds it: only a
    /// failover, which promotes that replica, brings the shard back.
    pub fn lost_data(&self) -> bool {
        matches!(&self.outcome, Err(e) if e.starts_with(LOST_DATA))
    }
}

/// How the errors of [`NodeReport::lost_data`] begin.
const LOST_DATA: &str = "lost its shard's data:";

/// The error of a master node that lost its shard's data, `why` we know.
fn lost_data(node: &Backend, why: &str) -> String {
    format!(
        "{LOST_DATA} node {} lost this cluster's data (its Redis restarted empty?) {why}; \
         not serving it: its replica holds the shard for a failover",
        node.addr()
    )
}

fn text(f: &Frame) -> Option<String> {
    f.as_bytes()
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

fn backend_err(e: BackendError) -> String {
    e.to_string()
}

fn reply_ok(f: Frame, what: &str) -> Result<Frame, String> {
    match f {
        Frame::Error(e) => Err(format!("{what}: {}", String::from_utf8_lossy(&e))),
        other => Ok(other),
    }
}

/// Current replication state: `None` for master, `Some((host, port))` for a replica.
async fn current_master(node: &Backend) -> Result<Option<(String, String)>, String> {
    let role = reply_ok(node.call(&["ROLE"]).await.map_err(backend_err)?, "ROLE")?;
    let Frame::Array(items) = role else {
        return Err("ROLE returned a non-array".into());
    };
    match items.first().and_then(text).as_deref() {
        Some("master") => Ok(None),
        Some("slave") => {
            let host = items.get(1).and_then(text).unwrap_or_default();
            let port = match items.get(2) {
                Some(Frame::Integer(p)) => p.to_string(),
                other => other.and_then(text).unwrap_or_default(),
            };
            Ok(Some((host, port)))
        }
        other => Err(format!("unexpected ROLE {other:?}")),
    }
}

/// Makes a node master of cluster `uid`'s shard `shard`. A replica is
/// promoted if it holds the shard's data (the cluster's marker and the
/// shard's key), i.e. it completed a sync from the shard's master. A replica
/// without it never synced (its first full sync still pending when its
/// master died), lost its data since, or holds another shard's: serving it
/// would answer every read of the shard with nothing (or with the wrong
/// keys) and take writes over lost data. It stays a replica and the shard
/// stays unavailable, with this error, until an operator decides (its old
/// master's node, if it survived, has the data) — unless
/// `may_start_empty`: the shard owns no slots yet and this process never
/// saw the node synced with it, so every key copied into the shard is still
/// at its source (a source deletes a copy only once this replica confirmed
/// it) and there is nothing to lose; [`claim`] then empties what the node
/// holds. Refusing there would stop a scale-out for good when a new shard's
/// master dies before its replica's first sync.
async fn ensure_master(
    node: &Backend,
    uid: &str,
    shard: ShardId,
    may_start_empty: bool,
) -> Result<(), String> {
    if let Some((host, port)) = current_master(node).await? {
        if !holds_shard(node, uid, shard).await? {
            if !may_start_empty {
                return Err(format!(
                    "refusing to promote node {}: it never completed a sync from its master \
                     {host}:{port} or lost the data since (no marker of this cluster's shard \
                     {shard}), so it does not hold the shard's data",
                    node.addr()
                ));
            }
            tracing::warn!(
                node = node.addr(),
                master = %format!("{host}:{port}"),
                shard,
                "promoting a replica that holds none of its shard's data: the shard owns no \
                 slots yet, so every key moving into it is still at its source"
            );
        } else {
            tracing::info!(
                node = node.addr(),
                "promoting local node to master (REPLICAOF NO ONE)"
            );
        }
        replicaof_no_one(node).await?;
    }
    // Each master has exactly one replica, so Redis's default 5 s wait for
    // more replicas before a diskless full sync only delays the moment a new
    // replica holds the data (and may be promoted). Best effort: CONFIG may
    // be renamed or disabled by the operator.
    match node
        .call(&["CONFIG", "SET", "repl-diskless-sync-delay", "0"])
        .await
    {
        Ok(Frame::Error(e)) => tracing::debug!(
            node = node.addr(),
            error = %String::from_utf8_lossy(&e),
            "could not shorten the diskless sync delay"
        ),
        Err(e) => return Err(backend_err(e)),
        Ok(_) => {}
    }
    Ok(())
}

/// Back in the pool, or failed: a master again, replicating from nobody.
async fn stop_replicating(node: &Backend) -> Result<(), String> {
    if current_master(node).await?.is_some() {
        replicaof_no_one(node).await?;
    }
    Ok(())
}

async fn replicaof_no_one(node: &Backend) -> Result<(), String> {
    let reply = node
        .call(&["REPLICAOF", "NO", "ONE"])
        .await
        .map_err(backend_err)?;
    reply_ok(reply, "REPLICAOF NO ONE").map(|_| ())
}

async fn ensure_replica_of(
    node: &Backend,
    host: &str,
    port: u16,
    password: &ReplPassword,
) -> Result<(), String> {
    // Before anything else, so a link (re)made from now on authenticates.
    // CONFIG SET does not touch a link that is up.
    reply_ok(
        node.call(&[
            "CONFIG",
            "SET",
            "masteruser",
            REPL_USER,
            "masterauth",
            password.0.as_str(),
        ])
        .await
        .map_err(backend_err)?,
        "CONFIG SET masteruser/masterauth",
    )?;
    let port = port.to_string();
    if current_master(node).await? == Some((host.to_owned(), port.clone())) {
        return Ok(());
    }
    tracing::info!(node = node.addr(), master = %format!("{host}:{port}"), "making local node a replica");
    reply_ok(
        node.call(&["REPLICAOF", host, &port])
            .await
            .map_err(backend_err)?,
        "REPLICAOF",
    )?;
    Ok(())
}

/// The ACL user replicas authenticate to their master as.
pub const REPL_USER: &str = "redmesh-repl";

/// The replication user's password: derived from the cluster's peer secret
/// (so Redis never holds the secret itself), and never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplPassword(String);

impl ReplPassword {
    fn of(cluster: &redmesh_model::Cluster) -> Self {
        Self(hex_sha256(&format!(
            "replication:{}:{}",
            cluster.peer_secret, cluster.uid
        )))
    }
}

impl std::fmt::Debug for ReplPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplPassword(..)")
    }
}

/// SHA-256 of `text`, as lowercase hex (how Redis lists ACL passwords).
fn hex_sha256(text: &str) -> String {
    redmesh_model::password_digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Lets replicas of this cluster sync from `node` (a master): a user with
/// the cluster's replication password and the replication commands only.
/// A Redis that restarted empty has no such user, so a replica reconnecting
/// to it is refused and keeps its data, instead of full-syncing nothing
/// (Redis's own hazard with a master that restarts without persistence).
/// Set only when missing or different: a user is not rewritten under the
/// replica connected as it.
async fn ensure_repl_user(node: &Backend, password: &ReplPassword) -> Result<(), String> {
    ensure_user(
        node,
        REPL_USER,
        password.0.as_str(),
        &["+psync", "+replconf", "+ping"],
    )
    .await
}

/// The Redis user client traffic runs as. Scripts, functions and
/// transactions run inside Redis, past the proxy's command checks; as this
/// user they cannot reach database 1 (the ownership marker: losing it makes
/// the proxy stop serving the node), flush every database, or run
/// administrative commands (`CONFIG`, `REPLICAOF`, `DEBUG`, `SHUTDOWN`,
/// `ACL`…). The proxy's own work runs as the default user.
pub const CLIENT_USER: &str = "redmesh-client";

/// What [`CLIENT_USER`] may do: everything but the above. (`CLIENT
/// UNBLOCK` is administrative, and the proxy sends it to end a blocked
/// command whose slot moved; clients cannot send it, nor call it from a
/// script.)
const CLIENT_RULES: &[&str] = &[
    "~*",
    "&*",
    "+@all",
    "-@admin",
    "+client|unblock",
    "-flushall",
    "-select",
    "+select|0",
    "-swapdb",
    "-move",
    "-migrate",
];

/// The password of [`CLIENT_USER`] on this proxy's nodes, chosen at random
/// per process. (Debug does not show it.)
#[derive(Clone, PartialEq, Eq)]
pub struct ClientPassword(String);

impl ClientPassword {
    /// A new random password.
    pub fn random() -> Self {
        Self(format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ))
    }

    /// `(user, password)` for a connection's handshake.
    pub fn identity(&self) -> (String, String) {
        (CLIENT_USER.to_owned(), self.0.clone())
    }
}

impl std::fmt::Debug for ClientPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientPassword(…)")
    }
}

/// Makes `node` serve client traffic as [`CLIENT_USER`].
async fn ensure_client_user(node: &Backend, password: &ClientPassword) -> Result<(), String> {
    ensure_user(node, CLIENT_USER, &password.0, CLIENT_RULES).await
}

/// Creates or resets user `name` with `password` and `rules`, only when
/// it is missing or has another password: a user is not rewritten under
/// the connections authenticated as it.
async fn ensure_user(
    node: &Backend,
    name: &str,
    password: &str,
    rules: &[&str],
) -> Result<(), String> {
    let digest = hex_sha256(password);
    let user = reply_ok(
        node.call(&["ACL", "GETUSER", name])
            .await
            .map_err(backend_err)?,
        "ACL GETUSER",
    )?;
    let current = match &user {
        Frame::Array(fields) => fields
            .chunks(2)
            .find(|kv| text(&kv[0]).as_deref() == Some("passwords"))
            .and_then(|kv| match kv.get(1) {
                Some(Frame::Array(hashes)) => Some(
                    hashes
                        .iter()
                        .any(|h| text(h).as_deref() == Some(digest.as_str())),
                ),
                _ => None,
            })
            .unwrap_or(false),
        _ => false,
    };
    if current {
        return Ok(());
    }
    let pass = format!(">{password}");
    let mut args = vec!["ACL", "SETUSER", name, "reset", "on", pass.as_str()];
    args.extend_from_slice(rules);
    reply_ok(node.call(&args).await.map_err(backend_err)?, "ACL SETUSER").map(|_| ())
}

/// Whether `node` holds the data of cluster `uid`'s shard `shard`: the
/// cluster's marker, with the shard's key (or none: marked before shards
/// were).
async fn holds_shard(node: &Backend, uid: &str, shard: ShardId) -> Result<bool, String> {
    let reply = reply_ok(
        node.call(&["EVAL", GET_MARKER_SCRIPT, "2", MARKER_KEY, SHARD_KEY])
            .await
            .map_err(backend_err)?,
        "marker check",
    )?;
    let Frame::Array(items) = reply else {
        return Err(format!("marker check answered {reply:?}"));
    };
    let marker = items.first().and_then(text);
    let marked_shard = items.get(1).and_then(text);
    Ok(marker.as_deref() == Some(uid) && marked_shard.is_none_or(|s| s == shard.to_string()))
}

/// Checked before a node that does not hold its shard's data is claimed
/// for a shard that owns slots: none of the shard's replicas may hold the
/// data. One that does means this node lost it — its Redis restarted
/// empty, and this proxy process too, so it does not remember serving it —
/// and claiming it would serve the shard empty while the replica, able to
/// authenticate again, full-synced the emptiness. A replica that cannot be
/// asked counts as holding the data. (A new cluster's replicas hold
/// nothing: they cannot sync before their master is claimed.)
async fn no_replica_holds(
    node: &Backend,
    replicas: &[Result<Address, String>],
    remote: &std::collections::HashMap<String, Backend>,
    uid: &str,
    shard: ShardId,
) -> Result<(), String> {
    for replica in replicas {
        let unknown = |why: String| {
            format!(
                "node {} does not hold shard {shard}'s data, and whether its replica does is \
                 unknown ({why}); not claiming it until that is known",
                node.addr()
            )
        };
        let addr = replica.as_ref().map_err(|why| unknown(why.clone()))?;
        let backend = remote
            .get(&addr.to_string())
            .ok_or_else(|| unknown(format!("no link to {addr}")))?;
        match holds_shard(backend, uid, shard).await {
            Ok(false) => {}
            Ok(true) => return Err(lost_data(node, &format!("but its replica {addr} holds it"))),
            Err(e) => return Err(unknown(format!("{addr}: {e}"))),
        }
    }
    Ok(())
}

/// Runs the claim script: "same", "claimed", "other-shard", "other" or
/// "foreign".
async fn claim_once(node: &Backend, uid: &str, shard: ShardId) -> Result<String, String> {
    let reply = node
        .call(&[
            "EVAL",
            CLAIM_SCRIPT,
            "2",
            MARKER_KEY,
            SHARD_KEY,
            uid,
            &shard.to_string(),
        ])
        .await
        .map_err(backend_err)?;
    reply_ok(reply, "ownership check").map(|f| text(&f).unwrap_or_default())
}

/// Claims `node` for cluster `uid`'s shard `shard`, flushing a deleted
/// cluster's data, and another shard's of this cluster when
/// `may_start_empty` (see [`ensure_master`]).
async fn claim(
    node: &Backend,
    uid: &str,
    shard: ShardId,
    may_start_empty: bool,
) -> Result<(), String> {
    let flush_and_claim = || async {
        flush(node).await?;
        match claim_once(node, uid, shard).await?.as_str() {
            "same" | "claimed" => Ok(()),
            other => Err(format!(
                "could not claim the node after flushing it ({other})"
            )),
        }
    };
    match claim_once(node, uid, shard).await?.as_str() {
        "same" | "claimed" => Ok(()),
        "other" => {
            tracing::warn!(
                node = node.addr(),
                "node holds data of a deleted cluster; flushing it before serving"
            );
            flush_and_claim().await
        }
        "other-shard" if may_start_empty => {
            tracing::warn!(
                node = node.addr(),
                shard,
                "node holds another shard's data of this cluster (its proxy left the cluster \
                 and came back without hearing it was freed); the shard owns no slots yet, \
                 so flushing it before serving"
            );
            flush_and_claim().await
        }
        "other-shard" => Err(format!(
            "node {} holds another shard's data of this cluster, not shard {shard}'s; \
             refusing to serve it as shard {shard}",
            node.addr()
        )),
        "foreign" => Err(format!(
            "node {} holds keys redmesh did not write; refusing to serve them to this cluster \
             (inspect the node, then FLUSHALL it to release it)",
            node.addr()
        )),
        other => Err(format!("unexpected ownership answer {other:?}")),
    }
}

/// Empties a node that holds redmesh data, after stopping replication.
async fn wipe(node: &Backend) -> Result<(), String> {
    stop_replicating(node).await?;
    let has = reply_ok(
        node.call(&["EVAL", HAS_MARKER_SCRIPT, "1", MARKER_KEY])
            .await
            .map_err(backend_err)?,
        "marker check",
    )?;
    if has == Frame::Integer(1) {
        tracing::info!(
            node = node.addr(),
            "proxy returned to the pool; wiping its cluster data"
        );
        flush(node).await?;
    }
    Ok(())
}

/// Empties every database of a node without blocking Redis while the memory
/// is freed (the keyspace is empty as soon as the command returns).
async fn flush(node: &Backend) -> Result<(), String> {
    let reply = node
        .call(&["FLUSHALL", "ASYNC"])
        .await
        .map_err(backend_err)?;
    reply_ok(reply, "FLUSHALL").map(|_| ())
}

/// What one local node should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTask {
    /// Its role.
    pub role: NodeRole,
    /// For a master: whether its shard owns slots
    /// ([`redmesh_model::Cluster::shard_owns_slots`]).
    pub shard_owns_slots: bool,
    /// For a replica: its master's address, or why it is unknown.
    pub master: Option<Result<Address, String>>,
    /// For a master: its shard's replicas' addresses, or why unknown.
    pub replicas: Vec<Result<Address, String>>,
}

impl Plan {
    /// The other proxies' nodes [`apply`] may ask (masters' replicas).
    pub fn remote_nodes(&self) -> Vec<String> {
        match self {
            Plan::Serve { nodes, .. } => nodes
                .iter()
                .flat_map(|t| t.replicas.iter().flatten().map(|a| a.to_string()))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// What the topology asks of the local nodes. Two equal plans need the same
/// work, so a view that changes nothing here (a password change, another
/// proxy's address) does not touch Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Leave the nodes alone: the proxy is unregistered, or the metadata
    /// is inconsistent.
    Untouched,
    /// Taken out of its cluster after a failure: keep the data (a master's
    /// may be the last copy of writes its replica missed), but stop
    /// replicating. A replica left attached to a healthy master could
    /// answer that master's `WAIT 1` in place of the replacement replica a
    /// failover would promote.
    Detach,
    /// Back in the pool: stop replicating and wipe redmesh data.
    Wipe,
    /// Serve the cluster with this uid.
    Serve {
        /// Cluster uid (ownership marker).
        uid: String,
        /// Password of the replication user ([`REPL_USER`]): masters
        /// accept it, replicas give it.
        repl_password: ReplPassword,
        /// Per node, in `redis_nodes` order.
        nodes: Box<[NodeTask; 2]>,
    },
}

/// The plan for `view`.
pub fn plan(view: &ProxyView) -> Plan {
    let Some(proxy) = view.proxy.as_ref() else {
        return Plan::Untouched;
    };
    match (proxy.state, view.cluster.as_ref()) {
        (ProxyState::Free, _) => Plan::Wipe,
        (ProxyState::Failed, _) => Plan::Detach,
        (ProxyState::Allocated, Some(cluster)) => Plan::Serve {
            uid: cluster.uid.clone(),
            repl_password: ReplPassword::of(cluster),
            nodes: Box::new(cluster.node_roles(&view.proxy_id).map(|role| {
                let address = |node: &redmesh_model::NodeRef, what: &str| {
                    view.member(&node.proxy_id)
                        .and_then(|p| p.node_address(node.node_index))
                        .cloned()
                        .ok_or_else(|| format!("{what} node of proxy {} is unknown", node.proxy_id))
                };
                let master = match &role {
                    NodeRole::Replica { master, .. } => Some(address(master, "master")),
                    _ => None,
                };
                let replicas = match &role {
                    NodeRole::Master { shard } => cluster
                        .shard(*shard)
                        .map(|s| s.replicas.iter().map(|r| address(r, "replica")).collect())
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                let shard_owns_slots = match &role {
                    NodeRole::Master { shard } => cluster.shard_owns_slots(*shard),
                    _ => false,
                };
                NodeTask {
                    role,
                    master,
                    replicas,
                    shard_owns_slots,
                }
            })),
        },
        _ => Plan::Untouched,
    }
}

/// What this process saw of its local nodes, by (node address, cluster
/// uid, shard). Found later without the shard's data, a node it served as
/// the shard's master, or saw hold the data as its replica, lost that data
/// (its Redis restarted empty).
#[derive(Debug, Default)]
pub struct Seen {
    /// Served as master. Such a node is not claimed again: it would serve
    /// the shard empty, and its replica, which holds the data, would then
    /// sync the emptiness. It stays unready ([`NodeReport::lost_data`], so
    /// the proxy asks to be failed over) until a failover promotes the
    /// replica (which its marker allows).
    served: std::collections::HashSet<(String, String, ShardId)>,
    /// Seen holding the marker as a replica: its confirmations may be the
    /// only reason a source deleted moved keys, so it is never promoted
    /// empty.
    synced: std::collections::HashSet<(String, String, ShardId)>,
}

/// Carries out `plan` on the local nodes (`nodes[i]` is `redis_nodes[i]`)
/// and reports per node, updating `seen`. `remote` reaches the nodes of
/// [`Plan::remote_nodes`] by address. Idempotent: only what differs is
/// changed.
pub async fn apply(
    plan: &Plan,
    nodes: &[Backend; 2],
    remote: &std::collections::HashMap<String, Backend>,
    seen: &mut Seen,
    client: &ClientPassword,
) -> Vec<NodeReport> {
    let mut out = Vec::new();
    if !matches!(plan, Plan::Serve { .. } | Plan::Untouched) {
        // Out of the cluster: its nodes are wiped or kept as they are, and
        // a later claim for the same cluster is a new one.
        seen.served.clear();
        seen.synced.clear();
    }
    match plan {
        Plan::Untouched => {}
        Plan::Detach => {
            for node in nodes {
                out.push(NodeReport {
                    addr: node.addr().to_owned(),
                    role: NodeRole::Idle,
                    master_addr: None,
                    outcome: stop_replicating(node).await,
                });
            }
        }
        Plan::Wipe => {
            for node in nodes {
                out.push(NodeReport {
                    addr: node.addr().to_owned(),
                    role: NodeRole::Idle,
                    master_addr: None,
                    outcome: wipe(node).await,
                });
            }
        }
        Plan::Serve {
            uid,
            repl_password,
            nodes: tasks,
        } => {
            for (node, task) in nodes.iter().zip(tasks.iter()) {
                // Client traffic runs as the restricted user, created only
                // once the node passed every check for its role: a Redis
                // that restarted empty lacks it, so no client request
                // reaches that node before this proxy has looked at it.
                let shard = match &task.role {
                    NodeRole::Master { shard } | NodeRole::Replica { shard, .. } => *shard,
                    NodeRole::Idle => 0,
                };
                let key = (node.addr().to_owned(), uid.clone(), shard);
                let outcome = match (&task.role, &task.master) {
                    (NodeRole::Master { .. }, _) => {
                        let was_served = seen.served.contains(&key);
                        let may_start_empty = !task.shard_owns_slots && !seen.synced.contains(&key);
                        let outcome = async {
                            ensure_master(node, uid, shard, may_start_empty).await?;
                            // A node without its shard's data is not claimed
                            // when it lost it: this process served it, or
                            // (asked only then) a replica holds the data.
                            if (was_served || task.shard_owns_slots)
                                && !holds_shard(node, uid, shard).await?
                            {
                                if was_served {
                                    return Err(lost_data(
                                        node,
                                        "after this proxy served it, so it is not claimed again",
                                    ));
                                }
                                no_replica_holds(node, &task.replicas, remote, uid, shard).await?;
                            }
                            claim(node, uid, shard, may_start_empty).await?;
                            ensure_repl_user(node, repl_password).await?;
                            ensure_client_user(node, client).await
                        }
                        .await;
                        if outcome.is_ok() {
                            seen.served.insert(key);
                        }
                        outcome
                    }
                    (NodeRole::Replica { .. }, Some(Ok(addr))) => {
                        let outcome =
                            match ensure_replica_of(node, addr.host(), addr.port(), repl_password)
                                .await
                            {
                                Ok(()) => ensure_client_user(node, client).await,
                                Err(e) => Err(e),
                            };
                        // Best effort: a replica still loading its first
                        // sync cannot run the check, and has not synced.
                        if outcome.is_ok() && holds_shard(node, uid, shard).await == Ok(true) {
                            seen.synced.insert(key);
                        }
                        outcome
                    }
                    (NodeRole::Replica { .. }, Some(Err(why))) => Err(why.clone()),
                    // Leave an idle node's data and replication alone: it
                    // may be the last copy after a failure.
                    _ => Ok(()),
                };
                if let Err(e) = &outcome {
                    tracing::warn!(node = node.addr(), error = %e, "local node not ready");
                }
                out.push(NodeReport {
                    addr: node.addr().to_owned(),
                    role: task.role.clone(),
                    master_addr: task
                        .master
                        .clone()
                        .and_then(Result::ok)
                        .map(|a| a.to_string()),
                    outcome,
                });
            }
        }
    }
    out
}
