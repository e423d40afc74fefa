//! The proxy as a RESP endpoint: Redis's wording for errors, protocol
//! violations close the connection, pipelining keeps order, AUTH is
//! enforced, refused commands say so, a dead Redis node gives a prompt
//! error instead of a hang, and hostile clients (idle, slowloris, too many)
//! are cut off without touching blocked or subscribed ones.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redmesh_api::v1;
use redmesh_e2e::harness::{eventually, raw_exchange, redis_cli};
use redmesh_e2e::System;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Sends `request`, reads until the server closes the connection.
fn exchange_until_close(addr: &str, request: &[u8]) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let closed = s.read_to_end(&mut out).is_ok();
    (out, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_use_redis_wording_and_protocol_errors_close() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("p", 4, v1::ClusterConfig::default())
        .await;
    let addr = &sys.members(&cluster)[0].resp;

    assert_eq!(
        text(&raw_exchange(addr, b"*3\r\n$3\r\nfoo\r\n$1\r\na\r\n$1\r\nb\r\n").unwrap()),
        "-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n"
    );
    assert_eq!(
        text(&raw_exchange(addr, b"*1\r\n$3\r\nGET\r\n").unwrap()),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        text(&raw_exchange(addr, b"SELECT 0\r\n").unwrap()),
        "+OK\r\n"
    );
    assert_eq!(
        text(&raw_exchange(addr, b"SELECT 1\r\n").unwrap()),
        "-ERR SELECT is not allowed in cluster mode\r\n"
    );
    assert_eq!(
        text(&raw_exchange(addr, b"ECHO hi\r\n").unwrap()),
        "$2\r\nhi\r\n"
    );
    assert!(text(&raw_exchange(addr, b"CLUSTER FOO\r\n").unwrap())
        .starts_with("-ERR unknown subcommand 'FOO'"));
    for (cmd, why) in [
        (&b"CONFIG GET maxmemory\r\n"[..], "not allowed"),
        (b"MOVE k 1\r\n", "not allowed"),
        (b"REPLICAOF NO ONE\r\n", "not allowed"),
    ] {
        let reply = text(&raw_exchange(addr, cmd).unwrap());
        assert!(
            reply.starts_with("-ERR") && reply.contains(why),
            "{}: {reply}",
            text(cmd)
        );
    }
    // Protocol errors: Redis's reply, then the connection closes.
    for (input, reply) in [
        (
            &b"*x\r\n"[..],
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n$999999999999\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            b"*1\r\n:1\r\n",
            "-ERR Protocol error: expected '$', got ':'\r\n",
        ),
        (
            b"SET \"a\r\n",
            "-ERR Protocol error: unbalanced quotes in request\r\n",
        ),
    ] {
        let (out, closed) = exchange_until_close(addr, input);
        assert_eq!(text(&out), reply);
        assert!(closed, "connection closed after {reply}");
    }
    // QUIT answers then closes.
    let (out, closed) = exchange_until_close(addr, b"PING\r\nQUIT\r\nPING\r\n");
    assert_eq!(text(&out), "+PONG\r\n+OK\r\n");
    assert!(closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_replies_keep_request_order() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("pipe", 4, v1::ClusterConfig::default())
        .await;
    let addr = &sys.members(&cluster)[0].resp;
    // Mix local forwards, local answers, redirects and errors in one write.
    let mut req = Vec::new();
    let mut expected = Vec::new();
    for i in 0..2000 {
        match i % 4 {
            0 => {
                req.extend_from_slice(format!("SET {{a}}{i} v{i}\r\n").as_bytes());
                expected.push("+OK".to_owned());
            }
            1 => {
                req.extend_from_slice(format!("GET {{a}}{}\r\n", i - 1).as_bytes());
                expected.push(format!("$4\r\nv{}", i - 1).chars().take(20).collect());
            }
            2 => {
                req.extend_from_slice(format!("ECHO e{i}\r\n").as_bytes());
                expected.push(format!("${}\r\ne{i}", format!("e{i}").len()));
            }
            _ => {
                req.extend_from_slice(b"NOSUCH\r\n");
                expected.push("-ERR unknown command 'NOSUCH'".to_owned());
            }
        }
    }
    let a_owner = key_owner(&sys, &cluster, b"a");
    if a_owner != *addr {
        // Slot {a} is elsewhere: every SET/GET is a redirect instead.
        for (i, e) in expected.iter_mut().enumerate() {
            if i % 4 < 2 {
                *e = format!("-MOVED {}", redmesh_model::key_slot(b"a"));
            }
        }
    }
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&req).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(10);
    let replies = loop {
        let n = s.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
        let parsed = split_replies(&got);
        if parsed.len() >= expected.len() || Instant::now() > deadline {
            break parsed;
        }
    };
    assert_eq!(replies.len(), expected.len());
    for (i, (r, e)) in replies.iter().zip(&expected).enumerate() {
        let e = e.replace("$4\r\nv", "$");
        let ok = r.starts_with(e.as_str()) || (e.starts_with('$') && r.starts_with('$'));
        assert!(ok, "reply {i}: got {r:?}, expected {e:?}");
    }
}

/// Splits a RESP2 stream of simple replies and bulk strings.
fn split_replies(b: &[u8]) -> Vec<String> {
    let s = String::from_utf8_lossy(b);
    let mut out = Vec::new();
    let mut lines = s.split("\r\n").peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() && lines.peek().is_none() {
            break;
        }
        if line.starts_with('$') && line != "$-1" {
            match lines.next() {
                Some(body) => out.push(format!("{line}\r\n{body}")),
                None => break,
            }
        } else {
            out.push(line.to_owned());
        }
    }
    out
}

fn key_owner(sys: &System, cluster: &v1::Cluster, key: &[u8]) -> String {
    sys.key_master(cluster, key).0.resp.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_empties_the_keys_but_keeps_the_nodes_claimed() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("flush", 4, v1::ClusterConfig::default())
        .await;
    let proxy = sys.members(&cluster)[0];
    for i in 0..20 {
        let set = format!("SET f{i} v\r\n");
        assert_eq!(
            text(&raw_exchange(&proxy.plain, set.as_bytes()).unwrap()),
            "+OK\r\n"
        );
    }
    assert_eq!(
        text(&raw_exchange(&proxy.plain, b"FLUSHALL\r\n").unwrap()),
        "+OK\r\n"
    );
    assert_eq!(
        text(&raw_exchange(&proxy.plain, b"DBSIZE\r\n").unwrap()),
        ":0\r\n"
    );
    // Each master still holds its cluster's ownership marker (database 1):
    // without it, the next keys would make the node look foreign and the
    // proxy would stop serving it.
    for p in sys.members(&cluster) {
        let marker = redis_cli(p.redis[0].port, &["-n", "1", "GET", "redmesh:cluster-uid"]);
        assert_eq!(marker, cluster.uid, "{} lost its marker", p.redis[0].addr);
    }
    assert_eq!(
        text(&raw_exchange(&proxy.plain, b"SET again v\r\n").unwrap()),
        "+OK\r\n"
    );
    assert_eq!(
        text(&raw_exchange(&proxy.plain, b"GET again\r\n").unwrap()),
        "$1\r\nv\r\n"
    );
}

/// Scripts and transactions run inside Redis, past the proxy's command
/// checks: they must not reach redmesh's database 1 (the ownership marker),
/// flush every database, or reconfigure the node. Losing the marker would
/// make the proxy stop serving the shard; one client must not be able to
/// do that to every tenant of the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_and_transactions_cannot_touch_what_redmesh_keeps_in_redis() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("inside", 4, v1::ClusterConfig::default())
        .await;
    let proxy = sys.members(&cluster)[0];
    let attempts: [&[u8]; 5] = [
        b"EVAL \"redis.call('select', 1) return redis.call('flushdb')\" 0\r\n",
        b"EVAL \"return redis.call('flushall')\" 0\r\n",
        b"EVAL \"return redis.call('config', 'set', 'maxmemory', '1')\" 0\r\n",
        b"EVAL \"return redis.call('replicaof', 'no', 'one')\" 0\r\n",
        b"MULTI\r\nSELECT 1\r\nFLUSHDB\r\nEXEC\r\n",
    ];
    for request in attempts {
        let reply = text(&raw_exchange(&proxy.plain, request).unwrap());
        assert!(
            reply.contains("can't run this command")
                || reply.contains("not allowed from script")
                || reply.contains("not allowed through redmesh"),
            "{}: {reply}",
            text(request)
        );
    }
    // A function's body runs only when called, as the same user.
    let load = text(&raw_exchange(&proxy.plain, b"FUNCTION LOAD \"#!lua name=evil\\nredis.register_function('evil', function() redis.call('select', 1) return redis.call('flushdb') end)\"\r\n").unwrap());
    assert!(load.contains("evil"), "FUNCTION LOAD: {load}");
    let fcall = text(&raw_exchange(&proxy.plain, b"FCALL evil 0\r\n").unwrap());
    assert!(
        fcall.contains("can't run this command"),
        "FCALL evil: {fcall}"
    );
    // The marker lives on masters (a replica may still be syncing).
    for m in cluster.shards.iter().filter_map(|s| s.master.as_ref()) {
        let node = &sys.proxy(&m.proxy_id).redis[m.node_index as usize];
        let marker = redis_cli(node.port, &["-n", "1", "GET", "redmesh:cluster-uid"]);
        assert_eq!(marker, cluster.uid, "{} lost its marker", node.addr);
    }
    for p in sys.members(&cluster) {
        for node in &p.redis {
            let maxmemory = redis_cli(node.port, &["CONFIG", "GET", "maxmemory"]);
            assert!(maxmemory.ends_with("\n0"), "{}: {maxmemory}", node.addr);
        }
    }
    // Ordinary scripts, transactions and FLUSHDB still work.
    let ok = text(
        &raw_exchange(
            &proxy.plain,
            b"EVAL \"redis.call('set', KEYS[1], 'v') return redis.call('get', KEYS[1])\" 1 s1\r\n\
              MULTI\r\nSET s1 w\r\nEXEC\r\nFLUSHDB\r\nSET s2 v\r\n",
        )
        .unwrap(),
    );
    assert_eq!(
        ok, "$1\r\nv\r\n+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n+OK\r\n+OK\r\n",
        "{ok}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_password_is_enforced() {
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster(
            "secure",
            4,
            v1::ClusterConfig {
                password: "s3cret".into(),
                ..Default::default()
            },
        )
        .await;
    let addr = &sys.members(&cluster)[0].resp;
    assert_eq!(
        text(&raw_exchange(addr, b"GET k\r\n").unwrap()),
        "-NOAUTH Authentication required.\r\n"
    );
    assert_eq!(
        text(&raw_exchange(addr, b"AUTH wrong\r\n").unwrap()),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        text(&raw_exchange(addr, b"AUTH someone s3cret\r\n").unwrap()),
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(
        text(&raw_exchange(addr, b"AUTH default s3cret\r\nPING\r\n").unwrap()),
        "+OK\r\n+PONG\r\n"
    );
    let hello = text(&raw_exchange(addr, b"HELLO 2 AUTH default s3cret\r\n").unwrap());
    assert!(
        hello.starts_with("*14\r\n") && hello.contains("cluster"),
        "{hello}"
    );
    // A cluster client with the password works end to end.
    let seeds: Vec<String> = sys
        .members(&cluster)
        .iter()
        .map(|p| format!("redis://:s3cret@{}", p.resp))
        .collect();
    let client = redis::cluster::ClusterClient::new(seeds).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    for i in 0..200 {
        conn.set::<_, _, ()>(format!("k{i}"), i).await.unwrap();
        let v: i32 = conn.get(format!("k{i}")).await.unwrap();
        assert_eq!(v, i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_and_dead_backends_fail_fast_with_clear_errors() {
    let mut sys = System::start(2);
    // Before registration: a clear reason, not a hang.
    let reply = text(&raw_exchange(&sys.proxies[0].resp, b"GET k\r\n").unwrap());
    assert!(
        reply.starts_with("-CLUSTERDOWN") && reply.contains("not registered"),
        "{reply}"
    );
    sys.register_all().await;
    // (The registration reaches the proxy with its next topology push.)
    let resp = sys.proxies[0].resp.clone();
    eventually(
        "the proxy to learn it is registered",
        Duration::from_secs(10),
        || async {
            let reply = text(&raw_exchange(&resp, b"GET k\r\n").map_err(|e| e.to_string())?);
            if reply.starts_with("-CLUSTERDOWN") && reply.contains("not part of any cluster") {
                Ok(())
            } else {
                Err(reply)
            }
        },
    )
    .await;
    let cluster = sys
        .create_cluster("fragile", 4, v1::ClusterConfig::default())
        .await;
    let owner_resp = key_owner(&sys, &cluster, b"victim");
    let owner = sys
        .proxies
        .iter_mut()
        .find(|p| p.resp == owner_resp)
        .unwrap();
    owner.redis[0].kill();
    // The proxy notices the closed idle connection by itself; the request is
    // then refused as not sent (retriable), promptly, never hung.
    let started = Instant::now();
    loop {
        let reply = text(&raw_exchange(&owner_resp, b"GET victim\r\n").unwrap());
        if reply.starts_with("-CLUSTERDOWN") && reply.contains("unavailable") {
            break;
        }
        assert!(
            reply.starts_with("-ERR") && reply.contains("lost"),
            "{reply}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "last reply {reply}"
        );
    }
    let started = Instant::now();
    let reply = text(&raw_exchange(&owner_resp, b"SET victim 1\r\n").unwrap());
    assert!(reply.starts_with("-CLUSTERDOWN"), "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

/// Reads one reply's worth (until `\r\n` ends what arrived) with `wait`.
fn read_some(s: &mut TcpStream, wait: Duration) -> std::io::Result<Vec<u8>> {
    s.set_read_timeout(Some(wait))?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(out); // closed
        }
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"\r\n") {
            return Ok(out);
        }
    }
}

/// Connects and sends `request`, returning the stream and the first reply.
fn open(addr: &str, request: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request).unwrap();
    let reply = text(&read_some(&mut s, Duration::from_secs(5)).unwrap());
    (s, reply)
}

/// Reads until the server closes; the bytes and how long that took.
fn until_closed(s: &mut TcpStream) -> (String, Duration) {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the proxy closes the connection");
    (text(&out), start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_surplus_clients_are_cut_off_but_blocked_and_subscribed_ones_are_not() {
    let sys = System::start_env(
        2,
        &[
            ("REDMESH_PROXY_MAX_CLIENTS", "3"),
            ("REDMESH_PROXY_CLIENT_TIMEOUT", "1s"),
            ("REDMESH_PROXY_REQUEST_TIMEOUT", "1s"),
        ],
    );
    sys.register_all().await;
    let cluster = sys
        .create_cluster("guarded", 4, v1::ClusterConfig::default())
        .await;
    let addr = key_owner(&sys, &cluster, b"queue");
    tokio::task::spawn_blocking(move || {
        // Idle: closed silently after the client timeout.
        let (mut idle, reply) = open(&addr, b"PING\r\n");
        assert_eq!(reply, "+PONG\r\n");
        let (bytes, after) = until_closed(&mut idle);
        assert_eq!(bytes, "");
        assert!(
            after >= Duration::from_millis(900),
            "closed after {after:?}"
        );

        // Slowloris: a begun request must be finished within the limit, even
        // while bytes keep trickling in.
        let (mut slow, reply) = open(&addr, b"PING\r\n");
        assert_eq!(reply, "+PONG\r\n");
        let start = Instant::now();
        slow.write_all(b"*2\r\n$3\r\nGET\r\n$5\r\nab").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let _ = slow.write_all(b"c");
        let (bytes, _) = until_closed(&mut slow);
        let after = start.elapsed();
        assert!(
            bytes.starts_with("-ERR timed out reading a request"),
            "{bytes:?}"
        );
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(5),
            "closed after {after:?}"
        );

        // The client cap: subscribers fill it (they are never idle), the
        // next client is told why and closed, as Redis's maxclients does.
        let mut subscribers: Vec<TcpStream> = (0..3)
            .map(|_| {
                let (s, reply) = open(&addr, b"SUBSCRIBE news\r\n");
                assert!(reply.contains("subscribe"), "{reply}");
                s
            })
            .collect();
        // (Sending nothing: like Redis, the proxy closes without reading,
        // and unread input would turn its close into a reset.)
        let mut surplus = TcpStream::connect(&addr).unwrap();
        assert_eq!(
            until_closed(&mut surplus).0,
            "-ERR max number of clients reached\r\n"
        );
        // Past the idle limit the subscribers are still there…
        match read_some(&mut subscribers[0], Duration::from_millis(1500)) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            other => panic!("a subscriber was disturbed: {other:?}"),
        }
        // …and a freed slot takes a new client, which reaches them.
        drop(subscribers.pop());
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut publisher = loop {
            // (The proxy counts the closed subscriber out when it notices.)
            let (s, reply) = open(&addr, b"PUBLISH news hello\r\n");
            if reply.starts_with(':') {
                break s;
            }
            assert!(Instant::now() < deadline, "no slot freed up: {reply}");
            std::thread::sleep(Duration::from_millis(20));
        };
        for s in &mut subscribers {
            let msg = text(&read_some(s, Duration::from_secs(5)).unwrap());
            assert!(msg.contains("hello"), "{msg}");
        }
        drop(subscribers);
        // A client blocked longer than the idle limit gets its reply.
        let start = Instant::now();
        publisher.write_all(b"BLPOP queue 2\r\n").unwrap();
        let reply = text(&read_some(&mut publisher, Duration::from_secs(5)).unwrap());
        assert_eq!(reply, "*-1\r\n");
        assert!(start.elapsed() >= Duration::from_millis(1900));
    })
    .await
    .unwrap();
}
