// A credential-less MCP workload on the official TypeScript SDK: no auth configured.
//   node tests/mcp/client.mjs URL [TOOL [JSON-ARGS]]
// Lists the tools and calls TOOL (default: echo {"text": "from typescript"}). Prints one JSON
// line: the tool names and the call's text, or {"error", "message", "status"} with the
// message the SDK surfaced (a StreamableHTTPError carries the HTTP status as its code and
// the answer's body in its message; an McpError the JSON-RPC code).
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

// the SDK is installed with the test peers under tests/oidc/node_modules
const require = createRequire(join(dirname(fileURLToPath(import.meta.url)), '..', 'oidc', 'package.json'));
const { Client } = await import(require.resolve('@modelcontextprotocol/sdk/client/index.js'));
const { StreamableHTTPClientTransport } = await import(require.resolve('@modelcontextprotocol/sdk/client/streamableHttp.js'));

const url = process.argv[2];
const tool = process.argv[3] ?? 'echo';
const args = process.argv[4] ? JSON.parse(process.argv[4]) : (tool === 'echo' ? { text: 'from typescript' } : {});
const client = new Client({ name: 'credless-ts-workload', version: '1.0.0' });
try {
  await client.connect(new StreamableHTTPClientTransport(new URL(url)));
  const tools = await client.listTools();
  const result = await client.callTool({ name: tool, arguments: args });
  console.log(JSON.stringify({ tools: tools.tools.map((t) => t.name).sort(), text: result.content.map((c) => c.text).join('') }));
} catch (e) {
  console.log(JSON.stringify({ error: e.constructor.name, message: String(e.message).slice(0, 2000), status: e.code ?? null, data: e.data ?? null }));
  process.exitCode = 1;
} finally {
  // a connected client holds its session's stream open: close it, or node never exits
  await client.close().catch(() => {});
}
