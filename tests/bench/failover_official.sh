# shellcheck shell=bash
# Variables set here (OFFICIAL_MS, FAILOVER_MEDIAN, ...) are read by the caller:
# shellcheck disable=SC2034

# The official Redis Cluster reference of the failover benchmark (sourced
# after tests/bench/lib.sh and bench_init, not run).
#
# It runs a plain Redis Cluster of 6 redis-server nodes (3 masters + 3
# replicas, created by redis-cli --cluster create) on free ports inside the
# benchmark's run directory, kills the master owning a key with
# tests/bench/failover_probe.py, which reports the time from the kill -9 to
# the first successful write to the key, and restores full redundancy
# (the killed node is restarted and rejoins as a replica) before the next
# kill. The same probe measures redmesh, so both numbers mean the same thing.
#
# Every process is started with bench_spawn, so lib.sh's cleanup trap stops
# whatever is still running on exit; official_run also stops its 6 nodes
# itself when done. Functions that start processes must run in the
# benchmark's shell, never inside $(...): a subshell would lose the state
# below and could not reap the killed node.
#
# Contract (what the caller reads):
#   official_run NODE_TIMEOUT_MS KILLS
#     prints one summary line; sets OFFICIAL_MS (per-kill ms, in kill order),
#     OFFICIAL_MEDIAN_MS, OFFICIAL_MAX_MS and OFFICIAL_TSV (a file
#     "kill<TAB>key<TAB>elapsed_ms<TAB>attempts<TAB>killed<TAB>promoted<TAB>read_back",
#     one line per kill; killed/promoted are HOST:PORT, read_back "ok" or
#     "earlier-attempt", see the probe).
#   failover_stats MS...        sets FAILOVER_MEDIAN and FAILOVER_MAX.
#   failover_python             sets FAILOVER_PY (python with redis-py).
#   FAILOVER_PROBE              path of the probe.

FAILOVER_PROBE="$ROOT/tests/bench/failover_probe.py"
FAILOVER_PY=""

# failover_python: sets FAILOVER_PY to the venv python with redis-py, creating
# the venv the way tests/run.sh does when it is missing (same path, same pin,
# so the e2e tests and the benchmark share it).
failover_python() {
  local env="$ROOT/target/pyenv"
  if [ ! -x "$env/bin/python" ] || ! "$env/bin/python" -c 'import redis' 2>/dev/null; then
    say "preparing redis-py in $env"
    if ! python3 -m venv "$env" 2>/dev/null; then
      install_packages python3-venv # Debian's python3 ships venv separately
      python3 -m venv "$env"
    fi
    "$env/bin/pip" install --quiet --disable-pip-version-check 'redis==8.1.0' ||
      die "could not install redis-py into $env (needs network access to PyPI)"
  fi
  FAILOVER_PY="$env/bin/python"
}

# failover_stats MS...: sets FAILOVER_MEDIAN and FAILOVER_MAX (ms, one
# decimal) of the given values.
FAILOVER_MEDIAN="" FAILOVER_MAX=""
failover_stats() {
  [ $# -gt 0 ] || die "failover_stats: no values"
  local out
  # (Assigned first: a failure inside a here-string's $(...) would not stop the script.)
  out=$(python3 -c '
import statistics, sys
v = [float(x) for x in sys.argv[1:]]
print("%.1f %.1f" % (statistics.median(v), max(v)))' "$@")
  read -r FAILOVER_MEDIAN FAILOVER_MAX <<<"$out"
}

# --- the cluster's state -------------------------------------------------------

OFFICIAL_TIMEOUT=""   # cluster-node-timeout (ms) of the running cluster
OFFICIAL_PORTS=()     # client port of node i (0..5)
OFFICIAL_BUS=()       # cluster bus port of node i
OFFICIAL_NAMES=()     # current bench_spawn name of node i (changes on restart)
OFFICIAL_RESTARTS=0   # restart counter, for unique pidfile/log names
OFFICIAL_MS=()        # per-kill ms of the current (or last) official_run
OFFICIAL_MEDIAN_MS="" OFFICIAL_MAX_MS="" OFFICIAL_TSV=""
OFFICIAL_LAST_MS=""   # ms of the last official_measure_once
OFFICIAL_LAST_JSON="" # the probe's JSON report of it

# official_spawn I NAME: starts node I under bench_spawn name NAME (its
# directory is the node's, whatever its name after a restart).
official_spawn() {
  local i=$1 name=$2
  bench_cluster_node "$name" "$BENCH_DIR/official-$OFFICIAL_TIMEOUT-$i" "${OFFICIAL_PORTS[$i]}" \
    "${OFFICIAL_BUS[$i]}" --cluster-node-timeout "$OFFICIAL_TIMEOUT"
  OFFICIAL_NAMES[i]=$name
}

# official_seeds: "127.0.0.1:PORT,..." of all 6 nodes (reads state only, so
# it may run in $(...)).
official_seeds() {
  local p out=""
  for p in "${OFFICIAL_PORTS[@]}"; do out+="${out:+,}127.0.0.1:$p"; done
  echo "$out"
}

# official_node_ok PORT: the node at PORT sees a healthy cluster: state ok,
# 6 nodes all connected and none flagged fail / fail? / handshake / noaddr,
# 3 masters serving slots and 3 replicas; if it is a replica itself, its
# replication link is up and not syncing (a replica still loading the data
# would not be a fair failover candidate).
official_node_ok() {
  local port=$1 info
  redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
  redis-cli -p "$port" cluster nodes 2>/dev/null | awk '
    NF >= 8 {
      n++
      if ($3 ~ /fail|handshake|noaddr/ || $8 != "connected") bad++
      if ($3 ~ /master/ && NF >= 9) masters++
      if ($3 ~ /slave/) replicas++
    }
    END { exit !(n == 6 && bad == 0 && masters == 3 && replicas == 3) }' || return 1
  info=$(redis-cli -p "$port" info replication 2>/dev/null) || return 1
  if grep -q '^role:slave' <<<"$info"; then
    grep -q '^master_link_status:up' <<<"$info" && grep -q '^master_sync_in_progress:0' <<<"$info"
  fi
}

# official_healthy: every node sees a healthy cluster (full redundancy).
official_healthy() {
  local p
  for p in "${OFFICIAL_PORTS[@]}"; do official_node_ok "$p" || return 1; done
}

# official_wait_healthy WHAT: waits (readiness, no fixed sleep) until the
# cluster is healthy. The bound grows with the node timeout: a restarted node
# is only trusted again after the others have seen it answer.
official_wait_healthy() {
  wait_for "official cluster (node-timeout $OFFICIAL_TIMEOUT ms) $1" \
    $((60 + 3 * OFFICIAL_TIMEOUT / 1000)) official_healthy
}

# official_owner KEY: prints "INDEX SLOT" of the master serving KEY's slot,
# asked at node 0 (all nodes agree once official_healthy holds).
official_owner() {
  local key=$1 slot port i
  slot=$(redis-cli -p "${OFFICIAL_PORTS[0]}" cluster keyslot "$key")
  [[ "$slot" =~ ^[0-9]+$ ]] || die "CLUSTER KEYSLOT $key answered: $slot"
  port=$(redis-cli -p "${OFFICIAL_PORTS[0]}" cluster nodes | awk -v slot="$slot" '
    $3 ~ /master/ && $3 !~ /fail/ {
      for (f = 9; f <= NF; f++) {
        if ($f ~ /^\[/) continue # slots being migrated, not owned
        n = split($f, r, "-")
        lo = r[1]; hi = (n == 2 ? r[2] : r[1])
        if (slot + 0 >= lo + 0 && slot + 0 <= hi + 0) {
          split($2, a, "@"); n = split(a[1], hp, ":"); print hp[n]; exit
        }
      }
    }')
  [ -n "$port" ] || die "no master serves slot $slot of $key"
  for i in "${!OFFICIAL_PORTS[@]}"; do
    if [ "${OFFICIAL_PORTS[$i]}" = "$port" ]; then
      echo "$i $slot"
      return 0
    fi
  done
  die "slot $slot is served by port $port, which is not one of the official nodes"
}

# --- start, measure, stop -------------------------------------------------------

# official_start NODE_TIMEOUT_MS: starts 6 cluster-mode nodes on free ports,
# creates the cluster (3 masters, 1 replica each) and waits until it is
# healthy on every node.
official_start() {
  local timeout=$1 i ports=()
  [[ "$timeout" =~ ^[0-9]+$ ]] || die "official_start: bad node timeout '$timeout'"
  [ ${#OFFICIAL_PORTS[@]} -eq 0 ] || die "official_start: an official cluster is already running"
  OFFICIAL_TIMEOUT=$timeout
  bench_free_ports 12
  OFFICIAL_PORTS=("${FREE_PORTS[@]:0:6}")
  OFFICIAL_BUS=("${FREE_PORTS[@]:6:6}")
  OFFICIAL_NAMES=()
  for i in 0 1 2 3 4 5; do
    official_spawn "$i" "official-$timeout-$i"
  done
  for i in 0 1 2 3 4 5; do
    wait_for "official node ${OFFICIAL_PORTS[$i]}" 20 redis_ping "${OFFICIAL_PORTS[$i]}"
    ports+=("127.0.0.1:${OFFICIAL_PORTS[$i]}")
  done
  # redis-cli assigns slots, pairs replicas with masters (warning that they
  # share a host, which is the point of a one-machine benchmark), joins the
  # nodes (CLUSTER MEET with each node's own bus port) and waits for them.
  if ! redis-cli --cluster create "${ports[@]}" --cluster-replicas 1 --cluster-yes \
    >"$LOGS/official-$timeout-create.log" 2>&1; then
    tail -n 20 "$LOGS/official-$timeout-create.log" >&2
    die "redis-cli --cluster create failed; log: $LOGS/official-$timeout-create.log"
  fi
  official_wait_healthy "to form"
}

# official_gone PID: the process has exited (a zombie not yet reaped by
# this shell counts as gone: it runs no more, and its pid is not reused
# before it is reaped).
official_gone() {
  local stat
  kill -0 "$1" 2>/dev/null || return 0
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  [ "${stat%% *}" = Z ]
}

# official_measure_once KEY: kills the master serving KEY with the probe
# (which reports the time to the first successful write to KEY), then
# restarts the killed node on its port with its config file and waits until
# the cluster is healthy again, the restarted node a connected, in-sync
# replica. Sets OFFICIAL_LAST_MS and OFFICIAL_LAST_JSON, appends the ms to
# OFFICIAL_MS and a line to OFFICIAL_TSV when that is set.
official_measure_once() {
  local key=$1 owner idx slot name pid out rc=0 fields
  [ -n "$FAILOVER_PY" ] || failover_python
  official_healthy || die "official_measure_once: the cluster is not healthy"
  # (Assigned first: a failure inside a here-string's $(...) would not stop the script.)
  owner=$(official_owner "$key")
  read -r idx slot <<<"$owner"
  name=${OFFICIAL_NAMES[$idx]}
  pid=$(bench_pid "$name")
  [ "$(redis-cli -p "${OFFICIAL_PORTS[$idx]}" role | head -1)" = master ] ||
    die "node ${OFFICIAL_PORTS[$idx]} serves slot $slot but is not a master"
  out="$BENCH_DIR/$name-kill.json"
  # Out of the job table, so bash does not print "Killed ..." for it when
  # the probe kills it (bash still reaps it; the pidfile is removed below).
  disown "$pid" 2>/dev/null || true
  # The probe gets every node as a seed, the victim included (a client
  # configured before the failure would list it too).
  "$FAILOVER_PY" "$FAILOVER_PROBE" --seeds "$(official_seeds)" --key "$key" \
    --kill-pids "$pid" --timeout-s $((30 + 3 * OFFICIAL_TIMEOUT / 1000)) --json >"$out" || rc=$?
  # Drop the victim's pidfile at once: a later process could be given the
  # same pid, and the cleanup trap must never signal that one. (If the probe
  # failed before killing it, it stays, and the trap stops it.)
  if official_gone "$pid"; then rm -f "$PIDS/$name.pid"; fi
  [ "$rc" -eq 0 ] || die "failover probe failed (exit $rc) on $key, slot $slot, node ${OFFICIAL_PORTS[$idx]}; report: $(cat "$out")"
  wait_for "node ${OFFICIAL_PORTS[$idx]} (pid $pid) to die" 5 official_gone "$pid"
  rm -f "$PIDS/$name.pid"
  OFFICIAL_LAST_JSON=$(cat "$out")
  fields=$(python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d["elapsed_ms"], d["attempts"], d["owner_before"], d["owner_after"], d["read_back"])' <"$out")
  local ms attempts before after read_back
  read -r ms attempts before after read_back <<<"$fields"
  # The write must have landed on the promoted replica, not on the victim.
  [ "$after" != "$before" ] || die "the write after the kill went to the killed node $before?"
  OFFICIAL_LAST_MS=$ms
  OFFICIAL_MS+=("$ms")
  if [ -n "$OFFICIAL_TSV" ]; then
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "${#OFFICIAL_MS[@]}" "$key" "$ms" "$attempts" "$before" "$after" "$read_back" >>"$OFFICIAL_TSV"
  fi

  # Full redundancy again: the restarted node finds in its nodes.conf that it
  # was a master, learns from the others that its slots have a newer owner
  # and turns into that node's replica.
  OFFICIAL_RESTARTS=$((OFFICIAL_RESTARTS + 1))
  official_spawn "$idx" "official-$OFFICIAL_TIMEOUT-$idx-r$OFFICIAL_RESTARTS"
  wait_for "restarted official node ${OFFICIAL_PORTS[$idx]}" 20 redis_ping "${OFFICIAL_PORTS[$idx]}"
  official_wait_healthy "after restarting node ${OFFICIAL_PORTS[$idx]}"
  [ "$(redis-cli -p "${OFFICIAL_PORTS[$idx]}" role | head -1)" = slave ] ||
    die "restarted node ${OFFICIAL_PORTS[$idx]} did not rejoin as a replica"
}

# official_stop: stops the nodes of the running official cluster still
# started (bench_stop) and forgets them.
official_stop() {
  local name running=()
  for name in "${OFFICIAL_NAMES[@]}"; do
    [ -f "$PIDS/$name.pid" ] && running+=("$name")
  done
  [ ${#running[@]} -eq 0 ] || bench_stop "${running[@]}"
  OFFICIAL_PORTS=() OFFICIAL_BUS=() OFFICIAL_NAMES=()
}

# official_run NODE_TIMEOUT_MS KILLS: starts an official cluster with that
# node timeout, measures KILLS failovers (each on a different key, so the
# kills spread over the shards), stops the cluster and prints a summary
# line. Sets OFFICIAL_MS, OFFICIAL_MEDIAN_MS, OFFICIAL_MAX_MS, OFFICIAL_TSV.
official_run() {
  local timeout=$1 kills=$2 k
  [[ "$kills" =~ ^[1-9][0-9]*$ ]] || die "official_run: bad kill count '$kills'"
  failover_python
  OFFICIAL_MS=()
  OFFICIAL_TSV="$BENCH_DIR/official-$timeout.tsv"
  : >"$OFFICIAL_TSV"
  official_start "$timeout"
  for k in $(seq "$kills"); do
    official_measure_once "failover:official:$timeout:$k"
    printf '    official, node-timeout %s ms, kill %s/%s: %s ms\n' "$timeout" "$k" "$kills" "$OFFICIAL_LAST_MS"
  done
  official_stop
  failover_stats "${OFFICIAL_MS[@]}"
  OFFICIAL_MEDIAN_MS=$FAILOVER_MEDIAN OFFICIAL_MAX_MS=$FAILOVER_MAX
  printf 'official Redis Cluster (3 masters + 3 replicas, cluster-node-timeout %s ms): %s kills, median %s ms, max %s ms\n' \
    "$timeout" "$kills" "$OFFICIAL_MEDIAN_MS" "$OFFICIAL_MAX_MS"
}
