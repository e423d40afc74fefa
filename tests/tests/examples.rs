//! The client examples in `examples/`, run against a live system as a
//! newcomer would run them.

use std::process::Command;

use redmesh_e2e::harness::python;
use redmesh_e2e::System;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_quickstart_registers_creates_watches_and_uses_the_cluster() {
    let sys = System::start(4);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/quickstart.py"
    );
    let mut cmd = Command::new(python());
    cmd.arg(script).args(["--broker", &sys.broker.addr]);
    for p in &sys.proxies {
        let redis: Vec<&str> = p.redis.iter().map(|r| r.addr.as_str()).collect();
        cmd.args([
            "--proxy",
            &format!(
                "{},{},{},{},{}",
                p.id,
                p.resp,
                p.admin,
                p.host,
                redis.join(";")
            ),
        ]);
    }
    let out = cmd.output().expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python example failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "registered proxy-0 (changed: True)",
        "created cluster py-example",
        "topology of ",
        "100 keys written and read back",
        "deleted cluster py-example",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    // The cluster is gone and its proxies are free again.
    let listed = sys
        .broker()
        .await
        .list_clusters(redmesh_api::v1::ListClustersRequest {})
        .await
        .expect("list clusters")
        .into_inner();
    assert!(listed.clusters.is_empty(), "{listed:?}");
}
