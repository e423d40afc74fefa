# shellcheck shell=bash
# Variables set here (PROXY_RESP, CLK_TCK, STATE, ...) are read by the scenarios:
# shellcheck disable=SC2034

# Shared helpers for the benchmarks (sourced by tests/bench/<scenario>.sh, not run).
#
# A benchmark runs its own, isolated redmesh system: etcd, a broker, proxies
# and redis-server nodes on FREE ports (never the local system's fixed ports
# 2379, 7001.., 7400, so a system started by deploy/local/up.sh keeps
# running untouched), with all state, logs and pidfiles in a fresh mktemp
# directory. Every process started here has a pidfile; a trap stops exactly
# those processes on exit, error, Ctrl-C or TERM, and nothing else.

set -euo pipefail

# say, die, ensure_packages, wait_for, port_open come from the local-system
# helpers so both sets of scripts behave alike. That file points STATE, PIDS
# and LOGS at the local system's ./.redmesh; bench_init re-points them at the
# benchmark's own directory before anything is started.
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../../deploy/local" && pwd)/lib.sh"

BIN="$ROOT/target/release"

# The redmesh binaries read REDMESH_* variables (REDMESH_ETCD, REDMESH_BROKERS,
# REDMESH_METRICS_LISTEN, ...) as defaults. One exported for the local system
# would silently point the benchmark's processes at it, so drop them all;
# REDMESH_BENCH_* are this harness's own settings and stay.
for _var in $(compgen -e | grep '^REDMESH_' | grep -v '^REDMESH_BENCH_' || true); do
  unset "$_var"
done
unset _var

BENCH_DIR=""        # mktemp directory of this run (state, logs, pidfiles)
BENCH_PORTS=" "     # ports handed out so far, so no port is given twice
BENCH_OK=0          # set to 1 by bench_finish; failed runs keep their logs

# bench_init: creates the run directory and installs the cleanup trap. Call
# once, before starting anything.
bench_init() {
  ensure_packages redis-server:redis-server redis-cli:redis-tools \
    redis-benchmark:redis-tools etcd:etcd-server etcdctl:etcd-client python3:python3
  BENCH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/redmesh-bench.XXXXXX")
  STATE=$BENCH_DIR
  PIDS=$BENCH_DIR/pids
  LOGS=$BENCH_DIR/logs
  mkdir -p "$PIDS" "$LOGS"
  # EXIT covers normal ends and `set -e` failures; INT/TERM are turned into
  # an exit so the EXIT trap runs exactly once.
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# bench_build: builds the release binaries (a no-op when they are current)
# so the benchmark measures the code in the tree. REDMESH_BENCH_BUILD=0 uses
# the binaries as they are.
bench_build() {
  if [ "${REDMESH_BENCH_BUILD:-1}" != 0 ]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs) first"
    say "building release binaries"
    (cd "$ROOT" && cargo build --release --bins --quiet)
  fi
  for b in redmesh-broker redmesh-proxy redmesh-health-checker redmesh-coordinator redmesh-migrator redmeshctl; do
    [ -x "$BIN/$b" ] || die "$BIN/$b is missing; build with: cargo build --release --bins"
  done
}

# bench_cleanup: stops every process this run started (TERM, then KILL after
# 10 s), by the pids in its pidfiles only. Removes the run directory after a
# successful run; keeps it (logs!) after a failure.
bench_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$BENCH_DIR" ] && [ -d "$PIDS" ] || exit "$rc"
  local f names=()
  for f in "$PIDS"/*.pid; do
    [ -f "$f" ] && names+=("$(basename "$f" .pid)")
  done
  [ ${#names[@]} -eq 0 ] || bench_stop "${names[@]}"
  if [ "$rc" -eq 0 ] && [ "$BENCH_OK" = 1 ] && [ "${REDMESH_BENCH_KEEP:-0}" != 1 ]; then
    rm -rf "$BENCH_DIR"
  else
    printf 'benchmark state and logs kept in %s\n' "$BENCH_DIR" >&2
  fi
  exit "$rc"
}

# bench_finish: marks the run successful (its directory is then removed).
bench_finish() { BENCH_OK=1; }

# bench_free_ports N: sets FREE_PORTS to N distinct free TCP ports on
# 127.0.0.1. The kernel picks them (bind to port 0, all sockets held open
# together so it cannot hand out one twice); they come from the ephemeral
# range, far from the local system's fixed ports (2379-2380, 7001-7420,
# 9400-9434), and anything below 10000 is refused anyway. It sets a variable
# rather than printing because a $(...) subshell would lose BENCH_PORTS.
FREE_PORTS=()
bench_free_ports() {
  local n=$1 port
  FREE_PORTS=()
  while [ ${#FREE_PORTS[@]} -lt "$n" ]; do
    for port in $(python3 - "$n" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
    ); do
      [ ${#FREE_PORTS[@]} -lt "$n" ] || break
      [ "$port" -gt 10000 ] || continue
      case "$BENCH_PORTS" in *" $port "*) continue ;; esac
      BENCH_PORTS+="$port "
      FREE_PORTS+=("$port")
    done
  done
}

# bench_spawn NAME COMMAND...: runs COMMAND in the background with its log in
# $LOGS/NAME.log and its pid in $PIDS/NAME.pid (for cleanup and liveness).
bench_spawn() {
  local name=$1; shift
  [ ! -e "$PIDS/$name.pid" ] || die "bench_spawn: $name already started"
  nohup "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}

# bench_stop NAME...: stops started processes (TERM to all, then KILL to
# any still running after 10 s) and forgets them, so bench_check_alive no
# longer expects them.
bench_stop() {
  local name pid deadline=$((SECONDS + 10)) pids=()
  for name in "$@"; do
    pid=$(cat "$PIDS/$name.pid")
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
  done
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true # reap: they are children of this shell
  done
  for name in "$@"; do rm -f "$PIDS/$name.pid"; done
}

# bench_pid NAME: pid of a started process.
bench_pid() { cat "$PIDS/$1.pid"; }

# bench_check_alive: fails (with the log tail) if any started process died.
# Benchmarks call it between measurements: a number measured while a piece
# of the system was down would be meaningless.
bench_check_alive() {
  local f name
  for f in "$PIDS"/*.pid; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .pid)
    if ! kill -0 "$(cat "$f")" 2>/dev/null; then
      tail -n 20 "$LOGS/$name.log" >&2 || true
      die "$name (pid $(cat "$f")) died; log: $LOGS/$name.log"
    fi
  done
}

# --- the system -------------------------------------------------------------

ETCD_URL=""
BROKER_URL=""

# bench_start_etcd: a single-member etcd with its data under the run dir.
bench_start_etcd() {
  bench_free_ports 2
  local client=${FREE_PORTS[0]} peer=${FREE_PORTS[1]}
  ETCD_URL="http://127.0.0.1:$client"
  bench_spawn etcd etcd --name redmesh-bench --data-dir "$BENCH_DIR/etcd" \
    --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "redmesh-bench=http://127.0.0.1:$peer" --initial-cluster-state new \
    --logger zap --log-outputs stderr --log-level warn
  wait_for etcd 30 etcdctl --endpoints "$ETCD_URL" endpoint health
}

# bench_start_broker [ARGS...]: the broker on a free port, following this
# run's etcd; ARGS are added to its command line. Its migrator is this run's
# (bench_start_migrator first) or, when none runs, an address nobody serves,
# never the local system's default one.
bench_start_broker() {
  bench_free_ports 1
  local port=${FREE_PORTS[0]}
  BROKER_URL="http://127.0.0.1:$port"
  bench_spawn broker "$BIN/redmesh-broker" --listen "127.0.0.1:$port" --etcd "$ETCD_URL" \
    --migrator "${MIGRATOR_URL:-127.0.0.1:1}" "$@"
  wait_for broker 30 ctl proxy list
}

MIGRATOR_URL=""

# bench_start_migrator [ARGS...]: the migrator on a free port, following this
# run's etcd (start it before the broker, which forwards scale requests to it).
bench_start_migrator() {
  bench_free_ports 1
  local port=${FREE_PORTS[0]}
  MIGRATOR_URL="127.0.0.1:$port"
  bench_spawn migrator "$BIN/redmesh-migrator" --id bench-migrator --listen "$MIGRATOR_URL" \
    --etcd "$ETCD_URL" "$@"
  wait_for migrator 30 port_open "$port"
}

# bench_header [EXTRA]: prints the machine, Redis version, load, commit and
# run directory, so every report says what it was measured on. EXTRA (e.g.
# a client library's version) is added to the first line.
bench_header() {
  local cpu_model
  cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  say "machine: $(nproc) CPUs ($cpu_model), $(redis-server --version | grep -o 'v=[^ ]*')${1:+, $1}, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  # (The commit is HEAD only: the tree may hold uncommitted changes, hence
  # the binary's build time.)
  echo "    commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), proxy binary built $(date -u -r "$BIN/redmesh-proxy" '+%H:%M UTC'), run $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "    state and logs in $BENCH_DIR"
}

# ctl ARGS...: redmeshctl against this run's broker (and migrator, if any).
ctl() { "$BIN/redmeshctl" --broker "$BROKER_URL" ${MIGRATOR_URL:+--migrator "http://$MIGRATOR_URL"} "$@"; }

# bench_redis_server NAME DIR PORT [ARGS...]: a redis-server started as NAME,
# its files in DIR, without persistence (--save '' --appendonly no: a
# benchmark must not measure fsync or fork); ARGS are added.
bench_redis_server() {
  local name=$1 dir=$2 port=$3
  shift 3
  mkdir -p "$dir"
  bench_spawn "$name" redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" \
    --save '' --appendonly no --daemonize no "$@"
}

# bench_start_redis NAME PORT: a plain redis-server in $BENCH_DIR/NAME.
bench_start_redis() { bench_redis_server "$1" "$BENCH_DIR/$1" "$2"; }

# bench_cluster_node NAME DIR PORT BUS [ARGS...]: a cluster-mode
# redis-server (an official Redis Cluster's node) with its cluster config
# file in DIR from the start (so a restart rejoins with its node id). The
# bus port is set explicitly (cluster-port, Redis >= 7.0) rather than left at
# port+10000: free ports come from the ephemeral range, where port+10000 may
# be taken or above 65535.
bench_cluster_node() {
  local name=$1 dir=$2 port=$3 bus=$4
  shift 4
  bench_redis_server "$name" "$dir" "$port" --cluster-enabled yes --cluster-port "$bus" \
    --cluster-config-file "$dir/nodes.conf" "$@"
}

# redis_ping PORT: the server at PORT answers PONG (redis-cli exits 0 on
# some error replies, so the reply itself is checked).
redis_ping() { [ "$(redis-cli -p "$1" ping 2>/dev/null)" = PONG ]; }

# Ports of the started proxies, and the bench_spawn names of their current
# processes (proxy, redis 0, redis 1), by proxy id.
declare -A PROXY_RESP=() PROXY_ADMIN=() PROXY_REDIS=() PROXY_NAMES=()

# bench_start_proxy ID HOST: a proxy with its two redis-server nodes, all on
# free ports, registered on HOST (a failure domain name). Called again for an
# ID whose processes were killed, it restarts them on the same ports (the
# nodes empty, under new pidfile names) and registers the proxy again, which
# returns a failed proxy to the free pool.
BENCH_RESTARTS=0
bench_start_proxy() {
  local id=$1 host=$2 resp admin r1 r2 tag=""
  if [ -n "${PROXY_RESP[$id]:-}" ]; then
    resp=${PROXY_RESP[$id]} admin=${PROXY_ADMIN[$id]}
    read -r r1 r2 <<<"${PROXY_REDIS[$id]}"
    BENCH_RESTARTS=$((BENCH_RESTARTS + 1))
    tag="-r$BENCH_RESTARTS"
  else
    bench_free_ports 4
    read -r resp admin r1 r2 <<<"${FREE_PORTS[*]}"
  fi
  PROXY_NAMES[$id]="proxy-$id$tag redis-$id-0$tag redis-$id-1$tag"
  bench_start_redis "redis-$id-0$tag" "$r1"
  bench_start_redis "redis-$id-1$tag" "$r2"
  wait_for "redis $r1" 20 redis_ping "$r1"
  wait_for "redis $r2" 20 redis_ping "$r2"
  bench_spawn "proxy-$id$tag" "$BIN/redmesh-proxy" --id "$id" --listen "127.0.0.1:$resp" \
    --admin-listen "127.0.0.1:$admin" --broker "$BROKER_URL" \
    --threads "${REDMESH_BENCH_PROXY_THREADS:-0}"
  wait_for "proxy $id" 20 redis_ping "$resp"
  ctl proxy register --id "$id" --resp "127.0.0.1:$resp" --admin "127.0.0.1:$admin" \
    --host "$host" --redis "127.0.0.1:$r1,127.0.0.1:$r2" >/dev/null
  PROXY_RESP[$id]=$resp
  PROXY_ADMIN[$id]=$admin
  PROXY_REDIS[$id]="$r1 $r2"
}

# bench_start_chunk ID_A ID_B: one chunk: two proxies registered on hosts
# host-a and host-b, each with two redis-server nodes, all on free ports.
bench_start_chunk() {
  bench_start_proxy "$1" host-a
  bench_start_proxy "$2" host-b
}

# cluster_ok PORT: the proxy at PORT reports cluster_state:ok.
cluster_ok() { redis-cli -p "$1" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }

# bench_create_cluster NAME NODES: creates the cluster and waits until every
# proxy of it serves (cluster_state:ok).
bench_create_cluster() {
  local name=$1 nodes=$2 port
  ctl cluster create "$name" --nodes "$nodes" >/dev/null
  for port in $(cluster_json "$name" | python3 -c '
import json, sys
for p in json.load(sys.stdin)["proxies"]:
    print(p["spec"]["respAddress"].rsplit(":", 1)[1])'); do
    wait_for "cluster $name on proxy port $port" 30 cluster_ok "$port"
  done
}

# cluster_json NAME: the broker's JSON view of the cluster.
cluster_json() { ctl --json cluster get "$1"; }

# master_port CLUSTER PROXY_ID: port of the Redis node that is the master of
# the shard PROXY_ID owns (from the cluster's shards, not from a guess about
# node order).
master_port() {
  cluster_json "$1" | python3 -c '
import json, sys
d, pid = json.load(sys.stdin), sys.argv[1]
for s in d["cluster"]["shards"] if "cluster" in d else d["shards"]:
    m = s["master"]
    if m["proxyId"] == pid:
        idx = m.get("nodeIndex", 0)
        for p in d["proxies"]:
            if p["spec"]["id"] == pid:
                print(p["spec"]["redisNodes"][idx].rsplit(":", 1)[1])
                sys.exit(0)
sys.exit("no shard mastered by " + pid)' "$2"
}

# --- measurement helpers ------------------------------------------------------

CLK_TCK=$(getconf CLK_TCK)

# proc_cpu_ticks PID: user+system CPU time of a process (all threads), in
# clock ticks, from /proc/PID/stat (fields 14 and 15; the command name in
# field 2 is skipped by cutting after its closing parenthesis).
proc_cpu_ticks() {
  local line rest
  read -r line 2>/dev/null <"/proc/$1/stat" || die "process $1 is gone"
  rest=${line##*) }
  # shellcheck disable=SC2086
  set -- $rest
  echo $(( ${12} + ${13} ))
}

# machine_cpu: "busy total" jiffies of all CPUs from /proc/stat, to compute
# how saturated the machine was during a measurement.
machine_cpu() {
  local _cpu user nice sys idle iowait irq softirq steal _rest
  read -r _cpu user nice sys idle iowait irq softirq steal _rest </proc/stat
  echo "$((user + nice + sys + irq + softirq + steal)) $((user + nice + sys + idle + iowait + irq + softirq + steal))"
}
