/**
 * End to end through real NAT (issue 3): network namespaces, a MASQUERADE router without the
 * FTP conntrack helper, a DNAT edge, two real vsftpd servers, the proxy as a real process
 * (dist/cli.js) and real clients (tnftp, curl, lftp, CPython ftplib). Every scenario first shows
 * the client failing without the proxy where that is the point, then moving several MiB each
 * way through the proxy with matching sha256. Topology: ./nat-lab.ts. Why clients are set the
 * way they are (trust the 227 address, EPSV off...): shared/protocol.md §1.3, §6.
 *
 * Scenario 6 runs a second edge proxy with `client.dataPath: kernel` (per-transfer nftables
 * DNAT/SNAT mappings instead of the relay) and reads its table with nft(8) in the edge namespace.
 *
 * Scenario 9 (issue #13): the LAN client's own firewall admits new inbound TCP only from source
 * port 20; a second client-LAN proxy with `client.dataSourcePort: 20` gets active data through.
 *
 * Scenarios 7 and 8 are FTPS (issue #12, protocol.md §5): the proxy terminates TLS on each leg,
 * so it reads and rewrites the 227 that no router can see inside TLS. A throw-away PKI (openssl)
 * gives one certificate with the lab's addresses; every TLS client verifies it.
 *
 * Needs root, iproute2, iptables, vsftpd, tnftp, curl, lftp, python3, openssl; skips with one line
 * without root, ip, iptables or vsftpd. Scenario 6 also needs nftables (nft, libnftables.so.1)
 * and the native addon, and skips with one line without them. Runs dist/cli.js (rebuilt here
 * when src/ is newer).
 * FNP_E2E_LOG_DIR=<dir> keeps the proxy and vsftpd logs of the run.
 */
import t, { type Test } from 'tap';
import { copyFileSync, existsSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { findCommand, NetnsLab, netnsUnavailable, makeRandomFile, waitForFtpGreeting } from '../helpers/netns.js';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import { makeTestPki } from '../helpers/tls.js';
import type { RunResult } from '../helpers/run.js';
import {
  ADDR,
  buildNatTopology,
  curl,
  curlTlsArgs,
  FTPS_SERVER_PORT,
  ftplib,
  ftpnpTables,
  lftp,
  lftpTlsSettings,
  nft,
  nftablesUnavailable,
  nftMapElements,
  nftSetElements,
  nftMapText,
  runProxyOnce,
  startListener,
  startProxyInNs,
  startVictim,
  tcpProbe,
  tnftp,
  type LabProxy,
  runLabSuite,
  transferModes,
  saveLogs,
  shaOf,
  escapeRegExp,
  failure,
  clip,
  lastLines,
} from './nat-lab.js';
import { waitFor } from '../helpers/async.js';

const SUITE_TIMEOUT_MS = 240000;
const CLIENT_TOOLS = ['ftp', 'curl', 'lftp', 'python3', 'timeout', 'sysctl', 'openssl'];
/** Sizes that are not a multiple of any buffer size, so a truncated copy cannot look right. */
const DOWNLOAD_BYTES = 4 * 1024 * 1024 + 4321;
const UPLOAD_BYTES = 3 * 1024 * 1024 + 777;
const REMOTE_FILE = 'big.bin';
const PROXY_PORT = 2121;
/** The third-party host listens on these; the hostile PORT/EPRT name port 2000 (7,208). */
const THIRD_PARTY_PORTS = [21, 2000, 2121];
/** A listener on the client in the server LAN (10.20.0.7), reachable from the edge host. */
const INNER_HOST_PORT = 2000;
/** Scenario 6: the second edge proxy (client.dataPath: kernel), its ports, its mapping lifetime. */
const KERNEL_PROXY_PORT = 2122;
const KERNEL_PASSIVE_PORTS = { first: 40300, last: 40349 };
const KERNEL_ACCEPT_SECONDS = 4;
/** Scenario 6: the kernel proxy's dataIdleSeconds, and the file a stalled client asks for (beyond any socket buffer). */
const KERNEL_IDLE_SECONDS = 3;
const STALL_FILE = 'stall.bin';
const STALL_BYTES = 48 * 1024 * 1024;
/**
 * Wire bytes (IP, headers included) over payload: at most one 40-byte header per 536-byte
 * segment would be 7.5 %; with 1448-byte segments, timestamps and GRO it is 1-4 %.
 */
const WIRE_OVERHEAD_MAX = 1.08;
/** How long the stalled client may wait for its 426 (see the test: up to ~28 s behind a br_netfilter bridge). */
const STALL_REPLY_MAX_SECONDS = 45;
/** Scenario 6: a kernel-path config run without CAP_NET_ADMIN (must not start). */
const NOCAP_PROXY_PORT = 2123;
/** Scenario 7: the FTPS edge proxy's two listeners (upstream plain vsftpd :21, FTPS vsftpd :2021). */
const EDGE_TLS_PORT = 2131;
const EDGE_TLS_UP_PORT = 2132;
/** Scenario 8: the plain-to-FTPS proxy in the client LAN. */
const LAN_TLS_PORT = 2131;
/** Scenario 9: the client-LAN proxy with client.dataSourcePort: 20. */
const PORT20_PROXY_PORT = 2124;

const reason = netnsUnavailable() ?? vsftpdUnavailable();
if (reason) t.plan(0, reason);
else await main();

async function main(): Promise<void> {
  await runLabSuite(t, { timeoutMs: SUITE_TIMEOUT_MS, tools: CLIENT_TOOLS, install: 'tnftp curl lftp python3' }, runSuite);
}

async function runSuite(lab: NetnsLab): Promise<void> {
  const topo = buildNatTopology(lab);

  const uploadSource = join(lab.dir, 'upload.bin');
  const uploadSha = makeRandomFile(uploadSource, UPLOAD_BYTES);

  // One server certificate for every TLS endpoint: the edge proxy's public address, the private
  // and the public vsftpd. Inside lab.dir, so the lab's cleanup removes the keys too.
  const pki = makeTestPki({ parentDir: lab.dir, extraSans: [`IP:${ADDR.edgePublic}`, `IP:${ADDR.privateServer}`, `IP:${ADDR.publicServer}`] });
  const serverSsl = { cert: pki.server.cert.path, key: pki.server.key.path, debug: true };

  const [privateFtp, publicFtp, privateFtps, publicFtps] = await Promise.all([
    startVsftpd({ netns: topo.privateServer, listenAddress: ADDR.privateServer, port: 21, pasvAddress: null, pasvMinPort: 42000, pasvMaxPort: 42019 }),
    startVsftpd({ netns: topo.publicServer, listenAddress: ADDR.publicServer, port: 21, pasvAddress: null, pasvMinPort: 43000, pasvMaxPort: 43019 }),
    // FTPS that still admits plain FTP: the kernel-helper baseline in scenario 7 runs plain FTP
    // and FTPS over the same DNAT against the same server.
    startVsftpd({
      netns: topo.privateServer,
      listenAddress: ADDR.privateServer,
      port: FTPS_SERVER_PORT,
      pasvAddress: null,
      pasvMinPort: 42100,
      pasvMaxPort: 42119,
      ssl: { ...serverSsl, forceLogins: false, forceData: false },
    }),
    // FTPS only (force_local_logins_ssl, force_local_data_ssl: vsftpd's defaults).
    startVsftpd({ netns: topo.publicServer, listenAddress: ADDR.publicServer, port: FTPS_SERVER_PORT, pasvAddress: null, pasvMinPort: 43100, pasvMaxPort: 43119, ssl: serverSsl }),
  ]);
  const servers = [['vsftpd private', privateFtp], ['vsftpd public', publicFtp], ['vsftpd private ftps', privateFtps], ['vsftpd public ftps', publicFtps]] as const;
  for (const [name, server] of servers) {
    // startVsftpd keeps its config and logs in the parent of the served root.
    lab.adopt({ name, pid: server.pid, stop: () => server.stop(), removeSync: () => rmSync(dirname(server.root), { recursive: true, force: true }) });
  }
  const downloadSha = makeRandomFile(join(privateFtp.root, REMOTE_FILE), DOWNLOAD_BYTES);
  for (const server of [publicFtp, privateFtps, publicFtps]) copyFileSync(join(privateFtp.root, REMOTE_FILE), join(server.root, REMOTE_FILE));
  await Promise.all([
    waitForFtpGreeting(topo.privateServer, ADDR.privateServer, 21, 10000),
    waitForFtpGreeting(topo.publicServer, ADDR.publicServer, 21, 10000),
    waitForFtpGreeting(topo.privateServer, ADDR.privateServer, FTPS_SERVER_PORT, 10000),
    waitForFtpGreeting(topo.publicServer, ADDR.publicServer, FTPS_SERVER_PORT, 10000),
  ]);
  // Hosts that must never receive a connection: a third party on the internet, and a host in
  // the server LAN that the edge proxy could reach (a bounce there would be SSRF).
  const [thirdParty, innerHost] = await Promise.all([
    startListener(lab, topo.thirdParty, THIRD_PARTY_PORTS),
    startListener(lab, topo.serverLanClient, [INNER_HOST_PORT]),
  ]);
  // Positive controls: the edge host (where the proxy runs) can reach both, so "saw no
  // connection" later means the proxy did not connect, not that it could not.
  // (Asserted in a subtest: an assertion on the idle root test would let tap end it early.)
  const controls = [
    await tcpProbe(lab, topo.edge, ADDR.thirdParty, 2000),
    await tcpProbe(lab, topo.edge, ADDR.serverLanClient, INNER_HOST_PORT),
  ];
  await waitFor(() => thirdParty.accepts().length > 0 && innerHost.accepts().length > 0, 3000);
  const controlAccepts = [thirdParty.accepts().length, innerHost.accepts().length];
  const newInnerHostAccepts = (): Array<Record<string, unknown>> => innerHost.accepts().slice(controlAccepts[1]);
  const newThirdPartyAccepts = (): Array<Record<string, unknown>> => thirdParty.accepts().slice(controlAccepts[0]);

  const [edgeProxy, lanProxy, routerProxy] = await Promise.all([
    startProxyInNs(
      lab,
      topo.edge,
      'edge',
      [
        'log: { level: debug }',
        'listeners:',
        '  - name: edge',
        `    listen: "0.0.0.0:${PROXY_PORT}"`,
        `    upstream: { host: ${ADDR.privateServer}, port: 21, dataMode: passive }`,
        '    client:',
        `      advertise: ${ADDR.edgePublic}`,
        `      advertiseFor: [ { from: 10.20.0.0/24, address: ${ADDR.edgePrivate} } ]`,
        '      passivePorts: "40000-40049"',
      ].join('\n'),
      { ns: topo.publicClient, host: ADDR.edgePublic, port: PROXY_PORT },
    ),
    startProxyInNs(
      lab,
      topo.lanProxy,
      'lan',
      [
        'log: { level: debug }',
        'listeners:',
        '  - name: lan',
        `    listen: "${ADDR.lanProxy}:${PROXY_PORT}"`,
        `    upstream: { host: ${ADDR.publicServer}, port: 21, dataMode: passive }`,
        '    client: { advertise: auto, passivePorts: "40100-40149" }',
      ].join('\n'),
      { ns: topo.lanClient, host: ADDR.lanProxy, port: PROXY_PORT },
    ),
    startProxyInNs(
      lab,
      topo.router,
      'router',
      [
        'log: { level: debug }',
        'listeners:',
        '  - name: router',
        `    listen: "${ADDR.routerLan}:${PROXY_PORT}"`,
        `    upstream: { host: ${ADDR.publicServer}, port: 21, dataMode: active, activePorts: "50000-50049" }`,
        '    client: { advertise: auto, passivePorts: "40200-40249" }',
      ].join('\n'),
      { ns: topo.lanClient, host: ADDR.routerLan, port: PROXY_PORT },
    ),
  ]);

  /** Local download target and remote upload name for one client run. */
  const paths = (label: string): { local: string; remote: string } => ({ local: join(lab.dir, `${label}.down`), remote: `${label}.up` });

  /** `proxy` null: a baseline without a proxy (no proxy log to show on failure). */
  async function expectRoundTrip(tt: Tap, label: string, server: VsftpdInstance, run: RunResult | null, proxy: LabProxy | null): Promise<void> {
    const { local, remote } = paths(label);
    const got = await shaOf(local);
    const put = await shaOf(join(server.root, remote));
    const detail = run ? `\n--- client (exit ${run.code}${run.timedOut ? ', timed out' : ''})\n${clip(run.stdout)}\n${clip(run.stderr)}` : '';
    const downloaded = tt.equal(got, downloadSha, `${label}: download of ${DOWNLOAD_BYTES} bytes arrives intact (sha256)`);
    const uploaded = tt.equal(put, uploadSha, `${label}: upload of ${UPLOAD_BYTES} bytes arrives intact (sha256)`);
    if (!downloaded || !uploaded) tt.comment(`${detail}${proxy ? `\n--- proxy log tail\n${proxy.tail(30)}` : ''}`);
  }

  async function expectNothingTransferred(tt: Tap, label: string, server: VsftpdInstance, run: RunResult | null, what: string): Promise<void> {
    const { local, remote } = paths(label);
    const got = await shaOf(local);
    const put = await shaOf(join(server.root, remote));
    const detail = run ? ` (exit ${run.code}; ${lastLines(run.stdout + run.stderr, 3)})` : '';
    tt.not(got, downloadSha, `${label}: without the proxy the download fails: ${what}${detail}`);
    tt.not(put, uploadSha, `${label}: without the proxy the upload fails too`);
  }

  await t.test('0. the lab is wired as intended', async (t) => {
    t.same(controlAccepts, [1, 1], `the edge host reaches the third party ${ADDR.thirdParty}:2000 and the server-LAN host ${ADDR.serverLanClient}:${INNER_HOST_PORT} (${JSON.stringify(controls)})`);
  });

  // ---------------------------------------------------------------------------------------
  await t.test('1. edge: public client -> proxy on the edge -> private vsftpd without pasv_address', async (t) => {
    const direct = { host: ADDR.edgePublic, port: 21 };
    const proxied = { host: ADDR.edgePublic, port: PROXY_PORT };
    const ns = topo.publicClient;

    await t.test('without the proxy (DNAT 203.0.113.10:21 -> 10.20.0.5:21) the 227 names 10.20.0.5 and clients that trust it fail', async (t) => {
      {
        const label = 's1-direct-tnftp';
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...direct, passive: true, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout + out.stderr, /Passive mode address mismatch/, 'tnftp refuses the 227 address');
        await expectNothingTransferred(t, label, privateFtp, out, 'tnftp PASV');
      }
      {
        const label = 's1-direct-ftplib';
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...direct, ops: [['raw', 'PASV'], ['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        t.match(String(out.records[1]?.reply), /\(10,20,0,5,\d+,\d+\)/, 'vsftpd writes its private address into 227');
        for (const op of ['get', 'put']) {
          const record = out.records.find((r) => r.op === op);
          t.equal(record?.ok, false, `ftplib (trusting the 227 address) ${op} fails: ${String(record?.error)}`);
        }
        await expectNothingTransferred(t, label, privateFtp, out.run, 'ftplib PASV');
      }
      {
        const label = 's1-direct-curl-pasv';
        const { local, remote } = paths(label);
        const flags = ['-v', '--disable-epsv', '--no-ftp-skip-pasv-ip'];
        const get = await curl(lab, ns, [...flags, '-o', local, `ftp://${direct.host}:${direct.port}/${REMOTE_FILE}`]);
        const put = await curl(lab, ns, [...flags, '-T', uploadSource, `ftp://${direct.host}:${direct.port}/${remote}`]);
        for (const [what, out] of [['download', get], ['upload', put]] as const) {
          t.match(out.stderr, /Trying 10\.20\.0\.5:\d+/, `curl PASV ${what} dials the private address from the 227`);
          t.not(out.code, 0, `and fails (${/connect to 10\.20\.0\.5 port \d+ failed: [^\n]*/.exec(out.stderr)?.[0] ?? lastLines(out.stderr, 1)})`);
        }
        await expectNothingTransferred(t, label, privateFtp, get, 'curl --disable-epsv --no-ftp-skip-pasv-ip');
      }
      {
        const label = 's1-direct-lftp';
        const { local, remote } = paths(label);
        const out = await lftp(lab, ns, { ...direct, settings: ['ftp:fix-pasv-address no', 'ftp:prefer-epsv no'], get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.equal(out.stderr.match(/Network is unreachable/g)?.length, 2, `lftp with ftp:fix-pasv-address no cannot reach 10.20.0.5 for get nor put (${lastLines(out.stderr, 2)})`);
        t.not(out.code, 0, 'lftp exits non-zero');
        await expectNothingTransferred(t, label, privateFtp, out, 'lftp ftp:fix-pasv-address no');
      }
      {
        const label = 's1-direct-curl-epsv';
        const { local, remote } = paths(label);
        const get = await curl(lab, ns, ['-v', '-o', local, `ftp://${direct.host}:${direct.port}/${REMOTE_FILE}`]);
        const put = await curl(lab, ns, ['-v', '-T', uploadSource, `ftp://${direct.host}:${direct.port}/${remote}`]);
        for (const [what, out] of [['download', get], ['upload', put]] as const) {
          t.match(out.stderr, /229 Entering Extended Passive Mode[^]*connect to 203\.0\.113\.10 port \d+ failed: Connection refused/, `curl EPSV ${what}: the passive port is not forwarded`);
          t.not(out.code, 0, `and curl exits ${out.code}`);
        }
        await expectNothingTransferred(t, label, privateFtp, get, 'curl EPSV');
      }
    });

    await t.test('through the proxy every client and mode works', async (t) => {
      const url = (name: string): string => `ftp://${proxied.host}:${proxied.port}/${name}`;
      {
        const label = 's1-tnftp-pasv';
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...proxied, passive: true, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, /227 Entering Passive Mode \(203,0,113,10,\d+,\d+\)/, 'tnftp sees the public address in 227');
        await expectRoundTrip(t, label, privateFtp, out, edgeProxy);
      }
      {
        const label = 's1-tnftp-epsv';
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...proxied, passive: true, epsv4: true, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, /229 Entering Extended Passive Mode \(\|\|\|\d+\|\)/, 'tnftp uses EPSV');
        await expectRoundTrip(t, label, privateFtp, out, edgeProxy);
      }
      {
        const label = 's1-tnftp-port';
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...proxied, passive: false, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, /200 PORT command successful/, 'tnftp uses PORT');
        await expectRoundTrip(t, label, privateFtp, out, edgeProxy);
      }
      {
        const label = 's1-ftplib-pasv';
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...proxied, ops: [['raw', 'PASV'], ['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        t.match(String(out.records[1]?.reply), /^227 Entering Passive Mode \(203,0,113,10,\d+,\d+\)\.?$/, 'raw 227 carries the public address');
        t.ok(out.ok, `ftplib with trust_server_pasv_ipv4_address succeeds ${JSON.stringify(out.records.at(-1))}`);
        await expectRoundTrip(t, label, privateFtp, out.run, edgeProxy);
      }
      const curlModes: Array<[string, string[]]> = [
        ['s1-curl-pasv', ['--disable-epsv', '--no-ftp-skip-pasv-ip']],
        ['s1-curl-epsv', []],
        ['s1-curl-port', ['-P', ADDR.publicClient, '--disable-eprt']],
        ['s1-curl-eprt', ['-P', ADDR.publicClient]],
      ];
      for (const [label, flags] of curlModes) {
        const { local, remote } = paths(label);
        const get = await curl(lab, ns, [...flags, '-o', local, url(REMOTE_FILE)]);
        const put = await curl(lab, ns, [...flags, '-T', uploadSource, url(remote)]);
        t.equal(get.code, 0, `${label} download exits 0 ${get.stderr.trim()}`);
        t.equal(put.code, 0, `${label} upload exits 0 ${put.stderr.trim()}`);
        await expectRoundTrip(t, label, privateFtp, get.code === 0 ? put : get, edgeProxy);
      }
      {
        const label = 's1-lftp-pasv';
        const { local, remote } = paths(label);
        const out = await lftp(lab, ns, { ...proxied, settings: ['ftp:fix-pasv-address no', 'ftp:prefer-epsv no'], get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.equal(out.code, 0, `lftp with ftp:fix-pasv-address no exits 0 ${out.stderr.trim()}`);
        await expectRoundTrip(t, label, privateFtp, out, edgeProxy);
      }
      const modes = transferModes(edgeProxy);
      t.ok(modes.has('passive/passive') && modes.has('active/passive'), `the edge proxy relayed client passive and active transfers (${[...modes].join(', ')})`);
      const upstreamLog = privateFtp.protocolLog();
      t.match(upstreamLog, new RegExp(`Client "${escapeRegExp(ADDR.edgePrivate)}", "EPSV"`), 'vsftpd saw the proxy (10.20.0.1) open its data connections with EPSV');
    });
  });

  // ---------------------------------------------------------------------------------------
  await t.test('2. client side: active-only clients behind MASQUERADE -> proxy in the client LAN -> public vsftpd', async (t) => {
    const direct = { host: ADDR.publicServer, port: 21 };
    const proxied = { host: ADDR.lanProxy, port: PROXY_PORT };
    const ns = topo.lanClient;
    const url = (target: { host: string; port: number }, name: string): string => `ftp://${target.host}:${target.port}/${name}`;

    await t.test('without the proxy the server refuses PORT/EPRT naming 192.168.50.10', async (t) => {
      const mark = publicFtp.protocolLog().length;
      {
        const label = 's2-direct-tnftp';
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...direct, passive: false, epsv4: true, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, /500 Illegal (EPRT|PORT) command/, 'vsftpd refuses the private address');
        await expectNothingTransferred(t, label, publicFtp, out, 'tnftp passive off');
      }
      {
        const label = 's2-direct-curl';
        const { local, remote } = paths(label);
        const get = await curl(lab, ns, ['-v', '-P', '-', '-o', local, url(direct, REMOTE_FILE)]);
        const put = await curl(lab, ns, ['-v', '-P', '-', '-T', uploadSource, url(direct, remote)]);
        for (const [what, out] of [['download', get], ['upload', put]] as const) {
          t.match(out.stderr, /< 500 Illegal EPRT command\.[^]*< 500 Illegal PORT command\./, `curl -P - ${what}: EPRT and PORT with 192.168.50.10 refused`);
          t.not(out.code, 0, `and curl exits ${out.code}`);
        }
        await expectNothingTransferred(t, label, publicFtp, get, 'curl -P -');
      }
      {
        const label = 's2-direct-ftplib';
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...direct, mode: 'active', ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        for (const op of ['get', 'put']) {
          const record = out.records.find((r) => r.op === op);
          t.equal(record?.error, 'error_perm: 500 Illegal PORT command.', `ftplib set_pasv(False) ${op} is refused`);
        }
        await expectNothingTransferred(t, label, publicFtp, out.run, 'ftplib active');
      }
      const log = publicFtp.protocolLog().slice(mark);
      t.match(log, new RegExp(`Client "${escapeRegExp(ADDR.routerWan)}", "PORT 192,168,50,10,`), 'vsftpd saw the masqueraded client name its private address');
    });

    await t.test('through the proxy in the client LAN the same clients work', async (t) => {
      const mark = publicFtp.protocolLog().length;
      {
        const label = 's2-tnftp-eprt';
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...proxied, passive: false, epsv4: true, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        await expectRoundTrip(t, label, publicFtp, out, lanProxy);
      }
      {
        const label = 's2-tnftp-port';
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...proxied, passive: false, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        await expectRoundTrip(t, label, publicFtp, out, lanProxy);
      }
      for (const [label, flags] of [['s2-curl-eprt', ['-P', '-']], ['s2-curl-port', ['-P', '-', '--disable-eprt']]] as const) {
        const { local, remote } = paths(label);
        const get = await curl(lab, ns, [...flags, '-o', local, url(proxied, REMOTE_FILE)]);
        const put = await curl(lab, ns, [...flags, '-T', uploadSource, url(proxied, remote)]);
        t.equal(get.code, 0, `${label} download exits 0 ${get.stderr.trim()}`);
        t.equal(put.code, 0, `${label} upload exits 0 ${put.stderr.trim()}`);
        await expectRoundTrip(t, label, publicFtp, get.code === 0 ? put : get, lanProxy);
      }
      {
        const label = 's2-ftplib-port';
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...proxied, mode: 'active', ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        t.ok(out.ok, `ftplib set_pasv(False) succeeds ${JSON.stringify(out.records.at(-1))}`);
        await expectRoundTrip(t, label, publicFtp, out.run, lanProxy);
      }
      const log = publicFtp.protocolLog().slice(mark);
      t.match(log, new RegExp(`Client "${escapeRegExp(ADDR.routerWan)}", "EPSV"`), 'upstream, the proxy used EPSV through the NAT (seen from 198.51.100.1)');
      t.notMatch(log, /"(PORT|EPRT) [^"]*192[,.]168[,.]50/, 'no private address reached the server');
      const modes = transferModes(lanProxy);
      t.same([...modes], ['active/passive'], 'client legs active, server legs passive');
    });
  });

  // ---------------------------------------------------------------------------------------
  await t.test('3. client side: proxy on the NAT router, upstream dataMode active', async (t) => {
    const proxied = { host: ADDR.routerLan, port: PROXY_PORT };
    const ns = topo.lanClient;
    const mark = publicFtp.protocolLog().length;
    {
      const label = 's3-tnftp-port';
      const { local, remote } = paths(label);
      const out = await tnftp(lab, ns, { ...proxied, passive: false, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
      await expectRoundTrip(t, label, publicFtp, out, routerProxy);
    }
    {
      const label = 's3-curl-eprt';
      const { local, remote } = paths(label);
      const get = await curl(lab, ns, ['-P', '-', '-o', local, `ftp://${proxied.host}:${proxied.port}/${REMOTE_FILE}`]);
      const put = await curl(lab, ns, ['-P', '-', '-T', uploadSource, `ftp://${proxied.host}:${proxied.port}/${remote}`]);
      t.equal(get.code, 0, `curl -P - download exits 0 ${get.stderr.trim()}`);
      t.equal(put.code, 0, `curl -P - upload exits 0 ${put.stderr.trim()}`);
      await expectRoundTrip(t, label, publicFtp, get.code === 0 ? put : get, routerProxy);
    }
    {
      const label = 's3-ftplib-port';
      const { local, remote } = paths(label);
      const out = await ftplib(lab, ns, { ...proxied, mode: 'active', ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
      t.ok(out.ok, `ftplib set_pasv(False) succeeds ${JSON.stringify(out.records.at(-1))}`);
      await expectRoundTrip(t, label, publicFtp, out.run, routerProxy);
    }
    const log = publicFtp.protocolLog().slice(mark);
    const ports = [...log.matchAll(/Client "198\.51\.100\.1", "PORT 198,51,100,1,(\d+),(\d+)"/g)].map((m) => Number(m[1]) * 256 + Number(m[2]));
    t.ok(ports.length >= 6, `vsftpd got PORT with the router's public address for every transfer (${ports.length})`);
    t.ok(ports.every((port) => port >= 50000 && port <= 50049), `the PORT ports come from activePorts 50000-50049 (${ports.join(', ')})`);
    t.notMatch(log, /"(PASV|EPSV)"/, 'the proxy never used passive mode upstream');
    t.same([...transferModes(routerProxy)], ['active/active'], 'client legs active, server legs active');
  });

  // ---------------------------------------------------------------------------------------
  await t.test('4. split horizon: advertiseFor 10.20.0.0/24 -> 10.20.0.1, everyone else 203.0.113.10', async (t) => {
    const inside = { host: ADDR.edgePrivate, port: PROXY_PORT };
    const outside = { host: ADDR.edgePublic, port: PROXY_PORT };
    {
      const label = 's4-inside-ftplib';
      const { local, remote } = paths(label);
      const out = await ftplib(lab, topo.serverLanClient, { ...inside, ops: [['raw', 'PASV'], ['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
      t.match(String(out.records[1]?.reply), /^227 Entering Passive Mode \(10,20,0,1,\d+,\d+\)\.?$/, 'a client in 10.20.0.0/24 gets 10.20.0.1');
      t.ok(out.ok, `and its transfers work ${JSON.stringify(out.records.at(-1))}`);
      await expectRoundTrip(t, label, privateFtp, out.run, edgeProxy);
    }
    {
      const label = 's4-inside-tnftp';
      const { local, remote } = paths(label);
      const out = await tnftp(lab, topo.serverLanClient, { ...inside, passive: true, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
      t.match(out.stdout, /227 Entering Passive Mode \(10,20,0,1,\d+,\d+\)/, 'tnftp (which demands the control address) gets 10.20.0.1');
      await expectRoundTrip(t, label, privateFtp, out, edgeProxy);
    }
    {
      const label = 's4-outside-ftplib';
      const { local, remote } = paths(label);
      const out = await ftplib(lab, topo.publicClient, { ...outside, ops: [['raw', 'PASV'], ['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
      t.match(String(out.records[1]?.reply), /^227 Entering Passive Mode \(203,0,113,10,\d+,\d+\)\.?$/, 'an outside client gets 203.0.113.10');
      t.ok(out.ok, `and its transfers work ${JSON.stringify(out.records.at(-1))}`);
      await expectRoundTrip(t, label, privateFtp, out.run, edgeProxy);
    }
  });

  // ---------------------------------------------------------------------------------------
  await t.test('5. hostile: FTP bounce and port stealing', async (t) => {
    const outside = { host: ADDR.edgePublic, port: PROXY_PORT };
    await t.test('PORT/EPRT naming a third-party host are refused and it sees no connection', async (t) => {
      const out = await ftplib(lab, topo.publicClient, {
        ...outside,
        ops: [
          ['raw-any', 'PORT 203,0,113,99,7,208'],
          ['raw-any', 'EPRT |1|203.0.113.99|2000|'],
          ['raw-any', `PORT ${ADDR.publicClient.replaceAll('.', ',')},0,25`],
          ['raw-any', `RETR ${REMOTE_FILE}`],
        ],
      });
      const replies = out.records.slice(1).map((record) => String(record.reply));
      t.equal(replies[0], '500 Illegal PORT command.', 'PORT to the third-party host');
      t.equal(replies[1], '500 Illegal EPRT command.', 'EPRT to the third-party host');
      t.equal(replies[2], '500 Illegal PORT command.', 'PORT to a privileged port of the client itself');
      t.match(replies[3], /^425 /, 'RETR afterwards has no data connection to use');
      await new Promise((resolve) => setTimeout(resolve, 500));
      t.same(newThirdPartyAccepts(), [], 'the third-party host saw no connection');
    });

    await t.test('PORT naming a host inside the server LAN is turned back to the client itself, never dialled', async (t) => {
      const out = await ftplib(lab, topo.publicClient, {
        ...outside,
        ops: [
          ['raw-any', `PORT ${ADDR.serverLanClient.replaceAll('.', ',')},7,208`],
          ['raw-any', `RETR ${REMOTE_FILE}`],
        ],
      });
      const replies = out.records.slice(1).map((record) => String(record.reply));
      // protocol.md §4.1: an unroutable PORT address from a public client means "behind NAT";
      // the proxy may only ever connect back to the client's real address (nothing listens there).
      t.match(replies[0], /^200 /, `PORT 10,20,0,7 is accepted as a NAT artefact (${replies[0]})`);
      t.match(replies[1], /^425 /, `RETR: the proxy cannot reach ${ADDR.publicClient}:2000 (${replies[1]})`);
      // The proxy's log is another process's stdout: wait for the record, do not read once.
      await waitFor(() => edgeProxy.records().some((record) => record.event === 'port-nat-fixup' && record.target === `${ADDR.publicClient}:2000`), 5000);
      const fixups = edgeProxy.records().filter((record) => record.event === 'port-nat-fixup');
      t.equal(String(fixups.at(-1)?.target), `${ADDR.publicClient}:2000`, 'the proxy dialled the client, not 10.20.0.7');
      await new Promise((resolve) => setTimeout(resolve, 300));
      t.same(newInnerHostAccepts(), [], 'the server-LAN host saw no connection');
    });

    await t.test('a second outside host dialling the advertised relay port first gets nothing', async (t) => {
      const label = 's5-victim';
      const { local } = paths(label);
      const victim = startVictim(lab, topo.publicClient, { ...outside, remote: REMOTE_FILE, local });
      const pasv = await victim.pasv;
      t.equal(pasv.host, ADDR.edgePublic, `the victim is told ${String(pasv.reply)}`);
      const stolen = await tcpProbe(lab, topo.attacker, ADDR.edgePublic, Number(pasv.port));
      t.equal(stolen.bytes, 0, `the attacker receives zero bytes (${JSON.stringify(stolen)})`);
      // Reset right after the handshake (the port is open, so never ECONNREFUSED), not left waiting.
      const cutOff = stolen.connected === true ? stolen.end === 'reset' || stolen.end === 'eof' : stolen.errno === 'ECONNRESET';
      t.ok(cutOff && Number(stolen.seconds) < 2, 'and is cut off at once');
      victim.go();
      const done = await victim.done;
      const retr = done.records.find((record) => record.op === 'retr');
      t.equal(done.code, 0, `the victim's session completes ${done.stderr.trim()}`);
      t.equal(retr?.bytes, DOWNLOAD_BYTES, `the victim's RETR gets all the data (${String(retr?.final)})`);
      t.equal(await shaOf(local), downloadSha, 'the victim receives the right bytes (sha256)');
      const strangers = edgeProxy.records().filter((record) => record.event === 'data-stranger');
      t.ok(strangers.some((record) => String(record.from).startsWith(`${ADDR.attacker}:`)), 'the proxy logged the refused stranger');
    });
  });

  // ---------------------------------------------------------------------------------------
  // Set after the kernel proxy starts: the suite-wide checks below include it.
  let kernelProxy: LabProxy | null = null;
  const kernelUnavailable = nftablesUnavailable();
  await t.test('6. edge with client.dataPath: kernel: passive data NATed by nftables, not relayed', kernelUnavailable ? { skip: kernelUnavailable } : {}, async (t) => {
    const ns = topo.publicClient;
    const proxied = { host: ADDR.edgePublic, port: KERNEL_PROXY_PORT };
    const url = (name: string): string => `ftp://${proxied.host}:${proxied.port}/${name}`;
    const kernelYaml = (name: string, port: number): string =>
      [
        'log: { level: debug }',
        'listeners:',
        `  - name: ${name}`,
        `    listen: "0.0.0.0:${port}"`,
        `    upstream: { host: ${ADDR.privateServer}, port: 21, dataMode: passive }`,
        '    client:',
        `      advertise: ${ADDR.edgePublic}`,
        `      passivePorts: "${KERNEL_PASSIVE_PORTS.first}-${KERNEL_PASSIVE_PORTS.last}"`,
        '      dataPath: kernel',
        `    timeouts: { dataAcceptSeconds: ${KERNEL_ACCEPT_SECONDS}, dataIdleSeconds: ${KERNEL_IDLE_SECONDS} }`,
      ].join('\n');

    // The table a proxy killed with SIGKILL would leave: the next start must remove it.
    const deadPid = unusedPid();
    const planted = await nft(topo.edge, ['add', 'table', 'ip', `ftpnp_${deadPid}`]);
    t.equal(planted.code, 0, `planted a stale table ftpnp_${deadPid} (no such process) ${planted.stderr.trim()}`);

    const proxy = await startProxyInNs(lab, topo.edge, 'edge-kernel', kernelYaml('edge-kernel', KERNEL_PROXY_PORT), { ns, ...proxied });
    kernelProxy = proxy;
    const table = `ftpnp_${proxy.daemon.pid}`;
    const dnatEmpty = async (): Promise<boolean> => (await nftMapElements(topo.edge, table, 'dnat_to'))?.length === 0;
    const mapsEmpty = async (): Promise<[string[] | null, string[] | null]> => {
      // The channel closes (and deletes its mapping) as the final reply passes, and removals run
      // off the event loop, batched (nft-batches.ts): allow a moment for both maps.
      const read = async (): Promise<[string[] | null, string[] | null]> => [await nftMapElements(topo.edge, table, 'dnat_to'), await nftMapElements(topo.edge, table, 'snat_to')];
      await waitForAsync(async () => (await read()).every((elements) => elements?.length === 0), 3000);
      return read();
    };
    /** New `transfer` records since `mark`, once `count` of them are there (they follow the 226). */
    const newTransfers = async (mark: number, count: number): Promise<Array<Record<string, unknown>>> => {
      const pick = (): Array<Record<string, unknown>> => proxy.records().slice(mark).filter((r) => r.event === 'transfer');
      await waitFor(() => pick().length >= count, 3000);
      return pick();
    };
    const summary = (r: Record<string, unknown>): Record<string, unknown> => ({
      direction: r.direction,
      result: r.result,
      clientMode: r.clientMode,
      dataPath: r.dataPath,
      bytes: r.bytes,
    });
    const kernelPair = [
      { direction: 'download', result: 'ok', clientMode: 'passive', dataPath: 'kernel', bytes: null },
      { direction: 'upload', result: 'ok', clientMode: 'passive', dataPath: 'kernel', bytes: null },
    ];
    /**
     * A download and an upload of the suite's files, counted by nftables: the transfer's own
     * direction carries the file plus headers, the other direction at least the ACKs.
     */
    const checkWireBytes = (t: Test, label: string, records: Array<Record<string, unknown>>): void => {
      for (const record of records) {
        const wire = record.wireBytes as { toClient?: number; toServer?: number } | null;
        const download = record.direction === 'download';
        const payload = download ? DOWNLOAD_BYTES : UPLOAD_BYTES;
        const along = Number(download ? wire?.toClient : wire?.toServer);
        const back = Number(download ? wire?.toServer : wire?.toClient);
        t.ok(
          along >= payload && along <= payload * WIRE_OVERHEAD_MAX,
          `${label} ${String(record.direction)}: ${along} wire bytes along the transfer for ${payload} bytes of file (x${(along / payload).toFixed(4)})`,
        );
        t.ok(back > 0 && back < payload / 10, `${label} ${String(record.direction)}: ${back} wire bytes back (handshake and ACKs)`);
      }
    };
    const relayPair = [
      { direction: 'download', result: 'ok', clientMode: 'active', dataPath: 'relay', bytes: DOWNLOAD_BYTES },
      { direction: 'upload', result: 'ok', clientMode: 'active', dataPath: 'relay', bytes: UPLOAD_BYTES },
    ];

    await t.test('the proxy owns one table ftpnp_<pid> in the edge namespace and removed the dead one', async (t) => {
      const started = proxy.records().find((r) => r.event === 'started');
      t.equal(started?.pid, proxy.daemon.pid, `the daemon's pid is the proxy's (${String(started?.pid)})`);
      const ready = proxy.records().find((r) => r.event === 'kernel-path' && r.level !== 'warn' && Number(r.level) !== 40);
      t.equal(ready?.table, table, `the proxy logged its table ${String(ready?.table)}`);
      t.same(await ftpnpTables(topo.edge), [table], `nft list tables in the edge namespace: only ${table}`);
      const removed = proxy.records().find((r) => r.event === 'kernel-path' && r.table === `ftpnp_${deadPid}`);
      t.ok(removed && removed.ok === true, `the stale table of the dead pid ${deadPid} was removed and logged ${JSON.stringify(removed)}`);
      const listing = await nft(topo.edge, ['list', 'table', 'inet', table]);
      t.equal(listing.code, 0, `nft list table inet ${table} works ${listing.stderr.trim()}`);
      for (const part of ['map dnat_to', 'map snat_to', 'chain prerouting', 'chain output', 'chain postrouting']) {
        t.match(listing.stdout, part, `the table has ${part}`);
      }
      t.same([await nftMapElements(topo.edge, table, 'dnat_to'), await nftMapElements(topo.edge, table, 'snat_to')], [[], []], 'no mapping before any PASV/EPSV');
    });

    await t.test('passive clients: the kernel carries the data both ways (sha256), logged dataPath kernel, bytes null, wireBytes from nftables', async (t) => {
      const strangersBefore = proxy.records().filter((r) => r.event === 'data-stranger').length;
      const curlModes: Array<[string, string[], RegExp]> = [
        ['s6-curl-epsv', ['-v'], /< 229 Entering Extended Passive Mode \(\|\|\|(\d+)\|\)/],
        ['s6-curl-pasv', ['-v', '--disable-epsv', '--no-ftp-skip-pasv-ip'], /< 227 Entering Passive Mode \(203,0,113,10,(\d+),(\d+)\)/],
      ];
      for (const [label, flags, passiveReply] of curlModes) {
        const { local, remote } = paths(label);
        const mark = proxy.records().length;
        const get = await curl(lab, ns, [...flags, '-o', local, url(REMOTE_FILE)]);
        const put = await curl(lab, ns, [...flags, '-T', uploadSource, url(remote)]);
        t.equal(get.code, 0, `${label} download exits 0${failure(get)}`);
        t.equal(put.code, 0, `${label} upload exits 0${failure(put)}`);
        const ports = [get, put].map((out) => advertisedPort(passiveReply.exec(out.stderr)));
        t.ok(ports.every(inKernelRange), `${label}: the advertised ports are the kernel proxy's (${ports.join(', ')})`);
        await expectRoundTrip(t, label, privateFtp, get.code === 0 ? put : get, proxy);
        // A kernel transfer's record follows its connection's last packets: the download's may come after the upload's.
        const records = (await newTransfers(mark, 2)).sort((a, b) => String(a.direction).localeCompare(String(b.direction)));
        t.same(records.map(summary), kernelPair, `${label}: logged as kernel transfers without payload counts`);
        checkWireBytes(t, label, records);
        t.same(await mapsEmpty(), [[], []], `${label}: dnat_to and snat_to are empty once the transfers are done`);
      }
      for (const epsv4 of [false, true]) {
        const label = `s6-tnftp-${epsv4 ? 'epsv' : 'pasv'}`;
        const { local, remote } = paths(label);
        const mark = proxy.records().length;
        const out = await tnftp(lab, ns, { ...proxied, passive: true, epsv4, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        const replies = epsv4 ? /229 Entering Extended Passive Mode \(\|\|\|(\d+)\|\)/g : /227 Entering Passive Mode \(203,0,113,10,(\d+),(\d+)\)/g;
        const ports = [...out.stdout.matchAll(replies)].map(advertisedPort);
        t.ok(ports.length === 2 && ports.every(inKernelRange), `${label}: tnftp got ${epsv4 ? '229' : '227 with the public address'} on kernel proxy ports (${ports.join(', ')})`);
        await expectRoundTrip(t, label, privateFtp, out, proxy);
        // A kernel transfer's record follows its connection's last packets: the download's may come after the upload's.
        const records = (await newTransfers(mark, 2)).sort((a, b) => String(a.direction).localeCompare(String(b.direction)));
        t.same(records.map(summary), kernelPair, `${label}: logged as kernel transfers without payload counts`);
        checkWireBytes(t, label, records);
        t.same(await mapsEmpty(), [[], []], `${label}: dnat_to and snat_to are empty once the transfers are done`);
      }
      {
        const label = 's6-ftplib-pasv';
        const { local, remote } = paths(label);
        const mark = proxy.records().length;
        const out = await ftplib(lab, ns, { ...proxied, ops: [['raw', 'PASV'], ['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        t.match(String(out.records[1]?.reply), /^227 Entering Passive Mode \(203,0,113,10,\d+,\d+\)\.?$/, 'raw 227 carries the public address');
        t.ok(out.ok, `ftplib PASV succeeds ${JSON.stringify(out.records.at(-1))}`);
        await expectRoundTrip(t, label, privateFtp, out.run, proxy);
        // A kernel transfer's record follows its connection's last packets: the download's may come after the upload's.
        const records = (await newTransfers(mark, 2)).sort((a, b) => String(a.direction).localeCompare(String(b.direction)));
        t.same(records.map(summary), kernelPair, `${label}: logged as kernel transfers without payload counts`);
        checkWireBytes(t, label, records);
        t.same(await mapsEmpty(), [[], []], `${label}: dnat_to and snat_to are empty once the transfers are done`);
      }
      const strangers = proxy.records().filter((r) => r.event === 'data-stranger').slice(strangersBefore);
      t.same(strangers, [], 'no data connection missed its mapping (none reached the proxy itself)');
      const failed = proxy.records().filter((r) => r.event === 'kernel-path-failed' || r.event === 'kernel-path-skipped');
      t.same(failed, [], 'no mapping failed or was skipped');
    });

    await t.test('active clients through the same proxy are still relayed (dataPath relay, byte counts)', async (t) => {
      const curlModes: Array<[string, string[]]> = [
        ['s6-curl-port', ['-P', ADDR.publicClient, '--disable-eprt']],
        ['s6-curl-eprt', ['-P', ADDR.publicClient]],
      ];
      for (const [label, flags] of curlModes) {
        const { local, remote } = paths(label);
        const mark = proxy.records().length;
        const get = await curl(lab, ns, [...flags, '-o', local, url(REMOTE_FILE)]);
        const put = await curl(lab, ns, [...flags, '-T', uploadSource, url(remote)]);
        t.equal(get.code, 0, `${label} download exits 0${failure(get)}`);
        t.equal(put.code, 0, `${label} upload exits 0${failure(put)}`);
        await expectRoundTrip(t, label, privateFtp, get.code === 0 ? put : get, proxy);
        t.same((await newTransfers(mark, 2)).map(summary), relayPair, `${label}: logged as relayed transfers with their byte counts`);
      }
      {
        const label = 's6-tnftp-port';
        const { local, remote } = paths(label);
        const mark = proxy.records().length;
        const out = await tnftp(lab, ns, { ...proxied, passive: false, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, /200 PORT command successful/, 'tnftp uses PORT');
        await expectRoundTrip(t, label, privateFtp, out, proxy);
        t.same((await newTransfers(mark, 2)).map(summary), relayPair, `${label}: logged as relayed transfers with their byte counts`);
      }
      t.same(await mapsEmpty(), [[], []], 'active transfers add no mapping');
    });

    await t.test('port stealing: a second outside host dialling the advertised port gets nothing, the client still does', async (t) => {
      const label = 's6-victim';
      const { local } = paths(label);
      const mark = proxy.records().length;
      const victim = startVictim(lab, topo.publicClient, { ...proxied, remote: REMOTE_FILE, local });
      const pasv = await victim.pasv;
      t.equal(pasv.host, ADDR.edgePublic, `the victim is told ${String(pasv.reply)}`);
      const port = Number(pasv.port);
      const dnat = (await nftMapElements(topo.edge, table, 'dnat_to')) ?? [];
      const snat = (await nftMapElements(topo.edge, table, 'snat_to')) ?? [];
      const mapped = new RegExp(`^${escapeRegExp(`${ADDR.publicClient} . ${ADDR.edgePublic} . ${port}`)} : ${escapeRegExp(ADDR.privateServer)} \\. (\\d+)$`).exec(dnat[0] ?? '');
      t.ok(dnat.length === 1 && mapped, `dnat_to holds one mapping, keyed on the victim's address: ${JSON.stringify(dnat)}`);
      t.same(snat, [`${ADDR.publicClient} . ${ADDR.privateServer} . ${mapped?.[1] ?? '?'} : ${ADDR.edgePrivate}`], 'snat_to makes the server see the proxy (10.20.0.1) on the same server port');
      t.match(await nftMapText(topo.edge, table, 'dnat_to'), new RegExp(`timeout ${KERNEL_ACCEPT_SECONDS}s`), `the mapping carries the dataAcceptSeconds timeout (${KERNEL_ACCEPT_SECONDS}s)`);

      const stolen = await tcpProbe(lab, topo.attacker, ADDR.edgePublic, port);
      t.equal(stolen.bytes, 0, `the attacker receives zero bytes (${JSON.stringify(stolen)})`);
      // Not NATed (the key holds the victim's address): it reaches the proxy's own port, which resets it.
      const cutOff = stolen.connected === true ? stolen.end === 'reset' || stolen.end === 'eof' : stolen.errno === 'ECONNRESET' || stolen.errno === 'ECONNREFUSED';
      t.ok(cutOff && Number(stolen.seconds) < 2, 'and is cut off at once');
      const strangers = proxy.records().slice(mark).filter((r) => r.event === 'data-stranger');
      t.ok(
        strangers.some((r) => String(r.from).startsWith(`${ADDR.attacker}:`) && r.when === 'unmapped' && r.port === port),
        `the proxy logged the refused stranger as unmapped ${JSON.stringify(strangers)}`,
      );
      victim.go();
      const done = await victim.done;
      const retr = done.records.find((record) => record.op === 'retr');
      t.equal(done.code, 0, `the victim's session completes ${done.stderr.trim()}`);
      t.equal(retr?.bytes, DOWNLOAD_BYTES, `the victim's RETR gets all the data (${String(retr?.final)}): the attacker's connection did not take vsftpd's one accept`);
      t.equal(await shaOf(local), downloadSha, 'the victim receives the right bytes (sha256)');
      t.same((await newTransfers(mark, 1)).map(summary), kernelPair.slice(0, 1), 'the victim\'s RETR went through the kernel');
      t.same(await mapsEmpty(), [[], []], 'the mapping is gone after the transfer');
    });

    await t.test(`a mapping nobody uses expires by itself after dataAcceptSeconds (${KERNEL_ACCEPT_SECONDS}s)`, async (t) => {
      const label = 's6-expired';
      const { local } = paths(label);
      const mark = proxy.records().length;
      const victim = startVictim(lab, topo.publicClient, { ...proxied, remote: REMOTE_FILE, local });
      const pasv = await victim.pasv;
      const port = Number(pasv.port);
      const added = Date.now();
      t.equal((await nftMapElements(topo.edge, table, 'dnat_to'))?.length, 1, `PASV added a mapping for port ${port}`);
      await waitForAsync(dnatEmpty, (KERNEL_ACCEPT_SECONDS + 4) * 1000);
      const seconds = (Date.now() - added) / 1000;
      t.same(await nftMapElements(topo.edge, table, 'dnat_to'), [], `the DNAT element is gone after ${seconds.toFixed(1)} s while the session is still open`);
      t.ok(seconds >= KERNEL_ACCEPT_SECONDS - 1, 'and not before its time');
      // The SNAT element has no timeout (it is shared and counted, and only ever applies to
      // flows we DNATed): it goes with the channel.
      t.equal((await nftMapElements(topo.edge, table, 'snat_to'))?.length, 1, 'the SNAT element stays with the channel');
      // The client itself now misses the mapping: the proxy's own port turns it away.
      const late = await tcpProbe(lab, topo.publicClient, ADDR.edgePublic, port);
      t.equal(late.bytes, 0, `a late connection from the client's own address gets nothing (${JSON.stringify(late)})`);
      const strangers = proxy.records().slice(mark).filter((r) => r.event === 'data-stranger');
      t.ok(
        strangers.some((r) => String(r.from).startsWith(`${ADDR.publicClient}:`) && r.when === 'unmapped' && r.port === port),
        `the proxy logged it as unmapped ${JSON.stringify(strangers)}`,
      );
      victim.abandon();
      await victim.done;
      await waitFor(() => proxy.records().slice(mark).some((r) => r.event === 'session-end'), 3000);
      // The removal runs off the event loop, batched (nft-batches.ts): wait for it, bounded.
      const snatEmpty = async (): Promise<boolean> => (await nftMapElements(topo.edge, table, 'snat_to'))?.length === 0;
      await waitForAsync(snatEmpty, 3000);
      t.same(await nftMapElements(topo.edge, table, 'snat_to'), [], 'and is removed when the session ends');
    });

    await t.test(`a client that stops reading is cut after dataIdleSeconds (${KERNEL_IDLE_SECONDS}s) like a relayed one`, async (t) => {
      makeRandomFile(join(privateFtp.root, STALL_FILE), STALL_BYTES);
      t.teardown(() => rmSync(join(privateFtp.root, STALL_FILE), { force: true }));
      const mark = proxy.records().length;
      const out = await ftplib(lab, ns, { ...proxied, tool: 'stall', remote: STALL_FILE, wait: STALL_REPLY_MAX_SECONDS + 5 }, (STALL_REPLY_MAX_SECONDS + 20) * 1000);
      const stall = out.records.find((r) => r.op === 'stall');
      t.ok(stall, `the stalled client reported ${JSON.stringify(out.records)} ${out.run.stderr.trim()}`);
      t.match(String(stall?.first), /^150 /, 'RETR started');
      t.match(String(stall?.final), /^426 /, `the client gets 426 (${String(stall?.final)})`);
      // The cut itself comes after dataIdleSeconds plus at most one poll (a quarter of it). The
      // server hears of it at its next packet: its zero-window probes back off (0.2 s doubling).
      // Where a bridge with br_netfilter carries the server's side (this lab's edge, when the
      // host has the module loaded) the reject's own RST is sent un-NATed and lost; conntrack
      // then closes the entry 10 s later and the probe after that meets the edge's own RST: ~28 s.
      const seconds = Number(stall?.seconds);
      t.ok(seconds >= KERNEL_IDLE_SECONDS - 0.5 && seconds < STALL_REPLY_MAX_SECONDS, `the 426 after ${seconds} s`);
      const retrAt = proxy.records().slice(mark).find((r) => r.event === 'command' && r.command === `RETR ${STALL_FILE}`)?.time;
      const cutAt = proxy.records().slice(mark).find((r) => r.event === 'limit')?.time;
      const cutSeconds = (Date.parse(String(cutAt)) - Date.parse(String(retrAt))) / 1000;
      t.ok(cutSeconds >= KERNEL_IDLE_SECONDS && cutSeconds <= KERNEL_IDLE_SECONDS * 1.25 + 0.5, `the cut ${cutSeconds} s after RETR (dataIdleSeconds ${KERNEL_IDLE_SECONDS}, polled every ${KERNEL_IDLE_SECONDS / 4} s)`);
      t.equal(stall?.data_end, 'reset', 'its data connection is reset, not closed as if complete');
      const records = await newTransfers(mark, 1);
      t.match(records.map(summary), [{ direction: 'download', result: 'failed', dataPath: 'kernel', bytes: null }], 'logged as a failed kernel transfer');
      t.equal(records[0]?.reply, 426, 'with the 426 the client got');
      const wire = records[0]?.wireBytes as { toClient?: number; toServer?: number } | null;
      t.ok(wire && Number(wire.toClient) > 0 && Number(wire.toClient) < STALL_BYTES / 2, `counted up to the cut ${JSON.stringify(wire)}`);
      const limits = proxy.records().slice(mark).filter((r) => r.event === 'limit');
      t.match(limits, [{ limit: 'data-idle-timeout', dataIdleMs: KERNEL_IDLE_SECONDS * 1000 }], `the limit event a relayed idle transfer logs ${JSON.stringify(limits)}`);
      const elements = async (name: string): Promise<string[] | null> => (name === 'ends' ? nftSetElements(topo.edge, table, name) : nftMapElements(topo.edge, table, name));
      // Removals run off the event loop, batched (nft-batches.ts): wait for all of them, bounded.
      await waitForAsync(async () => (await Promise.all(['dnat_to', 'snat_to', 'flows', 'ends'].map(elements))).every((e) => e?.length === 0), 3000);
      t.same(
        await Promise.all(['dnat_to', 'snat_to', 'flows', 'ends'].map(elements)),
        [[], [], [], []],
        'nothing of it is left in the table (the cut elements went with the final reply)',
      );
    });

    const setpriv = findCommand('setpriv');
    await t.test('without CAP_NET_ADMIN a client.dataPath: kernel config does not start, and says why', setpriv ? {} : { skip: 'setpriv (util-linux) is not installed' }, async (t) => {
      if (!setpriv) return;
      const out = await runProxyOnce(lab, topo.edge, 'edge-nocap', kernelYaml('edge-nocap', NOCAP_PROXY_PORT), [setpriv, '--inh-caps=-net_admin', '--bounding-set=-net_admin']);
      const output = out.stdout + out.stderr;
      const fatal = output
        .split('\n')
        .filter((line) => line.startsWith('{') && line.includes('"start-failed"'))
        .map((line) => (JSON.parse(line) as { err?: { message?: string } }).err?.message)[0];
      t.equal(out.timedOut, false, 'it exits by itself');
      t.equal(out.code, 1, `it exits 1 (runtime failure): ${fatal ?? lastLines(output, 2)}`);
      t.match(output, /FTPP_ERR_KERNEL_PATH/, 'with the error code FTPP_ERR_KERNEL_PATH');
      t.match(output, /CAP_NET_ADMIN/, 'naming the missing capability');
      t.notMatch(output, /"event":"started"/, 'it never reports started');
      t.same(await ftpnpTables(topo.edge), [table], 'it left no table behind (only the running kernel proxy\'s)');
      const probe = await tcpProbe(lab, topo.edge, ADDR.edgePublic, NOCAP_PROXY_PORT);
      t.equal(probe.errno, 'ECONNREFUSED', `nothing listens on ${NOCAP_PROXY_PORT} (${JSON.stringify(probe)})`);
    });

    await t.test('SIGTERM: the proxy stops and deletes its table', async (t) => {
      await proxy.daemon.stop();
      t.equal(proxy.daemon.exitCode(), 0, `the proxy exits 0 on SIGTERM (${lastLines(proxy.tail(3), 3)})`);
      t.ok(proxy.records().some((r) => r.event === 'stopped'), 'and logged stopped');
      t.same(await ftpnpTables(topo.edge), [], 'nft list tables in the edge namespace: no ftpnp_ table is left');
    });
  });

  // ---------------------------------------------------------------------------------------
  // FTPS (issue #12). Proxies are added when their scenario starts them: the suite-wide checks
  // below include them.
  const tlsProxies: Array<[string, LabProxy]> = [];
  const ca = pki.ca.cert.path;

  /** New `transfer` records of one listener since `mark`, once `count` are there (they follow the 226). */
  async function transfersSince(proxy: LabProxy, listener: string, mark: number, count: number): Promise<Array<Record<string, unknown>>> {
    const pick = (): Array<Record<string, unknown>> => proxy.records().slice(mark).filter((r) => r.event === 'transfer' && r.listener === listener);
    await waitFor(() => pick().length >= count, 3000);
    return pick();
  }

  /** One transfer record in a line: direction, result, modes and how each data leg was secured. */
  function tlsSummary(record: Record<string, unknown>): string {
    const leg = (info: unknown): string => {
      if (info === null || info === undefined) return 'plain';
      const { tlsVersion, resumed } = info as { tlsVersion?: unknown; resumed?: unknown };
      return `${String(tlsVersion)}${resumed === true ? ' resumed' : ' NOT resumed'}`;
    };
    return `${String(record.direction)} ${String(record.result)} ${String(record.clientMode)}/${String(record.upstreamMode)} client:${leg(record.clientTls)} server:${leg(record.serverTls)}`;
  }

  /** vsftpd debug_ssl lines: one per TLS handshake, control and data, with "reused" or "not reused". */
  function vsftpdHandshakes(log: string, from: string): Array<{ version: string; reused: boolean }> {
    const pattern = new RegExp(`Client "${escapeRegExp(from)}", "SSL version: (TLSv[\\d.]+), SSL cipher: [^,]+, (reused|not reused)`, 'g');
    return [...log.matchAll(pattern)].map((m) => ({ version: m[1]!, reused: m[2] === 'reused' }));
  }

  // ---------------------------------------------------------------------------------------
  await t.test('7. FTPS edge: explicit-FTPS public client -> edge proxy terminating TLS -> private vsftpd without pasv_address', async (t) => {
    const ns = topo.publicClient;
    const direct = { host: ADDR.edgePublic, port: FTPS_SERVER_PORT };

    await t.test('without the proxy (DNAT :2021 + the kernel FTP helper) plain FTP works, but inside TLS the 227 names 10.20.0.5 and FTPS clients fail', async (t) => {
      {
        // Positive control: the same path, the same server, in clear text. The helper reads the
        // 227, rewrites it to the public address and opens the data port.
        const label = 's7-direct-plain-tnftp';
        const { local, remote } = paths(label);
        const mark = privateFtps.protocolLog().length;
        const out = await tnftp(lab, ns, { ...direct, passive: true, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(privateFtps.protocolLog().slice(mark), /FTP response: Client "198\.51\.100\.7", "227 Entering Passive Mode \(10,20,0,5,\d+,\d+\)/, 'vsftpd sent its private address in the clear');
        t.match(out.stdout, /227 Entering Passive Mode \(203,0,113,10,\d+,\d+\)/, 'and tnftp received 203.0.113.10: the kernel FTP helper rewrote the 227');
        await expectRoundTrip(t, label, privateFtps, out, null);
      }
      {
        const label = 's7-direct-curl-pasv';
        const { local, remote } = paths(label);
        const flags = ['-v', ...curlTlsArgs(ca), '--disable-epsv', '--no-ftp-skip-pasv-ip'];
        const get = await curl(lab, ns, [...flags, '-o', local, `ftp://${direct.host}:${direct.port}/${REMOTE_FILE}`]);
        const put = await curl(lab, ns, [...flags, '-T', uploadSource, `ftp://${direct.host}:${direct.port}/${remote}`]);
        for (const [what, out] of [['download', get], ['upload', put]] as const) {
          // TLS itself works (the certificate names 203.0.113.10): only the address is wrong.
          t.match(out.stderr, /SSL certificate verify ok/, `curl --ssl-reqd PASV ${what}: TLS to the server works and the certificate verifies`);
          t.match(out.stderr, /< 227 Entering Passive Mode \(10,20,0,5,\d+,\d+\)/, `the 227 inside TLS still names 10.20.0.5: the helper cannot read it`);
          t.not(out.code, 0, `and curl fails (${/connect to 10\.20\.0\.5 port \d+ failed: [^\n]*/.exec(out.stderr)?.[0] ?? lastLines(out.stderr, 1)})`);
        }
        await expectNothingTransferred(t, label, privateFtps, get, 'curl --ssl-reqd --disable-epsv --no-ftp-skip-pasv-ip');
      }
      {
        const label = 's7-direct-curl-epsv';
        const { local, remote } = paths(label);
        const flags = ['-v', ...curlTlsArgs(ca)];
        const get = await curl(lab, ns, [...flags, '-o', local, `ftp://${direct.host}:${direct.port}/${REMOTE_FILE}`]);
        const put = await curl(lab, ns, [...flags, '-T', uploadSource, `ftp://${direct.host}:${direct.port}/${remote}`]);
        for (const [what, out] of [['download', get], ['upload', put]] as const) {
          t.match(out.stderr, /< 229 Entering Extended Passive Mode[^]*connect to 203\.0\.113\.10 port \d+ failed: Connection refused/, `curl --ssl-reqd EPSV ${what}: the helper never saw the 229, the port is not forwarded`);
          t.not(out.code, 0, `and curl exits ${out.code}`);
        }
        await expectNothingTransferred(t, label, privateFtps, get, 'curl --ssl-reqd EPSV');
      }
      {
        const label = 's7-direct-ftplib';
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...direct, tls: 'explicit', cafile: ca, ops: [['raw', 'PASV'], ['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        t.match(String(out.records[0]?.tls), /^TLSv1\.[23]$/, `FTP_TLS logs in over ${String(out.records[0]?.tls)}`);
        t.match(String(out.records[1]?.reply), /\(10,20,0,5,\d+,\d+\)/, 'vsftpd writes its private address into the encrypted 227');
        for (const op of ['get', 'put']) {
          const record = out.records.find((r) => r.op === op);
          t.equal(record?.ok, false, `FTP_TLS (trusting the 227 address) ${op} fails: ${String(record?.error)}`);
        }
        await expectNothingTransferred(t, label, privateFtps, out.run, 'ftplib FTP_TLS PASV');
      }
      {
        const label = 's7-direct-lftp';
        const { local, remote } = paths(label);
        const out = await lftp(lab, ns, { ...direct, settings: [...lftpTlsSettings(ca), 'ftp:fix-pasv-address no', 'ftp:prefer-epsv no'], get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.equal(out.stderr.match(/Network is unreachable/g)?.length, 2, `lftp ftp:ssl-force with ftp:fix-pasv-address no cannot reach 10.20.0.5 for get nor put (${lastLines(out.stderr, 2)})`);
        t.not(out.code, 0, 'lftp exits non-zero');
        await expectNothingTransferred(t, label, privateFtps, out, 'lftp ftp:ssl-force');
      }
    });

    const tlsSection = `    tls: { mode: explicit, cert: ${pki.server.cert.path}, key: ${pki.server.key.path} }`;
    const client = (ports: string): string[] => ['    client:', `      advertise: ${ADDR.edgePublic}`, `      passivePorts: "${ports}"`];
    const proxy = await startProxyInNs(
      lab,
      topo.edge,
      'edge-tls',
      [
        'log: { level: debug }',
        'listeners:',
        '  - name: edge-tls',
        `    listen: "0.0.0.0:${EDGE_TLS_PORT}"`,
        tlsSection,
        `    upstream: { host: ${ADDR.privateServer}, port: 21, dataMode: passive }`,
        ...client('40400-40449'),
        '  - name: edge-tls-up',
        `    listen: "0.0.0.0:${EDGE_TLS_UP_PORT}"`,
        tlsSection,
        `    upstream: { host: ${ADDR.privateServer}, port: ${FTPS_SERVER_PORT}, dataMode: passive, tls: { mode: explicit, ca: ${ca} } }`,
        ...client('40450-40499'),
      ].join('\n'),
      { ns, host: ADDR.edgePublic, port: EDGE_TLS_PORT },
    );
    tlsProxies.push(['edge-tls', proxy]);
    await waitForFtpGreeting(ns, ADDR.edgePublic, EDGE_TLS_UP_PORT, 10000);

    const variants = [
      { listener: 'edge-tls', port: EDGE_TLS_PORT, server: privateFtp, upstream: 'plain vsftpd :21', serverTls: false },
      { listener: 'edge-tls-up', port: EDGE_TLS_UP_PORT, server: privateFtps, upstream: `FTPS vsftpd :${FTPS_SERVER_PORT} (upstream.tls explicit)`, serverTls: true },
    ] as const;
    for (const variant of variants) {
      await t.test(`through the proxy (${variant.listener}, upstream ${variant.upstream}) FTPS clients work in PASV, EPSV and PORT`, async (t) => {
        const proxied = { host: ADDR.edgePublic, port: variant.port };
        const url = (name: string): string => `ftp://${proxied.host}:${proxied.port}/${name}`;
        const tag = variant.serverTls ? 's7-ftps' : 's7-plain';
        const mark = proxy.records().length;
        const logMark = variant.server.protocolLog().length;
        let transfers = 0;
        const curlModes: Array<[string, string[], RegExp, string]> = [
          [`${tag}-curl-epsv`, [], /< 229 Entering Extended Passive Mode \(\|\|\|\d+\|\)/, 'EPSV: 229 from the proxy'],
          [`${tag}-curl-pasv`, ['--disable-epsv', '--no-ftp-skip-pasv-ip'], /< 227 Entering Passive Mode \(203,0,113,10,\d+,\d+\)/, 'PASV: the 227 carries the public address'],
        ];
        for (const [label, flags, reply, what] of curlModes) {
          const { local, remote } = paths(label);
          const get = await curl(lab, ns, ['-v', ...curlTlsArgs(ca), ...flags, '-o', local, url(REMOTE_FILE)]);
          const put = await curl(lab, ns, ['-v', ...curlTlsArgs(ca), ...flags, '-T', uploadSource, url(remote)]);
          t.equal(get.code, 0, `${label} download exits 0${failure(get)}`);
          t.equal(put.code, 0, `${label} upload exits 0${failure(put)}`);
          t.match(get.stderr, /SSL certificate verify ok/, `${label}: curl verified the proxy's certificate for ${ADDR.edgePublic}`);
          t.match(get.stderr, reply, `${label}: ${what}`);
          await expectRoundTrip(t, label, variant.server, get.code === 0 ? put : get, proxy);
          transfers += 2;
        }
        {
          const label = `${tag}-lftp-pasv`;
          const { local, remote } = paths(label);
          const out = await lftp(lab, ns, { ...proxied, settings: [...lftpTlsSettings(ca), 'ftp:fix-pasv-address no', 'ftp:prefer-epsv no'], get: [REMOTE_FILE, local], put: [uploadSource, remote] });
          t.equal(out.code, 0, `lftp ftp:ssl-force PASV with ftp:fix-pasv-address no exits 0${failure(out)}`);
          await expectRoundTrip(t, label, variant.server, out, proxy);
          transfers += 2;
        }
        for (const mode of ['pasv', 'active'] as const) {
          const label = `${tag}-ftplib-${mode === 'pasv' ? 'pasv' : 'port'}`;
          const { local, remote } = paths(label);
          const first = mode === 'pasv' ? [['raw', 'PASV'] as const] : [];
          const out = await ftplib(lab, ns, { ...proxied, mode, tls: 'explicit', cafile: ca, ops: [...first, ['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
          t.ok(out.ok, `${label}: FTP_TLS (PROT P, ${String(out.records[0]?.tls)}) succeeds ${JSON.stringify(out.records.at(-1))}${out.run.stderr ? ` ${lastLines(out.run.stderr, 2)}` : ''}`);
          if (mode === 'pasv') t.match(String(out.records[1]?.reply), /^227 Entering Passive Mode \(203,0,113,10,\d+,\d+\)\.?$/, `${label}: raw 227 carries the public address`);
          await expectRoundTrip(t, label, variant.server, out.run, proxy);
          transfers += 2;
        }

        const records = await transfersSince(proxy, variant.listener, mark, transfers);
        const serverLeg = variant.serverTls ? /server:TLSv1\.[23] resumed$/ : /server:plain$/;
        const summaries = records.map(tlsSummary);
        t.equal(records.length, transfers, `the proxy logged ${transfers} transfers`);
        t.ok(
          summaries.every((line) => / ok (passive|active)\/passive client:TLSv1\.[23] resumed server:/.test(line) && serverLeg.test(line)),
          `every client data connection was TLS resuming its control session, every server leg ${variant.serverTls ? 'TLS resumed too' : 'plain'}:\n${summaries.join('\n')}`,
        );
        t.ok(summaries.some((line) => line.includes(' active/')), 'PORT (the proxy dials out, yet is the TLS server on the data connection) is among them');

        const log = variant.server.protocolLog().slice(logMark);
        const from = `Client "${escapeRegExp(ADDR.edgePrivate)}"`;
        if (variant.serverTls) {
          for (const command of ['AUTH TLS', 'PBSZ 0', 'PROT P']) t.match(log, new RegExp(`${from}, "${command}"`), `upstream the proxy negotiated TLS itself: ${command}`);
          const handshakes = vsftpdHandshakes(log, ADDR.edgePrivate);
          const reused = handshakes.filter((h) => h.reused).length;
          t.ok(reused >= transfers, `vsftpd (require_ssl_reuse=YES) saw ${reused} resumed data handshakes for ${transfers} transfers`);
          t.notMatch(log, /522 /, 'vsftpd refused no data connection');
        } else {
          t.notMatch(log, new RegExp(`${from}, "(AUTH|PBSZ|PROT|CCC)`), 'AUTH/PBSZ/PROT stay on the client leg: the plain server never sees them');
        }
        t.match(log, new RegExp(`${from}, "EPSV"`), 'vsftpd saw the proxy (10.20.0.1) open its data connections with EPSV');
      });
    }
  });

  // ---------------------------------------------------------------------------------------
  await t.test('8. client side: plain active-only clients behind MASQUERADE -> proxy in the client LAN -> FTPS-only public vsftpd', async (t) => {
    const direct = { host: ADDR.publicServer, port: FTPS_SERVER_PORT };
    const proxied = { host: ADDR.lanProxy, port: LAN_TLS_PORT };
    const ns = topo.lanClient;
    const url = (target: { host: string; port: number }, name: string): string => `ftp://${target.host}:${target.port}/${name}`;
    const refused = /530 Non-anonymous sessions must use encryption\./;

    await t.test('without the proxy the FTPS-only server refuses the plain login (530)', async (t) => {
      {
        const label = 's8-direct-tnftp';
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...direct, passive: false, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, refused, 'tnftp (passive off) is refused at USER');
        await expectNothingTransferred(t, label, publicFtps, out, 'tnftp passive off');
      }
      {
        const label = 's8-direct-curl';
        const { local, remote } = paths(label);
        const get = await curl(lab, ns, ['-v', '-P', '-', '-o', local, url(direct, REMOTE_FILE)]);
        const put = await curl(lab, ns, ['-v', '-P', '-', '-T', uploadSource, url(direct, remote)]);
        for (const [what, out] of [['download', get], ['upload', put]] as const) {
          t.match(out.stderr, refused, `curl -P - ${what} is refused at USER`);
          t.not(out.code, 0, `and curl exits ${out.code}`);
        }
        await expectNothingTransferred(t, label, publicFtps, get, 'curl -P -');
      }
      {
        const label = 's8-direct-ftplib';
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...direct, mode: 'active', ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        t.match(String(out.records[0]?.error), refused, `ftplib cannot log in: ${String(out.records[0]?.error)}`);
        await expectNothingTransferred(t, label, publicFtps, out.run, 'ftplib active');
      }
    });

    const proxy = await startProxyInNs(
      lab,
      topo.lanProxy,
      'lan-tls',
      [
        'log: { level: debug }',
        'listeners:',
        '  - name: lan-tls',
        `    listen: "${ADDR.lanProxy}:${LAN_TLS_PORT}"`,
        `    upstream: { host: ${ADDR.publicServer}, port: ${FTPS_SERVER_PORT}, dataMode: passive, tls: { mode: explicit, ca: ${ca} } }`,
        '    client: { advertise: auto, passivePorts: "40150-40199" }',
      ].join('\n'),
      { ns, ...proxied },
    );
    tlsProxies.push(['lan-tls', proxy]);

    await t.test('through the proxy (upstream.tls explicit) the same plain clients work in active mode', async (t) => {
      const mark = proxy.records().length;
      const logMark = publicFtps.protocolLog().length;
      let transfers = 0;
      for (const epsv4 of [true, false]) {
        const label = `s8-tnftp-${epsv4 ? 'eprt' : 'port'}`;
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...proxied, passive: false, epsv4, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, epsv4 ? /200 EPRT command successful/ : /200 PORT command successful/, `${label}: tnftp uses ${epsv4 ? 'EPRT' : 'PORT'}`);
        await expectRoundTrip(t, label, publicFtps, out, proxy);
        transfers += 2;
      }
      for (const [label, flags] of [['s8-curl-eprt', ['-P', '-']], ['s8-curl-port', ['-P', '-', '--disable-eprt']]] as const) {
        const { local, remote } = paths(label);
        const get = await curl(lab, ns, [...flags, '-o', local, url(proxied, REMOTE_FILE)]);
        const put = await curl(lab, ns, [...flags, '-T', uploadSource, url(proxied, remote)]);
        t.equal(get.code, 0, `${label} download exits 0${failure(get)}`);
        t.equal(put.code, 0, `${label} upload exits 0${failure(put)}`);
        await expectRoundTrip(t, label, publicFtps, get.code === 0 ? put : get, proxy);
        transfers += 2;
      }
      {
        const label = 's8-ftplib-port';
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...proxied, mode: 'active', ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        t.ok(out.ok, `ftplib set_pasv(False) succeeds ${JSON.stringify(out.records.at(-1))}`);
        await expectRoundTrip(t, label, publicFtps, out.run, proxy);
        transfers += 2;
      }

      const records = await transfersSince(proxy, 'lan-tls', mark, transfers);
      const summaries = records.map(tlsSummary);
      t.equal(records.length, transfers, `the proxy logged ${transfers} transfers`);
      t.ok(
        summaries.every((line) => / ok active\/passive client:plain server:TLSv1\.[23] resumed$/.test(line)),
        `client legs plain and active, server legs passive over TLS resuming the control session:\n${summaries.join('\n')}`,
      );
      const log = publicFtps.protocolLog().slice(logMark);
      const from = `Client "${escapeRegExp(ADDR.routerWan)}"`;
      for (const command of ['AUTH TLS', 'PBSZ 0', 'PROT P']) t.match(log, new RegExp(`${from}, "${command}"`), `upstream (through the MASQUERADE, from ${ADDR.routerWan}) the proxy sent ${command}`);
      t.notMatch(log, refused, 'no 530: every login was encrypted');
      t.notMatch(log, /522 /, 'no data connection refused');
      const reused = vsftpdHandshakes(log, ADDR.routerWan).filter((h) => h.reused).length;
      t.ok(reused >= transfers, `vsftpd (require_ssl_reuse=YES) saw ${reused} resumed data handshakes for ${transfers} transfers`);
      t.notMatch(log, /"(PORT|EPRT) [^"]*192[,.]168[,.]50/, 'no private address reached the server');
    });
  });

  // ---------------------------------------------------------------------------------------
  let port20Proxy: LabProxy | null = null;
  await t.test('9. client side: the client\'s firewall admits active data only from source port 20 -> client.dataSourcePort: 20', async (t) => {
    const ns = topo.lanClient;
    // Replies on the client's own connections pass; a new connection in only from port 20
    // (reset, not dropped, so a refused data connection fails at once instead of timing out).
    lab.iptables(ns, '-A', 'INPUT', '-m', 'conntrack', '--ctstate', 'ESTABLISHED,RELATED', '-j', 'ACCEPT');
    lab.iptables(ns, '-A', 'INPUT', '-p', 'tcp', '--sport', '20', '-j', 'ACCEPT');
    lab.iptables(ns, '-A', 'INPUT', '-p', 'tcp', '-m', 'conntrack', '--ctstate', 'NEW', '-j', 'REJECT', '--reject-with', 'tcp-reset');
    t.teardown(() => lab.iptables(ns, '-F', 'INPUT'));
    /** Packets the "source port 20" rule admitted so far. */
    const admittedFrom20 = (): number => Number(/^\s*(\d+)\s+\d+\s+ACCEPT\s+(?:6|tcp)\b.*spt:20\b/m.exec(lab.exec(ns, 'iptables', '-w', '5', '-L', 'INPUT', '-v', '-n', '-x'))?.[1] ?? Number.NaN);

    await t.test('without dataSourcePort the proxy\'s data connections are reset by the client\'s firewall', async (t) => {
      const mark = lanProxy.records().length;
      const before = admittedFrom20();
      const label = 's9-plain-tnftp-port';
      const { local, remote } = paths(label);
      const out = await tnftp(lab, ns, { host: ADDR.lanProxy, port: PROXY_PORT, passive: false, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
      t.match(out.stdout, /425 Can't open data connection\./, 'tnftp gets 425 from the proxy');
      await expectNothingTransferred(t, label, publicFtp, out, 'tnftp passive off, proxy without dataSourcePort');
      const failed = lanProxy.records().slice(mark).filter((r) => r.event === 'data-setup-failed');
      t.ok(failed.length >= 1 && failed.every((r) => r.code === 'FTPP_ERR_DATA_CONNECT' && /ECONNREFUSED/.test(String(r.err))), `the proxy's connects were refused: ${failed.map((r) => String(r.err)).join('; ')}`);
      t.equal(admittedFrom20(), before, 'nothing came from port 20');
    });

    const proxy = await startProxyInNs(
      lab,
      topo.lanProxy,
      'lan-port20',
      [
        'log: { level: debug }',
        'listeners:',
        '  - name: lan-port20',
        `    listen: "${ADDR.lanProxy}:${PORT20_PROXY_PORT}"`,
        `    upstream: { host: ${ADDR.publicServer}, port: 21, dataMode: passive }`,
        '    client: { advertise: auto, passivePorts: "40250-40299", dataSourcePort: 20 }',
      ].join('\n'),
      { ns, host: ADDR.lanProxy, port: PORT20_PROXY_PORT },
    );
    port20Proxy = proxy;

    await t.test('with dataSourcePort: 20 PORT and EPRT clients transfer both ways', async (t) => {
      const proxied = { host: ADDR.lanProxy, port: PORT20_PROXY_PORT };
      const before = admittedFrom20();
      for (const epsv4 of [false, true]) {
        const label = `s9-tnftp-${epsv4 ? 'eprt' : 'port'}`;
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...proxied, passive: false, epsv4, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, epsv4 ? /200 EPRT command successful/ : /200 PORT command successful/, `${label}: tnftp uses ${epsv4 ? 'EPRT' : 'PORT'}`);
        await expectRoundTrip(t, label, publicFtp, out, proxy);
      }
      {
        const label = 's9-ftplib-port';
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...proxied, mode: 'active', ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        t.ok(out.ok, `ftplib set_pasv(False) succeeds ${JSON.stringify(out.records.at(-1))}`);
        await expectRoundTrip(t, label, publicFtp, out.run, proxy);
      }
      t.ok(admittedFrom20() - before >= 6, `the client's firewall admitted the data connections from port 20 (${admittedFrom20() - before} packets)`);
      t.same(proxy.records().filter((r) => r.event === 'data-setup-failed'), [], 'no data setup failed');
      t.same([...transferModes(proxy)], ['active/passive'], 'client legs active, server legs passive');
    });
  });

  t.same(newThirdPartyAccepts(), [], 'the third-party host saw no connection during the whole suite');
  t.same(newInnerHostAccepts(), [], 'the server-LAN host saw no connection during the whole suite');
  const proxies: Array<[string, LabProxy]> = [['edge', edgeProxy], ['lan', lanProxy], ['router', routerProxy]];
  if (kernelProxy) proxies.push(['edge-kernel', kernelProxy]);
  proxies.push(...tlsProxies);
  if (port20Proxy) proxies.push(['lan-port20', port20Proxy]);
  for (const [name, proxy] of proxies) {
    const lines = proxy.daemon.output().split('\n').filter((line) => line.trim() !== '');
    t.same(lines.filter((line) => !line.startsWith('{')), [], `proxy ${name} wrote only JSON log lines (no crash trace)`);
    // pino writes level labels here ("info"); numbers when no formatter is configured.
    const errors = proxy.records().filter((record) => ['error', 'fatal'].includes(String(record.level)) || Number(record.level) >= 50);
    t.same(errors, [], `proxy ${name} logged no error`);
  }
  saveLogs({
    edge: edgeProxy.daemon.output(),
    lan: lanProxy.daemon.output(),
    router: routerProxy.daemon.output(),
    ...(kernelProxy ? { 'edge-kernel': (kernelProxy as LabProxy).daemon.output() } : {}),
    ...Object.fromEntries(tlsProxies.map(([name, proxy]) => [name, proxy.daemon.output()])),
    ...(port20Proxy ? { 'lan-port20': (port20Proxy as LabProxy).daemon.output() } : {}),
    'vsftpd-private': privateFtp.protocolLog(),
    'vsftpd-public': publicFtp.protocolLog(),
    'vsftpd-private-ftps': privateFtps.protocolLog(),
    'vsftpd-public-ftps': publicFtps.protocolLog(),
  });

  // ---------------------------------------------------------------------------------------
  await t.test('nothing is left behind', async (t) => {
    const pids = [...servers.map(([, server]) => server.pid), ...proxies.map(([, proxy]) => proxy.daemon.pid), thirdParty.daemon.pid, innerHost.daemon.pid];
    await lab.cleanup();
    const left = lab.leftovers();
    t.same(left.namespaces, [], `no namespace named ${lab.prefix}*`);
    t.same(left.links, [], `no interface named ${lab.prefix}* in the root namespace`);
    t.same(left.processes, [], `no process the suite started is alive (pgids ${pids.join(', ')})`);
    t.notOk(existsSync(lab.dir), 'the scratch directory is gone');
  });
}

type Tap = Test;



async function waitForAsync(condition: () => Promise<boolean>, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition()) && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 100));
}

/** A PID no process has now (for a stale ftpnp_<pid> table). */
function unusedPid(): number {
  const max = Number(readFileSync('/proc/sys/kernel/pid_max', 'utf8').trim()) || 32768;
  for (let pid = max - 1; pid > 1; pid--) if (!existsSync(`/proc/${pid}`)) return pid;
  throw new Error('no free pid');
}

/** The port of a 229 match (one group) or a 227 match (p1, p2). */
function advertisedPort(match: RegExpMatchArray | RegExpExecArray | null): number {
  if (!match) return Number.NaN;
  return match[2] !== undefined ? Number(match[1]) * 256 + Number(match[2]) : Number(match[1]);
}

function inKernelRange(port: number): boolean {
  return port >= KERNEL_PASSIVE_PORTS.first && port <= KERNEL_PASSIVE_PORTS.last;
}






