#!/usr/bin/env bash
# Starts the whole redmesh system on this machine (DESIGN.md §9 ports):
# etcd, 8 Redis nodes, 4 proxies on two "hosts", the broker and the other
# services; registers the proxies and creates cluster `demo`.
# Idempotent: running it again starts only what is not running.
# Stop everything with ./deploy/local/down.sh.
#
# --tls: the same system with TLS everywhere a client reaches it: a local
# CA (made once, in .redmesh/tls) signs one certificate for 127.0.0.1;
# gRPC between every service and redmeshctl is mutual TLS, etcd requires
# client certificates, and each proxy also serves RESP over TLS on
# 7301-7304 (redis-cli --tls). .redmesh/tls/env.sh sets redmeshctl up.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TLS=false
for arg in "$@"; do
  case "$arg" in
    --tls) TLS=true ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $arg (only --tls)" ;;
  esac
done

PROFILE="${REDMESH_PROFILE:-release}"
BIN="$ROOT/target/$PROFILE"

ensure_packages redis-server:redis-server redis-cli:redis-tools etcd:etcd-server \
  etcdctl:etcd-client protoc:protobuf-compiler openssl:openssl

# A running system keeps its mode: switching needs a restart.
mode=$($TLS && echo tls || echo plain)
if compgen -G "$PIDS/*.pid" >/dev/null && [ -f "$STATE/mode" ] && [ "$(cat "$STATE/mode")" != "$mode" ]; then
  die "the local system is running with $(cat "$STATE/mode") connections; stop it with ./deploy/local/down.sh before starting it with $mode ones"
fi
mkdir -p "$STATE"
echo "$mode" >"$STATE/mode"

ETCD_URL=http://127.0.0.1:2379
etcdctl_() { etcdctl --endpoints "$ETCD_URL" "$@"; }
if $TLS; then
  make_local_ca "$STATE/tls"
  # Every service and redmeshctl read these (see docs/OPERATIONS.md).
  # shellcheck source=/dev/null
  source "$STATE/tls/env.sh"
  ETCD_URL=https://127.0.0.1:2379
  etcdctl_() {
    etcdctl --endpoints "$ETCD_URL" --cacert "$REDMESH_ETCD_CA" --cert "$REDMESH_ETCD_CERT" \
      --key "$REDMESH_ETCD_KEY" "$@"
  }
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs) first"

say "building ($PROFILE)"
if [ "$PROFILE" = release ]; then
  (cd "$ROOT" && cargo build --release --bins --quiet)
else
  (cd "$ROOT" && cargo build --bins --quiet)
fi

for port in 2379 7400 7001 7002 7003 7004 7201; do
  if port_open "$port" && ! compgen -G "$PIDS/*.pid" >/dev/null; then
    die "port $port is already in use by another program; stop it (e.g. a system etcd or redis-server) and retry"
  fi
done

say "starting etcd on $ETCD_URL"
etcd_tls=()
if $TLS; then
  etcd_tls=(--cert-file "$REDMESH_ETCD_CERT" --key-file "$REDMESH_ETCD_KEY"
    --trusted-ca-file "$REDMESH_ETCD_CA" --client-cert-auth)
fi
start etcd etcd --name redmesh-local --data-dir "$STATE/etcd" \
  --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster redmesh-local=http://127.0.0.1:2380 --initial-cluster-state new \
  --logger zap --log-outputs stderr --log-level warn "${etcd_tls[@]}"
wait_for etcd 30 etcdctl_ endpoint health

say "starting 8 Redis nodes on 7201-7208"
for i in $(seq 1 8); do
  port=$((7200 + i))
  mkdir -p "$STATE/redis-$port"
  start "redis-$port" redis-server --port "$port" --bind 127.0.0.1 --dir "$STATE/redis-$port" \
    --save "" --appendonly yes --daemonize no
done
for i in $(seq 1 8); do
  wait_for "redis on $((7200 + i))" 20 redis-cli -p $((7200 + i)) ping
done

say "starting the broker on 7400 and the other services"
start broker "$BIN/redmesh-broker" --listen 127.0.0.1:7400 --metrics-listen 127.0.0.1:9400
start coordinator "$BIN/redmesh-coordinator" --listen 127.0.0.1:7401 --metrics-listen 127.0.0.1:9401
for i in 0 1 2; do
  start "health-checker-$i" "$BIN/redmesh-health-checker" --listen "127.0.0.1:$((7410 + i))" \
    --metrics-listen "127.0.0.1:$((9410 + i))"
done
start migrator "$BIN/redmesh-migrator" --listen 127.0.0.1:7420 --metrics-listen 127.0.0.1:9420
wait_for broker 30 "$BIN/redmeshctl" --broker http://127.0.0.1:7400 proxy list

say "starting 4 proxies on 7001-7004 (admin 7101-7104$($TLS && echo ', TLS 7301-7304'))"
for i in 1 2 3 4; do
  tls_listen=()
  $TLS && tls_listen=(--tls-listen "127.0.0.1:$((7300 + i))")
  start "proxy-$i" "$BIN/redmesh-proxy" --id "proxy-$i" --listen "127.0.0.1:$((7000 + i))" \
    --admin-listen "127.0.0.1:$((7100 + i))" --broker http://127.0.0.1:7400 \
    --metrics-listen "127.0.0.1:$((9430 + i))" "${tls_listen[@]}"
done
for i in 1 2 3 4; do
  wait_for "proxy-$i" 20 redis-cli -p $((7000 + i)) ping
done

ctl() { "$BIN/redmeshctl" --broker http://127.0.0.1:7400 "$@"; }
say "registering proxies (host-a: proxy-1, proxy-3; host-b: proxy-2, proxy-4)"
for i in 1 2 3 4; do
  host=$([ $((i % 2)) -eq 1 ] && echo host-a || echo host-b)
  resp_tls=()
  $TLS && resp_tls=(--resp-tls "127.0.0.1:$((7300 + i))")
  ctl proxy register --id "proxy-$i" --resp "127.0.0.1:$((7000 + i))" --admin "127.0.0.1:$((7100 + i))" \
    --host "$host" --redis "127.0.0.1:$((7199 + 2 * i)),127.0.0.1:$((7200 + 2 * i))" \
    "${resp_tls[@]}" >/dev/null
done

if ctl cluster get demo >/dev/null 2>&1; then
  say "cluster demo exists"
else
  say "creating cluster demo (4 nodes)"
  ctl cluster create demo --nodes 4 >/dev/null
fi
entry=$(ctl --json cluster get demo | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d["proxies"][0]["spec"]["respAddress"].rsplit(":", 1)[1])')
wait_for "cluster demo" 20 sh -c "redis-cli -p $entry cluster info | grep -q cluster_state:ok"

# Prometheus, when installed (Debian package prometheus), scrapes every
# service with the repository's config and alert rules.
prom_line="  Prometheus:     not installed (apt install prometheus, then run up.sh again)"
if command -v prometheus >/dev/null 2>&1; then
  if port_open 9090 && ! is_running prometheus; then
    prom_line="  Prometheus:     port 9090 is taken by another program; not started"
  else
    start prometheus prometheus --config.file="$ROOT/observability/prometheus/prometheus.yml" \
      --storage.tsdb.path="$STATE/prometheus" --web.listen-address=127.0.0.1:9090
    wait_for prometheus 30 port_open 9090
    prom_line="  Prometheus:     http://127.0.0.1:9090 (alerts: /alerts; dashboards for Grafana in observability/grafana)"
  fi
fi

ctl cluster get demo
tls_lines=""
if $TLS; then
  wait_for "TLS on $((entry + 300))" 20 redis-cli --tls --cacert "$REDMESH_TLS_CA" \
    -p $((entry + 300)) ping
  tls_lines="  Over TLS:       redis-cli --tls --cacert $REDMESH_TLS_CA -c -p $((entry + 300))
  redmeshctl:     source $STATE/tls/env.sh first (mutual TLS on every gRPC API)
"
fi
cat <<MSG

redmesh is running (state, logs and pids in $STATE).

  Connect:        redis-cli -c -p $entry
$tls_lines  Cluster view:   redis-cli -p $entry cluster nodes
  Manage:         $BIN/redmeshctl --help        (broker at 127.0.0.1:7400)
  gRPC:           grpc 127.0.0.1:7400 (reflection enabled; see README for buf curl)
  Metrics:        http://127.0.0.1:9400/metrics (broker), :9401 (coordinator), :9410-9412
                  (health-checkers), :9420 (migrator), :9431-9434 (proxies)
$prom_line
  Stop:           ./deploy/local/down.sh

Failover: three health-checkers (7410-7412) probe every proxy and the
coordinator (7401) fails a dead proxy over to its partner, then replaces it
with a free one (proxy-3/proxy-4 are free). Watch it with
  $BIN/redmeshctl coordinator status
  $BIN/redmeshctl coordinator events
Scaling: the migrator (7420) moves slots live; grow the demo cluster onto
the free proxies and back with
  $BIN/redmeshctl cluster scale demo 8
  $BIN/redmeshctl cluster scale demo 4
MSG
