// A stock Node.js HTTP server as the local --to: counts connections, requests and client errors (what a
// ClientHello sent to a plaintext port causes), and writes the counts to the file named by argv[2] on every event.
// argv[3] and argv[4], optional: the port (0) and address (127.0.0.1) to listen on. It has no 'upgrade' listener,
// so it declines an HTTP/1.1 `Upgrade: h2c` by answering the request with 200 on HTTP/1.1.
'use strict';
const http = require('http');
const fs = require('fs');
const out = process.argv[2];
const counts = { connections: 0, requests: 0, client_errors: 0, paths: [] };
const save = () => fs.writeFileSync(out, JSON.stringify(counts));
const server = http.createServer((req, res) => {
  counts.requests += 1;
  counts.paths.push(req.method + ' ' + req.url);
  save();
  req.resume();
  req.on('end', () => res.end('ok\n'));
});
server.on('connection', () => { counts.connections += 1; save(); });
server.on('clientError', (err, socket) => { counts.client_errors += 1; save(); socket.destroy(); });
server.listen(Number(process.argv[3] || 0), process.argv[4] || '127.0.0.1', () => { save(); console.log('listening ' + server.address().port); });
process.on('SIGTERM', () => { save(); process.exit(0); });
