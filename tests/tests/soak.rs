//! Load and soak: sustained mixed load on a cluster for a bounded time —
//! cluster clients running strings, counters, lists, hashes and expiries,
//! pipelines through the plain-client listener, blocking pops that time
//! out, pub/sub, and clients that connect, PING and leave by the hundred —
//! while each proxy's memory (RSS) and open file descriptors are sampled.
//!
//! Checks: no command fails; once the load stops, every proxy is back to
//! the descriptors it had after a warm-up (no leaked client, backend or
//! peer connection), and its memory did not grow beyond a bound from the
//! warm-up's. Latency percentiles of a GET probe through a proxy and
//! straight to the Redis node behind it (same key, same node, same time)
//! are printed; they are not asserted (this machine is shared and noisy).
//!
//! `REDMESH_SOAK_SECONDS` is the main phase's length (default 15: the
//! variant `./tests/run.sh` runs); `./tests/bench/run.sh soak` runs it
//! longer on release binaries.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use redis::AsyncCommands;
use redmesh_api::v1;
use redmesh_e2e::harness::{env_or, raw_exchange};
use redmesh_e2e::system::patient_cluster_client;
use redmesh_e2e::System;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Keys the load touches: a bounded data set, so any growth is the
/// proxy's own.
const KEYS: u64 = 5_000;

/// Memory a proxy may gain over the soak beyond its warm-up level: a
/// quarter more, and at least this many KiB (allocator slack).
const RSS_SLACK_KIB: u64 = 16 * 1024;

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    errors: AtomicU64,
    connects: AtomicU64,
    messages: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Counts {
    fn record<T>(&self, what: &str, r: redis::RedisResult<T>) {
        match r {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().unwrap();
                first.get_or_insert_with(|| format!("{what}: {e}"));
            }
        }
    }
}

/// A process's resident memory (KiB) and open descriptors, from /proc.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

/// Latency percentiles (µs) of `samples`, sorted in place.
fn percentiles(samples: &mut [u32]) -> [u32; 4] {
    samples.sort_unstable();
    let at = |q: f64| {
        if samples.is_empty() {
            return 0;
        }
        samples[((samples.len() - 1) as f64 * q).round() as usize]
    };
    [at(0.5), at(0.99), at(0.999), at(1.0)]
}

/// A cluster client of the proxies at `addrs`.
async fn cluster_conn(addrs: &[String]) -> redis::cluster_async::ClusterConnection {
    patient_cluster_client(addrs)
        .get_async_connection()
        .await
        .unwrap()
}

/// One phase of load: every kind of client at once until `stop`.
struct Load {
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Probe latencies (µs): through the proxy, and direct.
    probe: Arc<Mutex<(Vec<u32>, Vec<u32>)>>,
}

struct Targets {
    cluster: Vec<String>,
    plain: String,
    churn: Vec<String>,
    /// Proxy and its master node holding `probe_key`.
    probe_proxy: String,
    probe_node: String,
    probe_key: String,
}

impl Load {
    async fn start(t: &Targets) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let probe = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let mut tasks = Vec::new();
        let running = |stop: &Arc<AtomicBool>| !stop.load(Ordering::Relaxed);

        // Cluster clients: a mix of data types over a bounded key set.
        for w in 0..4u64 {
            let (stop, counts) = (stop.clone(), counts.clone());
            let mut c = cluster_conn(&t.cluster).await;
            tasks.push(tokio::spawn(async move {
                let mut n = w;
                while running(&stop) {
                    n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let k = (n >> 33) % KEYS;
                    let r = match n % 6 {
                        0 => c.set::<_, _, ()>(format!("s:{k}"), "v".repeat(100)).await,
                        1 => c.get::<_, Option<String>>(format!("s:{k}")).await.map(drop),
                        2 => c.incr::<_, _, i64>(format!("n:{k}"), 1).await.map(drop),
                        3 => {
                            let key = format!("l:{{{k}}}");
                            let pushed = c.lpush::<_, _, i64>(&key, n).await.map(drop);
                            counts.record("lpush", pushed);
                            c.ltrim::<_, ()>(&key, 0, 9).await
                        }
                        4 => c
                            .hset::<_, _, _, i64>(format!("h:{k}"), n % 16, n)
                            .await
                            .map(drop),
                        _ => c.expire::<_, i64>(format!("s:{k}"), 600).await.map(drop),
                    };
                    counts.record("mixed", r);
                }
            }));
        }
        // Pipelines of 16 SET+GET pairs through the plain-client listener (forwarded to
        // the owner of each key).
        {
            let (stop, counts) = (stop.clone(), counts.clone());
            let client = redis::Client::open(format!("redis://{}", t.plain)).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while running(&stop) {
                    let mut pipe = redis::pipe();
                    for i in 0..16 {
                        let k = (n * 16 + i) % KEYS;
                        pipe.set(format!("p:{k}"), k).ignore().get(format!("p:{k}"));
                    }
                    n += 1;
                    let r: redis::RedisResult<Vec<u64>> = pipe.query_async(&mut c).await;
                    counts.record("pipeline", r);
                }
            }));
        }
        // Blocking pops that time out (dedicated backend connections).
        {
            let (stop, counts) = (stop.clone(), counts.clone());
            let mut c = cluster_conn(&t.cluster).await;
            tasks.push(tokio::spawn(async move {
                while running(&stop) {
                    let r = c
                        .blpop::<_, Option<(String, String)>>("soak:empty", 0.05)
                        .await;
                    counts.record("blpop", r);
                }
            }));
        }
        // Pub/sub: one subscriber, messages published through the cluster.
        {
            let (stop, counts) = (stop.clone(), counts.clone());
            let client = redis::Client::open(format!("redis://{}", t.plain)).unwrap();
            let mut sub = client.get_async_pubsub().await.unwrap();
            sub.subscribe("soak:ch").await.unwrap();
            let mut publisher = cluster_conn(&t.cluster).await;
            let counts_sub = counts.clone();
            let stop_sub = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut messages = sub.on_message();
                while running(&stop_sub) {
                    if let Ok(Some(_)) =
                        tokio::time::timeout(Duration::from_millis(100), messages.next()).await
                    {
                        counts_sub.messages.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
            tasks.push(tokio::spawn(async move {
                while running(&stop) {
                    let r = publisher.publish::<_, _, i64>("soak:ch", "m").await;
                    counts.record("publish", r);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        // Clients that connect, PING and leave.
        for addr in t.churn.clone() {
            let (stop, counts) = (stop.clone(), counts.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 16];
                while running(&stop) {
                    let r = async {
                        let mut s = tokio::net::TcpStream::connect(&addr).await?;
                        s.write_all(b"PING\r\n").await?;
                        let n = s.read(&mut buf).await?;
                        Ok::<_, std::io::Error>(buf[..n].starts_with(b"+PONG"))
                    }
                    .await;
                    match r {
                        Ok(true) => counts.connects.fetch_add(1, Ordering::Relaxed),
                        other => {
                            counts.record::<()>(
                                "connect",
                                Err(redis::RedisError::from(std::io::Error::other(format!(
                                    "{other:?}"
                                )))),
                            );
                            0
                        }
                    };
                }
            }));
        }
        // The latency probe: the same GET through the proxy and straight to
        // the node behind it, alternately, about 500 times a second each.
        {
            let (stop, counts, probe) = (stop.clone(), counts.clone(), probe.clone());
            let via = redis::Client::open(format!("redis://{}", t.probe_proxy)).unwrap();
            let direct = redis::Client::open(format!("redis://{}", t.probe_node)).unwrap();
            let mut via = via.get_multiplexed_async_connection().await.unwrap();
            let mut direct = direct.get_multiplexed_async_connection().await.unwrap();
            let key = t.probe_key.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(2));
                while running(&stop) {
                    tick.tick().await;
                    for (i, conn) in [&mut via, &mut direct].into_iter().enumerate() {
                        let t0 = Instant::now();
                        let r = conn.get::<_, Option<String>>(&key).await;
                        let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                        counts.record("probe", r);
                        let mut p = probe.lock().unwrap();
                        if i == 0 { &mut p.0 } else { &mut p.1 }.push(us);
                    }
                }
            }));
        }
        Self {
            stop,
            counts,
            tasks,
            probe,
        }
    }

    async fn finish(self) -> (Arc<Counts>, Arc<Mutex<(Vec<u32>, Vec<u32>)>>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("a load task panicked");
        }
        (self.counts, self.probe)
    }
}

/// Each proxy's (RSS KiB, descriptors) once its connections have settled:
/// the smallest descriptor count seen within a few seconds (closed clients
/// leave as their sessions notice).
async fn settled(pids: &[u32]) -> Vec<(u64, usize)> {
    let mut best: Vec<(u64, usize)> = pids.iter().map(|&p| usage(p)).collect();
    let mut last_change = Instant::now();
    let started = Instant::now();
    while last_change.elapsed() < Duration::from_secs(1)
        && started.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (i, &p) in pids.iter().enumerate() {
            let now = usage(p);
            if now.1 < best[i].1 {
                best[i].1 = now.1;
                last_change = Instant::now();
            }
            best[i].0 = now.0;
        }
    }
    best
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_mixed_load_leaks_no_memory_or_connections() {
    let seconds: u64 = env_or("REDMESH_SOAK_SECONDS", 15);
    let warmup = Duration::from_secs((seconds / 5).clamp(3, 60));
    let sys = System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("soak", 4, v1::ClusterConfig::default())
        .await;
    sys.wait_cluster_ok(&cluster).await;
    let members = sys.members(&cluster);
    let pids: Vec<u32> = members
        .iter()
        .map(|p| p.child.as_ref().unwrap().pid().unwrap())
        .collect();

    // A key whose slot the first proxy serves from its own master node.
    let probe_proxy = members[0].resp.clone();
    let probe_key = (0..)
        .map(|i| format!("probe:{{{i}}}"))
        .find(|k| {
            let req = format!("*2\r\n$3\r\nGET\r\n${}\r\n{k}\r\n", k.len());
            !raw_exchange(&probe_proxy, req.as_bytes())
                .unwrap()
                .starts_with(b"-MOVED")
        })
        .unwrap();
    let shard = cluster
        .shards
        .iter()
        .find(|s| s.master.as_ref().unwrap().proxy_id == members[0].id)
        .unwrap();
    let node = shard.master.as_ref().unwrap().node_index as usize;
    let probe_node = members[0].redis[node].addr.clone();
    let targets = Targets {
        cluster: members.iter().map(|p| p.resp.clone()).collect(),
        plain: members[0].plain.clone(),
        churn: members.iter().map(|p| p.resp.clone()).collect(),
        probe_proxy,
        probe_node,
        probe_key: probe_key.clone(),
    };
    let mut seed = redis::Client::open(format!("redis://{}", targets.probe_node))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = seed.set(&probe_key, "x".repeat(64)).await.unwrap();

    // Warm-up: every pool, peer link and buffer the load needs, then quiet.
    let load = Load::start(&targets).await;
    tokio::time::sleep(warmup).await;
    let (warm_counts, _) = load.finish().await;
    let warm = settled(&pids).await;

    // The soak, sampled every few seconds.
    println!(
        "soak: {seconds} s of mixed load after a {} s warm-up; proxies {:?}",
        warmup.as_secs(),
        members.iter().map(|p| &p.id).collect::<Vec<_>>()
    );
    println!("  time    rss KiB (per proxy)    fds (per proxy)");
    let load = Load::start(&targets).await;
    let started = Instant::now();
    let every = Duration::from_secs((seconds / 10).clamp(1, 30));
    let mut peak = warm.iter().map(|u| u.0).collect::<Vec<_>>();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(
            every.min(Duration::from_secs(seconds).saturating_sub(started.elapsed())),
        )
        .await;
        let now: Vec<(u64, usize)> = pids.iter().map(|&p| usage(p)).collect();
        for (p, u) in peak.iter_mut().zip(&now) {
            *p = (*p).max(u.0);
        }
        println!(
            "  {:>4} s  {:<22} {:?}",
            started.elapsed().as_secs(),
            format!("{:?}", now.iter().map(|u| u.0).collect::<Vec<_>>()),
            now.iter().map(|u| u.1).collect::<Vec<_>>()
        );
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (counts, probe) = load.finish().await;
    let end = settled(&pids).await;

    let ok = counts.ok.load(Ordering::Relaxed);
    let connects = counts.connects.load(Ordering::Relaxed);
    let (mut via, mut direct) = std::mem::take(&mut *probe.lock().unwrap());
    let (pv, pd) = (percentiles(&mut via), percentiles(&mut direct));
    println!(
        "  commands ok: {ok} ({:.0}/s), connections opened and closed: {connects} ({:.0}/s), pub/sub messages: {}",
        ok as f64 / elapsed,
        connects as f64 / elapsed,
        counts.messages.load(Ordering::Relaxed)
    );
    println!("  GET probe, µs        p50     p99   p99.9     max   samples");
    for (name, p, n) in [("via proxy", pv, via.len()), ("direct", pd, direct.len())] {
        println!(
            "    {name:<16} {:>7} {:>7} {:>7} {:>7} {:>9}",
            p[0], p[1], p[2], p[3], n
        );
    }
    println!(
        "    ratio proxy/direct: p50 {:.2}, p99 {:.2}",
        f64::from(pv[0]) / f64::from(pd[0].max(1)),
        f64::from(pv[1]) / f64::from(pd[1].max(1))
    );
    for (i, id) in members.iter().map(|p| &p.id).enumerate() {
        println!(
            "  {id}: after warm-up {} KiB, {} fds; peak {} KiB; after the soak {} KiB, {} fds",
            warm[i].0, warm[i].1, peak[i], end[i].0, end[i].1
        );
    }

    for (what, c) in [("warm-up", &warm_counts), ("soak", &counts)] {
        assert_eq!(
            c.errors.load(Ordering::Relaxed),
            0,
            "{what}: commands failed; first: {:?}",
            c.first_error.lock().unwrap()
        );
    }
    assert!(ok > 0 && connects > 0, "the load ran");
    assert!(
        counts.messages.load(Ordering::Relaxed) > 0,
        "pub/sub messages arrived"
    );
    for (i, id) in members.iter().map(|p| &p.id).enumerate() {
        assert!(
            end[i].1 <= warm[i].1,
            "{id} holds {} descriptors after the soak, {} after the warm-up: connections leaked",
            end[i].1,
            warm[i].1
        );
        let bound = warm[i].0 + (warm[i].0 / 4).max(RSS_SLACK_KIB);
        assert!(
            end[i].0 <= bound,
            "{id} grew from {} KiB to {} KiB (bound {bound} KiB)",
            warm[i].0,
            end[i].0
        );
    }
}
