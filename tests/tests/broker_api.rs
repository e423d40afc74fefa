//! The broker's gRPC contract over real processes: precise error codes,
//! secrets never returned, and the topology stream's guarantees.

use std::time::{Duration, Instant};

use redmesh_api::v1::{self, topology_client::TopologyClient, watch_topology_response::Event};
use redmesh_e2e::harness::raw_exchange;
use redmesh_e2e::System;
use tonic::Code;

fn spec(id: &str, base: u16) -> v1::ProxySpec {
    v1::ProxySpec {
        id: id.into(),
        resp_address: format!("127.0.0.1:{base}"),
        admin_address: format!("127.0.0.1:{}", base + 1),
        host: "h1".into(),
        redis_nodes: vec![
            format!("127.0.0.1:{}", base + 2),
            format!("127.0.0.1:{}", base + 3),
        ],
        resp_tls_address: String::new(),
    }
}

fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    let s = r.expect_err("request must fail");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(needle),
        "message {:?} should mention {needle:?}",
        s.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_errors() {
    let sys = System::start(2);
    let mut b = sys.broker().await;
    let reg = |p: v1::ProxySpec| v1::RegisterProxyRequest { proxy: Some(p) };

    let mut bad = spec("a/b", 30000);
    assert_status(
        b.register_proxy(reg(bad.clone())).await,
        Code::InvalidArgument,
        "proxy.id",
    );
    bad.id = "ok".into();
    bad.redis_nodes.pop();
    assert_status(
        b.register_proxy(reg(bad.clone())).await,
        Code::InvalidArgument,
        "proxy.redis_nodes",
    );
    bad = spec("ok", 30000);
    bad.resp_address = "no-port".into();
    assert_status(
        b.register_proxy(reg(bad)).await,
        Code::InvalidArgument,
        "proxy.resp_address",
    );
    assert_status(
        b.register_proxy(v1::RegisterProxyRequest { proxy: None })
            .await,
        Code::InvalidArgument,
        "proxy",
    );

    b.register_proxy(reg(spec("one", 30000))).await.unwrap();
    assert_status(
        b.register_proxy(reg(spec("two", 30002))).await,
        Code::FailedPrecondition,
        "already used by proxy one",
    );
    assert_status(
        b.get_proxy(v1::GetProxyRequest { id: "nope".into() }).await,
        Code::NotFound,
        "nope",
    );
    assert_status(
        b.list_proxies(v1::ListProxiesRequest { state: 99 }).await,
        Code::InvalidArgument,
        "state",
    );

    let create = |name: &str, nodes: u32| v1::CreateClusterRequest {
        name: name.into(),
        node_count: nodes,
        config: None,
    };
    assert_status(
        b.create_cluster(create("bad name", 4)).await,
        Code::InvalidArgument,
        "name",
    );
    assert_status(
        b.create_cluster(create("", 4)).await,
        Code::InvalidArgument,
        "name",
    );
    assert_status(
        b.create_cluster(create(&"x".repeat(64), 4)).await,
        Code::InvalidArgument,
        "63",
    );
    assert_status(
        b.create_cluster(create("c", 6)).await,
        Code::InvalidArgument,
        "node_count",
    );
    assert_status(
        b.create_cluster(create("c", 0)).await,
        Code::InvalidArgument,
        "node_count",
    );
    assert_status(
        b.create_cluster(create("c", 4_000_000)).await,
        Code::InvalidArgument,
        "maximum",
    );
    assert_status(
        b.create_cluster(create("c", 4)).await,
        Code::FailedPrecondition,
        "not enough free proxies",
    );
    b.deregister_proxy(v1::DeregisterProxyRequest { id: "one".into() })
        .await
        .unwrap();

    sys.register_all().await;
    b.create_cluster(v1::CreateClusterRequest {
        name: "c".into(),
        node_count: 4,
        config: Some(v1::ClusterConfig {
            password: "hunter2".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    assert_status(
        b.create_cluster(create("c", 4)).await,
        Code::AlreadyExists,
        "c",
    );
    assert_status(
        b.deregister_proxy(v1::DeregisterProxyRequest {
            id: "proxy-0".into(),
        })
        .await,
        Code::FailedPrecondition,
        "serves cluster c",
    );
    assert_status(
        b.create_cluster(v1::CreateClusterRequest {
            name: "z".into(),
            node_count: 4,
            config: Some(v1::ClusterConfig {
                durability: v1::Durability::ReplicaAck as i32,
                replica_ack_timeout_ms: 600_000,
                ..Default::default()
            }),
        })
        .await,
        Code::InvalidArgument,
        "replica_ack_timeout_ms",
    );
    assert_status(
        b.create_cluster(v1::CreateClusterRequest {
            name: "z".into(),
            node_count: 4,
            config: Some(v1::ClusterConfig {
                durability: 42,
                ..Default::default()
            }),
        })
        .await,
        Code::InvalidArgument,
        "config.durability",
    );
    assert_status(
        b.scale_cluster(v1::ScaleClusterRequest {
            name: "c".into(),
            node_count: 8,
            ..Default::default()
        })
        .await,
        Code::Unavailable,
        "migrator",
    );
    assert_status(
        b.update_cluster_config(v1::UpdateClusterConfigRequest {
            name: "c".into(),
            config: None,
            update_paths: vec!["colour".into()],
        })
        .await,
        Code::InvalidArgument,
        "colour",
    );
    assert_status(
        b.delete_cluster(v1::DeleteClusterRequest {
            name: "missing".into(),
        })
        .await,
        Code::NotFound,
        "missing",
    );

    // Secrets never come back.
    let got = b
        .get_cluster(v1::GetClusterRequest { name: "c".into() })
        .await
        .unwrap()
        .into_inner();
    let cfg = got.cluster.unwrap().config.unwrap();
    assert!(cfg.password_set);
    assert!(cfg.password.is_empty() && cfg.password_sha256.is_empty());
    let listed = b
        .list_clusters(v1::ListClustersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed
        .clusters
        .iter()
        .all(|c| c.config.as_ref().unwrap().password_sha256.is_empty()));
}

/// The next view on a topology stream, and how many keepalives preceded it.
async fn next_view(
    stream: &mut tonic::Streaming<v1::WatchTopologyResponse>,
) -> (v1::ProxyView, u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut keepalives = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, stream.message())
            .await
            .expect("a view in time")
            .unwrap()
            .unwrap();
        match msg.event.unwrap() {
            Event::View(v) => return (v, keepalives),
            Event::Keepalive(_) => keepalives += 1,
        }
    }
}

/// The next non-keepalive event on a cluster stream.
async fn next_cluster_event(
    stream: &mut tonic::Streaming<v1::WatchClustersResponse>,
) -> v1::watch_clusters_response::Event {
    use v1::watch_clusters_response::Event as C;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match msg.event.unwrap() {
            C::Keepalive(_) => continue,
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_stream_starts_with_a_full_view_then_follows_changes() {
    let sys = System::start(2);
    let mut topo = TopologyClient::connect(sys.broker.url()).await.unwrap();
    assert_eq!(
        topo.watch_topology(v1::WatchTopologyRequest {
            proxy_id: "bad id".into(),
            known_epoch: 0
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );
    let mut stream = topo
        .watch_topology(v1::WatchTopologyRequest {
            proxy_id: "proxy-0".into(),
            known_epoch: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // First: the full current view, even before registration.
    let (first, _) = next_view(&mut stream).await;
    assert!(first.proxy.is_none() && first.cluster.is_none());
    sys.register_all().await;
    let (registered, _) = next_view(&mut stream).await;
    assert_eq!(registered.proxy.unwrap().state, v1::ProxyState::Free as i32);
    assert!(registered.epoch > first.epoch);
    sys.create_cluster("t", 4, v1::ClusterConfig::default())
        .await;
    let (allocated, _) = next_view(&mut stream).await;
    assert!(allocated.epoch > registered.epoch);
    let cluster = allocated.cluster.expect("cluster in view");
    assert_eq!(cluster.name, "t");
    assert_eq!(allocated.members.len(), 2);
    // The proxy receives the password digest it must check, nobody else does.
    assert_eq!(cluster.config.unwrap().password_sha256.len(), 0);
    // Quiet periods carry keepalives (about every 250 ms) and no views.
    let quiet_until = Instant::now() + Duration::from_millis(1200);
    let mut keepalives = 0;
    while let Ok(msg) = tokio::time::timeout(
        quiet_until.saturating_duration_since(Instant::now()),
        stream.message(),
    )
    .await
    {
        match msg.unwrap().unwrap().event.unwrap() {
            Event::Keepalive(k) => {
                assert_eq!(
                    k.epoch, allocated.epoch,
                    "keepalives carry the epoch last sent"
                );
                keepalives += 1;
            }
            Event::View(v) => panic!("unexpected view without a change: {v:?}"),
        }
    }
    assert!(keepalives >= 3, "keepalives while quiet: {keepalives}");
    let mut b = sys.broker().await;
    b.delete_cluster(v1::DeleteClusterRequest { name: "t".into() })
        .await
        .unwrap();
    let (freed, _) = next_view(&mut stream).await;
    assert!(freed.epoch > allocated.epoch);
    assert!(freed.cluster.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keep_serving_without_a_broker_and_resume_when_it_returns() {
    let mut sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("static", 4, v1::ClusterConfig::default())
        .await;
    let owner = sys.members(&cluster)[0].resp.clone();
    sys.broker.kill();
    // Fail-static: the last view keeps serving.
    for i in 0..20 {
        let reply = raw_exchange(&owner, format!("SET {{k}}{i} v\r\n").as_bytes()).unwrap();
        assert!(
            reply == b"+OK\r\n" || reply.starts_with(b"-MOVED"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
    }
    sys.broker.restart();
    let mut b = sys.broker().await;
    b.update_cluster_config(v1::UpdateClusterConfigRequest {
        name: "static".into(),
        config: Some(v1::ClusterConfig {
            password: "after-restart".into(),
            ..Default::default()
        }),
        update_paths: vec!["password".into()],
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in sys.members(&cluster) {
        loop {
            let reply = raw_exchange(&p.resp, b"GET k\r\n").unwrap();
            if reply.starts_with(b"-NOAUTH") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "proxy {} never reconnected:\n{}",
                p.id,
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_stream_lists_then_follows_creates_and_deletes() {
    use v1::watch_clusters_response::Event as C;
    let sys = System::start(2);
    sys.register_all().await;
    sys.create_cluster("before", 4, v1::ClusterConfig::default())
        .await;
    let mut topo = TopologyClient::connect(sys.broker.url()).await.unwrap();
    let mut stream = topo
        .watch_clusters(v1::WatchClustersRequest {
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    match next_cluster_event(&mut stream).await {
        C::Updated(c) => assert_eq!(c.name, "before"),
        other => panic!("expected the existing cluster first, got {other:?}"),
    }
    let mut b = sys.broker().await;
    b.delete_cluster(v1::DeleteClusterRequest {
        name: "before".into(),
    })
    .await
    .unwrap();
    match next_cluster_event(&mut stream).await {
        C::Deleted(d) => assert_eq!(d.name, "before"),
        other => panic!("expected a delete, got {other:?}"),
    }
}
