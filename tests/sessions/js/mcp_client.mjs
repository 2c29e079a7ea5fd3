// MCP sessions with the TypeScript SDK whose requests alternate between two tern nodes.
//
// Usage: node mcp_client.mjs --ports A,B [--scheme http|https] [--h2] [--ca CA.pem]
//                            [--sessions N] [--concurrency C] [--host mcp.test]
// Prints one JSON object: {"ok", "failed", "first_error", "sessions": [...]}.
//
// Each session: initialize -> tools/list -> tools/call slow_count (>= 1 progress notification)
// -> the standalone GET SSE stream must have been opened (200) -> tools/call whoami ->
// transport.terminateSession() (DELETE, 200). The custom fetch keeps the URL's host (so Host and
// SNI are the app's name) and alternates the URL's port; the undici Agent's connector always
// dials 127.0.0.1.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Agent, buildConnector, fetch as undiciFetch } from 'undici';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const { values: opts } = parseArgs({
  options: {
    ports: { type: 'string' },
    scheme: { type: 'string', default: 'http' },
    h2: { type: 'boolean', default: false },
    ca: { type: 'string' },
    host: { type: 'string', default: 'mcp.test' },
    sessions: { type: 'string', default: '50' },
    concurrency: { type: 'string', default: '4' },
  },
});
const ports = opts.ports.split(',').map(Number);

function makeAgent(protocols) {
  const tls = opts.ca ? { ca: readFileSync(opts.ca) } : {};
  const base = buildConnector({ ...tls, allowH2: opts.h2 });
  return new Agent({
    allowH2: opts.h2,
    // SNI comes from the URL's host (mcp.test); the socket goes to 127.0.0.1.
    connect: (o, cb) =>
      base({ ...o, hostname: '127.0.0.1' }, (err, sock) => {
        if (sock) protocols.add(sock.alpnProtocol || 'HTTP/1.1');
        cb(err, sock);
      }),
  });
}

async function oneSession(idx) {
  const res = { idx, ok: false, requests: [] };
  const protocols = new Set();
  const agent = makeAgent(protocols);
  let n = 0;
  const altFetch = async (input, init) => {
    const u = new URL(typeof input === 'string' || input instanceof URL ? input : input.url);
    u.port = String(ports[n++ % ports.length]);
    const h = new Headers(init?.headers);
    const rec = { method: init?.method ?? 'GET', port: Number(u.port), sid: h.get('mcp-session-id') };
    res.requests.push(rec);
    try {
      const r = await undiciFetch(u, { ...init, dispatcher: agent });
      rec.status = r.status;
      rec.http_version = [...protocols].map((p) => (p === 'h2' ? 'HTTP/2' : p === 'http/1.1' ? 'HTTP/1.1' : p)).join('+');
      rec.resp_sid = r.headers.get('mcp-session-id');
      rec.tern_error = r.headers.get('tern-error');
      return r;
    } catch (e) {
      rec.error = String(e);
      throw e;
    }
  };
  const transport = new StreamableHTTPClientTransport(new URL(`${opts.scheme}://${opts.host}:${ports[0]}/mcp`), {
    fetch: altFetch,
  });
  const client = new Client({ name: 'tern-harness', version: '1.0.0' });
  try {
    await withTimeout(
      (async () => {
        await client.connect(transport);
        res.token = transport.sessionId;
        const tools = await client.listTools();
        const names = tools.tools.map((t) => t.name).sort();
        if (!names.includes('whoami') || !names.includes('slow_count')) throw new Error(`tools/list: ${names}`);
        let progress = 0;
        const out = await client.callTool({ name: 'slow_count', arguments: { n: 5 } }, undefined, {
          onprogress: () => progress++,
        });
        if (out.isError) throw new Error(`slow_count: ${JSON.stringify(out.content)}`);
        if (!progress) throw new Error('slow_count: no progress notification arrived');
        res.progress = progress;
        const deadline = Date.now() + 5000;
        let get;
        while (!(get = res.requests.find((x) => x.method === 'GET' && (x.status || x.error)))) {
          if (Date.now() > deadline) throw new Error('the SDK never opened the GET SSE stream');
          await new Promise((r) => setTimeout(r, 20));
        }
        if (get.status !== 200) throw new Error(`GET SSE stream: ${get.status ?? get.error} tern-error=${get.tern_error}`);
        const who = await client.callTool({ name: 'whoami', arguments: {} });
        if (who.isError) throw new Error(`whoami: ${JSON.stringify(who.content)}`);
        res.machine = who.content[0].text;
        await transport.terminateSession();
        const del = res.requests.filter((x) => x.method === 'DELETE').pop();
        if (!del) throw new Error('no DELETE was sent');
        if (del.status !== 200) throw new Error(`DELETE: ${del.status} tern-error=${del.tern_error}`);
      })(),
      45000,
    );
    res.ok = true;
  } catch (e) {
    res.error = String(e?.message ?? e).slice(0, 300);
  } finally {
    await client.close().catch(() => {});
    await agent.close().catch(() => {});
  }
  return res;
}

function withTimeout(p, ms) {
  let t;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise((_, rej) => (t = setTimeout(() => rej(new Error(`timed out (${ms / 1000} s)`)), ms))),
  ]);
}

const total = Number(opts.sessions);
const results = [];
let next = 0;
async function worker() {
  while (next < total) results.push(await oneSession(next++));
}
await Promise.all(Array.from({ length: Number(opts.concurrency) }, worker));
results.sort((a, b) => a.idx - b.idx);
const failed = results.filter((r) => !r.ok);
// Exit only once the report is flushed: process.exit() right after a large write to a
// pipe cuts it short (the SDK's open streams would otherwise keep the process alive).
process.stdout.write(
  JSON.stringify({ ok: results.length - failed.length, failed: failed.length, first_error: failed[0]?.error ?? null, sessions: results }) + '\n',
  () => process.exit(0),
);
