// A stock Node.js HTTP server whose handler takes DELAY ms (as a database call would). It counts what it did:
// requests received, answered (the response finished) and abandoned (the connection went before it finished),
// and prints them as JSON on SIGTERM. Usage: node slow_http.js PORT DELAY_MS
const http = require('http');
const port = Number(process.argv[2]);
const delay = Number(process.argv[3] || 20);
const counts = { requests: 0, answered: 0, abandoned: 0 };
const server = http.createServer((req, res) => {
  counts.requests++;
  req.resume();
  res.on('finish', () => { counts.answered++; });
  res.on('close', () => { if (!res.writableFinished) counts.abandoned++; });
  setTimeout(() => {
    const body = 'answered ' + req.url + '\n';
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  }, delay);
});
server.listen(port, '127.0.0.1', () => { console.log('listening ' + server.address().port); });
process.on('SIGTERM', () => {
  console.log(JSON.stringify(counts));
  process.exit(0);
});
