#!/usr/bin/env bash
# Failover benchmark: how long after kill -9 of a master can a cluster client
# write to the lost slots again, redmesh against the official Redis Cluster?
#
# redmesh: an isolated system (etcd, broker, 3 health-checkers, a
# coordinator, all with their default settings) runs a 2-chunk cluster
# (4 proxies, 8 redis-server nodes) with one free proxy per host in the pool.
# Each kill picks a fresh key, finds the proxy whose master serves it and
# hands the probe (tests/bench/failover_probe.py, redis-py RedisCluster) the
# pids of that proxy and both its Redis nodes: a whole "host" dies. The probe
# kills them and reports the time to its first successful SET of the key.
# Before the next kill the system must be whole again: the failed proxy
# replaced from the pool, every replica in sync, no degraded cluster; then
# the killed proxy is restarted empty and re-registered, which returns it to
# the pool, and all three checkers must see it healthy.
#
# Official: the same probe on a 3-master + 3-replica Redis Cluster with the
# default cluster-node-timeout (15000 ms) and with 1000 ms
# (tests/bench/failover_official.sh).
#
# Reported: median and max per system and the ratios official / redmesh.
# Goal (informational; the exit status only reflects errors): redmesh median
# < 1 s and max < 2 s.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/failover_official.sh"

KILLS=${REDMESH_BENCH_KILLS:-5}
[[ "$KILLS" =~ ^[1-9][0-9]*$ ]] || die "REDMESH_BENCH_KILLS must be a positive integer, not '$KILLS'"
CLUSTER=fo
CHECKERS=3

started=$SECONDS
bench_build # first: a failed build leaves nothing to clean up
bench_init
failover_python

bench_header "redis-py $("$FAILOVER_PY" -c 'import redis; print(redis.__version__)')"

# --- the redmesh system -------------------------------------------------------------
say "starting etcd, the broker and 6 proxies (12 redis-server nodes)"
bench_start_etcd
bench_start_broker
bench_start_chunk p1 p2
bench_start_chunk p3 p4
bench_start_chunk p5 p6
bench_create_cluster "$CLUSTER" 8

COORDINATOR_URL=""
CHECKER_URLS=()
bench_free_ports $((CHECKERS + 1))
for i in $(seq "$CHECKERS"); do
  port=${FREE_PORTS[$i]}
  CHECKER_URLS+=("http://127.0.0.1:$port")
  bench_spawn "checker-$i" "$BIN/redmesh-health-checker" --id "hc-$i" \
    --listen "127.0.0.1:$port" --etcd "$ETCD_URL"
done
COORDINATOR_URL="http://127.0.0.1:${FREE_PORTS[0]}"
bench_spawn coordinator "$BIN/redmesh-coordinator" --id co-1 \
  --listen "127.0.0.1:${FREE_PORTS[0]}" --etcd "$ETCD_URL"

# co ARGS...: redmeshctl against this run's coordinator.
co() { ctl --coordinator "$COORDINATOR_URL" "$@"; }

# coordinator_leads: the coordinator is elected and sees no degraded cluster.
coordinator_leads() {
  co --json coordinator status | python3 -c '
import json, sys
st = json.load(sys.stdin)
sys.exit(0 if st.get("isLeader") and not st.get("degradedClusters") else 1)'
}

# checkers_see_all_up [PROXY]: every checker reports every target (of PROXY,
# or of all 6 proxies) UP.
checkers_see_all_up() {
  local url want=$((6 * 4)) args=()
  if [ $# -eq 1 ]; then want=4 args=(--proxy "$1"); fi
  for url in "${CHECKER_URLS[@]}"; do
    ctl --json health report --checker "$url" "${args[@]}" | python3 -c '
import json, sys
targets = json.load(sys.stdin).get("targets", [])
ok = len(targets) == int(sys.argv[1]) and all(t.get("status") == "HEALTH_STATUS_UP" for t in targets)
sys.exit(0 if ok else 1)' "$want" || return 1
  done
}

# cluster_whole: no hole in the cluster, one replica per shard, every
# member allocated and serving, every replica node linked to its master and
# not syncing, and the coordinator sees nothing degraded.
cluster_whole() {
  local ports
  ports=$(cluster_json "$CLUSTER" | python3 -c '
import json, sys
d = json.load(sys.stdin)
c, proxies = d["cluster"], {p["spec"]["id"]: p for p in d["proxies"]}
members = [pid for ch in c["chunks"] for pid in ch["proxyIds"]]
if any(proxies.get(m, {}).get("state") != "PROXY_STATE_ALLOCATED" for m in members):
    sys.exit(1)
if any(len(s.get("replicas", [])) != 1 for s in c["shards"]):
    sys.exit(1)
for m in members:
    print("resp", proxies[m]["spec"]["respAddress"].rsplit(":", 1)[1])
for s in c["shards"]:
    r = s["replicas"][0]
    node = proxies[r["proxyId"]]["spec"]["redisNodes"][r.get("nodeIndex", 0)]
    print("replica", node.rsplit(":", 1)[1])') || return 1
  local kind port info
  while read -r kind port; do
    case $kind in
      resp) cluster_ok "$port" || return 1 ;;
      replica)
        info=$(redis-cli -p "$port" info replication 2>/dev/null) || return 1
        grep -q '^role:slave' <<<"$info" && grep -q '^master_link_status:up' <<<"$info" &&
          grep -q '^master_sync_in_progress:0' <<<"$info" || return 1
        ;;
    esac
  done <<<"$ports"
  coordinator_leads
}

# members_seeds: "127.0.0.1:PORT,..." of the cluster's current proxies.
members_seeds() {
  cluster_json "$CLUSTER" | python3 -c '
import json, sys
d = json.load(sys.stdin)
ids = [pid for ch in d["cluster"]["chunks"] for pid in ch["proxyIds"]]
print(",".join(p["spec"]["respAddress"] for p in d["proxies"] if p["spec"]["id"] in ids))'
}

# owner_of KEY: id of the proxy whose master serves KEY (asked with the
# same client library the probe uses).
owner_of() {
  local addr id
  addr=$("$FAILOVER_PY" - "$(members_seeds)" "$1" <<'PY'
import sys
from redis.cluster import ClusterNode, RedisCluster
seeds = [ClusterNode(h, int(p)) for h, p in (s.rsplit(":", 1) for s in sys.argv[1].split(","))]
rc = RedisCluster(startup_nodes=seeds)
print(rc.get_node_from_key(sys.argv[2]).port)
rc.close()
PY
  ) || die "could not find the owner of $1"
  for id in "${!PROXY_RESP[@]}"; do
    if [ "${PROXY_RESP[$id]}" = "$addr" ]; then
      echo "$id"
      return 0
    fi
  done
  die "key $1 is served from port $addr, which is no proxy of this run"
}

# host_of ID: the host the proxy is registered on.
host_of() { ctl --json proxy get "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["proxy"]["spec"]["host"])'; }

wait_for "a coordinator leader" 30 coordinator_leads
wait_for "verdicts of all $CHECKERS checkers on every proxy" 30 checkers_see_all_up
wait_for "cluster $CLUSTER to be whole" 60 cluster_whole

# --- redmesh: the kills ---------------------------------------------------------------
REDMESH_MS=()
for k in $(seq "$KILLS"); do
  bench_check_alive
  key="failover:redmesh:$k"
  victim=$(owner_of "$key")
  host=$(host_of "$victim")
  pids=() names=()
  read -r -a names <<<"${PROXY_NAMES[$victim]}"
  for name in "${names[@]}"; do
    pid=$(bench_pid "$name")
    pids+=("$pid")
    disown "$pid" 2>/dev/null || true # no "Killed" line from bash
  done
  out="$BENCH_DIR/redmesh-kill-$k.json"
  rc=0
  "$FAILOVER_PY" "$FAILOVER_PROBE" --seeds "$(members_seeds)" --key "$key" \
    --kill-pids "$(IFS=,; echo "${pids[*]}")" --timeout-s 30 --json >"$out" || rc=$?
  # Forget the killed processes' pidfiles at once, so the cleanup trap can
  # never signal a process that later gets one of their pids.
  for i in "${!names[@]}"; do
    if official_gone "${pids[$i]}"; then rm -f "$PIDS/${names[$i]}.pid"; fi
  done
  [ "$rc" -eq 0 ] || die "failover probe failed (exit $rc) on $key (proxy $victim); report: $(cat "$out")"
  for i in "${!names[@]}"; do
    wait_for "${names[$i]} (pid ${pids[$i]}) to die" 5 official_gone "${pids[$i]}"
    rm -f "$PIDS/${names[$i]}.pid"
  done
  read -r ms attempts read_back <<<"$(python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d["elapsed_ms"], d["attempts"], d["read_back"])' <"$out")"
  REDMESH_MS+=("$ms")
  printf '    redmesh, kill %s/%s (proxy %s and its 2 redis nodes): %s ms (%s attempts, read back %s)\n' \
    "$k" "$KILLS" "$victim" "$ms" "$attempts" "$read_back"

  # Whole again before the next kill: replaced from the pool, replicas in
  # sync; then the killed proxy comes back empty and re-enters the pool.
  wait_for "cluster $CLUSTER to be whole after kill $k" 60 cluster_whole
  bench_start_proxy "$victim" "$host"
  wait_for "all checkers to see the restarted $victim healthy" 30 checkers_see_all_up "$victim"
done
failover_stats "${REDMESH_MS[@]}"
REDMESH_MEDIAN=$FAILOVER_MEDIAN REDMESH_MAX=$FAILOVER_MAX
printf 'redmesh (2 chunks, 3 health-checkers, defaults): %s kills, median %s ms, max %s ms\n' \
  "$KILLS" "$REDMESH_MEDIAN" "$REDMESH_MAX"
events="$BENCH_DIR/events.txt"
co coordinator events --cluster "$CLUSTER" --recent 100 --no-follow >"$events" || true

# --- the official Redis Cluster ----------------------------------------------------------
official_run 1000 "$KILLS"
FAST_MEDIAN=$OFFICIAL_MEDIAN_MS FAST_MAX=$OFFICIAL_MAX_MS
official_run 15000 "$KILLS"
DEFAULT_MEDIAN=$OFFICIAL_MEDIAN_MS DEFAULT_MAX=$OFFICIAL_MAX_MS

# --- report ------------------------------------------------------------------------------
ratio() { python3 -c 'import sys; print("%.1f" % (float(sys.argv[1]) / float(sys.argv[2])))' "$1" "$2"; }
verdict() {
  python3 -c 'import sys; print("met" if float(sys.argv[1]) < float(sys.argv[2]) else "NOT met")' "$1" "$2"
}
echo
echo "time from kill -9 to the first successful write to the lost slots ($KILLS kills each)"
printf '%-48s %10s %10s\n' "" "median ms" "max ms"
printf '%-48s %10s %10s\n' "redmesh" "$REDMESH_MEDIAN" "$REDMESH_MAX"
printf '%-48s %10s %10s\n' "official, cluster-node-timeout 1000" "$FAST_MEDIAN" "$FAST_MAX"
printf '%-48s %10s %10s\n' "official, cluster-node-timeout 15000 (default)" "$DEFAULT_MEDIAN" "$DEFAULT_MAX"
echo
echo "official / redmesh (higher: redmesh recovers faster)"
printf '  node-timeout 1000:  median %sx  max %sx\n' "$(ratio "$FAST_MEDIAN" "$REDMESH_MEDIAN")" "$(ratio "$FAST_MAX" "$REDMESH_MAX")"
printf '  node-timeout 15000: median %sx  max %sx\n' "$(ratio "$DEFAULT_MEDIAN" "$REDMESH_MEDIAN")" "$(ratio "$DEFAULT_MAX" "$REDMESH_MAX")"
echo
printf 'goal: redmesh median < 1000 ms: %s; max < 2000 ms: %s\n' \
  "$(verdict "$REDMESH_MEDIAN" 1000)" "$(verdict "$REDMESH_MAX" 2000)"
echo
echo "redmesh coordinator's decisions (detection to completion in took=):"
sed 's/^/  /' "$events"
echo "finished in $((SECONDS - started)) s"
bench_finish
