// One authorization server in a process of its own (tests/oidc/provider.mjs):
//
//   node tests/oidc/oidc_server.mjs CONFIG.json
//
// Prints "READY <issuer>" once listening, and one JSON line per notable server event on
// stderr. Exits on SIGTERM. For a test that needs the process itself: one that stops it
// (SIGSTOP), or one serving https, whose trust (NODE_EXTRA_CA_CERTS) is the process's; the
// others share a process (oidc_host.mjs).

import { readFileSync } from 'node:fs';
import { startProvider } from './provider.mjs';

const cfg = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const log = (event, fields = {}) => process.stderr.write(`${JSON.stringify({ event, ...fields })}\n`);
const { issuer, server } = await startProvider(cfg, log);
process.stdout.write(`READY ${issuer}\n`);
process.on('SIGTERM', () => server.close(() => process.exit(0)));
process.on('SIGINT', () => server.close(() => process.exit(0)));
