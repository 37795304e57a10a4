/**
 * The original destination of an intercepted connection (src/server/original-destination.ts,
 * issue #13): how the kernel's answer is judged (pure), what happens without the addon or a
 * descriptor, plain loopback connections (never redirected), and, as root, the real thing: a
 * router namespace with `tcp dport 21 redirect to :2121` and a client namespace dialling
 * "internet" servers over IPv4 and IPv6 to a dual-stack `::` listener.
 *
 * Topology of the root part (nothing in the root namespace; one veth pair between the two):
 *   client 192.168.77.10/24 fd77::10/64 (default routes via the router)
 *     <-> router 192.168.77.1/24 fd77::1/64, nft `table inet t` redirecting port 21 to 2121,
 *         a node script listening on [::]:2121 that answers each connection with its verdict.
 */
import t from 'tap';
import net from 'node:net';
import { constants } from 'node:os';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  classifyOriginalDestination,
  loadOriginalDestinationLookup,
  lookupFromAddon,
  originalDestinationOf,
  originalDestinationUnavailable,
  type LoadedLookup,
  type OriginalDestination,
} from '../../src/server/original-destination.js';
import { waitFor } from '../helpers/async.js';
import { findCommand, NetnsLab, netnsUnavailable, nsRun } from '../helpers/netns.js';
import { ensureProxyBuilt, REPO_ROOT } from '../e2e/nat-lab.js';
import type { TeardownHost } from '../helpers/tap.js';

const { ENOENT, ENOTCONN } = constants.errno;
const LOCAL = { ip: '192.168.77.1', port: 2121 };

/** An accepted socket on `listenHost` (port 0), dialled at `connectHost`; both ends go at teardown. */
async function accepted(owner: TeardownHost, listenHost: string, connectHost: string): Promise<net.Socket> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, listenHost, () => resolve()));
  const port = (server.address() as net.AddressInfo).port;
  const acceptedP = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const client = net.connect({ host: connectHost, port });
  client.on('error', () => undefined);
  const socket = await acceptedP;
  server.close();
  owner.teardown(() => {
    client.destroy();
    socket.destroy();
  });
  return socket;
}

t.test('classifyOriginalDestination: the kernel answer against the socket\'s own address', async (t) => {
  const cases: Array<[string, Parameters<typeof classifyOriginalDestination>[0], OriginalDestination]> = [
    ['ENOENT: conntrack has no entry (not active here), so nothing was NATed', { errno: ENOENT }, { kind: 'not-redirected' }],
    ['the local address itself: tracked but not NATed', { ip: '192.168.77.1', port: 2121 }, { kind: 'not-redirected' }],
    ['the local address, v4-mapped', { ip: '::ffff:192.168.77.1', port: 2121 }, { kind: 'not-redirected' }],
    ['another address', { ip: '203.0.113.77', port: 21 }, { kind: 'redirected', ip: '203.0.113.77', port: 21 }],
    ['another address, v4-mapped: normalized to IPv4', { ip: '::ffff:203.0.113.77', port: 21 }, { kind: 'redirected', ip: '203.0.113.77', port: 21 }],
    ['IPv6, normalized', { ip: '2001:DB8:0::77', port: 21 }, { kind: 'redirected', ip: '2001:db8::77', port: 21 }],
    ['our own address on port 21 (a client dialling the router): redirected, the loop check is policy\'s', { ip: '192.168.77.1', port: 21 }, { kind: 'redirected', ip: '192.168.77.1', port: 21 }],
  ];
  for (const [name, answer, want] of cases) t.same(classifyOriginalDestination(answer, LOCAL), want, name);

  const enotconn = classifyOriginalDestination({ errno: ENOTCONN }, LOCAL);
  t.equal(enotconn.kind, 'error', 'another errno is an error');
  t.match(enotconn, { reason: /SO_ORIGINAL_DST.*ENOTCONN/ }, 'named in the reason');
  t.match(classifyOriginalDestination({ errno: 0 }, LOCAL), { kind: 'error', reason: /failed: errno 0$/ }, 'a nonsense errno is still an error');
  t.match(classifyOriginalDestination({ ip: 'not an address', port: 21 }, LOCAL), { kind: 'error', reason: /unreadable address/ });
  t.match(classifyOriginalDestination({ ip: '203.0.113.77', port: 0 }, LOCAL), { kind: 'error', reason: /port 0/ });
  t.match(classifyOriginalDestination({ ip: '203.0.113.77', port: 21 }, null), { kind: 'error', reason: /no local address/ }, 'without our own address the answer cannot be judged');
  t.same(classifyOriginalDestination({ errno: ENOENT }, null), { kind: 'not-redirected' }, 'ENOENT needs no local address');
});

t.test('availability without a socket', async (t) => {
  t.match(loadOriginalDestinationLookup('darwin'), { lookup: null, reason: /Linux-only \(platform darwin\)/ });
  t.match(lookupFromAddon(null, 'native addon not built (npm install runs node-gyp in src/native)'), {
    lookup: null,
    reason: /^transparent interception needs the native addon: native addon not built/,
  });
  t.match(lookupFromAddon({ start: () => undefined }, 'native addon x.node'), { lookup: null, reason: /predates transparent interception/ }, 'an old addon');
  t.equal(originalDestinationUnavailable({ lookup: null, reason: 'why' }), 'why');
  t.equal(originalDestinationUnavailable({ lookup: () => ({ errno: ENOENT }), reason: 'ok' }), null);

  const real = originalDestinationUnavailable();
  if (process.platform === 'linux' && process.env.CI === 'true') t.equal(real, null, 'CI builds the addon (npm ci runs src/native/install.sh)');
  else t.pass(`here: ${real ?? 'available'}`);
});

t.test('originalDestinationOf: no lookup, no descriptor, the fd handed over', async (t) => {
  const socket = await accepted(t, '127.0.0.1', '127.0.0.1');
  t.same(originalDestinationOf(socket, { lookup: null, reason: 'no addon here' }), { kind: 'unavailable', reason: 'no addon here' });

  const seen: number[] = [];
  const recording: LoadedLookup = {
    lookup: (fd) => {
      seen.push(fd);
      return { errno: ENOTCONN };
    },
    reason: 'fake',
  };
  t.match(originalDestinationOf(socket, recording), { kind: 'error', reason: /ENOTCONN/ });
  t.equal(seen.length, 1);
  t.ok(Number.isInteger(seen[0]) && (seen[0] ?? -1) >= 0, `the socket's descriptor (${seen[0]})`);

  t.match(originalDestinationOf(new net.Socket(), recording), { kind: 'unavailable', reason: /no descriptor/ }, 'a socket never connected');
  socket.destroy();
  t.match(originalDestinationOf(socket, recording), { kind: 'unavailable', reason: /no descriptor/ }, 'a destroyed socket');
  t.equal(seen.length, 1, 'the lookup is not asked without a descriptor');

  t.same(
    originalDestinationOf(await accepted(t, '127.0.0.1', '127.0.0.1'), { lookup: () => ({ ip: '127.0.0.1', port: 21 }), reason: 'fake' }),
    { kind: 'redirected', ip: '127.0.0.1', port: 21 },
    'an address other than the socket\'s own is a redirection',
  );
});

t.test('real loopback connections are not redirected', async (t) => {
  const unavailable = originalDestinationUnavailable();
  const pairs: Array<[string, string]> = [
    ['127.0.0.1', '127.0.0.1'],
    ['::', '127.0.0.1'], // dual-stack listener, v4-mapped peer: the SOL_IP fallback
    ['::1', '::1'],
  ];
  for (const [listen, connect] of pairs) {
    const got = originalDestinationOf(await accepted(t, listen, connect));
    if (unavailable) t.same(got, { kind: 'unavailable', reason: unavailable }, `listen ${listen}, dial ${connect}: ${unavailable}`);
    else t.same(got, { kind: 'not-redirected' }, `listen ${listen}, dial ${connect}`);
  }
});

// ------------------------------------------------------------- as root, in namespaces

const ADDR = {
  clientV4: '192.168.77.10',
  routerV4: '192.168.77.1',
  clientV6: 'fd77::10',
  routerV6: 'fd77::1',
  serverV4: '203.0.113.77',
  serverV6: '2001:db8::77',
} as const;
const LISTEN_PORT = 2121;
const DIST_MODULE = join(REPO_ROOT, 'dist', 'server', 'original-destination.js');
const DIST_SPLICE = join(REPO_ROOT, 'dist', 'data', 'splice-relay.js');

const RULESET = `table inet t {
  chain pre {
    type nat hook prerouting priority dstnat; policy accept;
    tcp dport 21 redirect to :${LISTEN_PORT}
  }
}
`;

/** The listener in the router namespace: one JSON line per connection, to stdout and to the client. */
const LISTENER = `
import net from 'node:net';
import { originalDestinationOf, loadOriginalDestinationLookup } from ${JSON.stringify(DIST_MODULE)};
import { socketDescriptor } from ${JSON.stringify(DIST_SPLICE)};
const { lookup } = loadOriginalDestinationLookup();
const server = net.createServer((socket) => {
  const fd = socketDescriptor(socket);
  const raw = lookup && fd !== null ? lookup(fd) : null;
  const line = JSON.stringify({ local: socket.localAddress + ' ' + socket.localPort, raw, result: originalDestinationOf(socket) });
  console.log(line);
  socket.end(line + '\\n');
});
server.listen({ host: '::', port: ${LISTEN_PORT} }, () => console.log('listening'));
`;

/** The client: dials each [host, port] in turn, prints what came back (or why nothing did). */
const DIALLER = `
const net = require('node:net');
const dial = (host, port) => new Promise((resolve) => {
  const s = net.connect({ host, port });
  let data = '';
  s.setEncoding('utf8');
  s.setTimeout(5000, () => { s.destroy(); resolve({ error: 'timeout' }); });
  s.on('data', (d) => { data += d; });
  s.on('end', () => resolve(JSON.parse(data)));
  s.on('error', (e) => resolve({ error: e.code || e.message }));
});
(async () => {
  for (const [host, port] of JSON.parse(process.argv[1])) console.log(JSON.stringify({ host, port, got: await dial(host, port) }));
})();
`;

function rootSkipReason(): string | null {
  const why = netnsUnavailable() ?? (findCommand('nft') ? null : 'nft is not installed (apt-get install nftables)') ?? originalDestinationUnavailable();
  return why;
}

// Root only (network namespaces, nft); CI runs as root, where this never skips.
t.test('a REDIRECTed connection in a router namespace: IPv4 and IPv6 on a dual-stack listener', { skip: rootSkipReason() ?? false }, async (t) => {
  const buildError = ensureProxyBuilt();
  if (buildError) {
    t.fail(buildError);
    return;
  }
  const lab = new NetnsLab();
  t.teardown(() => lab.cleanup());
  const cleanupSync = (): void => lab.cleanupSync();
  process.once('exit', cleanupSync);
  t.teardown(() => void process.off('exit', cleanupSync));

  const [client, router] = lab.addNamespaces('odc', 'odr') as [string, string];
  const routerIf = lab.name('c');
  lab.link({ fromNs: router, bridge: null, fromName: 'c', toNs: client, toName: 'eth0', cidr: `${ADDR.clientV4}/24`, gateway: ADDR.routerV4 });
  lab.ip(router, 'addr', 'add', `${ADDR.routerV4}/24`, 'dev', routerIf);
  // nodad: usable at once, no duplicate-address-detection wait.
  lab.ip(router, '-6', 'addr', 'add', `${ADDR.routerV6}/64`, 'dev', routerIf, 'nodad');
  lab.ip(client, '-6', 'addr', 'add', `${ADDR.clientV6}/64`, 'dev', 'eth0', 'nodad');
  lab.ip(client, '-6', 'route', 'add', 'default', 'via', ADDR.routerV6);
  const rules = join(lab.dir, 'redirect.nft');
  writeFileSync(rules, RULESET);
  lab.exec(router, 'nft', '-f', rules);

  const script = join(lab.dir, 'listener.mjs');
  writeFileSync(script, LISTENER);
  const listener = lab.spawnDaemon(router, 'original-destination listener', process.execPath, [script]);
  const up = await waitFor(() => listener.output().includes('listening') || listener.exitCode() !== null, 10000);
  if (!up || !listener.output().includes('listening')) {
    t.fail(`the listener did not start: ${listener.output()}`);
    return;
  }

  const targets: Array<[string, number]> = [
    [ADDR.serverV4, 21],
    [ADDR.serverV6, 21],
    [ADDR.routerV4, LISTEN_PORT],
    [ADDR.routerV6, LISTEN_PORT],
  ];
  const dialled = await nsRun(client, process.execPath, ['-e', DIALLER, JSON.stringify(targets)], { timeoutMs: 30000 });
  t.equal(dialled.code, 0, `the client ran: ${dialled.stderr}`);
  const lines = dialled.stdout
    .trim()
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as { host: string; port: number; got: { local?: string; raw?: unknown; result?: OriginalDestination; error?: string } });
  const got = (host: string, port: number): (typeof lines)[number]['got'] | undefined => lines.find((l) => l.host === host && l.port === port)?.got;
  for (const line of lines) t.comment(`${line.host} port ${line.port}: ${JSON.stringify(line.got)}`);

  t.same(got(ADDR.serverV4, 21)?.result, { kind: 'redirected', ip: ADDR.serverV4, port: 21 }, 'IPv4 (v4-mapped on the :: listener) to 203.0.113.77:21');
  t.same(got(ADDR.serverV6, 21)?.result, { kind: 'redirected', ip: ADDR.serverV6, port: 21 }, 'IPv6 to [2001:db8::77]:21');
  t.same(got(ADDR.routerV4, LISTEN_PORT)?.result, { kind: 'not-redirected' }, 'IPv4 straight to the listener');
  t.same(got(ADDR.routerV6, LISTEN_PORT)?.result, { kind: 'not-redirected' }, 'IPv6 straight to the listener');

  await t.test('nothing is left behind', async (t) => {
    await lab.cleanup();
    const left = lab.leftovers();
    t.same(left.namespaces, [], `no namespace named ${lab.prefix}*`);
    t.same(left.links, [], `no interface named ${lab.prefix}* in the root namespace`);
    t.same(left.processes, [], 'the listener is gone');
  });
});
