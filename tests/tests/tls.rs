//! TLS end to end: every service, every proxy and redmeshctl with
//! certificates from files (a CA made here), mutual TLS required on the
//! gRPC API. The whole system works over it — proxies follow the broker,
//! a scale-out runs broker → migrator → proxies, health-checkers probe the
//! proxies and a failed proxy is replaced — while a plaintext client, a
//! client that does not trust the CA and one without a client certificate
//! are refused. The proxies' RESP listeners over TLS serve `redis-cli
//! --tls -c` and redis-py's `RedisCluster(ssl=True)`, redirecting TLS
//! clients to TLS addresses. A renewed server certificate is served
//! without a restart, and a broken renewal keeps the previous one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use redmesh_api::v1;
use redmesh_e2e::harness::{bin_path, eventually, redis_py_cluster};
use redmesh_e2e::pki::Pki;
use redmesh_e2e::system::{checker_sees_up, Service, System};
use redmesh_e2e::Etcd;
use tokio_rustls::rustls;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The leaf certificate the server at `addr` presents (DER), verified
/// against `ca`.
async fn served_certificate(addr: &str, ca: &Path) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A cluster client entering at `addr` (RESP stays plaintext).
async fn cluster_conn(addr: &str) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::new(vec![format!("redis://{addr}")])
        .unwrap()
        .get_async_connection()
        .await
        .unwrap()
}

/// redmeshctl against `broker`, with `tls` options.
fn ctl(broker: &str, tls: &[&str], args: &[&str]) -> std::process::Output {
    Command::new(bin_path("redmeshctl"))
        .args(["--broker", broker])
        .args(tls)
        .args(args)
        .env_remove("REDMESH_TLS_CA")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("redmeshctl runs")
}

/// The CA of this test binary, and the identity its own gRPC calls (the
/// harness's) present: TLS options are per process, and `cargo test` runs
/// the tests of a binary in one.
fn pki() -> &'static (Pki, PathBuf, PathBuf) {
    static PKI: std::sync::OnceLock<(Pki, PathBuf, PathBuf)> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let pki = Pki::new();
        let (cert, key) = pki.leaf("node");
        redmesh_runtime::TlsArgs {
            cert: Some(cert.clone()),
            key: Some(key.clone()),
            ca: Some(pki.ca.clone()),
            client_auth: true,
        }
        .install()
        .expect("TLS options");
        (pki, cert, key)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_call_runs_over_mutual_tls() {
    let (pki, cert, key) = pki();
    let (cert, key) = (cert.clone(), key.clone());
    let env = [
        ("REDMESH_TLS_CERT", s(&cert)),
        ("REDMESH_TLS_KEY", s(&key)),
        ("REDMESH_TLS_CA", s(&pki.ca)),
        ("REDMESH_TLS_CLIENT_AUTH", "true"),
        // RESP clients: a certificate is optional, but checked if shown.
        ("REDMESH_PROXY_TLS_AUTH_CLIENTS", "optional"),
    ];
    // Six proxies: one chunk (two proxies) serves, a second joins it by
    // the scale-out, two stay free to replace a failed one.
    let mut sys = System::start_env(6, &env);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("tls", 4, v1::ClusterConfig::default())
        .await;
    sys.wait_cluster_ok(&cluster).await;
    let broker = sys.broker.url();
    assert!(broker.starts_with("https://"), "{broker}");

    // Refused: plaintext, a client that does not trust the CA, and one
    // without a client certificate.
    let plain = tonic::transport::Endpoint::from_shared(broker.replace("https", "http"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect_lazy();
    v1::broker_client::BrokerClient::new(plain)
        .list_clusters(v1::ListClustersRequest::default())
        .await
        .expect_err("a plaintext call was served");
    let other = Pki::new();
    for (what, tls) in [
        (
            "a client trusting another CA",
            tonic::transport::ClientTlsConfig::new().ca_certificate(
                tonic::transport::Certificate::from_pem(std::fs::read(&other.ca).unwrap()),
            ),
        ),
        (
            "a client without a certificate",
            tonic::transport::ClientTlsConfig::new().ca_certificate(
                tonic::transport::Certificate::from_pem(std::fs::read(&pki.ca).unwrap()),
            ),
        ),
    ] {
        let channel = tonic::transport::Endpoint::from_shared(broker.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .timeout(Duration::from_secs(2))
            .connect_lazy();
        let r = v1::broker_client::BrokerClient::new(channel)
            .list_clusters(v1::ListClustersRequest::default())
            .await;
        assert!(r.is_err(), "{what} was served: {r:?}");
    }
    // redmeshctl: with the options, and without (a clear error, exit 1).
    let tls_opts = [
        "--tls-ca",
        s(&pki.ca),
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
        "--tls-client-auth",
    ];
    let out = ctl(&broker, &tls_opts, &["cluster", "list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("tls"),
        "{out:?}"
    );
    let out = ctl(&broker, &[], &["cluster", "list"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-ca"), "{err}");

    // Broker → migrator → proxies: a scale-out completes.
    let _m = sys.start_migrator("mg-1", &[]);
    let mut redis = cluster_conn(&sys.members(&cluster)[0].resp).await;
    for i in 0..200 {
        let () = redis::AsyncCommands::set(&mut redis, format!("k{i}"), i)
            .await
            .unwrap();
    }
    sys.broker()
        .await
        .scale_cluster(v1::ScaleClusterRequest {
            name: "tls".into(),
            node_count: 8,
            dry_run: false,
            rate: None,
        })
        .await
        .expect("scale over TLS");
    let grown = eventually("the scale-out to end", Duration::from_secs(60), || async {
        let (c, _) = sys.get_cluster("tls").await;
        let moving = c.slots.iter().any(|a| a.migration.is_some());
        (c.chunks.len() == 2 && !moving).then_some(c)
    })
    .await;
    sys.wait_cluster_ok(&grown).await;
    resp_over_tls(&sys, &grown, pki);

    // Health-checkers → proxies, coordinator: a killed proxy is replaced
    // from the pool (a checker that could not probe over TLS would see
    // every proxy as failed instead).
    let (checkers, _co) = sys.start_control_plane().await;
    let ids: Vec<String> = grown
        .chunks
        .iter()
        .flat_map(|ch| ch.proxy_ids.clone())
        .collect();
    for hc in &checkers {
        eventually(
            "every checker to find every member up over TLS",
            Duration::from_secs(20),
            || async { checker_sees_up(hc, &ids).await.then_some(()) },
        )
        .await;
    }
    let (c, _) = sys.get_cluster("tls").await;
    assert_eq!(c.chunks, grown.chunks, "healthy proxies were failed over");
    let victim = sys
        .proxies
        .iter()
        .position(|p| p.id == c.chunks[0].proxy_ids[0])
        .unwrap();
    let victim_id = sys.proxies[victim].id.clone();
    sys.proxies[victim].child.as_mut().unwrap().kill();
    let healed = eventually(
        "the killed proxy replaced",
        Duration::from_secs(30),
        || async {
            let (c, _) = sys.get_cluster("tls").await;
            let gone = c.chunks.iter().all(|ch| !ch.proxy_ids.contains(&victim_id));
            gone.then_some(c)
        },
    )
    .await;
    sys.wait_cluster_ok(&healed).await;
    let mut redis = cluster_conn(&sys.members(&healed)[0].resp).await;
    for i in 0..200 {
        let v: Option<i64> = redis::AsyncCommands::get(&mut redis, format!("k{i}"))
            .await
            .unwrap();
        assert_eq!(v, Some(i), "k{i}");
    }
}

/// redis-cli at `addr` (`--tls` and more in `opts`): its stdout, or its
/// error output when it fails.
fn redis_cli(addr: &str, opts: &[&str], args: &[&str]) -> Result<String, String> {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let out = Command::new("redis-cli")
        .args(["-h", host, "-p", port])
        .args(opts)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("redis-cli runs");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // redis-cli reports a failed connection on stderr, or as its reply.
    if out.status.success() && !stdout.starts_with("Could not connect") && !stdout.contains("Error")
    {
        Ok(stdout)
    } else {
        Err(format!("{stdout} {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// Which of `ports` a redis-cli reply names (it prints one element per
/// line; ports are above the highest slot, 16383, so no slot is taken for
/// one).
fn ports_named(
    reply: &str,
    ports: &std::collections::BTreeSet<String>,
) -> std::collections::BTreeSet<String> {
    reply
        .lines()
        .map(str::trim)
        .filter(|l| ports.contains(*l))
        .map(str::to_owned)
        .collect()
}

/// The proxies' RESP listeners over TLS: cluster clients follow
/// redirections to TLS addresses and never to plaintext ones; clients
/// that do not trust the CA, or show a certificate it did not sign, are
/// refused; plaintext clients still see plaintext addresses.
fn resp_over_tls(sys: &System, cluster: &v1::Cluster, pki: &Pki) {
    let members = sys.members(cluster);
    assert!(members.len() >= 4, "redirections need several proxies");
    let tls_addrs: Vec<&str> = members
        .iter()
        .map(|p| p.tls.as_deref().expect("proxies listen for TLS"))
        .collect();
    let tls_ports: std::collections::BTreeSet<String> = tls_addrs
        .iter()
        .map(|a| a.rsplit_once(':').unwrap().1.to_owned())
        .collect();
    let plain_ports: std::collections::BTreeSet<String> = members
        .iter()
        .map(|p| p.resp.rsplit_once(':').unwrap().1.to_owned())
        .collect();
    let tls = ["--tls", "--cacert", s(&pki.ca)];
    let entry = tls_addrs[0];
    // -c follows MOVED: the keys spread over every proxy.
    let cluster_tls = [&tls[..], &["-c"]].concat();
    for i in 0..40 {
        let key = format!("tls:{i}");
        assert_eq!(
            redis_cli(entry, &cluster_tls, &["set", &key, &format!("v{i}")]).as_deref(),
            Ok("OK")
        );
        assert_eq!(
            redis_cli(entry, &cluster_tls, &["get", &key]),
            Ok(format!("v{i}"))
        );
    }
    let every_port = tls_ports.union(&plain_ports).cloned().collect();
    let over_tls = redis_cli(entry, &tls, &["cluster", "slots"]).unwrap();
    assert_eq!(ports_named(&over_tls, &every_port), tls_ports, "{over_tls}");
    let over_plain = redis_cli(&members[0].resp, &[], &["cluster", "slots"]).unwrap();
    assert_eq!(
        ports_named(&over_plain, &every_port),
        plain_ports,
        "{over_plain}"
    );
    let nodes = redis_cli(entry, &tls, &["cluster", "nodes"]).unwrap();
    for a in &tls_addrs {
        assert!(nodes.contains(&format!("{a}@")), "{a} in {nodes}");
    }

    // Refused: a client trusting another CA, one showing a certificate
    // another CA signed, and a plaintext client on the TLS port.
    let other = Pki::new();
    let (other_cert, other_key) = other.leaf("stranger");
    assert!(redis_cli(entry, &["--tls", "--cacert", s(&other.ca)], &["ping"]).is_err());
    let stranger = [
        &tls[..],
        &["--cert", s(&other_cert), "--key", s(&other_key)],
    ]
    .concat();
    assert!(redis_cli(entry, &stranger, &["ping"]).is_err());
    assert!(redis_cli(entry, &[], &["ping"]).is_err());
    // ...while a certificate the CA signed is accepted.
    let (cert, key) = pki.leaf("app");
    let known = [&tls[..], &["--cert", s(&cert), "--key", s(&key)]].concat();
    assert_eq!(redis_cli(entry, &known, &["ping"]).as_deref(), Ok("PONG"));

    // redis-py's RedisCluster over TLS finds the proxies at their TLS
    // addresses.
    let text = redis_py_cluster(entry, "", Some(&pki.ca));
    for a in &tls_addrs {
        assert!(text.contains(a), "redis-py did not find {a}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let (pki, _, _) = pki();
    let (cert, key) = pki.leaf("broker");
    let etcd = Etcd::start();
    let broker = Service::start_env(
        "redmesh-broker",
        "--listen",
        &["--etcd".into(), etcd.endpoint.clone()],
        &[
            ("REDMESH_TLS_CERT", s(&cert)),
            ("REDMESH_TLS_KEY", s(&key)),
            ("REDMESH_TLS_CA", s(&pki.ca)),
        ],
    );
    let first = served_certificate(&broker.addr, &pki.ca).await;
    // Renewed in place (a new key too), as cert-manager or certbot do.
    let renewed = pki.leaf("renewal");
    std::fs::rename(&renewed.0, &cert).unwrap();
    std::fs::rename(&renewed.1, &key).unwrap();
    let second = eventually(
        "the renewed certificate served",
        Duration::from_secs(10),
        || async {
            let c = served_certificate(&broker.addr, &pki.ca).await;
            (c != first).then_some(c)
        },
    )
    .await;
    // A broken renewal: the last good certificate stays in use.
    std::fs::write(&cert, "not a certificate").unwrap();
    for _ in 0..3 {
        assert_eq!(served_certificate(&broker.addr, &pki.ca).await, second);
    }
    assert!(
        broker
            .log_text()
            .contains("cannot be used; keeping the previous ones"),
        "{}",
        broker.log()
    );
    // And a service refuses to start on a file that is not a certificate,
    // naming it.
    let out = Command::new(bin_path("redmesh-broker"))
        .args(["--etcd", &etcd.endpoint, "--listen", "127.0.0.1:0"])
        .env("REDMESH_TLS_CERT", &cert)
        .env("REDMESH_TLS_KEY", &key)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(s(&cert)), "{err}");
    // A proxy asked to serve RESP over TLS without a certificate says so.
    let out = Command::new(bin_path("redmesh-proxy"))
        .args(["--id", "p-1", "--tls-listen", "127.0.0.1:0"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("REDMESH_TLS_CERT")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-listen") && err.contains("--tls-cert"),
        "{err}"
    );
}
