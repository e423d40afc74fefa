//! redmeshctl: the operator CLI over the redmesh gRPC API.
//!
//! Human tables by default, the API's canonical JSON with `--json`. Exit
//! codes scripts can rely on: 0 success, 1 the server refused (the gRPC
//! status is printed), 2 bad usage, 3 the service is unreachable.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use redmesh_api::v1::{
    self, broker_client::BrokerClient, coordinator_client::CoordinatorClient,
    health_checker_client::HealthCheckerClient, topology_client::TopologyClient,
};
use redmesh_runtime::trace_context::{traced, TracedChannel};

mod migration;

#[derive(Debug, Parser)]
#[command(
    name = "redmeshctl",
    version,
    about = "Manage redmesh proxies and clusters"
)]
struct Cli {
    /// Broker gRPC URL.
    #[arg(
        long,
        global = true,
        env = "REDMESH_BROKER",
        default_value = "http://127.0.0.1:7400"
    )]
    broker: String,
    /// Coordinator gRPC URL (any coordinator: a standby names the leader).
    #[arg(
        long,
        global = true,
        env = "REDMESH_COORDINATOR",
        default_value = "http://127.0.0.1:7401"
    )]
    coordinator: String,
    /// Migrator gRPC URL (any migrator: every one answers).
    #[arg(
        long,
        global = true,
        env = "REDMESH_MIGRATOR",
        default_value = "http://127.0.0.1:7420"
    )]
    migrator: String,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The API token to send.
    #[command(flatten)]
    api_token: redmesh_runtime::ApiTokenArgs,
    /// TLS: --tls-ca to call the services over TLS, plus --tls-cert,
    /// --tls-key and --tls-client-auth where they require client
    /// certificates.
    #[command(flatten)]
    tls: redmesh_runtime::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the proxy pool.
    #[command(subcommand)]
    Proxy(ProxyCmd),
    /// Manage clusters.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Observe topology streams.
    #[command(subcommand)]
    Topology(TopologyCmd),
    /// Failover: leadership, degraded clusters, manual failover, decisions.
    #[command(subcommand)]
    Coordinator(CoordinatorCmd),
    /// Ask a health-checker for its verdicts.
    #[command(subcommand)]
    Health(HealthCmd),
    /// Observe and control slot migrations (scale tasks).
    #[command(subcommand)]
    Migration(MigrationCmd),
    /// Print a shell completion script, e.g.
    /// `redmeshctl completion bash > /etc/bash_completion.d/redmeshctl`.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum CoordinatorCmd {
    /// Who leads, degraded clusters, free proxies, failovers in progress.
    Status,
    /// Move mastership away from a proxy (graceful switchover by default).
    Failover {
        /// Cluster name.
        cluster: String,
        /// Proxy whose masters move to its chunk partner.
        proxy: String,
        /// Promote at once without waiting for the replica to catch up
        /// (may lose the writes it had not received).
        #[arg(long)]
        force: bool,
        /// Also mark the proxy failed and replace it from the free pool.
        #[arg(long)]
        replace: bool,
    },
    /// Stream the coordinator's decisions (Ctrl-C to stop).
    Events {
        /// Only this cluster's events.
        #[arg(long)]
        cluster: Option<String>,
        /// First show this many recent events.
        #[arg(long, default_value_t = 20)]
        recent: u32,
        /// Exit after the replayed events instead of waiting for new ones.
        #[arg(long)]
        no_follow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum HealthCmd {
    /// One checker's verdicts on every probed target.
    Report {
        /// Health-checker gRPC URL.
        #[arg(long, env = "REDMESH_CHECKER", default_value = "http://127.0.0.1:7410")]
        checker: String,
        /// Only this proxy's targets.
        #[arg(long)]
        proxy: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ProxyCmd {
    /// Add a proxy to the pool (or update its addresses).
    Register(RegisterArgs),
    /// List proxies.
    List {
        /// Only proxies in this state: free, allocated or failed.
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one proxy.
    Get {
        /// Proxy id.
        id: String,
    },
    /// Remove a proxy that serves no cluster.
    Remove {
        /// Proxy id.
        id: String,
    },
}

#[derive(Debug, Args)]
struct RegisterArgs {
    /// Stable proxy id.
    #[arg(long)]
    id: String,
    /// host:port clients connect to.
    #[arg(long)]
    resp: String,
    /// host:port of the proxy's RESP listener over TLS (its --tls-listen),
    /// shown to clients connected over TLS.
    #[arg(long)]
    resp_tls: Option<String>,
    /// host:port of the proxy's admin gRPC server.
    #[arg(long)]
    admin: String,
    /// Failure domain (machine, rack, zone).
    #[arg(long)]
    host: String,
    /// The two local Redis nodes, host:port,host:port.
    #[arg(long, value_delimiter = ',', required = true)]
    redis: Vec<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ClientModeArg {
    Cluster,
    Plain,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DurabilityArg {
    /// Acknowledge once the master has the write.
    Async,
    /// Acknowledge only after the replica confirmed it (WAIT 1).
    ReplicaAck,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CompressionArg {
    None,
    Lz4,
    Zstd,
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Create a cluster from free proxies.
    Create {
        /// Cluster name.
        name: String,
        /// Number of Redis nodes (a multiple of 4).
        #[arg(long)]
        nodes: u32,
        /// Read the AUTH password clients must use from standard input.
        #[arg(long)]
        password_stdin: bool,
        /// How clients connect: `cluster` (cluster-aware clients, MOVED
        /// redirects) or `plain` (any proxy serves every key).
        #[arg(long, value_enum, default_value_t = ClientModeArg::Cluster)]
        client_mode: ClientModeArg,
        /// Compress string values at least `--compression-threshold` bytes long.
        #[arg(long, value_enum, default_value_t = CompressionArg::None)]
        compression: CompressionArg,
        /// Smallest value, in bytes, that is compressed.
        #[arg(long, default_value_t = 256)]
        compression_threshold: u32,
        /// When a write is acknowledged: `async` (the master has it) or
        /// `replica-ack` (its replica confirmed it; survives a host loss).
        #[arg(long, value_enum, default_value_t = DurabilityArg::Async)]
        durability: DurabilityArg,
        /// Milliseconds a replica-ack write waits for its replica.
        #[arg(long, default_value_t = 100)]
        replica_ack_timeout_ms: u32,
    },
    /// Show one cluster.
    Get {
        /// Cluster name.
        name: String,
    },
    /// List clusters.
    List,
    /// Delete a cluster and return its proxies to the pool (its data is wiped).
    Delete {
        /// Cluster name.
        name: String,
    },
    /// Change a cluster's password (read from standard input; empty removes it).
    SetPassword {
        /// Cluster name.
        name: String,
    },
    /// Scale a cluster to a number of Redis nodes by moving slots live,
    /// then follow the migration with a progress bar.
    Scale {
        /// Cluster name.
        name: String,
        /// Target number of Redis nodes (a multiple of 4).
        nodes: u32,
        /// Print the plan only; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        rate: RateArgs,
        /// Return once the task is started instead of following it.
        #[arg(long)]
        detach: bool,
    },
}

/// A migration throttle.
#[derive(Debug, Clone, Args)]
struct RateArgs {
    /// Keys moved per second at most (0: unlimited).
    #[arg(long, default_value_t = 0)]
    rate_keys: u64,
    /// Bytes moved per second at most (0: unlimited).
    #[arg(long, default_value_t = 0)]
    rate_bytes: u64,
}

impl RateArgs {
    fn to_v1(&self) -> v1::MigrationRate {
        v1::MigrationRate {
            keys_per_second: self.rate_keys,
            bytes_per_second: self.rate_bytes,
        }
    }
}

#[derive(Debug, Subcommand)]
enum MigrationCmd {
    /// Show a task (by default the cluster's current or latest one).
    Get(TaskRef),
    /// List a cluster's tasks, newest first.
    List {
        /// Cluster name.
        cluster: String,
    },
    /// Follow a task with a progress bar until it ends.
    Watch(TaskRef),
    /// Stop moving data after the batch in flight.
    Pause(TaskRef),
    /// Continue a paused task.
    Resume(TaskRef),
    /// Stop a task and move back what it moved.
    Cancel(TaskRef),
    /// Change a task's throttle.
    Rate {
        #[command(flatten)]
        task: TaskRef,
        #[command(flatten)]
        rate: RateArgs,
    },
}

/// A cluster's migration task.
#[derive(Debug, Clone, Args)]
struct TaskRef {
    /// Cluster name.
    cluster: String,
    /// Task id; default: the cluster's current (or latest) task.
    #[arg(long, default_value = "")]
    task: String,
}

#[derive(Debug, Subcommand)]
enum TopologyCmd {
    /// Stream the topology views of one proxy (Ctrl-C to stop).
    Watch {
        /// Proxy id.
        proxy: String,
        /// Also print keepalives.
        #[arg(long)]
        keepalives: bool,
    },
}

/// The command's verbs ("cluster create"), naming its trace.
fn verbs(m: &clap::ArgMatches) -> String {
    let mut out = Vec::new();
    let mut cur = m;
    while let Some((name, sub)) = cur.subcommand() {
        out.push(name.to_owned());
        cur = sub;
    }
    out.join(" ")
}

#[tokio::main]
async fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // With OTEL_EXPORTER_OTLP_ENDPOINT set, the command is one trace: its
    // calls carry the context on to the services (W3C traceparent).
    if let Err(e) = redmesh_telemetry::init_tracing_only("redmeshctl") {
        eprintln!("warning: {e}; continuing without traces");
    }
    if let Err(e) = cli.api_token.install(false) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = cli.tls.install() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let span = tracing::info_span!(
        "redmeshctl",
        otel.name = %format!("redmeshctl {}", verbs(&matches)),
        otel.kind = "client",
    );
    let result = tracing::Instrument::instrument(run(cli), span).await;
    redmesh_telemetry::flush_traces().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(status) = e.downcast_ref::<tonic::Status>() {
                eprintln!("error: {}: {}", code_name(status.code()), status.message());
                // What a plaintext call to a TLS-only server gets back
                // (the connection is dropped during the HTTP/2 preface).
                let transport = matches!(
                    status.code(),
                    tonic::Code::Cancelled | tonic::Code::Internal | tonic::Code::Unknown
                ) && std::error::Error::source(status).is_some()
                    || status.message().contains("h2 protocol error");
                if transport && !redmesh_runtime::tls::client_tls() {
                    eprintln!(
                        "hint: the service may require TLS: pass --tls-ca (and --tls-cert, \
                         --tls-key and --tls-client-auth if it requires client certificates)"
                    );
                    return ExitCode::from(3);
                }
                return ExitCode::from(if status.code() == tonic::Code::Unavailable {
                    3
                } else {
                    1
                });
            }
            if e.downcast_ref::<tonic::transport::Error>().is_some() {
                eprintln!("error: {e:#}");
                return ExitCode::from(3);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
        .chars()
        .flat_map(|c| {
            if c.is_uppercase() {
                vec!['_', c]
            } else {
                vec![c.to_ascii_uppercase()]
            }
        })
        .collect::<String>()
        .trim_start_matches('_')
        .to_owned()
}

/// Connects to `service` (named in errors) at `url`. `streaming` drops the
/// per-request timeout, which would cut a watch short.
async fn channel(service: &str, url: &str, streaming: bool) -> anyhow::Result<TracedChannel> {
    let mut endpoint = redmesh_runtime::tls::endpoint(url)
        .with_context(|| format!("invalid {service} URL {url:?}"))?
        .connect_timeout(Duration::from_secs(3));
    if !streaming {
        endpoint = endpoint.timeout(Duration::from_secs(30));
    }
    endpoint
        .connect()
        .await
        .map(traced)
        .map_err(|e| anyhow::Error::new(e).context(format!("cannot reach the {service} at {url}")))
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn table(headers: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_header(headers.iter().copied());
    t
}

fn state_name(raw: i32) -> &'static str {
    match v1::ProxyState::try_from(raw) {
        Ok(v1::ProxyState::Free) => "free",
        Ok(v1::ProxyState::Allocated) => "allocated",
        Ok(v1::ProxyState::Failed) => "failed",
        _ => "?",
    }
}

fn print_proxies(proxies: &[v1::Proxy]) {
    let mut t = table(&[
        "ID",
        "STATE",
        "CLUSTER",
        "HOST",
        "RESP",
        "ADMIN",
        "REDIS NODES",
        "EPOCH",
    ]);
    for p in proxies {
        let s = p.spec.clone().unwrap_or_default();
        t.add_row(vec![
            s.id,
            state_name(p.state).to_owned(),
            p.cluster.clone(),
            s.host,
            match s.resp_tls_address.as_str() {
                "" => s.resp_address,
                tls => format!("{} tls:{tls}", s.resp_address),
            },
            s.admin_address,
            s.redis_nodes.join(","),
            p.epoch.to_string(),
        ]);
    }
    println!("{t}");
}

fn slot_summary(c: &v1::Cluster) -> Vec<(u32, String)> {
    c.slots
        .iter()
        .map(|a| {
            let r = a.range.unwrap_or_default();
            (a.shard_id, format!("{}-{}", r.start, r.end))
        })
        .collect()
}

/// `CLIENT_MODE_PLAIN` → `plain`.
fn enum_label(name: &str) -> String {
    name.rsplit('_').next().unwrap_or(name).to_lowercase()
}

/// Whether each replica of `c` has finished its sync, asked of the proxies
/// hosting replicas (`GetInfo`, one call per proxy, all at once); missing
/// when a proxy does not answer within 2 s.
async fn replica_sync(c: &v1::Cluster, proxies: &[v1::Proxy]) -> SyncStates {
    let hosting: std::collections::BTreeSet<&str> = c
        .shards
        .iter()
        .flat_map(|s| s.replicas.iter().map(|r| r.proxy_id.as_str()))
        .collect();
    let mut calls = tokio::task::JoinSet::new();
    for spec in proxies.iter().filter_map(|p| p.spec.as_ref()) {
        if !hosting.contains(spec.id.as_str()) {
            continue;
        }
        let (id, admin) = (spec.id.clone(), spec.admin_address.clone());
        calls.spawn(async move {
            let channel = redmesh_runtime::tls::endpoint(&admin)
                .ok()?
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(2))
                .connect()
                .await
                .ok()?;
            let info = v1::proxy_admin_client::ProxyAdminClient::new(traced(channel))
                .get_info(v1::GetInfoRequest::default())
                .await
                .ok()?
                .into_inner();
            Some((id, info.nodes))
        });
    }
    let mut out = SyncStates::new();
    while let Some(done) = calls.join_next().await {
        if let Ok(Some((id, nodes))) = done {
            for (index, n) in (0u32..).zip(nodes) {
                out.insert((id.clone(), index), n.synced);
            }
        }
    }
    out
}

/// Replica sync state by (proxy id, node index).
type SyncStates = std::collections::HashMap<(String, u32), bool>;

/// Replicas are listed as `proxy/node`; with `synced`, followed by
/// `(syncing)` while their first sync runs and `(?)` when their proxy did
/// not say.
fn print_cluster(c: &v1::Cluster, proxies: &[v1::Proxy], synced: Option<&SyncStates>) {
    let cfg = c.config.clone().unwrap_or_default();
    println!("cluster   {}", c.name);
    println!("uid       {}", c.uid);
    println!("nodes     {} ({} chunks)", c.node_count, c.chunks.len());
    println!("epoch     {}", c.epoch);
    println!(
        "password  {}",
        if cfg.password_set { "set" } else { "none" }
    );
    let plain = cfg.client_mode() == v1::ClientMode::Plain;
    println!("clients   {}", if plain { "plain" } else { "cluster" });
    if matches!(
        cfg.compression(),
        v1::Compression::Lz4 | v1::Compression::Zstd
    ) {
        println!(
            "compress  {} (values of {} bytes or more)",
            enum_label(cfg.compression().as_str_name()),
            cfg.compression_threshold
        );
    }
    if cfg.durability() == v1::Durability::ReplicaAck {
        println!(
            "durable   replica-ack (writes wait up to {} ms for their replica)",
            cfg.replica_ack_timeout_ms
        );
    }
    if let Some(task) = c.task.as_ref().filter(|t| !t.detail.is_empty()) {
        println!(
            "task      {} — {}",
            enum_label(task.kind().as_str_name()),
            task.detail
        );
    }
    let mut t = table(&[
        "SHARD",
        "MASTER (proxy/node)",
        "REPLICAS",
        "SLOTS",
        "CLIENT ADDRESS",
    ]);
    let slots = slot_summary(c);
    for s in &c.shards {
        let m = s.master.clone().unwrap_or_default();
        let addr = proxies
            .iter()
            .find(|p| p.spec.as_ref().is_some_and(|s| s.id == m.proxy_id))
            .and_then(|p| p.spec.as_ref().map(|s| s.resp_address.clone()))
            .unwrap_or_default();
        let replicas: Vec<String> = s
            .replicas
            .iter()
            .map(|r| {
                let state = match synced.map(|m| m.get(&(r.proxy_id.clone(), r.node_index))) {
                    None | Some(Some(true)) => "",
                    Some(Some(false)) => " (syncing)",
                    Some(None) => " (?)",
                };
                format!("{}/{}{state}", r.proxy_id, r.node_index)
            })
            .collect();
        let ranges: Vec<String> = slots
            .iter()
            .filter(|(id, _)| *id == s.id)
            .map(|(_, r)| r.clone())
            .collect();
        t.add_row(vec![
            s.id.to_string(),
            format!("{}/{}", m.proxy_id, m.node_index),
            replicas.join(","),
            ranges.join(","),
            addr,
        ]);
    }
    println!("{t}");
}

fn read_password() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading the password from standard input")?;
    Ok(s.trim_end_matches(['\r', '\n']).to_owned())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "redmeshctl", &mut std::io::stdout());
            return Ok(());
        }
        Command::Coordinator(cmd) => return coordinator(&cli.coordinator, cli.json, cmd).await,
        Command::Health(cmd) => return health(cli.json, cmd).await,
        Command::Migration(cmd) => return migration::run(&cli.migrator, cli.json, cmd).await,
        _ => {}
    }
    let streaming = matches!(cli.command, Command::Topology(_));
    let ch = channel("broker", &cli.broker, streaming).await?;
    let mut broker = BrokerClient::new(ch.clone());
    match cli.command {
        Command::Proxy(cmd) => match cmd {
            ProxyCmd::Register(a) => {
                let resp = broker
                    .register_proxy(v1::RegisterProxyRequest {
                        proxy: Some(v1::ProxySpec {
                            id: a.id,
                            resp_address: a.resp,
                            admin_address: a.admin,
                            host: a.host,
                            redis_nodes: a.redis,
                            resp_tls_address: a.resp_tls.unwrap_or_default(),
                        }),
                    })
                    .await?
                    .into_inner();
                if cli.json {
                    return print_json(&resp);
                }
                let p = resp.proxy.unwrap_or_default();
                let id = p.spec.map(|s| s.id).unwrap_or_default();
                println!(
                    "proxy {id} {} ({})",
                    if resp.changed {
                        "registered"
                    } else {
                        "unchanged"
                    },
                    state_name(p.state)
                );
            }
            ProxyCmd::List { state } => {
                let state = match state.as_deref() {
                    None => v1::ProxyState::Unspecified,
                    Some("free") => v1::ProxyState::Free,
                    Some("allocated") => v1::ProxyState::Allocated,
                    Some("failed") => v1::ProxyState::Failed,
                    Some(other) => {
                        anyhow::bail!("unknown state {other:?}: free, allocated or failed")
                    }
                };
                let resp = broker
                    .list_proxies(v1::ListProxiesRequest {
                        state: state as i32,
                    })
                    .await?
                    .into_inner();
                if cli.json {
                    return print_json(&resp);
                }
                print_proxies(&resp.proxies);
            }
            ProxyCmd::Get { id } => {
                let resp = broker
                    .get_proxy(v1::GetProxyRequest { id })
                    .await?
                    .into_inner();
                if cli.json {
                    return print_json(&resp);
                }
                print_proxies(&resp.proxy.into_iter().collect::<Vec<_>>());
            }
            ProxyCmd::Remove { id } => {
                let resp = broker
                    .deregister_proxy(v1::DeregisterProxyRequest { id: id.clone() })
                    .await?
                    .into_inner();
                if cli.json {
                    return print_json(&resp);
                }
                println!("proxy {id} removed");
            }
        },
        Command::Cluster(cmd) => match cmd {
            ClusterCmd::Create {
                name,
                nodes,
                password_stdin,
                client_mode,
                compression,
                compression_threshold,
                durability,
                replica_ack_timeout_ms,
            } => {
                let password = if password_stdin {
                    read_password()?
                } else {
                    String::new()
                };
                let resp = broker
                    .create_cluster(v1::CreateClusterRequest {
                        name,
                        node_count: nodes,
                        config: Some(v1::ClusterConfig {
                            password,
                            client_mode: match client_mode {
                                ClientModeArg::Cluster => v1::ClientMode::Cluster,
                                ClientModeArg::Plain => v1::ClientMode::Plain,
                            } as i32,
                            compression: match compression {
                                CompressionArg::None => v1::Compression::None,
                                CompressionArg::Lz4 => v1::Compression::Lz4,
                                CompressionArg::Zstd => v1::Compression::Zstd,
                            } as i32,
                            compression_threshold,
                            durability: match durability {
                                DurabilityArg::Async => v1::Durability::Async,
                                DurabilityArg::ReplicaAck => v1::Durability::ReplicaAck,
                            } as i32,
                            replica_ack_timeout_ms,
                            ..Default::default()
                        }),
                    })
                    .await?
                    .into_inner();
                if cli.json {
                    return print_json(&resp);
                }
                let c = resp.cluster.unwrap_or_default();
                let got = broker
                    .get_cluster(v1::GetClusterRequest {
                        name: c.name.clone(),
                    })
                    .await?
                    .into_inner();
                print_cluster(&c, &got.proxies, None);
            }
            ClusterCmd::Get { name } => {
                let resp = broker
                    .get_cluster(v1::GetClusterRequest { name })
                    .await?
                    .into_inner();
                if cli.json {
                    return print_json(&resp);
                }
                let c = resp.cluster.unwrap_or_default();
                let synced = replica_sync(&c, &resp.proxies).await;
                print_cluster(&c, &resp.proxies, Some(&synced));
            }
            ClusterCmd::List => {
                let resp = broker
                    .list_clusters(v1::ListClustersRequest {})
                    .await?
                    .into_inner();
                if cli.json {
                    return print_json(&resp);
                }
                let mut t = table(&["NAME", "NODES", "SHARDS", "EPOCH", "PASSWORD", "PROXIES"]);
                for c in &resp.clusters {
                    let proxies: Vec<String> = c
                        .chunks
                        .iter()
                        .flat_map(|ch| ch.proxy_ids.clone())
                        .collect();
                    t.add_row(vec![
                        c.name.clone(),
                        c.node_count.to_string(),
                        c.shards.len().to_string(),
                        c.epoch.to_string(),
                        if c.config.as_ref().is_some_and(|c| c.password_set) {
                            "set"
                        } else {
                            "none"
                        }
                        .to_owned(),
                        proxies.join(","),
                    ]);
                }
                println!("{t}");
            }
            ClusterCmd::Scale {
                name,
                nodes,
                dry_run,
                rate,
                detach,
            } => {
                let resp = broker
                    .scale_cluster(v1::ScaleClusterRequest {
                        name: name.clone(),
                        node_count: nodes,
                        dry_run,
                        rate: Some(rate.to_v1()),
                    })
                    .await?
                    .into_inner();
                let follows = !dry_run && !detach && !resp.task_id.is_empty();
                if cli.json && follows {
                    // The answer, then one progress document per line: a
                    // stream of JSON lines, so the answer is one line too.
                    println!("{}", serde_json::to_string(&resp)?);
                } else if cli.json {
                    print_json(&resp)?;
                } else {
                    migration::print_plan(&resp.plan.clone().unwrap_or_default());
                }
                if resp.task_id.is_empty() {
                    if !cli.json && !dry_run {
                        println!("nothing to do: cluster {name} already has {nodes} nodes");
                    }
                    return Ok(());
                }
                if detach {
                    if !cli.json {
                        println!(
                            "task {} started; follow it with: redmeshctl migration watch {name}",
                            resp.task_id
                        );
                    }
                    return Ok(());
                }
                let task = TaskRef {
                    cluster: name,
                    task: resp.task_id,
                };
                return migration::run(&cli.migrator, cli.json, MigrationCmd::Watch(task)).await;
            }
            ClusterCmd::Delete { name } => {
                let resp = broker
                    .delete_cluster(v1::DeleteClusterRequest { name: name.clone() })
                    .await?
                    .into_inner();
                if cli.json {
                    return print_json(&resp);
                }
                println!(
                    "cluster {name} deleted; proxies returned to the pool: {}",
                    resp.freed_proxies.join(", ")
                );
            }
            ClusterCmd::SetPassword { name } => {
                let password = read_password()?;
                let resp = broker
                    .update_cluster_config(v1::UpdateClusterConfigRequest {
                        name: name.clone(),
                        config: Some(v1::ClusterConfig {
                            password,
                            ..Default::default()
                        }),
                        update_paths: vec!["password".into()],
                    })
                    .await?
                    .into_inner();
                if cli.json {
                    return print_json(&resp);
                }
                let set = resp
                    .cluster
                    .and_then(|c| c.config)
                    .is_some_and(|c| c.password_set);
                println!(
                    "cluster {name}: password {}",
                    if set { "set" } else { "removed" }
                );
            }
        },
        Command::Topology(TopologyCmd::Watch { proxy, keepalives }) => {
            let mut client = TopologyClient::new(ch);
            let mut stream = client
                .watch_topology(v1::WatchTopologyRequest {
                    proxy_id: proxy,
                    known_epoch: 0,
                })
                .await?
                .into_inner();
            while let Some(msg) = stream.message().await? {
                use v1::watch_topology_response::Event;
                match &msg.event {
                    Some(Event::Keepalive(_)) if !keepalives => continue,
                    _ if cli.json => println!("{}", serde_json::to_string(&msg)?),
                    Some(Event::View(v)) => {
                        let state = v
                            .proxy
                            .as_ref()
                            .map_or("unregistered", |p| state_name(p.state));
                        let cluster = v.cluster.as_ref().map_or("-", |c| c.name.as_str());
                        println!(
                            "epoch {} state {state} cluster {cluster} members {}",
                            v.epoch,
                            v.members.len()
                        );
                    }
                    Some(Event::Keepalive(k)) => println!("keepalive epoch {}", k.epoch),
                    None => {}
                }
            }
        }
        Command::Coordinator(_)
        | Command::Health(_)
        | Command::Migration(_)
        | Command::Completion { .. } => {
            unreachable!("dispatched above")
        }
    }
    Ok(())
}

fn event_kind(raw: i32) -> String {
    v1::CoordinatorEventKind::try_from(raw).map_or_else(
        |_| format!("kind-{raw}"),
        |k| {
            k.as_str_name()
                .trim_start_matches("COORDINATOR_EVENT_KIND_")
                .to_lowercase()
        },
    )
}

fn print_event(ev: &v1::CoordinatorEvent) {
    let time = ev
        .time
        .and_then(|t| {
            let secs = u64::try_from(t.seconds).ok()?;
            let at = std::time::UNIX_EPOCH + Duration::new(secs, u32::try_from(t.nanos).ok()?);
            Some(humantime::format_rfc3339_millis(at).to_string())
        })
        .unwrap_or_default();
    let mut line = format!("{time} {}", event_kind(ev.kind));
    for (label, value) in [("cluster", &ev.cluster), ("proxy", &ev.proxy_id)] {
        if !value.is_empty() {
            line.push_str(&format!(" {label}={value}"));
        }
    }
    if ev.epoch != 0 {
        line.push_str(&format!(" epoch={}", ev.epoch));
    }
    if ev.duration_ms != 0 {
        line.push_str(&format!(" took={}ms", ev.duration_ms));
    }
    if !ev.detail.is_empty() {
        line.push_str(&format!(" — {}", ev.detail));
    }
    println!("{line}");
}

async fn coordinator(url: &str, json: bool, cmd: CoordinatorCmd) -> anyhow::Result<()> {
    let streaming = matches!(cmd, CoordinatorCmd::Events { .. });
    let mut client = CoordinatorClient::new(channel("coordinator", url, streaming).await?);
    match cmd {
        CoordinatorCmd::Status => {
            let st = client
                .get_status(v1::GetStatusRequest {})
                .await?
                .into_inner();
            if json {
                return print_json(&st);
            }
            let leader = if st.leader_id.is_empty() {
                "none elected".to_owned()
            } else {
                st.leader_id.clone()
            };
            println!(
                "coordinator {} ({})",
                st.self_id,
                if st.is_leader { "leader" } else { "standby" }
            );
            println!("leader      {leader}");
            println!("free        {} proxies", st.free_proxies);
            let degraded = if st.degraded_clusters.is_empty() {
                "none".to_owned()
            } else {
                st.degraded_clusters.join(", ")
            };
            println!("degraded    {degraded}");
            for ev in &st.in_progress {
                print!("in progress ");
                print_event(ev);
            }
        }
        CoordinatorCmd::Failover {
            cluster,
            proxy,
            force,
            replace,
        } => {
            let resp = client
                .failover(v1::FailoverRequest {
                    cluster,
                    proxy_id: proxy,
                    mode: if force {
                        v1::FailoverMode::Force
                    } else {
                        v1::FailoverMode::Switchover
                    } as i32,
                    replace,
                })
                .await?
                .into_inner();
            if json {
                return print_json(&resp);
            }
            if let Some(ev) = &resp.event {
                print_event(ev);
            }
        }
        CoordinatorCmd::Events {
            cluster,
            recent,
            no_follow,
        } => {
            let mut stream = client
                .watch_events(v1::WatchEventsRequest {
                    cluster: cluster.unwrap_or_default(),
                    recent,
                })
                .await?
                .into_inner();
            let mut replayed = 0;
            loop {
                // The replay arrives at once; --no-follow stops when the
                // stream goes quiet after it.
                let next = if no_follow {
                    if replayed >= recent {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                        Ok(m) => m?,
                        Err(_) => break,
                    }
                } else {
                    stream.message().await?
                };
                let Some(msg) = next else { break };
                replayed += 1;
                let Some(ev) = msg.event else { continue };
                if json {
                    println!("{}", serde_json::to_string(&ev)?);
                } else {
                    print_event(&ev);
                }
            }
        }
    }
    Ok(())
}

fn health_name(raw: i32) -> &'static str {
    match v1::HealthStatus::try_from(raw) {
        Ok(v1::HealthStatus::Up) => "up",
        Ok(v1::HealthStatus::Down) => "down",
        Ok(v1::HealthStatus::NotServing) => "not serving",
        _ => "unknown",
    }
}

fn target_name(t: &v1::TargetHealth) -> String {
    match v1::TargetKind::try_from(t.kind) {
        Ok(v1::TargetKind::ProxyResp) => "resp".to_owned(),
        Ok(v1::TargetKind::ProxyAdmin) => "admin".to_owned(),
        Ok(v1::TargetKind::RedisNode) => format!("redis/{}", t.node_index),
        _ => "?".to_owned(),
    }
}

async fn health(json: bool, cmd: HealthCmd) -> anyhow::Result<()> {
    let HealthCmd::Report { checker, proxy } = cmd;
    let mut client = HealthCheckerClient::new(channel("health-checker", &checker, false).await?);
    let report = client
        .get_report(v1::GetReportRequest {
            proxy_id: proxy.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if json {
        return print_json(&report);
    }
    println!("checker {}", report.checker_id);
    let mut t = table(&[
        "PROXY",
        "TARGET",
        "ADDRESS",
        "STATUS",
        "FAILURES",
        "RTT",
        "LAST ERROR",
    ]);
    for target in &report.targets {
        t.add_row(vec![
            target.proxy_id.clone(),
            target_name(target),
            target.address.clone(),
            health_name(target.status).to_owned(),
            target.consecutive_failures.to_string(),
            format!("{} µs", target.last_rtt_us),
            target.last_error.clone(),
        ]);
    }
    println!("{t}");
    Ok(())
}
