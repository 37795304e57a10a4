/**
 * PortPool with real sockets on 127.0.0.1: leases stay inside the range, are chosen at random
 * (RFC 2577 §8), keep the bound listener (no probe-then-bind race), skip ports held by someone
 * else, fail closed on exhaustion, and release idempotently. Ports 20000-20999 belong to this file.
 */
import t from 'tap';
import net from 'node:net';
import { PortPool, relayPortsPerIpCap, type PortLease } from '../../src/data/port-pool.js';
import { isProxyError } from '../../src/errors.js';

const HOST = '127.0.0.1';
let nextBase = 20000 + Math.floor(Math.random() * 40) * 10;

/** A fresh 10-port range (or `size`) inside this file's block. */
function range(size = 10): { first: number; last: number } {
  const first = nextBase;
  nextBase += size;
  if (nextBase > 20999) nextBase = 20000;
  return { first, last: first + size - 1 };
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

function tryListen(port: number): Promise<string> {
  return listenOn(port).then(
    (server) => new Promise<string>((resolve) => server.close(() => resolve('listening'))),
    (err: NodeJS.ErrnoException) => err.code ?? 'error',
  );
}

function closeServer(server: net.Server): Promise<void> {
  return new Promise((resolve) => (server.listening ? server.close(() => resolve()) : resolve()));
}

t.test('every lease is inside the range, distinct, and listening', async (t) => {
  const r = range(10);
  const pool = new PortPool(r);
  const leases: PortLease[] = [];
  t.teardown(() => leases.forEach((lease) => lease.release()));
  for (let i = 0; i < 10; i++) leases.push(await pool.lease(HOST));
  const ports = leases.map((lease) => lease.port);
  t.equal(new Set(ports).size, 10, 'ten distinct ports');
  t.ok(ports.every((port) => port >= r.first && port <= r.last), `all in ${r.first}-${r.last}: ${ports.join(',')}`);
  t.ok(leases.every((lease) => lease.server.listening && (lease.server.address() as net.AddressInfo).port === lease.port), 'each lease holds a bound listener on its port');
  t.ok(leases.every((lease) => lease.host === HOST), 'host recorded');
  t.same(pool.stats, { size: 10, leased: 10 }, 'stats');
});

t.test('concurrent leases never hand out the same port', async (t) => {
  const r = range(10);
  const pool = new PortPool(r);
  const leases = await Promise.all(Array.from({ length: 10 }, () => pool.lease(HOST)));
  t.teardown(() => leases.forEach((lease) => lease.release()));
  t.equal(new Set(leases.map((lease) => lease.port)).size, 10, 'ten distinct ports');
  await t.rejects(pool.lease(HOST), { code: 'FTPP_ERR_POOL_EXHAUSTED' }, 'the eleventh fails');
});

t.test('ports are chosen at random, not in sequence', async (t) => {
  const r = range(10);
  const firsts = new Set<number>();
  for (let i = 0; i < 40; i++) {
    const pool = new PortPool(r);
    const lease = await pool.lease(HOST);
    firsts.add(lease.port);
    lease.release();
  }
  // Uniform choice: the chance that 40 first leases all hit one port is 10^-39.
  t.ok(firsts.size >= 3, `first lease varies: ${[...firsts].sort().join(',')}`);
  t.ok([...firsts].every((port) => port >= r.first && port <= r.last), 'all in range');
});

t.test('the injected random source decides the order', async (t) => {
  const r = range(10);
  const pool = new PortPool(r, () => 0.999999);
  const lease = await pool.lease(HOST);
  t.teardown(() => lease.release());
  t.equal(lease.port, r.last, 'the random probe picks the port random() names');
  // The same port again for every probe: taken, so the pool falls back to the full shuffle,
  // which with random()≈1 keeps every element in place and tries the first free port first.
  const second = await pool.lease(HOST);
  t.teardown(() => second.release());
  t.equal(second.port, r.first, 'a crowded pick falls back to trying every free port');
});

t.test('a large range leases at random without walking it', async (t) => {
  let calls = 0;
  const r = { first: 1024, last: 65535 };
  const picks = [0.5];
  const pool = new PortPool(r, () => {
    calls++;
    return picks.shift() ?? Math.random();
  });
  const lease = await pool.lease(HOST).catch(() => null);
  t.teardown(() => lease?.release());
  t.ok(lease, 'a free port was found');
  t.ok(calls <= 4, `random() called ${calls} time(s), not once per port of 64,512 (port ${lease?.port})`);
});

t.test('the pool keeps the bound listener: nobody else can bind a leased port', async (t) => {
  const r = range(10);
  const pool = new PortPool(r);
  const lease = await pool.lease(HOST);
  t.teardown(() => lease.release());
  t.equal(await tryListen(lease.port), 'EADDRINUSE', 'a second net.Server cannot bind it');
  // And it accepts connections right away (pauseOnConnect).
  const accepted = new Promise<net.Socket>((resolve) => lease.server.once('connection', resolve));
  const client = net.connect({ host: HOST, port: lease.port });
  client.on('error', () => {});
  t.teardown(() => client.destroy());
  const socket = await accepted;
  t.equal(socket.remoteAddress, '127.0.0.1', 'connection reaches the leased listener');
  socket.destroy();
});

t.test('ports held by a foreign server are skipped', async (t) => {
  const r = range(3);
  const foreign = [await listenOn(r.first), await listenOn(r.first + 2)];
  t.teardown(() => Promise.all(foreign.map(closeServer)));
  for (let i = 0; i < 5; i++) {
    const pool = new PortPool(r);
    const lease = await pool.lease(HOST);
    t.equal(lease.port, r.first + 1, `attempt ${i}: the only free port`);
    await t.rejects(pool.lease(HOST), { code: 'FTPP_ERR_POOL_EXHAUSTED' }, 'then exhausted');
    t.same(pool.stats, { size: 3, leased: 1 }, 'failed binds are not counted as leased');
    lease.release();
  }
});

t.test('exhaustion rejects with FTPP_ERR_POOL_EXHAUSTED and never a port outside the range', async (t) => {
  const r = range(2);
  const pool = new PortPool(r);
  const a = await pool.lease(HOST);
  const b = await pool.lease(HOST);
  t.teardown(() => {
    a.release();
    b.release();
  });
  for (let i = 0; i < 3; i++) {
    const err = await pool.lease(HOST).then(
      (lease) => {
        lease.release();
        return new Error(`leased ${lease.port} from an exhausted ${r.first}-${r.last}`);
      },
      (e: unknown) => e,
    );
    t.ok(isProxyError(err, 'FTPP_ERR_POOL_EXHAUSTED'), `rejects with the coded error (${String(err)})`);
    t.match((err as Error).message, `${r.first}-${r.last}`, 'message names the range');
  }
  t.same(pool.stats, { size: 2, leased: 2 }, 'stats unchanged');
});

t.test('release is idempotent and makes the port leasable again', async (t) => {
  const r = range(1);
  const pool = new PortPool(r);
  const lease = await pool.lease(HOST);
  t.equal(lease.port, r.first);
  t.same(pool.stats, { size: 1, leased: 1 });
  lease.release();
  lease.release();
  t.same(pool.stats, { size: 1, leased: 0 }, 'released once');
  t.notOk(lease.server.listening, 'listener closed');
  const again = await pool.lease(HOST);
  t.teardown(() => again.release());
  t.equal(again.port, r.first, 'same port leased again at once');
  // A stale release of the old lease must not free the port the new lease holds.
  lease.release();
  t.same(pool.stats, { size: 1, leased: 1 }, 'stale release does not touch the new lease');
  t.equal(await tryListen(r.first), 'EADDRINUSE', 'new lease still holds the port');
});

t.test('a released port refuses connections', async (t) => {
  const r = range(1);
  const pool = new PortPool(r);
  const lease = await pool.lease(HOST);
  lease.release();
  const code = await new Promise<string>((resolve) => {
    const socket = net.connect({ host: HOST, port: lease.port });
    socket.once('connect', () => {
      socket.destroy();
      resolve('connected');
    });
    socket.once('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? 'error'));
  });
  t.equal(code, 'ECONNREFUSED');
});

t.test('stats report size and leased count', async (t) => {
  const r = range(5);
  const pool = new PortPool(r);
  t.same(pool.stats, { size: 5, leased: 0 });
  const a = await pool.lease(HOST);
  const b = await pool.lease(HOST);
  t.same(pool.stats, { size: 5, leased: 2 });
  a.release();
  t.same(pool.stats, { size: 5, leased: 1 });
  b.release();
  t.same(pool.stats, { size: 5, leased: 0 });
});

/** Connect and report how the connection ended: 'closed' by the server, 'open' after `ms`. */
function connectionFate(port: number, ms = 500): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: HOST, port });
    let code = '';
    socket.on('error', (err: NodeJS.ErrnoException) => {
      code = err.code ?? 'error';
    });
    socket.on('data', () => {});
    const timer = setTimeout(() => {
      socket.destroy();
      resolve('open');
    }, ms);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve(code === 'ECONNREFUSED' ? 'refused' : 'closed');
    });
  });
}

t.test('always-bound mode: every port bound, foreign ports left out, connections only reach a lease holder', async (t) => {
  const r = range(4);
  const foreign = await listenOn(r.first + 1);
  t.teardown(() => closeServer(foreign));
  const pool = new PortPool(r);
  t.teardown(() => pool.close());
  const result = await pool.bindAll(HOST);
  t.same(result, { bound: 3, failed: [r.first + 1] }, 'the foreign-held port is reported and left out');
  t.same(pool.stats, { size: 3, leased: 0 }, 'size counts bound ports');
  for (const port of [r.first, r.first + 2, r.first + 3]) {
    t.equal(await tryListen(port), 'EADDRINUSE', `${port} held by the pool`);
  }
  t.equal(await connectionFate(r.first), 'closed', 'a connection to an unleased port is closed at once');

  const leases: PortLease[] = [];
  for (let i = 0; i < 3; i++) leases.push(await pool.lease(HOST));
  t.teardown(() => leases.forEach((lease) => lease.release()));
  t.notOk(leases.some((lease) => lease.port === r.first + 1), 'the foreign port is never leased');
  await t.rejects(pool.lease(HOST), { code: 'FTPP_ERR_POOL_EXHAUSTED' }, 'exhausted after the bound ports');

  const lease = leases[0]!;
  const routed = new Promise<net.Socket>((resolve) => lease.setConnectionHandler(resolve));
  const client = net.connect({ host: HOST, port: lease.port });
  client.on('error', () => {});
  t.teardown(() => client.destroy());
  const socket = await routed;
  t.teardown(() => socket.destroy());
  t.equal(socket.localPort, lease.port, "the lease holder gets its port's connection");

  lease.release();
  lease.release();
  t.same(pool.stats, { size: 3, leased: 2 }, 'released once');
  t.equal(await tryListen(lease.port), 'EADDRINUSE', 'the port stays bound after release');
  t.equal(await connectionFate(lease.port), 'closed', 'and its connections are closed again');
  const again = await pool.lease(HOST);
  t.equal(again.port, lease.port, 'the released port is leasable again');
  again.release();
});

t.test('always-bound mode: close() unbinds every port', async (t) => {
  const r = range(3);
  const pool = new PortPool(r);
  await pool.bindAll(HOST);
  await pool.close();
  await pool.close();
  for (let port = r.first; port <= r.last; port++) t.equal(await tryListen(port), 'listening', `${port} free again`);
});

t.test('maxPerOwner: one owner holds at most that many ports at once; others and released ports are unaffected (issue #10)', async (t) => {
  const r = range(6);
  const pool = new PortPool(r, Math.random, 2);
  const leases: PortLease[] = [];
  t.teardown(() => leases.forEach((lease) => lease.release()));
  const [a1, a2] = await Promise.all([pool.lease(HOST, '198.51.100.7'), pool.lease(HOST, '198.51.100.7')]);
  leases.push(a1, a2);
  t.equal(pool.heldBy('198.51.100.7'), 2, 'two held by the owner (leased concurrently)');
  const refused = await pool.lease(HOST, '198.51.100.7').then(() => null, (err: unknown) => err);
  t.ok(isProxyError(refused, 'FTPP_ERR_RELAY_PORTS_PER_IP'), `a third is refused with FTPP_ERR_RELAY_PORTS_PER_IP (${String(refused)})`);
  t.same(pool.stats, { size: 6, leased: 2 }, 'the refusal bound nothing');
  leases.push(await pool.lease(HOST, '198.51.100.9'));
  t.equal(pool.heldBy('198.51.100.9'), 1, 'another owner still gets a port');
  leases.push(await pool.lease(HOST));
  t.same(pool.stats, { size: 6, leased: 4 }, 'an unowned lease is not counted against anyone');
  a1.release();
  a1.release();
  t.equal(pool.heldBy('198.51.100.7'), 1, 'release gives the share back, once');
  leases.push(await pool.lease(HOST, '198.51.100.7'));
  t.equal(pool.heldBy('198.51.100.7'), 2, 'and the owner may lease again');
});

t.test('an owner\'s failed lease (pool exhausted) is not counted', async (t) => {
  const r = range(1);
  const pool = new PortPool(r, Math.random, 5);
  const first = await pool.lease(HOST, 'a');
  t.teardown(() => first.release());
  const refused = await pool.lease(HOST, 'b').then(() => null, (err: unknown) => err);
  t.ok(isProxyError(refused, 'FTPP_ERR_POOL_EXHAUSTED'), 'exhausted');
  t.equal(pool.heldBy('b'), 0, 'nothing counted for the failed lease');
  t.equal(pool.maxPerOwner, Number.POSITIVE_INFINITY, 'a share as large as the pool is no share');
  const second = await pool.lease(HOST, 'a').then(() => null, (err: unknown) => err);
  t.ok(isProxyError(second, 'FTPP_ERR_POOL_EXHAUSTED'), 'so the owner that holds it all hears "exhausted", the true cause');
});

t.test('relayPortsPerIpCap: auto is a quarter of the pool, at least 2; a number is taken as is', async (t) => {
  const cases: Array<[number | 'auto', number, number]> = [
    ['auto', 1, 2],
    ['auto', 3, 2],
    ['auto', 8, 2],
    ['auto', 9, 3],
    ['auto', 100, 25],
    ['auto', 10000, 2500],
    [1, 100, 1],
    [40, 3, 40],
  ];
  for (const [setting, size, expected] of cases) t.equal(relayPortsPerIpCap(setting, size), expected, `${setting} of ${size} -> ${expected}`);
});
