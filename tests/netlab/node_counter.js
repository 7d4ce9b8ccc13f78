// A stock Node.js HTTP server as the local --to: counts connections, requests and client errors (what a
// ClientHello sent to a plaintext port causes), and writes the counts to the file named by argv[2] on every event.
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
server.listen(0, '127.0.0.1', () => { save(); console.log('listening ' + server.address().port); });
process.on('SIGTERM', () => { save(); process.exit(0); });
