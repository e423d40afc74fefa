#!/usr/bin/env python3
"""redmesh from Python: the gRPC API through stubs generated from proto/,
then the data through redis-py's RedisCluster.

What it does, step by step:
  1. generates the Python stubs from ../../proto into ./gen (grpcio-tools),
  2. registers the proxies given with --proxy (idempotent; skip with none),
  3. creates cluster --cluster with --nodes Redis nodes from the free pool,
  4. streams the topology of one member proxy until its view shows the
     cluster (the same stream proxies follow),
  5. writes and reads keys through redis-py's RedisCluster on that proxy,
  6. deletes the cluster again (unless --keep), returning its proxies.

Against the local system (./deploy/local/up.sh; proxy-3 and proxy-4 are free):
  pip install -r requirements.txt
  python quickstart.py --broker 127.0.0.1:7400
"""
import argparse
import importlib.resources
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
PROTO = HERE.parent.parent / "proto"
GEN = HERE / "gen"


def generate_stubs():
    """Generates redmesh/v1/*_pb2(_grpc).py into ./gen from the .proto files."""
    GEN.mkdir(exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "redmesh" / "v1").glob("*.proto"))
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}", f"-I{well_known}",
         f"--python_out={GEN}", f"--grpc_python_out={GEN}", *protos],
        check=True,
    )
    sys.path.insert(0, str(GEN))


def parse_proxy(text):
    """ID,RESP,ADMIN,HOST,REDIS1;REDIS2 -> ProxySpec fields."""
    parts = text.split(",")
    if len(parts) != 5:
        raise argparse.ArgumentTypeError("expected ID,RESP,ADMIN,HOST,REDIS1;REDIS2")
    pid, resp, admin, host, redis = parts
    return dict(id=pid, resp_address=resp, admin_address=admin, host=host,
                redis_nodes=redis.split(";"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", default="127.0.0.1:7400", help="broker gRPC address")
    ap.add_argument("--proxy", type=parse_proxy, action="append", default=[],
                    help="register this proxy first: ID,RESP,ADMIN,HOST,REDIS1;REDIS2 (repeatable)")
    ap.add_argument("--cluster", default="py-example")
    ap.add_argument("--nodes", type=int, default=4, help="Redis nodes (multiple of 4)")
    ap.add_argument("--keep", action="store_true", help="do not delete the cluster at the end")
    args = ap.parse_args()

    generate_stubs()
    import grpc
    from redis.cluster import RedisCluster
    from redmesh.v1 import broker_pb2, broker_pb2_grpc, model_pb2, topology_pb2, topology_pb2_grpc

    channel = grpc.insecure_channel(args.broker)
    broker = broker_pb2_grpc.BrokerStub(channel)
    topology = topology_pb2_grpc.TopologyStub(channel)

    for spec in args.proxy:
        r = broker.RegisterProxy(broker_pb2.RegisterProxyRequest(proxy=model_pb2.ProxySpec(**spec)))
        print(f"registered {spec['id']} (changed: {r.changed})")

    try:
        created = broker.CreateCluster(broker_pb2.CreateClusterRequest(
            name=args.cluster, node_count=args.nodes, config=model_pb2.ClusterConfig()))
    except grpc.RpcError as e:
        sys.exit(f"CreateCluster refused: {e.code().name}: {e.details()}")
    cluster = created.cluster
    members = [pid for chunk in cluster.chunks for pid in chunk.proxy_ids]
    print(f"created cluster {cluster.name}: epoch {cluster.epoch}, proxies {', '.join(members)}")

    try:
        # The view a member proxy is pushed, as a stream.
        first = members[0]
        deadline = time.monotonic() + 20
        stream = topology.WatchTopology(topology_pb2.WatchTopologyRequest(proxy_id=first), timeout=20)
        view = None
        for event in stream:
            if event.HasField("view") and event.view.cluster.name == cluster.name:
                view = event.view
                break
            if time.monotonic() > deadline:
                break
        stream.cancel()
        if view is None:
            sys.exit(f"no topology view of {first} showed cluster {cluster.name}")
        entry = view.proxy.spec.resp_address
        print(f"topology of {first}: epoch {view.epoch}, {len(view.members)} members, RESP {entry}")

        # Data through the cluster protocol; wait until the proxies serve it.
        host, port = entry.rsplit(":", 1)
        deadline = time.monotonic() + 20
        while True:
            try:
                rc = RedisCluster(host=host, port=int(port), socket_timeout=2)
                break
            except Exception as e:  # the proxies may still be applying the view
                if time.monotonic() > deadline:
                    raise
                print(f"waiting for the cluster: {e}")
                time.sleep(0.2)
        for i in range(100):
            rc.set(f"py-example:{i}", f"value-{i}")
        values = [rc.get(f"py-example:{i}") for i in range(100)]
        assert values == [f"value-{i}".encode() for i in range(100)], values
        nodes = {n.name for n in rc.get_nodes()}
        print(f"RedisCluster: 100 keys written and read back through {len(nodes)} nodes")
        rc.close()
    finally:
        if not args.keep:
            broker.DeleteCluster(broker_pb2.DeleteClusterRequest(name=cluster.name))
            print(f"deleted cluster {cluster.name}")


if __name__ == "__main__":
    main()
