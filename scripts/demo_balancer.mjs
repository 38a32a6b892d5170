// The same-origin front of `scripts/demo --instances N`: a TCP (layer-4) round-robin balancer.
//
//   node scripts/demo_balancer.mjs 127.0.0.1:8443 127.0.0.1:8501 127.0.0.1:8502 127.0.0.1:8503
//
// Each new client connection goes to the next instance in turn; bytes are copied both ways
// untouched, so TLS passes through and browsers see one origin (https://localhost:8443) however
// many coatcheck processes answer behind it. It cannot add a header (it never sees HTTP): the
// demo's page learns which instance served a call from the sample API (each instance forwards to
// it under /i/<n>). A browser keeps its connection open for many requests, so a second browser
// (or a private window) is the way to reach another instance. Every connection is logged on stderr.

import * as net from 'node:net';

const [listen, ...backends] = process.argv.slice(2);
const split = (addr) => {
  const i = addr.lastIndexOf(':');
  return { host: addr.slice(0, i), port: Number(addr.slice(i + 1)) };
};
if (!listen || backends.length === 0) {
  console.error('usage: node scripts/demo_balancer.mjs LISTEN_ADDR BACKEND_ADDR...');
  process.exit(64);
}

let next = 0;
let count = 0;
const server = net.createServer((client) => {
  const n = next;
  next = (next + 1) % backends.length;
  count += 1;
  console.error(`[balancer] connection ${count} → instance ${n + 1} (${backends[n]})`);
  const upstream = net.connect(split(backends[n]));
  client.pipe(upstream).pipe(client);
  const close = () => {
    client.destroy();
    upstream.destroy();
  };
  client.on('error', close);
  upstream.on('error', close);
  client.on('close', close);
  upstream.on('close', close);
});
server.on('error', (e) => {
  console.error(`[balancer] ${e.message}`);
  process.exit(1);
});
const { host, port } = split(listen);
server.listen(port, host, () => console.error(`[balancer] listening on ${listen}, ${backends.length} instances`));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
