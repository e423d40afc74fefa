//! The proxy: a Redis Cluster protocol endpoint in front of two plain Redis
//! servers, configured entirely by the topology the broker pushes.
//!
//! Pieces: `topology` follows the broker stream, `nodes` reconciles the
//! local Redis roles, `routing` turns a view into a route table, `session`
//! serves clients over multiplexed `backend` connections, `admin` answers
//! the ProxyAdmin gRPC API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use redmesh_model::{ProxyId, ProxyView};
use redmesh_resp::Limits;
use redmesh_runtime::tls::{ClientCerts, TlsServer};
use redmesh_runtime::{grpc, CancellationToken, TelemetryArgs};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tonic::service::RoutesBuilder;

pub mod admin;
pub mod backend;
pub mod compress;
pub mod dedicated;
pub mod link;
pub mod locks;
pub mod migrate;
pub mod nodes;
pub mod routing;
pub mod session;
pub mod topology;

use backend::BackendOptions;
use link::Link;
use nodes::NodeReport;
use routing::{Links as _, RouteTable};

/// Proxy configuration (flags, with `REDMESH_*` environment overrides).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "redmesh-proxy",
    version,
    about = "redmesh proxy: Redis Cluster endpoint over plain Redis"
)]
pub struct Config {
    /// This proxy's registered id.
    #[arg(long, env = "REDMESH_PROXY_ID")]
    pub id: String,
    /// RESP listen address for clients.
    #[arg(long, env = "REDMESH_PROXY_LISTEN", default_value = "127.0.0.1:7001")]
    pub listen: String,
    /// Optional second RESP listener in plain-client mode: every key is
    /// served there by forwarding to its owner, for clients that know
    /// nothing of clusters.
    #[arg(long, env = "REDMESH_PROXY_PLAIN_LISTEN")]
    pub plain_listen: Option<String>,
    /// Optional RESP listener over TLS (`redis-cli --tls`), serving as
    /// --listen does, with --tls-cert and --tls-key (a renewed certificate
    /// is used from the next connection on). Register it as the proxy's
    /// resp_tls_address: clients connected over TLS are then shown every
    /// proxy's TLS address in redirections and CLUSTER SLOTS/NODES/SHARDS.
    #[arg(long, env = "REDMESH_PROXY_TLS_LISTEN")]
    pub tls_listen: Option<String>,
    /// Client certificates on the TLS listener, as Redis's tls-auth-clients:
    /// `no`, `optional` (verified if presented) or `yes` (required), signed
    /// by --tls-ca. Unlike Redis the default is `no`: clients prove who
    /// they are with the cluster password.
    #[arg(long, env = "REDMESH_PROXY_TLS_AUTH_CLIENTS", value_enum, default_value_t = ClientCerts::No, hide_possible_values = true)]
    pub tls_auth_clients: ClientCerts,
    /// ProxyAdmin gRPC listen address.
    #[arg(
        long,
        env = "REDMESH_PROXY_ADMIN_LISTEN",
        default_value = "127.0.0.1:7101"
    )]
    pub admin_listen: String,
    /// Broker gRPC URLs, comma-separated; the proxy follows any that answers.
    #[arg(
        long = "broker",
        env = "REDMESH_BROKERS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7400"
    )]
    pub brokers: Vec<String>,
    /// Longest wait for a reply from a local Redis node.
    #[arg(long, env = "REDMESH_PROXY_BACKEND_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub backend_timeout: Duration,
    /// Largest bulk string accepted from clients, in bytes.
    #[arg(long, env = "REDMESH_PROXY_MAX_BULK_LEN", default_value_t = 512 * 1024 * 1024)]
    pub max_bulk_len: usize,
    /// Most arguments in one client request.
    #[arg(long, env = "REDMESH_PROXY_MAX_MULTIBULK_LEN", default_value_t = 1024 * 1024)]
    pub max_multibulk_len: usize,
    /// Most client connections at once (peer proxies included); one more is
    /// answered `-ERR max number of clients reached` and closed, as Redis's
    /// `maxclients` does.
    #[arg(long, env = "REDMESH_PROXY_MAX_CLIENTS", default_value_t = 10_000)]
    pub max_clients: usize,
    /// Close a client after this long without a request (0: never, as
    /// Redis's `timeout 0`). Clients blocked in a command or subscribed are
    /// never idle.
    #[arg(long, env = "REDMESH_PROXY_CLIENT_TIMEOUT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub client_timeout: Duration,
    /// A request whose first bytes arrived must be complete within this
    /// long (0: no limit), or the client gets an error and is closed, so
    /// clients that trickle partial requests (slowloris) cannot hold
    /// connections and buffers for ever.
    #[arg(long, env = "REDMESH_PROXY_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Refuse writes after this long without word from any broker (views
    /// and keepalives arrive every ~250 ms). Keep it below failure detection
    /// plus failover time, so a proxy cut off from the control plane stops
    /// writing before its replacement starts (DESIGN.md §5).
    #[arg(long, env = "REDMESH_PROXY_FENCE_AFTER", default_value = "750ms", value_parser = humantime::parse_duration)]
    pub fence_after: Duration,
    /// Trace one command in this many (0: none), as a span from dispatch
    /// to reply with its result (`ok`, `moved`, `ask`…). Spans are exported
    /// only when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(long, env = "REDMESH_PROXY_TRACE_EVERY", default_value_t = 1000)]
    pub trace_every: u64,
    /// Runtime worker threads; 0 means one per CPU. A proxy sharing a small
    /// host with its two redis-server nodes serves more with fewer threads
    /// (fewer cross-thread wake-ups; see docs/PERFORMANCE.md).
    #[arg(long, env = "REDMESH_PROXY_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// During a migration, keys using more memory than this (bytes, as
    /// Redis's MEMORY USAGE estimates it) are copied in pieces of 1000
    /// elements or 512 KiB rather than by one DUMP/RESTORE, so neither
    /// Redis node is blocked for long by one huge key.
    #[arg(long, env = "REDMESH_PROXY_MIGRATE_BIG_KEY_BYTES", default_value_t = 1 << 20)]
    pub migrate_big_key_bytes: u64,
    /// The API token calls must carry.
    #[command(flatten)]
    pub api_token: redmesh_runtime::ApiTokenArgs,
    /// TLS on the gRPC API.
    #[command(flatten)]
    pub tls: redmesh_runtime::TlsArgs,
    /// Logging and metrics.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Runs the proxy until `shutdown`, then drains client connections.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let proxy_id = ProxyId::parse(&config.id).context("invalid --id")?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen for clients on {}", config.listen))?;
    let plain_listener = match &config.plain_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for plain clients on {addr}"))?,
        ),
        None => None,
    };
    let tls_listener = match &config.tls_listen {
        Some(addr) => {
            let server = redmesh_runtime::tls::server(&[], config.tls_auth_clients)
                .context("cannot serve RESP over TLS (--tls-listen)")?;
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for TLS clients on {addr}"))?;
            Some((l, server))
        }
        None => None,
    };
    let admin_listener = grpc::bind(&config.admin_listen).await?;
    let feed = topology::spawn(
        config.brokers.clone(),
        proxy_id.clone(),
        config.fence_after,
        shutdown.clone(),
    );
    let (table_tx, table_rx) = watch::channel(Arc::new(RouteTable::empty()));
    let reports = Arc::new(Mutex::new(Vec::new()));
    let opts = BackendOptions {
        reply_timeout: config.backend_timeout,
        ..BackendOptions::default()
    };
    let retired = Arc::new(routing::Retired::default());
    let (lost_tx, lost_rx) = watch::channel(false);
    tokio::spawn(reconcile_loop(
        feed.subscribe(),
        table_tx,
        retired.clone(),
        reports.clone(),
        lost_tx,
        opts,
        shutdown.clone(),
    ));
    tokio::spawn(report_freshness(feed.clone(), shutdown.clone()));
    let shared = Arc::new(session::Shared {
        proxy_id: proxy_id.clone(),
        table: table_rx.clone(),
        limits: Limits {
            max_bulk_len: config.max_bulk_len,
            max_multibulk_len: config.max_multibulk_len,
            ..Limits::default()
        },
        next_client_id: AtomicU64::new(1),
        clients: AtomicU64::new(0),
        feed: feed.clone(),
        fence_after: config.fence_after,
        trace_every: config.trace_every,
        locks: Arc::default(),
        max_clients: config.max_clients,
        client_timeout: nonzero(config.client_timeout),
        request_timeout: nonzero(config.request_timeout),
    });
    let mover = Arc::new(migrate::Mover {
        shared: shared.clone(),
        retired,
        barrier_epoch: Mutex::new(0),
        big_key_bytes: config.migrate_big_key_bytes,
    });
    let admin = admin::Admin {
        shared: shared.clone(),
        feed,
        table: table_rx,
        reports,
        started_at: SystemTime::now(),
        mover,
    };
    let mut routes = RoutesBuilder::default();
    routes.add_service(redmesh_api::v1::proxy_admin_server::ProxyAdminServer::new(
        admin,
    ));
    let health = grpc::with_health_and_reflection(&mut routes, &["redmesh.v1.ProxyAdmin"]).await?;
    tokio::spawn(report_lost_data(health.clone(), lost_rx, shutdown.clone()));
    let admin_task = tokio::spawn(grpc::serve(
        admin_listener,
        routes,
        Some(health),
        shutdown.clone(),
    ));
    tracing::info!(id = %proxy_id, listen = %config.listen, admin = %config.admin_listen, brokers = ?config.brokers, "proxy serving");

    let sessions = TaskTracker::new();
    let accepts = TaskTracker::new();
    accepts.spawn(accept_loop(
        listener,
        None,
        session::ListenerMode::Configured,
        shared.clone(),
        sessions.clone(),
        shutdown.clone(),
    ));
    if let Some(l) = plain_listener {
        tracing::info!(listen = ?config.plain_listen, "plain-client listener serving");
        accepts.spawn(accept_loop(
            l,
            None,
            session::ListenerMode::Plain,
            shared.clone(),
            sessions.clone(),
            shutdown.clone(),
        ));
    }
    if let Some((l, server)) = tls_listener {
        tracing::info!(listen = ?config.tls_listen, clients = ?config.tls_auth_clients, "TLS listener serving");
        accepts.spawn(accept_loop(
            l,
            Some(server),
            session::ListenerMode::Configured,
            shared.clone(),
            sessions.clone(),
            shutdown.clone(),
        ));
    }
    accepts.close();
    accepts.wait().await;
    sessions.close();
    if tokio::time::timeout(session::DRAIN_TIMEOUT, sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("some client connections did not drain in time");
    }
    let _ = admin_task.await;
    tracing::info!("proxy stopped");
    Ok(())
}

/// Accepts clients until `shutdown` (over TLS with `tls`); each session is
/// tracked for draining.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<TlsServer>,
    mode: session::ListenerMode,
    shared: Arc<session::Shared>,
    sessions: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Counted here, not in the session, so a burst of
                    // connects cannot slip past the cap.
                    if shared.clients.fetch_add(1, Ordering::Relaxed) >= shared.max_clients as u64 {
                        shared.clients.fetch_sub(1, Ordering::Relaxed);
                        metrics::counter!(session::CLIENTS_REJECTED, "reason" => "max_clients").increment(1);
                        tracing::debug!(%peer, max = shared.max_clients, "client refused: max clients reached");
                        // Best effort and never waiting, as Redis does: the
                        // accept loop must not be held up by a refused client.
                        let _ = stream.try_write(b"-ERR max number of clients reached\r\n");
                        continue;
                    }
                    let shared = shared.clone();
                    let stop = shutdown.clone();
                    let tls = tls.clone();
                    sessions.spawn(async move {
                        metrics::gauge!("redmesh_proxy_client_connections").increment(1.0);
                        match tls {
                            None => session::serve(stream, mode, shared.clone(), stop).await,
                            Some(server) => {
                                session::serve_tls(stream, &server, mode, shared.clone(), stop)
                                    .await
                            }
                        }
                        shared.clients.fetch_sub(1, Ordering::Relaxed);
                        metrics::gauge!("redmesh_proxy_client_connections").decrement(1.0);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// `None` for a zero duration (the flags' "off").
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Re-check the local nodes this often even when nothing changed (and
/// retry this often while one is not ready), so a Redis that restarted and
/// forgot its role is corrected, and one that restarted empty is reported
/// (and failed over) soon. A check is a few commands per node.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Applies every new view to the local nodes, then publishes its route
/// table. A view whose node plan equals the last applied one is installed
/// at once; nodes are re-checked every `CHECK_EVERY`.
async fn reconcile_loop(
    mut views: watch::Receiver<Option<Arc<ProxyView>>>,
    table_tx: watch::Sender<Arc<RouteTable>>,
    retired: Arc<routing::Retired>,
    reports_out: Arc<Mutex<Vec<NodeReport>>>,
    lost_out: watch::Sender<bool>,
    opts: BackendOptions,
    shutdown: CancellationToken,
) {
    // Chosen per process: a restarted proxy sets its own on its nodes.
    let client_password = nodes::ClientPassword::random();
    let mut links = LinkPool::new(opts, client_password.identity());
    let mut current: Option<Arc<ProxyView>> = None;
    let mut applied: Option<(nodes::Plan, Vec<NodeReport>)> = None;
    let mut seen = nodes::Seen::default();
    loop {
        let mut recheck = false;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = views.changed() => {
                if changed.is_err() {
                    return;
                }
                current = views.borrow_and_update().clone();
            }
            _ = tokio::time::sleep(CHECK_EVERY), if current.is_some() => recheck = true,
        }
        let Some(view) = current.clone() else {
            continue;
        };
        let Some(proxy) = view.proxy.as_ref() else {
            let table = RouteTable::build_unregistered(&view).after(&table_tx.borrow());
            let old = table_tx.send_replace(Arc::new(table));
            retired.retire(&old);
            applied = None;
            continue;
        };
        links.begin();
        let admins = proxy
            .spec
            .redis_nodes
            .clone()
            .map(|a| links.node(a.as_str()).admin().clone());
        let plan = nodes::plan(&view);
        let reports = match &applied {
            Some((last, reports))
                if !recheck && *last == plan && reports.iter().all(NodeReport::ready) =>
            {
                reports.clone()
            }
            _ => {
                let remote = plan
                    .remote_nodes()
                    .into_iter()
                    .map(|a| {
                        let admin = routing::Links::remote_node(&mut links, &a).admin().clone();
                        (a, admin)
                    })
                    .collect();
                nodes::apply(&plan, &admins, &remote, &mut seen, &client_password).await
            }
        };
        *reports_out.lock().unwrap_or_else(|e| e.into_inner()) = reports.clone();
        lost_out.send_if_modified(|lost| {
            let now = reports.iter().any(NodeReport::lost_data);
            std::mem::replace(lost, now) != now
        });
        let table = RouteTable::build(&view, &mut links, &reports).after(&table_tx.borrow());
        links.finish();
        if table.epoch != table_tx.borrow().epoch || !recheck {
            tracing::info!(
                epoch = table.epoch,
                serving = table.serving.is_ok(),
                "route table installed"
            );
        }
        let old = table_tx.send_replace(Arc::new(table));
        retired.retire(&old);
        applied = Some((plan, reports));
    }
}

/// Answers the health-checkers NOT_SERVING (gRPC health of the admin
/// server) while a local master node lost its shard's data and its replica
/// holds it: a quorum of checkers hearing that makes the coordinator fail
/// this proxy over, promoting the replica. Only a failover brings such a
/// shard back, and the checkers' PING of the node itself cannot tell (the
/// restarted Redis answers).
async fn report_lost_data(
    reporter: grpc::HealthReporter,
    mut lost: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = lost.changed() => if changed.is_err() { return },
        }
        let lost = *lost.borrow_and_update();
        if shutdown.is_cancelled() {
            return;
        }
        if lost {
            tracing::error!("a master node lost its shard's data; asking to be failed over (health NOT_SERVING)");
        }
        grpc::set_serving(&reporter, !lost).await;
    }
}

/// Links by address and identity, kept across epochs; links no table uses
/// any more are dropped after each build (closing their connections).
struct LinkPool {
    opts: BackendOptions,
    /// Identity of client traffic to local nodes.
    client: (String, String),
    nodes: HashMap<String, Link>,
    /// Other proxies' nodes (migration targets).
    remote: HashMap<String, Link>,
    peers: HashMap<(String, String), Link>,
    used_nodes: std::collections::HashSet<String>,
    used_remote: std::collections::HashSet<String>,
    used_peers: std::collections::HashSet<(String, String)>,
}

impl LinkPool {
    fn new(opts: BackendOptions, client: (String, String)) -> Self {
        Self {
            opts,
            client,
            nodes: HashMap::new(),
            remote: HashMap::new(),
            peers: HashMap::new(),
            used_nodes: Default::default(),
            used_remote: Default::default(),
            used_peers: Default::default(),
        }
    }

    fn begin(&mut self) {
        self.used_nodes.clear();
        self.used_remote.clear();
        self.used_peers.clear();
    }

    fn finish(&mut self) {
        let (un, ur, up) = (&self.used_nodes, &self.used_remote, &self.used_peers);
        self.nodes.retain(|k, _| un.contains(k));
        self.remote.retain(|k, _| ur.contains(k));
        self.peers.retain(|k, _| up.contains(k));
    }
}

impl routing::Links for LinkPool {
    fn node(&mut self, addr: &str) -> Link {
        self.used_nodes.insert(addr.to_owned());
        let opts = self.opts;
        let client = &self.client;
        self.nodes
            .entry(addr.to_owned())
            .or_insert_with(|| Link::node(addr, Some(client.clone()), opts))
            .clone()
    }

    fn remote_node(&mut self, addr: &str) -> Link {
        self.used_remote.insert(addr.to_owned());
        let opts = self.opts;
        self.remote
            .entry(addr.to_owned())
            .or_insert_with(|| Link::node(addr, None, opts))
            .clone()
    }

    fn peer(&mut self, addr: &str, secret: &str) -> Link {
        let key = (addr.to_owned(), secret.to_owned());
        self.used_peers.insert(key.clone());
        let opts = self.opts;
        self.peers
            .entry(key)
            .or_insert_with(|| {
                Link::new(
                    addr,
                    (routing::PEER_USER.to_owned(), secret.to_owned()),
                    opts,
                )
            })
            .clone()
    }
}

/// Exports how old the topology is, every second. Error counters are
/// exported at zero from the start, so `rate()` and alerts see the first one.
async fn report_freshness(feed: topology::TopologyFeed, shutdown: CancellationToken) {
    for kind in ["connect", "write", "timeout"] {
        metrics::counter!("redmesh_proxy_backend_errors_total", "kind" => kind).increment(0);
    }
    metrics::counter!("redmesh_proxy_replica_ack_failures_total").increment(0);
    metrics::counter!(session::TLS_HANDSHAKE_FAILURES).increment(0);
    for reason in ["max_clients", "idle", "request_timeout"] {
        metrics::counter!(session::CLIENTS_REJECTED, "reason" => reason).increment(0);
    }
    for side in ["source", "destination"] {
        metrics::counter!("redmesh_proxy_migration_unconfirmed_total", "side" => side).increment(0);
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Some(age) = feed.age() {
                    metrics::gauge!("redmesh_proxy_topology_age_seconds").set(age.as_secs_f64());
                }
            }
        }
    }
}
