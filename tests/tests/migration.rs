//! Live migration end to end (DESIGN.md §6): real proxies, Redis nodes,
//! broker and migrator. A cluster scales 4 → 8 → 4 nodes while cluster
//! clients keep writing: every acknowledged write and every preloaded key
//! (strings, TTLs, hashes, lists) survives with its value; a task can be
//! paused, resumed, survives its migrator being killed, and a cancelled
//! task moves back what it moved.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::AsyncCommands;
use redmesh_api::v1::{self, migrator_client::MigratorClient, MigrationState};
use redmesh_e2e::harness::eventually;
use redmesh_e2e::system::{Service, System};

const STRINGS: usize = 20_000;
const WITH_TTL: usize = 500;
const HASHES: usize = 200;

async fn migrator(svc: &Service) -> MigratorClient<tonic::transport::Channel> {
    MigratorClient::connect(svc.url()).await.expect("migrator")
}

/// Writes the preloaded data straight into the masters (fast), as any
/// client of the cluster would have.
async fn preload(sys: &System, cluster: &v1::Cluster) {
    let mut by_node: HashMap<String, redis::Pipeline> = HashMap::new();
    let mut add = |key: String, cmd: redis::Cmd| {
        let (_, node) = sys.key_master(cluster, key.as_bytes());
        by_node
            .entry(node.addr.clone())
            .or_insert_with(redis::pipe)
            .add_command(cmd)
            .ignore();
    };
    for i in 0..STRINGS {
        add(
            format!("k:{i}"),
            redis::cmd("SET")
                .arg(format!("k:{i}"))
                .arg(format!("v{i}"))
                .clone(),
        );
    }
    for i in 0..WITH_TTL {
        add(
            format!("t:{i}"),
            redis::cmd("SET")
                .arg(format!("t:{i}"))
                .arg(i)
                .arg("PX")
                .arg(600_000)
                .clone(),
        );
    }
    for i in 0..HASHES {
        add(
            format!("h:{i}"),
            redis::cmd("HSET")
                .arg(format!("h:{i}"))
                .arg("a")
                .arg(i)
                .arg("b")
                .arg("x")
                .clone(),
        );
        add(
            format!("l:{i}"),
            redis::cmd("RPUSH")
                .arg(format!("l:{i}"))
                .arg(1)
                .arg(2)
                .arg(i)
                .clone(),
        );
    }
    for (addr, pipe) in by_node {
        let client = redis::Client::open(format!("redis://{addr}")).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let () = pipe.query_async(&mut c).await.unwrap();
    }
}

async fn cluster_conn(entry: &str) -> redis::cluster_async::ClusterConnection {
    redis::cluster::ClusterClient::builder(vec![format!("redis://{entry}")])
        .retries(30)
        .min_retry_wait(20)
        .max_retry_wait(500)
        .build()
        .unwrap()
        .get_async_connection()
        .await
        .expect("cluster connection")
}

/// Reads every preloaded key through the cluster and compares.
async fn verify(entry: &str) {
    let mut c = cluster_conn(entry).await;
    for i in 0..STRINGS {
        let v: Option<String> = c.get(format!("k:{i}")).await.unwrap();
        assert_eq!(v.as_deref(), Some(format!("v{i}").as_str()), "k:{i}");
    }
    for i in 0..WITH_TTL {
        let ttl: i64 = c.pttl(format!("t:{i}")).await.unwrap();
        assert!(ttl > 0 && ttl <= 600_000, "t:{i} lost its TTL: {ttl}");
    }
    for i in 0..HASHES {
        let h: HashMap<String, String> = c.hgetall(format!("h:{i}")).await.unwrap();
        assert_eq!(h.get("a").map(String::as_str), Some(i.to_string().as_str()));
        let l: Vec<String> = c.lrange(format!("l:{i}"), 0, -1).await.unwrap();
        assert_eq!(l, vec!["1".to_string(), "2".into(), i.to_string()]);
    }
}

/// Per key: the last acknowledged value and the last one attempted.
type Ledger = Arc<Mutex<HashMap<String, (u64, u64)>>>;

/// Writers overwriting 50 keys each with growing values until `stop`.
fn writers(
    entry: String,
    stop: Arc<AtomicBool>,
    ledger: Ledger,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..4)
        .map(|w| {
            let (entry, stop, ledger) = (entry.clone(), stop.clone(), ledger.clone());
            tokio::spawn(async move {
                let mut c = cluster_conn(&entry).await;
                let mut errors = 0u64;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("w{w}:{}", n % 50);
                    ledger.lock().unwrap().entry(key.clone()).or_default().1 = n;
                    match c.set::<_, _, ()>(&key, n).await {
                        Ok(()) => ledger.lock().unwrap().entry(key).or_default().0 = n,
                        Err(_) => errors += 1,
                    }
                }
                errors
            })
        })
        .collect()
}

/// A client that knows nothing of clusters, on a proxy's plain listener:
/// it reads preloaded keys and writes and reads back its own while slots
/// move, and returns (reads, wrong values, errors).
fn plain_client(
    addr: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, Vec<String>)> {
    tokio::spawn(async move {
        let client = redis::Client::open(format!("redis://{addr}")).unwrap();
        // The default 500 ms is a latency goal, not correctness: on this
        // small shared machine a debug build under full load can exceed it.
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(5)));
        let mut c = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap();
        let (mut reads, mut wrong, mut errors) = (0u64, 0u64, Vec::new());
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            i = (i + 7919) % STRINGS;
            match c.get::<_, Option<String>>(format!("k:{i}")).await {
                Ok(v) if v.as_deref() == Some(format!("v{i}").as_str()) => reads += 1,
                Ok(v) => {
                    wrong += 1;
                    errors.push(format!("k:{i} = {v:?}"));
                }
                Err(e) => errors.push(format!(
                    "GET k:{i} (slot {}) at {:?}: {e}",
                    redmesh_model::key_slot(format!("k:{i}").as_bytes()),
                    std::time::SystemTime::now()
                )),
            }
            let key = format!("p:{}", i % 300);
            let r: redis::RedisResult<()> = c.set(&key, i).await;
            match r.and(c.get::<_, Option<usize>>(&key).await) {
                Ok(Some(v)) if v == i => reads += 1,
                Ok(v) => {
                    wrong += 1;
                    errors.push(format!("{key} = {v:?}, wrote {i}"));
                }
                Err(e) => errors.push(format!(
                    "SET/GET {key} (slot {}) at {:?}: {e}",
                    redmesh_model::key_slot(key.as_bytes()),
                    std::time::SystemTime::now()
                )),
            }
        }
        (reads, wrong, errors)
    })
}

async fn check_ledger(entry: &str, ledger: &Ledger) {
    let mut c = cluster_conn(entry).await;
    let snapshot = ledger.lock().unwrap().clone();
    assert!(
        snapshot.len() >= 100,
        "writers wrote too little: {}",
        snapshot.len()
    );
    for (key, (acked, tried)) in snapshot {
        let v: Option<u64> = c.get(&key).await.unwrap();
        let v = v.unwrap_or(0);
        assert!(
            v >= acked && v <= tried,
            "{key}: value {v} but last acknowledged {acked}, last tried {tried}"
        );
    }
}

/// Waits for the task to end and returns it.
async fn finished(m: &Service, cluster: &str, task: &str) -> v1::MigrationProgress {
    eventually(
        &format!("migration {task} to end"),
        Duration::from_secs(180),
        || async {
            let p = migrator(m)
                .await
                .get_migration(v1::GetMigrationRequest {
                    cluster: cluster.into(),
                    task_id: task.into(),
                })
                .await
                .ok()?
                .into_inner()
                .progress?;
            let t = p.task.as_ref()?;
            let s = MigrationState::try_from(t.state).ok()?;
            matches!(
                s,
                MigrationState::Completed | MigrationState::Cancelled | MigrationState::Failed
            )
            .then_some(p)
        },
    )
    .await
}

async fn scale(sys: &System, cluster: &str, nodes: u32, rate: u64) -> (v1::ScalePlan, String) {
    let r = sys
        .broker()
        .await
        .scale_cluster(v1::ScaleClusterRequest {
            name: cluster.into(),
            node_count: nodes,
            dry_run: false,
            rate: Some(v1::MigrationRate {
                keys_per_second: rate,
                bytes_per_second: 0,
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("scale {cluster} to {nodes}: {e}"))
        .into_inner();
    assert!(!r.task_id.is_empty(), "no task started: {r:?}");
    (r.plan.expect("plan"), r.task_id)
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

fn slots_per_shard(c: &v1::Cluster) -> Vec<u32> {
    let mut per: std::collections::BTreeMap<u32, u32> = Default::default();
    for a in &c.slots {
        assert!(a.migration.is_none(), "slots still moving: {a:?}");
        let r = a.range.unwrap();
        *per.entry(a.shard_id).or_default() += r.end - r.start + 1;
    }
    per.into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_and_in_under_writes_loses_nothing() {
    let sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("mig", 4, v1::ClusterConfig::default())
        .await;
    let m = sys.start_migrator("mg-1", &[]);
    preload(&sys, &cluster).await;
    let entry = sys.members(&cluster)[0].resp.clone();

    // A dry run changes nothing and estimates what moves.
    let dry = sys
        .broker()
        .await
        .scale_cluster(v1::ScaleClusterRequest {
            name: "mig".into(),
            node_count: 8,
            dry_run: true,
            rate: None,
        })
        .await
        .expect("dry run")
        .into_inner();
    assert!(dry.task_id.is_empty());
    let plan = dry.plan.expect("plan");
    assert_eq!(plan.moves.len(), 2, "{plan:?}");
    let estimated: u64 = plan.moves.iter().map(|m| m.estimated_keys).sum();
    let total = (STRINGS + WITH_TTL + 2 * HASHES) as u64;
    assert!(
        estimated > total / 4 && estimated < total * 3 / 4,
        "estimate {estimated} of {total} keys"
    );
    assert_eq!(get_cluster(&sys, "mig").await.0.chunks.len(), 1);

    let stop = Arc::new(AtomicBool::new(false));
    let ledger: Ledger = Arc::default();
    let jobs = writers(entry.clone(), stop.clone(), ledger.clone());
    let plain = plain_client(sys.members(&cluster)[1].plain.clone(), stop.clone());

    let (_, task) = scale(&sys, "mig", 8, 0).await;
    let done = finished(&m, "mig", &task).await;
    let t = done.task.clone().unwrap();
    assert_eq!(t.state, MigrationState::Completed as i32, "{t:?}");
    assert!(
        done.keys_moved >= total / 3,
        "moved {} of {total} keys",
        done.keys_moved
    );
    let (grown, _) = get_cluster(&sys, "mig").await;
    assert_eq!(grown.chunks.len(), 2);
    assert_eq!(slots_per_shard(&grown), vec![4096; 4]);
    assert_eq!(
        grown.task.as_ref().map(|t| t.kind),
        Some(v1::ClusterTaskKind::None as i32)
    );
    verify(&entry).await;

    // Scale in with the CLI, which follows the task to its end.
    let out = tokio::process::Command::new(redmesh_e2e::bin_path("redmeshctl"))
        .args(["cluster", "scale", "mig", "4"])
        .args(["--broker", &sys.broker.url(), "--migrator", &m.url()])
        .output()
        .await
        .expect("run redmeshctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("completed") && stdout.contains("remove chunk"),
        "redmeshctl cluster scale: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (shrunk, _) = get_cluster(&sys, "mig").await;
    assert_eq!(shrunk.chunks, cluster.chunks);
    assert_eq!(slots_per_shard(&shrunk), vec![8192; 2]);
    stop.store(true, Ordering::Relaxed);
    let mut write_errors = 0;
    for j in jobs {
        write_errors += j.await.unwrap();
    }
    let (reads, wrong, errors) = plain.await.unwrap();
    assert_eq!(wrong, 0, "plain client saw wrong values: {errors:?}");
    if !errors.is_empty() {
        for p in &sys.proxies {
            eprintln!("==== {}\n{}", p.id, p.log());
        }
    }
    assert!(errors.is_empty(), "plain client saw errors: {errors:?}");
    assert!(reads > 100, "plain client read only {reads} times");
    eprintln!("cluster writers: {write_errors} errors; plain client: {reads} reads");
    verify(&entry).await;
    check_ledger(&entry, &ledger).await;
    // The emptied proxies are back in the pool.
    let proxies = sys
        .broker()
        .await
        .list_proxies(v1::ListProxiesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .proxies;
    let free = proxies
        .iter()
        .filter(|p| p.state == v1::ProxyState::Free as i32)
        .count();
    assert_eq!(free, 2, "{proxies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_resumed_restarted_and_cancelled_tasks_keep_every_key() {
    let sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("ctl", 4, v1::ClusterConfig::default())
        .await;
    let mut m = sys.start_migrator("mg-1", &[]);
    preload(&sys, &cluster).await;
    let entry = sys.members(&cluster)[0].resp.clone();

    // Slow enough to act on mid-way: ~11,000 keys move at 3,000 keys/s.
    let (_, task) = scale(&sys, "ctl", 8, 3000).await;
    let get = |m: &Service| {
        let url = m.url();
        let task = task.clone();
        async move {
            MigratorClient::connect(url)
                .await
                .ok()?
                .get_migration(v1::GetMigrationRequest {
                    cluster: "ctl".into(),
                    task_id: task,
                })
                .await
                .ok()?
                .into_inner()
                .progress
        }
    };
    eventually("keys moving", Duration::from_secs(30), || async {
        get(&m).await.filter(|p| p.keys_moved > 500)
    })
    .await;
    migrator(&m)
        .await
        .pause_migration(v1::PauseMigrationRequest {
            cluster: "ctl".into(),
            task_id: task.clone(),
        })
        .await
        .expect("pause");
    // Paused: the runner saves its state and stops moving.
    let paused = eventually("the runner to stop", Duration::from_secs(10), || async {
        get(&m)
            .await
            .filter(|p| p.task.as_ref().is_some_and(|t| t.keys_per_second == 0.0))
    })
    .await;
    assert_eq!(
        paused.task.as_ref().unwrap().state,
        MigrationState::Paused as i32
    );
    let moved = paused.keys_moved;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        get(&m).await.unwrap().keys_moved,
        moved,
        "moved while paused"
    );
    // Data is consistent mid-migration (reads follow ASK redirects).
    verify(&entry).await;

    migrator(&m)
        .await
        .resume_migration(v1::ResumeMigrationRequest {
            cluster: "ctl".into(),
            task_id: task.clone(),
        })
        .await
        .expect("resume");
    eventually("progress after resume", Duration::from_secs(30), || async {
        get(&m).await.filter(|p| p.keys_moved > moved + 500)
    })
    .await;
    // Kill the migrator mid-task; the next one resumes from etcd.
    m.kill();
    let m2 = sys.start_migrator("mg-2", &[]);
    let done = finished(&m2, "ctl", &task).await;
    assert_eq!(
        done.task.as_ref().unwrap().state,
        MigrationState::Completed as i32,
        "{done:?}"
    );
    verify(&entry).await;

    // Cancel a scale-in mid-way: what moved comes back.
    let before = get_cluster(&sys, "ctl").await.0;
    let (_, back) = scale(&sys, "ctl", 4, 3000).await;
    eventually("keys moving back", Duration::from_secs(30), || async {
        MigratorClient::connect(m2.url())
            .await
            .ok()?
            .get_migration(v1::GetMigrationRequest {
                cluster: "ctl".into(),
                task_id: back.clone(),
            })
            .await
            .ok()?
            .into_inner()
            .progress
            .filter(|p| p.keys_moved > 500)
    })
    .await;
    migrator(&m2)
        .await
        .cancel_migration(v1::CancelMigrationRequest {
            cluster: "ctl".into(),
            task_id: back.clone(),
        })
        .await
        .expect("cancel");
    let done = finished(&m2, "ctl", &back).await;
    let t = done.task.as_ref().unwrap();
    assert_eq!(t.state, MigrationState::Cancelled as i32, "{t:?}");
    assert!(t.ranges.iter().any(|r| r.reverse), "{t:?}");
    let after = get_cluster(&sys, "ctl").await.0;
    assert_eq!(after.chunks, before.chunks);
    assert_eq!(after.slots, before.slots);
    verify(&entry).await;
    drop(m);
}
