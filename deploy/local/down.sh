#!/usr/bin/env bash
# Stops exactly the processes ./deploy/local/up.sh started (by pidfile).
# Data stays in .redmesh/ unless --purge is given.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

purge=false
[ "${1:-}" = "--purge" ] && purge=true

stop_one() {
  local f=$1 name pid
  name=$(basename "$f" .pid)
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      echo "killed $name (did not stop within 5s)"
    else
      echo "stopped $name"
    fi
  fi
  rm -f "$f"
}

if compgen -G "$PIDS/*.pid" >/dev/null; then
  # Clients' entry points first, storage last.
  for pattern in 'proxy-*' broker coordinator 'health-checker-*' migrator prometheus 'redis-*' etcd; do
    for f in "$PIDS"/$pattern.pid; do
      [ -e "$f" ] && stop_one "$f"
    done
  done
else
  echo "nothing to stop"
fi

if $purge; then
  rm -rf "$STATE"
  echo "removed $STATE"
fi
