// Authorization servers for one test process (a pytest worker), served one after another by
// one node process (tests/oidc/provider.mjs), so that a test's authorization server costs a
// provider's start, not node's and oidc-provider's (about 0.25 s of CPU, some 150 times a run).
// Each provider has a storage of its own (oidc-provider's in-memory adapter is made per
// provider), its own keys and its own listening socket; its events go to its own log file.
//
//   node tests/oidc/oidc_host.mjs ANSWER_FD
//
// Requests on stdin, one JSON line each; one answer line on ANSWER_FD for each, in order
// (not stdout: oidc-provider prints its notices there):
//   {"id": N, "op": "start", "config": CONFIG.json, "log": FILE}  -> {"id": N, "issuer": ...}
//   {"id": N, "op": "stop", "issuer": ISSUER}                      -> {"id": N, "stopped": true}
// A failure answers {"id": N, "error": "..."}. Exits when stdin closes (its test process
// ended), its providers with it.

import { appendFileSync, readFileSync, writeSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { startProvider } from './provider.mjs';

const running = new Map(); // issuer -> close()
const answers = Number(process.argv[2]);
const answer = (obj) => writeSync(answers, `${JSON.stringify(obj)}\n`);

const handle = async (req) => {
  if (req.op === 'start') {
    const cfg = JSON.parse(readFileSync(req.config, 'utf8'));
    const log = (event, fields = {}) => appendFileSync(req.log, `${JSON.stringify({ event, ...fields })}\n`);
    const { issuer, close } = await startProvider(cfg, log);
    running.set(issuer, close);
    return { issuer };
  }
  if (req.op === 'stop') {
    const close = running.get(req.issuer);
    running.delete(req.issuer);
    if (close) await close();
    return { stopped: Boolean(close) };
  }
  throw new Error(`unknown op ${JSON.stringify(req.op)}`);
};

// one request at a time, answered in order
let queue = Promise.resolve();
createInterface({ input: process.stdin }).on('line', (line) => {
  queue = queue.then(async () => {
    let req;
    try {
      req = JSON.parse(line);
      answer({ id: req.id, ...(await handle(req)) });
    } catch (e) {
      answer({ id: req?.id, error: String(e?.stack || e) });
    }
  });
}).on('close', () => queue.then(() => process.exit(0)));
