// The baseline: a bare node:http server that reads each request body and answers with a
// precomputed body (the bytes of a real mxkeys answer captured by the harness) and the same
// headers mxkeys sends. Plain JavaScript with no loader, run like mxkeys: `node FILE`.
//
//   node bench/baseline-server.mjs PORT BODY_FILE HEADERS_JSON
import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';

const [port, bodyFile, headersJson] = process.argv.slice(2);
const body = readFileSync(bodyFile);
const headers = { ...JSON.parse(headersJson ?? '{}'), 'content-length': String(body.length) };

const server = createServer((req, res) => {
  req.on('data', () => {});
  req.on('end', () => {
    res.writeHead(200, headers);
    res.end(body);
  });
});
server.keepAliveTimeout = 72_000;
server.listen(Number(port), '127.0.0.1');
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
});
