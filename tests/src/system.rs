//! A whole local redmesh system for e2e tests: etcd, a broker and proxies,
//! each proxy with two real Redis nodes, all on free ports, started from the
//! built binaries and killed on drop.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use redmesh_api::v1::{self, broker_client::BrokerClient};
use redmesh_runtime::trace_context::{traced, TracedChannel};

use crate::harness::{bin_path, raw_exchange, wait_until};
use crate::{free_port, Child, Etcd, Redis};

/// A running redmesh service binary with a gRPC port.
pub struct Service {
    /// gRPC address `127.0.0.1:PORT`.
    pub addr: String,
    /// Prometheus `/metrics` address `127.0.0.1:PORT`.
    pub metrics: String,
    /// Process.
    pub child: Child,
    binary: String,
    listen_flag: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("addr", &self.addr).finish()
    }
}

impl Service {
    /// Starts `binary` with `args` plus `--listen <free port>` and
    /// `--metrics-listen <free port>`, and waits until its gRPC health
    /// check answers SERVING.
    pub fn start(binary: &str, listen_flag: &str, args: &[String]) -> Self {
        Self::start_env(binary, listen_flag, args, &[])
    }

    /// [`Service::start`] with extra environment variables.
    pub fn start_env(
        binary: &str,
        listen_flag: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        Self::start_full(binary, listen_flag, &addr, args, env)
    }

    fn start_full(
        binary: &str,
        listen_flag: &str,
        addr: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = addr.to_owned();
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut args = args.to_vec();
        args.extend(["--metrics-listen".to_owned(), metrics.clone()]);
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = Self::spawn(binary, listen_flag, &addr, &args, &env, &dir);
        let mut svc = Self {
            addr,
            metrics,
            child,
            binary: binary.to_owned(),
            listen_flag: listen_flag.to_owned(),
            args,
            env,
            dir,
        };
        svc.wait_serving();
        svc
    }

    fn spawn(
        binary: &str,
        listen_flag: &str,
        addr: &str,
        args: &[String],
        env: &[(String, String)],
        dir: &tempfile::TempDir,
    ) -> Child {
        let mut cmd = Command::new(bin_path(binary));
        cmd.arg(listen_flag)
            .arg(addr)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)));
        Child::spawn(binary, cmd, &dir.path().join("log"))
    }

    /// Kills the process (SIGKILL).
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Starts the process again on the same address and waits until it serves.
    pub fn restart(&mut self) {
        self.child.kill();
        self.child = Self::spawn(
            &self.binary,
            &self.listen_flag,
            &self.addr,
            &self.args,
            &self.env,
            &self.dir,
        );
        self.wait_serving();
    }

    /// URL of the gRPC endpoint: `https://` once the test installed TLS
    /// options (`redmesh_runtime::TlsArgs::install`).
    pub fn url(&self) -> String {
        redmesh_runtime::tls::url(&self.addr)
    }

    fn wait_serving(&mut self) {
        let url = self.url();
        let name = format!("{:?}", self.child);
        let child = &mut self.child;
        wait_until(&name, Duration::from_secs(20), || {
            assert!(!child.exited(), "{name} exited:\n{}", child.log_tail());
            grpc_serving(&url)
        });
    }

    /// Log tail, for failure messages.
    pub fn log(&self) -> String {
        self.child.log_tail()
    }

    /// The whole log.
    pub fn log_text(&self) -> String {
        self.child.log_text()
    }
}

/// Whether the gRPC server at `url` answers its health check with SERVING.
pub fn grpc_serving(url: &str) -> bool {
    let url = url.to_owned();
    run_blocking(async move {
        let Ok(ch) = redmesh_runtime::tls::endpoint(&url)
            .expect("url")
            .connect_timeout(Duration::from_millis(300))
            .connect()
            .await
        else {
            return false;
        };
        let mut client = tonic_health::pb::health_client::HealthClient::new(ch);
        matches!(
            client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await,
            Ok(r) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        )
    })
}

/// Runs a future to completion on a private runtime (usable from sync code
/// and from inside async tests alike).
pub fn run_blocking<F: std::future::Future + Send + 'static>(fut: F) -> F::Output
where
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(fut)
    })
    .join()
    .expect("helper thread panicked")
}

/// One proxy process and its two Redis nodes.
pub struct ProxyNode {
    /// Proxy id.
    pub id: String,
    /// Failure domain it is registered with.
    pub host: String,
    /// RESP address.
    pub resp: String,
    /// Second RESP address, always in plain-client mode.
    pub plain: String,
    /// RESP-over-TLS address, when the system runs with a TLS certificate
    /// (REDMESH_TLS_CERT in its environment).
    pub tls: Option<String>,
    /// Admin gRPC address.
    pub admin: String,
    /// Prometheus `/metrics` address.
    pub metrics: String,
    /// Its Redis nodes.
    pub redis: [Redis; 2],
    /// The proxy process (None while stopped).
    pub child: Option<Child>,
    /// Extra environment of the process.
    env: Vec<(String, String)>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for ProxyNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyNode")
            .field("id", &self.id)
            .field("resp", &self.resp)
            .finish()
    }
}

impl ProxyNode {
    /// kill -9 of the proxy and both its Redis nodes: its host is lost.
    pub fn kill_host(&mut self) {
        self.child.as_mut().expect("a running proxy").kill();
        self.redis[0].kill();
        self.redis[1].kill();
    }

    /// Starts the proxy process (again) following `brokers`.
    pub fn start(&mut self, brokers: &str) {
        let mut cmd = Command::new(bin_path("redmesh-proxy"));
        cmd.args([
            "--id",
            &self.id,
            "--listen",
            &self.resp,
            "--plain-listen",
            &self.plain,
            "--admin-listen",
            &self.admin,
            "--broker",
            brokers,
            "--metrics-listen",
            &self.metrics,
        ]);
        if let Some(tls) = &self.tls {
            cmd.args(["--tls-listen", tls]);
        }
        // Tests run many processes on few cores; a keepalive held up by
        // load must not fence writes in tests that are not about fencing.
        // Those that are set REDMESH_PROXY_FENCE_AFTER.
        if !self
            .env
            .iter()
            .any(|(k, _)| k == "REDMESH_PROXY_FENCE_AFTER")
        {
            cmd.args(["--fence-after", "3s"]);
        }
        cmd.env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = Child::spawn("redmesh-proxy", cmd, &self.log);
        let resp = self.resp.clone();
        wait_until(
            &format!("proxy {}", self.id),
            Duration::from_secs(20),
            || {
                assert!(!child.exited(), "proxy exited:\n{}", child.log_tail());
                raw_exchange(&resp, b"PING\r\n")
                    .map(|r| r.starts_with(b"+PONG"))
                    .unwrap_or(false)
            },
        );
        self.child = Some(child);
    }

    /// A client of the proxy's admin gRPC API.
    /// (Its calls carry the test process's API token, if it installed one.)
    pub async fn admin_client(&self) -> v1::proxy_admin_client::ProxyAdminClient<TracedChannel> {
        let channel = redmesh_runtime::tls::endpoint(&self.admin)
            .expect("admin url")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("admin API of {}: {e}", self.id));
        v1::proxy_admin_client::ProxyAdminClient::new(traced(channel))
    }

    /// The registration spec.
    pub fn spec(&self) -> v1::ProxySpec {
        v1::ProxySpec {
            id: self.id.clone(),
            resp_address: self.resp.clone(),
            admin_address: self.admin.clone(),
            host: self.host.clone(),
            redis_nodes: self.redis.iter().map(|r| r.addr.clone()).collect(),
            resp_tls_address: self.tls.clone().unwrap_or_default(),
        }
    }

    /// Log tail, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .map(|t| {
                t.lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }

    /// The whole log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// etcd + broker + proxies.
pub struct System {
    /// etcd.
    pub etcd: Etcd,
    /// The broker.
    pub broker: Service,
    /// Proxies, alternating between hosts `host-a` and `host-b`.
    pub proxies: Vec<ProxyNode>,
    /// Where the broker expects the migrator (see [`System::start_migrator`]).
    pub migrator_addr: String,
    /// Extra environment of every service the system starts.
    env: Vec<(String, String)>,
}

impl std::fmt::Debug for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("System")
            .field("broker", &self.broker.addr)
            .field("proxies", &self.proxies)
            .finish()
    }
}

impl System {
    /// Starts etcd, a broker and `n` proxies (not yet registered).
    pub fn start(n: usize) -> Self {
        Self::start_env(n, &[])
    }

    /// [`System::start`] with extra environment for the broker, the proxies
    /// and every service started later through the system
    /// ([`System::start_migrator`], [`System::start_service`]), so a setting
    /// such as the trace exporter reaches every process of the system.
    pub fn start_env(n: usize, env: &[(&str, &str)]) -> Self {
        let etcd = Etcd::start();
        let migrator_addr = format!("127.0.0.1:{}", free_port());
        let broker = Service::start_env(
            "redmesh-broker",
            "--listen",
            &[
                "--etcd".into(),
                etcd.endpoint.clone(),
                "--migrator".into(),
                migrator_addr.clone(),
            ],
            env,
        );
        let mut proxies = Vec::new();
        for i in 0..n {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut p = ProxyNode {
                id: format!("proxy-{i}"),
                host: if i % 2 == 0 { "host-a" } else { "host-b" }.into(),
                resp: format!("127.0.0.1:{}", free_port()),
                plain: format!("127.0.0.1:{}", free_port()),
                tls: env
                    .iter()
                    .any(|(k, _)| *k == "REDMESH_TLS_CERT")
                    .then(|| format!("127.0.0.1:{}", free_port())),
                admin: format!("127.0.0.1:{}", free_port()),
                metrics: format!("127.0.0.1:{}", free_port()),
                redis: [Redis::start(), Redis::start()],
                child: None,
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                log: dir.path().join("proxy.log"),
                _dir: dir,
            };
            p.start(&broker.url());
            proxies.push(p);
        }
        Self {
            etcd,
            broker,
            proxies,
            migrator_addr,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// Starts a migrator at the address the broker forwards scale
    /// requests to (one at a time there; standbys use
    /// [`System::start_service`]).
    pub fn start_migrator(&self, id: &str, extra: &[&str]) -> Service {
        Service::start_full(
            "redmesh-migrator",
            "--listen",
            &self.migrator_addr,
            &self.service_args(id, extra),
            &self.env(),
        )
    }

    /// Starts a control-plane service (`redmesh-coordinator`,
    /// `redmesh-health-checker`…) on this system's etcd as `id`, with
    /// `extra` arguments.
    pub fn start_service(&self, binary: &str, id: &str, extra: &[&str]) -> Service {
        Service::start_env(
            binary,
            "--listen",
            &self.service_args(id, extra),
            &self.env(),
        )
    }

    /// A control-plane service's arguments: this system's etcd, `id`, then
    /// `extra`.
    fn service_args(&self, id: &str, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            "--etcd".to_owned(),
            self.etcd.endpoint.clone(),
            "--id".to_owned(),
            id.to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Three health-checkers and a coordinator, once it leads.
    pub async fn start_control_plane(&self) -> ([Service; 3], Service) {
        let checkers = [
            self.start_service("redmesh-health-checker", "hc-a", &[]),
            self.start_service("redmesh-health-checker", "hc-b", &[]),
            self.start_service("redmesh-health-checker", "hc-c", &[]),
        ];
        let co = self.start_service("redmesh-coordinator", "co-1", &[]);
        crate::harness::eventually("a coordinator leader", Duration::from_secs(20), || async {
            coordinator_status(&co).await.is_leader.then_some(())
        })
        .await;
        (checkers, co)
    }

    /// A cluster and its proxies, as the broker reports them.
    pub async fn get_cluster(&self, name: &str) -> (v1::Cluster, Vec<v1::Proxy>) {
        let r = self
            .broker()
            .await
            .get_cluster(v1::GetClusterRequest { name: name.into() })
            .await
            .expect("get cluster")
            .into_inner();
        (r.cluster.expect("cluster"), r.proxies)
    }

    /// A broker client.
    /// (Its calls carry the test process's API token, if it installed one.)
    pub async fn broker(&self) -> BrokerClient<TracedChannel> {
        let channel = redmesh_runtime::tls::endpoint(&self.broker.url())
            .expect("broker url")
            .connect()
            .await
            .expect("connect to broker");
        BrokerClient::new(traced(channel))
    }

    /// Registers every proxy.
    pub async fn register_all(&self) {
        let mut b = self.broker().await;
        for p in &self.proxies {
            b.register_proxy(v1::RegisterProxyRequest {
                proxy: Some(p.spec()),
            })
            .await
            .unwrap_or_else(|e| panic!("register {}: {e}", p.id));
        }
    }

    /// Creates a cluster and waits until every proxy in it serves it.
    pub async fn create_cluster(
        &self,
        name: &str,
        nodes: u32,
        config: v1::ClusterConfig,
    ) -> v1::Cluster {
        let mut b = self.broker().await;
        let cluster = b
            .create_cluster(v1::CreateClusterRequest {
                name: name.into(),
                node_count: nodes,
                config: Some(config),
            })
            .await
            .unwrap_or_else(|e| panic!("create cluster {name}: {e}"))
            .into_inner()
            .cluster
            .expect("cluster in response");
        self.wait_cluster_ok(&cluster).await;
        cluster
    }

    /// The proxy with id `id`.
    pub fn proxy(&self, id: &str) -> &ProxyNode {
        self.proxies
            .iter()
            .find(|p| p.id == id)
            .unwrap_or_else(|| panic!("no proxy {id}"))
    }

    /// The proxy with id `id`, to stop or restart it.
    pub fn proxy_mut(&mut self, id: &str) -> &mut ProxyNode {
        self.proxies
            .iter_mut()
            .find(|p| p.id == id)
            .unwrap_or_else(|| panic!("no proxy {id}"))
    }

    /// The proxy whose Redis node is master of `key`'s slot, and that node.
    pub fn key_master(&self, cluster: &v1::Cluster, key: &[u8]) -> (&ProxyNode, &Redis) {
        let slot = u32::from(redmesh_model::key_slot(key));
        let a = cluster
            .slots
            .iter()
            .find(|a| a.range.is_some_and(|r| r.start <= slot && slot <= r.end))
            .unwrap_or_else(|| panic!("slot {slot} is unassigned in {}", cluster.name));
        let shard = cluster
            .shards
            .iter()
            .find(|s| s.id == a.shard_id)
            .expect("assigned shard exists");
        let master = shard.master.as_ref().expect("shard has a master");
        let proxy = self.proxy(&master.proxy_id);
        (proxy, &proxy.redis[master.node_index as usize])
    }

    /// Proxies of a cluster.
    pub fn members(&self, cluster: &v1::Cluster) -> Vec<&ProxyNode> {
        cluster
            .chunks
            .iter()
            .flat_map(|c| c.proxy_ids.iter())
            .map(|id| self.proxy(id))
            .collect()
    }

    /// Waits (60 s at most) until proxy `victim` is out of every chunk of
    /// cluster `name` and every shard has a replica again — a failover and
    /// replacement done — and returns the cluster and its proxies.
    pub async fn wait_replaced(&self, name: &str, victim: &str) -> (v1::Cluster, Vec<v1::Proxy>) {
        crate::harness::eventually(
            &format!("proxy {victim} replaced in cluster {name}"),
            Duration::from_secs(60),
            || async {
                let (c, proxies) = self.get_cluster(name).await;
                let replaced = c
                    .chunks
                    .iter()
                    .all(|ch| !ch.proxy_ids.iter().any(|p| p == victim))
                    && c.shards.iter().all(|s| !s.replicas.is_empty());
                replaced.then_some((c, proxies))
            },
        )
        .await
    }

    /// Waits until every member proxy has installed the cluster at an epoch
    /// at least the cluster's, with both local nodes applied.
    pub async fn wait_cluster_ok(&self, cluster: &v1::Cluster) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in self.members(cluster) {
            let mut admin = p.admin_client().await;
            loop {
                let info = admin
                    .get_info(v1::GetInfoRequest::default())
                    .await
                    .unwrap()
                    .into_inner();
                if info.cluster == cluster.name
                    && info.epoch >= cluster.epoch
                    && info.nodes.iter().all(|n| n.applied)
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "proxy {} never served cluster {}: {info:?}\n{}",
                    p.id,
                    cluster.name,
                    p.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A cluster client that rides out failovers and replacements, as the
/// tests' writers need: many quick retries, short connect and reply
/// timeouts. `addrs`: `host:port` of the proxies to seed it with.
pub fn patient_cluster_client<S: AsRef<str>>(
    addrs: impl IntoIterator<Item = S>,
) -> redis::cluster::ClusterClient {
    let seeds: Vec<String> = addrs
        .into_iter()
        .map(|a| format!("redis://{}", a.as_ref()))
        .collect();
    redis::cluster::ClusterClient::builder(seeds)
        .retries(30)
        .max_retry_wait(200)
        .min_retry_wait(20)
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(2))
        .build()
        .expect("cluster client")
}

/// The acknowledged writes (`key → value`) that do not read back through
/// `conn` with their value, with what was read instead.
pub async fn lost_writes(
    conn: &mut redis::cluster_async::ClusterConnection,
    acked: &std::collections::BTreeMap<String, u64>,
) -> Vec<(String, Option<u64>)> {
    let mut lost = Vec::new();
    for (key, value) in acked {
        let got: Option<u64> = redis::cmd("GET")
            .arg(key)
            .query_async(conn)
            .await
            .unwrap_or_else(|e| panic!("GET {key}: {e}"));
        if got != Some(*value) {
            lost.push((key.clone(), got));
        }
    }
    lost
}

/// `CLUSTER INFO` of a proxy.
pub async fn cluster_info(addr: &str) -> redis::RedisResult<String> {
    let client = redis::Client::open(format!("redis://{addr}"))?;
    let mut c = client.get_multiplexed_async_connection().await?;
    redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await
}

/// A `field:value` line of an INFO-style text.
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// A coordinator's status.
pub async fn coordinator_status(svc: &Service) -> v1::GetStatusResponse {
    let channel = redmesh_runtime::tls::endpoint(&svc.url())
        .expect("coordinator url")
        .connect()
        .await
        .expect("coordinator");
    v1::coordinator_client::CoordinatorClient::new(channel)
        .get_status(v1::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

/// Whether the health-checker `svc` has probed every target of each proxy
/// in `ids` (its RESP and admin listeners, both Redis nodes) and found it up.
pub async fn checker_sees_up(svc: &Service, ids: &[String]) -> bool {
    let Ok(endpoint) = redmesh_runtime::tls::endpoint(&svc.url()) else {
        return false;
    };
    let Ok(channel) = endpoint.connect().await else {
        return false;
    };
    let report = v1::health_checker_client::HealthCheckerClient::new(channel)
        .get_report(v1::GetReportRequest::default())
        .await;
    let Ok(report) = report else {
        return false;
    };
    let targets = report.into_inner().targets;
    ids.iter().all(|id| {
        let of: Vec<_> = targets.iter().filter(|t| &t.proxy_id == id).collect();
        of.len() >= 4 && of.iter().all(|t| t.status() == v1::HealthStatus::Up)
    })
}
