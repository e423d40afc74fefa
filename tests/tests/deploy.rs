//! The container and Kubernetes deployments (deploy/compose, deploy/k8s),
//! checked offline by `tools/check_deploy.py` against the built binaries
//! and a real broker: Docker and Kubernetes are not available here, so this
//! is as far as the tests can take them (see deploy/k8s/README.md).

use std::process::Command;

use redmesh_e2e::harness::{bin_dir, bin_path, python};
use redmesh_e2e::System;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/check_deploy.py");

#[test]
fn compose_and_kubernetes_manifests_check_out_against_the_binaries_and_a_broker() {
    bin_path("redmeshctl"); // (fails with how to build them when missing)
                            // etcd and a broker, no proxies: the deployments' registration scripts
                            // run against it and what they register is checked.
    let sys = System::start(0);
    let out = Command::new(python())
        .arg(SCRIPT)
        .arg(bin_dir())
        .arg("--broker")
        .arg(sys.broker.url())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "tools/check_deploy.py found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
