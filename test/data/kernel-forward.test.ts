/**
 * The kernel data path's nftables side (src/data/kernel-forward.ts): the scripts it writes,
 * which channels it refuses, the table's life cycle against a recording runner, and, as
 * root, the real libnftables in a network namespace of the test's own.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  KernelForwarder,
  addMappingScript,
  kernelPathBlocker,
  removeMappingScripts,
  staleTables,
  tableName,
  tableScript,
  type ForwardMapping,
  type NftResult,
  type NftRunner,
} from '../../src/data/kernel-forward.js';
import { isProxyError } from '../../src/errors.js';
import { labPrefix, netnsUnavailable, nftablesUnavailable } from '../helpers/netns.js';

const MAPPING: ForwardMapping = {
  clientIp: '198.51.100.7',
  proxyIp: '203.0.113.10',
  proxyPort: 60001,
  serverIp: '10.20.0.5',
  serverPort: 31337,
  snatIp: '10.20.0.1',
};

/** The error `fn` throws, or null. */
function thrownBy(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  return null;
}

/** A runner that records every script and answers from `answer` (default: success). */
function recordingRunner(answer: (script: string) => Partial<NftResult> = () => ({})): { run: NftRunner; scripts: string[] } {
  const scripts: string[] = [];
  const run: NftRunner = (script) => {
    scripts.push(script);
    return { ok: true, output: '', error: '', ...answer(script) };
  };
  return { run, scripts };
}

t.test('scripts', async (t) => {
  t.equal(tableName(4242), 'ftpnp_4242');
  const table = tableScript('ftpnp_1');
  t.match(table, /^add table ip ftpnp_1\ndelete table ip ftpnp_1\ntable ip ftpnp_1 \{/, 'a leftover table of the same name is replaced, never an error');
  t.match(table, /map dnat_to \{ type ipv4_addr \. ipv4_addr \. inet_service : ipv4_addr \. inet_service; flags timeout; \}/);
  t.match(table, /map snat_to \{ type ipv4_addr \. ipv4_addr \. inet_service : ipv4_addr; \}/, 'SNAT elements are shared and counted, no timeout');
  t.match(table, /hook prerouting priority dstnat;.*dnat ip to ip saddr \. ip daddr \. tcp dport map @dnat_to/, 'remote clients');
  t.match(table, /hook output priority -100;.*dnat ip to ip saddr \. ip daddr \. tcp dport map @dnat_to/, 'clients on this host');
  t.match(table, /hook postrouting priority srcnat;.*ct status dnat snat ip to ip saddr \. ip daddr \. tcp dport map @snat_to/, 'SNAT only what we DNATed');

  t.equal(
    addMappingScript('ftpnp_1', MAPPING, 30000),
    [
      'add element ip ftpnp_1 snat_to { 198.51.100.7 . 10.20.0.5 . 31337 : 10.20.0.1 }',
      'create element ip ftpnp_1 dnat_to { 198.51.100.7 . 203.0.113.10 . 60001 timeout 30000ms : 10.20.0.5 . 31337 }',
    ].join('\n'),
    'SNAT first: the DNAT element must never exist without its SNAT partner (one transaction anyway)',
  );
  t.equal(
    addMappingScript('ftpnp_1', MAPPING, 30000, false),
    'create element ip ftpnp_1 dnat_to { 198.51.100.7 . 203.0.113.10 . 60001 timeout 30000ms : 10.20.0.5 . 31337 }',
    'an SNAT element another mapping holds is not added again',
  );
  t.same(removeMappingScripts('ftpnp_1', MAPPING, false), ['delete element ip ftpnp_1 dnat_to { 198.51.100.7 . 203.0.113.10 . 60001 }'], 'nor removed while held');
  t.match(addMappingScript('ftpnp_1', MAPPING, 250), /timeout 1000ms/, 'at least a second: a shorter timeout would race the 227');
  t.match(addMappingScript('ftpnp_1', MAPPING, 1500.2), /timeout 1501ms/, 'whole milliseconds');
  t.same(removeMappingScripts('ftpnp_1', MAPPING), [
    'delete element ip ftpnp_1 dnat_to { 198.51.100.7 . 203.0.113.10 . 60001 }',
    'delete element ip ftpnp_1 snat_to { 198.51.100.7 . 10.20.0.5 . 31337 }',
  ]);
});

t.test('staleTables: ours, of dead processes, never our own', async (t) => {
  const listing = ['table ip filter', 'table ip ftpnp_100', 'table ip ftpnp_200', 'table ip ftpnp_300 ', 'table inet ftpnp_400', 'table ip ftpnp_x', 'table ip ftpnp_500'].join('\n');
  const alive = new Set([200]);
  t.same(staleTables(listing, (pid) => alive.has(pid), 500), ['ftpnp_100', 'ftpnp_300']);
  t.same(staleTables('', () => false, 1), []);
});

t.test('kernelPathBlocker', async (t) => {
  const base = { clientIp: '198.51.100.7', proxyIp: '203.0.113.10', serverIp: '10.20.0.5', snatIp: '10.20.0.1', proxyProtocol: false };
  const cases: Array<[string, Partial<typeof base>, RegExp | null]> = [
    ['edge, all IPv4', {}, null],
    ['all on loopback (the benchmark)', { clientIp: '127.0.0.1', proxyIp: '127.0.0.1', serverIp: '127.0.0.1', snatIp: '127.0.0.1' }, null],
    ['PROXY protocol', { proxyProtocol: true }, /PROXY protocol/],
    ['IPv6 client', { clientIp: '2001:db8::7' }, /client address 2001:db8::7 is not IPv4/],
    ['IPv6 server', { serverIp: 'fd00::5' }, /server address fd00::5 is not IPv4/],
    ['IPv6 upstream side', { snatIp: 'fd00::1' }, /upstream-side address/],
    ['remote client, loopback server', { serverIp: '127.0.0.1', snatIp: '127.0.0.1' }, /server is on loopback and the client is not/],
  ];
  for (const [name, change, expected] of cases) {
    const blocker = kernelPathBlocker({ ...base, ...change });
    if (expected) t.match(blocker, expected, name);
    else t.equal(blocker, null, name);
  }
});

t.test('KernelForwarder with a recording runner', async (t) => {
  await t.test('creates its table, removes stale ones, maps, unmaps once, deletes the table once', async (t) => {
    const { run, scripts } = recordingRunner((script) => (script === 'list tables ip' ? { output: 'table ip ftpnp_1\ntable ip ftpnp_77\n' } : {}));
    const warnings: string[] = [];
    const forwarder = new KernelForwarder(run, { pid: 77, isAlive: () => false, onWarning: (message, detail) => warnings.push(`${message} ${JSON.stringify(detail)}`) });
    t.equal(forwarder.table, 'ftpnp_77');
    t.same(scripts.slice(0, 2), ['list tables ip', 'delete table ip ftpnp_1'], 'the dead proxy 1 loses its table; our own name is not "stale"');
    t.equal(scripts[2], tableScript('ftpnp_77'));
    t.match(warnings[0], /ftpnp_1/);
    const forward = forwarder.forward(MAPPING, 5000);
    t.equal(scripts[3], addMappingScript('ftpnp_77', MAPPING, 5000));
    t.equal(forwarder.active, 1);
    forward.remove();
    forward.remove();
    t.same(scripts.slice(4), [removeMappingScripts('ftpnp_77', MAPPING).join('\n')], 'removed once, in one transaction');
    t.equal(forwarder.active, 0);
    forwarder.close();
    forwarder.close();
    t.same(scripts.slice(5), ['delete table ip ftpnp_77'], 'table deleted once');
    t.throws(() => forwarder.forward(MAPPING, 5000), /closed/, 'no mapping after close');
  });

  await t.test('two mappings to the same server port share one SNAT element (vsftpd reuses a port once accepted)', async (t) => {
    const { run, scripts } = recordingRunner();
    const forwarder = new KernelForwarder(run, { pid: 6 });
    const second: ForwardMapping = { ...MAPPING, proxyPort: 60002 };
    const a = forwarder.forward(MAPPING, 5000);
    const b = forwarder.forward(second, 5000);
    t.equal(scripts.at(-1), addMappingScript('ftpnp_6', second, 5000, false), 'the second adds only its DNAT element');
    a.remove();
    t.equal(scripts.at(-1), removeMappingScripts('ftpnp_6', MAPPING, false).join('\n'), 'the first goes without the shared SNAT element');
    b.remove();
    t.equal(scripts.at(-1), removeMappingScripts('ftpnp_6', second, true).join('\n'), 'the last holder takes it');
    const other = forwarder.forward(MAPPING, 5000);
    t.equal(scripts.at(-1), addMappingScript('ftpnp_6', MAPPING, 5000, true), 'and the next one adds it again');
    const err = thrownBy(() => forwarder.forward({ ...MAPPING, proxyPort: 60003, snatIp: '10.20.0.2' }, 5000));
    t.match((err as Error).message, /already sent from 10\.20\.0\.1, not 10\.20\.0\.2/, 'a different source for the same server port is refused (relayed)');
    other.remove();
  });

  await t.test('removing a mapping after close touches nothing (the table took it)', async (t) => {
    const { run, scripts } = recordingRunner();
    const forwarder = new KernelForwarder(run, { pid: 5 });
    const forward = forwarder.forward(MAPPING, 5000);
    forwarder.close();
    const before = scripts.length;
    forward.remove();
    t.equal(scripts.length, before);
  });

  await t.test('an expired element does not stop the other one from going', async (t) => {
    const { run, scripts } = recordingRunner((script) => (script.startsWith('delete element ip ftpnp_5 dnat_to') ? { ok: false, error: 'No such file or directory' } : {}));
    const forwarder = new KernelForwarder(run, { pid: 5 });
    forwarder.forward(MAPPING, 5000).remove();
    const [dnat, snat] = removeMappingScripts('ftpnp_5', MAPPING);
    t.same(scripts.slice(-3), [`${dnat}\n${snat}`, dnat, snat], 'the transaction failed as a whole, then one by one');
  });

  await t.test('failures carry FTPP_ERR_KERNEL_PATH and nft\'s words', async (t) => {
    const cases: Array<[string, (script: string) => Partial<NftResult>, RegExp]> = [
      ['no permission to list', (s) => (s.startsWith('list') ? { ok: false, error: 'Operation not permitted' } : {}), /cannot list nftables tables: Operation not permitted \(needs CAP_NET_ADMIN\)/],
      ['table refused', (s) => (s.startsWith('add table') ? { ok: false, error: 'Could not process rule: No such file or directory' } : {}), /cannot create nftables table ftpnp_9: Could not process rule/],
      ['no error text', (s) => (s.startsWith('add table') ? { ok: false } : {}), /unknown error/],
    ];
    for (const [name, answer, message] of cases) {
      const { run } = recordingRunner(answer);
      const err = thrownBy(() => new KernelForwarder(run, { pid: 9 }));
      t.ok(isProxyError(err, 'FTPP_ERR_KERNEL_PATH'), `${name}: FTPP_ERR_KERNEL_PATH`);
      t.match((err as Error).message, message, name);
    }
    const { run } = recordingRunner((s) => (s.includes('create element') ? { ok: false, error: 'Could not process rule: File exists' } : {}));
    const forwarder = new KernelForwarder(run, { pid: 9 });
    const err = thrownBy(() => forwarder.forward(MAPPING, 5000));
    t.ok(isProxyError(err, 'FTPP_ERR_KERNEL_PATH'), 'a refused mapping: FTPP_ERR_KERNEL_PATH');
    t.match((err as Error).message, /cannot add the data mapping: Could not process rule: File exists/);
    t.equal(forwarder.active, 0, 'a refused mapping is not counted');
  });

  await t.test('a failed table delete is reported, not thrown', async (t) => {
    const { run } = recordingRunner((s) => (s.startsWith('delete table') ? { ok: false, error: 'busy' } : {}));
    const warnings: string[] = [];
    const forwarder = new KernelForwarder(run, { pid: 3, onWarning: (m) => warnings.push(m) });
    forwarder.close();
    t.same(warnings, ['could not delete the nftables table']);
  });
});

// ------------------------------------------------------------- the real library, as root

const HERE = fileURLToPath(new URL('.', import.meta.url));
const DIST_MODULE = join(HERE, '../../dist/data/kernel-forward.js');
function realSkipReason(): string | null {
  return netnsUnavailable() ?? nftablesUnavailable() ?? (existsSync(DIST_MODULE) ? null : 'dist/ not built (npm test builds it in pretest)');
}

/**
 * Runs in a child inside the namespace (a process cannot move one thread of Node into
 * another namespace): the real addon, the real libnftables, the real kernel.
 */
const CHILD = `
import { KernelForwarder, loadNftRunner } from ${JSON.stringify(DIST_MODULE)};
import { execFileSync } from 'node:child_process';
const out = {};
const nft = (...args) => execFileSync('nft', args, { encoding: 'utf8' });
const { run, reason } = loadNftRunner();
out.reason = reason;
nft('add', 'table', 'ip', 'ftpnp_999999'); // a proxy that died (no such PID)
const forwarder = new KernelForwarder(run, { onWarning: (m, d) => { out.warnings = [...(out.warnings ?? []), m + ' ' + d.table]; } });
out.table = forwarder.table;
out.tablesAfterOpen = nft('list', 'tables');
const m = { clientIp: '192.0.2.7', proxyIp: '192.0.2.1', proxyPort: 60001, serverIp: '192.0.2.5', serverPort: 31337, snatIp: '192.0.2.1' };
const forward = forwarder.forward(m, 30000);
out.mapped = nft('list', 'map', 'ip', forwarder.table, 'dnat_to') + nft('list', 'map', 'ip', forwarder.table, 'snat_to');
try { forwarder.forward({ ...m, serverPort: 31338 }, 30000); out.duplicate = 'accepted'; } catch (e) { out.duplicate = e.code + ': ' + e.message; }
forward.remove();
out.unmapped = nft('list', 'map', 'ip', forwarder.table, 'dnat_to') + nft('list', 'map', 'ip', forwarder.table, 'snat_to');
forwarder.close();
out.tablesAfterClose = nft('list', 'tables');
console.log(JSON.stringify(out));
`;

t.test('the real libnftables in a namespace of our own', async (t) => {
  const skip = realSkipReason();
  if (skip) {
    t.comment(`skipped: ${skip}`);
    t.pass(`skipped: ${skip}`);
    return;
  }
  const ns = `${labPrefix()}kf`;
  const ip = (...args: string[]): ReturnType<typeof spawnSync> => spawnSync('ip', args, { encoding: 'utf8' });
  t.equal(ip('netns', 'add', ns).status, 0, `namespace ${ns}`);
  t.teardown(() => void ip('netns', 'delete', ns));
  const child = spawnSync('ip', ['netns', 'exec', ns, process.execPath, '--input-type=module', '-e', CHILD], { encoding: 'utf8', timeout: 30000 });
  t.equal(child.status, 0, `child ran: ${child.stderr}`);
  const out = JSON.parse(child.stdout.trim().split('\n').at(-1) ?? '{}') as Record<string, string | string[]>;
  t.equal(out.reason, 'libnftables');
  t.match(out.table, /^ftpnp_\d+$/);
  t.same(out.warnings, ['removed the nftables table of a proxy that is gone ftpnp_999999']);
  t.notMatch(out.tablesAfterOpen, /ftpnp_999999/, 'the dead proxy\'s table is gone');
  t.match(out.tablesAfterOpen, new RegExp(`table ip ${String(out.table)}`), 'ours exists');
  t.match(out.mapped, /192\.0\.2\.7 \. 192\.0\.2\.1 \. 60001 timeout 30s expires \S+ : 192\.0\.2\.5 \. 31337/, 'DNAT element with its timeout');
  t.match(out.mapped, /192\.0\.2\.7 \. 192\.0\.2\.5 \. 31337 : 192\.0\.2\.1/, 'SNAT element');
  t.match(out.duplicate, /^FTPP_ERR_KERNEL_PATH: cannot add the data mapping: .*File exists/, 'the same mapping twice is refused, not silently merged');
  t.notMatch(out.unmapped, /192\.0\.2\.7/, 'both elements removed');
  t.notMatch(out.tablesAfterClose, /ftpnp_/, 'no table left');
});
