//! docs/API.md is what `tools/gen_api_reference.py` makes of the comments
//! in `proto/`, and every service, method, message, field and enum value
//! has one (they are the API's documentation, here and through reflection).

use std::process::Command;

use redmesh_e2e::harness::python;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tools/gen_api_reference.py");
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md");

#[test]
fn the_api_reference_matches_the_proto_comments() {
    let out = Command::new(python())
        .arg(SCRIPT)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).expect("utf-8");
    let committed = std::fs::read_to_string(DOC).expect("docs/API.md");
    assert!(
        generated == committed,
        "docs/API.md is out of date; run: target/pyenv/bin/python tools/gen_api_reference.py --write"
    );
    let lines: Vec<&str> = generated.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        // A table row whose meaning is empty: an uncommented field,
        // method or enum value.
        assert!(!line.ends_with("|  |"), "no comment: {line}");
        // A heading followed at once by its table: an uncommented
        // service, message or enum.
        if line.starts_with("### ") {
            assert!(
                !lines.get(i + 2).is_some_and(|l| l.starts_with('|')),
                "no comment: {line}"
            );
        }
    }
}
