#!/usr/bin/env bash
# Migration benchmark: how fast does a live scale-out move data, compared
# with resharding the official Redis Cluster holding the same data?
#
# Two data sets, each on fresh systems: REDMESH_BENCH_SMALL_KEYS (default
# 1,000,000) keys of 64 bytes, then REDMESH_BENCH_BIG_KEYS (default 20,000)
# keys of 16 KiB. For each:
#
#   redmesh   a 4-node cluster (1 chunk: 2 masters, 2 replicas) and one free
#             chunk; the data is loaded through the proxies; timed:
#             `redmeshctl cluster scale <c> 8`, which moves half the slots
#             (and so about half the keys) onto the new chunk and returns
#             once the task has completed.
#   official  2 masters with a replica each (created as 3 by redis-cli
#             --cluster create, the third emptied before loading), the same
#             data, and 2 empty masters with a replica each; timed: `redis-cli --cluster reshard` of 4096 slots
#             from each old master to a new one, --cluster-pipeline 100,
#             one after the other, as an operator would run them.
#
# Afterwards every key of the data set is read back and compared (through
# each system's own slot map), and the keys that changed owner are counted
# from the slot maps before and after, the same way for both systems. Rates
# are keys moved and value bytes moved (keys x value size) per second of
# wall-clock time.
#
# A difference to keep in mind: redmesh confirms each batch on the
# destination's and the source's replica (WAIT 1) before going on, because a
# key moved must survive a failover; MIGRATE in the official cluster does not
# wait for replicas.
#
# Goals on a 2-core machine (informational; the exit status only reflects
# errors): >= 100,000 keys/s for small values, >= 200 MB/s for 16 KiB values,
# >= 10 x the official reshard.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SMALL_KEYS=${REDMESH_BENCH_SMALL_KEYS:-1000000}
BIG_KEYS=${REDMESH_BENCH_BIG_KEYS:-20000}
DATA="$ROOT/tests/bench/migration_data.py"

started=$SECONDS
bench_build # first: a failed build leaves nothing to clean up
bench_init
bench_header

say "starting etcd, the migrator and the broker"
bench_start_etcd
bench_start_migrator
bench_start_broker

# --- helpers ------------------------------------------------------------------

# rate N SECONDS: N / SECONDS, no decimals.
rate() { python3 -c 'import sys; print("%.0f" % (float(sys.argv[1]) / float(sys.argv[2])))' "$1" "$2"; }
# mb_rate KEYS SIZE SECONDS: value megabytes (10^6) per second.
mb_rate() { python3 -c 'import sys; k, s, t = map(float, sys.argv[1:]); print("%.1f" % (k * s / 1e6 / t))' "$1" "$2" "$3"; }
# ratio A B: A / B with one decimal.
ratio() { python3 -c 'import sys; print("%.1f" % (float(sys.argv[1]) / float(sys.argv[2])))' "$1" "$2"; }
# now: seconds since the epoch, with nanoseconds.
now() { date +%s.%N; }
# since T0: seconds since T0, three decimals.
since() { python3 -c 'import sys; print("%.3f" % (float(sys.argv[2]) - float(sys.argv[1])))' "$1" "$(now)"; }

# Results of the last measure_* call.
MOVED_KEYS="" ELAPSED=""

# measure_redmesh NAME KEYS SIZE: a fresh 4-node cluster NAME on two new
# chunks, loaded with the data set, scaled to 8 nodes; sets MOVED_KEYS and
# ELAPSED.
measure_redmesh() {
  local name=$1 keys=$2 size=$3 seed t0
  bench_start_chunk "$name-a" "$name-b"
  bench_start_chunk "$name-c" "$name-d"
  bench_create_cluster "$name" 4
  seed="127.0.0.1:${PROXY_RESP[$name-a]}"
  say "redmesh: loading $keys keys of $size bytes"
  python3 "$DATA" load "$seed" "$keys" "$size"
  python3 "$DATA" owners "$seed" "$BENCH_DIR/$name.before"
  say "redmesh: cluster scale $name 8"
  cpu_snapshot >"$BENCH_DIR/$name.cpu0"
  t0=$(now)
  ctl --json cluster scale "$name" 8 >"$LOGS/$name-scale.json" ||
    die "cluster scale failed; see $LOGS/$name-scale.json and $LOGS/migrator.log"
  ELAPSED=$(since "$t0")
  cpu_snapshot >"$BENCH_DIR/$name.cpu1"
  cpu_report "$BENCH_DIR/$name.cpu0" "$BENCH_DIR/$name.cpu1" "$ELAPSED"
  redis_time "$name"
  bench_check_alive
  MOVED_KEYS=$(python3 "$DATA" moved "$seed" "$BENCH_DIR/$name.before" "$keys")
  python3 "$DATA" verify "$seed" "$keys" "$size"
  # The last progress line holds the task as it ended.
  tail -n 1 "$LOGS/$name-scale.json" | python3 -c '
import json, sys
p = json.load(sys.stdin)
t = p.get("task", {})
print("    task %s: %s, %s keys and %.1f MB (values and DUMP payloads) over %d ranges" % (
    t.get("id"), t.get("state"), p.get("keysMoved", 0), int(p.get("bytesMoved", 0)) / 1e6,
    len(t.get("ranges", []))))'
}

# cpu_snapshot: "NAME TICKS" of every process this run started.
cpu_snapshot() {
  local f
  for f in "$PIDS"/*.pid; do
    echo "$(basename "$f" .pid) $(proc_cpu_ticks "$(cat "$f")")"
  done
}

# cpu_report BEFORE AFTER SECONDS: CPU time used in between, by process,
# busiest first, as a share of the wall-clock time (100 % = one core).
cpu_report() {
  python3 - "$1" "$2" "$3" "$CLK_TCK" <<'PY'
import sys
before = dict(l.split() for l in open(sys.argv[1]))
after = dict(l.split() for l in open(sys.argv[2]))
secs, tck = float(sys.argv[3]), float(sys.argv[4])
used = sorted(((int(after[n]) - int(before.get(n, 0))) / tck, n) for n in after)
used = [(c, n) for c, n in reversed(used) if c > 0]
total = sum(c for c, _ in used)
print("    CPU while scaling: %.1f s over %.1f s (%.0f %% of one core); busiest:" % (total, secs, 100 * total / secs))
print("      " + ", ".join("%s %.0f %%" % (n, 100 * c / secs) for c, n in used[:8]))
PY
}

# redis_time NAME: where the Redis nodes of cluster NAME spent their time
# (INFO commandstats, all nodes summed, busiest commands first). Every node
# was started for this cluster, so the counts are the load and the scale.
redis_time() {
  local id port stats=""
  for id in a b c d; do
    for port in ${PROXY_REDIS[$1-$id]}; do
      stats+=$(redis-cli -p "$port" info commandstats)$'\n'
    done
  done
  python3 -c '
import re, sys
tot = {}
for m in re.finditer(r"cmdstat_([a-z|]+):calls=(\d+),usec=(\d+)", sys.stdin.read()):
    c = tot.setdefault(m.group(1), [0, 0])
    c[0] += int(m.group(2)); c[1] += int(m.group(3))
top = sorted(tot.items(), key=lambda kv: -kv[1][1])[:8]
print("    Redis time by command (loading included): " + ", ".join(
    "%s %.2f s (%d calls)" % (k, v[1] / 1e6, v[0]) for k, v in top))' <<<"$stats"
}

# Nodes of the official cluster of the current measurement.
REF_PORTS=() REF_NAMES=()

# ref_spawn I TAG: starts official node I (replicas stay with their master
# even while it holds no slots).
ref_spawn() {
  local i=$1 tag=$2
  bench_cluster_node "official-$tag-$i" "$BENCH_DIR/official-$tag-$i" "${REF_PORTS[$i]}" \
    "${REF_BUS[$i]}" --cluster-allow-replica-migration no
  REF_NAMES+=("official-$tag-$i")
}

# ref_consistent: redis-cli's own check passes (all nodes agree on the slot
# map, no open slots): reshard refuses to start otherwise.
ref_consistent() {
  local out
  out=$(redis-cli --cluster check "127.0.0.1:${REF_PORTS[0]}" 2>&1) || return 1
  grep -q 'All nodes agree about slots configuration' <<<"$out" &&
    grep -q 'All 16384 slots covered' <<<"$out" &&
    ! grep -q '\[WARNING\]\|\[ERR\]' <<<"$out"
}

# ref_known N: node 0 sees N nodes, all connected.
ref_known() {
  [ "$(redis-cli -p "${REF_PORTS[0]}" cluster nodes | awk '$8 == "connected"' | wc -l)" -eq "$1" ]
}

# ref_knows I ID: node I knows the node ID.
ref_knows() { redis-cli -p "${REF_PORTS[$1]}" cluster nodes | grep -q "^$2 "; }

# ref_cli_log NAME COMMAND...: runs a redis-cli --cluster command with its
# output in $LOGS/NAME.log, failing with the log tail.
ref_cli_log() {
  local log="$LOGS/$1.log"; shift
  "$@" >"$log" 2>&1 || { tail -n 20 "$log" >&2; die "$* failed; log: $log"; }
}

# measure_official TAG KEYS SIZE: sets MOVED_KEYS and ELAPSED.
measure_official() {
  local tag=$1 keys=$2 size=$3 i seed t0 seeds masters m0 m1 n0 n1
  bench_free_ports 16
  REF_PORTS=("${FREE_PORTS[@]:0:8}")
  REF_BUS=("${FREE_PORTS[@]:8:8}")
  REF_NAMES=()
  for i in 0 1 2 3 4 5 6 7; do ref_spawn "$i" "$tag"; done
  for i in 0 1 2 3 4 5 6 7; do wait_for "official node ${REF_PORTS[$i]}" 20 redis_ping "${REF_PORTS[$i]}"; done
  seed="127.0.0.1:${REF_PORTS[0]}"
  # redis-cli creates clusters of 3 masters at least: nodes 0-5 form 3
  # masters with a replica each, then the third master gives all its slots
  # to the other two while the cluster is still empty, and becomes one of
  # the two new masters.
  seeds=()
  for i in 0 1 2 3 4 5; do seeds+=("127.0.0.1:${REF_PORTS[$i]}"); done
  ref_cli_log "official-$tag-create" redis-cli --cluster create "${seeds[@]}" \
    --cluster-replicas 1 --cluster-yes
  wait_for "official cluster $tag" 60 ref_consistent
  mapfile -t masters < <(redis-cli -p "${REF_PORTS[0]}" cluster nodes |
    awk '$3 ~ /master/ && NF >= 9 {print $1}')
  m0=${masters[0]:-} m1=${masters[1]:-} n0=${masters[2]:-}
  [ -n "$n0" ] || die "official cluster $tag: expected 3 masters"
  ref_cli_log "official-$tag-empty" redis-cli --cluster rebalance "$seed" --cluster-weight "$n0=0"
  wait_for "official cluster $tag to agree" 60 ref_consistent
  say "official: loading $keys keys of $size bytes"
  python3 "$DATA" load "$seed" "$keys" "$size"
  python3 "$DATA" owners "$seed" "$BENCH_DIR/official-$tag.before"
  # Node 6: the second new master, node 7 its replica.
  ref_cli_log "official-$tag-add-6" redis-cli --cluster add-node "127.0.0.1:${REF_PORTS[6]}" "$seed"
  wait_for "official node 6 to join" 60 ref_known 7
  wait_for "official cluster $tag to agree" 60 ref_consistent
  n1=$(redis-cli -p "${REF_PORTS[6]}" cluster myid)
  # (add-node --cluster-slave races the gossip: the new node may not know
  # its master yet. Joined as an empty master first, it is told once it does.)
  ref_cli_log "official-$tag-add-7" redis-cli --cluster add-node "127.0.0.1:${REF_PORTS[7]}" "$seed"
  wait_for "official node 7 to learn of node 6" 60 ref_knows 7 "$n1"
  [ "$(redis-cli -p "${REF_PORTS[7]}" cluster replicate "$n1")" = OK ] || die "CLUSTER REPLICATE failed"
  wait_for "official cluster $tag with 8 nodes" 60 ref_known 8
  wait_for "official cluster $tag to agree" 60 ref_consistent
  say "official: redis-cli --cluster reshard, 2 x 4096 slots, --cluster-pipeline 100"
  t0=$(now)
  ref_cli_log "official-$tag-reshard-0" redis-cli --cluster reshard "$seed" --cluster-from "$m0" \
    --cluster-to "$n0" --cluster-slots 4096 --cluster-yes --cluster-pipeline 100
  wait_for "official cluster $tag to agree" 60 ref_consistent
  ref_cli_log "official-$tag-reshard-1" redis-cli --cluster reshard "$seed" --cluster-from "$m1" \
    --cluster-to "$n1" --cluster-slots 4096 --cluster-yes --cluster-pipeline 100
  ELAPSED=$(since "$t0")
  bench_check_alive
  wait_for "official cluster $tag to agree" 60 ref_consistent
  MOVED_KEYS=$(python3 "$DATA" moved "$seed" "$BENCH_DIR/official-$tag.before" "$keys")
  python3 "$DATA" verify "$seed" "$keys" "$size"
  # Free the machine for what comes next.
  bench_stop "${REF_NAMES[@]}"
}

# --- the runs -----------------------------------------------------------------

declare -A RESULT=()
run_set() {
  local label=$1 keys=$2 size=$3
  measure_redmesh "$label" "$keys" "$size"
  RESULT[$label-redmesh]="$MOVED_KEYS $ELAPSED"
  echo "    redmesh: $MOVED_KEYS keys in ${ELAPSED}s"
  measure_official "$label" "$keys" "$size"
  RESULT[$label-official]="$MOVED_KEYS $ELAPSED"
  echo "    official: $MOVED_KEYS keys in ${ELAPSED}s"
}

say "data set 1: $SMALL_KEYS keys x 64 bytes"
run_set small "$SMALL_KEYS" 64
say "data set 2: $BIG_KEYS keys x 16384 bytes"
run_set big "$BIG_KEYS" 16384

# --- report -------------------------------------------------------------------

say "results (half the slots moved onto a new chunk / new masters)"
printf '%-16s %-9s %9s %9s %11s %9s %14s\n' "data set" system "keys" "seconds" "keys/s" "MB/s" "vs official"
for set in small big; do
  size=$([ $set = small ] && echo 64 || echo 16384)
  keys=$([ $set = small ] && echo "$SMALL_KEYS" || echo "$BIG_KEYS")
  read -r rk rt <<<"${RESULT[$set-redmesh]}"
  read -r ok ot <<<"${RESULT[$set-official]}"
  r_rate=$(rate "$rk" "$rt")
  o_rate=$(rate "$ok" "$ot")
  printf '%-16s %-9s %9s %9s %11s %9s %14s\n' "$keys x ${size}B" redmesh "$rk" "$rt" "$r_rate" \
    "$(mb_rate "$rk" "$size" "$rt")" "$(ratio "$r_rate" "$o_rate")x"
  printf '%-16s %-9s %9s %9s %11s %9s %14s\n' "" official "$ok" "$ot" "$o_rate" \
    "$(mb_rate "$ok" "$size" "$ot")" "1.0x"
done
echo "    goals: >= 100000 keys/s (64 B), >= 200 MB/s (16 KiB), >= 10x the official reshard"
echo "    total benchmark time: $((SECONDS - started))s"
bench_finish
