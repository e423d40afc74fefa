#!/usr/bin/env bash
# Runs one benchmark scenario: ./tests/bench/run.sh <scenario>
#
# Each scenario is a file tests/bench/<scenario>.sh; this script only
# dispatches, so adding a scenario means adding its file (and a line to the
# usage text below). Every scenario starts its own isolated redmesh system on
# free ports (tests/bench/lib.sh) and prints its results as ratios against a
# reference measured in the same run, because these machines are too noisy
# for absolute numbers to compare across runs. See docs/PERFORMANCE.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat >&2 <<'USAGE'
usage: ./tests/bench/run.sh <scenario>

scenarios:
  proxy   throughput and latency through a proxy vs. the same Redis node
          directly (redis-benchmark: SET, GET, MSET, LPUSH; -P 1 and -P 16)
  failover  time from kill -9 of a master to the first successful write to
          its slots, redmesh vs. the official Redis Cluster (node-timeout
          1000 and the default 15000); several minutes
  migration  live scale-out of 1,000,000 x 64 B and 20,000 x 16 KiB keys vs.
          redis-cli --cluster reshard of the official Redis Cluster
  chaos   random faults (kill -9, SIGSTOP, control-plane and etcd restarts)
          under writes and repeated scaling for REDMESH_BENCH_CHAOS_SECONDS
          (default 600); reports acknowledged writes lost (must be 0)
  soak    sustained mixed load for REDMESH_BENCH_SOAK_SECONDS (default 300)
          with each proxy's memory and descriptors sampled; GET latency
          percentiles through a proxy vs. its Redis node directly

environment:
  REDMESH_BENCH_BUILD=0     do not run `cargo build --release --bins` first
  REDMESH_BENCH_SECONDS=S   target length of one measured run (default 2.5)
  REDMESH_BENCH_REPS=K      measured pairs per row, median reported (default 3)
  REDMESH_BENCH_KILLS=N     kills per system in the failover scenario (default 5)
  REDMESH_BENCH_PROXY_THREADS=T  proxy runtime worker threads (default 0: one per CPU)
  REDMESH_BENCH_SMALL_KEYS=N  keys of 64 B in the migration scenario (default 1000000)
  REDMESH_BENCH_BIG_KEYS=N    keys of 16 KiB in the migration scenario (default 20000)
  REDMESH_BENCH_CHAOS_SECONDS=S  seconds of faults in the chaos scenario (default 600)
  REDMESH_BENCH_CHAOS_SEED=N   replay a chaos run's fault choices (each run prints its seed)
  REDMESH_BENCH_CHAOS_DURABILITY=async  chaos with async durability: losses counted, not failed
  REDMESH_BENCH_SOAK_SECONDS=S   seconds of load in the soak scenario (default 300)
  REDMESH_BENCH_KEEP=1      keep the run's state and logs directory
USAGE
  exit 2
}

[ $# -eq 1 ] || usage
case "$1" in
  -h | --help) usage ;;
  */* | .* | lib | failover_official | migration_data) usage ;; # only scenario files, not paths or helper libraries
esac
scenario="$HERE/$1.sh"
[ -f "$scenario" ] || { echo "unknown scenario: $1" >&2; usage; }
exec bash "$scenario"
