//! High availability end to end (DESIGN.md §5): real health-checkers and
//! coordinators over real proxies and Redis nodes. A proxy killed with its
//! Redis nodes under continuous replica_ack writes is failed over and
//! replaced from the pool, even when the coordinator leader dies between
//! the two steps, and no acknowledged write is lost; a dead health-checker
//! causes no failover.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redmesh_api::v1::{self, coordinator_client::CoordinatorClient};
use redmesh_e2e::system::{Service, System};

fn checker(sys: &System, id: &str) -> Service {
    Service::start(
        "redmesh-health-checker",
        "--listen",
        &[
            "--etcd".into(),
            sys.etcd.endpoint.clone(),
            "--id".into(),
            id.into(),
        ],
    )
}

fn coordinator(sys: &System, id: &str, extra: &[&str]) -> Service {
    let mut args = vec![
        "--etcd".to_owned(),
        sys.etcd.endpoint.clone(),
        "--id".into(),
        id.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Service::start("redmesh-coordinator", "--listen", &args)
}

async fn status(svc: &Service) -> v1::GetStatusResponse {
    CoordinatorClient::connect(svc.url())
        .await
        .expect("coordinator")
        .get_status(v1::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner()
}

async fn get_cluster(sys: &System, name: &str) -> (v1::Cluster, Vec<v1::Proxy>) {
    let r = sys
        .broker()
        .await
        .get_cluster(v1::GetClusterRequest { name: name.into() })
        .await
        .expect("get cluster")
        .into_inner();
    (r.cluster.expect("cluster"), r.proxies)
}

/// Polls `check` every 50 ms until it yields a value or `timeout` passes.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_proxy_is_failed_over_and_replaced_without_losing_acknowledged_writes() {
    // proxy-0/2 on host-a, proxy-1/3 on host-b: one chunk serves, one
    // proxy per host stays free for the replacement.
    let mut sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster(
            "ha",
            4,
            v1::ClusterConfig {
                durability: v1::Durability::ReplicaAck as i32,
                replica_ack_timeout_ms: 500,
                ..Default::default()
            },
        )
        .await;
    let mut checkers = vec![
        checker(&sys, "hc-a"),
        checker(&sys, "hc-b"),
        checker(&sys, "hc-c"),
    ];
    // The first leader dies right after promoting, before replacing.
    let first = coordinator(&sys, "co-1", &["--test-exit-after-promotion"]);
    let st = eventually("a coordinator leader", Duration::from_secs(20), || async {
        let st = status(&first).await;
        st.is_leader.then_some(st)
    })
    .await;
    assert_eq!(st.leader_id, "co-1");
    let standby = coordinator(&sys, "co-2", &[]);
    let st = status(&standby).await;
    assert!(!st.is_leader && st.leader_id == "co-1", "{st:?}");

    // A dead checker fails nothing over: wait until every checker has
    // judged the pool, kill one, and see the cluster untouched.
    for c in &checkers {
        let client = v1::health_checker_client::HealthCheckerClient::connect(c.url())
            .await
            .unwrap();
        eventually("verdicts on every proxy", Duration::from_secs(20), || {
            let mut client = client.clone();
            async move {
                let r = client
                    .get_report(v1::GetReportRequest::default())
                    .await
                    .ok()?
                    .into_inner();
                (r.targets.len() == 16
                    && r.targets.iter().all(|t| t.status() == v1::HealthStatus::Up))
                .then_some(())
            }
        })
        .await;
    }
    checkers[2].kill();
    let epoch_before = get_cluster(&sys, "ha").await.0.epoch;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (now, proxies) = get_cluster(&sys, "ha").await;
    assert_eq!(
        now.epoch, epoch_before,
        "a dead checker changed the cluster"
    );
    assert!(proxies
        .iter()
        .all(|p| p.state() == v1::ProxyState::Allocated));

    // Continuous writes through a cluster client; only acknowledged ones count.
    let seeds: Vec<String> = sys
        .members(&cluster)
        .iter()
        .map(|p| format!("redis://{}", p.resp))
        .collect();
    let client = redis::cluster::ClusterClient::builder(seeds)
        .retries(30)
        .max_retry_wait(200)
        .min_retry_wait(20)
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let acked: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let acked = acked.clone();
        let stop = stop.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let mut conn = client
                .get_async_connection()
                .await
                .expect("cluster connection");
            let mut i = 0u64;
            let mut errors = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let r: redis::RedisResult<()> = conn.set(format!("w:{i}"), i).await;
                match r {
                    Ok(()) => {
                        acked.lock().unwrap().insert(i, Instant::now());
                    }
                    Err(_) => errors += 1,
                }
            }
            errors
        })
    };
    eventually("writes flowing", Duration::from_secs(10), || async {
        (acked.lock().unwrap().len() > 50).then_some(())
    })
    .await;

    // kill -9 the proxy owning shard 0 and both its Redis nodes.
    let victim_id = cluster.shards[0].master.as_ref().unwrap().proxy_id.clone();
    let killed_at = Instant::now();
    {
        let victim = sys.proxies.iter_mut().find(|p| p.id == victim_id).unwrap();
        victim.child.as_mut().unwrap().kill();
        victim.redis[0].kill();
        victim.redis[1].kill();
    }

    // The standby finishes what the first leader started.
    let (healed, proxies) = eventually(
        "failover and replacement",
        Duration::from_secs(30),
        || async {
            let (c, proxies) = get_cluster(&sys, "ha").await;
            let members: Vec<&String> =
                c.chunks.iter().flat_map(|ch| ch.proxy_ids.iter()).collect();
            let whole = !members.contains(&&victim_id)
                && c.shards.iter().all(|s| s.replicas.len() == 1)
                && c.shards
                    .iter()
                    .all(|s| s.master.as_ref().unwrap().proxy_id != victim_id);
            whole.then_some((c, proxies))
        },
    )
    .await;
    let recovered_in = killed_at.elapsed();
    let st = status(&standby).await;
    assert!(st.is_leader, "the standby did not take over: {st:?}");
    assert!(st.degraded_clusters.is_empty(), "{st:?}");
    assert!(
        proxies
            .iter()
            .all(|p| p.state() == v1::ProxyState::Allocated),
        "{proxies:?}"
    );
    sys.wait_cluster_ok(&healed).await;

    // Writes are acknowledged again after the kill.
    let resumed = eventually(
        "writes acknowledged after the kill",
        Duration::from_secs(30),
        || async {
            let acked = acked.lock().unwrap();
            let after: Vec<&Instant> = acked.values().filter(|t| **t > killed_at).collect();
            (after.len() > 50).then_some(after.len())
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let errors = writer.await.unwrap();

    // Every acknowledged write is there, with its value.
    let mut conn = client.get_async_connection().await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let mut lost = Vec::new();
    for i in acked.keys() {
        let v: Option<u64> = conn.get(format!("w:{i}")).await.unwrap();
        if v != Some(*i) {
            lost.push(*i);
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );
    eprintln!(
        "recovered to full redundancy {recovered_in:?} after the kill; {} writes acknowledged ({resumed} after the kill), {errors} refused",
        acked.len()
    );
    drop(checkers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_proxy_is_fenced_and_replaced() {
    let sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("fence", 4, v1::ClusterConfig::default())
        .await;
    let _checkers = [
        checker(&sys, "hc-a"),
        checker(&sys, "hc-b"),
        checker(&sys, "hc-c"),
    ];
    let co = coordinator(&sys, "co-1", &[]);
    eventually("a coordinator leader", Duration::from_secs(20), || async {
        status(&co).await.is_leader.then_some(())
    })
    .await;
    let (victim, _) = sys.key_master(&cluster, b"fenced-key");
    let victim_id = victim.id.clone();
    let child = victim.child.as_ref().unwrap();
    let paused_at = Instant::now();
    child.signal("-STOP");
    eventually(
        "the paused proxy replaced",
        Duration::from_secs(30),
        || async {
            let (c, _) = get_cluster(&sys, "fence").await;
            let gone = c.chunks.iter().all(|ch| !ch.proxy_ids.contains(&victim_id));
            gone.then_some(())
        },
    )
    .await;
    // Past the harness's --fence-after (3 s), then wake it up and write to
    // it at once: the write must be refused, never applied.
    let fence = Duration::from_millis(3500);
    if let Some(rest) = fence.checked_sub(paused_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    child.signal("-CONT");
    let reply = redmesh_e2e::harness::raw_exchange(&victim.resp, b"SET fenced-key stale\r\n")
        .expect("the resumed proxy answers");
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.starts_with("-CLUSTERDOWN"),
        "a fenced proxy accepted or misrouted a write: {text}\n{}",
        victim.log()
    );
    let (healed, _) = get_cluster(&sys, "fence").await;
    sys.wait_cluster_ok(&healed).await;
    let (_, node) = sys.key_master(&healed, b"fenced-key");
    let client = redis::Client::open(format!("redis://{}", node.addr)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let v: Option<String> = conn.get("fenced-key").await.unwrap();
    assert_eq!(v, None, "the write reached the new master");
}
