//! docs/CONFIGURATION.md is what `tools/gen_config_reference.py` makes of
//! the built binaries' `--help`: a flag added, renamed or re-defaulted
//! without regenerating the reference fails here.

use std::process::Command;

use redmesh_e2e::harness::{bin_dir, bin_path};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tools/gen_config_reference.py"
);
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CONFIGURATION.md");

#[test]
fn the_configuration_reference_matches_the_binaries() {
    bin_path("redmesh-proxy"); // (fails with how to build them when missing)
    let out = Command::new("python3")
        .arg(SCRIPT)
        .arg(bin_dir())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).expect("utf-8");
    let committed = std::fs::read_to_string(DOC).expect("docs/CONFIGURATION.md");
    assert!(
        generated == committed,
        "docs/CONFIGURATION.md is out of date; run: python3 tools/gen_config_reference.py target/debug --write"
    );
    // Every service flag has its environment variable, so containers and
    // unit files can configure everything without a command line.
    for line in committed.lines().filter(|l| l.starts_with("| `--")) {
        assert!(
            line.contains("| `REDMESH_") || line.starts_with("| `--json"),
            "{line}"
        );
    }
}
