//! The walking skeleton end to end: real etcd, Redis, broker and proxies.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redmesh_api::v1;
use redmesh_e2e::harness::raw_exchange;
use redmesh_e2e::system::cluster_info;
use redmesh_e2e::System;
use redmesh_model::key_slot;

fn seeds(sys: &System, cluster: &v1::Cluster) -> Vec<String> {
    sys.members(cluster)
        .iter()
        .map(|p| format!("redis://{}", p.resp))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_client_writes_and_reads_10000_keys_over_all_slots() {
    let sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("demo", 8, v1::ClusterConfig::default())
        .await;
    assert_eq!((cluster.node_count, cluster.shards.len()), (8, 4));

    let client = redis::cluster::ClusterClient::new(seeds(&sys, &cluster)).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let mut slots = HashSet::new();
    for chunk in (0..10_000).collect::<Vec<u32>>().chunks(500) {
        let writes = chunk.iter().map(|i| {
            let mut c = conn.clone();
            async move {
                c.set::<_, _, ()>(format!("key:{i}"), format!("value-{i}"))
                    .await
            }
        });
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
        for i in chunk {
            slots.insert(key_slot(format!("key:{i}").as_bytes()));
        }
    }
    assert!(
        slots.len() > 7_000,
        "keys spread over most slots ({})",
        slots.len()
    );
    for i in (0..10_000).step_by(1) {
        let v: String = conn.get(format!("key:{i}")).await.unwrap();
        assert_eq!(v, format!("value-{i}"));
    }
    // Every master node holds part of the data, and its replica has it too.
    let mut total = 0;
    for p in sys.members(&cluster) {
        let master = redis::Client::open(format!("redis://{}", p.redis[0].addr)).unwrap();
        let mut m = master.get_multiplexed_async_connection().await.unwrap();
        let n: u64 = redis::cmd("DBSIZE").query_async(&mut m).await.unwrap();
        assert!(n > 1_000, "master of {} holds {n} keys", p.id);
        total += n;
    }
    assert_eq!(total, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_owner_answers_moved_exactly_like_redis() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("moved", 4, v1::ClusterConfig::default())
        .await;
    // Find which proxy owns "foo" (slot 12182) and ask the other one.
    let slot = key_slot(b"foo");
    let shard = cluster
        .slots
        .iter()
        .find(|a| {
            a.range
                .is_some_and(|r| r.start <= u32::from(slot) && u32::from(slot) <= r.end)
        })
        .unwrap()
        .shard_id;
    let owner_id = cluster
        .shards
        .iter()
        .find(|s| s.id == shard)
        .unwrap()
        .master
        .clone()
        .unwrap()
        .proxy_id;
    let owner = sys.proxy(&owner_id);
    let other = sys.proxies.iter().find(|p| p.id != owner_id).unwrap();
    let reply = raw_exchange(&other.resp, b"*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n").unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply),
        format!("-MOVED {slot} {}\r\n", owner.resp)
    );
    // The owner serves it.
    let reply = raw_exchange(&owner.resp, b"*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\n").unwrap();
    assert_eq!(reply, b"$-1\r\n");
    // Multi-key commands across slots are refused like Redis Cluster does.
    let reply = raw_exchange(&owner.resp, b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$1\r\nb\r\n").unwrap();
    assert_eq!(
        reply,
        b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_in_cluster_mode_works() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("cli", 4, v1::ClusterConfig::default())
        .await;
    let p = &sys.members(&cluster)[0];
    let port = p.resp.rsplit(':').next().unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-c", "-p", port])
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    for k in ["foo", "bar", "baz", "{user1}.a", "{user1}.b"] {
        assert_eq!(cli(&["set", k, &format!("v-{k}")]), "OK");
        assert_eq!(cli(&["get", k]), format!("v-{k}"));
    }
    assert_eq!(
        cli(&["mget", "{user1}.a", "{user1}.b"]),
        "v-{user1}.a\nv-{user1}.b"
    );
    let nodes = cli(&["cluster", "nodes"]);
    let lines: Vec<&str> = nodes.lines().collect();
    assert_eq!(lines.len(), 2, "{nodes}");
    for line in &lines {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[0].len(), 40, "{line}");
        assert!(fields[2].ends_with("master"), "{line}");
        assert_eq!(fields[7], "connected", "{line}");
        assert!(fields.len() >= 9, "every master owns slots: {line}");
    }
    assert_eq!(lines.iter().filter(|l| l.contains("myself")).count(), 1);
    assert!(cli(&["cluster", "info"]).contains("cluster_state:ok"));
    assert_eq!(cli(&["cluster", "keyslot", "foo"]), "12182");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_cluster_frees_its_proxies_and_wipes_its_data() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("old", 4, v1::ClusterConfig::default())
        .await;
    let client = redis::cluster::ClusterClient::new(seeds(&sys, &cluster)).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    for i in 0..100 {
        conn.set::<_, _, ()>(format!("secret:{i}"), "tenant-a")
            .await
            .unwrap();
    }
    let mut b = sys.broker().await;
    let freed = b
        .delete_cluster(v1::DeleteClusterRequest { name: "old".into() })
        .await
        .unwrap()
        .into_inner()
        .freed_proxies;
    assert_eq!(freed.len(), 2);
    let free = b
        .list_proxies(v1::ListProxiesRequest {
            state: v1::ProxyState::Free as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .proxies;
    assert_eq!(free.len(), 2);
    // The freed proxies stop serving and wipe their nodes.
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in &sys.proxies {
        for r in &p.redis {
            loop {
                let reply = raw_exchange(&r.addr, b"DBSIZE\r\n").unwrap();
                if reply == b":0\r\n" {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} still holds keys: {reply:?}\n{}",
                    r.addr,
                    p.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let reply = raw_exchange(&p.resp, b"GET secret:1\r\n").unwrap();
        assert!(
            reply.starts_with(b"-CLUSTERDOWN"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
    }
    // A new tenant on the same proxies sees none of the old keys.
    let cluster = sys
        .create_cluster("new", 4, v1::ClusterConfig::default())
        .await;
    let client = redis::cluster::ClusterClient::new(seeds(&sys, &cluster)).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    for i in 0..100 {
        let v: Option<String> = conn.get(format!("secret:{i}")).await.unwrap();
        assert_eq!(v, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_changes_reach_every_proxy_quickly() {
    let sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("watched", 8, v1::ClusterConfig::default())
        .await;
    let members = sys.members(&cluster);
    let mut admins = Vec::new();
    for p in &members {
        admins.push(p.admin_client().await);
    }
    let mut b = sys.broker().await;
    let mut latencies = Vec::new();
    for round in 0..10 {
        let started = Instant::now();
        let updated = b
            .update_cluster_config(v1::UpdateClusterConfigRequest {
                name: "watched".into(),
                config: Some(v1::ClusterConfig {
                    password: format!("pw-{round}"),
                    ..Default::default()
                }),
                update_paths: vec!["password".into()],
            })
            .await
            .unwrap()
            .into_inner()
            .cluster
            .unwrap();
        for (p, admin) in members.iter().zip(admins.iter_mut()) {
            loop {
                let info = admin
                    .get_info(v1::GetInfoRequest::default())
                    .await
                    .unwrap()
                    .into_inner();
                if info.epoch >= updated.epoch {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "proxy {} did not install epoch {}",
                    p.id,
                    updated.epoch
                );
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        latencies.push(started.elapsed());
        // The new view is really in force: the new password is required.
        for p in &members {
            let reply = raw_exchange(&p.resp, b"GET k\r\n").unwrap();
            assert!(
                reply.starts_with(b"-NOAUTH"),
                "{}",
                String::from_utf8_lossy(&reply)
            );
            let reply = raw_exchange(&p.resp, format!("AUTH pw-{round}\r\n").as_bytes()).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&reply),
                "+OK\r\n",
                "AUTH on {}",
                p.id
            );
        }
    }
    latencies.sort();
    eprintln!(
        "topology propagation to {} proxies (commit to route table installed on all): median {:?}, max {:?}",
        members.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    let info = cluster_info(&members[0].resp).await;
    assert!(info.is_err(), "CLUSTER INFO needs AUTH now");
}
