/**
 * The kernel data path's new cases (issue #14) in a small routed lab of its own: PORT/EPRT
 * clients with an active upstream leg (`upstream.dataMode: mirror` and `active`), and IPv6
 * end to end. The proxy runs as a real process (dist/cli.js) on the edge, real clients
 * (curl, tnftp, lftp, CPython ftplib) on one side, a real dual-stack vsftpd on the other.
 *
 *     client namespace                edge namespace (the proxy; forwards v4 and v6)        server namespace
 *   198.51.100.7/24    ---- veth ----  198.51.100.10/24 | 10.20.0.1/24   ---- veth ----   10.20.0.5/24
 *   2001:db8:100::7/64                 2001:db8:100::10 | fd20::1/64                      fd20::5/64
 *   (no route to the server)                                                              (no route back)
 *
 * Neither end has a route to the other's network, so a data connection works only when the
 * proxy's nftables mapping NATs it on both addresses: an active one (the server dials the
 * proxy's leased activePorts port) is DNATed to the client's PORT/EPRT address and SNATed to
 * the proxy's client-side address; a passive one the other way round. The proxy never relays
 * those bytes: its `transfer` record says dataPath kernel, bytes null, wireBytes from nftables.
 * What the kernel cannot carry (a passive client on a `dataMode: active` listener: both sides
 * would connect to the proxy) is relayed and logged `kernel-path-skipped`.
 *
 * Listeners of the one proxy process (all client.dataPath: kernel):
 *   k4   198.51.100.10:2122        -> 10.20.0.5:21, dataMode mirror
 *   k6   [2001:db8:100::10]:2122   -> [fd20::5]:21, dataMode mirror (EPSV/EPRT only)
 *   kact 198.51.100.10:2123        -> 10.20.0.5:21, dataMode active
 *   kone 198.51.100.10:2124        -> 10.20.0.5:21, dataMode mirror, one port in each range
 *
 * Needs root, iproute2, iptables, nftables (nft, libnftables.so.1), the native addon, vsftpd,
 * tnftp, curl, lftp, python3; skips with one line without root, the tools or the addon.
 * Runs dist/cli.js (rebuilt here when src/ is newer). FNP_E2E_LOG_DIR=<dir> keeps the proxy
 * and vsftpd logs of the run.
 */
import t, { type Test } from 'tap';
import { existsSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { makeRandomFile, NetnsLab, netnsUnavailable, nsRun, waitForFtpGreeting } from '../helpers/netns.js';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import type { RunResult } from '../helpers/run.js';
import {
  clip,
  curl,
  escapeRegExp,
  failure,
  ftplib,
  ftpnpTables,
  lastLines,
  lftp,
  nft,
  nftablesUnavailable,
  nftMapElements,
  nftMapText,
  nftSetElements,
  runLabSuite,
  saveLogs,
  shaOf,
  startProxyInNs,
  startVictim,
  tcpProbe,
  tnftp,
} from './nat-lab.js';
import { delay, waitFor } from '../helpers/async.js';

const SUITE_TIMEOUT_MS = 150000;
const CLIENT_TOOLS = ['ftp', 'curl', 'lftp', 'python3', 'timeout', 'sysctl', 'nft'];

/** Documentation ranges (RFC 5737, RFC 3849) on the client side, private ones on the server side. */
const K_ADDR = {
  client4: '198.51.100.7',
  edgePublic4: '198.51.100.10',
  client6: '2001:db8:100::7',
  edgePublic6: '2001:db8:100::10',
  edgePrivate4: '10.20.0.1',
  server4: '10.20.0.5',
  edgePrivate6: 'fd20::1',
  server6: 'fd20::5',
} as const;

/** Sizes that are not a multiple of any buffer size, so a truncated copy cannot look right. */
const DOWNLOAD_BYTES = 4 * 1024 * 1024 + 4321;
const UPLOAD_BYTES = 3 * 1024 * 1024 + 777;
const REMOTE_FILE = 'big.bin';
const ACCEPT_SECONDS = 4;
const IDLE_SECONDS = 3;
/** The stalled download: far beyond any socket buffer. */
const STALL_FILE = 'stall.bin';
const STALL_BYTES = 48 * 1024 * 1024;
/** How long the stalled client may wait for its 426 (nat.test.ts scenario 6 explains the worst case). */
const STALL_REPLY_MAX_SECONDS = 45;
/** Wire bytes (IP, headers included) over payload: see nat.test.ts (WIRE_OVERHEAD_MAX). */
const WIRE_OVERHEAD_MAX = 1.08;
/**
 * Plus what the sender retransmitted (the forwarding edge drops a burst now and then when its
 * backlog queue is full): at most one MTU-sized IP packet per retransmitted segment.
 */
const MAX_WIRE_SEGMENT_BYTES = 1500;
/** A finished transfer's mapping goes with the final reply; allow the proxy that long to delete it. */
const MAPPING_GONE_MS = 3000;
const ADMIN_PORT = 9464;

interface PortRange {
  readonly first: number;
  readonly last: number;
}

interface ListenerSpec {
  readonly name: 'k4' | 'k6' | 'kact' | 'kone';
  readonly family: 4 | 6;
  /** Host as a client dials it (no brackets). */
  readonly host: string;
  readonly port: number;
  readonly server: string;
  readonly bind: string;
  readonly dataMode: 'mirror' | 'active';
  readonly activePorts: PortRange;
  readonly passivePorts: PortRange;
  readonly advertise: string | null;
}

const LISTENERS: Record<ListenerSpec['name'], ListenerSpec> = {
  k4: {
    name: 'k4',
    family: 4,
    host: K_ADDR.edgePublic4,
    port: 2122,
    server: K_ADDR.server4,
    bind: K_ADDR.edgePrivate4,
    dataMode: 'mirror',
    activePorts: { first: 41000, last: 41049 },
    passivePorts: { first: 40300, last: 40349 },
    advertise: K_ADDR.edgePublic4,
  },
  k6: {
    name: 'k6',
    family: 6,
    host: K_ADDR.edgePublic6,
    port: 2122,
    server: K_ADDR.server6,
    bind: K_ADDR.edgePrivate6,
    dataMode: 'mirror',
    activePorts: { first: 41050, last: 41099 },
    passivePorts: { first: 40350, last: 40399 },
    advertise: null,
  },
  kact: {
    name: 'kact',
    family: 4,
    host: K_ADDR.edgePublic4,
    port: 2123,
    server: K_ADDR.server4,
    bind: K_ADDR.edgePrivate4,
    dataMode: 'active',
    activePorts: { first: 41100, last: 41149 },
    passivePorts: { first: 40400, last: 40449 },
    advertise: K_ADDR.edgePublic4,
  },
  /** One port in each range: every session leases the same port, right after the last one let it go. */
  kone: {
    name: 'kone',
    family: 4,
    host: K_ADDR.edgePublic4,
    port: 2124,
    server: K_ADDR.server4,
    bind: K_ADDR.edgePrivate4,
    dataMode: 'mirror',
    activePorts: { first: 41200, last: 41200 },
    passivePorts: { first: 40450, last: 40450 },
    advertise: K_ADDR.edgePublic4,
  },
};

function proxyYaml(): string {
  const range = (r: PortRange): string => `"${r.first}-${r.last}"`;
  const listener = (l: ListenerSpec): string[] => [
    `  - name: ${l.name}`,
    `    listen: "${l.family === 6 ? `[${l.host}]` : l.host}:${l.port}"`,
    `    upstream: { host: "${l.server}", port: 21, dataMode: ${l.dataMode}, activePorts: ${range(l.activePorts)}, bind: "${l.bind}" }`,
    `    client: { ${l.advertise ? `advertise: ${l.advertise}, ` : ''}passivePorts: ${range(l.passivePorts)}, dataPath: kernel }`,
    `    timeouts: { dataAcceptSeconds: ${ACCEPT_SECONDS}, dataIdleSeconds: ${IDLE_SECONDS} }`,
  ];
  return ['log: { level: debug }', `admin: { listen: "127.0.0.1:${ADMIN_PORT}" }`, 'listeners:', ...Object.values(LISTENERS).flatMap(listener), ''].join('\n');
}

interface KernelTopology {
  readonly client: string;
  readonly edge: string;
  readonly server: string;
}

/** Two point-to-point links through the edge; only the edge forwards. Never the root namespace. */
function buildKernelTopology(lab: NetnsLab): KernelTopology {
  const [client, edge, server] = lab.addNamespaces('kcli', 'kedge', 'ksrv') as [string, string, string];
  lab.enableForwarding(edge);
  lab.sysctl(edge, 'net.ipv6.conf.all.forwarding=1');
  const pair = (edgeSide: string, edge4: string, edge6: string, far: string, far4: string, far6: string): void => {
    // No gateway on the far end: it reaches its own link and nothing else.
    lab.link({ fromNs: edge, bridge: null, fromName: edgeSide, toNs: far, toName: 'eth0', cidr: `${far4}/24` });
    lab.ip(edge, 'addr', 'add', `${edge4}/24`, 'dev', lab.name(edgeSide));
    // nodad: usable at once, so nothing waits for duplicate address detection.
    lab.ip(edge, 'addr', 'add', `${edge6}/64`, 'dev', lab.name(edgeSide), 'nodad');
    lab.ip(far, 'addr', 'add', `${far6}/64`, 'dev', 'eth0', 'nodad');
  };
  pair('kc', K_ADDR.edgePublic4, K_ADDR.edgePublic6, client, K_ADDR.client4, K_ADDR.client6);
  pair('ks', K_ADDR.edgePrivate4, K_ADDR.edgePrivate6, server, K_ADDR.server4, K_ADDR.server6);
  return { client, edge, server };
}

/** What one transfer record should say. */
interface Expected {
  readonly clientMode: 'active' | 'passive';
  readonly upstreamMode: 'active' | 'passive';
  readonly dataPath: 'kernel' | 'relay';
}
const ACTIVE_KERNEL: Expected = { clientMode: 'active', upstreamMode: 'active', dataPath: 'kernel' };
const PASSIVE_KERNEL: Expected = { clientMode: 'passive', upstreamMode: 'passive', dataPath: 'kernel' };
const BOTH_CONNECT_RELAY: Expected = { clientMode: 'passive', upstreamMode: 'active', dataPath: 'relay' };

const reason = netnsUnavailable() ?? vsftpdUnavailable() ?? nftablesUnavailable();
if (reason) t.plan(0, reason);
else await main();

async function main(): Promise<void> {
  await runLabSuite(t, { timeoutMs: SUITE_TIMEOUT_MS, tools: CLIENT_TOOLS, install: 'tnftp curl lftp python3 nftables' }, runSuite);
}

async function runSuite(lab: NetnsLab): Promise<void> {
  const started = Date.now();
  const topo = buildKernelTopology(lab);
  const uploadSource = join(lab.dir, 'upload.bin');
  const uploadSha = makeRandomFile(uploadSource, UPLOAD_BYTES);

  // One dual-stack vsftpd (listen_ipv6 on "::" takes IPv4 too, as ::ffff:a.b.c.d). Defaults
  // that matter here: pasv_promiscuous=NO and port_promiscuous=NO (data only from/to the
  // control peer), no pasv_address (the 227 names 10.20.0.5).
  const ftp: VsftpdInstance = await startVsftpd({
    netns: topo.server,
    listenAddress: '::',
    port: 21,
    pasvAddress: null,
    pasvMinPort: 45000,
    pasvMaxPort: 45019,
    extra: { pasv_promiscuous: 'NO', port_promiscuous: 'NO', port_enable: 'YES' },
  });
  lab.adopt({ name: 'vsftpd', pid: ftp.pid, stop: () => ftp.stop(), removeSync: () => rmSync(dirname(ftp.root), { recursive: true, force: true }) });
  const downloadSha = makeRandomFile(join(ftp.root, REMOTE_FILE), DOWNLOAD_BYTES);
  await Promise.all([waitForFtpGreeting(topo.edge, K_ADDR.server4, 21, 10000), waitForFtpGreeting(topo.edge, K_ADDR.server6, 21, 10000)]);

  const proxy = await startProxyInNs(lab, topo.edge, 'kernel-path', proxyYaml(), { ns: topo.client, host: K_ADDR.edgePublic4, port: LISTENERS.k4.port });
  await Promise.all([
    waitForFtpGreeting(topo.client, K_ADDR.edgePublic6, LISTENERS.k6.port, 10000),
    waitForFtpGreeting(topo.client, K_ADDR.edgePublic4, LISTENERS.kact.port, 10000),
    waitForFtpGreeting(topo.client, K_ADDR.edgePublic4, LISTENERS.kone.port, 10000),
  ]);
  const table = `ftpnp_${proxy.daemon.pid}`;

  const paths = (label: string): { local: string; remote: string } => ({ local: join(lab.dir, `${label}.down`), remote: `${label}.up` });
  const maps = (family: 4 | 6): [string, string] => (family === 6 ? ['dnat_to6', 'snat_to6'] : ['dnat_to', 'snat_to']);
  const mapElements = (name: string): Promise<string[] | null> => nftMapElements(topo.edge, table, name);
  const setElements = (name: string): Promise<string[] | null> => nftSetElements(topo.edge, table, name);

  /** Both maps of a family, once they are empty or MAPPING_GONE_MS has passed. */
  async function mapsOnceEmpty(family: 4 | 6): Promise<Array<string[] | null>> {
    const read = (): Promise<Array<string[] | null>> => Promise.all(maps(family).map(mapElements));
    await pollAsync(async () => (await read()).every((elements) => elements?.length === 0), MAPPING_GONE_MS);
    return read();
  }

  /** New records of one event (and listener) since `mark`, once `count` of them are there. */
  async function recordsSince(event: string, listener: string | null, mark: number, count: number, ms = 3000): Promise<Array<Record<string, unknown>>> {
    const pick = (): Array<Record<string, unknown>> =>
      proxy.records().slice(mark).filter((r) => r.event === event && (listener === null || r.listener === listener));
    await waitFor(() => pick().length >= count, ms);
    return pick();
  }

  /** The data-connection commands vsftpd received since `mark` (a length of its protocol log). */
  const upstreamDataCommands = (mark: number): string[] =>
    [...ftp.protocolLog().slice(mark).matchAll(/FTP command: Client "[^"]*", "((?:PORT|EPRT|PASV|EPSV)\b[^"]*)"/g)].map((m) => m[1]!);

  /** The data-connection commands the proxy received from its clients since `mark`. */
  const clientDataCommands = (mark: number, listener: string): string[] =>
    proxy
      .records()
      .slice(mark)
      .filter((r) => r.event === 'command' && r.listener === listener && /^(PORT|EPRT|PASV|EPSV)\b/.test(String(r.command)))
      .map((r) => String(r.command).split(' ')[0]!);

  /** The port an upstream PORT/EPRT names, if it names the proxy's own upstream address. */
  function activePortNamed(command: string, spec: ListenerSpec): number | null {
    const port = /^PORT (\d+),(\d+),(\d+),(\d+),(\d+),(\d+)$/.exec(command);
    if (port) return port.slice(1, 5).join('.') === spec.bind ? Number(port[5]) * 256 + Number(port[6]) : null;
    const eprt = /^EPRT \|([12])\|([^|]+)\|(\d+)\|$/.exec(command);
    if (eprt) return eprt[1] === String(spec.family === 6 ? 2 : 1) && eprt[2] === spec.bind ? Number(eprt[3]) : null;
    return null;
  }

  const summary = (r: Record<string, unknown>): Record<string, unknown> => ({
    direction: r.direction,
    result: r.result,
    clientMode: r.clientMode,
    upstreamMode: r.upstreamMode,
    dataPath: r.dataPath,
    bytes: r.bytes,
  });

  /**
   * One client run that downloads REMOTE_FILE and uploads the upload file through `spec`, then
   * everything the issue promises about it: both files intact (sha256); the client used
   * `clientVerbs`; the server was sent only PORT/EPRT naming the proxy's upstream address and
   * an activePorts port (active upstream) or only PASV/EPSV; one record per transfer with the
   * expected modes and data path; kernel transfers with wireBytes in the file's range and
   * no payload count, relayed ones with the exact payload count; nothing reached the proxy's
   * own data ports; the family's maps are empty again.
   */
  async function roundTrip(
    t: Test,
    label: string,
    spec: ListenerSpec,
    expected: Expected,
    clientVerbs: readonly string[],
    transfer: (local: string, remote: string) => Promise<RunResult>,
  ): Promise<void> {
    const { local, remote } = paths(label);
    const mark = proxy.records().length;
    const logMark = ftp.protocolLog().length;
    // Retransmitted segments (and their bytes) are on the wire too: the sender's namespace counts them.
    const retransBefore = await Promise.all([retransmittedSegments(topo.server), retransmittedSegments(topo.client)]);
    const run = await transfer(local, remote);
    const retransAfter = await Promise.all([retransmittedSegments(topo.server), retransmittedSegments(topo.client)]);
    const retransmitted = { download: retransAfter[0] - retransBefore[0], upload: retransAfter[1] - retransBefore[1] };
    const downloaded = t.equal(await shaOf(local), downloadSha, `${label}: the download (${DOWNLOAD_BYTES} bytes) arrives intact (sha256)${failure(run)}`);
    const uploaded = t.equal(await shaOf(join(ftp.root, remote)), uploadSha, `${label}: the upload (${UPLOAD_BYTES} bytes) arrives intact (sha256)`);
    if (!downloaded || !uploaded) {
      t.comment(`--- client (exit ${run.code}${run.timedOut ? ', timed out' : ''})\n${clip(run.stdout)}\n${clip(run.stderr)}\n--- proxy log tail\n${proxy.tail(30)}`);
    }
    // The proxy's log lines arrive through a pipe after the client has exited: wait for them, never assume.
    await waitFor(() => clientDataCommands(mark, spec.name).length >= clientVerbs.length, 3000);
    t.same(clientDataCommands(mark, spec.name), clientVerbs, `${label}: the client sent ${clientVerbs.join(', ')}`);

    const upstream = upstreamDataCommands(logMark);
    if (expected.upstreamMode === 'active') {
      const ports = upstream.map((command) => activePortNamed(command, spec));
      const inRange = ports.every((port) => port !== null && port >= spec.activePorts.first && port <= spec.activePorts.last);
      t.ok(upstream.length === 2 && inRange, `${label}: the server was sent PORT/EPRT naming ${spec.bind} and activePorts ${spec.activePorts.first}-${spec.activePorts.last}: ${JSON.stringify(upstream)}`);
    } else {
      t.ok(upstream.length === 2 && upstream.every((command) => /^(PASV|EPSV)\b/.test(command)), `${label}: the server was sent PASV/EPSV: ${JSON.stringify(upstream)}`);
    }

    // A kernel transfer's record follows its connection's last packets: the download's may come after the upload's.
    const records = (await recordsSince('transfer', spec.name, mark, 2)).sort((a, b) => String(a.direction).localeCompare(String(b.direction)));
    const kernel = expected.dataPath === 'kernel';
    t.same(
      records.map(summary),
      [
        { direction: 'download', result: 'ok', ...expected, bytes: kernel ? null : DOWNLOAD_BYTES },
        { direction: 'upload', result: 'ok', ...expected, bytes: kernel ? null : UPLOAD_BYTES },
      ],
      `${label}: logged as ${expected.dataPath} transfers (${expected.clientMode}/${expected.upstreamMode})`,
    );
    for (const record of records) {
      const wire = record.wireBytes as { toClient?: number; toServer?: number } | null;
      if (!kernel) {
        t.equal(wire, null, `${label} ${String(record.direction)}: a relayed transfer has no wireBytes`);
        continue;
      }
      const download = record.direction === 'download';
      const payload = download ? DOWNLOAD_BYTES : UPLOAD_BYTES;
      const along = Number(download ? wire?.toClient : wire?.toServer);
      const back = Number(download ? wire?.toServer : wire?.toClient);
      const resent = download ? retransmitted.download : retransmitted.upload;
      t.ok(
        along >= payload && along <= payload * WIRE_OVERHEAD_MAX + resent * MAX_WIRE_SEGMENT_BYTES,
        `${label} ${String(record.direction)}: ${along} wire bytes along the transfer for ${payload} bytes of file (x${(along / payload).toFixed(4)}; ${resent} segments retransmitted) ${JSON.stringify(wire)}`,
      );
      t.ok(back > 0 && back < payload / 10, `${label} ${String(record.direction)}: ${back} wire bytes back (handshake and ACKs)`);
    }
    const unexpected = proxy
      .records()
      .slice(mark)
      .filter((r) => r.event === 'data-stranger' || r.event === 'kernel-path-failed' || (kernel && r.event === 'kernel-path-skipped'));
    t.same(unexpected, [], `${label}: no stranger on a data port, no refused${kernel ? ' or skipped' : ''} mapping`);
    t.same(await mapsOnceEmpty(spec.family), [[], []], `${label}: ${maps(spec.family).join(' and ')} are empty once the transfers are done`);
  }

  /** curl: one download and one upload (two runs); the result of the first that failed, else the upload's. */
  async function curlPair(spec: ListenerSpec, flags: readonly string[], local: string, remote: string): Promise<RunResult> {
    const base = `ftp://${spec.family === 6 ? `[${spec.host}]` : spec.host}:${spec.port}`;
    const get = await curl(lab, topo.client, [...flags, '-o', local, `${base}/${REMOTE_FILE}`]);
    const put = await curl(lab, topo.client, [...flags, '-T', uploadSource, `${base}/${remote}`]);
    return get.code !== 0 ? get : put;
  }

  /** ftplib: one session, RETR then STOR. Over IPv6 ftplib sends EPSV/EPRT, over IPv4 PASV/PORT. */
  async function ftplibPair(spec: ListenerSpec, mode: 'pasv' | 'port', local: string, remote: string): Promise<RunResult> {
    const out = await ftplib(lab, topo.client, { host: spec.host, port: spec.port, mode, ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
    return out.ok ? out.run : { ...out.run, code: out.run.code === 0 ? 1 : out.run.code, stderr: `${out.run.stderr}\n${JSON.stringify(out.records)}` };
  }

  // ---------------------------------------------------------------------------------------
  await t.test('0. the lab: without the proxy neither side can reach the other', async (t) => {
    for (const server of [K_ADDR.server4, K_ADDR.server6]) {
      const probe = await tcpProbe(lab, topo.client, server, 21);
      t.equal(probe.errno, 'ENETUNREACH', `the client has no route to the server ${server} (${JSON.stringify(probe)})`);
    }
    for (const client of [K_ADDR.client4, K_ADDR.client6]) {
      const probe = await tcpProbe(lab, topo.server, client, 2000);
      t.equal(probe.errno, 'ENETUNREACH', `the server has no route back to the client ${client} (${JSON.stringify(probe)})`);
    }
    const { local } = paths('direct');
    const direct = await curl(lab, topo.client, ['-o', local, `ftp://${K_ADDR.server4}/${REMOTE_FILE}`]);
    t.not(direct.code, 0, `curl straight to the server fails (exit ${direct.code}: ${lastLines(direct.stderr, 1)})`);
    t.not(await shaOf(local), downloadSha, 'and downloads nothing');
    // Positive controls: the edge (where the proxy runs) reaches both sides on both families.
    // The server's greeting was awaited from the edge at setup; the client's side:
    for (const client of [K_ADDR.client4, K_ADDR.client6]) {
      const probe = await tcpProbe(lab, topo.edge, client, 2000);
      t.equal(probe.errno, 'ECONNREFUSED', `the edge reaches the client ${client} (nothing listens: refused) ${JSON.stringify(probe)}`);
    }
  });

  await t.test('1. the proxy owns one inet table ftpnp_<pid> with both families\' maps and sets', async (t) => {
    const ready = proxy.records().find((r) => r.event === 'kernel-path' && r.table === table);
    t.ok(ready, `the proxy logged its table ${table}`);
    t.same(await ftpnpTables(topo.edge), [table], `nft list tables in the edge namespace: only ${table}`);
    const tables = await nft(topo.edge, ['list', 'tables']);
    t.match(tables.stdout, new RegExp(`^table inet ${table}$`, 'm'), `it is an inet table (both families): ${tables.stdout.trim()}`);
    const listing = await nft(topo.edge, ['list', 'table', 'inet', table]);
    t.equal(listing.code, 0, `nft list table inet ${table} works ${listing.stderr.trim()}`);
    const parts = [
      ...['dnat_to', 'snat_to', 'flows', 'dnat_to6', 'snat_to6', 'flows6'].map((name) => `map ${name} {`),
      ...['ends', 'ends6'].map((name) => `set ${name} {`),
      'chain cut_reset {',
    ];
    for (const part of parts) t.match(listing.stdout, part, `the table has ${part.slice(0, -2)}`);
    t.same(await Promise.all(['dnat_to', 'snat_to', 'dnat_to6', 'snat_to6'].map(mapElements)), [[], [], [], []], 'no mapping before any transfer');
  });

  await t.test('2. k4 (dataMode mirror): PORT/EPRT clients are carried by the kernel both ways', async (t) => {
    const spec = LISTENERS.k4;
    const active = ['-P', K_ADDR.client4];
    await roundTrip(t, 'k4-curl-port', spec, ACTIVE_KERNEL, ['PORT', 'PORT'], (local, remote) => curlPair(spec, [...active, '--disable-eprt'], local, remote));
    await roundTrip(t, 'k4-curl-eprt', spec, ACTIVE_KERNEL, ['EPRT', 'EPRT'], (local, remote) => curlPair(spec, active, local, remote));
    await roundTrip(t, 'k4-tnftp-port', spec, ACTIVE_KERNEL, ['PORT', 'PORT'], (local, remote) =>
      tnftp(lab, topo.client, { host: spec.host, port: spec.port, passive: false, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] }),
    );
    await roundTrip(t, 'k4-tnftp-eprt', spec, ACTIVE_KERNEL, ['EPRT', 'EPRT'], (local, remote) =>
      tnftp(lab, topo.client, { host: spec.host, port: spec.port, passive: false, epsv4: true, get: [REMOTE_FILE, local], put: [uploadSource, remote] }),
    );
    await roundTrip(t, 'k4-lftp-port', spec, ACTIVE_KERNEL, ['PORT', 'PORT'], (local, remote) =>
      lftp(lab, topo.client, { host: spec.host, port: spec.port, settings: ['ftp:passive-mode no'], get: [REMOTE_FILE, local], put: [uploadSource, remote] }),
    );
    await roundTrip(t, 'k4-ftplib-port', spec, ACTIVE_KERNEL, ['PORT', 'PORT'], (local, remote) => ftplibPair(spec, 'port', local, remote));
    // Mirror with a passive client: the passive kernel path as before (nat.test.ts scenario 6), now in the inet table.
    await roundTrip(t, 'k4-curl-epsv', spec, PASSIVE_KERNEL, ['EPSV', 'EPSV'], (local, remote) => curlPair(spec, [], local, remote));
    await roundTrip(t, 'k4-curl-pasv', spec, PASSIVE_KERNEL, ['PASV', 'PASV'], (local, remote) => curlPair(spec, ['--disable-epsv', '--no-ftp-skip-pasv-ip'], local, remote));
  });

  await t.test('3. kact (dataMode active): PORT clients by the kernel; PASV/EPSV clients relayed (both-connect)', async (t) => {
    const spec = LISTENERS.kact;
    await roundTrip(t, 'kact-curl-port', spec, ACTIVE_KERNEL, ['PORT', 'PORT'], (local, remote) => curlPair(spec, ['-P', K_ADDR.client4, '--disable-eprt'], local, remote));
    await roundTrip(t, 'kact-tnftp-eprt', spec, ACTIVE_KERNEL, ['EPRT', 'EPRT'], (local, remote) =>
      tnftp(lab, topo.client, { host: spec.host, port: spec.port, passive: false, epsv4: true, get: [REMOTE_FILE, local], put: [uploadSource, remote] }),
    );
    const passiveRuns: Array<[string, string, (local: string, remote: string) => Promise<RunResult>]> = [
      ['kact-curl-pasv', 'PASV', (local, remote) => curlPair(spec, ['--disable-epsv', '--no-ftp-skip-pasv-ip'], local, remote)],
      ['kact-tnftp-epsv', 'EPSV', (local, remote) => tnftp(lab, topo.client, { host: spec.host, port: spec.port, passive: true, epsv4: true, get: [REMOTE_FILE, local], put: [uploadSource, remote] })],
      ['kact-ftplib-pasv', 'PASV', (local, remote) => ftplibPair(spec, 'pasv', local, remote)],
    ];
    for (const [label, verb, transfer] of passiveRuns) {
      const mark = proxy.records().length;
      await roundTrip(t, label, spec, BOTH_CONNECT_RELAY, [verb, verb], transfer);
      const skipped = proxy.records().slice(mark).filter((r) => r.event === 'kernel-path-skipped');
      t.same(
        skipped.map((r) => ({ listener: r.listener, reason: r.reason })),
        [{ listener: 'kact', reason: 'both-connect' }, { listener: 'kact', reason: 'both-connect' }],
        `${label}: each ${verb} channel logged kernel-path-skipped, reason both-connect`,
      );
    }
  });

  await t.test('4. k6 (IPv6 end to end): EPSV and EPRT clients are carried by the kernel', async (t) => {
    const spec = LISTENERS.k6;
    await roundTrip(t, 'k6-curl-epsv', spec, PASSIVE_KERNEL, ['EPSV', 'EPSV'], (local, remote) => curlPair(spec, ['-g'], local, remote));
    await roundTrip(t, 'k6-curl-eprt', spec, ACTIVE_KERNEL, ['EPRT', 'EPRT'], (local, remote) => curlPair(spec, ['-g', '-P', K_ADDR.client6], local, remote));
    for (const passive of [true, false]) {
      await roundTrip(t, `k6-tnftp-${passive ? 'epsv' : 'eprt'}`, spec, passive ? PASSIVE_KERNEL : ACTIVE_KERNEL, passive ? ['EPSV', 'EPSV'] : ['EPRT', 'EPRT'], (local, remote) =>
        tnftp(lab, topo.client, { host: spec.host, port: spec.port, passive, epsv4: true, get: [REMOTE_FILE, local], put: [uploadSource, remote] }),
      );
    }
    for (const passive of [true, false]) {
      await roundTrip(t, `k6-lftp-${passive ? 'epsv' : 'eprt'}`, spec, passive ? PASSIVE_KERNEL : ACTIVE_KERNEL, passive ? ['EPSV', 'EPSV'] : ['EPRT', 'EPRT'], (local, remote) =>
        lftp(lab, topo.client, { host: `[${spec.host}]`, port: spec.port, settings: [`ftp:passive-mode ${passive ? 'yes' : 'no'}`], get: [REMOTE_FILE, local], put: [uploadSource, remote] }),
      );
    }
    for (const mode of ['pasv', 'port'] as const) {
      await roundTrip(t, `k6-ftplib-${mode === 'pasv' ? 'epsv' : 'eprt'}`, spec, mode === 'pasv' ? PASSIVE_KERNEL : ACTIVE_KERNEL, mode === 'pasv' ? ['EPSV', 'EPSV'] : ['EPRT', 'EPRT'], (local, remote) =>
        ftplibPair(spec, mode, local, remote),
      );
    }
    const v4 = await Promise.all(['dnat_to', 'snat_to'].map(mapElements));
    t.same(v4, [[], []], 'the IPv4 maps stayed empty');
  });

  await t.test(`5. an active mapping the server never uses expires after dataAcceptSeconds (${ACCEPT_SECONDS}s); a RETR after that fails cleanly`, async (t) => {
    const spec = LISTENERS.k4;
    const { local } = paths('k4-expired');
    const mark = proxy.records().length;
    const victim = startVictim(lab, topo.client, { host: spec.host, port: spec.port, mode: 'port', remote: REMOTE_FILE, local });
    const port = await victim.pasv;
    t.match(String(port.reply), /^200 /, `the client's PORT is accepted: ${JSON.stringify(port)}`);
    const added = Date.now();
    const dnat = (await mapElements('dnat_to')) ?? [];
    t.ok(dnat.length === 1 && dnat[0]!.endsWith(` : ${K_ADDR.client4} . ${String(port.port)}`), `the 200 came with the mapping to the client's PORT address ${JSON.stringify(dnat)}`);
    t.match(await nftMapText(topo.edge, table, 'dnat_to'), new RegExp(`timeout ${ACCEPT_SECONDS}s`), `it carries the dataAcceptSeconds timeout (${ACCEPT_SECONDS}s)`);
    await pollAsync(async () => (await mapElements('dnat_to'))?.length === 0, (ACCEPT_SECONDS + 4) * 1000);
    const seconds = (Date.now() - added) / 1000;
    t.same(await mapElements('dnat_to'), [], `the DNAT element is gone after ${seconds.toFixed(1)} s while the session is still open`);
    t.ok(seconds >= ACCEPT_SECONDS - 1, 'and not before its time');
    victim.go();
    const done = await victim.done;
    const retr = done.records.find((r) => r.op === 'retr');
    t.equal(done.code, 0, `the client's session ends by itself ${done.stderr.trim()}`);
    // vsftpd's connection now reaches the proxy's own port: the kernel completes the handshake
    // before the proxy resets it, so vsftpd may have said 150 before its 426.
    const failedReply = /^4\d\d /.test(String(retr?.first)) ? String(retr?.first) : String(retr?.final);
    t.match(failedReply, /^4\d\d /, `the late RETR fails with a 4xx, the server's connection found no mapping: ${JSON.stringify(retr)}`);
    t.equal(retr?.accepted, false, 'the client\'s data listener never got a connection');
    t.not(await shaOf(local), downloadSha, 'and nothing was downloaded');
    const strangers = proxy.records().slice(mark).filter((r) => r.event === 'data-stranger');
    t.ok(
      strangers.some((r) => String(r.from).startsWith(`${spec.server}:`) && r.when === 'unmapped'),
      `the server's connection reached the proxy's own port and was logged as unmapped ${JSON.stringify(strangers)}`,
    );
    const records = await recordsSince('transfer', spec.name, mark, 1);
    t.match(records.map(summary), [{ direction: 'download', result: 'failed', ...ACTIVE_KERNEL, bytes: null }], 'logged as a failed kernel transfer');
    await recordsSince('session-end', spec.name, mark, 1);
    t.same(await mapsOnceEmpty(4), [[], []], 'dnat_to and snat_to are empty once the session has ended');
  });

  for (const spec of [LISTENERS.k4, LISTENERS.k6]) {
    await t.test(`6. ${spec.name}: a kernel-carried active download whose client stops reading is cut after dataIdleSeconds (${IDLE_SECONDS}s)`, async (t) => {
      const client = spec.family === 6 ? K_ADDR.client6 : K_ADDR.client4;
      const clientSide = spec.family === 6 ? K_ADDR.edgePublic6 : K_ADDR.edgePublic4;
      const [dnatMap, snatMap] = maps(spec.family);
      const file = `${spec.name}-${STALL_FILE}`;
      makeRandomFile(join(ftp.root, file), STALL_BYTES);
      t.teardown(() => rmSync(join(ftp.root, file), { force: true }));
      const mark = proxy.records().length;
      const stalled = ftplib(lab, topo.client, { host: spec.host, port: spec.port, tool: 'stall', mode: 'port', remote: file, wait: STALL_REPLY_MAX_SECONDS + 5 }, (STALL_REPLY_MAX_SECONDS + 20) * 1000);
      // While it stalls: the server's connection to the leased port is DNATed to the client's
      // PORT/EPRT address and SNATed to the proxy's client-side address.
      let dnat: string[] = [];
      let snat: string[] = [];
      const seen = await pollAsync(async () => {
        dnat = (await mapElements(dnatMap)) ?? [];
        snat = (await mapElements(snatMap)) ?? [];
        return dnat.length > 0 && snat.length > 0;
      }, 5000);
      const key = new RegExp(`^${escapeRegExp(spec.server)} \\. ${escapeRegExp(spec.bind)} \\. (\\d+) : ${escapeRegExp(client)} \\. (\\d+)$`).exec(dnat[0] ?? '');
      const leased = Number(key?.[1]);
      t.ok(
        seen && dnat.length === 1 && key && leased >= spec.activePorts.first && leased <= spec.activePorts.last,
        `${dnatMap}: (server . proxy's ${spec.bind} . leased activePorts port) -> the client's ${spec.family === 6 ? 'EPRT' : 'PORT'} address ${JSON.stringify(dnat)}`,
      );
      t.same(snat, [`${spec.server} . ${client} . ${key?.[2] ?? '?'} : ${clientSide}`], `${snatMap}: the client sees the connection come from the proxy (${clientSide})`);

      const out = await stalled;
      const stall = out.records.find((r) => r.op === 'stall');
      t.ok(stall, `the stalled client reported ${JSON.stringify(out.records)} ${out.run.stderr.trim()}`);
      t.match(String(stall?.first), /^150 /, 'RETR started');
      t.match(String(stall?.final), /^426 /, `the client gets 426 (${String(stall?.final)})`);
      const seconds = Number(stall?.seconds);
      t.ok(seconds >= IDLE_SECONDS - 0.5 && seconds < STALL_REPLY_MAX_SECONDS, `the 426 after ${seconds} s`);
      // The transfer record is logged last (after the 426): once it is here, so are the command and limit records.
      const records = await recordsSince('transfer', spec.name, mark, 1);
      const retrAt = proxy.records().slice(mark).find((r) => r.event === 'command' && r.command === `RETR ${file}`)?.time;
      const cutAt = proxy.records().slice(mark).find((r) => r.event === 'limit')?.time;
      const cutSeconds = (Date.parse(String(cutAt)) - Date.parse(String(retrAt))) / 1000;
      t.ok(cutSeconds >= IDLE_SECONDS && cutSeconds <= IDLE_SECONDS * 1.25 + 0.5, `the cut ${cutSeconds} s after RETR (dataIdleSeconds ${IDLE_SECONDS}, polled every ${IDLE_SECONDS / 4} s)`);
      t.equal(stall?.data_end, 'reset', 'its data connection is reset, not closed as if complete');
      const limits = proxy.records().slice(mark).filter((r) => r.event === 'limit');
      t.match(limits, [{ limit: 'data-idle-timeout', dataIdleMs: IDLE_SECONDS * 1000 }], `the limit event a relayed idle transfer logs ${JSON.stringify(limits)}`);
      t.match(records.map(summary), [{ direction: 'download', result: 'failed', ...ACTIVE_KERNEL, bytes: null }], 'logged as a failed kernel transfer, active on both legs');
      t.equal(records[0]?.reply, 426, 'with the 426 the client got');
      const wire = records[0]?.wireBytes as { toClient?: number; toServer?: number } | null;
      t.ok(wire && Number(wire.toClient) > 0 && Number(wire.toClient) < STALL_BYTES / 2, `counted up to the cut ${JSON.stringify(wire)}`);
      const suffix = spec.family === 6 ? '6' : '';
      const names = ['dnat_to', 'snat_to', 'flows', 'ends'].map((name) => `${name}${suffix}`);
      const elements = (name: string): Promise<string[] | null> => (name.startsWith('ends') ? setElements(name) : mapElements(name));
      await pollAsync(async () => (await Promise.all(names.map(elements))).every((e) => e?.length === 0), MAPPING_GONE_MS);
      t.same(await Promise.all(names.map(elements)), names.map(() => []), `nothing of it is left in the table (${names.join(', ')}; the cut elements went with the final reply)`);
    });
  }

  await t.test('7. kone (one-port ranges): a port leased again at once keeps each transfer\'s record and wire bytes apart', async (t) => {
    // curl runs one session per file: the upload's session leases the port the download's
    // session has just released, while the download's counters may still be awaiting its FINs.
    const spec = LISTENERS.kone;
    await roundTrip(t, 'kone-curl-port', spec, ACTIVE_KERNEL, ['PORT', 'PORT'], (local, remote) => curlPair(spec, ['-P', K_ADDR.client4, '--disable-eprt'], local, remote));
    await roundTrip(t, 'kone-curl-epsv', spec, PASSIVE_KERNEL, ['EPSV', 'EPSV'], (local, remote) => curlPair(spec, [], local, remote));
  });

  await t.test('8. metrics: both-connect channels are counted as kernel fallbacks; kernel transfers add wire bytes, not payload bytes', async (t) => {
    const skipped = proxy.records().filter((r) => r.event === 'kernel-path-skipped' && r.listener === 'kact' && r.reason === 'both-connect').length;
    const out = await nsRun(topo.edge, 'curl', ['-q', '-sS', '--max-time', '5', `http://127.0.0.1:${ADMIN_PORT}/metrics`], { timeoutMs: 10000 });
    t.ok(skipped >= 6, `the proxy logged ${skipped} both-connect skips on kact (two per passive client run in 3.)`);
    t.equal(out.code, 0, `GET /metrics from the admin listener${failure(out)}`);
    const line = out.stdout.split('\n').find((l) => l.startsWith('ftpnp_kernel_fallbacks_total{') && l.includes('listener="kact"') && l.includes('reason="both-connect"'));
    t.equal(Number(line?.split(' ').pop()), skipped, `ftpnp_kernel_fallbacks_total{listener="kact",reason="both-connect"} is ${skipped}, one per kernel-path-skipped record: ${String(line)}`);
    // The proxy never saw the payload of a kernel-carried transfer: nothing in the relay's byte
    // counter for the kernel-only listeners, IP bytes in the wire counter instead.
    const sum = (metric: string, listener: string): number =>
      out.stdout
        .split('\n')
        .filter((l) => l.startsWith(`${metric}{`) && l.includes(`listener="${listener}"`))
        .reduce((total, l) => total + Number(l.split(' ').pop()), 0);
    for (const listener of ['k4', 'k6']) {
      t.equal(sum('ftpnp_transfer_bytes_total', listener), 0, `ftpnp_transfer_bytes_total{listener="${listener}"}: no payload byte went through the proxy`);
      t.ok(sum('ftpnp_transfer_wire_bytes_total', listener) >= 8 * (DOWNLOAD_BYTES + UPLOAD_BYTES), `ftpnp_transfer_wire_bytes_total{listener="${listener}"}: ${sum('ftpnp_transfer_wire_bytes_total', listener)} IP bytes for the eight round trips in 2./4. (and the stalled download)`);
    }
    t.equal(sum('ftpnp_transfer_bytes_total', 'kact') >= 3 * (DOWNLOAD_BYTES + UPLOAD_BYTES), true, `ftpnp_transfer_bytes_total{listener="kact"}: the relayed both-connect transfers (${sum('ftpnp_transfer_bytes_total', 'kact')} bytes)`);
  });

  // ---------------------------------------------------------------------------------------
  const lines = proxy.daemon.output().split('\n').filter((line) => line.trim() !== '');
  t.same(lines.filter((line) => !line.startsWith('{')), [], 'the proxy wrote only JSON log lines (no crash trace)');
  const errors = proxy.records().filter((record) => ['error', 'fatal'].includes(String(record.level)) || Number(record.level) >= 50);
  t.same(errors, [], 'the proxy logged no error');

  await t.test('9. SIGTERM: the proxy stops and deletes its table', async (t) => {
    await proxy.daemon.stop();
    t.equal(proxy.daemon.exitCode(), 0, `the proxy exits 0 on SIGTERM (${lastLines(proxy.tail(3), 3)})`);
    t.ok(proxy.records().some((r) => r.event === 'stopped'), 'and logged stopped');
    t.same(await ftpnpTables(topo.edge), [], 'nft list tables in the edge namespace: no ftpnp_ table is left');
  });

  saveLogs({ proxy: proxy.daemon.output(), vsftpd: ftp.protocolLog() }, 'kernel-path-');

  await t.test('nothing is left behind', async (t) => {
    await lab.cleanup();
    const left = lab.leftovers();
    t.same(left.namespaces, [], `no namespace named ${lab.prefix}*`);
    t.same(left.links, [], `no interface named ${lab.prefix}* in the root namespace`);
    t.same(left.processes, [], 'no process the suite started is alive');
    t.notOk(existsSync(lab.dir), 'the scratch directory is gone');
    t.comment(`suite took ${Math.round((Date.now() - started) / 1000)} s`);
  });
}

/** The TCP segments a namespace has retransmitted so far (Tcp: RetransSegs, IPv4 and IPv6 alike). */
async function retransmittedSegments(ns: string): Promise<number> {
  const out = await nsRun(ns, 'cat', ['/proc/net/snmp'], { timeoutMs: 5000 });
  const [names, values] = out.stdout.split('\n').filter((line) => line.startsWith('Tcp:')).map((line) => line.trim().split(/\s+/));
  const index = names?.indexOf('RetransSegs') ?? -1;
  if (index < 0 || !values?.[index]) throw new Error(`no Tcp RetransSegs in /proc/net/snmp of ${ns}: ${out.stderr.trim()}`);
  return Number(values[index]);
}

/** Poll an async check until it is true or `ms` runs out (never a fixed sleep); returns the last result. */
async function pollAsync(check: () => Promise<boolean>, ms: number, stepMs = 50): Promise<boolean> {
  const end = Date.now() + ms;
  for (;;) {
    if (await check()) return true;
    if (Date.now() >= end) return false;
    await delay(stepMs);
  }
}
