#!/usr/bin/env bash
# Chaos scenario: the e2e chaos test (tests/tests/chaos.rs) for longer, on
# release binaries. Faults chosen at random, one at a time — kill -9 of a
# serving proxy with its Redis nodes, SIGSTOP of a proxy, kills of the
# coordinator leader, a migrator, a health-checker and the broker, etcd
# restarts, and (as root, with cgroup2 and nftables) a proxy cut off from
# the control plane while clients still reach it — while cluster clients write with replica_ack durability and the
# cluster scales 4 -> 8 -> 4 nodes over and over. Prints the faults applied,
# writes acknowledged and refused, acknowledged writes lost (must be 0) and
# the slowest heal; fails if anything was lost or the cluster did not
# converge. There is no reference system to divide by: the figure that
# matters is the loss count.
#
#   REDMESH_BENCH_CHAOS_SECONDS=S  seconds of faults (default 600)
#   REDMESH_BENCH_CHAOS_SEED=N     replay a run's fault choices (its seed is printed)
#   REDMESH_BENCH_CHAOS_PARTITIONS=0  no partitions (default 1: where the
#                                  machine allows them, skipped otherwise)
#   REDMESH_BENCH_CHAOS_DURABILITY=async  run the cluster with async durability:
#                                  acknowledged writes lost to failovers are
#                                  counted and reported, not a failure
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_build
seconds="${REDMESH_BENCH_CHAOS_SECONDS:-600}"
say "chaos: ${seconds} s of faults on release binaries"
# The test harness starts every process itself on free ports, in temporary
# directories, and kills them all when it ends (pass or fail).
cd "$ROOT" || exit
# A fresh sequence of faults every run, unless one is asked for (the test's
# own default is the fixed one ./tests/run.sh replays). REDMESH_BENCH_*, as
# lib.sh clears every other REDMESH_* variable.
seed="${REDMESH_BENCH_CHAOS_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}"
REDMESH_BIN_DIR="$BIN" REDMESH_CHAOS_SECONDS="$seconds" REDMESH_CHAOS_SEED="$seed" \
  REDMESH_CHAOS_PARTITIONS="${REDMESH_BENCH_CHAOS_PARTITIONS:-1}" \
  REDMESH_CHAOS_DURABILITY="${REDMESH_BENCH_CHAOS_DURABILITY:-replica_ack}" \
  cargo test --quiet -p redmesh-e2e --test chaos -- --nocapture
