//! The client examples in `examples/`, run against a live system as a
//! newcomer would run them.

use std::process::Command;

use redmesh_e2e::harness::python;
use redmesh_e2e::System;

/// `--proxy ID,RESP,ADMIN,HOST,REDIS1;REDIS2` for every proxy of `sys`.
fn proxy_args(sys: &System) -> Vec<String> {
    let mut out = Vec::new();
    for p in &sys.proxies {
        let redis: Vec<&str> = p.redis.iter().map(|r| r.addr.as_str()).collect();
        out.push("--proxy".to_owned());
        out.push(format!(
            "{},{},{},{},{}",
            p.id,
            p.resp,
            p.admin,
            p.host,
            redis.join(";")
        ));
    }
    out
}

/// Runs `cmd`, asserts success and that stdout has every line of `expect`.
fn run_example(mut cmd: Command, expect: &[&str]) {
    let out = cmd.output().expect("the example starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in expect {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

async fn assert_no_clusters(sys: &System) {
    let listed = sys
        .broker()
        .await
        .list_clusters(redmesh_api::v1::ListClustersRequest {})
        .await
        .expect("list clusters")
        .into_inner();
    assert!(listed.clusters.is_empty(), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_quickstart_registers_creates_watches_and_uses_the_cluster() {
    let sys = System::start(4);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/quickstart.py"
    );
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .args(["--broker", &sys.broker.addr])
        .args(proxy_args(&sys));
    run_example(
        cmd,
        &[
            "registered proxy-0 (changed: True)",
            "created cluster py-example",
            "topology of ",
            "100 keys written and read back",
            "deleted cluster py-example",
        ],
    );
    // The cluster is gone and its proxies are free again.
    assert_no_clusters(&sys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_quickstart_registers_creates_and_watches_the_cluster() {
    // examples/node needs Node.js and its packages (./tests/run.sh runs
    // `npm ci` there when node is installed).
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/node");
    let node_ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node_ok || !std::path::Path::new(dir).join("node_modules").exists() {
        eprintln!("skipped: node or examples/node/node_modules missing");
        return;
    }
    let sys = System::start(4);
    let mut cmd = Command::new("node");
    cmd.arg(format!("{dir}/quickstart.js"))
        .args(["--broker", &sys.broker.addr])
        .args(proxy_args(&sys));
    run_example(
        cmd,
        &[
            "registered proxy-0 (changed: true)",
            "created cluster node-example",
            "topology of ",
            "GetCluster: node-example has 2 proxies",
            "deleted cluster node-example",
        ],
    );
    assert_no_clusters(&sys).await;
}
