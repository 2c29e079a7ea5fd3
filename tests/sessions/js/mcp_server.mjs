// A stateful MCP server (TypeScript SDK, Streamable HTTP, in-memory sessions) that logs every request.
//
// Usage: node mcp_server.mjs PORT MACHINE LOGFILE [ALLOWED_HOST,...]
//
// Tools: whoami (the machine name), slow_count(n) (n progress notifications, then n).
// Each HTTP request appends one JSON line to LOGFILE on arrival:
// {"t", "machine", "method", "path", "sid", "host", "last_event_id"}.
//
// createMcpExpressApp() with the default host (127.0.0.1) only accepts Host names localhost,
// 127.0.0.1 and [::1] (403 "Invalid Host: mcp.test" otherwise); allowedHosts names the public
// hostname tern passes through (docs/mcp.md).
import { randomUUID } from 'node:crypto';
import { appendFileSync } from 'node:fs';
import { McpServer } from '@modelcontextprotocol/sdk/server/mcp.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { createMcpExpressApp } from '@modelcontextprotocol/sdk/server/express.js';
import { isInitializeRequest } from '@modelcontextprotocol/sdk/types.js';
import { z } from 'zod';

const [port, machine, logFile, hosts] = process.argv.slice(2);
const allowedHosts = (hosts || 'mcp.test').split(',').concat(['localhost', '127.0.0.1']);

function makeServer() {
  const server = new McpServer({ name: 'tern-harness', version: '1.0.0' });
  server.registerTool('whoami', { description: 'The machine this session lives on.' }, async () => ({
    content: [{ type: 'text', text: machine }],
  }));
  server.registerTool(
    'slow_count',
    { description: 'Sends n progress notifications, then returns n.', inputSchema: { n: z.number().int() } },
    async ({ n }, extra) => {
      const token = extra._meta?.progressToken;
      for (let i = 0; i < n; i++) {
        if (token !== undefined) {
          await extra.sendNotification({
            method: 'notifications/progress',
            params: { progressToken: token, progress: i + 1, total: n, message: `step ${i + 1}` },
          });
        }
        await new Promise((r) => setTimeout(r, 10));
      }
      return { content: [{ type: 'text', text: String(n) }] };
    },
  );
  return server;
}

const transports = new Map();
const app = createMcpExpressApp({ host: '127.0.0.1', allowedHosts });

// Logged before host validation, so a request refused for its Host still shows it reached us.
app.use((req, res, next) => {
  appendFileSync(
    logFile,
    JSON.stringify({
      t: Date.now() / 1000,
      machine,
      method: req.method,
      path: req.path,
      sid: req.headers['mcp-session-id'] ?? null,
      host: req.headers.host ?? null,
      last_event_id: req.headers['last-event-id'] ?? null,
    }) + '\n',
  );
  next();
});

const notFound = (res) =>
  res.status(404).json({ jsonrpc: '2.0', error: { code: -32001, message: 'Session not found' }, id: null });

app.all('/mcp', async (req, res) => {
  const sid = req.headers['mcp-session-id'];
  try {
    if (sid) {
      const t = transports.get(sid);
      if (!t) return notFound(res);
      return await t.handleRequest(req, res, req.body);
    }
    if (req.method === 'POST' && isInitializeRequest(req.body)) {
      const transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        onsessioninitialized: (id) => transports.set(id, transport),
      });
      transport.onclose = () => transport.sessionId && transports.delete(transport.sessionId);
      await makeServer().connect(transport);
      return await transport.handleRequest(req, res, req.body);
    }
    res.status(400).json({ jsonrpc: '2.0', error: { code: -32000, message: 'Bad Request: no session id' }, id: null });
  } catch (e) {
    console.error(e);
    if (!res.headersSent) res.status(500).end();
  }
});

app.listen(Number(port), '127.0.0.1', () => console.log(`listening 127.0.0.1:${port}`));
