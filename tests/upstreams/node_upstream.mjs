// A logging MCP-server stand-in on Node's own `http` module (llhttp, strict: no
// insecureHTTPParser, no lenient flags), for the smuggling corpus and the differential test.
//
//   node tests/upstreams/node_upstream.mjs FD LOGFILE ISSUER RESOURCE
//
// It serves the listening socket inherited as FD (the test binds it, so the port is known
// before the authorization server that must name it as a resource starts). Every request llhttp
// parsed is appended to LOGFILE as one JSON line BEFORE it is answered, so a response the
// test has read implies its line is on disk:
//   {"server": "node", "kind": "request" | "connect" | "upgrade" | "expectation",
//    "conn": N, "method", "target" (the raw request-target), "version",
//    "headers": [[name, value], ...] (as received, in order, duplicates kept),
//    "trailers": [[name, value], ...], "complete": bool (the body ended),
//    "body_len", "body_sha256", "body_b64" (first 64 KiB)}
// Requests llhttp refused are logged as {"kind": "client_error", "code": ...}: they were not
// parsed, so the test does not count them, but they explain a case.
//
// Answers: an unauthenticated request gets 401 with a Bearer challenge naming the RFC 9728
// metadata, which is served at /.well-known/oauth-protected-resource/mcp; any request with an
// Authorization field gets 200 application/json echoing the JSON-RPC id(s) (202 for a
// notification). This server checks no token: the tests check what arrived.

import { createServer } from 'node:http';
import { openSync, writeSync } from 'node:fs';
import { createHash } from 'node:crypto';

const [listenFd, logPath, issuer, resource] = process.argv.slice(2);
const logFd = openSync(logPath, 'a');
const origin = new URL(resource).origin;
const prmPath = `/.well-known/oauth-protected-resource${new URL(resource).pathname}`;
const BODY_KEEP = 64 * 1024;

const pairs = (raw) => {
  const out = [];
  for (let i = 0; i < raw.length; i += 2) out.push([raw[i], raw[i + 1]]);
  return out;
};

const log = (record) => writeSync(logFd, `${JSON.stringify({ server: 'node', ...record })}\n`);

const describe = (req, kind, body, complete) => ({
  kind,
  conn: req.socket.credlessConn,
  method: req.method,
  target: req.url,
  version: req.httpVersion,
  headers: pairs(req.rawHeaders),
  trailers: pairs(req.rawTrailers || []),
  complete,
  body_len: body.length,
  body_sha256: createHash('sha256').update(body).digest('hex'),
  body_b64: body.subarray(0, BODY_KEEP).toString('base64'),
});

const jsonRpcAnswer = (body) => {
  let msg;
  try { msg = JSON.parse(body.toString('utf8')); } catch { msg = undefined; }
  const one = (m) => (m && typeof m === 'object' && 'id' in m
    ? { jsonrpc: '2.0', id: m.id, result: { echoed: m.method ?? null } } : undefined);
  if (Array.isArray(msg)) {
    const out = msg.map(one).filter(Boolean);
    return out.length ? out : undefined;
  }
  if (msg === undefined) return { jsonrpc: '2.0', id: null, result: {} };   // not JSON: GET, DELETE
  return one(msg);
};

const send = (res, status, headers, body) => {
  const buf = Buffer.from(body);
  res.writeHead(status, { ...headers, 'Content-Length': buf.length });
  res.end(buf);
};

const answer = (req, res, body) => {
  if (req.method === 'GET' && req.url === prmPath && !req.headers.authorization) {
    send(res, 200, { 'Content-Type': 'application/json' },
      JSON.stringify({ resource, authorization_servers: [issuer] }));
  } else if (!req.headers.authorization) {
    send(res, 401, {
      'Content-Type': 'application/json',
      'WWW-Authenticate': `Bearer resource_metadata="${origin}${prmPath}"`,
    }, JSON.stringify({ error: 'unauthorized' }));
  } else {
    const out = jsonRpcAnswer(body);
    if (out === undefined) send(res, 202, {}, '');
    else send(res, 200, { 'Content-Type': 'application/json' }, JSON.stringify(out));
  }
};

const server = createServer((req, res) => {
  const chunks = [];
  let ended = false;
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    ended = true;
    const body = Buffer.concat(chunks);
    log(describe(req, 'request', body, true));
    answer(req, res, body);
  });
  req.on('close', () => {
    if (!ended) log(describe(req, 'request', Buffer.concat(chunks), false));
  });
});

let conns = 0;
server.on('connection', (socket) => { socket.credlessConn = ++conns; });
// Requests Node does not hand to the 'request' listener: still parsed requests, so logged.
server.on('checkExpectation', (req, res) => {
  log(describe(req, 'expectation', Buffer.alloc(0), false));
  send(res, 417, {}, '');
});
server.on('connect', (req, socket) => {
  log(describe(req, 'connect', Buffer.alloc(0), true));
  socket.end('HTTP/1.1 200 Connection Established\r\n\r\n');
});
server.on('upgrade', (req, socket) => {
  log(describe(req, 'upgrade', Buffer.alloc(0), true));
  socket.end('HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
});
server.on('clientError', (err, socket) => {
  log({ kind: 'client_error', conn: socket.credlessConn, code: err.code,
    reason: err.reason ?? err.message });
  const status = err.code === 'HPE_HEADER_OVERFLOW'
    ? '431 Request Header Fields Too Large' : '400 Bad Request';
  if (socket.writable) {
    socket.end(`HTTP/1.1 ${status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
  } else {
    socket.destroy();
  }
});

server.listen({ fd: Number(listenFd) },
  () => process.stdout.write(`READY ${server.address().port}\n`));
process.on('SIGTERM', () => {
  server.closeAllConnections();
  server.close(() => process.exit(0));
});
