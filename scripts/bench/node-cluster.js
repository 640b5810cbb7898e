// Reference server for scripts/bench.sh: Node.js `cluster` with N workers.
// The scheduling policy comes from NODE_CLUSTER_SCHED_POLICY (rr | none), read by
// Node itself. Env: PORT, WORKERS (default 2), HOST (default 127.0.0.1).
// Like a typical production cluster master it re-forks a worker that dies and does a
// rolling restart on SIGHUP (fork the new worker, disconnect the old one once the new
// one listens). The response mirrors the project's demo service.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const port = Number(process.env.PORT || 8080);
const host = process.env.HOST || '127.0.0.1';
const workers = Number(process.env.WORKERS || 2);

if (cluster.isPrimary) {
  let stopping = false;
  const slot = new Map(); // cluster worker id -> demo worker id (0..N-1)
  const fork = (n) => { const w = cluster.fork({ WORKER_ID: String(n) }); slot.set(w.id, n); return w; };
  for (let i = 0; i < workers; i++) fork(i);
  cluster.on('exit', (w) => {
    const n = slot.get(w.id); slot.delete(w.id);
    if (!stopping && !w.exitedAfterDisconnect) fork(n);
  });
  process.on('SIGHUP', () => {
    for (const old of Object.values(cluster.workers)) {
      if (!old || old.isDead() || !slot.has(old.id)) continue;
      const fresh = fork(slot.get(old.id));
      fresh.once('listening', () => {
        old.disconnect();
        setTimeout(() => { if (!old.isDead()) old.kill('SIGKILL'); }, 5000).unref();
      });
    }
  });
  const stop = () => {
    stopping = true;
    for (const w of Object.values(cluster.workers)) w && w.process.kill('SIGTERM');
    setTimeout(() => process.exit(0), 200);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const id = process.env.WORKER_ID || String(cluster.worker.id);
  const body = `hello from worker ${id}\n`;
  http.createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body), 'X-Worker': id });
    res.end(body);
  }).listen(port, host);
}
