//! High availability end to end (DESIGN.md §5): real health-checkers and
//! coordinators over real proxies and Redis nodes. A proxy killed with its
//! Redis nodes under continuous replica_ack writes is failed over and
//! replaced from the pool, even when the coordinator leader dies between
//! the two steps, and no acknowledged write is lost; a dead health-checker
//! causes no failover; a paused proxy is fenced, replaced, and its replica
//! node stops replicating (so it cannot answer a master's `WAIT` in place of
//! the replacement); an etcd outage
//! fences writes but not reads and heals without failover; a chunk with both
//! proxies down costs only its own slots; a replica that never synced is
//! not promoted to serve an empty shard.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redmesh_api::v1::{self, coordinator_client::CoordinatorClient};
use redmesh_e2e::harness::{eventually, port_of, redis_cli};
use redmesh_e2e::netpart::Partitions;
use redmesh_e2e::system::{
    coordinator_status, info_field, lost_writes, patient_cluster_client, System,
};

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
        sys.start_service("redmesh-health-checker", "hc-a", &[]),
        sys.start_service("redmesh-health-checker", "hc-b", &[]),
        sys.start_service("redmesh-health-checker", "hc-c", &[]),
    ];
    // The first leader dies right after promoting, before replacing.
    let first = sys.start_service(
        "redmesh-coordinator",
        "co-1",
        &["--test-exit-after-promotion"],
    );
    let st = eventually("a coordinator leader", Duration::from_secs(20), || async {
        let st = coordinator_status(&first).await;
        st.is_leader.then_some(st)
    })
    .await;
    assert_eq!(st.leader_id, "co-1");
    let standby = sys.start_service("redmesh-coordinator", "co-2", &[]);
    let st = coordinator_status(&standby).await;
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
    let epoch_before = sys.get_cluster("ha").await.0.epoch;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (now, proxies) = sys.get_cluster("ha").await;
    assert_eq!(
        now.epoch, epoch_before,
        "a dead checker changed the cluster"
    );
    assert!(proxies
        .iter()
        .all(|p| p.state() == v1::ProxyState::Allocated));

    // Continuous writes through a cluster client; only acknowledged ones count.
    let client = patient_cluster_client(sys.members(&cluster).iter().map(|p| &p.resp));
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
    sys.proxy_mut(&victim_id).kill_host();

    // The standby finishes what the first leader started.
    let (healed, proxies) = eventually(
        "failover and replacement",
        Duration::from_secs(30),
        || async {
            let (c, proxies) = sys.get_cluster("ha").await;
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
    let st = coordinator_status(&standby).await;
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
    let (_checkers, _co) = sys.start_control_plane().await;
    let (victim, _) = sys.key_master(&cluster, b"fenced-key");
    let victim_id = victim.id.clone();
    // The victim's replica node, and the master it follows.
    let (replica_addr, master_addr) = cluster
        .shards
        .iter()
        .find_map(|s| {
            let r = s.replicas.iter().find(|r| r.proxy_id == victim_id)?;
            let m = s.master.as_ref()?;
            Some((
                victim.redis[r.node_index as usize].addr.clone(),
                sys.proxy(&m.proxy_id).redis[m.node_index as usize]
                    .addr
                    .clone(),
            ))
        })
        .expect("the victim holds a replica");
    let role_of = |addr: String| async move {
        let client = redis::Client::open(format!("redis://{addr}")).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut c).await.ok()?;
        match role.first()? {
            redis::Value::BulkString(r) => Some(String::from_utf8_lossy(r).into_owned()),
            _ => None,
        }
    };
    let child = victim.child.as_ref().unwrap();
    let paused_at = Instant::now();
    child.signal("-STOP");
    eventually(
        "the paused proxy replaced",
        Duration::from_secs(30),
        || async {
            let (c, _) = sys.get_cluster("fence").await;
            let gone = c.chunks.iter().all(|ch| !ch.proxy_ids.contains(&victim_id));
            gone.then_some(())
        },
    )
    .await;
    // The coordinator detaches the failed proxy's replica node (its Redis
    // lives on while the proxy is paused).
    eventually(
        "the paused proxy's replica detached",
        Duration::from_secs(10),
        || {
            let addr = replica_addr.clone();
            async { (role_of(addr).await.as_deref() == Some("master")).then_some(()) }
        },
    )
    .await;
    // As if that had failed: attached again. The proxy detaches it itself
    // once it runs and reads that it failed.
    let (host, port) = master_addr.rsplit_once(':').unwrap();
    let client = redis::Client::open(format!("redis://{replica_addr}")).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("REPLICAOF")
        .arg(host)
        .arg(port)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(
        role_of(replica_addr.clone()).await.as_deref(),
        Some("slave")
    );
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
    eventually(
        "the resumed proxy detached its replica node",
        Duration::from_secs(10),
        || {
            let addr = replica_addr.clone();
            async { (role_of(addr).await.as_deref() == Some("master")).then_some(()) }
        },
    )
    .await;
    let (healed, _) = sys.get_cluster("fence").await;
    sys.wait_cluster_ok(&healed).await;
    let (_, node) = sys.key_master(&healed, b"fenced-key");
    let client = redis::Client::open(format!("redis://{}", node.addr)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let v: Option<String> = conn.get("fenced-key").await.unwrap();
    assert_eq!(v, None, "the write reached the new master");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_fences_writes_keeps_reads_and_heals_without_failover() {
    let mut sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("outage", 4, v1::ClusterConfig::default())
        .await;
    let (mut checkers, mut co) = sys.start_control_plane().await;
    let (owner, _) = sys.key_master(&cluster, b"outage-key");
    let addr = owner.resp.clone();
    let set = |value: &'static str| {
        let addr = addr.clone();
        async move {
            let reply = redmesh_e2e::harness::raw_exchange(
                &addr,
                format!("SET outage-key {value}\r\n").as_bytes(),
            )
            .expect("the proxy answers");
            String::from_utf8_lossy(&reply).into_owned()
        }
    };
    assert_eq!(set("before").await, "+OK\r\n");
    let epoch = sys.get_cluster("outage").await.0.epoch;

    // etcd dies for longer than every lease (coordinator 2 s, checkers 3 s)
    // and the proxies' fence (3 s in the harness).
    sys.etcd.kill();
    let outage = Instant::now();
    let refused = eventually("writes fenced", Duration::from_secs(10), || async {
        let r = set("during").await;
        r.starts_with("-CLUSTERDOWN").then_some(r)
    })
    .await;
    let fenced_in = outage.elapsed();
    assert!(
        fenced_in >= Duration::from_millis(2500),
        "fenced only {fenced_in:?} after the outage began, before the broker could know: {refused}"
    );
    // Reads go on from the last topology (writes went through until the
    // fence, so the value is the last of those).
    let read = redmesh_e2e::harness::raw_exchange(&addr, b"GET outage-key\r\n").unwrap();
    let read = String::from_utf8_lossy(&read);
    assert!(
        read == "$6\r\nduring\r\n" || read == "$6\r\nbefore\r\n",
        "{read}"
    );
    // The control plane answers with a clear error instead of hanging.
    let err = sys
        .broker()
        .await
        .get_cluster(v1::GetClusterRequest {
            name: "outage".into(),
        })
        .await
        .expect_err("the broker cannot read etcd");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("etcd"), "{err}");
    tokio::time::sleep(Duration::from_millis(4000).saturating_sub(outage.elapsed())).await;

    // Nothing crashed; after etcd returns, writes flow again and nobody
    // was failed over: the outage was etcd's, not the proxies'.
    sys.etcd.restart();
    let back = Instant::now();
    for svc in checkers.iter_mut().chain([&mut co, &mut sys.broker]) {
        assert!(!svc.child.exited(), "{svc:?} died:\n{}", svc.log());
    }
    for p in &mut sys.proxies {
        assert!(
            !p.child.as_mut().unwrap().exited(),
            "proxy {} died:\n{}",
            p.id,
            p.log()
        );
    }
    eventually("writes accepted again", Duration::from_secs(20), || async {
        (set("after").await == "+OK\r\n").then_some(())
    })
    .await;
    let healed_in = back.elapsed();
    eventually(
        "a coordinator leader again",
        Duration::from_secs(20),
        || async { coordinator_status(&co).await.is_leader.then_some(()) },
    )
    .await;
    let (now, proxies) = sys.get_cluster("outage").await;
    assert_eq!(now.epoch, epoch, "the outage changed the cluster: {now:?}");
    assert!(
        proxies
            .iter()
            .all(|p| p.state() == v1::ProxyState::Allocated),
        "{proxies:?}"
    );
    eprintln!(
        "writes fenced {fenced_in:?} into the outage, accepted again {healed_in:?} after etcd returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_with_both_proxies_down_loses_only_its_slots_and_comes_back() {
    let mut sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("pair", 8, v1::ClusterConfig::default())
        .await;
    let (checkers, co) = sys.start_control_plane().await;
    let down: Vec<String> = cluster.chunks[1].proxy_ids.clone();
    let key_in = |chunk_down: bool| {
        (0..)
            .map(|i| format!("pair-key-{i}"))
            .find(|k| down.contains(&sys.key_master(&cluster, k.as_bytes()).0.id) == chunk_down)
            .unwrap()
    };
    let (live_key, lost_key) = (key_in(false), key_in(true));
    let set = |addr: String, key: String, value: &'static str| async move {
        let cmd = format!("SET {key} {value}\r\n");
        let reply =
            redmesh_e2e::harness::raw_exchange(&addr, cmd.as_bytes()).expect("the proxy answers");
        String::from_utf8_lossy(&reply).into_owned()
    };
    let live_owner = sys.key_master(&cluster, live_key.as_bytes()).0.resp.clone();
    let lost_owner = sys.key_master(&cluster, lost_key.as_bytes()).0.resp.clone();
    assert_eq!(
        set(lost_owner.clone(), lost_key.clone(), "kept").await,
        "+OK\r\n"
    );

    // Both proxies of the second chunk die; their Redis nodes keep the data.
    for p in sys.proxies.iter_mut().filter(|p| down.contains(&p.id)) {
        p.child.as_mut().unwrap().kill();
    }
    let st = eventually(
        "the cluster reported degraded",
        Duration::from_secs(20),
        || async {
            let st = coordinator_status(&co).await;
            st.degraded_clusters
                .contains(&"pair".to_owned())
                .then_some(st)
        },
    )
    .await;
    assert!(st.is_leader, "{st:?}");
    // Operators see the same through redmeshctl.
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(redmesh_e2e::harness::bin_path("redmeshctl"))
            .args(["--broker", &sys.broker.url(), "--coordinator", &co.url()])
            .args(args)
            .output()
            .expect("redmeshctl runs");
        assert!(out.status.success(), "redmeshctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = ctl(&["coordinator", "status"]);
    assert!(text.contains("degraded    pair"), "{text}");
    let text = ctl(&["coordinator", "events", "--cluster", "pair", "--no-follow"]);
    assert!(
        down.iter()
            .any(|id| text.contains(&format!("failure_detected cluster=pair proxy={id}"))),
        "{text}"
    );
    // A proxy the coordinator already failed over (if the checkers saw it
    // die before its partner) is no longer probed; the last one standing
    // is, and the checkers call it down.
    let report: serde_json::Value = serde_json::from_str(&ctl(&[
        "--json",
        "health",
        "report",
        "--checker",
        &checkers[0].url(),
    ]))
    .unwrap();
    let resp_down: Vec<&str> = report["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "TARGET_KIND_PROXY_RESP")
        .filter(|t| t["status"] == "HEALTH_STATUS_DOWN")
        .filter_map(|t| t["proxyId"].as_str().or(t["proxy_id"].as_str()))
        .collect();
    assert!(
        !resp_down.is_empty() && resp_down.iter().all(|id| down.iter().any(|d| d == id)),
        "{report}"
    );
    // The other chunk's slots keep taking writes; a plain client asking a
    // live proxy for a lost slot gets CLUSTERDOWN, not a hang.
    assert_eq!(set(live_owner, live_key.clone(), "still").await, "+OK\r\n");
    let live_plain = sys
        .proxies
        .iter()
        .find(|p| !down.contains(&p.id))
        .unwrap()
        .plain
        .clone();
    let reply = set(live_plain.clone(), lost_key.clone(), "lost").await;
    assert!(reply.starts_with("-CLUSTERDOWN"), "{reply}");
    let reply = set(live_plain.clone(), live_key.clone(), "plain").await;
    assert_eq!(reply, "+OK\r\n");

    // The proxies come back: the lost slots are served again with their
    // data. (If the checkers saw one of the two die first, the coordinator
    // had moved its masters to the other before that one died too; then
    // that proxy is out of the cluster and the other serves both shards.)
    let brokers = sys.broker.url();
    for p in sys.proxies.iter_mut().filter(|p| down.contains(&p.id)) {
        p.start(&brokers);
    }
    eventually(
        "the lost key readable again",
        Duration::from_secs(20),
        || {
            let plain = live_plain.clone();
            let key = lost_key.clone();
            async move {
                let reply =
                    redmesh_e2e::harness::raw_exchange(&plain, format!("GET {key}\r\n").as_bytes());
                let reply = reply.ok()?;
                (reply == b"$4\r\nkept\r\n").then_some(())
            }
        },
    )
    .await;
    assert_eq!(set(live_plain, lost_key, "again").await, "+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_that_never_synced_is_not_promoted_to_serve_an_empty_shard() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("guard", 4, v1::ClusterConfig::default())
        .await;
    let (_checkers, co) = sys.start_control_plane().await;
    let (master_proxy, master_node) = sys.key_master(&cluster, b"guarded");
    let master_id = master_proxy.id.clone();
    let reply =
        redmesh_e2e::harness::raw_exchange(&master_proxy.resp, b"SET guarded v1\r\n").unwrap();
    assert_eq!(reply, b"+OK\r\n");
    let shard = cluster
        .shards
        .iter()
        .find(|s| s.master.as_ref().unwrap().proxy_id == master_id)
        .unwrap();
    let r = &shard.replicas[0];
    let partner = sys.proxy(&r.proxy_id);
    let replica = &partner.redis[r.node_index as usize];
    // The replica loses its data and its link, as if its first full sync
    // had never finished when its master died.
    let dead = redmesh_e2e::ports::free_port().to_string();
    for cmd in [
        vec!["REPLICAOF", "NO", "ONE"],
        vec!["FLUSHALL"],
        vec!["REPLICAOF", "127.0.0.1", dead.as_str()],
    ] {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &replica.port.to_string()])
            .args(&cmd)
            .output()
            .unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    }

    // A forced failover moves the shard to that replica.
    CoordinatorClient::connect(co.url())
        .await
        .unwrap()
        .failover(v1::FailoverRequest {
            cluster: "guard".into(),
            proxy_id: master_id.clone(),
            mode: v1::FailoverMode::Force as i32,
            replace: false,
        })
        .await
        .expect("forced failover");

    // The partner refuses to serve the empty node: the shard is unavailable
    // with a reason, not silently empty.
    let text = eventually("the shard refused", Duration::from_secs(20), || async {
        let reply = redmesh_e2e::harness::raw_exchange(&partner.resp, b"GET guarded\r\n").ok()?;
        let text = String::from_utf8_lossy(&reply).into_owned();
        text.starts_with("-CLUSTERDOWN").then_some(text)
    })
    .await;
    assert!(text.contains("never completed a sync"), "{text}");
    let role = std::process::Command::new("redis-cli")
        .args(["-p", &replica.port.to_string(), "ROLE"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&role.stdout).starts_with("slave"),
        "the empty node was promoted: {role:?}"
    );
    // And the old master kept the data for the operator.
    let reply = redmesh_e2e::harness::raw_exchange(&master_node.addr, b"GET guarded\r\n").unwrap();
    assert_eq!(reply, b"$2\r\nv1\r\n");
}

/// The first answer of `proxy` to `GET r0` that names `reason`; every
/// answer until then must be `-CLUSTERDOWN` (an emptied node never
/// answers).
async fn refused_with(proxy: &str, reason: &str) -> String {
    eventually(
        &format!("GET r0 refused with {reason:?}"),
        Duration::from_secs(20),
        || async {
            let reply = redmesh_e2e::harness::raw_exchange(proxy, b"GET r0\r\n").ok()?;
            let text = String::from_utf8_lossy(&reply).into_owned();
            assert!(
                text.starts_with("-CLUSTERDOWN"),
                "the emptied node answered: {text}"
            );
            text.contains(reason).then_some(text)
        },
    )
    .await
}

/// A master node whose Redis restarted empty, and what it held.
struct Emptied {
    /// The node.
    master: v1::NodeRef,
    /// Its Redis port.
    master_port: u16,
    /// Its replica's Redis port.
    replica_port: u16,
    /// The replica's DBSIZE: what the shard held.
    keys: String,
}

/// Writes 200 keys through the plain listener, waits until the replica of
/// the master holding `r0` has them all, then kill -9s that master's Redis
/// and restarts it at once without its data (no persistence), as a
/// supervisor would.
async fn empty_a_master(sys: &mut System, cluster: &v1::Cluster) -> Emptied {
    let entry = sys.members(cluster)[0].plain.clone();
    for i in 0..200 {
        let set = format!("SET r{i} v{i}\r\n");
        assert_eq!(
            redmesh_e2e::harness::raw_exchange(&entry, set.as_bytes()).unwrap(),
            b"+OK\r\n"
        );
    }
    let slot = u32::from(redmesh_model::key_slot(b"r0"));
    let owner = cluster
        .slots
        .iter()
        .find(|a| a.range.is_some_and(|r| r.start <= slot && slot <= r.end))
        .unwrap()
        .shard_id;
    let shard = cluster.shards.iter().find(|s| s.id == owner).unwrap();
    let (m, r) = (shard.master.clone().unwrap(), shard.replicas[0].clone());
    let master_port = sys.proxy(&m.proxy_id).redis[m.node_index as usize].port;
    let replica_port = sys.proxy(&r.proxy_id).redis[r.node_index as usize].port;
    let keys = eventually("the replica in sync", Duration::from_secs(20), || async {
        let (a, b) = (
            redis_cli(master_port, &["DBSIZE"]),
            redis_cli(replica_port, &["DBSIZE"]),
        );
        (a == b && a != "0").then_some(a)
    })
    .await;

    // kill -9 of the master's Redis, restarted at once without its data
    // (no persistence), as a supervisor would restart it.
    {
        let node = &mut sys.proxy_mut(&m.proxy_id).redis[m.node_index as usize];
        node.kill();
        node.restart();
    }
    Emptied {
        master: m,
        master_port,
        replica_port,
        keys,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_redis_restarted_empty_is_failed_over_to_its_replica() {
    // proxy-0/2 on host-a, proxy-1/3 on host-b: one chunk serves, one
    // proxy per host stays free for the replacement.
    let mut sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("reborn", 4, v1::ClusterConfig::default())
        .await;
    let (_checkers, _co) = sys.start_control_plane().await;
    let emptied = empty_a_master(&mut sys, &cluster).await;
    let restarted = Instant::now();
    // The checkers' PING of the node is answered; its proxy, which will
    // not serve it, answers them NOT_SERVING, and the coordinator fails
    // the proxy over: the replica, which kept the data, takes the shard.
    let victim = emptied.master.proxy_id.clone();
    let (healed, _) = sys.wait_replaced("reborn", &victim).await;
    eprintln!(
        "a master's Redis restarted empty: proxy failed over {} ms later",
        restarted.elapsed().as_millis()
    );
    sys.wait_cluster_ok(&healed).await;
    let client = patient_cluster_client(sys.members(&healed).iter().map(|p| &p.resp));
    let mut conn = client.get_async_connection().await.unwrap();
    for i in 0..200 {
        let v: Option<String> = conn.get(format!("r{i}")).await.unwrap();
        assert_eq!(v, Some(format!("v{i}")), "r{i}");
    }
    assert_eq!(redis_cli(emptied.replica_port, &["GET", "r0"]), "v0");
    assert_eq!(emptied.keys, redis_cli(emptied.replica_port, &["DBSIZE"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_redis_restarted_empty_is_not_served_and_its_replica_keeps_the_data() {
    // No control plane: nothing fails over, so what the proxies do alone
    // with a master's Redis that comes back empty is all that happens.
    let mut sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("restart", 4, v1::ClusterConfig::default())
        .await;
    let Emptied {
        master: m,
        master_port,
        replica_port,
        keys,
    } = empty_a_master(&mut sys, &cluster).await;
    // Its replica reconnects and is refused (no replication user there),
    // instead of full-syncing an empty dataset over the shard's data.
    let refused = eventually(
        "the replica reconnecting",
        Duration::from_secs(20),
        || async {
            // A failed AUTH is in the node's ACL LOG, naming the user.
            let denied = redis_cli(master_port, &["ACL", "LOG"]).contains("redmesh-repl");
            let link = redis_cli(replica_port, &["INFO", "replication"]);
            if denied {
                Some(true)
            } else {
                (info_field(&link, "master_link_status") == Some("up")).then_some(false)
            }
        },
    )
    .await;
    assert!(refused, "the replica synced from the emptied master");
    // Its proxy does not claim the empty node back: the shard answers with
    // the reason, and the replica still holds every key for a failover.
    // Never an empty answer meanwhile: until the proxy's next check of the
    // node, the restarted Redis lacks the user client traffic runs as.
    let master_proxy = sys.proxy(&m.proxy_id).resp.clone();
    let text = refused_with(&master_proxy, "lost this cluster's data").await;
    assert!(text.contains("not claimed again"), "{text}");
    assert_eq!(redis_cli(replica_port, &["DBSIZE"]), keys);
    assert_eq!(redis_cli(replica_port, &["GET", "r0"]), "v0");
    assert_eq!(redis_cli(master_port, &["DBSIZE"]), "0");

    // The proxy process restarts too, so it no longer remembers serving
    // the node (a host whose proxy and Redis both came back before the
    // control plane noticed). It still does not claim the empty node: the
    // shard's replica holds the data.
    let broker = sys.broker.url();
    {
        let p = sys.proxy_mut(&m.proxy_id);
        p.child.as_mut().unwrap().kill();
        p.start(&broker);
    }
    let text = refused_with(&master_proxy, "but its replica").await;
    assert!(text.contains("lost this cluster's data"), "{text}");
    // Nothing lets the replica in: the empty node has no replication user.
    assert_eq!(
        redis_cli(master_port, &["ACL", "GETUSER", "redmesh-repl"]),
        ""
    );
    assert_eq!(redis_cli(replica_port, &["DBSIZE"]), keys);
}

/// Split brain: a proxy cut off from the control plane (it cannot reach
/// the broker, the health-checkers, coordinator and migrator cannot reach
/// it) while clients still reach it. It must refuse writes within its
/// fencing time, the control plane must fail it over to its partner, and
/// no acknowledged write may be lost. Once the partition heals, it serves
/// nothing, and sends the clients that still route to it on with `-MOVED`.
/// Needs root, cgroup2 and nftables: skipped, saying why, where the
/// machine lacks them, unless `REDMESH_REQUIRE_PARTITIONS=1` (which
/// `./tests/run.sh` sets when it runs as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cut_off_from_the_control_plane_fences_itself_and_is_failed_over() {
    let Some(mut parts) = Partitions::for_test() else {
        return;
    };
    let control = parts.group("control").unwrap();
    let cut_off = parts.group("cut-off").unwrap();
    // Fencing slower than detection (1.5 s; the default 750 ms is about
    // as long as detection here): the coordinator must wait it out before
    // it promotes, or the writes the cut-off proxy takes meanwhile are lost.
    let fence = "1500ms";
    let mut sys = System::start_env(4, &[("REDMESH_PROXY_FENCE_AFTER", fence)]);
    parts.spawn_in(&control, || sys.broker.restart());
    sys.register_all().await;
    let cluster = sys
        .create_cluster("cut", 4, v1::ClusterConfig::default())
        .await;
    let victim_id = sys.key_master(&cluster, b"cut-key").0.id.clone();
    let vi = sys.proxies.iter().position(|p| p.id == victim_id).unwrap();
    let broker_url = sys.broker.url();
    parts.spawn_in(&cut_off, || {
        let p = &mut sys.proxies[vi];
        p.child.as_mut().unwrap().kill();
        p.start(&broker_url);
    });
    sys.wait_cluster_ok(&cluster).await;
    let (checkers, co) = parts.spawn_in(&control, || {
        let checkers: Vec<_> = ["hc-a", "hc-b", "hc-c"]
            .iter()
            .map(|id| sys.start_service("redmesh-health-checker", id, &[]))
            .collect();
        (
            checkers,
            // 1.5 s less two probe intervals, as the default is 750 ms less.
            sys.start_service("redmesh-coordinator", "co-1", &["--fence-wait", "1300ms"]),
        )
    });
    eventually("a coordinator leader", Duration::from_secs(20), || async {
        coordinator_status(&co).await.is_leader.then_some(())
    })
    .await;

    // A writer, and a connection to the victim made before the cut.
    let client = patient_cluster_client(sys.proxies.iter().map(|p| &p.resp));
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let mut conn = client.get_async_connection().await.unwrap();
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let key = format!("cut:{i}");
                if conn.set::<_, _, ()>(&key, i).await.is_ok() {
                    acked.lock().unwrap().insert(key, i);
                }
            }
        })
    };
    let victim = &sys.proxies[vi];
    let mut old = redis::Client::open(format!("redis://{}", victim.resp))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = old.set("cut-key", "before").await.unwrap();
    eventually("writes flowing", Duration::from_secs(10), || async {
        (acked.lock().unwrap().len() > 100).then_some(())
    })
    .await;

    let cut_at = Instant::now();
    parts.cut(&cut_off, &[port_of(&sys.broker.addr)]).unwrap();
    parts
        .cut(
            &control,
            &[
                port_of(&victim.resp),
                port_of(&victim.plain),
                port_of(&victim.admin),
            ],
        )
        .unwrap();
    // Clients still reach it; it refuses writes once fenced.
    let fenced = eventually(
        "the cut-off proxy to fence itself",
        Duration::from_secs(10),
        || {
            let mut old = old.clone();
            async move {
                match old.set::<_, _, ()>("cut-key", "during").await {
                    Err(e) if e.to_string().contains("fenced") => Some(cut_at.elapsed()),
                    _ => None,
                }
            }
        },
    )
    .await;
    eprintln!("fenced {fenced:?} after the cut");
    let replaced = eventually(
        "the cut-off proxy failed over and replaced",
        Duration::from_secs(30),
        || async {
            let (c, _) = sys.get_cluster("cut").await;
            c.chunks
                .iter()
                .all(|ch| !ch.proxy_ids.contains(&victim_id))
                .then_some(c)
        },
    )
    .await;
    eprintln!("replaced {:?} after the cut", cut_at.elapsed());
    sys.wait_cluster_ok(&replaced).await;
    // The partner took the victim's slots: a client of today's members
    // writes them.
    let mut fresh = patient_cluster_client(sys.members(&replaced).iter().map(|p| &p.resp))
        .get_async_connection()
        .await
        .unwrap();
    let () = fresh.set("cut-key", "after").await.unwrap();

    // Healed: it reads that it failed, serves nothing, and sends its old
    // connections on.
    parts.heal().unwrap();
    let moved = eventually(
        "the healed proxy to redirect its old connections",
        Duration::from_secs(20),
        || {
            let mut old = old.clone();
            async move {
                let e = old.get::<_, Option<String>>("cut-key").await.err()?;
                e.redirect_node().map(|(to, _)| to.to_owned())
            }
        },
    )
    .await;
    assert!(
        sys.members(&replaced).iter().any(|p| p.resp == moved),
        "MOVED to {moved}, not a member"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    let lost = lost_writes(&mut fresh, &acked).await;
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    let v: Option<String> = fresh.get("cut-key").await.unwrap();
    assert_eq!(v.as_deref(), Some("after"));
    drop(checkers);
}
