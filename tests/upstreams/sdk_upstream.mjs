// The official MCP TypeScript SDK's server, as a harness upstream (tests/upstreams/harness.py):
// createMcpExpressApp() (express.json(): body-parser) and a stateless Streamable HTTP
// transport, serving the tools echo, add and secret_tool.
//
//   node tests/upstreams/sdk_upstream.mjs FD LOGFILE ISSUER RESOURCE
//
// Same arguments, READY line and Bearer challenge as node_upstream.mjs. What it logs is the
// SDK's own view, appended before each answer: {"server": "sdk", "kind": "request", "method",
// "target", "headers", "parsed": the body as express.json() decoded it} for every request it
// handles, and {"server": "sdk", "kind": "tool", "name"} for every tool it runs. The body is
// decoded in the charset the request declares (body-parser reads any utf-* through
// iconv-lite), which is why a test asks this server, not a raw logger, what ran.
import { createRequire } from 'node:module';
import { openSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

// the SDK is installed with the test peers under tests/oidc/node_modules
const require = createRequire(join(dirname(fileURLToPath(import.meta.url)), '..', 'oidc', 'package.json'));
const { McpServer } = await import(require.resolve('@modelcontextprotocol/sdk/server/mcp.js'));
const { StreamableHTTPServerTransport } = await import(require.resolve('@modelcontextprotocol/sdk/server/streamableHttp.js'));
const { createMcpExpressApp } = await import(require.resolve('@modelcontextprotocol/sdk/server/express.js'));

const [listenFd, logPath, issuer, resource] = process.argv.slice(2);
const logFd = openSync(logPath, 'a');
const log = (record) => writeSync(logFd, `${JSON.stringify({ server: 'sdk', ...record })}\n`);
const prmPath = `/.well-known/oauth-protected-resource${new URL(resource).pathname}`;

const pairs = (raw) => {
  const out = [];
  for (let i = 0; i < raw.length; i += 2) out.push([raw[i], raw[i + 1]]);
  return out;
};

function mcpServer() {
  const server = new McpServer({ name: 'credless-sdk-upstream', version: '1.0.0' });
  for (const name of ['echo', 'add', 'secret_tool']) {
    server.registerTool(name, { description: name }, async () => {
      log({ kind: 'tool', name });
      return { content: [{ type: 'text', text: `ran ${name}` }] };
    });
  }
  return server;
}

const app = createMcpExpressApp({ host: '127.0.0.1' });
app.get(prmPath, (req, res) => res.json({ resource, authorization_servers: [issuer] }));
app.all('/mcp', async (req, res) => {
  log({
    kind: 'request',
    method: req.method,
    target: req.originalUrl,
    headers: pairs(req.rawHeaders),
    parsed: req.body ?? null,
  });
  if (!req.headers.authorization) {
    res.set('WWW-Authenticate', `Bearer resource_metadata="${new URL(resource).origin}${prmPath}"`);
    res.status(401).json({ error: 'invalid_token' });
    return;
  }
  const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined, enableJsonResponse: true });
  await mcpServer().connect(transport);
  await transport.handleRequest(req, res, req.body);
});
app.listen({ fd: Number(listenFd) }, () => process.stdout.write('READY\n'));
