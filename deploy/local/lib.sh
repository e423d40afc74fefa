# Shared helpers for the local system scripts (sourced, not run).
# Every process started here has a pidfile under $STATE/pids so down.sh can
# stop exactly what up.sh started, and nothing else.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${REDMESH_STATE_DIR:-$ROOT/.redmesh}"
PIDS="$STATE/pids"
LOGS="$STATE/logs"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs Debian packages whose commands are missing (as root, via apt).
# Usage: ensure_packages "cmd:package" ...
ensure_packages() {
  local missing=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] || install_packages "${missing[@]}"
}

# Installs the given Debian packages (as root, via apt).
install_packages() {
  if [ "$(id -u)" -ne 0 ]; then
    die "missing packages: $*; run as root or install them with apt"
  fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  # Debian starts packaged etcd/redis services on install; they would hold the
  # ports the local system uses. Stop and disable the ones we just installed.
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for pkg in "$@"; do
      case "$pkg" in
        etcd-server) systemctl disable --now etcd >/dev/null 2>&1 || true ;;
        redis-server) systemctl disable --now redis-server >/dev/null 2>&1 || true ;;
        prometheus)
          systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
          ;;
      esac
    done
  fi
}

# is_running NAME: the pidfile exists and its process is alive.
is_running() {
  local f="$PIDS/$1.pid"
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_for DESCRIPTION TIMEOUT_SECONDS COMMAND...: polls COMMAND until it
# succeeds (readiness, never a fixed sleep).
wait_for() {
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what did not become ready within ${timeout}s (logs: $LOGS)"
    sleep 0.1
  done
}

# start NAME COMMAND...: runs COMMAND in the background with its own log and
# pidfile, unless NAME is already running.
start() {
  local name=$1; shift
  if is_running "$name"; then
    return 0
  fi
  mkdir -p "$PIDS" "$LOGS"
  nohup "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"
}

# make_local_ca DIR: once, a local CA and one certificate for 127.0.0.1 and
# localhost (good for serving and as a client), plus DIR/env.sh exporting
# the TLS options every redmesh process and redmeshctl read.
make_local_ca() {
  local d=$1
  if [ ! -f "$d/node.pem" ]; then
    say "making a local CA and certificate in $d"
    mkdir -p "$d"
    chmod 700 "$d"
    cat >"$d/ca.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = ca
[dn]
CN = redmesh local CA
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
CNF
    printf '%s\n' 'basicConstraints = CA:FALSE' 'keyUsage = critical,digitalSignature' \
      'extendedKeyUsage = serverAuth,clientAuth' 'subjectAltName = IP:127.0.0.1,DNS:localhost' \
      >"$d/node.ext"
    openssl req -x509 -new -config "$d/ca.cnf" -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
      -nodes -days 3650 -keyout "$d/ca-key.pem" -out "$d/ca.pem" 2>/dev/null
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=redmesh-local \
      -keyout "$d/node-key.pem" -out "$d/node.csr" 2>/dev/null
    openssl x509 -req -in "$d/node.csr" -CA "$d/ca.pem" -CAkey "$d/ca-key.pem" -CAcreateserial \
      -days 825 -extfile "$d/node.ext" -out "$d/node.pem" 2>/dev/null
    chmod 600 "$d"/*-key.pem
  fi
  cat >"$d/env.sh" <<ENV
export REDMESH_TLS_CERT=$d/node.pem REDMESH_TLS_KEY=$d/node-key.pem
export REDMESH_TLS_CA=$d/ca.pem REDMESH_TLS_CLIENT_AUTH=true
export REDMESH_ETCD_CA=$d/ca.pem REDMESH_ETCD_CERT=$d/node.pem REDMESH_ETCD_KEY=$d/node-key.pem
ENV
}
