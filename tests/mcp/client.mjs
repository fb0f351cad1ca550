// A credential-less MCP workload on the official TypeScript SDK: no auth configured.
//   node tests/mcp/client.mjs URL
// Prints one JSON line: the tool names and the echo result, or {"error": ...}.
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

// the SDK is installed with the test peers under tests/oidc/node_modules
const require = createRequire(join(dirname(fileURLToPath(import.meta.url)), '..', 'oidc', 'package.json'));
const { Client } = await import(require.resolve('@modelcontextprotocol/sdk/client/index.js'));
const { StreamableHTTPClientTransport } = await import(require.resolve('@modelcontextprotocol/sdk/client/streamableHttp.js'));

const url = process.argv[2];
try {
  const client = new Client({ name: 'credless-ts-workload', version: '1.0.0' });
  await client.connect(new StreamableHTTPClientTransport(new URL(url)));
  const tools = await client.listTools();
  const result = await client.callTool({ name: 'echo', arguments: { text: 'from typescript' } });
  console.log(JSON.stringify({ tools: tools.tools.map((t) => t.name).sort(), text: result.content.map((c) => c.text).join('') }));
  await client.close();
} catch (e) {
  console.log(JSON.stringify({ error: e.constructor.name, message: String(e.message).slice(0, 300), status: e.code ?? null }));
  process.exitCode = 1;
}
