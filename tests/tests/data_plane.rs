//! The proxy as a data plane, driven by real clients: every command family
//! through redis-py (RedisCluster, and a plain client in plain mode) and the
//! redis-rs cluster client, plain-client mode (per cluster and per listener)
//! with single-endpoint clients and `redis-cli` without `-c`, request order
//! under pipelining, and transparent value compression.

use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use redmesh_api::v1;
use redmesh_e2e::harness::{python, raw_exchange};
use redmesh_e2e::System;
use tonic::Code;

async fn connect(addr: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{addr}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

fn redis_cli(addr: &str, args: &[&str]) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let out = Command::new("redis-cli")
        .args(["-h", host, "-p", port])
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(out.status.success(), "redis-cli {args:?} failed");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs tests/clients/redis_py_commands.py with `args`.
fn redis_py_commands(args: &[&str], log: impl Fn() -> String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/redis_py_commands.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "redis-py failed:\n{}\n{}\nproxy log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_py_cluster_client_drives_every_command_family() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster(
            "families",
            4,
            v1::ClusterConfig {
                password: "pw".into(),
                ..Default::default()
            },
        )
        .await;
    let entry = &sys.members(&cluster)[0];
    redis_py_commands(&[&entry.resp, "--password", "pw"], || entry.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_drives_every_command_family_in_plain_mode() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster(
            "plainfam",
            4,
            v1::ClusterConfig {
                password: "pw".into(),
                client_mode: v1::ClientMode::Plain as i32,
                ..Default::default()
            },
        )
        .await;
    let m = sys.members(&cluster);
    redis_py_commands(
        &["--plain", &m[0].resp, &m[1].resp, "--password", "pw"],
        || format!("{}\n{}", m[0].log(), m[1].log()),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rs_cluster_client_runs_the_command_mix() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("rs", 4, v1::ClusterConfig::default())
        .await;
    let seeds: Vec<String> = sys
        .members(&cluster)
        .iter()
        .map(|p| format!("redis://{}", p.resp))
        .collect();
    let client = redis::cluster::ClusterClient::new(seeds).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.set(format!("{{rs}}:{i}"), i).ignore();
    }
    for i in 0..500 {
        pipe.get(format!("{{rs}}:{i}"));
    }
    let got: Vec<i64> = pipe.query_async(&mut conn).await.unwrap();
    assert_eq!(got, (0..500).collect::<Vec<_>>());
    // Every family, typed through redis-rs.
    let () = conn
        .hset_multiple("{h}h", &[("a", 1), ("b", 2)])
        .await
        .unwrap();
    let h: std::collections::HashMap<String, i64> = conn.hgetall("{h}h").await.unwrap();
    assert_eq!(h.len(), 2);
    let n: i64 = conn.rpush("{l}l", &["x", "y", "z"]).await.unwrap();
    assert_eq!(n, 3);
    let l: Vec<String> = conn.lrange("{l}l", 0, -1).await.unwrap();
    assert_eq!(l, ["x", "y", "z"]);
    let n: i64 = conn.sadd("{s}a", &["1", "2"]).await.unwrap();
    assert_eq!(n, 2);
    let inter: Vec<String> = conn.sinter(&["{s}a", "{s}a"]).await.unwrap();
    assert_eq!(inter.len(), 2);
    let n: i64 = conn.zadd("{z}z", "m", 2.5).await.unwrap();
    assert_eq!(n, 1);
    let score: f64 = conn.zscore("{z}z", "m").await.unwrap();
    assert_eq!(score, 2.5);
    let id: String = conn.xadd("{x}s", "*", &[("f", "v")]).await.unwrap();
    let len: usize = conn.xlen("{x}s").await.unwrap();
    assert!(!id.is_empty() && len == 1);
    let n: i64 = conn.pfadd("{p}h", &["a", "b"]).await.unwrap();
    assert_eq!(n, 1);
    let n: i64 = conn
        .geo_add("{g}g", (13.36, 38.11, "Palermo"))
        .await
        .unwrap();
    assert_eq!(n, 1);
    let old: i64 = conn.setbit("{b}b", 3, true).await.unwrap();
    assert_eq!(old, 0);
    let () = conn.set_ex("ttl", "v", 100).await.unwrap();
    let ttl: i64 = conn.ttl("ttl").await.unwrap();
    assert!(0 < ttl && ttl <= 100);
    // Transactions (one slot), scripts, blocking pops.
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .incr("{t}n", 1)
        .incr("{t}n", 1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((a, b), (1, 2));
    let script = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    let v: i64 = script
        .key("{t}n")
        .arg(40)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, 42);
    let pusher = {
        let mut c2 = client.get_async_connection().await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c2.rpush::<_, _, i64>("{q}q", "job").await.unwrap();
        })
    };
    let popped: Option<(String, String)> = conn.blpop("{q}q", 5.0).await.unwrap();
    assert_eq!(popped, Some(("{q}q".into(), "job".into())));
    pusher.await.unwrap();
    // Pub/sub: a subscriber on any proxy hears a PUBLISH sent through the
    // cluster client.
    let mut sub = redis::Client::open(format!("redis://{}", sys.members(&cluster)[1].resp))
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    sub.subscribe("rs-chan").await.unwrap();
    let n: i64 = conn.publish("rs-chan", "hi").await.unwrap();
    assert_eq!(n, 1);
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.on_message().next())
        .await
        .expect("message delivered")
        .unwrap();
    assert_eq!(msg.get_payload::<String>().unwrap(), "hi");
    // Multi-key commands over several slots: CROSSSLOT, as from Redis
    // (redis-rs would split MSET itself, so ask directly).
    let reply = raw_exchange(
        &sys.members(&cluster)[0].resp,
        b"MSET {a}x 1 {b}y 2\r\nEVAL \"return 1\" 2 {a}x {b}y\r\n",
    )
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply),
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n".repeat(2)
    );
    // Unsupported or dangerous commands are refused by name.
    let e = redis::cmd("SWAPDB")
        .arg(0)
        .arg(1)
        .query_async::<()>(&mut conn)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("'swapdb' is not allowed"), "{e}");
}

/// Checks a single-endpoint client at `entry` sees the whole cluster.
async fn single_endpoint_sees_everything(entry: &str, other: &str, prefix: &str) {
    let mut c = connect(entry).await;
    let keys: Vec<String> = (0..300).map(|i| format!("{prefix}:{i}")).collect();
    for k in &keys {
        let () = c.set(k, k).await.unwrap();
    }
    // Another proxy's endpoint serves the same data.
    let mut o = connect(other).await;
    for k in keys.iter().step_by(7) {
        let v: String = o.get(k).await.unwrap();
        assert_eq!(&v, k);
    }
    // Pipelined, one client's requests reach each node in the order sent,
    // whether served here, forwarded, split or queued in a transaction.
    let mut pipe = redis::pipe();
    let mut want = Vec::new();
    let bulk = |v: String| redis::Value::BulkString(v.into_bytes());
    for i in 0..200 {
        let (k, a, b) = (
            format!("{prefix}:o{i}"),
            format!("{prefix}:oa{i}"),
            format!("{prefix}:ob{i}"),
        );
        pipe.set(&k, format!("v{i}")).ignore().get(&k);
        want.push(bulk(format!("v{i}")));
        pipe.mset(&[(&a, format!("a{i}")), (&b, format!("b{i}"))])
            .ignore()
            .mget(&[&a, &b]);
        want.push(redis::Value::Array(vec![
            bulk(format!("a{i}")),
            bulk(format!("b{i}")),
        ]));
    }
    let counter = format!("{prefix}:counter");
    pipe.cmd("MULTI")
        .ignore()
        .incr(&counter, 5)
        .ignore()
        .cmd("EXEC")
        .ignore()
        .get(&counter);
    want.push(bulk("5".into()));
    let got: Vec<redis::Value> = pipe.query_async(&mut c).await.unwrap();
    assert_eq!(got, want, "pipelined replies in order and consistent");
    let _: usize = c.del(&counter).await.unwrap();
    for i in 0..200 {
        let keys = [
            format!("{prefix}:o{i}"),
            format!("{prefix}:oa{i}"),
            format!("{prefix}:ob{i}"),
        ];
        let _: usize = c.del(&keys).await.unwrap();
    }
    // Multi-key commands are split by slot and gathered in order.
    let mut ask: Vec<String> = keys.iter().rev().cloned().collect();
    ask.insert(5, format!("{prefix}:missing"));
    let got: Vec<Option<String>> = c.mget(&ask).await.unwrap();
    let mut want: Vec<Option<String>> = keys.iter().rev().cloned().map(Some).collect();
    want.insert(5, None);
    assert_eq!(got, want, "MGET across slots keeps key order");
    let pairs: Vec<(String, String)> = (0..50)
        .map(|i| (format!("{prefix}:m{i}"), format!("v{i}")))
        .collect();
    let () = c.mset(&pairs).await.unwrap();
    let n: usize = c.exists(&keys[..100]).await.unwrap();
    assert_eq!(n, 100, "EXISTS across slots");
    let n: usize = c.del(&keys[..100]).await.unwrap();
    assert_eq!(n, 100, "DEL across slots");
    let n: usize = redis::cmd("UNLINK")
        .arg(&keys[100..150])
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 50, "UNLINK across slots");
    let e = redis::cmd("MSETNX")
        .arg(format!("{prefix}:a"))
        .arg(1)
        .arg(format!("{prefix}:b"))
        .arg(2)
        .query_async::<i64>(&mut c)
        .await
        .unwrap_err();
    assert!(
        e.to_string().to_lowercase().contains("crossslot"),
        "MSETNX is atomic, so it cannot be split: {e}"
    );
    // Keyless commands cover the whole cluster.
    let size: usize = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert_eq!(size, 150 + 50, "DBSIZE counts every proxy's keys");
    let mut seen = std::collections::HashSet::new();
    let mut iter: redis::AsyncIter<'_, String> =
        c.scan_match(format!("{prefix}:m*")).await.unwrap();
    while let Some(k) = iter.next_item().await {
        seen.insert(k.unwrap());
    }
    drop(iter);
    assert_eq!(seen.len(), 50, "SCAN walks every proxy's masters");
    // Transactions and blocking pops run wherever the key lives.
    let key = format!("{prefix}:tx");
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .incr(&key, 1)
        .incr(&key, 2)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((a, b), (1, 3));
    let queue = format!("{prefix}:queue");
    let waiter = {
        let mut w = connect(entry).await;
        let queue = queue.clone();
        tokio::spawn(async move {
            redis::cmd("BLPOP")
                .arg(&queue)
                .arg(5)
                .query_async::<Option<(String, String)>>(&mut w)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _: i64 = o.rpush(&queue, "job").await.unwrap();
    assert_eq!(
        waiter.await.unwrap().unwrap(),
        Some((queue.clone(), "job".into()))
    );
    // Pub/sub: subscribers on one proxy hear publishers on another.
    let mut sub = redis::Client::open(format!("redis://{entry}"))
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    sub.subscribe(format!("{prefix}:chan")).await.unwrap();
    let receivers: i64 = o.publish(format!("{prefix}:chan"), "hello").await.unwrap();
    assert_eq!(receivers, 1);
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.on_message().next())
        .await
        .expect("message delivered")
        .unwrap();
    assert_eq!(msg.get_payload::<String>().unwrap(), "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_cluster_serves_every_key_from_any_proxy() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster(
            "plain",
            4,
            v1::ClusterConfig {
                client_mode: v1::ClientMode::Plain as i32,
                ..Default::default()
            },
        )
        .await;
    let members = sys.members(&cluster);
    single_endpoint_sees_everything(&members[0].resp, &members[1].resp, "pc").await;
    // redis-cli without -c: no redirects to follow, every key answers.
    for i in 0..20 {
        let key = format!("cli:{i}");
        assert_eq!(
            redis_cli(&members[0].resp, &["SET", &key, "v"]),
            "OK",
            "{key}"
        );
        assert_eq!(redis_cli(&members[1].resp, &["GET", &key]), "v", "{key}");
    }
    // It still describes itself as a cluster for tools that ask.
    assert!(redis_cli(&members[0].resp, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_listener_serves_a_cluster_mode_cluster() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("mixed", 4, v1::ClusterConfig::default())
        .await;
    let members = sys.members(&cluster);
    single_endpoint_sees_everything(&members[0].plain, &members[1].plain, "pl").await;
    // The cluster listener still redirects keys it does not own.
    let foreign = (0..)
        .map(|i| format!("probe{i}"))
        .find(|k| sys.key_master(&cluster, k.as_bytes()).0.id != members[0].id)
        .unwrap();
    let reply = redis_cli(&members[0].resp, &["GET", &foreign]);
    assert!(reply.starts_with("MOVED"), "{reply}");
    assert_eq!(redis_cli(&members[0].plain, &["GET", &foreign]), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_is_transparent_and_byte_commands_are_refused() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster(
            "squeeze",
            4,
            v1::ClusterConfig {
                compression: v1::Compression::Lz4 as i32,
                compression_threshold: 64,
                client_mode: v1::ClientMode::Plain as i32,
                ..Default::default()
            },
        )
        .await;
    let entry = &sys.members(&cluster)[0].resp;
    let mut c = connect(entry).await;
    let big = "redmesh ".repeat(1000);
    let () = c.set("big", &big).await.unwrap();
    let got: String = c.get("big").await.unwrap();
    assert_eq!(got, big);
    // Stored compressed: Redis itself holds far fewer bytes.
    let (_, node) = sys.key_master(&cluster, b"big");
    let mut direct = connect(&node.addr).await;
    let stored: Vec<u8> = direct.get("big").await.unwrap();
    assert!(
        stored.starts_with(b"\xffRMC") && stored.len() < big.len() / 10,
        "stored {} bytes",
        stored.len()
    );
    // Small values, and values that look like ours, stay exact.
    let () = c.set("small", "tiny").await.unwrap();
    let tricky: Vec<u8> = b"\xffRMCLnot really compressed".to_vec();
    let () = c.set("tricky", &tricky).await.unwrap();
    let got: Vec<u8> = c.get("tricky").await.unwrap();
    assert_eq!(got, tricky);
    // The string commands that carry values, across slots too.
    let pairs: Vec<(String, String)> = (0..20)
        .map(|i| (format!("m{i}"), format!("{i}{big}")))
        .collect();
    let () = c.mset(&pairs).await.unwrap();
    let keys: Vec<&String> = pairs.iter().map(|(k, _)| k).collect();
    let got: Vec<String> = c.mget(&keys).await.unwrap();
    assert_eq!(
        got,
        pairs.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>()
    );
    let old: String = c.getset("big", "replaced").await.unwrap();
    assert_eq!(old, big);
    let () = c.set_ex("ttl", &big, 100).await.unwrap();
    let old: String = redis::cmd("SET")
        .arg("ttl")
        .arg("x")
        .arg("GET")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(old, big);
    let got: String = redis::cmd("GETDEL")
        .arg("m3")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(got, pairs[3].1);
    let (v,): (String,) = redis::pipe()
        .atomic()
        .get("m4")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, pairs[4].1, "EXEC replies are decompressed");
    // Commands that would see the stored bytes are refused by name.
    for (cmd, args) in [
        ("APPEND", vec!["big", "x"]),
        ("STRLEN", vec!["big"]),
        ("GETRANGE", vec!["big", "0", "3"]),
        ("SETRANGE", vec!["big", "0", "x"]),
        ("BITCOUNT", vec!["big"]),
    ] {
        let e = redis::cmd(cmd)
            .arg(&args)
            .query_async::<redis::Value>(&mut c)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "'{}' is not available while value compression is on",
                cmd.to_lowercase()
            )),
            "{cmd}: {e}"
        );
    }
    // Compression cannot be switched off (values would come back packed);
    // switching algorithm keeps old values readable.
    let mut b = sys.broker().await;
    let e = b
        .update_cluster_config(v1::UpdateClusterConfigRequest {
            name: "squeeze".into(),
            config: Some(v1::ClusterConfig {
                compression: v1::Compression::None as i32,
                ..Default::default()
            }),
            update_paths: vec!["compression".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("cannot be turned off"), "{e}");
    let updated = b
        .update_cluster_config(v1::UpdateClusterConfigRequest {
            name: "squeeze".into(),
            config: Some(v1::ClusterConfig {
                compression: v1::Compression::Zstd as i32,
                ..Default::default()
            }),
            update_paths: vec!["compression".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap();
    sys.wait_cluster_ok(&updated).await;
    let got: String = c.get("m5").await.unwrap();
    assert_eq!(got, pairs[5].1, "an lz4 value read under zstd");
    let () = c.set("z", &big).await.unwrap();
    let (_, node) = sys.key_master(&cluster, b"z");
    let stored: Vec<u8> = connect(&node.addr).await.get("z").await.unwrap();
    assert!(stored.starts_with(b"\xffRMCZ"), "new values use zstd");
    let got: String = c.get("z").await.unwrap();
    assert_eq!(got, big);
}
