"""Every command family through redis-py against redmesh, in RESP3 and
RESP2: strings, hashes, lists, sets, sorted sets, streams, bitmaps,
HyperLogLog, geo, keyspace commands, transactions with WATCH, scripts and
functions, blocking commands, pub/sub (classic and sharded), CLIENT, INFO,
COMMAND, CLUSTER COUNTKEYSINSLOT/GETKEYSINSLOT and reads from replicas.

Usage: redis_py_commands.py [--plain] HOST:PORT [HOST:PORT...] [--password PW]
With a cluster client (RedisCluster) by default, seeded with the first
endpoint; with --plain, a plain single-endpoint client (redis.Redis) on the
first endpoint, for plain-client mode (the other endpoints publish, to check
pub/sub crosses proxies). Exits non-zero on the first wrong answer."""
import os
import sys
import threading
import time

from redis import Redis
from redis.cluster import RedisCluster
from redis.exceptions import MovedError, ResponseError, WatchError


# Set by main(): plain mode, the endpoints, and how to open a client.
PLAIN = False
ENDPOINTS = []
OPTS = {}


def client(endpoint=None, **extra):
    host, port = (endpoint or ENDPOINTS[0]).rsplit(":", 1)
    kind = Redis if PLAIN else RedisCluster
    return kind(host=host, port=int(port), **OPTS, **extra)


def on(node):
    """Routing arguments for one node (a plain client has one endpoint)."""
    return {} if PLAIN else {"target_nodes": node}


def masters(rc):
    return [None] if PLAIN else rc.get_primaries()


def everywhere():
    return {} if PLAIN else {"target_nodes": RedisCluster.PRIMARIES}


def eq(got, want, what):
    if got != want and isinstance(got, set) and isinstance(want, set):
        raise AssertionError(f"{what}: missing {sorted(want - got)[:5]}…, extra {sorted(got - want)[:5]}…")
    assert got == want, f"{what}: got {got!r}, want {want!r}"


def pairs(items):
    """RESP3 gives [member, score] lists (flat for one) where RESP2 gives
    tuples."""
    if items and not isinstance(items[0], (list, tuple)):
        return [tuple(items)]
    return [tuple(i) for i in items]


def oks(replies):
    """redis-py's cluster transactions leave +OK undecoded."""
    return [True if r == b"OK" else r for r in replies]


def later(delay, fn):
    """Runs fn after delay seconds on another thread (to wake blocked pops)."""
    t = threading.Timer(delay, fn)
    t.start()
    return t


def strings(rc, p):
    k = f"{{{p}s}}"
    eq(rc.set(k + "a", "1"), True, "SET")
    eq(rc.incr(k + "a"), 2, "INCR")
    eq(rc.incrbyfloat(k + "a", 0.5), 2.5, "INCRBYFLOAT")
    eq(rc.append(k + "b", "hello"), 5, "APPEND")
    eq(rc.getrange(k + "b", 1, 3), b"ell", "GETRANGE")
    eq(rc.setrange(k + "b", 0, "J"), 5, "SETRANGE")
    eq(rc.strlen(k + "b"), 5, "STRLEN")
    eq(rc.getdel(k + "b"), b"Jello", "GETDEL")
    eq(rc.setnx(k + "c", "x"), True, "SETNX")
    eq(rc.setnx(k + "c", "y"), False, "SETNX again")
    rc.psetex(k + "d", 100000, "v")
    eq(0 < rc.pttl(k + "d") <= 100000, True, "PSETEX/PTTL")
    eq(rc.getex(k + "d", persist=True), b"v", "GETEX PERSIST")
    eq(rc.ttl(k + "d"), -1, "TTL after PERSIST")
    eq(rc.mset({k + "m1": "1", k + "m2": "2"}), True, "MSET one slot")
    eq(rc.msetnx({k + "m3": "3", k + "m1": "x"}), False, "MSETNX")
    eq(rc.mget(k + "m1", k + "m2", k + "m3"), [b"1", b"2", None], "MGET one slot")
    eq(rc.set(k + "m1", "new", get=True), b"1", "SET GET")
    # Keys on every slot owner, gathered by the client.
    keys = [f"{p}:spread:{i}" for i in range(64)]
    if PLAIN:  # the proxy splits them by slot
        rc.mset({key: key for key in keys})
        eq(rc.mget(keys), [key.encode() for key in keys], "MGET across slots")
    else:  # the client does
        rc.mset_nonatomic({key: key for key in keys})
        eq(rc.mget_nonatomic(keys), [key.encode() for key in keys], "MGET across slots")
    eq(rc.delete(*keys), 64, "DEL across slots")


def hashes(rc, p):
    k = f"{{{p}h}}h"
    eq(rc.hset(k, mapping={"a": "1", "b": "2", "c": "3"}), 3, "HSET")
    eq(rc.hget(k, "a"), b"1", "HGET")
    eq(rc.hincrby(k, "a", 5), 6, "HINCRBY")
    eq(sorted(rc.hkeys(k)), [b"a", b"b", b"c"], "HKEYS")
    eq(rc.hlen(k), 3, "HLEN")
    eq(rc.hdel(k, "c"), 1, "HDEL")
    eq(rc.hgetall(k), {b"a": b"6", b"b": b"2"}, "HGETALL")
    eq(rc.hmget(k, "a", "zz"), [b"6", None], "HMGET")
    eq(dict(rc.hscan_iter(k)), {b"a": b"6", b"b": b"2"}, "HSCAN")
    eq(rc.hexists(k, "b"), True, "HEXISTS")
    eq(rc.hrandfield(k) in (b"a", b"b"), True, "HRANDFIELD")


def lists(rc, p):
    k = f"{{{p}l}}"
    eq(rc.rpush(k + "l", "a", "b", "c"), 3, "RPUSH")
    eq(rc.lpush(k + "l", "z"), 4, "LPUSH")
    eq(rc.lrange(k + "l", 0, -1), [b"z", b"a", b"b", b"c"], "LRANGE")
    eq(rc.linsert(k + "l", "BEFORE", "b", "x"), 5, "LINSERT")
    eq(rc.lindex(k + "l", 2), b"x", "LINDEX")
    eq(rc.lset(k + "l", 0, "y"), True, "LSET")
    eq(rc.lpos(k + "l", "c"), 4, "LPOS")
    eq(rc.lmove(k + "l", k + "m", "RIGHT", "LEFT"), b"c", "LMOVE")
    eq(rc.ltrim(k + "l", 0, 1), True, "LTRIM")
    eq(rc.lpop(k + "l"), b"y", "LPOP")
    eq(rc.rpop(k + "m"), b"c", "RPOP")
    eq(rc.llen(k + "l"), 1, "LLEN")


def sets(rc, p):
    k = f"{{{p}S}}"
    eq(rc.sadd(k + "a", "1", "2", "3"), 3, "SADD")
    eq(rc.sadd(k + "b", "2", "3", "4"), 3, "SADD")
    eq(rc.smembers(k + "a"), {b"1", b"2", b"3"}, "SMEMBERS")
    eq(rc.sinter(k + "a", k + "b"), {b"2", b"3"}, "SINTER")
    eq(rc.sunionstore(k + "u", k + "a", k + "b"), 4, "SUNIONSTORE")
    eq(rc.sdiff(k + "a", k + "b"), {b"1"}, "SDIFF")
    eq(rc.sismember(k + "a", "1"), True, "SISMEMBER")
    eq(rc.smismember(k + "a", "1", "9"), [True, False], "SMISMEMBER")
    eq(rc.scard(k + "u"), 4, "SCARD")
    eq(rc.spop(k + "u") in {b"1", b"2", b"3", b"4"}, True, "SPOP")
    eq(rc.smove(k + "a", k + "b", "1"), True, "SMOVE")


def sorted_sets(rc, p):
    k = f"{{{p}z}}"
    eq(rc.zadd(k + "z", {"a": 1, "b": 2, "c": 3}), 3, "ZADD")
    eq(pairs(rc.zrange(k + "z", 0, -1, withscores=True)), [(b"a", 1.0), (b"b", 2.0), (b"c", 3.0)], "ZRANGE")
    eq(rc.zrangebyscore(k + "z", 2, "+inf"), [b"b", b"c"], "ZRANGEBYSCORE")
    eq(rc.zincrby(k + "z", 10, "a"), 11.0, "ZINCRBY")
    eq(rc.zrank(k + "z", "a"), 2, "ZRANK")
    eq(rc.zscore(k + "z", "b"), 2.0, "ZSCORE")
    eq(pairs(rc.zpopmin(k + "z")), [(b"b", 2.0)], "ZPOPMIN")
    rc.zadd(k + "y", {"c": 1, "d": 4})
    eq(rc.zunionstore(k + "u", [k + "z", k + "y"]), 3, "ZUNIONSTORE")
    eq(rc.zcard(k + "u"), 3, "ZCARD")
    eq(rc.zcount(k + "u", 0, 5), 2, "ZCOUNT")


def streams(rc, p):
    k = f"{{{p}x}}x"
    first = rc.xadd(k, {"f": "1"})
    rc.xadd(k, {"f": "2"})
    eq(rc.xlen(k), 2, "XLEN")
    eq([e[1] for e in rc.xrange(k)], [{b"f": b"1"}, {b"f": b"2"}], "XRANGE")
    eq(rc.xgroup_create(k, "g", id="0"), True, "XGROUP CREATE")
    got = rc.xreadgroup("g", "c1", {k: ">"}, count=10)
    entries = got[k.encode()][0] if isinstance(got, dict) else got[0][1]
    eq(len(entries), 2, "XREADGROUP")
    eq(rc.xpending(k, "g")["pending"], 2, "XPENDING")
    eq(rc.xack(k, "g", first), 1, "XACK")
    eq(rc.xinfo_stream(k)["length"], 2, "XINFO STREAM")
    eq(rc.xdel(k, first), 1, "XDEL")
    eq(rc.xtrim(k, maxlen=0, approximate=False), 1, "XTRIM")


def bitmaps_hll_geo(rc, p):
    k = f"{{{p}b}}"
    eq(rc.setbit(k + "b", 7, 1), 0, "SETBIT")
    eq(rc.getbit(k + "b", 7), 1, "GETBIT")
    eq(rc.bitcount(k + "b"), 1, "BITCOUNT")
    eq(rc.bitpos(k + "b", 1), 7, "BITPOS")
    rc.setbit(k + "c", 6, 1)
    eq(rc.bitop("OR", k + "o", k + "b", k + "c"), 1, "BITOP")
    eq(rc.get(k + "o"), b"\x03", "BITOP result")
    eq(rc.pfadd(k + "h1", "a", "b", "c"), True, "PFADD")
    rc.pfadd(k + "h2", "c", "d")
    eq(rc.pfcount(k + "h1"), 3, "PFCOUNT")
    eq(rc.pfmerge(k + "h3", k + "h1", k + "h2"), True, "PFMERGE")
    eq(rc.pfcount(k + "h3"), 4, "PFCOUNT merged")
    eq(rc.geoadd(k + "g", [13.361389, 38.115556, "Palermo", 15.087269, 37.502669, "Catania"]), 2, "GEOADD")
    eq(round(rc.geodist(k + "g", "Palermo", "Catania", unit="km")), 166, "GEODIST")
    eq(
        rc.geosearch(k + "g", longitude=15, latitude=37, radius=200, unit="km", sort="ASC"),
        [b"Catania", b"Palermo"],
        "GEOSEARCH",
    )


def keyspace(rc, p):
    k = f"{{{p}k}}"
    rc.set(k + "a", "v")
    eq(rc.expire(k + "a", 100), True, "EXPIRE")
    eq(0 < rc.ttl(k + "a") <= 100, True, "TTL")
    eq(rc.persist(k + "a"), True, "PERSIST")
    eq(rc.type(k + "a"), b"string", "TYPE")
    eq(rc.rename(k + "a", k + "b"), True, "RENAME in one slot")
    eq(rc.renamenx(k + "b", k + "c"), True, "RENAMENX")
    eq(rc.object("encoding", k + "c"), b"embstr", "OBJECT ENCODING")
    rc.pexpire(k + "c", 50000)
    dumped = rc.dump(k + "c")
    eq(rc.restore(k + "d", 50000, dumped), b"OK", "RESTORE")
    eq(rc.get(k + "d"), b"v", "value after RESTORE")
    eq(0 < rc.pttl(k + "d") <= 50000, True, "TTL after RESTORE")
    eq(rc.copy(k + "d", k + "e"), True, "COPY")
    eq(rc.exists(k + "c", k + "d", k + "e", k + "zz"), 3, "EXISTS")
    eq(rc.touch(k + "c", k + "d"), 2, "TOUCH")
    eq(rc.unlink(k + "c", k + "d"), 2, "UNLINK")
    try:
        rc.execute_command("RENAME", k + "e", "elsewhere-" + p)
        raise AssertionError("RENAME across slots must fail")
    except Exception as e:  # redis-py may refuse it itself, else the proxy does
        eq("slot" in str(e).lower(), True, f"RENAME across slots: {e}")
    # SCAN, KEYS and DBSIZE over every master, through the client's fan-out.
    names = {f"{p}:scan:{i}".encode() for i in range(200)}
    for n in names:
        rc.set(n, "1")
    eq(set(rc.scan_iter(match=f"{p}:scan:*", count=50)), names, "SCAN over all nodes")
    eq(set(rc.keys(f"{p}:scan:*", **everywhere())), names, "KEYS over all nodes")
    eq(rc.dbsize(**everywhere()) >= 200, True, "DBSIZE summed over masters")
    if PLAIN:
        slot = rc.execute_command("CLUSTER KEYSLOT", f"{p}:scan:0")
        count = rc.execute_command("CLUSTER COUNTKEYSINSLOT", slot)
        in_slot = rc.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)
    else:
        slot = rc.keyslot(f"{p}:scan:0")
        count = rc.cluster_countkeysinslot(slot)
        in_slot = rc.cluster_get_keys_in_slot(slot, 1000)
    eq(count >= 1, True, "CLUSTER COUNTKEYSINSLOT")
    # (redis-py decodes these names in RESP2 only)
    in_slot = [n if isinstance(n, bytes) else n.encode() for n in in_slot]
    eq(f"{p}:scan:0".encode() in in_slot and len(in_slot) == count, True, "CLUSTER GETKEYSINSLOT")
    eq(rc.delete(*names), 200, "DEL")


def transactions(rc, p):
    k = f"{{{p}t}}"
    pipe = rc.pipeline(transaction=True)
    pipe.set(k + "a", "1").incr(k + "a").get(k + "a")
    eq(oks(pipe.execute()), [True, 2, b"2"], "MULTI/EXEC")
    # WATCH: a change by someone else aborts the transaction.
    other = client(ENDPOINTS[-1])
    with rc.pipeline(transaction=True) as pipe:
        pipe.watch(k + "a")
        eq(pipe.get(k + "a"), b"2", "GET while watching")
        other.set(k + "a", "changed")
        pipe.multi()
        pipe.set(k + "a", "mine")
        try:
            pipe.execute()
            raise AssertionError("EXEC after a watched key changed must abort")
        except WatchError:
            pass
    eq(rc.get(k + "a"), b"changed", "aborted transaction left the value alone")
    with rc.pipeline(transaction=True) as pipe:
        pipe.watch(k + "a")
        pipe.multi()
        pipe.set(k + "a", "mine")
        eq(oks(pipe.execute()), [True], "EXEC with an untouched watched key")
    eq(rc.get(k + "a"), b"mine", "committed transaction")
    other.close()
    # A non-transactional pipeline over many slots.
    pipe = rc.pipeline(transaction=False)
    for i in range(100):
        pipe.set(f"{p}:pipe:{i}", i)
    for i in range(100):
        pipe.get(f"{p}:pipe:{i}")
    out = pipe.execute()
    eq(out[100:], [str(i).encode() for i in range(100)], "cluster pipeline")


def scripts(rc, p):
    k = f"{{{p}e}}k"
    eq(rc.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, k, "v"), b"OK", "EVAL")
    sha = rc.script_load("return redis.call('GET', KEYS[1])")
    eq(rc.evalsha(sha, 1, k), b"v", "EVALSHA")
    eq(rc.script_exists(sha), [True], "SCRIPT EXISTS")
    lib = p.replace("-", "_")
    code = f"#!lua name=lib{lib}\nredis.register_function('get_{lib}', function(keys) return redis.call('GET', keys[1]) end)"
    rc.function_load(code, replace=True)
    eq(rc.fcall(f"get_{lib}", 1, k), b"v", "FCALL")
    try:
        rc.execute_command("EVAL", "return 1", 2, f"{p}:x1", f"{p}:x2", **on(masters(rc)[0]))
        raise AssertionError("EVAL over keys in two slots must fail")
    except ResponseError as e:
        eq("same slot" in str(e), True, f"EVAL across slots: {e}")


def blocking(rc, p):
    k = f"{{{p}w}}"
    pusher = later(0.2, lambda: rc.rpush(k + "q", "job"))
    eq(list(rc.blpop([k + "q"], timeout=5)), [k.encode() + b"q", b"job"], "BLPOP woken by a push")
    pusher.join()
    eq(rc.blpop([k + "q"], timeout=0.1), None, "BLPOP timeout")
    rc.rpush(k + "q", "a")
    eq(rc.brpoplpush(k + "q", k + "r", timeout=1), b"a", "BRPOPLPUSH")
    eq(rc.blmove(k + "r", k + "q", 1, "LEFT", "RIGHT"), b"a", "BLMOVE")
    pusher = later(0.2, lambda: rc.zadd(k + "z", {"m": 1}))
    eq(list(rc.bzpopmin([k + "z"], timeout=5)), [k.encode() + b"z", b"m", 1.0], "BZPOPMIN")
    pusher.join()
    stream = k + "s"
    rc.xadd(stream, {"f": "0"}, id="1-0")
    pusher = later(0.2, lambda: rc.xadd(stream, {"f": "1"}, id="2-0"))
    got = rc.xread({stream: "1-0"}, block=5000)
    entries = got[stream.encode()][0] if isinstance(got, dict) else got[0][1]
    eq(entries, [(b"2-0", {b"f": b"1"})], "XREAD BLOCK")
    pusher.join()
    # Blocked clients do not hold up others.
    waiter = threading.Thread(target=lambda: rc.blpop([k + "slow"], timeout=1))
    waiter.start()
    start = time.monotonic()
    rc.set(k + "fast", "1")
    eq(time.monotonic() - start < 0.5, True, "other clients run while one blocks")
    waiter.join()


def wait_message(ps, kind, timeout=5.0, sharded=False):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sharded and not PLAIN:
            m = ps.get_sharded_message(timeout=0.1)
        else:
            m = ps.get_message(timeout=0.1)
        if m and m["type"] == kind:
            return m
    raise AssertionError(f"no {kind} message within {timeout}s")


def pubsub(rc, p):
    ps = rc.pubsub()
    ps.subscribe(f"{p}:news")
    ps.psubscribe(f"{p}:feed:*")
    wait_message(ps, "subscribe")
    wait_message(ps, "psubscribe")
    # PUBLISH through every node: subscribers anywhere get it.
    # PUBLISH through every node (every endpoint): subscribers anywhere get it.
    publishers = ([(e, client(e)) for e in ENDPOINTS] if PLAIN
                  else [(n.name, rc) for n in rc.get_primaries()])
    for i, (name, pub) in enumerate(publishers):
        node = None if PLAIN else rc.get_primaries()[i]
        n = pub.execute_command("PUBLISH", f"{p}:news", f"from {name}", **on(node))
        eq(n >= 1, True, f"PUBLISH via {name} reaches the subscriber")
        eq(wait_message(ps, "message")["data"], f"from {name}".encode(), "message")
    rc.publish(f"{p}:feed:1", "x")
    m = wait_message(ps, "pmessage")
    eq((m["channel"], m["data"]), (f"{p}:feed:1".encode(), b"x"), "pmessage")
    ps.close()
    # Sharded pub/sub: by slot, on the channel's owner.
    sp = rc.pubsub()
    sp.ssubscribe(f"{p}:shard")
    wait_message(sp, "ssubscribe", sharded=True)
    eq(rc.spublish(f"{p}:shard", "s1"), 1, "SPUBLISH")
    eq(wait_message(sp, "smessage", sharded=True)["data"], b"s1", "smessage")
    sp.close()


def connection_commands(rc, p):
    node = masters(rc)[0]
    eq(rc.client_setname(f"py{p}", **on(node)), True, "CLIENT SETNAME")
    name = rc.client_getname(**on(node))  # decoded in RESP2 only
    eq(name if isinstance(name, bytes) else name.encode(), f"py{p}".encode(), "CLIENT GETNAME")
    eq(rc.client_id(**on(node)) > 0, True, "CLIENT ID")
    info = rc.execute_command("CLIENT", "INFO", **on(node))
    info = info.decode() if isinstance(info, bytes) else str(info)
    eq(f"name=py{p}" in info, True, f"CLIENT INFO: {info}")
    info = rc.info(**on(node))
    eq(info.get("cluster_enabled"), 1, "INFO cluster_enabled")
    eq("redis_version" in info, True, "INFO server section")
    eq(rc.command_count() > 200, True, "COMMAND COUNT")
    docs = rc.execute_command("COMMAND DOCS", "get", **on(node))
    eq(b"get" in docs or "get" in docs, True, "COMMAND DOCS")


def replicas(rc, p):
    """After READONLY, a proxy serves reads of its partner's slots from the
    replica it hosts (eventually consistent); READWRITE restores -MOVED."""
    key = f"{p}:ro"
    rc.set(key, "v")
    owner = rc.get_node_from_key(key)
    other = next(n for n in rc.get_primaries() if n.name != owner.name)
    direct = Redis(host=other.host, port=other.port, **OPTS)
    try:
        direct.get(key)
        raise AssertionError("a read of another proxy's slot must be redirected")
    except MovedError:
        pass
    eq(direct.execute_command("READONLY"), True, "READONLY")
    deadline = time.monotonic() + 5
    while direct.get(key) != b"v":
        assert time.monotonic() < deadline, "replica read never caught up"
        time.sleep(0.02)
    try:
        direct.set(key, "w")
        raise AssertionError("a write after READONLY must still be redirected")
    except MovedError:
        pass
    eq(direct.execute_command("READWRITE"), True, "READWRITE")
    try:
        direct.get(key)
        raise AssertionError("READWRITE must restore redirects")
    except MovedError:
        pass
    direct.close()


def main():
    global PLAIN, ENDPOINTS
    args = sys.argv[1:]
    if "--password" in args:
        i = args.index("--password")
        OPTS["password"] = args[i + 1]
        del args[i:i + 2]
    if args and args[0] == "--plain":
        PLAIN = True
        args = args[1:]
    ENDPOINTS = args
    assert ENDPOINTS, __doc__
    families = [strings, hashes, lists, sets, sorted_sets, streams, bitmaps_hll_geo,
                keyspace, transactions, scripts, blocking, pubsub, connection_commands]
    if not PLAIN:
        families.append(replicas)
    run = os.urandom(4).hex()  # fresh keys, so reruns against one cluster work
    for protocol in (3, 2):
        OPTS["protocol"] = protocol
        rc = client()
        p = f"r{protocol}-{run}"
        for family in families:
            family(rc, p)
            print(f"RESP{protocol} {family.__name__}: ok", flush=True)
        rc.close()


if __name__ == "__main__":
    main()
