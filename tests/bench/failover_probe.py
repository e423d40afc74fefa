"""Failover probe: how long after `kill -9` can a cluster client write again?

Usage:
    failover_probe.py --seeds HOST:PORT[,HOST:PORT...] --key KEY \
        --kill-pids PID[,PID...] [--timeout-s 60] [--pause-ms 5] [--json]

Works against any endpoint speaking the Redis Cluster protocol: an official
Redis Cluster or redmesh proxies. The probe

1. connects a redis-py RedisCluster to the seeds and writes KEY once
   (warm-up: the topology is cached and the connection to KEY's owner is open,
   as in a client that was busy when the failure happened);
2. sends SIGKILL to every pid of --kill-pids and takes t0 = time.monotonic()
   right after the last kill;
3. loops `SET KEY <counter>` until one succeeds (t1). After any error it makes
   sure the topology is re-read with CLUSTER SLOTS from a live node (the
   killed node may be one of the seeds, so every known node and every seed is
   tried), then retries after --pause-ms;
4. reads KEY back: it must hold the value of the successful write (or,
   reported as read_back "earlier-attempt", that of an earlier attempt that
   timed out on the client side but was still applied later).

It prints t1 - t0 in milliseconds (with --json: one JSON object with
elapsed_ms, attempts, errors by type, kill_unix / write_unix wall-clock
times to line the run up with server logs, owner_before / owner_after, ...).
Exit status: 0 on success; 1 if no write succeeded within --timeout-s or the
read-back disagreed (with --json the object is still printed, elapsed_ms
null and an "error" field); 2 on bad usage or when the warm-up or a kill
failed (nothing on stdout).

What is measured is "the time until a client that retries promptly can write
again", so redis-py's own retry machinery is switched off or neutralised:

- retry=Retry(NoBackoff(), 0): RedisCluster runs a command exactly once
  (the default retries ERRORS_ALLOW_RETRY with exponential backoff);
- redis-py 8.1.0's RedisCluster._execute_command sleeps 0.25 s before
  re-reading the topology on CLUSTERDOWN / MASTERDOWN / slot-not-covered,
  and 0.05 s per TRYAGAIN after half of its redirection budget. Those are
  module-level `time.sleep` calls; the probe replaces `time` in
  redis.cluster by a shim whose sleep() only counts what was skipped
  (reported as library_sleeps_skipped_ms). Its own redirection handling
  (MOVED/ASK, up to 16 hops within one command) is kept: that is prompt.
- socket timeouts are short (--socket-timeout-s, 0.2 s by default) so a
  request to a node that hangs instead of refusing is abandoned quickly.
"""

import argparse
import json
import os
import signal
import sys
import time

try:
    import redis
    import redis.cluster
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - environment problem
    sys.exit(f"failover_probe: redis-py is required ({exc}); use target/pyenv/bin/python")


class _NoSleepTime:
    """Stands in for the `time` module inside redis.cluster: everything is
    the real module except sleep(), which returns at once and records how
    much sleeping the library asked for."""

    def __init__(self):
        self.skipped_s = 0.0
        self.skipped_calls = 0

    def sleep(self, seconds):
        self.skipped_s += seconds
        self.skipped_calls += 1

    def __getattr__(self, name):
        return getattr(time, name)


def parse_seeds(text):
    seeds = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"bad seed {item!r}: expected HOST:PORT")
        seeds.append((host, int(port)))
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds given")
    return seeds


def parse_pids(text):
    try:
        pids = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad pid list {text!r}") from None
    if not pids or any(p <= 1 for p in pids):
        raise argparse.ArgumentTypeError(f"bad pid list {text!r}")
    return pids


def main():
    ap = argparse.ArgumentParser(
        description="Measure the time from kill -9 to the first successful write "
        "to KEY, as seen by a promptly retrying Redis Cluster client."
    )
    ap.add_argument("--seeds", required=True, type=parse_seeds, help="HOST:PORT[,HOST:PORT...]")
    ap.add_argument("--key", required=True, help="the key written (its slot is the lost one)")
    ap.add_argument("--kill-pids", required=True, type=parse_pids, help="PID[,PID...] to SIGKILL")
    ap.add_argument("--timeout-s", type=float, default=60.0,
                    help="give up if no write succeeds this long after the kill (default 60)")
    ap.add_argument("--pause-ms", type=float, default=5.0,
                    help="pause between a failed attempt and the next one (default 5, at most 10)")
    ap.add_argument("--socket-timeout-s", type=float, default=0.2,
                    help="socket and connect timeout of every connection (default 0.2)")
    ap.add_argument("--json", action="store_true", help="print a JSON object instead of the bare ms")
    args = ap.parse_args()
    if not 0 <= args.pause_ms <= 10:
        ap.error("--pause-ms must be between 0 and 10")

    shim = _NoSleepTime()
    redis.cluster.time = shim  # see the module docstring

    seeds = args.seeds

    def connect():
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in seeds],
            retry=Retry(NoBackoff(), 0),
            # A proxy may briefly not cover every slot while it fails over;
            # the client must still start and keep refreshing.
            require_full_coverage=False,
            socket_timeout=args.socket_timeout_s,
            socket_connect_timeout=args.socket_timeout_s,
            decode_responses=True,
        )

    # --- warm-up -------------------------------------------------------------
    try:
        rc = connect()
        if rc.set(args.key, "warm-up") is not True or rc.get(args.key) != "warm-up":
            raise RuntimeError("the warm-up write did not read back")
        owner_before = rc.get_node_from_key(args.key).name
    except Exception as exc:  # noqa: BLE001 - report whatever went wrong
        print(f"failover_probe: warm-up write to {args.key!r} failed: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2

    # --- the kill ------------------------------------------------------------
    for pid in args.kill_pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError as exc:
            print(f"failover_probe: kill -9 {pid} failed: {exc}", file=sys.stderr)
            return 2
    t0 = time.monotonic()
    t0_unix = time.time()  # to line the run up with server logs
    deadline = t0 + args.timeout_s
    pause = args.pause_ms / 1000.0

    # --- retry until a write succeeds ------------------------------------------
    errors = {}
    attempts = 0
    refreshes = 0
    counter = 0
    value = None
    t1 = None
    last_error = None
    nm = rc.nodes_manager
    while True:
        attempts += 1
        counter += 1
        value = f"failover-probe-{counter}"
        epoch = getattr(nm, "_epoch", None)
        try:
            if rc.set(args.key, value) is True:
                t1 = time.monotonic()
                break
            raise RuntimeError("SET did not answer OK")
        except Exception as exc:  # noqa: BLE001 - every error means "not yet"
            name = type(exc).__name__
            errors[name] = errors.get(name, 0) + 1
            last_error = f"{name}: {exc}"
        if time.monotonic() >= deadline:
            break
        # redis-py re-reads CLUSTER SLOTS by itself after connection errors,
        # timeouts and CLUSTERDOWN (the epoch then moved on); for any other
        # error (a MOVED loop, a plain error reply, a failed refresh) do it
        # here, also asking the original seeds, which the client may have
        # dropped from its list of startup nodes.
        if epoch is None or getattr(nm, "_epoch", None) == epoch:
            try:
                nm.initialize(additional_startup_nodes_info=seeds)
                refreshes += 1
            except Exception as exc:  # noqa: BLE001
                name = "refresh:" + type(exc).__name__
                errors[name] = errors.get(name, 0) + 1
                last_error = f"{name}: {exc}"
        if pause:
            time.sleep(pause)

    report = {
        "elapsed_ms": None,
        "kill_unix": round(t0_unix, 3),
        "write_unix": None,
        "attempts": attempts,
        "errors": errors,
        "topology_refreshes_by_probe": refreshes,
        "library_sleeps_skipped": shim.skipped_calls,
        "library_sleeps_skipped_ms": round(shim.skipped_s * 1000.0, 1),
        "owner_before": owner_before,
        "owner_after": None,
        "read_back": None,
        "key": args.key,
        "redis_py": redis.__version__,
        "killed_pids": args.kill_pids,
    }

    def fail(message):
        report["error"] = message
        print(f"failover_probe: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps(report, sort_keys=True))
        return 1

    if t1 is None:
        return fail(f"no write to {args.key!r} succeeded within {args.timeout_s:g}s after the "
                    f"kill ({attempts} attempts; last error: {last_error})")
    elapsed_ms = (t1 - t0) * 1000.0
    report["elapsed_ms"] = round(elapsed_ms, 1)
    report["write_unix"] = round(t0_unix + (t1 - t0), 3)

    # --- read back (not timed) ---------------------------------------------------
    got, read_error = None, None
    for _ in range(100):
        try:
            got = rc.get(args.key)
            break
        except Exception as exc:  # noqa: BLE001
            read_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.01)
    try:
        report["owner_after"] = rc.get_node_from_key(args.key).name
    except Exception:  # noqa: BLE001
        pass
    rc.close()
    if got == value:
        report["read_back"] = "ok"
    elif (isinstance(got, str) and got.startswith("failover-probe-")
          and got[len("failover-probe-"):].isdigit()
          and int(got[len("failover-probe-"):]) < counter):
        # A request that timed out on the client side (a hanging node or
        # proxy) is not cancelled: it may still be applied after the
        # successful write. Not a lost write, but worth showing.
        report["read_back"] = "earlier-attempt"
    else:
        return fail(f"read-back of {args.key!r} returned {got!r}, expected {value!r}"
                    + (f" (last error: {read_error})" if read_error else ""))

    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(f"{elapsed_ms:.1f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
