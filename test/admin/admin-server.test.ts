/**
 * startAdminServer() on 127.0.0.1:0 with real HTTP: /metrics, /healthz, /readyz (ready, not
 * ready, throwing, hanging, malformed), 404/405, request timeout, listen errors, and a close()
 * that drops idle and in-flight connections, frees the port and is idempotent.
 */
import t from 'tap';
import net from 'node:net';
import { Writable } from 'node:stream';
import { Gauge } from 'prom-client';
import { startAdminServer, type AdminServer, type AdminServerOptions } from '../../src/admin.js';
import { createPromMetrics } from '../../src/metrics.js';
import { createLogger } from '../../src/log.js';

const HOST = '127.0.0.1';
const FETCH_TIMEOUT_MS = 3000;

type TestHost = { teardown(fn: () => unknown): void };

interface Started {
  readonly admin: AdminServer;
  readonly base: string;
  readonly metrics: ReturnType<typeof createPromMetrics>;
  logs(): Array<Record<string, unknown>>;
}

async function start(t: TestHost, overrides: Partial<AdminServerOptions> = {}): Promise<Started> {
  let text = '';
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      text += chunk.toString();
      cb();
    },
  });
  const metrics = createPromMetrics();
  const admin = await startAdminServer({
    listen: { host: HOST, port: 0 },
    registry: metrics.registry,
    ready: async () => ({ ready: true, checks: { listeners: true } }),
    log: createLogger('debug', sink),
    ...overrides,
  });
  t.teardown(() => admin.close());
  return {
    admin,
    base: `http://${HOST}:${admin.address.port}`,
    metrics,
    logs: () => text.split('\n').filter(Boolean).map((line) => JSON.parse(line) as Record<string, unknown>),
  };
}

function get(url: string, init: RequestInit = {}): Promise<Response> {
  return fetch(url, { signal: AbortSignal.timeout(FETCH_TIMEOUT_MS), ...init });
}

/** Resolves when the socket closes, or with 'timeout' after `ms`. */
function closedWithin(socket: net.Socket, ms: number): Promise<'closed' | 'timeout'> {
  return new Promise((resolve) => {
    if (socket.destroyed) return resolve('closed');
    const timer = setTimeout(() => resolve('timeout'), ms);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve('closed');
    });
  });
}

function connect(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: HOST, port }, () => {
      socket.removeListener('error', reject);
      socket.on('error', () => {});
      resolve(socket);
    });
    socket.once('error', reject);
  });
}

function listenOn(port: number): Promise<net.Server> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen({ host: HOST, port }, () => {
      server.removeListener('error', reject);
      resolve(server);
    });
  });
}

t.test('binds the requested host and reports the real port', async (t) => {
  const { admin, logs } = await start(t);
  t.equal(admin.address.host, HOST);
  t.ok(admin.address.port > 0, `port ${admin.address.port}`);
  t.ok(
    logs().some((log) => log.event === 'admin-listening' && log.listen === `${HOST}:${admin.address.port}`),
    'admin-listening logged with the address',
  );
});

t.test('GET /metrics: 200, the registry content type, the current samples', async (t) => {
  const { base, metrics } = await start(t);
  metrics.sessionOpened('edge');
  metrics.registerPool('edge', 'passive', () => ({ size: 10, leased: 4 }));
  const res = await get(`${base}/metrics`);
  t.equal(res.status, 200);
  t.equal(res.headers.get('content-type'), metrics.registry.contentType);
  const body = await res.text();
  t.match(body, /^ftpnp_sessions_open\{listener="edge"\} 1$/m);
  t.match(body, /^ftpnp_data_ports_free\{listener="edge",pool="passive"\} 6$/m);
  t.match(body, /^# HELP ftpnp_sessions_total /m);
  t.match(body, /^process_cpu_user_seconds_total /m, 'default process metrics');

  metrics.sessionClosed('edge');
  const again = await (await get(`${base}/metrics?ignored=1`)).text();
  t.match(again, /^ftpnp_sessions_open\{listener="edge"\} 0$/m, 'each scrape is fresh; query string ignored');
});

t.test('GET /metrics when a collector throws: 500, server keeps serving', async (t) => {
  const { base, metrics } = await start(t);
  new Gauge({
    name: 'test_broken',
    help: 'broken',
    registers: [metrics.registry],
    collect(): void {
      throw new Error('collector broke');
    },
  });
  const res = await get(`${base}/metrics`);
  t.equal(res.status, 500);
  t.match(await res.text(), /collector broke/);
  t.equal((await get(`${base}/healthz`)).status, 200, 'still up');
});

t.test('GET /healthz: 200 ok, without asking readiness', async (t) => {
  let readyCalls = 0;
  const { base } = await start(t, {
    ready: async () => {
      readyCalls++;
      return { ready: false, checks: {} };
    },
  });
  const res = await get(`${base}/healthz`);
  t.equal(res.status, 200);
  t.equal(await res.text(), 'ok\n');
  t.match(res.headers.get('content-type') ?? '', /^text\/plain/);
  t.equal(readyCalls, 0, 'liveness does not depend on readiness');
});

t.test('GET /readyz: 200 with the checks when ready', async (t) => {
  const { base } = await start(t, {
    ready: async () => ({ ready: true, checks: { listeners: true, upstream: true } }),
  });
  const res = await get(`${base}/readyz`);
  t.equal(res.status, 200);
  t.match(res.headers.get('content-type') ?? '', /^application\/json/);
  t.same(await res.json(), { ready: true, checks: { listeners: true, upstream: true } });
});

t.test('GET /readyz: 503 with the checks when not ready', async (t) => {
  const { base } = await start(t, {
    ready: async () => ({ ready: false, checks: { listeners: true, upstream: 'ECONNREFUSED 10.0.0.5:21' } }),
  });
  const res = await get(`${base}/readyz`);
  t.equal(res.status, 503);
  t.same(await res.json(), { ready: false, checks: { listeners: true, upstream: 'ECONNREFUSED 10.0.0.5:21' } });
});

t.test('GET /readyz follows the callback from one probe to the next', async (t) => {
  let ready = false;
  const { base } = await start(t, { ready: async () => ({ ready, checks: { listeners: ready } }) });
  t.equal((await get(`${base}/readyz`)).status, 503, 'not yet');
  ready = true;
  t.equal((await get(`${base}/readyz`)).status, 200, 'now ready');
});

t.test('GET /readyz: a rejecting callback is 503 with its message, logged, no crash', async (t) => {
  const { base, logs } = await start(t, {
    ready: async () => {
      throw new Error('upstream probe exploded');
    },
  });
  const res = await get(`${base}/readyz`);
  t.equal(res.status, 503);
  t.same(await res.json(), { ready: false, checks: {}, error: 'upstream probe exploded' });
  t.ok(logs().some((log) => log.event === 'admin-ready-error' && log.level === 'warn'), 'logged at warn');
  t.equal((await get(`${base}/healthz`)).status, 200, 'still serving');
});

t.test('GET /readyz: a callback that throws synchronously is 503', async (t) => {
  const { base } = await start(t, {
    ready: () => {
      throw new Error('sync boom');
    },
  });
  const res = await get(`${base}/readyz`);
  t.equal(res.status, 503);
  t.match(await res.json(), { ready: false, error: 'sync boom' });
});

t.test('GET /readyz: a callback that never settles is 503 after the ready timeout', async (t) => {
  const { base } = await start(t, { ready: () => new Promise(() => {}), readyTimeoutMs: 100 });
  const began = Date.now();
  const res = await get(`${base}/readyz`);
  t.equal(res.status, 503);
  t.match(await res.json(), { ready: false, error: /timed out/ });
  t.ok(Date.now() - began < 2000, 'answered near the timeout');
});

t.test('GET /readyz: a malformed report is 503, not a 200', async (t) => {
  const { base } = await start(t, { ready: async () => undefined as never });
  const res = await get(`${base}/readyz`);
  t.equal(res.status, 503);
  t.match(await res.json(), { ready: false, error: /report/ });
});

t.test('unknown paths are 404', async (t) => {
  const { base } = await start(t);
  for (const path of ['/', '/metric', '/metrics/', '/readyz/x', '/favicon.ico']) {
    t.equal((await get(`${base}${path}`)).status, 404, path);
  }
  t.equal((await get(`${base}/nope`, { method: 'POST', body: 'x' })).status, 404, 'POST to an unknown path');
});

t.test('methods other than GET are 405 with Allow: GET', async (t) => {
  let readyCalls = 0;
  const { base } = await start(t, {
    ready: async () => {
      readyCalls++;
      return { ready: true, checks: {} };
    },
  });
  for (const [method, path] of [['POST', '/metrics'], ['PUT', '/readyz'], ['DELETE', '/healthz'], ['HEAD', '/healthz']] as const) {
    const res = await get(`${base}${path}`, method === 'POST' || method === 'PUT' ? { method, body: 'payload' } : { method });
    t.equal(res.status, 405, `${method} ${path}`);
    t.equal(res.headers.get('allow'), 'GET', `${method} ${path} Allow`);
  }
  t.equal(readyCalls, 0, 'the ready callback never ran for a refused method');
});

t.test('a client that never finishes its request is cut off by the request timeout', async (t) => {
  const { admin } = await start(t, { requestTimeoutMs: 300 });
  const socket = await connect(admin.address.port);
  t.teardown(() => socket.destroy());
  let received = '';
  socket.on('data', (chunk: Buffer) => (received += chunk.toString()));
  socket.write('GET /metrics HTTP/1.1\r\nHost: x\r\n'); // headers never end
  t.equal(await closedWithin(socket, 3000), 'closed', 'connection closed by the server');
  t.match(received, /^HTTP\/1\.1 408 /, '408 Request Timeout');
});

t.test('listen failure rejects with the bind error', async (t) => {
  const { admin } = await start(t);
  const err = await startAdminServer({
    listen: { host: HOST, port: admin.address.port },
    registry: createPromMetrics().registry,
    ready: async () => ({ ready: true, checks: {} }),
    log: createLogger('silent'),
  }).then(
    (second) => {
      t.teardown(() => second.close());
      return null;
    },
    (e: unknown) => e,
  );
  t.match(err, { code: 'EADDRINUSE' });
});

t.test('close() frees the port, drops keep-alive and in-flight connections, and is idempotent', async (t) => {
  const { admin, base, logs } = await start(t);
  const port = admin.address.port;
  t.equal((await get(`${base}/healthz`)).status, 200, 'served before close (leaves a keep-alive connection)');
  const stalled = await connect(port);
  t.teardown(() => stalled.destroy());
  stalled.write('GET /metrics HTTP/1.1\r\nHost: x\r\n'); // in flight: close() must not wait for it
  await new Promise((resolve) => setTimeout(resolve, 50));

  const began = Date.now();
  const first = admin.close();
  const second = admin.close();
  t.equal(first, second, 'same promise for concurrent closes');
  const outcome = await Promise.race([
    first.then(() => 'closed' as const),
    new Promise<'still waiting'>((resolve) => setTimeout(() => resolve('still waiting'), 2000)),
  ]);
  t.equal(outcome, 'closed', 'close() does not wait for the in-flight request');
  if (outcome !== 'closed') stalled.destroy(); // let teardown finish after a failure
  await first;
  t.ok(Date.now() - began < 1000, `closed promptly (${Date.now() - began} ms)`);
  t.equal(await closedWithin(stalled, 1000), 'closed', 'in-flight connection dropped');
  await admin.close();
  t.pass('close() again after closing resolves');
  t.equal(logs().filter((log) => log.event === 'admin-closed').length, 1, 'closed once');

  const refused = await get(`${base}/healthz`).then(
    () => 'answered',
    () => 'refused',
  );
  t.equal(refused, 'refused', 'nothing answers on the port');
  const server = await listenOn(port);
  t.ok(server.listening, `port ${port} can be bound again`);
  await new Promise<void>((resolve) => server.close(() => resolve()));
});
