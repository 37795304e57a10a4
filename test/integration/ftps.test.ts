/**
 * FTPS through the proxy (issue #12): the required matrix, with real parts only. Real vsftpd
 * (ssl_enable, force_local_logins_ssl, force_local_data_ssl, require_ssl_reuse, debug_ssl: an
 * explicit instance, an implicit_ssl instance, an explicit one capped at TLS 1.2, and a plain
 * one), real clients (curl, lftp, CPython ftplib/FTP_TLS, tnftp), all on 127.0.0.1.
 *
 * Each combination below is one proxy (client leg plain / explicit / implicit × server leg
 * plain / explicit / implicit FTPS) with an admin listener, shared by its clients, which run
 * concurrently. Every client downloads and uploads a random file of just over 1 MiB, checked by
 * sha256. Then, per transfer, the proxy's `transfer` record (clientTls / serverTls: version and
 * `resumed: true` on every TLS data connection, both legs) and its session's `tls-client`,
 * `tls-server` and `session-end` records; per combination, ftpnp_tls_handshakes_total against
 * the sessions and transfers that ran, and vsftpd's protocol log: every USER came after a TLS
 * handshake on its connection (no credential in clear text), one AUTH TLS / PBSZ 0 / PROT P per
 * session (the proxy's own; the client's are never forwarded, protocol.md §5.3), every data
 * connection resumed the control session. A plain server sees no AUTH/PBSZ/PROT at all.
 *
 * Representative rather than the full cross product (the full one would take minutes): every
 * client does every mode it can over TLS in the main combination (explicit → explicit FTPS,
 * dataMode mirror, so PORT clients make vsftpd connect to the proxy and the proxy is the TLS
 * client on an accepted socket); every client does one case in each other TLS combination,
 * implicit toward the server included; plain clients → FTPS server (the legacy-client case)
 * with curl EPSV, PASV, EPRT and PORT (`-P`), lftp passive and active (ftp:ssl-allow no),
 * ftplib PASV and PORT, tnftp in all four modes. TLS 1.2 (both legs) in one combination.
 *
 * Client quirks (test/integration/ftps-baseline.test.ts): curl 7.88 cannot do active FTPS, so
 * curl -P runs only with a plain client leg; curl opens explicit TLS with AUTH SSL.
 * The curl/lftp TLS 1.3 upload flake seen against vsftpd directly (426 in 24-44% of runs: an
 * unread NewSessionTicket makes the client's close() send RST and drop the end of the upload)
 * does not happen against the proxy: it sends no NewSessionTicket on a resumed TLS 1.3 data
 * connection (vsftpd does; checked with a Python probe), and 0 of 440 curl/lftp TLS 1.3
 * uploads through it failed (sequential and 4 at a time; explicit front, plain and FTPS
 * server). So those cases run at TLS 1.3 here, uncapped. Should the proxy ever start sending
 * tickets on data connections, these uploads are where it will show.
 *
 * Relay ports 21000-21999 belong to this file.
 */
import t from 'tap';
import { relayImplementation } from '../../src/data/splice-relay.js';
import { commandsMissing } from '../helpers/netns.js';
import { chmodSync, copyFileSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance, type VsftpdSslOptions } from '../helpers/vsftpd.js';
import {
  FTPS_CLIENT_MODES,
  sha256File,
  transfer,
  transferTls,
  writeRandomFile,
  type ClientMode,
  type ClientName,
  type FtpsClientName,
  type FtpsEndpoint,
} from '../helpers/clients.js';
import { makeTestPki, opensslUnavailable, type TestPki } from '../helpers/tls.js';
import { startTestProxy, type LogRecord, type TestProxy } from '../helpers/proxy.js';
import { PortBlocks } from '../helpers/fake-server.js';
import { takeFreeRange } from '../helpers/ops.js';
import { waitFor } from '../helpers/async.js';
import type { RunResult } from '../helpers/run.js';
import type { TapTest } from '../helpers/tap.js';

/** Just over 1 MiB: not a multiple of any TLS record or socket buffer size. */
const FILE_BYTES = 1024 * 1024 + 4321;
/** Client processes at once within a combination (the machines have 2 cores). */
const CONCURRENCY = 4;
const ports = new PortBlocks(21000);

/** The client leg: no `listeners[].tls`, or TLS explicit (AUTH) / implicit (at connect). */
type Front = 'plain' | 'explicit' | 'implicit';
/** The vsftpd behind the proxy. */
type ServerKind = 'plain' | 'explicit' | 'implicit' | 'explicit-tls12';
const UPSTREAM_TLS: Readonly<Record<ServerKind, 'explicit' | 'implicit' | null>> = { plain: null, explicit: 'explicit', implicit: 'implicit', 'explicit-tls12': 'explicit' };
const SERVER_VERSION: Readonly<Record<ServerKind, string | null>> = { plain: null, explicit: 'TLSv1.3', implicit: 'TLSv1.3', 'explicit-tls12': 'TLSv1.2' };

interface Case {
  readonly client: ClientName;
  readonly mode: ClientMode;
  /** Cap the client at TLS 1.2 (FtpsEndpoint.tlsMax). */
  readonly tlsMax?: '1.2';
}

interface Combination {
  readonly name: string;
  readonly front: Front;
  readonly server: ServerKind;
  /** mirror: the server's data connection follows the client's mode (PORT clients → PORT upstream). */
  readonly dataMode: 'passive' | 'mirror';
  readonly cases: readonly Case[];
}

const tlsClientCases = (mode: (client: FtpsClientName) => ClientMode, tlsMax?: '1.2'): Case[] =>
  (['curl', 'lftp', 'ftplib'] as const).map((client) => ({ client, mode: mode(client), ...(tlsMax ? { tlsMax } : {}) }));

const COMBINATIONS: readonly Combination[] = [
  {
    name: 'tls-explicit.to.ftps-explicit',
    front: 'explicit',
    server: 'explicit',
    dataMode: 'mirror',
    cases: (Object.keys(FTPS_CLIENT_MODES) as FtpsClientName[]).flatMap((client) => FTPS_CLIENT_MODES[client].map((mode) => ({ client, mode }))),
  },
  { name: 'tls-implicit.to.ftps-explicit12', front: 'implicit', server: 'explicit-tls12', dataMode: 'passive', cases: tlsClientCases((c) => (c === 'curl' ? 'epsv' : c === 'lftp' ? 'port' : 'pasv'), '1.2') },
  { name: 'tls-explicit.to.ftps-implicit', front: 'explicit', server: 'implicit', dataMode: 'passive', cases: tlsClientCases((c) => (c === 'curl' ? 'pasv' : c === 'lftp' ? 'pasv' : 'port')) },
  { name: 'tls-implicit.to.ftps-implicit', front: 'implicit', server: 'implicit', dataMode: 'passive', cases: tlsClientCases((c) => (c === 'curl' ? 'epsv' : c === 'lftp' ? 'port' : 'pasv')) },
  { name: 'tls-explicit.to.plain', front: 'explicit', server: 'plain', dataMode: 'passive', cases: tlsClientCases((c) => (c === 'curl' ? 'epsv' : c === 'lftp' ? 'port' : 'pasv')) },
  { name: 'tls-implicit.to.plain', front: 'implicit', server: 'plain', dataMode: 'passive', cases: tlsClientCases((c) => (c === 'curl' ? 'pasv' : c === 'lftp' ? 'pasv' : 'port')) },
  {
    // The legacy client: plain FTP in front, FTPS behind.
    name: 'plain.to.ftps-explicit',
    front: 'plain',
    server: 'explicit',
    dataMode: 'mirror',
    cases: [
      ...(['epsv', 'pasv', 'eprt', 'port'] as const).map((mode) => ({ client: 'curl' as const, mode })),
      ...(['pasv', 'port'] as const).map((mode) => ({ client: 'lftp' as const, mode })),
      ...(['pasv', 'port'] as const).map((mode) => ({ client: 'ftplib' as const, mode })),
      ...(['epsv', 'pasv', 'eprt', 'port'] as const).map((mode) => ({ client: 'tnftp' as const, mode })),
    ],
  },
  {
    name: 'plain.to.ftps-implicit',
    front: 'plain',
    server: 'implicit',
    dataMode: 'passive',
    cases: [{ client: 'curl', mode: 'pasv' }, { client: 'lftp', mode: 'port' }, { client: 'ftplib', mode: 'pasv' }, { client: 'tnftp', mode: 'epsv' }],
  },
  {
    name: 'plain.to.plain',
    front: 'plain',
    server: 'plain',
    dataMode: 'passive',
    cases: [{ client: 'curl', mode: 'epsv' }, { client: 'lftp', mode: 'pasv' }, { client: 'ftplib', mode: 'port' }, { client: 'tnftp', mode: 'port' }],
  },
];

const ACTIVE_MODES: ReadonlySet<ClientMode> = new Set(['port', 'eprt']);
/** The native relay thread is built and picked (else every transfer takes the JS relay). */
const NATIVE = relayImplementation().kind === 'splice';


function excerpt(result: RunResult): string {
  return `${result.timedOut ? 'timed out; ' : ''}${(result.stderr + result.stdout).trim().slice(0, 400)}`;
}

/** vsftpd's protocol log, as (pid, text) lines. */
function logLines(log: string): Array<{ pid: string; text: string }> {
  return [...log.matchAll(/\[pid (\d+)\] (.*)/g)].map((m) => ({ pid: m[1]!, text: m[2]! }));
}

const reason = vsftpdUnavailable() ?? opensslUnavailable() ?? commandsMissing(['curl', 'lftp', 'python3', 'tnftp']);
if (reason) {
  t.plan(0, reason);
} else {
  let pki: TestPki;
  let localDir: string;
  let localSource: string;
  let sourceHash: string;
  const servers = new Map<ServerKind, VsftpdInstance>();

  t.before(async () => {
    pki = makeTestPki();
    const ssl = (more: Partial<VsftpdSslOptions> = {}): VsftpdSslOptions => ({
      cert: pki.server.cert.path,
      key: pki.server.key.path,
      forceLogins: true,
      forceData: true,
      requireReuse: true,
      debug: true,
      ...more,
    });
    // pasvAddress null: vsftpd's 227 carries its real address; 20 ports for 4 clients at once.
    const start = async (kind: ServerKind, sslOptions?: VsftpdSslOptions): Promise<void> => {
      const pasvMinPort = 41000 + Math.floor(Math.random() * 1000) * 20;
      servers.set(kind, await startVsftpd({ pasvAddress: null, pasvMinPort, pasvMaxPort: pasvMinPort + 19, ...(sslOptions ? { ssl: sslOptions } : {}) }));
    };
    await Promise.all([start('plain'), start('explicit', ssl()), start('implicit', ssl({ implicit: true })), start('explicit-tls12', ssl({ tlsv13: false }))]);
    localDir = mkdtempSync(join(tmpdir(), 'ftpnp-ftps-'));
    chmodSync(localDir, 0o755);
    localSource = join(localDir, 'source.bin');
    sourceHash = writeRandomFile(localSource, FILE_BYTES);
  });
  t.teardown(async () => {
    await Promise.all([...servers.values()].map((s) => s.stop()));
    if (localDir) rmSync(localDir, { recursive: true, force: true });
    pki?.cleanup();
  });

  async function startComboProxy(t: TapTest, combo: Combination, server: VsftpdInstance): Promise<TestProxy> {
    const passive = await takeFreeRange(ports, 10);
    const active = combo.dataMode === 'passive' ? null : await takeFreeRange(ports, 10);
    const upstreamTls = UPSTREAM_TLS[combo.server];
    const yaml = [
      'log: { level: info }',
      'admin: { listen: "127.0.0.1:0" }',
      'listeners:',
      `  - name: ${combo.name}`,
      '    listen: "127.0.0.1:0"',
      ...(combo.front === 'plain'
        ? []
        : [`    tls: { mode: ${combo.front}, cert: ${pki.server.cert.path}, key: ${pki.server.key.path}, require: false, dataSessionReuse: required, minVersion: TLSv1.2 }`]),
      '    upstream:',
      `      host: ${server.host}`,
      `      port: ${server.port}`,
      `      dataMode: ${combo.dataMode}`,
      ...(active ? [`      activePorts: "${active}"`] : []),
      ...(upstreamTls ? [`      tls: { mode: ${upstreamTls}, ca: ${pki.ca.cert.path}, servername: 127.0.0.1, verify: true }`] : []),
      '    client:',
      `      passivePorts: "${passive}"`,
      // Every client here is 127.0.0.1: the default per-address share of a 10-port range (2)
      // would refuse the third of four concurrent clients whenever transfers overlap (a 425,
      // seen under CI load as curl's exit 30 after PORT).
      '    limits: { maxRelayPortsPerIp: 10 }',
      '',
    ].join('\n');
    return startTestProxy(yaml, { teardown: t });
  }

  /** One client process: download or upload one file through the proxy. */
  function runClient(combo: Combination, c: Case, proxy: TestProxy, server: VsftpdInstance, direction: 'get' | 'put', remote: string, local: string): Promise<RunResult> {
    const endpoint: FtpsEndpoint = {
      host: proxy.host,
      port: proxy.port,
      user: server.user,
      password: server.password,
      activeAddress: '127.0.0.1',
      caFile: pki.ca.cert.path,
      timeoutMs: 30000,
      ...(c.tlsMax ? { tlsMax: c.tlsMax } : {}),
    };
    if (combo.front === 'plain') return transfer(c.client, c.mode, endpoint, direction, remote, local);
    if (c.client === 'tnftp') throw new Error('tnftp has no FTPS');
    return transferTls(c.client, combo.front, c.mode, endpoint, direction, remote, local);
  }

  /** One transfer through the proxy, and everything the proxy logged about its session. */
  async function checkCase(t: TapTest, combo: Combination, c: Case, proxy: TestProxy, server: VsftpdInstance, direction: 'get' | 'put'): Promise<void> {
    const tag = `${combo.name}.${c.client}-${c.mode}${c.tlsMax ? '-tls12' : ''}`;
    const local = join(localDir, `${tag}.down`);
    // A file name per case: the proxy's transfer record (`path`) then belongs to this case alone.
    const remote = direction === 'get' ? `${tag}.src` : `${tag}.up`;
    if (direction === 'get') copyFileSync(localSource, join(server.root, remote));
    const result = await runClient(combo, c, proxy, server, direction, remote, direction === 'get' ? local : localSource);
    t.equal(result.code, 0, result.code === 0 ? `${c.client} exits 0` : `${c.client} exits 0 (${excerpt(result)})`);
    const landed = direction === 'get' ? local : join(server.root, remote);
    t.equal(existsSync(landed) ? sha256File(landed) : 'missing', sourceHash, `${direction === 'get' ? 'downloaded' : 'uploaded'} file intact`);

    const records = proxy.logs().filter((r) => r.event === 'transfer' && r.path === remote);
    t.equal(records.length, 1, 'one transfer record (no retry)');
    const record = records[0] ?? {};
    const clientVersion = combo.front === 'plain' ? null : c.tlsMax === '1.2' ? 'TLSv1.2' : 'TLSv1.3';
    const serverVersion = SERVER_VERSION[combo.server];
    t.match(record, { result: 'ok', reply: 226, bytes: FILE_BYTES, direction: direction === 'get' ? 'download' : 'upload' }, 'transfer ok, every byte');
    const clientMode = ACTIVE_MODES.has(c.mode) ? 'active' : 'passive';
    t.equal(record.clientMode, clientMode, `client data connection ${clientMode}`);
    t.equal(record.upstreamMode, combo.dataMode === 'mirror' ? clientMode : 'passive', `server data connection ${String(record.upstreamMode)} (dataMode ${combo.dataMode})`);
    t.same(record.clientTls, clientVersion ? { tlsVersion: clientVersion, resumed: true } : null, `client data leg: ${clientVersion ? `${clientVersion}, resumed` : 'plain'}`);
    t.same(record.serverTls, serverVersion ? { tlsVersion: serverVersion, resumed: true } : null, `server data leg: ${serverVersion ? `${serverVersion}, resumed` : 'plain'}`);
    // What carried the bytes: with the addon, the native thread, which opens and seals TLS 1.3
    // records itself (relay `native-tls`) and splices plain legs; a TLS 1.2 leg keeps Node's TLS.
    const versions = [clientVersion, serverVersion].filter((v): v is string => v !== null);
    const carrier = !NATIVE ? 'js' : versions.includes('TLSv1.2') ? 'js' : versions.length > 0 ? 'native-tls' : 'splice';
    t.equal(record.relay, carrier, `carried by ${carrier}`);

    const session = record.session;
    const end = await proxy.waitLog((r) => r.event === 'session-end' && r.session === session, 5000);
    t.ok(end, 'session-end logged');
    t.match(end ?? {}, { clientTls: clientVersion, serverTls: serverVersion }, 'session-end names both legs');
    const ofSession = (event: string): LogRecord[] => proxy.logs().filter((r) => r.event === event && r.session === session);
    t.same(ofSession('tls-client').map((r) => [r.tlsVersion, r.mode]), clientVersion ? [[clientVersion, combo.front]] : [], 'tls-client record');
    t.same(ofSession('tls-server').map((r) => [r.tlsVersion, r.mode, r.verified]), serverVersion ? [[serverVersion, UPSTREAM_TLS[combo.server], true]] : [], 'tls-server record');
  }

  /** Sessions, data connections and handshakes vsftpd logged since `from`. */
  function checkServerLog(t: TapTest, combo: Combination, server: VsftpdInstance, from: number, sessions: number): void {
    const lines = logLines(server.protocolLog().slice(from));
    const commands = lines.map((l) => /FTP command: Client "[^"]*", "([^"]*)"/.exec(l.text)?.[1]).filter((c): c is string => c !== undefined);
    const count = (pattern: RegExp): number => commands.filter((c) => pattern.test(c)).length;
    t.equal(count(/^USER /), sessions, `${sessions} logins reached vsftpd`);
    t.equal(count(/^PASS /), sessions, 'one PASS each');
    const upstreamTls = UPSTREAM_TLS[combo.server];
    if (!upstreamTls) {
      t.equal(count(/^(AUTH|PBSZ|PROT|CCC)\b/), 0, 'no AUTH/PBSZ/PROT/CCC reached the plain server (each leg negotiates on its own)');
      return;
    }
    t.equal(count(/^AUTH TLS$/), upstreamTls === 'explicit' ? sessions : 0, upstreamTls === 'explicit' ? "one AUTH TLS per session (the proxy's own)" : 'no AUTH: TLS from the first byte');
    t.equal(count(/^AUTH /), count(/^AUTH TLS$/), 'no other AUTH (curl\'s AUTH SSL is answered by the proxy)');
    t.equal(count(/^PBSZ 0$/), sessions, 'one PBSZ 0 per session');
    t.equal(count(/^PROT P$/), sessions, 'one PROT P per session, never the client\'s');
    t.equal(count(/^PROT /), sessions, 'and no other PROT');
    // Every USER on a connection whose TLS handshake vsftpd logged before it (same pid).
    const secured = new Set<string>();
    const plainUsers: string[] = [];
    const handshakes: Array<{ version: string; reused: boolean }> = [];
    for (const { pid, text } of lines) {
      const hs = /"SSL version: (TLSv[\d.]+), SSL cipher: [^,]+, (reused|not reused)/.exec(text);
      if (hs) {
        handshakes.push({ version: hs[1]!, reused: hs[2] === 'reused' });
        if (hs[2] === 'not reused') secured.add(pid);
      }
      if (/FTP command: Client "[^"]*", "USER /.test(text) && !secured.has(pid)) plainUsers.push(text);
    }
    t.same(plainUsers, [], 'no USER in clear text: each came after its connection\'s TLS handshake');
    t.notMatch(server.protocolLog().slice(from), /530 Non-anonymous sessions must use encryption/, 'vsftpd refused no clear-text login');
    const version = SERVER_VERSION[combo.server]!;
    t.equal(handshakes.filter((h) => !h.reused).length, sessions, 'one full handshake per session (the control connection)');
    t.equal(handshakes.filter((h) => h.reused).length, sessions, 'one resumed handshake per session (its data connection)');
    t.same([...new Set(handshakes.map((h) => h.version))], [version], `every connection ${version}`);
  }

  /** ftpnp_tls_handshakes_total against what ran: every handshake ok, none failed, none not resumed. */
  async function checkMetrics(t: TapTest, combo: Combination, proxy: TestProxy, sessions: number): Promise<void> {
    const metrics = await proxy.scrape();
    const value = (leg: string, channel: string, result: string): number =>
      metrics.get('ftpnp_tls_handshakes_total', { listener: combo.name, leg, channel, result }) ?? 0;
    const clientTls = combo.front !== 'plain';
    const serverTls = UPSTREAM_TLS[combo.server] !== null;
    // One transfer per session.
    for (const channel of ['control', 'data']) {
      t.equal(value('client', channel, 'ok'), clientTls ? sessions : 0, `client ${channel} handshakes ok`);
      t.equal(value('server', channel, 'ok'), serverTls ? sessions : 0, `server ${channel} handshakes ok`);
      for (const leg of ['client', 'server']) {
        t.equal(value(leg, channel, 'failed') + value(leg, channel, 'not-resumed'), 0, `no ${leg} ${channel} handshake failed or not resumed`);
      }
    }
    t.equal(metrics.get('ftpnp_sessions_total', { listener: combo.name }), sessions, `${sessions} sessions`);
  }

  for (const combo of COMBINATIONS) {
    t.test(`${combo.name}: client leg ${combo.front}, server leg ${combo.server} (dataMode ${combo.dataMode})`, async (t) => {
      const server = servers.get(combo.server)!;
      const logStart = server.protocolLog().length;
      const proxy = await startComboProxy(t, combo, server);
      const runs: Array<Promise<unknown>> = [];
      t.test('transfers', { jobs: CONCURRENCY }, async (t) => {
        for (const c of combo.cases) {
          for (const direction of ['get', 'put'] as const) {
            runs.push(t.test(`${c.client} ${c.mode}${c.tlsMax ? ' TLS 1.2' : ''} ${direction === 'get' ? 'download' : 'upload'}`, (t) => checkCase(t, combo, c, proxy, server, direction)));
          }
        }
        await Promise.all(runs);
      });
      await t.test('what the proxy and vsftpd recorded', async (t) => {
        const sessions = combo.cases.length * 2;
        // The last session-end may follow the client's exit by a moment.
        const ended = await waitFor(() => proxy.logs().filter((r) => r.event === 'session-end').length >= sessions, 5000);
        t.ok(ended, 'every session ended');
        t.equal(proxy.logs().filter((r) => r.event === 'session-end').length, sessions, `${sessions} sessions, no reconnect`);
        await checkMetrics(t, combo, proxy, sessions);
        checkServerLog(t, combo, server, logStart, sessions);
      });
    });
  }
}
