//! redmeshctl as scripts use it: shell completion and exit codes.

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
