#!/usr/bin/env bash
# Proxy benchmark: what does going through a redmesh proxy cost, compared
# with talking to the same Redis node directly?
#
# An isolated system (etcd, broker, one chunk: 2 proxies, 4 redis-server
# nodes) runs a 4-node cluster. All benchmark keys share one hash tag whose
# slot proxy A owns, so every request through proxy A is served by its local
# master M, and "direct" and "proxy" runs reach the very same redis-server.
# redis-benchmark (50 clients) runs SET, GET, MSET (10 keys) and LPUSH with
# -P 1 and -P 16, against M and against proxy A.
#
# The machine is shared and noisy, so absolute numbers mean little: each
# result is the ratio proxy/direct of runs made back to back. Per command and
# pipeline depth: one warm-up run of each (also used to size the measured
# runs to REDMESH_BENCH_SECONDS each), then 3 pairs, alternating which side
# goes first (D P, P D, D P) so a slow drift of the machine's load does not
# favour one side; reported: the medians.
#
# Goals (informational; the exit status only reflects errors):
#   pipelined (-P 16) throughput >= 0.9 x direct
#   unpipelined (-P 1) p99 latency overhead <= 100 us
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CLIENTS=50
KEYSPACE=100000           # -r: keys {tag}key:000000000000 .. 000000099999
VALUE=$(printf 'x%.0s' {1..32}) # 32-byte values
SECS=${REDMESH_BENCH_SECONDS:-2.5}
REPS=${REDMESH_BENCH_REPS:-3}
COMMANDS=(SET GET MSET LPUSH)
PIPELINES=(1 16)

started=$SECONDS
bench_build # first: a failed build leaves nothing to clean up
bench_init

# --- the machine, for the record ------------------------------------------------
bench_header
echo "    proxy runtime threads: ${REDMESH_BENCH_PROXY_THREADS:-0} (0: one per CPU; REDMESH_BENCH_PROXY_THREADS)"
if [ "$(nproc)" -le 2 ]; then
  echo "    note: with $(nproc) CPUs, redis-benchmark, redis-server and the proxy compete for CPU;"
  echo "          the proxy runs add a process that the direct runs do not have."
fi

# --- the system ----------------------------------------------------------------
say "starting an isolated system: etcd, broker, 1 chunk (2 proxies, 4 redis-server)"
bench_start_etcd
bench_start_broker
bench_start_chunk bench-a bench-b
bench_create_cluster bench 4
A=${PROXY_RESP[bench-a]}
B=${PROXY_RESP[bench-b]}
M=$(master_port bench bench-a)
read -r a0 _ <<<"${PROXY_REDIS[bench-a]}"
M_NAME=$([ "$M" = "$a0" ] && echo redis-bench-a-0 || echo redis-bench-a-1)
[ "$(redis-cli -p "$M" role | head -1)" = master ] || die "node $M is not a master"
PROXY_PID=$(bench_pid proxy-bench-a)
M_PID=$(bench_pid "$M_NAME")
echo "    proxy A 127.0.0.1:$A (pid $PROXY_PID), its master M 127.0.0.1:$M (pid $M_PID), proxy B 127.0.0.1:$B"

# --- a hash tag owned by proxy A ------------------------------------------------
# slot_owner_port PORT SLOT: port of the master CLUSTER SLOTS (asked at proxy
# PORT) names for SLOT.
slot_owner_port() {
  redis-cli -2 -p "$1" --json cluster slots | python3 -c '
import json, sys
slot = int(sys.argv[1])
for r in json.load(sys.stdin):
    if r[0] <= slot <= r[1]:
        print(r[2][1]); sys.exit(0)
sys.exit("slot %d is not covered by CLUSTER SLOTS" % slot)' "$2"
}
TAG="" OTHER_TAG=""
for i in $(seq 0 99); do
  slot=$(redis-cli -p "$A" cluster keyslot "{bench$i}key")
  [[ "$slot" =~ ^[0-9]+$ ]] || die "CLUSTER KEYSLOT through proxy A answered: $slot"
  owner=$(slot_owner_port "$A" "$slot")
  if [ "$owner" = "$A" ] && [ -z "$TAG" ]; then
    TAG="bench$i" TAG_SLOT=$slot
  elif [ "$owner" != "$A" ] && [ -z "$OTHER_TAG" ]; then
    OTHER_TAG="bench$i"
  fi
  [ -z "$TAG" ] || [ -z "$OTHER_TAG" ] || break
done
if [ -z "$TAG" ] || [ -z "$OTHER_TAG" ]; then die "no hash tag found for proxy A and for proxy B"; fi
# Both answers must agree with the routing: OK from A for its tag, MOVED for
# the other one (so the check above really tells A's slots apart).
[ "$(redis-cli -p "$A" set "{$TAG}probe" "$VALUE")" = OK ] || die "SET {$TAG}probe through proxy A failed"
[ "$(redis-cli -p "$M" get "{$TAG}probe")" = "$VALUE" ] || die "{$TAG}probe is not on M"
redis-cli -p "$A" set "{$OTHER_TAG}probe" x | grep -q "^MOVED [0-9]* 127.0.0.1:$B\$" ||
  die "proxy A did not answer MOVED to proxy B for {$OTHER_TAG}probe"
echo "    hash tag {$TAG}: slot $TAG_SLOT, owned by proxy A"

# Keys for GET exist before anything is measured: SET every key of the
# keyspace on M (redis-cli --pipe: one pass, error count checked).
say "loading $KEYSPACE keys {$TAG}key:* ($((${#VALUE}))-byte values) into M"
load=$(python3 - "$TAG" "$KEYSPACE" "$VALUE" <<'PY' | redis-cli -p "$M" --pipe
import sys
tag, n, v = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = sys.stdout
for i in range(n):
    k = "{%s}key:%012d" % (tag, i)
    out.write("*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v))
PY
)
echo "$load" | grep -q "errors: 0, replies: $KEYSPACE" || die "loading keys failed: $load"

# --- measurement ---------------------------------------------------------------
# command_args CMD: the redis-benchmark command line for CMD. __rand_int__ is
# replaced (per occurrence, per request) by a 12-digit number below -r.
command_args() {
  local k="{$TAG}key:__rand_int__" i args=()
  case "$1" in
    SET) args=(SET "$k" "$VALUE") ;;
    GET) args=(GET "$k") ;;
    MSET) args=(MSET); for i in $(seq 10); do args+=("$k" "$VALUE"); done ;;
    LPUSH) args=(LPUSH "{$TAG}list:__rand_int__" "$VALUE") ;;
  esac
  printf '%s\n' "${args[@]}"
}

RESULTS=$BENCH_DIR/results.tsv
: >"$RESULTS"

# run_once PORT PIPELINE N CMD: one redis-benchmark run. Prints "rps p99_ms
# proxy_cpu% m_cpu% machine_busy%" (CPU as % of one core, machine busy as %
# of all cores, over the run's wall time). Fails on a non-zero exit, any
# error reported by redis-benchmark, or output that is not one CSV result.
run_once() {
  local port=$1 pipe=$2 n=$3 cmd=$4 args out err rc
  mapfile -t args < <(command_args "$cmd")
  out=$BENCH_DIR/rb.out err=$BENCH_DIR/rb.err
  bench_check_alive # names the process and shows its log if one died
  local p0 m0 c0 t0 p1 m1 c1 t1
  p0=$(proc_cpu_ticks "$PROXY_PID"); m0=$(proc_cpu_ticks "$M_PID"); c0=$(machine_cpu); t0=$EPOCHREALTIME
  rc=0
  redis-benchmark -h 127.0.0.1 -p "$port" -c "$CLIENTS" -n "$n" -P "$pipe" -r "$KEYSPACE" \
    -q --csv "${args[@]}" >"$out" 2>"$err" || rc=$?
  t1=$EPOCHREALTIME; c1=$(machine_cpu); m1=$(proc_cpu_ticks "$M_PID"); p1=$(proc_cpu_ticks "$PROXY_PID")
  # redis-benchmark asks CONFIG GET save/appendonly first; the proxy refuses
  # administrative commands, which redis-benchmark only warns about.
  if [ "$rc" -ne 0 ] || grep -v 'Could not fetch server CONFIG' "$err" | grep -q .; then
    cat "$err" "$out" >&2
    bench_check_alive
    die "redis-benchmark $cmd -P $pipe against port $port failed (exit $rc)"
  fi
  python3 - "$out" "$p0 $p1 $m0 $m1 $c0 $c1 $t0 $t1 $CLK_TCK" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
if len(rows) != 2 or rows[0][1] != "rps" or rows[0][6] != "p99_latency_ms":
    sys.exit("unexpected redis-benchmark output: %r" % rows)
p0, p1, m0, m1, cb0, ct0, cb1, ct1, t0, t1, hz = map(float, sys.argv[2].split())
wall = t1 - t0
print(rows[1][1], rows[1][6],
      "%.0f" % (100 * (p1 - p0) / hz / wall), "%.0f" % (100 * (m1 - m0) / hz / wall),
      "%.0f" % (100 * (cb1 - cb0) / (ct1 - ct0)))
PY
}

say "benchmarking: ${COMMANDS[*]} x -P ${PIPELINES[*]}, $CLIENTS clients, warm-up + $REPS alternating pairs of ~${SECS}s runs"
for cmd in "${COMMANDS[@]}"; do
  for pipe in "${PIPELINES[@]}"; do
    # Warm-up (connections, allocator, CPU caches, the proxy's pools), and
    # calibration: N is chosen so a direct run takes about SECS seconds.
    warm_n=$((pipe == 1 ? 10000 : 100000))
    # (Assigned first: a failure inside a here-string's $(...) would not stop the script.)
    warm=$(run_once "$M" "$pipe" "$warm_n" "$cmd")
    read -r warm_rps _ <<<"$warm"
    run_once "$A" "$pipe" "$warm_n" "$cmd" >/dev/null
    n=$(python3 -c "import sys; print(max(5000, round(float(sys.argv[1]) * float(sys.argv[2]) / 1000) * 1000))" "$warm_rps" "$SECS")
    for rep in $(seq "$REPS"); do
      order=("$M:direct" "$A:proxy")
      [ $((rep % 2)) -eq 1 ] || order=("$A:proxy" "$M:direct")
      line=""
      for target in "${order[@]}"; do
        r=$(run_once "${target%%:*}" "$pipe" "$n" "$cmd")
        bench_check_alive
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$cmd" "$pipe" "$rep" "${target#*:}" "$n" "${r// /$'\t'}" >>"$RESULTS"
        read -r rps p99 _ <<<"$r"
        line+=$(printf '  %-6s %9.0f rps p99 %6.3f ms' "${target#*:}" "$rps" "$p99")
      done
      printf '  %-5s -P %-2s n=%-7s pair %s:%s\n' "$cmd" "$pipe" "$n" "$rep" "$line"
    done
  done
done

# --- sanity checks after the runs ----------------------------------------------
got=$(redis-cli -p "$A" get "{$TAG}key:000000000001")
[ "$got" = "$VALUE" ] || die "GET {$TAG}key:000000000001 through proxy A returned '$got'"
dbsize_m=$(redis-cli -p "$M" dbsize)
dbsize_a=$(redis-cli -p "$A" dbsize)
if ! [[ "$dbsize_m" =~ ^[0-9]+$ ]] || [ "$dbsize_m" -lt "$KEYSPACE" ]; then die "DBSIZE on M is '$dbsize_m'"; fi
[ "$dbsize_a" = "$dbsize_m" ] || die "DBSIZE through proxy A ($dbsize_a) differs from M ($dbsize_m)"
if grep -qi 'panicked' "$LOGS"/proxy-*.log; then
  grep -i -m5 'panicked' "$LOGS"/proxy-*.log >&2
  die "a proxy panicked"
fi
bench_check_alive
echo "    checks: GET through proxy A returns the value; DBSIZE $dbsize_m on M and through A; no panics"

# --- report ------------------------------------------------------------------
say "results (medians of $REPS pairs; ratio = proxy/direct; overhead = proxy p99 - direct p99)"
python3 - "$RESULTS" <<'PY'
import statistics as st, sys
from collections import defaultdict

runs = defaultdict(dict)  # (cmd, pipe) -> {(rep, target): fields}
order = []
for line in open(sys.argv[1]):
    cmd, pipe, rep, target, n, rps, p99, pcpu, mcpu, busy = line.split("\t")
    key = (cmd, int(pipe))
    if key not in runs:
        order.append(key)
    runs[key][(int(rep), target)] = dict(n=int(n), rps=float(rps), p99=float(p99) * 1000,
                                         pcpu=int(pcpu), mcpu=int(mcpu), busy=int(busy))

hdr = "%-6s %3s %10s %10s %6s %11s %9s %9s %9s %5s" % (
    "cmd", "-P", "direct", "proxy", "ratio", "(range)", "p99 dir", "p99 prx", "overhead", "goal")
print(hdr)
print("%-6s %3s %10s %10s %6s %11s %9s %9s %9s %5s" % ("", "", "rps", "rps", "", "", "us", "us", "us", ""))
print("-" * len(hdr))
cpu_rows, met = [], []
for cmd, pipe in order:
    r = runs[(cmd, pipe)]
    reps = sorted({rep for rep, _ in r})
    d = [r[(i, "direct")] for i in reps]
    p = [r[(i, "proxy")] for i in reps]
    ratios = [b["rps"] / a["rps"] for a, b in zip(d, p)]
    over = [b["p99"] - a["p99"] for a, b in zip(d, p)]
    ratio, ovr = st.median(ratios), st.median(over)
    if pipe == 1:
        ok = ovr <= 100
        lat = "%9.0f %9.0f %9.0f" % (st.median(x["p99"] for x in d), st.median(x["p99"] for x in p), ovr)
    else:
        ok = ratio >= 0.9
        lat = "%9s %9s %9s" % ("", "", "")
    met.append(ok)
    print("%-6s %3d %10.0f %10.0f %6.2f %11s %s %5s" % (
        cmd, pipe, st.median(x["rps"] for x in d), st.median(x["rps"] for x in p), ratio,
        "(%.2f-%.2f)" % (min(ratios), max(ratios)), lat, "yes" if ok else "NO"))
    # CPU time per request (us): process CPU (% of a core) / requests per second.
    per_req = lambda runs, f: st.median(x[f] / 100 / x["rps"] * 1e6 for x in runs)
    cpu_rows.append((cmd, pipe, st.median(x["mcpu"] for x in d), st.median(x["busy"] for x in d),
                     st.median(x["pcpu"] for x in p), st.median(x["mcpu"] for x in p),
                     st.median(x["busy"] for x in p),
                     per_req(d, "mcpu"), per_req(p, "pcpu"), per_req(p, "mcpu")))

print()
print("goals: -P 16 rows: proxy throughput >= 0.90 x direct; -P 1 rows: p99 overhead <= 100 us")
print("       met by %d of %d rows (informational)" % (sum(met), len(met)))
print()
print("CPU during the runs (medians; process CPU in %% of one core, machine busy in %% of all %d cores):"
      % __import__("os").cpu_count())
print("%-6s %3s | %-16s | %-26s" % ("", "", "direct runs", "proxy runs"))
print("%-6s %3s | %7s %8s | %7s %7s %8s" % ("cmd", "-P", "redis M", "machine", "proxy", "redis M", "machine"))
for cmd, pipe, dm, db, pp, pm, pb, *_ in cpu_rows:
    print("%-6s %3d | %6.0f%% %7.0f%% | %6.0f%% %6.0f%% %7.0f%%" % (cmd, pipe, dm, db, pp, pm, pb))
print()
# Less sensitive to a crowded machine than the ratios above: what one request
# costs the proxy, next to what it costs Redis itself.
print("CPU time per request (medians, us): the proxy's cost next to Redis's own")
print("%-6s %3s | %12s | %7s %12s | %s" % ("cmd", "-P", "redis direct", "proxy", "redis via A", "proxy / redis direct"))
for cmd, pipe, *_, rd, px, rp in cpu_rows:
    print("%-6s %3d | %12.2f | %7.2f %12.2f | %.2f" % (cmd, pipe, rd, px, rp, px / rd))
PY

bench_check_alive
echo "    load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); scenario took $((SECONDS - started))s"
bench_finish
