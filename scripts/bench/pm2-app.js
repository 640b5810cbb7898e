// Reference server for scripts/bench.sh run by PM2 in cluster mode (`-i N`).
// PM2 is the cluster master; this file is only the worker. Env: PORT, HOST.
'use strict';
const http = require('node:http');
const port = Number(process.env.PORT || 8080);
const host = process.env.HOST || '127.0.0.1';
const id = process.env.NODE_APP_INSTANCE || process.env.pm_id || '0';
const body = `hello from worker ${id}\n`;
http.createServer((req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body), 'X-Worker': id });
  res.end(body);
}).listen(port, host);
