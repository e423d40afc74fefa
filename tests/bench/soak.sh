#!/usr/bin/env bash
# Load and soak scenario: the e2e soak test (tests/tests/soak.rs) for
# longer, on release binaries. Sustained mixed load on a 4-node cluster —
# cluster clients over strings, counters, lists, hashes and expiries,
# pipelines through the plain-client listener, blocking pops, pub/sub,
# and clients connecting and leaving by the thousand — while each proxy's
# memory and file descriptors are sampled. Prints the samples, the
# throughput, and GET latency percentiles through a proxy and straight to
# the Redis node behind it (the reference, measured at the same time), with
# their ratio; fails if a command failed, a descriptor leaked or memory grew
# beyond its bound.
#
#   REDMESH_BENCH_SOAK_SECONDS=S  seconds of load after the warm-up (default 300)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_build
seconds="${REDMESH_BENCH_SOAK_SECONDS:-300}"
say "soak: ${seconds} s of mixed load on release binaries"
# The test harness starts every process itself on free ports, in temporary
# directories, and kills them all when it ends (pass or fail).
cd "$ROOT" || exit
REDMESH_BIN_DIR="$BIN" REDMESH_SOAK_SECONDS="$seconds" \
  cargo test --quiet -p redmesh-e2e --test soak -- --nocapture
