//! The API as seen with buf, the way a newcomer meets it: `buf lint` finds
//! nothing in `proto/`, and the README's `buf curl` calls, run as written
//! (reflection only, no .proto files), work against a live system.
//!
//! buf comes from npm (`tools/buf`, installed by ./tests/run.sh when Node.js
//! is there); without it the tests say so and skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use redmesh_e2e::System;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn buf() -> Option<PathBuf> {
    let bin = Path::new(REPO).join("tools/buf/node_modules/.bin/buf");
    if bin.exists() {
        Some(bin)
    } else {
        eprintln!(
            "skipped: tools/buf/node_modules missing (needs npm; ./tests/run.sh installs it)"
        );
        None
    }
}

/// The README's code block holding its `buf curl` examples.
fn readme_buf_calls() -> String {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).expect("README.md");
    readme
        .split("```sh\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .find(|block| block.trim_start().starts_with("buf curl"))
        .expect("a ```sh block of buf curl calls in README.md")
        .to_owned()
}

#[test]
fn buf_lint_finds_nothing_in_the_api() {
    let Some(buf) = buf() else { return };
    let out = Command::new(buf)
        .arg("lint")
        .current_dir(Path::new(REPO).join("proto"))
        .output()
        .expect("buf runs");
    assert!(
        out.status.success(),
        "buf lint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_buf_curl_calls_work_against_a_live_system() {
    let Some(buf) = buf() else { return };
    let sys = System::start(4);
    sys.register_all().await;
    // The calls as the README prints them, against this system's broker.
    // A Watch… call streams for ever: it runs 5 s and must have printed.
    let script = format!(
        r#"set -euo pipefail
buf() {{
  case "$*" in
    *Watch*)
      local out rc=0
      out=$(timeout 5 "$BUF" "$@" 2>&1) || rc=$?
      printf '%s\n' "$out"
      [ "$rc" -eq 124 ] && [ -n "$out" ] ;;
    *) "$BUF" "$@" ;;
  esac
}}
{}"#,
        readme_buf_calls().replace("http://127.0.0.1:7400", &sys.broker.url())
    );
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("BUF", buf)
        .output()
        .await
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the README's buf curl calls failed:\n{script}\n---\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        // --list-methods
        "redmesh.v1.Broker/CreateCluster",
        // RegisterProxy, then CreateCluster on the free pool
        "proxy-9",
        "\"name\": \"shop\"",
        // WatchTopology streams the proxy's view
        "\"epoch\"",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // What the calls did is real.
    let (shop, _) = sys.get_cluster("shop").await;
    assert_eq!(shop.chunks.len(), 1, "{shop:?}");
}
