/**
 * Issue #13 in the NAT lab: how a session's server is chosen when the proxy sits on the client
 * side's MASQUERADE router and the legacy clients behind it talk to many servers.
 *
 * 1. Forward mode (`upstream.forward`): the client names the server in its login,
 *    `USER name@host[:port]`; the proxy greets first, resolves the name from the router's own
 *    hosts file, checks every address and the port against deny/allow, and logs in upstream
 *    with `USER name`. Shown failing first: active-only clients straight through the
 *    MASQUERADE, and a fixed-upstream proxy that cannot reach the second server.
 * 2. Transparent interception (`upstream.transparent`): nftables on the router redirects the
 *    clients' port-21 connections (and the relay ports EPSV clients dial at the server's
 *    address) to the proxy, which reads the original destination (SO_ORIGINAL_DST). Shown
 *    failing first without the redirect.
 *
 * Every transfer moves a file each way with sha256 checks, and checks which of the two servers
 * (different files) it reached. Hosts that must never see a connection from the proxy (a
 * private host in `deny`, a public one not in `allow`) run listeners; a positive control shows
 * the router can reach them, and a fence connection from the router closes each check.
 * Topology: ./upstream-lab.ts. Facts: shared/upstream-selection.md, shared/test-environment.md.
 *
 * Needs root, iproute2, iptables, nft, vsftpd, tnftp, curl, lftp, python3; skips with one line
 * without root, ip, iptables or vsftpd. Runs dist/cli.js (rebuilt here when src/ is newer).
 * FNP_E2E_LOG_DIR=<dir> keeps the proxy and vsftpd logs of the run.
 */
import t, { type Test } from 'tap';
import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { makeRandomFile, NetnsLab, netnsUnavailable, nsRun, waitForFtpGreeting } from '../helpers/netns.js';
import { startVsftpd, TEST_PASSWORD, TEST_USER, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import type { RunResult } from '../helpers/run.js';
import {
  curl,
  ftpDialogue,
  ftplib,
  lftp,
  nft,
  startListener,
  startProxyInNs,
  startProxyInNsLogged,
  tcpProbe,
  tnftp,
  type Dialogue,
  type DialogueStep,
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
import { buildUpstreamTopology, UP_ADDR, UP_NAMES } from './upstream-lab.js';

const SUITE_TIMEOUT_MS = 280000;
const CLIENT_TOOLS = ['ftp', 'curl', 'lftp', 'python3', 'timeout', 'sysctl', 'nft', 'getent'];
/** Different sizes and contents on the two servers: a download shows which one answered. */
const DOWNLOAD_BYTES = { A: 2 * 1024 * 1024 + 4321, B: 2 * 1024 * 1024 + 1234 } as const;
const UPLOAD_BYTES = 1024 * 1024 + 777;
const REMOTE_FILE = 'big.bin';
const BANNER = { A: 'ftpnp vsftpd A', B: 'ftpnp vsftpd B' } as const;
/** The baseline proxy with a fixed upstream (server A). */
const FIXED_PORT = 2119;
const FORWARD_PORT = 2120;
const INTERCEPT_PORT = 2121;
const FORWARD_PASSIVE = '40300-40349';
const INTERCEPT_PASSIVE = { first: 40400, last: 40449 };
const MAX_LOGIN_ATTEMPTS = 3;
/** An unknown name must be refused by the resolver at once, not after DNS timeouts. */
const FAST_REFUSAL_MS = 5000;

type ServerKey = 'A' | 'B';

const reason = netnsUnavailable() ?? vsftpdUnavailable();
if (reason) t.plan(0, reason);
else await main();

async function main(): Promise<void> {
  await runLabSuite(t, { timeoutMs: SUITE_TIMEOUT_MS, tools: CLIENT_TOOLS, install: 'tnftp curl lftp python3 nftables' }, runSuite);
}

async function runSuite(lab: NetnsLab): Promise<void> {
  const started = Date.now();
  const topo = buildUpstreamTopology(lab);
  const uploadSource = join(lab.dir, 'upload.bin');
  const uploadSha = makeRandomFile(uploadSource, UPLOAD_BYTES);

  const [ftpA, ftpB] = await Promise.all([
    startVsftpd({ netns: topo.serverA, listenAddress: UP_ADDR.serverA, port: 21, pasvAddress: null, pasvMinPort: 44000, pasvMaxPort: 44019, extra: { ftpd_banner: BANNER.A } }),
    startVsftpd({ netns: topo.serverB, listenAddress: UP_ADDR.serverB, port: 21, pasvAddress: null, pasvMinPort: 44100, pasvMaxPort: 44119, extra: { ftpd_banner: BANNER.B } }),
  ]);
  for (const [name, server] of [['vsftpd A', ftpA], ['vsftpd B', ftpB]] as const) {
    lab.adopt({ name, pid: server.pid, stop: () => server.stop(), removeSync: () => rmSync(dirname(server.root), { recursive: true, force: true }) });
  }
  const servers: Record<ServerKey, { readonly ftp: VsftpdInstance; readonly sha: string; readonly address: string; readonly name: string }> = {
    A: { ftp: ftpA, sha: makeRandomFile(join(ftpA.root, REMOTE_FILE), DOWNLOAD_BYTES.A), address: UP_ADDR.serverA, name: UP_NAMES.serverA },
    B: { ftp: ftpB, sha: makeRandomFile(join(ftpB.root, REMOTE_FILE), DOWNLOAD_BYTES.B), address: UP_ADDR.serverB, name: UP_NAMES.serverB },
  };
  await Promise.all([waitForFtpGreeting(topo.serverA, UP_ADDR.serverA, 21, 10000), waitForFtpGreeting(topo.serverB, UP_ADDR.serverB, 21, 10000)]);

  // Hosts the proxy must never connect to: the private one (deny) and a public one (not in allow).
  const [insideHost, otherHost] = await Promise.all([startListener(lab, topo.inside, [21]), startListener(lab, topo.other, [21])]);
  const watched = { inside: { listener: insideHost, address: UP_ADDR.inside }, other: { listener: otherHost, address: UP_ADDR.other } } as const;

  /**
   * Connections `host` accepted since `mark` (an index into its accepts), apart from a fence:
   * a connection from the router made now. Accepts are printed in order, so once the fence is
   * in the list every earlier connection from the proxy is too.
   */
  async function acceptsSince(which: keyof typeof watched, mark: number): Promise<Array<Record<string, unknown>>> {
    const { listener, address } = watched[which];
    const fence = await tcpProbe(lab, topo.router, address, 21);
    const ok = await waitFor(() => listener.accepts().some((a) => a.accept === fence.local), 5000);
    if (!ok) return [{ error: `the fence connection did not arrive: ${JSON.stringify(fence)}` }];
    return listener.accepts().slice(mark).filter((a) => a.accept !== fence.local);
  }

  const paths = (label: string): { local: string; remote: string } => ({ local: join(lab.dir, `${label}.down`), remote: `${label}.up` });

  async function expectRoundTrip(tt: Test, label: string, key: ServerKey, run: RunResult | null, proxy: LabProxy | null): Promise<void> {
    const { local, remote } = paths(label);
    const otherKey: ServerKey = key === 'A' ? 'B' : 'A';
    const got = await shaOf(local);
    const put = await shaOf(join(servers[key].ftp.root, remote));
    const detail = run ? `\n--- client (exit ${run.code}${run.timedOut ? ', timed out' : ''})\n${clip(run.stdout)}\n${clip(run.stderr)}` : '';
    const ok = [
      tt.equal(got, servers[key].sha, `${label}: the download is server ${key}'s file (${DOWNLOAD_BYTES[key]} bytes, sha256)`),
      tt.equal(put, uploadSha, `${label}: the upload (${UPLOAD_BYTES} bytes) arrived intact on server ${key}`),
      tt.notOk(existsSync(join(servers[otherKey].ftp.root, remote)), `${label}: and not on server ${otherKey}`),
    ];
    if (ok.includes(false)) tt.comment(`${detail}${proxy ? `\n--- proxy log tail\n${proxy.tail(30)}` : ''}`);
  }

  async function expectNothingTransferred(tt: Test, label: string, key: ServerKey, run: RunResult | null, what: string): Promise<void> {
    const { local, remote } = paths(label);
    const detail = run ? ` (exit ${run.code}; ${lastLines(run.stdout + run.stderr, 3)})` : '';
    tt.not(await shaOf(local), servers[key].sha, `${label}: the download fails: ${what}${detail}`);
    tt.not(await shaOf(join(servers[key].ftp.root, remote)), uploadSha, `${label}: the upload fails too`);
  }

  const url = (target: { host: string; port: number }, name: string): string => `ftp://${target.host}:${target.port}/${name}`;
  const proxies: Array<[string, LabProxy]> = [];

  // ---------------------------------------------------------------------------------------
  await t.test('0. the lab is wired as intended', async (t) => {
    const resolved = await nsRun(topo.router, 'getent', ['ahostsv4', UP_NAMES.serverA], { timeoutMs: 10000 });
    t.match(resolved.stdout, new RegExp(`^${escapeRegExp(UP_ADDR.serverA)}\\s`, 'm'), `ip netns exec gives the router its own hosts file: ${UP_NAMES.serverA} -> ${UP_ADDR.serverA}`);
    const mixed = await nsRun(topo.router, 'getent', ['ahostsv4', UP_NAMES.mixed], { timeoutMs: 10000 });
    const mixedAddresses = new Set(mixed.stdout.split('\n').map((line) => line.split(/\s+/)[0]).filter(Boolean));
    t.same([...mixedAddresses].sort(), [UP_ADDR.inside, UP_ADDR.serverB].sort(), `${UP_NAMES.mixed} resolves to a public and a denied address`);
    const t0 = Date.now();
    const unknown = await nsRun(topo.router, 'getent', ['ahostsv4', UP_NAMES.unknown], { timeoutMs: 10000 });
    t.not(unknown.code, 0, `${UP_NAMES.unknown} does not resolve`);
    t.ok(Date.now() - t0 < FAST_REFUSAL_MS, `and fails at once (${Date.now() - t0} ms): no resolver on 127.0.0.1`);

    for (const which of ['inside', 'other'] as const) {
      const mark = watched[which].listener.accepts().length;
      const probe = await tcpProbe(lab, topo.router, watched[which].address, 21);
      await waitFor(() => watched[which].listener.accepts().some((a) => a.accept === probe.local), 5000);
      t.ok(
        watched[which].listener.accepts().slice(mark).some((a) => a.accept === probe.local),
        `positive control: the router (where the proxy runs) reaches ${watched[which].address}:21 (${JSON.stringify(probe)})`,
      );
    }
  });

  // ---------------------------------------------------------------------------------------
  await t.test('1. forward mode: USER name@host[:port] on the router', async (t) => {
    const forward = { host: UP_ADDR.routerLan, port: FORWARD_PORT };
    const ns = topo.lanClient;

    await t.test('without forward mode', async (t) => {
      await t.test('active-only clients straight to server A through the MASQUERADE fail (the server refuses PORT/EPRT naming 192.168.50.10)', async (t) => {
        const direct = { host: UP_ADDR.serverA, port: 21 };
        const mark = ftpA.protocolLog().length;
        {
          const label = 'f0-direct-tnftp';
          const { local, remote } = paths(label);
          const out = await tnftp(lab, ns, { ...direct, passive: false, epsv4: false, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
          t.match(out.stdout, /500 Illegal PORT command/, 'tnftp (passive off): vsftpd refuses PORT with the private address');
          await expectNothingTransferred(t, label, 'A', out, 'tnftp passive off');
        }
        {
          const label = 'f0-direct-curl';
          const { local, remote } = paths(label);
          const get = await curl(lab, ns, ['-v', '-P', '-', '-o', local, url(direct, REMOTE_FILE)]);
          const put = await curl(lab, ns, ['-v', '-P', '-', '-T', uploadSource, url(direct, remote)]);
          for (const [what, out] of [['download', get], ['upload', put]] as const) {
            t.match(out.stderr, /< 500 Illegal EPRT command\.[^]*< 500 Illegal PORT command\./, `curl -P - ${what}: EPRT and PORT refused`);
            t.not(out.code, 0, `and curl exits ${out.code}`);
          }
          await expectNothingTransferred(t, label, 'A', get, 'curl -P -');
        }
        {
          const label = 'f0-direct-ftplib';
          const { local, remote } = paths(label);
          const out = await ftplib(lab, ns, { ...direct, mode: 'active', ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
          for (const op of ['get', 'put']) {
            t.equal(out.records.find((r) => r.op === op)?.error, 'error_perm: 500 Illegal PORT command.', `ftplib set_pasv(False) ${op} is refused`);
          }
          await expectNothingTransferred(t, label, 'A', out.run, 'ftplib active');
        }
        t.match(ftpA.protocolLog().slice(mark), new RegExp(`Client "${escapeRegExp(UP_ADDR.routerWan)}", "PORT 192,168,50,10,`), 'server A saw the masqueraded client name its private address');
      });

      const fixed = await startProxyInNs(
        lab,
        topo.router,
        'fixed',
        [
          'log: { level: debug }',
          'listeners:',
          '  - name: fixed',
          `    listen: "${UP_ADDR.routerLan}:${FIXED_PORT}"`,
          `    upstream: { host: ${UP_ADDR.serverA}, port: 21, dataMode: passive }`,
          '    client: { advertise: auto, passivePorts: "40250-40299" }',
        ].join('\n'),
        { ns, host: UP_ADDR.routerLan, port: FIXED_PORT },
      );
      proxies.push(['fixed', fixed]);

      await t.test('a proxy with a fixed upstream cannot reach server B: the name goes to server A as the login', async (t) => {
        const markA = ftpA.protocolLog().length;
        const markB = ftpB.protocolLog().length;
        const login = `${TEST_USER}@${UP_NAMES.serverB}`;
        const talk = await ftpDialogue(lab, ns, { host: UP_ADDR.routerLan, port: FIXED_PORT }, [`USER ${login}`, `PASS ${TEST_PASSWORD}`, 'QUIT']);
        t.match(talk.greeting?.join('\n') ?? '', BANNER.A, `the greeting is server A's own (${talk.greeting?.join(' | ')})`);
        t.same(codes(talk.steps), ['331', '530', '221'], `USER ${login} is server A's account name, and server A refuses it (${summary(talk)})`);
        t.match(ftpA.protocolLog().slice(markA), new RegExp(`"USER ${escapeRegExp(login)}"`), 'server A received the whole name as USER');
        t.equal(ftpB.protocolLog().slice(markB), '', 'server B saw nothing');
        const label = 'f0-fixed-tnftp';
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { host: UP_ADDR.routerLan, port: FIXED_PORT, user: login, passive: true, epsv4: true, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, /530 Login incorrect/, 'tnftp cannot log in');
        await expectNothingTransferred(t, label, 'B', out, 'tnftp through the fixed-upstream proxy');
      });
    });

    let proxy: LabProxy;
    try {
      proxy = await startProxyInNs(
        lab,
        topo.router,
        'forward',
        [
          'log: { level: debug }',
          'listeners:',
          '  - name: forward',
          `    listen: "${UP_ADDR.routerLan}:${FORWARD_PORT}"`,
          '    upstream:',
          '      forward:',
          '        allow: [203.0.113.0/24, "*.ftp.test"]',
          '        deny: [10.0.0.0/8]',
          '        ports: "21"',
          '      dataMode: passive',
          `    client: { advertise: auto, passivePorts: "${FORWARD_PASSIVE}" }`,
          `    limits: { maxLoginAttempts: ${MAX_LOGIN_ATTEMPTS} }`,
        ].join('\n'),
        { ns, ...forward },
      );
    } catch (err) {
      t.fail(`the forward listener does not start: ${(err as Error).message}`);
      return;
    }
    proxies.push(['forward', proxy]);

    await t.test('before a server is chosen the proxy answers by itself and connects nowhere', async (t) => {
      const markA = ftpA.protocolLog().length;
      const markB = ftpB.protocolLog().length;
      const talk = await ftpDialogue(
        lab,
        ns,
        forward,
        ['FEAT', 'SYST', 'NOOP', 'OPTS UTF8 ON', 'CLNT ftpnp-test', 'HOST ftp.example', 'PWD', 'CWD /', 'LIST', `PASS ${TEST_PASSWORD}`, 'QUIT'],
        { watchClose: true },
      );
      const greeting = talk.greeting ?? [];
      t.equal(greeting.length, 1, `the greeting is one line (${greeting.join(' | ')})`);
      t.match(greeting[0] ?? '', /^220 .*user@host/, 'a 220 of its own that says how to name the server');
      const reply = (cmd: string): DialogueStep | undefined => talk.steps.find((step) => step.cmd === cmd);
      t.equal(reply('FEAT')?.code, '211', `FEAT: ${reply('FEAT')?.lines.join(' | ')}`);
      t.equal(reply('SYST')?.code, '215', `SYST: ${reply('SYST')?.lines.join(' | ')}`);
      t.equal(reply('NOOP')?.code, '200', `NOOP: ${reply('NOOP')?.lines.join(' | ')}`);
      for (const cmd of ['OPTS UTF8 ON', 'CLNT ftpnp-test', 'HOST ftp.example']) {
        const step = reply(cmd);
        t.ok(step?.code !== null && step?.code !== undefined && step.code !== '530' && step.code !== '421', `${cmd} is answered locally: ${step?.lines.join(' | ')}`);
      }
      for (const cmd of ['PWD', 'CWD /', 'LIST']) t.equal(reply(cmd)?.code, '530', `${cmd} before login: ${reply(cmd)?.lines.join(' | ')}`);
      t.equal(reply(`PASS ${TEST_PASSWORD}`)?.code, '503', `PASS before USER: ${reply(`PASS ${TEST_PASSWORD}`)?.lines.join(' | ')}`);
      t.equal(reply('QUIT')?.code, '221', 'QUIT: 221');
      t.equal(talk.eof, true, 'and the proxy closes');
      t.equal(ftpA.protocolLog().slice(markA) + ftpB.protocolLog().slice(markB), '', 'neither server saw a connection');
    });

    await t.test('USER name@host: the server the client names, its banner as 331- lines, USER name upstream', async (t) => {
      const cases: Array<[ServerKey, string]> = [
        ['A', UP_NAMES.serverA],
        ['B', UP_ADDR.serverB],
        ['A', `${UP_ADDR.serverA}:21`],
        ['B', `${UP_NAMES.serverB}:21`],
      ];
      for (const [key, destination] of cases) {
        const mark = servers[key].ftp.protocolLog().length;
        const talk = await ftpDialogue(lab, ns, forward, [`USER ${TEST_USER}@${destination}`, `PASS ${TEST_PASSWORD}`, 'PWD', 'QUIT']);
        const user = talk.steps[0];
        t.same(codes(talk.steps), ['331', '230', '257', '221'], `${TEST_USER}@${destination}: logged in on server ${key} (${summary(talk)})`);
        t.match(user?.lines[0] ?? '', /^331-/, 'the reply to USER is multi-line');
        t.ok(user?.lines.some((line) => line.includes(BANNER[key])), `and carries server ${key}'s banner (${user?.lines.join(' | ')})`);
        t.notOk(user?.lines.some((line) => /^220[ -]/.test(line)), 'no second bare 220');
        t.match(servers[key].ftp.protocolLog().slice(mark), new RegExp(`Client "${escapeRegExp(UP_ADDR.routerWan)}", "USER ${TEST_USER}"`), `server ${key} received USER ${TEST_USER} (through the MASQUERADE)`);
      }
      // The proxy's log names the server each session chose (the record precedes the 331).
      const chosen = (): string[] => proxy.records().filter((r) => r.event === 'upstream-chosen').map((r) => `${String(r.host)} ${String(r.upstream)}`);
      const expected = [`${UP_NAMES.serverA} ${UP_ADDR.serverA}:21`, `${UP_ADDR.serverB} ${UP_ADDR.serverB}:21`, `${UP_ADDR.serverA} ${UP_ADDR.serverA}:21`, `${UP_NAMES.serverB} ${UP_ADDR.serverB}:21`];
      await waitFor(() => chosen().length >= expected.length, 3000);
      t.same(chosen().slice(-expected.length), expected, 'the proxy logged each chosen server (upstream-chosen: name and the address it dialled)');
    });

    await t.test('real clients in the client LAN transfer both ways through the forward listener to the server they name', async (t) => {
      const mark = proxy.records().length;
      const marks = { A: ftpA.protocolLog().length, B: ftpB.protocolLog().length };
      const tnftpRuns: Array<[string, ServerKey, string, boolean, boolean]> = [
        ['f-tnftp-port-a-name', 'A', UP_NAMES.serverA, false, false],
        ['f-tnftp-eprt-b-addr', 'B', UP_ADDR.serverB, false, true],
        ['f-tnftp-pasv-b-name', 'B', UP_NAMES.serverB, true, false],
        ['f-tnftp-epsv-a-addr', 'A', UP_ADDR.serverA, true, true],
      ];
      for (const [label, key, destination, passive, epsv4] of tnftpRuns) {
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...forward, user: `${TEST_USER}@${destination}`, passive, epsv4, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, new RegExp(`331-.*${escapeRegExp(BANNER[key])}`), `${label}: tnftp shows server ${key}'s banner`);
        await expectRoundTrip(t, label, key, out, proxy);
      }
      const curlRuns: Array<[string, ServerKey, string, string[]]> = [
        ['f-curl-eprt-b-addr', 'B', UP_ADDR.serverB, ['-P', '-']],
        ['f-curl-port-a-name', 'A', UP_NAMES.serverA, ['-P', '-', '--disable-eprt']],
        ['f-curl-epsv-b-name', 'B', UP_NAMES.serverB, []],
        ['f-curl-pasv-a-addr', 'A', UP_ADDR.serverA, ['--disable-epsv', '--no-ftp-skip-pasv-ip']],
      ];
      for (const [label, key, destination, flags] of curlRuns) {
        const { local, remote } = paths(label);
        const user = `${TEST_USER}@${destination}`;
        const get = await curl(lab, ns, [...flags, '-o', local, url(forward, REMOTE_FILE)], user);
        const put = await curl(lab, ns, [...flags, '-T', uploadSource, url(forward, remote)], user);
        t.equal(get.code, 0, `${label} download exits 0${failure(get)}`);
        t.equal(put.code, 0, `${label} upload exits 0${failure(put)}`);
        await expectRoundTrip(t, label, key, get.code === 0 ? put : get, proxy);
      }
      {
        const label = 'f-lftp-pasv-a-name';
        const { local, remote } = paths(label);
        const out = await lftp(lab, ns, { ...forward, user: `${TEST_USER}@${UP_NAMES.serverA}`, settings: ['ftp:fix-pasv-address no', 'ftp:prefer-epsv no'], get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.equal(out.code, 0, `${label}: lftp exits 0${failure(out)}`);
        await expectRoundTrip(t, label, 'A', out, proxy);
      }
      const ftplibRuns: Array<[string, ServerKey, string, string]> = [
        ['f-ftplib-port-a-addr', 'A', UP_ADDR.serverA, 'active'],
        ['f-ftplib-pasv-b-name', 'B', UP_NAMES.serverB, 'pasv'],
      ];
      for (const [label, key, destination, mode] of ftplibRuns) {
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...forward, user: `${TEST_USER}@${destination}`, mode, ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        t.ok(out.ok, `${label}: ftplib (${mode}) succeeds ${JSON.stringify(out.records.at(-1))}`);
        await expectRoundTrip(t, label, key, out.run, proxy);
      }
      for (const key of ['A', 'B'] as const) {
        const log = servers[key].ftp.protocolLog().slice(marks[key]);
        t.notMatch(log, /"(PORT|EPRT) [^"]*192[,.]168[,.]50/, `no private address reached server ${key}`);
        t.notMatch(log, new RegExp(`"USER ${escapeRegExp(TEST_USER)}@`), `server ${key} never saw the @host part`);
      }
      const modes = transferModes(proxy, mark);
      t.ok(modes.has('active/passive') && modes.has('passive/passive'), `the proxy relayed active and passive client legs (${[...modes].join(', ')})`);
    });

    await t.test('refused destinations: 530 with the reason, the session stays usable, nobody is dialled', async (t) => {
      const marks = { inside: insideHost.accepts().length, other: otherHost.accepts().length, A: ftpA.protocolLog().length, B: ftpB.protocolLog().length };
      const cases: Array<[destination: string, why: RegExp, what: string]> = [
        [UP_NAMES.inside, /denied/i, 'a name that resolves into deny (10.0.0.0/8)'],
        [UP_ADDR.inside, /denied/i, 'an address in deny'],
        [UP_NAMES.mixed, /denied/i, 'a name with one public and one denied address'],
        [UP_NAMES.unknown, /resolv/i, 'an unresolvable name'],
        [UP_ADDR.other, /not allowed/i, 'an address allow does not name'],
        [`${UP_NAMES.serverA}:2121`, /not allowed|port/i, 'a port outside ports: "21"'],
        [UP_NAMES.loopback, /denied|not allowed|loopback/i, 'a name matching *.ftp.test that resolves to loopback'],
        [UP_ADDR.serverBClosed, /connect/i, 'an allowed address where nothing listens'],
        ['', /./, 'an empty host'],
        [`[${UP_ADDR.serverA}`, /./, 'an unclosed bracket'],
      ];
      for (const [destination, why, what] of cases) {
        const started = Date.now();
        const talk = await ftpDialogue(lab, ns, forward, [`USER ${TEST_USER}@${destination}`, 'NOOP']);
        const refusal = talk.steps[0];
        t.equal(refusal?.code, '530', `USER ${TEST_USER}@${destination} (${what}): ${refusal?.lines.join(' | ')} (${Date.now() - started} ms)`);
        t.match(refusal?.lines.join(' ') ?? '', why, `the reason says why (${why})`);
        t.equal(talk.steps[1]?.code, '200', 'the session is still usable (NOOP 200)');
      }
      {
        const talk = await ftpDialogue(lab, ns, forward, [`USER ${TEST_USER}`, 'NOOP']);
        t.equal(talk.steps[0]?.code, '530', `USER without @host: ${talk.steps[0]?.lines.join(' | ')}`);
        t.equal(talk.steps[1]?.code, '200', 'the session is still usable');
      }
      t.same(await acceptsSince('inside', marks.inside), [], `${UP_ADDR.inside} (deny) saw no connection`);
      t.same(await acceptsSince('other', marks.other), [], `${UP_ADDR.other} (not allowed) saw no connection`);
      t.equal(ftpA.protocolLog().slice(marks.A), '', 'server A saw no connection (not even on the refused port)');
      t.equal(ftpB.protocolLog().slice(marks.B), '', 'server B saw no connection');
    });

    await t.test(`login attempts: refusals count, a valid USER still works below the limit, ${MAX_LOGIN_ATTEMPTS} refusals end the session with 421`, async (t) => {
      {
        const talk = await ftpDialogue(lab, ns, forward, [
          `USER ${TEST_USER}@${UP_NAMES.inside}`,
          `USER ${TEST_USER}@${UP_NAMES.unknown}`,
          `USER ${TEST_USER}@${UP_NAMES.serverA}`,
          `PASS ${TEST_PASSWORD}`,
          'PWD',
          'QUIT',
        ]);
        t.same(codes(talk.steps), ['530', '530', '331', '230', '257', '221'], `two refusals, then a login on server A (${summary(talk)})`);
      }
      {
        // Exactly the limit, then nothing: the proxy must end the session by itself.
        const commands = Array.from({ length: MAX_LOGIN_ATTEMPTS }, (_, i) => `USER ${TEST_USER}@${i % 2 === 0 ? UP_NAMES.inside : UP_ADDR.other}`);
        const talk = await ftpDialogue(lab, ns, forward, commands, { watchClose: true, timeoutSeconds: 5 });
        t.same(codes(talk.steps), Array(MAX_LOGIN_ATTEMPTS).fill('530'), `every refusal is a 530 (${summary(talk)})`);
        t.match(talk.trailing, /^421 /, `after refusal number ${MAX_LOGIN_ATTEMPTS} a 421 follows unasked (${JSON.stringify(talk.trailing)})`);
        t.equal(talk.eof, true, 'and the proxy closes the connection');
      }
    });

    await t.test('an e-mail address as the user name: split at the last @', async (t) => {
      const markA = ftpA.protocolLog().length;
      const markB = ftpB.protocolLog().length;
      const talk = await ftpDialogue(lab, ns, forward, [`USER alice@example.org@${UP_NAMES.serverA}`, 'PASS wrong-password', 'QUIT']);
      t.same(codes(talk.steps), ['331', '530', '221'], `server A asks for the password and refuses it (${summary(talk)})`);
      t.ok(talk.steps[0]?.lines.some((line) => line.includes(BANNER.A)), 'the 331 carries server A\'s banner');
      t.match(talk.steps[1]?.lines.join(' ') ?? '', /Login incorrect/, 'the 530 is vsftpd\'s own');
      // vsftpd's log_ftp_protocol: what the proxy sent upstream, word for word.
      const log = ftpA.protocolLog().slice(markA);
      t.match(log, new RegExp(`Client "${escapeRegExp(UP_ADDR.routerWan)}", "USER alice@example\\.org"`), 'server A received USER alice@example.org');
      t.notMatch(log, /"USER alice"/, 'not a name cut at the first @');
      t.equal(ftpB.protocolLog().slice(markB), '', 'server B saw nothing');
    });
  });

  // ---------------------------------------------------------------------------------------
  await t.test('2. transparent interception: nftables on the router redirects port 21 to the proxy', async (t) => {
    const ns = topo.lanClient;
    const directA = { host: UP_ADDR.serverA, port: 21 };
    const directB = { host: UP_ADDR.serverB, port: 21 };

    await t.test('without interception', async (t) => {
      {
        const label = 't0-direct-tnftp-eprt-b';
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...directB, passive: false, epsv4: true, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, /500 Illegal (EPRT|PORT) command/, 'tnftp (passive off) dialling 203.0.113.30:21: vsftpd refuses the private address');
        await expectNothingTransferred(t, label, 'B', out, 'tnftp passive off');
      }
      {
        const label = 't0-direct-ftplib-a';
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...directA, mode: 'active', ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        for (const op of ['get', 'put']) {
          t.equal(out.records.find((r) => r.op === op)?.error, 'error_perm: 500 Illegal PORT command.', `ftplib set_pasv(False) dialling 203.0.113.20:21: ${op} refused`);
        }
        await expectNothingTransferred(t, label, 'A', out.run, 'ftplib active');
      }
      {
        const mark = insideHost.accepts().length;
        const probe = await tcpProbe(lab, ns, UP_ADDR.inside, 21);
        await waitFor(() => insideHost.accepts().length > mark, 5000);
        t.ok(
          insideHost.accepts().slice(mark).some((a) => String(a.accept).startsWith(`${UP_ADDR.lanClient}:`)),
          `positive control: the router forwards the LAN client to ${UP_ADDR.inside}:21 (${JSON.stringify(probe)})`,
        );
      }
    });

    // The redirect itself: port 21 from the LAN to the proxy, and the relay ports dialled at a
    // server's address (EPSV clients, PASV clients that ignore the 227 address) to the same
    // relay port on the router. Counters show which rule carried what.
    const rules = [
      'table inet intercept {',
      '  chain pre {',
      '    type nat hook prerouting priority dstnat; policy accept;',
      `    iifname "${topo.routerLanIf}" tcp dport 21 counter redirect to :${INTERCEPT_PORT} comment "control"`,
      `    iifname "${topo.routerLanIf}" ip daddr != ${UP_ADDR.routerLan} tcp dport ${INTERCEPT_PASSIVE.first}-${INTERCEPT_PASSIVE.last} counter redirect comment "data"`,
      '  }',
      '}',
      '',
    ].join('\n');
    const rulesFile = join(lab.dir, 'intercept.nft');
    writeFileSync(rulesFile, rules);
    const loaded = await nft(topo.router, ['-f', rulesFile]);
    if (loaded.code !== 0) {
      t.fail(`nft -f failed: ${loaded.stderr.trim()}\n${rules}`);
      return;
    }
    t.teardown(() => nft(topo.router, ['delete', 'table', 'inet', 'intercept']));
    const counter = async (rule: 'control' | 'data'): Promise<number> => {
      const out = await nft(topo.router, ['list', 'chain', 'inet', 'intercept', 'pre']);
      return Number(new RegExp(`counter packets (\\d+) bytes \\d+ redirect[^\\n]*comment "${rule}"`).exec(out.stdout)?.[1] ?? Number.NaN);
    };

    let proxy: LabProxy;
    try {
      proxy = await startProxyInNsLogged(
        lab,
        topo.router,
        'intercept',
        [
          'log: { level: debug }',
          'listeners:',
          '  - name: intercept',
          `    listen: "0.0.0.0:${INTERCEPT_PORT}"`,
          '    upstream:',
          '      transparent:',
          '        allow: [0.0.0.0/0]',
          '        deny: [10.0.0.0/8]',
          '        ports: "21"',
          '      dataMode: passive',
          `    client: { advertise: auto, passivePorts: "${INTERCEPT_PASSIVE.first}-${INTERCEPT_PASSIVE.last}" }`,
        ].join('\n'),
      );
    } catch (err) {
      t.fail(`the transparent listener does not start: ${(err as Error).message}`);
      return;
    }
    proxies.push(['intercept', proxy]);

    await t.test('the same active-only clients dial the servers themselves and transfer both ways', async (t) => {
      const mark = proxy.records().length;
      const controlBefore = await counter('control');
      {
        const talk = await ftpDialogue(lab, ns, directB, ['QUIT']);
        t.match(talk.greeting?.join('\n') ?? '', new RegExp(`^220 ${escapeRegExp(BANNER.B)}`), `dialling ${UP_ADDR.serverB}:21 greets with server B's own 220 (${talk.greeting?.join(' | ') ?? talk.error})`);
      }
      const tnftpRuns: Array<[string, ServerKey, boolean]> = [
        ['t-tnftp-port-a', 'A', false],
        ['t-tnftp-eprt-b', 'B', true],
      ];
      for (const [label, key, epsv4] of tnftpRuns) {
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { host: servers[key].address, port: 21, passive: false, epsv4, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, new RegExp(`220 ${escapeRegExp(BANNER[key])}`), `${label}: tnftp is greeted by server ${key}`);
        t.match(out.stdout, epsv4 ? /200 EPRT command successful/ : /200 PORT command successful/, `${label}: tnftp uses ${epsv4 ? 'EPRT' : 'PORT'}`);
        await expectRoundTrip(t, label, key, out, proxy);
      }
      const curlRuns: Array<[string, ServerKey, string[]]> = [
        ['t-curl-eprt-a', 'A', ['-P', '-']],
        ['t-curl-port-b', 'B', ['-P', '-', '--disable-eprt']],
      ];
      for (const [label, key, flags] of curlRuns) {
        const { local, remote } = paths(label);
        const target = { host: servers[key].address, port: 21 };
        const get = await curl(lab, ns, [...flags, '-o', local, url(target, REMOTE_FILE)]);
        const put = await curl(lab, ns, [...flags, '-T', uploadSource, url(target, remote)]);
        t.equal(get.code, 0, `${label} download exits 0${failure(get)}`);
        t.equal(put.code, 0, `${label} upload exits 0${failure(put)}`);
        await expectRoundTrip(t, label, key, get.code === 0 ? put : get, proxy);
      }
      {
        const label = 't-ftplib-port-b';
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...directB, mode: 'active', ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        t.ok(out.ok, `${label}: ftplib set_pasv(False) succeeds ${JSON.stringify(out.records.at(-1))}`);
        await expectRoundTrip(t, label, 'B', out.run, proxy);
      }
      t.ok((await counter('control')) > controlBefore, 'the control connections went through the redirect rule');
      const chosen = new Set(proxy.records().slice(mark).filter((r) => r.event === 'upstream-chosen' && r.mode === 'transparent').map((r) => String(r.upstream)));
      t.same([...chosen].sort(), [`${UP_ADDR.serverA}:21`, `${UP_ADDR.serverB}:21`], 'the proxy logged the server each client dialled (upstream-chosen)');
      t.same([...transferModes(proxy, mark)], ['active/passive'], 'client legs active, server legs passive');
    });

    await t.test('EPSV clients and PASV clients that ignore the 227 address reach the relay through the data redirect', async (t) => {
      const mark = proxy.records().length;
      const dataBefore = await counter('data');
      const curlRuns: Array<[string, ServerKey, string[]]> = [
        ['t-curl-epsv-a', 'A', []],
        ['t-curl-pasv-skip-ip-b', 'B', ['--disable-epsv']],
      ];
      for (const [label, key, flags] of curlRuns) {
        const { local, remote } = paths(label);
        const target = { host: servers[key].address, port: 21 };
        const get = await curl(lab, ns, ['-v', ...flags, '-o', local, url(target, REMOTE_FILE)]);
        const put = await curl(lab, ns, ['-v', ...flags, '-T', uploadSource, url(target, remote)]);
        t.equal(get.code, 0, `${label} download exits 0${failure(get)}`);
        t.equal(put.code, 0, `${label} upload exits 0${failure(put)}`);
        const dataPorts = [...get.stderr.matchAll(new RegExp(`Trying ${escapeRegExp(servers[key].address)}:(\\d+)`, 'g'))].map((m) => Number(m[1])).filter((port) => port !== 21);
        t.ok(
          dataPorts.length > 0 && dataPorts.every((port) => port >= INTERCEPT_PASSIVE.first && port <= INTERCEPT_PASSIVE.last),
          `${label}: curl dials the data connection at the server's address, a relay port (${dataPorts.join(', ')})`,
        );
        await expectRoundTrip(t, label, key, get.code === 0 ? put : get, proxy);
      }
      const lftpRuns: Array<[string, ServerKey, string[]]> = [
        ['t-lftp-epsv-b', 'B', ['ftp:prefer-epsv yes']],
        // lftp's default: a private 227 address from a public server is replaced by the server's.
        ['t-lftp-pasv-fixed-a', 'A', ['ftp:prefer-epsv no', 'ftp:fix-pasv-address yes']],
      ];
      for (const [label, key, settings] of lftpRuns) {
        const { local, remote } = paths(label);
        const out = await lftp(lab, ns, { host: servers[key].address, port: 21, settings, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.equal(out.code, 0, `${label}: lftp exits 0${failure(out)}`);
        await expectRoundTrip(t, label, key, out, proxy);
      }
      {
        const label = 't-ftplib-pasv-untrusted-a';
        const { local, remote } = paths(label);
        const out = await ftplib(lab, ns, { ...directA, trust: false, ops: [['get', REMOTE_FILE, local], ['put', uploadSource, remote]] });
        t.ok(out.ok, `${label}: ftplib (ignoring the 227 address) succeeds ${JSON.stringify(out.records.at(-1))}`);
        await expectRoundTrip(t, label, 'A', out.run, proxy);
      }
      {
        const label = 't-tnftp-epsv-b';
        const { local, remote } = paths(label);
        const out = await tnftp(lab, ns, { ...directB, passive: true, epsv4: true, get: [REMOTE_FILE, local], put: [uploadSource, remote] });
        t.match(out.stdout, /229 Entering Extended Passive Mode/, `${label}: tnftp uses EPSV`);
        await expectRoundTrip(t, label, 'B', out, proxy);
      }
      // A nat chain sees the first packet of each connection only: the counter counts connections.
      const redirected = (await counter('data')) - dataBefore;
      const passive = proxy.records().slice(mark).filter((r) => r.event === 'transfer' && r.clientMode === 'passive').length;
      t.ok(passive > 0 && redirected >= passive, `every passive data connection was dialled at a server's address and redirected (${redirected} redirected, ${passive} passive transfers)`);
      t.same([...transferModes(proxy, mark)], ['passive/passive'], 'client legs passive, server legs passive');
    });

    await t.test('421 and close: not redirected, addressed to the proxy\'s own address, a denied destination', async (t) => {
      const mark = insideHost.accepts().length;
      const logMark = proxy.records().length;
      const cases: Array<[{ host: string; port: number }, string]> = [
        [{ host: UP_ADDR.routerLan, port: INTERCEPT_PORT }, 'dialled the proxy directly (not redirected)'],
        [{ host: UP_ADDR.routerWan, port: 21 }, 'the router\'s own WAN address (a loop)'],
        [{ host: UP_ADDR.routerLan, port: 21 }, 'the router\'s own LAN address (a loop)'],
        [{ host: UP_ADDR.inside, port: 21 }, 'a destination in deny (10.0.0.0/8)'],
      ];
      for (const [target, what] of cases) {
        const talk = await ftpDialogue(lab, ns, target, ['USER x'], { watchClose: true, timeoutSeconds: 5 });
        t.match(talk.greeting?.[0] ?? '', /^421 /, `${target.host}:${target.port}, ${what}: ${talk.greeting?.join(' | ') ?? talk.error}`);
        t.equal(talk.steps.length, 0, 'nothing after the 421');
        t.equal(talk.eof, true, 'the proxy closes the connection');
      }
      {
        // The listener is on 0.0.0.0, so the WAN side reaches it too: never redirected, never relayed.
        const target = { host: UP_ADDR.routerWan, port: INTERCEPT_PORT };
        const talk = await ftpDialogue(lab, topo.other, target, ['USER x'], { watchClose: true, timeoutSeconds: 5 });
        t.match(talk.greeting?.[0] ?? '', /^421 /, `${UP_ADDR.other} on the internet dialling ${target.host}:${target.port}: ${talk.greeting?.join(' | ') ?? talk.error}`);
        t.equal(talk.eof, true, 'the proxy closes the connection');
      }
      t.same(await acceptsSince('inside', mark), [], `${UP_ADDR.inside} saw no connection`);
      const refused = (): string[] => proxy.records().slice(logMark).filter((r) => r.event === 'upstream-refused').map((r) => `${String(r.code)} ${String(r.result)}`);
      const expected = ['FTPP_ERR_NOT_INTERCEPTED not-redirected', 'FTPP_ERR_NOT_INTERCEPTED own-address', 'FTPP_ERR_NOT_INTERCEPTED own-address', 'FTPP_ERR_INTERCEPT_REFUSED denied', 'FTPP_ERR_NOT_INTERCEPTED not-redirected'];
      await waitFor(() => refused().length >= expected.length, 3000);
      t.same(refused(), expected, 'the proxy logged why it refused each one (upstream-refused)');
    });
  });

  // ---------------------------------------------------------------------------------------
  for (const [name, proxy] of proxies) {
    const lines = proxy.daemon.output().split('\n').filter((line) => line.trim() !== '');
    t.same(lines.filter((line) => !line.startsWith('{')), [], `proxy ${name} wrote only JSON log lines (no crash trace)`);
    const errors = proxy.records().filter((record) => ['error', 'fatal'].includes(String(record.level)) || Number(record.level) >= 50);
    t.same(errors, [], `proxy ${name} logged no error`);
  }
  saveLogs({
    ...Object.fromEntries(proxies.map(([name, proxy]) => [name, proxy.daemon.output()])),
    'vsftpd-a': ftpA.protocolLog(),
    'vsftpd-b': ftpB.protocolLog(),
  }, 'upstream-');

  await t.test('nothing is left behind', async (t) => {
    await lab.cleanup();
    const left = lab.leftovers();
    t.same(left.namespaces, [], `no namespace named ${lab.prefix}*`);
    t.same(left.links, [], `no interface named ${lab.prefix}* in the root namespace`);
    t.same(left.processes, [], 'no process the suite started is alive');
    t.same(left.etcFolders, [], 'no /etc/netns folder of the lab');
    t.notOk(existsSync(lab.dir), 'the scratch directory is gone');
    t.comment(`suite took ${Math.round((Date.now() - started) / 1000)} s`);
  });
}




/** Reply codes of a dialogue, '-' for a command the connection ended on. */
function codes(steps: readonly DialogueStep[]): string[] {
  return steps.map((step) => step.code ?? '-');
}

function summary(talk: Dialogue): string {
  const steps = talk.steps.map((step) => `${step.cmd.replace(/^PASS .*/, 'PASS ***')} -> ${step.lines.join(' / ') || (step.closed ? 'closed' : 'no reply')}`);
  return [...steps, ...(talk.error ? [`error: ${talk.error}`] : [])].join('; ');
}





