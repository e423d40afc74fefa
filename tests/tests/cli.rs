//! redmeshctl as scripts use it: shell completion, exit codes, and JSON
//! from every command with `--json`.

use std::process::Command;

use redmesh_e2e::{bin_path, free_port};

fn ctl(args: &[&str]) -> std::process::Output {
    Command::new(bin_path("redmeshctl"))
        .args(args)
        .output()
        .expect("redmeshctl runs")
}

#[test]
fn completion_scripts_cover_the_verbs_and_bash_parses_them() {
    for shell in ["bash", "zsh", "fish"] {
        let out = ctl(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).expect("utf-8");
        for verb in ["cluster", "coordinator", "health", "topology"] {
            assert!(script.contains(verb), "{shell} completion lacks {verb}");
        }
        if shell == "bash" {
            let dir = tempfile::tempdir().expect("tempdir");
            let file = dir.path().join("redmeshctl.bash");
            std::fs::write(&file, &script).expect("write");
            let check = Command::new("bash").arg("-n").arg(&file).output().unwrap();
            assert!(check.status.success(), "bash -n: {check:?}");
        }
    }
    let out = ctl(&["completion", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));
}

#[test]
fn an_unreachable_broker_exits_3_and_names_it() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let out = ctl(&["--broker", &url, "proxy", "list"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the broker") && err.contains(&url),
        "{err}"
    );
}

/// Runs redmeshctl with `--json` against `sys` and returns its stdout,
/// which must be JSON: one document, or (streams) one per line.
fn json_of(sys: &redmesh_e2e::System, migrator: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(bin_path("redmeshctl"))
        .args([
            "--json",
            "--broker",
            &sys.broker.url(),
            "--migrator",
            migrator,
        ])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("redmeshctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "redmeshctl --json {args:?}: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    if let Ok(v) = serde_json::from_str(&stdout) {
        return vec![v];
    }
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("redmeshctl --json {args:?} printed non-JSON ({e}):\n{stdout}")
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_prints_json_with_json_and_refusals_exit_1() {
    let sys = redmesh_e2e::System::start(6);
    let migrator = sys.start_migrator("mg-1", &[]);
    let m = migrator.url();
    let p = &sys.proxies[5];
    for q in &sys.proxies {
        let redis = format!("{},{}", q.redis[0].addr, q.redis[1].addr);
        let (resp, admin, host) = (&q.resp, &q.admin, &q.host);
        json_of(
            &sys,
            &m,
            &[
                "proxy", "register", "--id", &q.id, "--resp", resp, "--admin", admin, "--host",
                host, "--redis", &redis,
            ],
        );
    }
    let listed = json_of(&sys, &m, &["proxy", "list", "--state", "free"]);
    assert_eq!(
        listed[0]["proxies"].as_array().map(Vec::len),
        Some(6),
        "{listed:?}"
    );
    json_of(&sys, &m, &["proxy", "get", &p.id]);
    json_of(&sys, &m, &["cluster", "create", "js", "--nodes", "4"]);
    let got = json_of(&sys, &m, &["cluster", "get", "js"]);
    assert_eq!(got[0]["cluster"]["name"], "js", "{got:?}");
    json_of(&sys, &m, &["cluster", "list"]);
    json_of(&sys, &m, &["cluster", "set-password", "js"]);
    let plan = json_of(&sys, &m, &["cluster", "scale", "js", "8", "--dry-run"]);
    assert!(
        plan[0]["plan"]["moves"]
            .as_array()
            .is_some_and(|v| !v.is_empty()),
        "{plan:?}"
    );
    // A scale followed to its end: progress documents, one per line.
    let progress = json_of(&sys, &m, &["cluster", "scale", "js", "8"]);
    assert!(!progress.is_empty());
    json_of(&sys, &m, &["migration", "get", "js"]);
    json_of(&sys, &m, &["migration", "list", "js"]);
    json_of(&sys, &m, &["migration", "watch", "js"]);
    // A removal of a proxy with no cluster, after one is left free.
    let free = json_of(&sys, &m, &["proxy", "list", "--state", "free"]);
    let id = free[0]["proxies"][0]["spec"]["id"]
        .as_str()
        .expect("a free proxy")
        .to_owned();
    json_of(&sys, &m, &["proxy", "remove", &id]);
    json_of(&sys, &m, &["cluster", "delete", "js"]);
    // The control plane's views.
    let (checkers, co) = sys.start_control_plane().await;
    let status = json_of(
        &sys,
        &m,
        &["--coordinator", &co.url(), "coordinator", "status"],
    );
    assert_eq!(status[0]["isLeader"], true, "{status:?}");
    json_of(
        &sys,
        &m,
        &["health", "report", "--checker", &checkers[0].url()],
    );

    // Refusals exit 1 with the gRPC status on stderr, nothing on stdout.
    let out = Command::new(bin_path("redmeshctl"))
        .args([
            "--json",
            "--broker",
            &sys.broker.url(),
            "cluster",
            "get",
            "nope",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"),
        "{out:?}"
    );
}

/// `redmeshctl cluster get c` as printed.
fn replicas_column(sys: &redmesh_e2e::System) -> String {
    let out = ctl(&["--broker", &sys.broker.url(), "cluster", "get", "c"]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_get_shows_replicas_that_are_not_synced() {
    let mut sys = redmesh_e2e::System::start(2);
    sys.register_all().await;
    let cluster = sys
        .create_cluster("c", 4, redmesh_api::v1::ClusterConfig::default())
        .await;
    // Every replica finishes its first sync, and says so.
    redmesh_e2e::harness::eventually(
        "replicas synced",
        std::time::Duration::from_secs(20),
        || async {
            let text = replicas_column(&sys);
            (!text.contains("(syncing)") && !text.contains("(?)")).then_some(())
        },
    )
    .await;
    // The master of shard 0 loses its Redis node: its replica's link is down.
    let master = cluster.shards[0].master.clone().unwrap();
    let replica = cluster.shards[0].replicas[0].clone();
    let idx = sys
        .proxies
        .iter()
        .position(|p| p.id == master.proxy_id)
        .unwrap();
    sys.proxies[idx].redis[master.node_index as usize].kill();
    let text = redmesh_e2e::harness::eventually(
        "the replica reported not synced",
        std::time::Duration::from_secs(20),
        || async {
            let text = replicas_column(&sys);
            text.contains(&format!(
                "{}/{} (syncing)",
                replica.proxy_id, replica.node_index
            ))
            .then_some(text)
        },
    )
    .await;
    // Only that one.
    assert_eq!(text.matches("(syncing)").count(), 1, "{text}");
    let mut admin = sys.proxy(&replica.proxy_id).admin_client().await;
    let info = admin
        .get_info(redmesh_api::v1::GetInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!info.nodes[replica.node_index as usize].synced, "{info:?}");
}
