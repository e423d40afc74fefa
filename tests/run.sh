#!/usr/bin/env bash
# Installs what is missing and runs the whole test suite, e2e included:
# formatting, clippy, unit tests and end-to-end tests against real etcd,
# redis-server and the built binaries. Builds once; every test process is
# started from built binaries on free ports and cleaned up.
source "$(dirname "${BASH_SOURCE[0]}")/../deploy/local/lib.sh"
cd "$ROOT"

ensure_packages redis-server:redis-server redis-cli:redis-tools etcd:etcd-server \
  etcdctl:etcd-client protoc:protobuf-compiler python3:python3
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs) first"

started=$SECONDS
say "formatting"
cargo fmt --all -- --check

say "clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

say "building binaries and tests"
cargo build --workspace --bins --tests --quiet

say "running tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --profile ci
else
  cargo test --workspace --no-fail-fast -- --test-threads=2
fi
say "all tests passed in $((SECONDS - started))s"
