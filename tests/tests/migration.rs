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
use redmesh_e2e::harness::{eventually, redis_cli};
use redmesh_e2e::system::{patient_cluster_client, Service, System};

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

/// Pauses the task and waits until its runner has stopped.
async fn pause(m: &Service, cluster: &str, task: &str) -> v1::MigrationProgress {
    migrator(m)
        .await
        .pause_migration(v1::PauseMigrationRequest {
            cluster: cluster.into(),
            task_id: task.into(),
        })
        .await
        .expect("pause");
    eventually("the runner to stop", Duration::from_secs(30), || async {
        progress(m, cluster, task).await.filter(|p| {
            p.task.as_ref().is_some_and(|t| {
                t.state == MigrationState::Paused as i32 && t.keys_per_second == 0.0
            })
        })
    })
    .await
}

/// Resumes a paused task.
async fn resume(m: &Service, cluster: &str, task: &str) {
    migrator(m)
        .await
        .resume_migration(v1::ResumeMigrationRequest {
            cluster: cluster.into(),
            task_id: task.into(),
        })
        .await
        .expect("resume");
}

/// The task's progress, as the migrator `m` reports it.
async fn progress(m: &Service, cluster: &str, task: &str) -> Option<v1::MigrationProgress> {
    MigratorClient::connect(m.url())
        .await
        .ok()?
        .get_migration(v1::GetMigrationRequest {
            cluster: cluster.into(),
            task_id: task.into(),
        })
        .await
        .ok()?
        .into_inner()
        .progress
}

/// Waits for the task to end and returns it.
async fn finished(m: &Service, cluster: &str, task: &str) -> v1::MigrationProgress {
    eventually(
        &format!("migration {task} to end"),
        Duration::from_secs(180),
        || async {
            let p = progress(m, cluster, task).await?;
            let s = MigrationState::try_from(p.task.as_ref()?.state).ok()?;
            matches!(
                s,
                MigrationState::Completed | MigrationState::Cancelled | MigrationState::Failed
            )
            .then_some(p)
        },
    )
    .await
}

/// The plan of scaling `cluster` to `nodes`, changing nothing.
async fn dry_run(sys: &System, cluster: &str, nodes: u32) -> v1::ScalePlan {
    let r = sys
        .broker()
        .await
        .scale_cluster(v1::ScaleClusterRequest {
            name: cluster.into(),
            node_count: nodes,
            dry_run: true,
            rate: None,
        })
        .await
        .expect("dry run")
        .into_inner();
    assert!(r.task_id.is_empty(), "a dry run started a task: {r:?}");
    r.plan.expect("plan")
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

/// A preloaded 4-node cluster `name` scaling to 8 at 3,000 keys/s (slow
/// enough to act on mid-way: ~11,000 keys move), once more than `moved`
/// keys have moved: the system, its migrator, the task and a RESP entry.
async fn scaling_under_way(name: &str, moved: u64) -> (System, Service, String, String) {
    let sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster(name, 4, v1::ClusterConfig::default())
        .await;
    let m = sys.start_migrator("mg-1", &[]);
    preload(&sys, &cluster).await;
    let entry = sys.members(&cluster)[0].resp.clone();
    let (_, task) = scale(&sys, name, 8, 3000).await;
    eventually("keys moving", Duration::from_secs(30), || async {
        progress(&m, name, &task)
            .await
            .filter(|p| p.keys_moved > moved)
    })
    .await;
    (sys, m, task, entry)
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
    let plan = dry_run(&sys, "mig", 8).await;
    assert_eq!(plan.moves.len(), 2, "{plan:?}");
    let estimated: u64 = plan.moves.iter().map(|m| m.estimated_keys).sum();
    let total = (STRINGS + WITH_TTL + 2 * HASHES) as u64;
    assert!(
        estimated > total / 4 && estimated < total * 3 / 4,
        "estimate {estimated} of {total} keys"
    );
    assert_eq!(sys.get_cluster("mig").await.0.chunks.len(), 1);

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
    let (grown, _) = sys.get_cluster("mig").await;
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
    let (shrunk, _) = sys.get_cluster("mig").await;
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

/// A preloaded 4-node `replica_ack` cluster `name` with the control plane
/// and a migrator running: proxies 0-1 serve it, 2-3 are the chunk it
/// grows onto, 4-5 one free proxy per host to replace a dead one. The
/// control plane stops when the returned handles are dropped.
async fn preloaded_with_spares(
    name: &str,
) -> (System, v1::Cluster, ([Service; 3], Service), Service) {
    let sys = System::start(6);
    sys.register_all().await;
    let cluster = sys
        .create_cluster(
            name,
            4,
            v1::ClusterConfig {
                durability: v1::Durability::ReplicaAck as i32,
                replica_ack_timeout_ms: 500,
                ..Default::default()
            },
        )
        .await;
    let control = sys.start_control_plane().await;
    let m = sys.start_migrator("mg-1", &[]);
    preload(&sys, &cluster).await;
    (sys, cluster, control, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_proxy_killed_mid_task_fails_over_and_the_task_finishes() {
    let (mut sys, cluster, _control, m) = preloaded_with_spares("src").await;

    // ~11,000 keys move at 2,000 keys/s: the kill comes mid-way.
    let (plan, task) = scale(&sys, "src", 8, 2000).await;
    let victim = plan.moves[0].from_proxy_id.clone();
    let entry = sys
        .members(&cluster)
        .iter()
        .find(|p| p.id != victim)
        .unwrap()
        .resp
        .clone();
    let stop = Arc::new(AtomicBool::new(false));
    let ledger: Ledger = Arc::default();
    let jobs = writers(entry.clone(), stop.clone(), ledger.clone());
    eventually("keys moving", Duration::from_secs(30), || async {
        progress(&m, "src", &task)
            .await
            .filter(|p| p.keys_moved > 1000)
    })
    .await;

    // kill -9 the source proxy of the first range with both its Redis
    // nodes (its host dies): its replica on the partner is promoted, a free
    // proxy replaces it, and the range's pass starts over on the new master.
    sys.proxy_mut(&victim).kill_host();
    // Paused while the coordinator fails over: the failover leaves the
    // cluster marked as migrated by the task, so a second scale and a
    // delete are refused meanwhile.
    pause(&m, "src", &task).await;
    let (healed, _) = sys.wait_replaced("src", &victim).await;
    let mark = healed.task.clone().unwrap_or_default();
    assert_eq!(
        (mark.kind, mark.id.as_str()),
        (v1::ClusterTaskKind::Migrating as i32, task.as_str()),
        "{healed:?}"
    );
    let mut b = sys.broker().await;
    let again = b
        .scale_cluster(v1::ScaleClusterRequest {
            name: "src".into(),
            node_count: 12,
            dry_run: false,
            rate: None,
        })
        .await
        .expect_err("a second scale during the task");
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    let delete = b
        .delete_cluster(v1::DeleteClusterRequest { name: "src".into() })
        .await
        .expect_err("a delete during the task");
    assert_eq!(delete.code(), tonic::Code::FailedPrecondition, "{delete:?}");
    assert!(delete.message().contains(&task), "{delete:?}");
    resume(&m, "src", &task).await;
    let done = finished(&m, "src", &task).await;
    let t = done.task.clone().unwrap();
    assert_eq!(t.state, MigrationState::Completed as i32, "{t:?}");
    let first = &t.ranges[0];
    assert!(
        !first.cursor_proxy_id.is_empty() && first.cursor_proxy_id != victim,
        "range 0 did not continue on the promoted replica: {first:?}"
    );
    let (grown, _) = sys.get_cluster("src").await;
    assert!(
        grown.chunks.iter().all(|c| !c.proxy_ids.contains(&victim)),
        "{grown:?}"
    );
    assert_eq!(slots_per_shard(&grown), vec![4096; 4]);
    sys.wait_cluster_ok(&grown).await;
    stop.store(true, Ordering::Relaxed);
    for j in jobs {
        j.await.unwrap();
    }
    verify(&entry).await;
    check_ledger(&entry, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_moves_into_a_shard_whose_replica_never_confirms_even_under_async() {
    // Proxies 0-1 serve the cluster, 2-3 are the chunk it grows onto.
    let sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("unsynced", 4, v1::ClusterConfig::default())
        .await;
    assert_eq!(
        cluster.config.as_ref().unwrap().durability,
        v1::Durability::Async as i32
    );
    let m = sys.start_migrator("mg-1", &[]);
    preload(&sys, &cluster).await;

    // The new chunk's replicas never sync: their masters get the
    // replication user with the cluster's password (read from a replica
    // of the cluster) but without PSYNC, which their proxies, seeing the
    // password right, leave alone. So no `WAIT` there is ever answered:
    // under `async` too, no key may leave its source for a copy nobody
    // confirmed. (Such a master may be a node failed over and detached
    // while the source's view still names it.)
    let grown = dry_run(&sys, "unsynced", 8).await.added_chunks;
    assert_eq!(grown.len(), 1, "{grown:?}");
    for id in &grown[0].proxy_ids {
        refuse_sync(&sys, &cluster, sys.proxy(id).redis[0].port);
    }
    let (plan, task) = scale(&sys, "unsynced", 8, 3000).await;
    assert_eq!(plan.added_chunks, grown);
    eventually("batches refused", Duration::from_secs(30), || async {
        progress(&m, "unsynced", &task).await.filter(|p| {
            p.task
                .as_ref()
                .is_some_and(|t| t.error.contains("did not confirm"))
        })
    })
    .await;
    assert_eq!(progress(&m, "unsynced", &task).await.unwrap().keys_moved, 0);
    // Every key still reads back, from where it always was.
    verify(&sys.members(&cluster)[0].resp).await;

    // Cancelled, the task ends although those moves never could: they are
    // turned around (nothing moved, so nothing goes back) instead of being
    // waited for, and the chunk returns to the pool.
    migrator(&m)
        .await
        .cancel_migration(v1::CancelMigrationRequest {
            cluster: "unsynced".into(),
            task_id: task.clone(),
        })
        .await
        .expect("cancel");
    let done = finished(&m, "unsynced", &task).await;
    let t = done.task.as_ref().unwrap();
    assert_eq!(t.state, MigrationState::Cancelled as i32, "{t:?}");
    let after = sys.get_cluster("unsynced").await.0;
    assert_eq!(after.chunks, cluster.chunks);
    assert_eq!(after.slots, cluster.slots);
    verify(&sys.members(&cluster)[0].resp).await;
}

/// The cluster's replication password, as its replicas give it.
fn repl_password(sys: &System, cluster: &v1::Cluster) -> String {
    let replica = &sys.members(cluster)[0].redis[1];
    let auth = redis_cli(replica.port, &["CONFIG", "GET", "masterauth"]);
    auth.lines().nth(1).unwrap().to_owned()
}

/// Gives the replication user on `node` the cluster's password but not
/// `PSYNC`: the node's proxy, seeing the password right, leaves it so, and
/// replicas of the node never sync.
fn refuse_sync(sys: &System, cluster: &v1::Cluster, node: u16) {
    let pass = format!(">{}", repl_password(sys, cluster));
    let out = redis_cli(
        node,
        &[
            "ACL",
            "SETUSER",
            "redmesh-repl",
            "reset",
            "on",
            &pass,
            "+ping",
            "+replconf",
        ],
    );
    assert!(out.starts_with("OK"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_shard_whose_master_dies_before_its_replica_synced_starts_over_empty() {
    let (mut sys, cluster, _control, m) = preloaded_with_spares("orphan").await;

    // The victim masters one of the new shards; that shard's replica, on
    // its partner, never syncs.
    let grown = dry_run(&sys, "orphan", 8).await.added_chunks;
    assert_eq!(grown.len(), 1, "{grown:?}");
    let victim = grown[0].proxy_ids[0].clone();
    refuse_sync(&sys, &cluster, sys.proxy(&victim).redis[0].port);
    let (plan, task) = scale(&sys, "orphan", 8, 2000).await;
    assert_eq!(plan.added_chunks, grown);
    assert!(
        plan.moves.iter().any(|mv| mv.to_proxy_id == victim),
        "{plan:?}"
    );
    let entry = sys.members(&cluster)[0].resp.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let ledger: Ledger = Arc::default();
    let jobs = writers(entry.clone(), stop.clone(), ledger.clone());
    eventually("batches refused", Duration::from_secs(30), || async {
        progress(&m, "orphan", &task).await.filter(|p| {
            p.task
                .as_ref()
                .is_some_and(|t| t.error.contains("did not confirm"))
        })
    })
    .await;

    // Its host dies. The shard owns no slots yet and every key copied into
    // it is still at its source, so the partner promotes the empty replica
    // rather than stop the task for good; a free proxy replaces the victim.
    sys.proxy_mut(&victim).kill_host();
    let done = finished(&m, "orphan", &task).await;
    let t = done.task.clone().unwrap();
    assert_eq!(t.state, MigrationState::Completed as i32, "{t:?}");
    let (grown, _) = sys.wait_replaced("orphan", &victim).await;
    assert_eq!(slots_per_shard(&grown), vec![4096; 4]);
    sys.wait_cluster_ok(&grown).await;
    stop.store(true, Ordering::Relaxed);
    for j in jobs {
        j.await.unwrap();
    }
    verify(&entry).await;
    check_ledger(&entry, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_back_in_a_cluster_before_it_heard_it_left_serves_none_of_its_old_data() {
    // Proxies 0-1 serve the cluster, 2-3 are the chunk it grows onto.
    let mut sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("again", 4, v1::ClusterConfig::default())
        .await;
    let m = sys.start_migrator("mg-1", &[]);
    let plan = dry_run(&sys, "again", 8).await;
    let mv = plan.moves[0].clone();
    let victim = mv.to_proxy_id.clone();
    let source = cluster
        .shards
        .iter()
        .find(|s| s.id == mv.from_shard_id)
        .and_then(|s| s.master.clone())
        .unwrap();
    let source_port = sys.proxy(&source.proxy_id).redis[source.node_index as usize].port;
    let stale_port = sys.proxy(&victim).redis[0].port;
    let range = mv.range.unwrap();
    let keys: Vec<String> = (0..)
        .map(|n| format!("gone:{n}"))
        .filter(|k| {
            let slot = u32::from(redmesh_model::key_slot(k.as_bytes()));
            range.start <= slot && slot <= range.end
        })
        .take(20)
        .collect();
    let entry = sys.members(&cluster)[0].resp.clone();
    let mut c = cluster_conn(&entry).await;
    for k in &keys {
        let () = c.set(k, "old").await.unwrap();
    }

    // What a proxy leaves when it never hears that its chunk left the
    // cluster (it was paused, or cut off, until the chunk was allocated
    // again): its node 0 still holds the source shard's data, here as a
    // replica whose master is gone. The victim's process is down meanwhile,
    // so nothing wipes the node while it is free.
    sys.proxy_mut(&victim).child.as_mut().unwrap().kill();
    let password = repl_password(&sys, &cluster);
    let out = redis_cli(
        stale_port,
        &[
            "CONFIG",
            "SET",
            "masteruser",
            "redmesh-repl",
            "masterauth",
            &password,
        ],
    );
    assert!(out.starts_with("OK"), "{out}");
    redis_cli(
        stale_port,
        &["REPLICAOF", "127.0.0.1", &source_port.to_string()],
    );
    eventually("the old copy synced", Duration::from_secs(20), || async {
        (redis_cli(stale_port, &["GET", &keys[0]]).trim() == "old").then_some(())
    })
    .await;
    let dead = redmesh_e2e::ports::free_port().to_string();
    redis_cli(stale_port, &["REPLICAOF", "127.0.0.1", &dead]);
    // Deleted since: the old copy must not bring them back.
    for k in &keys {
        let () = c.del(k).await.unwrap();
    }
    assert_eq!(redis_cli(stale_port, &["GET", &keys[0]]).trim(), "old");

    // Allocated again while down; it first hears of the cluster as a member.
    let (grown, task) = scale(&sys, "again", 8, 0).await;
    assert_eq!(grown.moves[0].to_proxy_id, victim, "{grown:?}");
    let broker = sys.broker.url();
    sys.proxy_mut(&victim).start(&broker);
    let done = finished(&m, "again", &task).await;
    let t = done.task.clone().unwrap();
    assert_eq!(t.state, MigrationState::Completed as i32, "{t:?}");
    for k in &keys {
        let v: Option<String> = c.get(k).await.unwrap();
        assert_eq!(v, None, "{k} came back from the old copy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_resumed_restarted_and_cancelled_tasks_keep_every_key() {
    let (sys, mut m, task, entry) = scaling_under_way("ctl", 500).await;
    // Paused: the runner saves its state and stops moving.
    let paused = pause(&m, "ctl", &task).await;
    let moved = paused.keys_moved;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        progress(&m, "ctl", &task).await.unwrap().keys_moved,
        moved,
        "moved while paused"
    );
    // Data is consistent mid-migration (reads follow ASK redirects).
    verify(&entry).await;

    resume(&m, "ctl", &task).await;
    eventually("progress after resume", Duration::from_secs(30), || async {
        progress(&m, "ctl", &task)
            .await
            .filter(|p| p.keys_moved > moved + 500)
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
    let before = sys.get_cluster("ctl").await.0;
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
    let after = sys.get_cluster("ctl").await.0;
    assert_eq!(after.chunks, before.chunks);
    assert_eq!(after.slots, before.slots);
    verify(&entry).await;
    drop(m);
}

/// A key name (prefix plus a number) whose slot one of `plan`'s moves takes.
fn moving_key(plan: &v1::ScalePlan, prefix: &str) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|k| {
            let slot = u32::from(redmesh_model::key_slot(k.as_bytes()));
            plan.moves.iter().any(|m| {
                let r = m.range.unwrap();
                r.start <= slot && slot <= r.end
            })
        })
        .unwrap()
}

/// Entries of the slow log of the Redis node at `addr` (commands slower
/// than the threshold set by the test).
async fn slow_commands(addr: &str) -> Vec<String> {
    let mut c = redis::Client::open(format!("redis://{addr}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let log: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(100)
        .query_async(&mut c)
        .await
        .unwrap();
    log.iter()
        .map(|entry| {
            // [id, time, microseconds, [command and arguments], ...]
            let redis::Value::Array(f) = entry else {
                return format!("{entry:?}");
            };
            let cmd = match f.get(3) {
                Some(redis::Value::Array(args)) => args
                    .iter()
                    .take(2)
                    .map(|a| match a {
                        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                        other => format!("{other:?}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => String::new(),
            };
            format!("{cmd} ({:?} us)", f.get(2))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_collections_move_in_pieces_without_stalling_other_keys() {
    const FIELDS: usize = 1_000_000;
    let sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("big", 4, v1::ClusterConfig::default())
        .await;
    let m = sys.start_migrator("mg-1", &[]);
    let entry = sys.members(&cluster)[0].resp.clone();
    let plan = dry_run(&sys, "big", 8).await;

    // One big key of each type the copy in pieces handles, one stream (it
    // falls back to DUMP/RESTORE), all in slots that move; written at their
    // masters directly (fast).
    let hash = moving_key(&plan, "hash:");
    let set = moving_key(&plan, "set:");
    let zset = moving_key(&plan, "zset:");
    let list = moving_key(&plan, "list:");
    let string = moving_key(&plan, "string:");
    let stream = moving_key(&plan, "stream:");
    let big_string: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    for key in [&hash, &set, &zset, &list, &string, &stream] {
        let addr = sys.key_master(&cluster, key.as_bytes()).1.addr.clone();
        let slow =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
        let mut c = redis::Client::open(format!("redis://{addr}"))
            .unwrap()
            .get_multiplexed_async_connection_with_config(&slow)
            .await
            .unwrap();
        let mut pipe = redis::pipe();
        if key == &hash {
            for chunk in (0..FIELDS).collect::<Vec<_>>().chunks(1000) {
                let mut cmd = redis::cmd("HSET");
                cmd.arg(key);
                for i in chunk {
                    cmd.arg(format!("f{i}")).arg(format!("v{i}"));
                }
                pipe.add_command(cmd).ignore();
            }
        } else if key == &set || key == &zset || key == &list {
            // (300,000 list entries: a quicklist of 100,000 short ones
            // would still be under the 1 MiB threshold.)
            let n = if key == &list { 300_000 } else { 100_000 };
            for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
                let mut cmd = redis::cmd(match key {
                    k if k == &set => "SADD",
                    k if k == &zset => "ZADD",
                    _ => "RPUSH",
                });
                cmd.arg(key);
                for i in chunk {
                    if key == &zset {
                        cmd.arg(*i as f64 / 4.0);
                    }
                    cmd.arg(format!("m{i}"));
                }
                pipe.add_command(cmd).ignore();
            }
        } else if key == &string {
            pipe.cmd("SET")
                .arg(key)
                .arg(&big_string)
                .arg("PX")
                .arg(600_000)
                .ignore();
        } else {
            for i in 0..20_000 {
                pipe.cmd("XADD")
                    .arg(key)
                    .arg("*")
                    .arg("n")
                    .arg(i)
                    .arg("pad")
                    .arg("x".repeat(64))
                    .ignore();
            }
            pipe.cmd("XGROUP")
                .arg("CREATE")
                .arg(key)
                .arg("g")
                .arg("0")
                .ignore();
        }
        let () = pipe.query_async(&mut c).await.unwrap();
    }
    // From here on, any command that holds a node for 250 ms or more is in
    // its slow log: a single DUMP of the hash takes ~600 ms in this test,
    // its RESTORE longer; a piece takes a few.
    let all_nodes: Vec<String> = sys
        .proxies
        .iter()
        .flat_map(|p| p.redis.iter().map(|r| r.addr.clone()))
        .collect();
    for addr in &all_nodes {
        let mut c = redis::Client::open(format!("redis://{addr}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let () = redis::pipe()
            .cmd("CONFIG")
            .arg("SET")
            .arg("slowlog-log-slower-than")
            .arg(250_000)
            .ignore()
            .cmd("SLOWLOG")
            .arg("RESET")
            .ignore()
            .query_async(&mut c)
            .await
            .unwrap();
    }

    // A client of other keys in the moving slots measures its slowest
    // command; another writes to the hash while it moves.
    let stop = Arc::new(AtomicBool::new(false));
    let small: Vec<String> = (0..50)
        .map(|i| moving_key(&plan, &format!("s{i}:")))
        .collect();
    let prober = {
        let (entry, stop, small) = (entry.clone(), stop.clone(), small.clone());
        tokio::spawn(async move {
            let mut c = cluster_conn(&entry).await;
            let mut slowest = Duration::ZERO;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for k in &small {
                    let t = std::time::Instant::now();
                    let () = c.set(k, n).await.unwrap();
                    let v: u64 = c.get(k).await.unwrap();
                    assert_eq!(v, n, "{k}");
                    slowest = slowest.max(t.elapsed() / 2);
                }
                n += 1;
            }
            (slowest, n)
        })
    };
    let writer = {
        let (entry, stop, hash) = (entry.clone(), stop.clone(), hash.clone());
        tokio::spawn(async move {
            let mut c = redis::cluster::ClusterClient::builder(vec![format!("redis://{entry}")])
                .retries(30)
                .response_timeout(Duration::from_secs(60))
                .build()
                .unwrap()
                .get_async_connection()
                .await
                .unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let () = c.hset(&hash, format!("new{n}"), n).await.unwrap();
                n += 1;
            }
            n
        })
    };

    let (_, task) = scale(&sys, "big", 8, 0).await;
    let done = finished(&m, "big", &task).await;
    stop.store(true, Ordering::Relaxed);
    let (slowest, rounds) = prober.await.unwrap();
    let written = writer.await.unwrap();
    let t = done.task.clone().unwrap();
    assert_eq!(t.state, MigrationState::Completed as i32, "{t:?}");
    assert!(rounds > 0 && written > 0);
    for addr in &all_nodes {
        let slow = slow_commands(addr).await;
        assert!(slow.is_empty(), "node {addr} was blocked: {slow:?}");
    }
    eprintln!("slowest command on another key while the big keys moved: {slowest:?}");

    // Everything arrived whole, with the writes made while it moved.
    let mut c = cluster_conn(&entry).await;
    let fields: usize = c.hlen(&hash).await.unwrap();
    assert_eq!(fields, FIELDS + written as usize, "{hash}");
    for i in [0, 1, FIELDS / 2, FIELDS - 1] {
        let v: String = c.hget(&hash, format!("f{i}")).await.unwrap();
        assert_eq!(v, format!("v{i}"));
    }
    let last: u64 = c.hget(&hash, format!("new{}", written - 1)).await.unwrap();
    assert_eq!(last, written - 1);
    let members: usize = c.scard(&set).await.unwrap();
    assert_eq!(members, 100_000);
    let score: f64 = c.zscore(&zset, "m99999").await.unwrap();
    assert_eq!(score, 99_999.0 / 4.0);
    let len: usize = c.llen(&list).await.unwrap();
    assert_eq!(len, 300_000);
    let ends: Vec<String> = c.lrange(&list, 0, 1).await.unwrap();
    assert_eq!(ends, vec!["m0", "m1"]);
    let mid: Vec<String> = c.lrange(&list, 154_999, 155_000).await.unwrap();
    assert_eq!(mid, vec!["m154999", "m155000"]);
    let tail: Vec<String> = c.lrange(&list, -1, -1).await.unwrap();
    assert_eq!(tail, vec!["m299999"]);
    let s: Vec<u8> = c.get(&string).await.unwrap();
    assert!(s == big_string, "the big string changed");
    let ttl: i64 = c.pttl(&string).await.unwrap();
    assert!(ttl > 0 && ttl <= 600_000, "{string} lost its TTL: {ttl}");
    let entries: usize = c.xlen(&stream).await.unwrap();
    assert_eq!(entries, 20_000);
    let groups: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&stream)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(groups.len(), 1, "the stream's consumer group");
    // No temporary copy is left anywhere.
    for addr in &all_nodes {
        let mut n = redis::Client::open(format!("redis://{addr}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let left: Vec<String> = redis::cmd("KEYS")
            .arg("redmesh:migrating:*")
            .query_async(&mut n)
            .await
            .unwrap();
        assert!(left.is_empty(), "temporary keys left on {addr}: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_blocked_on_a_slot_that_moves_are_redirected() {
    let sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("blk", 4, v1::ClusterConfig::default())
        .await;
    let m = sys.start_migrator("mg-1", &[]);
    let plan = dry_run(&sys, "blk", 8).await;
    // A list nobody has pushed to yet, in a slot that moves.
    let queue = moving_key(&plan, "queue:");
    let (owner, node) = sys.key_master(&cluster, queue.as_bytes());
    let blocked = |addr: String| {
        let queue = queue.clone();
        tokio::spawn(async move {
            let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
            let mut c = redis::Client::open(format!("redis://{addr}"))
                .unwrap()
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .unwrap();
            redis::cmd("BLPOP")
                .arg(&queue)
                .arg(0)
                .query_async::<redis::Value>(&mut c)
                .await
        })
    };
    // A cluster client on the owner's cluster listener, a plain one on its
    // plain listener; both wait at the owner's master node.
    let cluster_client = blocked(owner.resp.clone());
    let plain_client = blocked(owner.plain.clone());
    let node_addr = node.addr.clone();
    eventually("both clients blocked", Duration::from_secs(10), || async {
        let mut c = redis::Client::open(format!("redis://{node_addr}"))
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut c)
            .await
            .ok()?;
        (list.matches("cmd=blpop").count() == 2).then_some(())
    })
    .await;

    let (_, task) = scale(&sys, "blk", 8, 0).await;
    let t = finished(&m, "blk", &task).await.task.unwrap();
    assert_eq!(t.state, MigrationState::Completed as i32, "{t:?}");
    let (grown, _) = sys.get_cluster("blk").await;
    let (new_owner, _) = sys.key_master(&grown, queue.as_bytes());
    assert_ne!(new_owner.id, owner.id);
    // Redirected as Redis Cluster does, not left waiting on the old node.
    let wait = |h: tokio::task::JoinHandle<redis::RedisResult<redis::Value>>| async move {
        tokio::time::timeout(Duration::from_secs(30), h)
            .await
            .expect("a blocked client was not released when its slot moved")
            .unwrap()
    };
    let e = wait(cluster_client).await.expect_err("a redirection");
    assert_eq!(e.code(), Some("MOVED"), "{e}");
    assert!(
        e.to_string().contains(&new_owner.resp),
        "{e} does not name the new owner {}",
        new_owner.resp
    );
    let e = wait(plain_client).await.expect_err("a retry request");
    assert_eq!(e.code(), Some("TRYAGAIN"), "{e}");
    // Retried where the redirection says, the pop works.
    let mut c = cluster_conn(&new_owner.resp).await;
    let () = c.rpush(&queue, "job").await.unwrap();
    let popped: (String, String) = redis::cmd("BLPOP")
        .arg(&queue)
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(popped.1, "job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_cluster_record_vanishes_fails() {
    let sys = System::start(4);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("gone", 4, v1::ClusterConfig::default())
        .await;
    let m = sys.start_migrator("mg-1", &[]);
    preload(&sys, &cluster).await;
    let (_, task) = scale(&sys, "gone", 8, 500).await;
    pause(&m, "gone", &task).await;
    // The broker refuses to delete a cluster mid-migration; an operator
    // editing etcd does not ask. The task must not go on changing a
    // cluster that is not its own (or, recreated, is another one).
    let store = redmesh_store::EtcdStore::connect(
        std::slice::from_ref(&sys.etcd.endpoint),
        &redmesh_store::EtcdOptions::default(),
    )
    .await
    .unwrap();
    use redmesh_store::MetaStore;
    assert!(store.delete("/redmesh/v1/clusters/gone").await.unwrap());
    resume(&m, "gone", &task).await;
    let t = finished(&m, "gone", &task).await.task.unwrap();
    assert_eq!(t.state, MigrationState::Failed as i32, "{t:?}");
    assert!(t.error.contains("deleted"), "{t:?}");
}

/// Keys of the source proxy's two Redis nodes.
async fn keys_at(nodes: &[String]) -> u64 {
    let mut total = 0;
    for addr in nodes {
        let client = redis::Client::open(format!("redis://{addr}")).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let n: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
        total += n;
    }
    total
}

/// Migration rounds are fenced like client writes: a source proxy that
/// has heard from no broker for `--fence-after` copies, deletes and
/// discards nothing, since a failover may have handed its keys to another
/// proxy that moves them now. Its admin API says it is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_source_proxy_moves_no_key() {
    let (mut sys, m, task, entry) = scaling_under_way("fenced", 300).await;
    let paused = pause(&m, "fenced", &task).await;
    let range = paused
        .task
        .as_ref()
        .unwrap()
        .ranges
        .iter()
        .find(|r| r.phase == v1::MigrationPhase::Move as i32 && !r.cursor_proxy_id.is_empty())
        .cloned()
        .expect("a range being moved");
    let source = sys.proxy(&range.cursor_proxy_id);
    let nodes: Vec<String> = source.redis.iter().map(|r| r.addr.clone()).collect();
    let mut admin = source.admin_client().await;
    let epoch = sys.get_cluster("fenced").await.0.epoch;
    let batch = |max_keys| v1::MigrateBatchRequest {
        cluster: "fenced".into(),
        task_id: task.clone(),
        epoch,
        range: range.r#move.as_ref().unwrap().range,
        cursor: 0,
        max_keys,
        max_bytes: 0,
    };
    // The same call moves keys while the proxy hears from the broker.
    let before = keys_at(&nodes).await;
    let moved = admin
        .migrate_batch(batch(500))
        .await
        .expect("a batch before the fence")
        .into_inner();
    assert!(moved.keys_moved > 0, "{moved:?}");
    assert_eq!(keys_at(&nodes).await, before - moved.keys_moved);

    // Cut off from the control plane for longer than --fence-after.
    sys.broker.kill();
    eventually(
        "the source proxy fenced",
        Duration::from_secs(20),
        || async {
            let info = admin
                .clone()
                .get_info(v1::GetInfoRequest::default())
                .await
                .ok()?
                .into_inner();
            info.fenced.then_some(())
        },
    )
    .await;
    let before = keys_at(&nodes).await;
    let refused = admin
        .migrate_batch(batch(500))
        .await
        .expect_err("a fenced proxy moved keys");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("fenced"), "{refused:?}");
    assert_eq!(keys_at(&nodes).await, before, "keys left the fenced source");

    // Back in touch: the task finishes and every key reads back.
    sys.broker.restart();
    eventually("the fence lifted", Duration::from_secs(20), || async {
        let info = admin
            .clone()
            .get_info(v1::GetInfoRequest::default())
            .await
            .ok()?
            .into_inner();
        (!info.fenced).then_some(())
    })
    .await;
    resume(&m, "fenced", &task).await;
    let done = finished(&m, "fenced", &task).await;
    assert_eq!(
        done.task.as_ref().unwrap().state,
        MigrationState::Completed as i32,
        "{done:?}"
    );
    verify(&entry).await;
}

/// Each of `keys` read through `conn` within 10 s, compared with its value.
async fn reads_back(conn: &mut redis::cluster_async::ClusterConnection, keys: &[(String, i64)]) {
    for (key, value) in keys {
        let got: Option<i64> =
            tokio::time::timeout(Duration::from_secs(10), conn.get::<_, Option<i64>>(key))
                .await
                .unwrap_or_else(|_| panic!("{key}: no answer within 10 s"))
                .unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(got, Some(*value), "{key}");
    }
}

/// A client idle through a scale-in still routes the slots that moved to
/// the proxies that left: they send it on with `-MOVED`, as a Redis
/// Cluster master that lost its slots does. (They answered `-CLUSTERDOWN`,
/// on which redis-rs retries the same node and never refreshes its map:
/// those keys were out of reach for good.) And once such a proxy serves
/// another tenant's cluster, a connection made for the first one gets none
/// of the second's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_that_left_send_old_clients_on_and_serve_them_no_other_tenant() {
    let sys = System::start(4);
    sys.register_all().await;
    let config = |password: &str| v1::ClusterConfig {
        password: password.into(),
        ..Default::default()
    };
    sys.create_cluster("left-a", 8, config("pw-a")).await;
    let m = sys.start_migrator("mg-1", &[]);
    // (The password rides in each seed's URL: `redis://:pw@host:port`.)
    let client = |password: &str, addrs: Vec<String>| {
        patient_cluster_client(addrs.iter().map(|a| format!(":{password}@{a}")))
    };
    let all: Vec<String> = sys.proxies.iter().map(|p| p.resp.clone()).collect();
    let mut conn = client("pw-a", all.clone())
        .get_async_connection()
        .await
        .unwrap();
    let keys: Vec<(String, i64)> = (0..200).map(|i| (format!("left:{i}"), i)).collect();
    for (key, value) in &keys {
        conn.set::<_, _, ()>(key, value).await.unwrap();
    }
    // A connection authenticated for the cluster to every proxy, made now.
    let mut direct = Vec::new();
    for p in &sys.proxies {
        let c = redis::Client::open(format!("redis://:pw-a@{}", p.resp)).unwrap();
        direct.push((
            p.id.clone(),
            p.resp.clone(),
            c.get_multiplexed_async_connection().await.unwrap(),
        ));
    }

    let (_, task) = scale(&sys, "left-a", 4, 100_000).await;
    finished(&m, "left-a", &task).await;
    let (a, _) = sys.get_cluster("left-a").await;
    let stayed: Vec<String> = sys.members(&a).iter().map(|p| p.id.clone()).collect();
    let stayed_at: Vec<String> = sys.members(&a).iter().map(|p| p.resp.clone()).collect();
    let left: Vec<usize> = (0..direct.len())
        .filter(|&i| !stayed.contains(&direct[i].0))
        .collect();
    assert_eq!(left.len(), 2, "one chunk left: {stayed:?}");
    for &i in &left {
        let addr = direct[i].1.clone();
        eventually(
            &format!("{} to serve no cluster", direct[i].0),
            Duration::from_secs(20),
            || {
                let addr = addr.clone();
                async move {
                    let client = redis::Client::open(format!("redis://{addr}")).ok()?;
                    let mut c = client.get_multiplexed_async_connection().await.ok()?;
                    let e = redis::cmd("GET")
                        .arg("x")
                        .query_async::<redis::Value>(&mut c)
                        .await
                        .err()?;
                    e.to_string()
                        .contains("not part of any cluster")
                        .then_some(())
                }
            },
        )
        .await;
    }

    // The client, idle through the move, reads every key, promptly.
    reads_back(&mut conn, &keys).await;
    // The connections made for the cluster to the proxies that left are
    // sent to a member.
    for &i in &left {
        let (id, _, c) = &mut direct[i];
        let e = redis::cmd("GET")
            .arg("left:0")
            .query_async::<Option<String>>(c)
            .await
            .expect_err("a proxy that left serves no key");
        let (to, _) = e
            .redirect_node()
            .unwrap_or_else(|| panic!("{id}: no redirect: {e}"));
        assert!(
            stayed_at.iter().any(|a| a == to),
            "{id}: MOVED to {to}, not a member"
        );
    }

    // Another tenant's cluster takes the proxies that left.
    let b = sys.create_cluster("left-b", 4, config("pw-b")).await;
    let b_members: Vec<String> = sys.members(&b).iter().map(|p| p.id.clone()).collect();
    for &i in &left {
        assert!(b_members.contains(&direct[i].0), "{b_members:?}");
    }
    let b_at: Vec<String> = sys.members(&b).iter().map(|p| p.resp.clone()).collect();
    let mut b_conn = client("pw-b", b_at).get_async_connection().await.unwrap();
    for (key, _) in &keys {
        b_conn.set::<_, _, ()>(key, "tenant-b").await.unwrap();
    }
    sys.wait_cluster_ok(&b).await;
    for &i in &left {
        let (id, _, c) = &mut direct[i];
        for (key, _) in keys.iter().take(20) {
            let r = redis::cmd("GET")
                .arg(key)
                .query_async::<redis::Value>(c)
                .await;
            let e = r.expect_err("a connection of another tenant is not served");
            let to = e.redirect_node().map(|(to, _)| to.to_owned());
            assert!(
                to.is_some_and(|to| stayed_at.contains(&to)),
                "{id} {key}: {e}, not a redirect to the first cluster"
            );
        }
        let e = redis::cmd("DBSIZE")
            .query_async::<redis::Value>(c)
            .await
            .expect_err("a connection of another tenant is not served");
        assert!(e.to_string().contains("left-a"), "{id}: {e}");
        // Authenticating with the new cluster's password makes it one of
        // the new cluster's connections.
        let () = redis::cmd("AUTH").arg("pw-b").query_async(c).await.unwrap();
        let got = redis::cmd("GET")
            .arg("left:0")
            .query_async::<Option<String>>(c)
            .await;
        match got {
            Ok(v) => assert_eq!(v.as_deref(), Some("tenant-b"), "{id}"),
            Err(e) => assert!(e.redirect_node().is_some(), "{id}: {e}"),
        }
    }
    // The first cluster's client still reads its own values.
    reads_back(&mut conn, &keys).await;
}
