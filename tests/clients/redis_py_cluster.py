"""redis-py's RedisCluster against a redmesh cluster, in RESP3 (redis-py's
default) and RESP2. Usage: redis_py_cluster.py HOST PORT [PASSWORD [CA]]:
with CA (a PEM file), over TLS verifying the proxies against it; an empty
PASSWORD means none. Exits non-zero with a message on the first wrong
answer, and prints the nodes the client found."""
import sys

from redis.cluster import RedisCluster


def check(protocol, host, port, password, ca):
    tls = {"ssl": True, "ssl_ca_certs": ca} if ca else {}
    rc = RedisCluster(host=host, port=port, protocol=protocol, password=password, **tls)
    for i in range(500):
        rc.set(f"py:{protocol}:{i}", i)
    for i in range(500):
        got = rc.get(f"py:{protocol}:{i}")
        assert got == str(i).encode(), f"RESP{protocol}: py:{i} = {got!r}"
    rc.hset("{h}map", mapping={"a": 1, "b": 2})
    assert rc.hgetall("{h}map") == {b"a": b"1", b"b": b"2"}, rc.hgetall("{h}map")
    rc.zadd("{z}set", {"m": 1.5})
    assert rc.zscore("{z}set", "m") == 1.5
    assert rc.mget_nonatomic(f"py:{protocol}:1", f"py:{protocol}:2") == [b"1", b"2"]
    assert rc.delete(f"py:{protocol}:1") == 1
    nodes = sorted(n.name for n in rc.get_nodes())
    assert len(nodes) >= 2, nodes
    rc.close()
    print(f"RESP{protocol}: ok, nodes {nodes}")


if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    password = sys.argv[3] or None if len(sys.argv) > 3 else None
    ca = sys.argv[4] if len(sys.argv) > 4 else None
    for protocol in (3, 2):
        check(protocol, host, port, password, ca)
