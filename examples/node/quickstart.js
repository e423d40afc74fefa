#!/usr/bin/env node
// redmesh's gRPC API from Node.js, loading proto/ at run time with
// @grpc/proto-loader (no generated code): registers the proxies given with
// --proxy, creates a cluster from the free pool, streams one member proxy's
// topology until it shows the cluster, then deletes the cluster (unless
// --keep).
//
// Against the local system (./deploy/local/up.sh; proxy-3 and proxy-4 are
// free):   npm install && node quickstart.js --broker 127.0.0.1:7400
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function parseArgs(argv) {
  const args = { broker: '127.0.0.1:7400', proxies: [], cluster: 'node-example', nodes: 4, keep: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--broker') args.broker = next();
    else if (a === '--cluster') args.cluster = next();
    else if (a === '--nodes') args.nodes = Number(next());
    else if (a === '--keep') args.keep = true;
    else if (a === '--proxy') {
      // ID,RESP,ADMIN,HOST,REDIS1;REDIS2
      const parts = next().split(',');
      if (parts.length !== 5) throw new Error('--proxy expects ID,RESP,ADMIN,HOST,REDIS1;REDIS2');
      const [id, resp, admin, host, redis] = parts;
      args.proxies.push({ id, respAddress: resp, adminAddress: admin, host, redisNodes: redis.split(';') });
    } else throw new Error(`unknown argument ${a}`);
  }
  return args;
}

// Promise form of a unary call, with the gRPC status in the error.
function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + 10000 }, (err, reply) => {
      if (err) reject(new Error(`${method}: ${grpc.status[err.code]}: ${err.details}`));
      else resolve(reply);
    });
  });
}

// The first topology view of `proxyId` that shows `cluster`.
function firstView(topology, proxyId, cluster) {
  return new Promise((resolve, reject) => {
    const stream = topology.WatchTopology({ proxyId }, { deadline: Date.now() + 20000 });
    stream.on('data', (ev) => {
      if (ev.view && ev.view.cluster && ev.view.cluster.name === cluster) {
        stream.cancel();
        resolve(ev.view);
      }
    });
    stream.on('error', (err) => {
      if (err.code !== grpc.status.CANCELLED) reject(new Error(`WatchTopology: ${err.details}`));
    });
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const protoDir = path.resolve(__dirname, '..', '..', 'proto');
  const def = protoLoader.loadSync(
    ['redmesh/v1/broker.proto', 'redmesh/v1/topology.proto'],
    { includeDirs: [protoDir], longs: Number, enums: String, defaults: true, keepCase: false },
  );
  const v1 = grpc.loadPackageDefinition(def).redmesh.v1;
  const creds = grpc.credentials.createInsecure();
  const broker = new v1.Broker(args.broker, creds);
  const topology = new v1.Topology(args.broker, creds);

  for (const spec of args.proxies) {
    const r = await call(broker, 'RegisterProxy', { proxy: spec });
    console.log(`registered ${spec.id} (changed: ${r.changed})`);
  }
  const { cluster } = await call(broker, 'CreateCluster', { name: args.cluster, nodeCount: args.nodes, config: {} });
  const members = cluster.chunks.flatMap((c) => c.proxyIds);
  console.log(`created cluster ${cluster.name}: epoch ${cluster.epoch}, proxies ${members.join(', ')}`);
  try {
    const view = await firstView(topology, members[0], cluster.name);
    console.log(`topology of ${members[0]}: epoch ${view.epoch}, ${view.members.length} members, RESP ${view.proxy.spec.respAddress}`);
    const got = await call(broker, 'GetCluster', { name: cluster.name });
    console.log(`GetCluster: ${got.cluster.name} has ${got.proxies.length} proxies`);
  } finally {
    if (!args.keep) {
      await call(broker, 'DeleteCluster', { name: cluster.name });
      console.log(`deleted cluster ${cluster.name}`);
    }
    broker.close();
    topology.close();
  }
}

main().catch((e) => {
  console.error(`error: ${e.message}`);
  process.exit(1);
});
