/**
 * Configuration: validate once, report every error with key path and 1-based line, fill
 * defaults, freeze (style.md "fastify + pino").
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { basename, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  ConfigError,
  DEFAULT_PASSIVE_PORTS,
  LIMIT_DEFAULTS,
  TIMEOUT_DEFAULTS,
  formatIssue,
  loadConfigFile,
  parseListenAddress,
  parsePortRange,
  validateConfigText,
  type ConfigIssue,
} from '../../src/config/load.js';
import { ProxyError, isProxyError } from '../../src/errors.js';
import type { UpstreamRule } from '../../src/control/upstream-policy.js';
import { makeTestPki, opensslUnavailable, type TestPki } from '../helpers/tls.js';
import type { TapTest } from '../helpers/tap.js';

const SHIPPED = fileURLToPath(new URL('../../conf/ftp-nat-proxy.yaml', import.meta.url));

/** The issues of a config that must fail; fails the test (not throws) when it validates. */
function issuesOf(text: string): ConfigIssue[] {
  try {
    validateConfigText(text);
  } catch (err) {
    if (err instanceof ConfigError) return [...err.issues];
    throw err;
  }
  return [];
}

const MINIMAL = `listeners:
  - listen: "0.0.0.0:2121"
    upstream:
      host: ftp.internal.example
`;

t.test('the shipped conf/ftp-nat-proxy.yaml validates', async (t) => {
  const config = validateConfigText(readFileSync(SHIPPED, 'utf8'), SHIPPED);
  t.equal(config.log.level, 'info');
  t.equal(config.listeners.length, 1);
  const l = config.listeners[0]!;
  t.equal(l.name, 'default');
  t.same(l.listen, { host: '0.0.0.0', port: 2121 }, 'listen 0.0.0.0:2121');
  t.equal(l.upstream.host, '127.0.0.1', 'upstream 127.0.0.1');
  t.equal(l.upstream.port, 21, 'upstream port 21');
  t.equal(l.upstream.dataMode, 'passive');
  t.equal(l.upstream.activePorts, null);
  t.equal(l.upstream.bind, null);
  t.same(l.client.advertise, { kind: 'auto' });
  t.same(l.client.passivePorts, { first: 60000, last: 60099 });
  t.equal(l.client.portNatFixup, true);
  t.equal(l.limits.maxLineBytes, 4096);
});

t.test('loadConfigFile reads the shipped file too', async (t) => {
  const config = await loadConfigFile(SHIPPED);
  t.equal(config.listeners[0]?.listen.port, 2121);
});

t.test('defaults filled in for a minimal listener', async (t) => {
  const config = validateConfigText(MINIMAL);
  t.equal(config.log.level, 'info');
  const l = config.listeners[0]!;
  t.equal(l.name, 'listener0', 'name from the index');
  t.same(l.listen, { host: '0.0.0.0', port: 2121 });
  t.equal(l.upstream.host, 'ftp.internal.example');
  t.equal(l.upstream.port, 21);
  t.equal(l.upstream.dataMode, 'passive');
  t.equal(l.upstream.activePorts, null);
  t.equal(l.upstream.bind, null);
  t.same(l.client.advertise, { kind: 'auto' });
  t.same(l.client.advertiseFor, []);
  t.same(l.client.passivePorts, parsePortRange(DEFAULT_PASSIVE_PORTS));
  t.equal(l.client.portNatFixup, true);
  t.equal(l.client.dataPath, 'relay', 'the kernel path needs CAP_NET_ADMIN: only on request');
  t.same(l.upstream.selection, { kind: 'fixed', host: 'ftp.internal.example', port: 21 }, 'upstream.host: a fixed server');
  t.equal(l.client.dataSourcePort, null, 'active data to clients from any port');
  t.equal(l.timeouts.upstreamConnectMs, TIMEOUT_DEFAULTS.upstreamConnectSeconds * 1000);
  t.equal(l.timeouts.upstreamReplyMs, TIMEOUT_DEFAULTS.upstreamReplySeconds * 1000);
  t.equal(l.timeouts.dataConnectMs, TIMEOUT_DEFAULTS.dataConnectSeconds * 1000);
  t.equal(l.timeouts.dataAcceptMs, TIMEOUT_DEFAULTS.dataAcceptSeconds * 1000);
  t.equal(l.timeouts.idleMs, 600_000, 'idle longer than vsftpd idle_session_timeout 300 s');
  t.equal(l.timeouts.transferReplyHoldMs, TIMEOUT_DEFAULTS.transferReplyHoldSeconds * 1000);
  t.equal(l.timeouts.dataLingerMs, TIMEOUT_DEFAULTS.dataLingerSeconds * 1000);
  t.equal(l.timeouts.abortIdleMs, 200, '§1.4 rule 2: about 200 ms');
  t.equal(l.timeouts.tlsHandshakeMs, 10_000, 'tlsHandshakeSeconds 10');
  t.equal(l.tls, null, 'no TLS offered to clients unless configured');
  t.equal(l.upstream.tls, null, 'plain FTP toward the server unless configured');
  t.equal(l.limits.maxLineBytes, LIMIT_DEFAULTS.maxLineBytes);
  t.equal(l.limits.maxLineBytes, 4096, 'vsftpd VSFTP_MAX_COMMAND_LINE');
  t.equal(l.limits.maxReplyBytes, LIMIT_DEFAULTS.maxReplyBytes);
  t.equal(l.limits.maxQueuedCommands, LIMIT_DEFAULTS.maxQueuedCommands);
});

t.test('valid variants', async (t) => {
  const config = validateConfigText(`log:
  level: debug
listeners:
  - name: v6-front
    listen: "[::]:21"
    upstream:
      host: 10.0.0.5
      port: 2021
      dataMode: active
      activePorts: "50000-50099"
      bind: 10.20.0.1
    client:
      advertise: 203.0.113.10
      advertiseFor:
        - { from: 10.0.0.0/8, address: 10.20.0.1 }
        - { from: 192.168.1.7, address: 192.168.1.1 }
      passivePorts: 50000
      portNatFixup: false
    timeouts:
      idleSeconds: 0.5
      abortIdleMilliseconds: 150
    limits:
      maxLineBytes: 512
  - name: by-hostname
    listen: "127.0.0.1:0"
    upstream: { host: backend, dataMode: mirror, activePorts: "40000 - 40010" }
    client: { advertise: ftp.example.com }
`);
  t.equal(config.log.level, 'debug');
  const [a, b] = config.listeners;
  t.same(a?.listen, { host: '::', port: 21 }, 'IPv6 listen in brackets');
  t.same(a?.upstream, {
    host: '10.0.0.5',
    port: 2021,
    selection: { kind: 'fixed', host: '10.0.0.5', port: 2021 },
    dataMode: 'active',
    activePorts: { first: 50000, last: 50099 },
    bind: '10.20.0.1',
    tls: null,
  });
  t.same(a?.client.advertise, { kind: 'ip', address: '203.0.113.10' });
  t.same(a?.client.advertiseFor.map((r) => [r.fromText, r.address, r.from[1]]), [
    ['10.0.0.0/8', '10.20.0.1', 8],
    ['192.168.1.7', '192.168.1.1', 32],
  ]);
  t.same(a?.client.passivePorts, { first: 50000, last: 50000 }, 'single port range');
  t.equal(a?.client.portNatFixup, false);
  t.equal(a?.timeouts.idleMs, 500, 'fractional seconds -> ms');
  t.equal(a?.timeouts.abortIdleMs, 150);
  t.equal(a?.limits.maxLineBytes, 512);
  t.equal(b?.upstream.dataMode, 'mirror');
  t.same(b?.upstream.activePorts, { first: 40000, last: 40010 });
  t.same(b?.listen, { host: '127.0.0.1', port: 0 });
  t.same(b?.client.advertise, { kind: 'hostname', hostname: 'ftp.example.com' });
});

t.test('the returned config is deeply frozen', async (t) => {
  const config = validateConfigText(readFileSync(SHIPPED, 'utf8'));
  const l = config.listeners[0]!;
  const objects: [string, object][] = [
    ['config', config],
    ['log', config.log],
    ['listeners', config.listeners],
    ['listener', l],
    ['listen', l.listen],
    ['upstream', l.upstream],
    ['client', l.client],
    ['advertise', l.client.advertise],
    ['advertiseFor', l.client.advertiseFor],
    ['passivePorts', l.client.passivePorts],
    ['timeouts', l.timeouts],
    ['limits', l.limits],
    ['acl', l.acl],
    ['proxyProtocol', l.proxyProtocol],
  ];
  for (const [name, value] of objects) t.ok(Object.isFrozen(value), `${name} frozen`);
  t.throws(() => {
    (config.log as { level: string }).level = 'trace';
  }, TypeError, 'assignment throws (ESM is strict)');
  t.throws(() => {
    (config.listeners as unknown as unknown[]).push({});
  }, TypeError);
  t.throws(() => {
    (l.limits as { maxLineBytes: number }).maxLineBytes = 1;
  }, TypeError);
  t.equal(config.log.level, 'info', 'unchanged');
});

const MANY_ERRORS = `log:
  level: loud
listeners:
  - name: "bad name!"
    listen: "0.0.0.0:99999"
    upstream:
      host: "-bad-"
      port: 0
      dataMode: sideways
    client:
      advertise: "2001:db8::1"
      passivePorts: "60100-60000"
      portNatFixup: "yes"
      advertiseFor:
        - { from: "10.0.0.0/33", address: "::1" }
    timeouts:
      idleSeconds: -5
      bogus: 1
    limits:
      maxLineBytes: 100
  - listen: "[::]:2121"
    upstream:
      host: 127.0.0.1
      dataMode: active
extra: true
`;

/** One listener whose upstream (and anything after it) is `lines`, indented under the listener. */
function selectionYaml(...lines: string[]): string {
  return ['listeners:', '  - listen: "0.0.0.0:2121"', ...lines.map((l) => `    ${l}`), ''].join('\n');
}

function validated(t: TapTest, text: string): ReturnType<typeof validateConfigText> | null {
  try {
    return validateConfigText(text);
  } catch (err) {
    t.fail((err as Error).message);
    return null;
  }
}

/** A policy rule as short text: `cidr 10.0.0.0/8`, `name x`, `suffix x`. */
function ruleText(rule: UpstreamRule): string {
  return rule.kind === 'cidr' ? `cidr ${rule.cidr[0].toString()}/${rule.cidr[1]}` : rule.kind === 'name' ? `name ${rule.name}` : `suffix ${rule.suffix}`;
}

t.test('upstream.forward: the issue example parses into a forward selection (issue #13)', async (t) => {
  const config = validated(t, selectionYaml(
    'upstream:',
    '  forward: { allow: [203.0.113.0/24, ftp.partner.example, "*.partner.example"], deny: [], ports: "21" }',
  ));
  const up = config?.listeners[0]?.upstream;
  if (!up) return;
  t.equal(up.selection.kind, 'forward');
  if (up.selection.kind !== 'forward') return;
  t.same(up.selection.policy.allow.map(ruleText), ['cidr 203.0.113.0/24', 'name ftp.partner.example', 'suffix partner.example']);
  t.same(up.selection.policy.allow.map((r) => r.text), ['203.0.113.0/24', 'ftp.partner.example', '*.partner.example'], 'the text as written, for messages');
  t.same(up.selection.policy.deny, []);
  t.same(up.selection.policy.ports, [{ first: 21, last: 21 }]);
  t.equal(up.host, '', 'no fixed host');
  t.equal(up.port, 0, 'no fixed port: nothing to dial by mistake');
  t.equal(up.dataMode, 'passive', 'dataMode keeps its meaning and default');
  t.same(config?.warnings, [], 'no warnings');
});

t.test('upstream.transparent: the issue example parses into a transparent selection', async (t) => {
  const config = validated(t, selectionYaml(
    'upstream:',
    '  transparent: { allow: [0.0.0.0/0], deny: [10.0.0.0/8], ports: "21" }',
    '  dataMode: active',
    '  activePorts: "50000-50009"',
    'client:',
    '  dataSourcePort: 20',
  ));
  const l = config?.listeners[0];
  if (!l) return;
  const { selection } = l.upstream;
  t.equal(selection.kind, 'transparent');
  if (selection.kind !== 'transparent') return;
  t.same(selection.policy.allow.map(ruleText), ['cidr 0.0.0.0/0']);
  t.same(selection.policy.deny.map(ruleText), ['cidr 10.0.0.0/8']);
  t.same(selection.policy.ports, [{ first: 21, last: 21 }]);
  t.same(l.upstream.activePorts, { first: 50000, last: 50009 }, 'activePorts keep their meaning');
  t.equal(l.client.dataSourcePort, 20);
  t.same(config?.warnings, [], 'no warnings (no open-relay warning for transparent; dataSourcePort is in use)');
});

t.test('upstream selection: ports lists, defaults, IPv6 and mapped rules', async (t) => {
  const config = validated(t, selectionYaml(
    'upstream:',
    '  forward:',
    '    allow: ["2001:db8::/32", "::ffff:198.51.100.0/120", 192.0.2.7, FTP.Example.NET.]',
    '    deny: ["*.evil.example", 198.51.100.66]',
    '    ports: "21, 990, 2100-2199"',
    'acl: { allow: [10.0.0.0/8] }',
  ));
  const selection = config?.listeners[0]?.upstream.selection;
  if (selection?.kind !== 'forward') return void t.fail('forward expected');
  t.same(selection.policy.allow.map(ruleText), ['cidr 2001:db8::/32', 'cidr 198.51.100.0/24', 'cidr 192.0.2.7/32', 'name ftp.example.net']);
  t.same(selection.policy.deny.map(ruleText), ['suffix evil.example', 'cidr 198.51.100.66/32']);
  t.same(selection.policy.ports, [{ first: 21, last: 21 }, { first: 990, last: 990 }, { first: 2100, last: 2199 }]);
  const byNumber = validated(t, selectionYaml('upstream:', '  transparent: { allow: [0.0.0.0/0], ports: 2121 }'));
  const s2 = byNumber?.listeners[0]?.upstream.selection;
  t.same(s2?.kind === 'transparent' ? s2.policy.ports : null, [{ first: 2121, last: 2121 }], 'a bare number is a one-port list');
  const defaults = validated(t, selectionYaml('upstream:', '  forward: { allow: [ftp.partner.example] }'));
  const s3 = defaults?.listeners[0]?.upstream.selection;
  t.same(s3?.kind === 'forward' ? [s3.policy.deny, s3.policy.ports] : null, [[], [{ first: 21, last: 21 }]], 'deny [] and ports "21" by default');
});

t.test('upstream selection: exactly one of host, forward, transparent', async (t) => {
  const cases: [name: string, lines: string[], expected: [string, number, RegExp][]][] = [
    ['host and forward', ['upstream:', '  host: 10.0.0.5', '  forward: { allow: [10.0.0.0/8] }'], [['listeners[0].upstream.forward', 5, /cannot be combined with host: give exactly one of host, forward, transparent/]]],
    ['forward and transparent', ['upstream:', '  forward: { allow: [10.0.0.0/8] }', '  transparent: { allow: [10.0.0.0/8] }'], [['listeners[0].upstream.transparent', 5, /cannot be combined with forward/]]],
    // A missing key has no line of its own: the enclosing mapping's (its first key's line).
    ['none of them', ['upstream:', '  dataMode: passive'], [['listeners[0].upstream.host', 4, /^is required \(or upstream\.forward, or upstream\.transparent\)$/]]],
    ['host null', ['upstream:', '  host:'], [['listeners[0].upstream.host', 4, /^is required$/]]],
    ['forward not a mapping', ['upstream:', '  forward: [10.0.0.0/8]'], [['listeners[0].upstream.forward', 4, /must be a mapping with allow, deny and ports/]]],
    ['unknown key in forward', ['upstream:', '  forward: { allow: [10.0.0.0/8], allowed: [] }'], [['listeners[0].upstream.forward.allowed', 4, /unknown key \(allowed: allow, deny, ports\)/]]],
  ];
  for (const [name, lines, expected] of cases) {
    const issues = issuesOf(selectionYaml(...lines));
    t.same(issues.map((i) => [i.path, i.line]), expected.map(([p, l]) => [p, l]), name);
    expected.forEach(([, , message], i) => t.match(issues[i]?.message ?? '', message, `${name}: message`));
  }
});

t.test('upstream selection: each bad allow/deny entry and ports value reported at its key', async (t) => {
  const issues = issuesOf(selectionYaml(
    'upstream:',
    '  forward:',
    '    allow:',
    '      - 203.0.113.0/33',
    '      - "*"',
    '      - "ftp*.partner.example"',
    '      - "*partner.example"',
    '      - 10.1/16',
    '      - { cidr: 10.0.0.0/8 }',
    '      - ftp.partner.example',
    '    deny: 10.0.0.0/8',
    '    ports: "0,21"',
  ));
  const expected: [string, number, RegExp][] = [
    ['listeners[0].upstream.forward.allow[0]', 6, /^"203\.0\.113\.0\/33": the prefix length after \/ must be 0 to 32$/],
    ['listeners[0].upstream.forward.allow[1]', 7, /^"\*": a wildcard is allowed only as a whole first label/],
    ['listeners[0].upstream.forward.allow[2]', 8, /wildcard is allowed only as a whole first label/],
    ['listeners[0].upstream.forward.allow[3]', 9, /wildcard is allowed only as a whole first label/],
    ['listeners[0].upstream.forward.allow[4]', 10, /^"10\.1\/16": is not a CIDR/],
    ['listeners[0].upstream.forward.allow[5]', 11, /must be a string/],
    ['listeners[0].upstream.forward.deny', 13, /must be a list/],
    ['listeners[0].upstream.forward.ports', 14, /"0,21" is not a port list such as "21" or "21,990,2100-2199"/],
  ];
  t.same(issues.map((i) => [i.path, i.line]), expected.map(([p, l]) => [p, l]));
  expected.forEach(([path, , message], i) => t.match(issues[i]?.message ?? '', message, path));
  for (const ports of ['"21-"', '"2199-2100"', '"65536"', '""', '[21, 990]']) {
    const bad = issuesOf(selectionYaml('upstream:', `  transparent: { allow: [0.0.0.0/0], ports: ${ports} }`));
    t.same(bad.map((i) => i.path), ['listeners[0].upstream.transparent.ports'], `ports ${ports} refused`);
  }
});

t.test('upstream selection warnings: forwards nowhere, ignored port, one servername, open relay', async (t) => {
  const cases: [name: string, lines: string[], expected: [string, number, RegExp][]][] = [
    ['forward with an empty allow', ['upstream:', '  forward: { allow: [], deny: [10.0.0.0/8] }'], [['listeners[0].upstream.forward.allow', 4, /^empty: forwards nowhere/]]],
    ['forward written without a value', ['upstream:', '  forward:'], [['listeners[0].upstream.forward.allow', 4, /^empty: forwards nowhere/]]],
    ['transparent with no allow', ['upstream:', '  transparent: {}'], [['listeners[0].upstream.transparent.allow', 4, /^empty: every redirected connection is refused/]]],
    ['port with forward', ['upstream:', '  forward: { allow: [ftp.partner.example] }', '  port: 2121'], [['listeners[0].upstream.port', 5, /^ignored with forward: the client names it/]]],
    ['port with transparent', ['upstream:', '  transparent: { allow: [0.0.0.0/0] }', '  port: 21'], [['listeners[0].upstream.port', 5, /^ignored with transparent: it is the port the client dialled/]]],
    ['servername with forward', ['upstream:', '  forward: { allow: [ftp.partner.example] }', '  tls: { mode: explicit, servername: ftp.partner.example }'], [['listeners[0].upstream.tls.servername', 5, /one name for every forward destination/]]],
    ['0.0.0.0/0 with forward and no acl.allow', ['upstream:', '  forward: { allow: [0.0.0.0/0] }'], [['listeners[0].upstream.forward.allow', 4, /^0\.0\.0\.0\/0 with an empty acl\.allow: anyone who can reach this listener .*open relay/]]],
    ['::/0 with forward and no acl.allow', ['upstream:', '  forward: { allow: [ftp.x.example, "::/0"] }'], [['listeners[0].upstream.forward.allow', 4, /^::\/0 with an empty acl\.allow/]]],
    ['0.0.0.0/0 with forward and an acl.allow', ['upstream:', '  forward: { allow: [0.0.0.0/0] }', 'acl: { allow: [192.168.0.0/16] }'], []],
    ['0.0.0.0/0 with transparent', ['upstream:', '  transparent: { allow: [0.0.0.0/0] }'], []],
  ];
  for (const [name, lines, expected] of cases) {
    const config = validated(t, selectionYaml(...lines));
    if (!config) continue;
    t.same(config.warnings.map((w) => [w.path, w.line]), expected.map(([p, l]) => [p, l]), name);
    expected.forEach(([, , message], i) => t.match(config.warnings[i]?.message ?? '', message, `${name}: message`));
  }
});

t.test('upstream.tls.servername: upstream.host by default, empty (the destination) with forward and transparent', async (t) => {
  const fixed = validated(t, selectionYaml('upstream:', '  host: ftp.example.net', '  tls: { mode: explicit }'));
  t.equal(fixed?.listeners[0]?.upstream.tls?.servername, 'ftp.example.net');
  const forward = validated(t, selectionYaml('upstream:', '  forward: { allow: [ftp.partner.example] }', '  tls: { mode: explicit }'));
  t.equal(forward?.listeners[0]?.upstream.tls?.servername, '', 'forward: the name the client gives');
  const transparent = validated(t, selectionYaml('upstream:', '  transparent: { allow: [0.0.0.0/0] }', '  tls: { mode: implicit }'));
  t.equal(transparent?.listeners[0]?.upstream.tls?.servername, '', 'transparent: the original destination');
});

t.test('client.dataSourcePort: a whole port outside the ports the listener binds', async (t) => {
  const yaml = (value: string): string =>
    selectionYaml('upstream: { host: 10.0.0.5, dataMode: active, activePorts: "50000-50009" }', `client: { passivePorts: "60000-60009", dataSourcePort: ${value} }`);
  const ok = validated(t, yaml('20'));
  t.equal(ok?.listeners[0]?.client.dataSourcePort, 20);
  t.same(ok?.warnings, [], 'no warning: sessions use it');
  t.equal(validated(t, yaml('null'))?.listeners[0]?.client.dataSourcePort, null, 'null: any port');
  const cases: [value: string, message: RegExp][] = [
    ['0', /from 1 to 65535/],
    ['65536', /from 1 to 65535/],
    ['20.5', /whole number/],
    ['port20', /from 1 to 65535/],
    ['60005', /lies in client\.passivePorts/],
    ['50000', /lies in upstream\.activePorts/],
    ['2121', /is the listen port/],
  ];
  for (const [value, message] of cases) {
    const issues = issuesOf(yaml(value));
    t.same(issues.map((i) => [i.path, i.line]), [['listeners[0].client.dataSourcePort', 4]], value);
    t.match(issues[0]?.message ?? '', message, `${value}: message`);
  }
});

t.test('a forward selection is deeply frozen', async (t) => {
  const config = validated(t, selectionYaml('upstream:', '  forward: { allow: [203.0.113.0/24, "*.partner.example"], deny: [10.0.0.0/8] }'));
  const selection = config?.listeners[0]?.upstream.selection;
  if (selection?.kind !== 'forward') return void t.fail('forward expected');
  for (const [name, value] of [
    ['selection', selection],
    ['policy', selection.policy],
    ['allow', selection.policy.allow],
    ['allow[0]', selection.policy.allow[0]!],
    ['deny', selection.policy.deny],
    ['ports', selection.policy.ports],
    ['ports[0]', selection.policy.ports[0]!],
  ] as const) {
    t.ok(Object.isFrozen(value), `${name} frozen`);
  }
});

t.test('client.dataPath', async (t) => {
  const listener = (client: string, extra = ''): string => `listeners:\n  - listen: "0.0.0.0:21"\n    upstream: { host: 10.0.0.5 }\n    client: ${client}\n${extra}`;
  t.equal(validateConfigText(listener('{ dataPath: kernel }')).listeners[0]?.client.dataPath, 'kernel');
  t.equal(validateConfigText(listener('{ dataPath: relay }')).listeners[0]?.client.dataPath, 'relay');
  t.equal(validateConfigText(listener('{ dataPath: auto }')).listeners[0]?.client.dataPath, 'auto');
  t.equal(validateConfigText(listener('{}')).listeners[0]?.client.dataPath, 'relay', 'relay by default (README says why)');
  const bad = issuesOf(listener('{ dataPath: nat }'));
  t.same(bad.map((i) => [i.path, i.line]), [['listeners[0].client.dataPath', 4]]);
  t.match(bad[0]?.message, /relay, kernel or auto/);
  t.same(issuesOf(listener('{ dataPath: auto }', '    proxyProtocol: { accept: v2, from: [10.0.0.0/8] }\n')), [], 'auto with proxyProtocol: accepted, it relays there');
  const withProxyProtocol = issuesOf(listener('{ dataPath: kernel }', '    proxyProtocol: { accept: v2, from: [10.0.0.0/8] }\n'));
  t.same(withProxyProtocol.map((i) => i.path), ['listeners[0].client.dataPath']);
  t.match(withProxyProtocol[0]?.message, /cannot be used with proxyProtocol/, 'behind a PROXY load balancer the data comes from the balancer');
});

t.test('limits.maxLoginAttempts: 3 by default, 1 to 100', async (t) => {
  const listener = (limits: string): string => `listeners:\n  - listen: "0.0.0.0:21"\n    upstream: { host: 10.0.0.5 }\n    limits: ${limits}\n`;
  t.equal(validateConfigText(MINIMAL).listeners[0]?.limits.maxLoginAttempts, 3, 'default 3');
  t.equal(validateConfigText(listener('{ maxLoginAttempts: 10 }')).listeners[0]?.limits.maxLoginAttempts, 10);
  for (const bad of ['0', '101', 'many']) {
    t.same(issuesOf(listener(`{ maxLoginAttempts: ${bad} }`)).map((i) => i.path), ['listeners[0].limits.maxLoginAttempts'], `${bad} refused`);
  }
});

t.test('limits.maxRelayPortsPerIp: auto by default, a whole number, anything else an error', async (t) => {
  const listener = (limits: string): string => `listeners:\n  - listen: "0.0.0.0:21"\n    upstream: { host: 10.0.0.5 }\n    limits: ${limits}\n`;
  t.equal(validateConfigText(MINIMAL).listeners[0]?.limits.maxRelayPortsPerIp, 'auto', 'default auto');
  t.equal(validateConfigText(listener('{ maxRelayPortsPerIp: auto }')).listeners[0]?.limits.maxRelayPortsPerIp, 'auto');
  t.equal(validateConfigText(listener('{ maxRelayPortsPerIp: 3 }')).listeners[0]?.limits.maxRelayPortsPerIp, 3);
  for (const bad of ['0', '2.5', '-1', '70000', 'many', 'true']) {
    const issues = issuesOf(listener(`{ maxRelayPortsPerIp: ${bad} }`));
    t.same(issues.map((i) => [i.path, i.line]), [['listeners[0].limits.maxRelayPortsPerIp', 4]], `${bad} refused`);
    t.match(issues[0]?.message, /"auto" or a whole number/);
  }
});

t.test('client.advertise IPv6: a warning on an IPv6 listener (treated as auto), an error elsewhere (issue #10 item 9)', async (t) => {
  const yaml = (listen: string, advertise: string): string =>
    `listeners:\n  - listen: "${listen}"\n    upstream: { host: 10.0.0.5 }\n    client: { advertise: "${advertise}" }\n`;
  const cases: [listen: string, advertise: string, expected: 'warning' | 'error' | { kind: 'ip'; address: string }][] = [
    ['[2001:db8::10]:21', '2001:db8::10', 'warning'],
    ['[::]:2121', '2001:db8::10', 'warning'],
    ['[::1]:2121', '2001:DB8:0:0::10', 'warning'],
    ['0.0.0.0:2121', '2001:db8::10', 'error'],
    ['192.0.2.1:21', '2001:db8::10', 'error'],
    // Names an IPv4 address: write it as one, even on an IPv6 listener (dual-stack IPv4 clients get 227).
    ['[::]:2121', '::ffff:203.0.113.10', 'error'],
    ['0.0.0.0:2121', '203.0.113.10', { kind: 'ip', address: '203.0.113.10' }],
    ['[::]:2121', '203.0.113.10', { kind: 'ip', address: '203.0.113.10' }],
  ];
  for (const [listen, advertise, expected] of cases) {
    const text = yaml(listen, advertise);
    const name = `listen ${listen}, advertise ${advertise}`;
    if (expected === 'error') {
      const issues = issuesOf(text);
      t.same(issues.map((i) => [i.path, i.line]), [['listeners[0].client.advertise', 4]], `${name}: an error`);
      t.match(issues[0]?.message, /must be an IPv4 address/, name);
      continue;
    }
    let config;
    try {
      config = validateConfigText(text);
    } catch (err) {
      t.fail(`${name}: ${(err as Error).message}`);
      continue;
    }
    const warnings = config.warnings;
    if (expected === 'warning') {
      t.same(config.listeners[0]?.client.advertise, { kind: 'auto' }, `${name}: behaves as auto`);
      t.same(warnings?.map((w) => [w.path, w.line]), [['listeners[0].client.advertise', 4]], `${name}: one warning at the key`);
      t.match(warnings?.[0]?.message, /^ignored, the listener uses "auto": 227 replies carry only IPv4 and 229 replies carry no address/, name);
    } else {
      t.same(config.listeners[0]?.client.advertise, expected, `${name}: kept`);
      t.same(warnings, [], `${name}: no warnings`);
    }
  }
});

t.test('config warnings: none for a plain config, frozen, never reported as errors', async (t) => {
  const config = validateConfigText(MINIMAL);
  t.same(config.warnings, [], 'none');
  t.ok(Object.isFrozen(config.warnings), 'frozen');
  const warned = validateConfigText(`listeners:\n  - listen: "[::]:21"\n    upstream: { host: 10.0.0.5 }\n    client: { advertise: "2001:db8::10" }\n`);
  t.ok(Object.isFrozen(warned.warnings?.[0]), 'each warning frozen');
  // A config with errors is refused whole: its errors are the story, warnings are not errors.
  const issues = issuesOf(`listeners:\n  - listen: "[::]:21"\n    upstream: { host: 10.0.0.5, port: 0 }\n    client: { advertise: "2001:db8::10" }\n`);
  t.same(issues.map((i) => i.path), ['listeners[0].upstream.port'], 'only the error, the advertise warning is not an error');
});

t.test('bad config: ALL errors, each with key path and 1-based line', async (t) => {
  const issues = issuesOf(MANY_ERRORS);
  const expected: [path: string, line: number, message: RegExp][] = [
    ['extra', 25, /unknown key/],
    ['log.level', 2, /must be one of .*info/],
    ['listeners[0].name', 4, /1-64 characters/],
    ['listeners[0].listen', 5, /0\.0\.0\.0:99999/],
    ['listeners[0].upstream.host', 7, /neither an IP address nor a hostname/],
    ['listeners[0].upstream.port', 8, /1 to 65535/],
    ['listeners[0].upstream.dataMode', 9, /passive, active or mirror/],
    ['listeners[0].client.advertise', 11, /IPv4/],
    ['listeners[0].client.advertiseFor[0].from', 15, /CIDR/],
    ['listeners[0].client.advertiseFor[0].address', 15, /IPv4/],
    ['listeners[0].client.passivePorts', 12, /first-last/],
    ['listeners[0].client.portNatFixup', 13, /true or false/],
    ['listeners[0].timeouts.bogus', 18, /unknown key/],
    ['listeners[0].timeouts.idleSeconds', 17, /must be a number/],
    ['listeners[0].limits.maxLineBytes', 20, /512 to 65536/],
    // A missing key has no line of its own: the enclosing mapping's line is reported.
    ['listeners[1].upstream.activePorts', 23, /required when dataMode is active/],
  ];
  const sortKey = (p: string, l: number): string => `${p}@${l}`;
  t.same(
    issues.map((i) => sortKey(i.path, i.line)).sort(),
    expected.map(([p, l]) => sortKey(p, l)).sort(),
    'exactly these (path, line) pairs, nothing stops at the first error',
  );
  for (const [path, line, message] of expected) {
    const issue = issues.find((i) => i.path === path && i.line === line);
    t.match(issue?.message ?? '', message, `${path} message`);
  }
  for (const issue of issues) t.ok(issue.line >= 1, `${issue.path}: line is 1-based`);
});

t.test('ConfigError carries the code and a readable message', async (t) => {
  let caught: unknown;
  try {
    validateConfigText(MANY_ERRORS, 'bad.yaml');
  } catch (err) {
    caught = err;
  }
  t.ok(caught instanceof ConfigError);
  t.ok(caught instanceof ProxyError);
  t.ok(isProxyError(caught, 'FTPP_ERR_CONFIG'));
  const err = caught as ConfigError;
  t.equal(err.name, 'ConfigError');
  t.match(err.message, /^bad\.yaml: 16 error\(s\)\n/);
  for (const issue of err.issues) t.ok(err.message.includes(formatIssue(issue)), `message lists ${issue.path}`);
});

t.test('formatIssue', async (t) => {
  t.equal(formatIssue({ path: 'log.level', line: 2, message: 'bad' }), '  log.level (line 2): bad');
  t.equal(formatIssue({ path: '', line: 0, message: 'cannot read file' }), '  (root): cannot read file');
});

t.test('YAML syntax errors carry their 1-based line', async (t) => {
  const flow = issuesOf('log:\n  level: info\nlisteners:\n  - listen: [oops\n');
  t.equal(flow.length >= 1, true, 'reported');
  t.ok(flow.every((i) => i.line >= 1), `lines: ${flow.map((i) => i.line).join(',')}`);
  t.match(flow[0]?.message ?? '', /^YAML: /);

  const dup = issuesOf('log:\n  level: info\nlog:\n  level: debug\nlisteners: []\n');
  t.same(dup.map((i) => [i.path, i.line]), [['', 3]], 'duplicate key reported at its own line');
  t.match(dup[0]?.message ?? '', /unique/);

  const tab = issuesOf('listeners:\n  - listen: "0.0.0.0:21"\n\tupstream: x\n');
  t.ok(tab.length >= 1 && tab.every((i) => i.line === 3), `tab indentation on line 3: ${JSON.stringify(tab)}`);
});

t.test('root must be a mapping with a non-empty listener list', async (t) => {
  t.same(issuesOf(''), [{ path: '', line: 1, message: 'must be a mapping with a "listeners" list' }], 'empty file');
  t.same(issuesOf('- a\n- b\n').map((i) => i.path), [''], 'list at the root');
  t.same(issuesOf('log: {level: info}\n').map((i) => [i.path, i.line]), [['listeners', 1]], 'no listeners (reported at the root mapping)');
  t.same(issuesOf('listeners: []\n').map((i) => [i.path, i.line]), [['listeners', 1]], 'empty list');
  t.same(issuesOf('listeners: {a: 1}\n').map((i) => [i.path, i.line]), [['listeners', 1]], 'mapping instead of list');
  t.same(
    issuesOf('listeners:\n  - listen: "0.0.0.0:21"\n').map((i) => [i.path, i.line]),
    [['listeners[0].upstream', 2]],
    'upstream required, reported once',
  );
  t.same(
    issuesOf('listeners:\n  - upstream: {host: h}\n').map((i) => [i.path, i.line]),
    [['listeners[0].listen', 2]],
    'listen required',
  );
  t.same(issuesOf('listeners:\n  - 42\n').map((i) => [i.path, i.line]), [['listeners[0]', 2], ['listeners[0].listen', 2], ['listeners[0].upstream', 2]], 'listener not a mapping');
});

t.test('regression: duplicate listener name is reported at the duplicate, even after an invalid listener', async (t) => {
  const issues = issuesOf(`listeners:
  - name: broken
    listen: nonsense
    upstream: { host: 127.0.0.1 }
  - name: dup
    listen: "0.0.0.0:21"
    upstream: { host: 127.0.0.1 }
  - name: dup
    listen: "0.0.0.0:22"
    upstream: { host: 127.0.0.1 }
`);
  t.same(
    issues.map((i) => [i.path, i.line]),
    [
      ['listeners[0].listen', 3],
      ['listeners[2].name', 8],
    ],
  );
  t.match(issues[1]?.message ?? '', /duplicate listener name "dup"/);
});

t.test('regression: an all-numeric dotted name is a mistyped IP, not a hostname (RFC 1123 §2.1)', async (t) => {
  const issues = issuesOf(`listeners:
  - listen: "0.0.0.0:21"
    upstream:
      host: 10.0.0.300
    client:
      advertise: 203.0.113.300
`);
  t.same(
    issues.map((i) => [i.path, i.line]),
    [
      ['listeners[0].upstream.host', 4],
      ['listeners[0].client.advertise', 6],
    ],
  );
  // Real hostnames with digits stay valid.
  const ok = validateConfigText(`listeners:
  - listen: "0.0.0.0:21"
    upstream: { host: ftp1.example.com }
    client: { advertise: 1.example.net }
`);
  t.equal(ok.listeners[0]?.upstream.host, 'ftp1.example.com');
  t.same(ok.listeners[0]?.client.advertise, { kind: 'hostname', hostname: '1.example.net' });
});

t.test('type errors', async (t) => {
  const issues = issuesOf(`log: info
listeners:
  - listen: "0.0.0.0:21"
    upstream: { host: [a, b], port: "21" }
    client: { portNatFixup: 1, advertiseFor: 10.0.0.0/8 }
    timeouts: 5
`);
  t.same(
    issues.map((i) => [i.path, i.line]).sort(),
    [
      ['listeners[0].client.advertiseFor', 5],
      ['listeners[0].client.portNatFixup', 5],
      ['listeners[0].timeouts', 6],
      ['listeners[0].upstream.host', 4],
      ['listeners[0].upstream.port', 4],
      ['log', 1],
    ].sort(),
  );
});

t.test('regression: a fractional upstream port is refused at load, not at connect', async (t) => {
  const issues = issuesOf('listeners:\n  - listen: "0.0.0.0:21"\n    upstream: {host: h, port: 21.5}\n');
  t.same(issues.map((i) => [i.path, i.line]), [['listeners[0].upstream.port', 3]]);
  t.match(issues[0]?.message ?? '', /whole number/);
});

t.test('loadConfigFile: unreadable file is a ConfigError, not a crash', async (t) => {
  const dir = t.testdir({});
  await t.rejects(loadConfigFile(`${dir}/missing.yaml`), ConfigError);
  try {
    await loadConfigFile(`${dir}/missing.yaml`);
  } catch (err) {
    t.match((err as ConfigError).issues, [{ path: '', line: 0, message: /cannot read file/ }]);
  }
});

t.test('parsePortRange table', async (t) => {
  const table: [string, { first: number; last: number } | null][] = [
    ['60000-60099', { first: 60000, last: 60099 }],
    ['60000 - 60099', { first: 60000, last: 60099 }],
    ['50000', { first: 50000, last: 50000 }],
    ['1-65535', { first: 1, last: 65535 }],
    ['0-10', null],
    ['10-65536', null],
    ['60100-60000', null],
    ['', null],
    ['a-b', null],
    ['-5', null],
    ['1-2-3', null],
    ['99999999999', null],
    ['100000-100001', null],
  ];
  for (const [text, expected] of table) t.same(parsePortRange(text), expected, JSON.stringify(text));
});

t.test('parseListenAddress table', async (t) => {
  const table: [string, { host: string; port: number } | null][] = [
    ['0.0.0.0:2121', { host: '0.0.0.0', port: 2121 }],
    ['127.0.0.1:21', { host: '127.0.0.1', port: 21 }],
    ['[::]:2121', { host: '::', port: 2121 }],
    ['[2001:0db8::1]:21', { host: '2001:db8::1', port: 21 }],
    ['[::1]:65535', { host: '::1', port: 65535 }],
    ['127.0.0.1:0', { host: '127.0.0.1', port: 0 }],
    ['127.0.0.1:65536', null],
    ['127.0.0.1', null],
    [':21', null],
    ['::1:21', null],
    ['[127.0.0.1]:21', null],
    ['[::1]', null],
    ['localhost:21', null],
    ['256.0.0.1:21', null],
    ['1.2.3:21', null],
    ['127.0.0.1:-1', null],
    ['127.0.0.1:99999999999', null],
    ['[fe80::1%eth0]:21', { host: 'fe80::1%eth0', port: 21 }], // zone-scoped bind is valid in Node
    ['', null],
  ];
  for (const [text, expected] of table) t.same(parseListenAddress(text), expected, JSON.stringify(text));
});

// ------------------------------------------------------------------ TLS (issue #12)

const NO_OPENSSL = opensslUnavailable();
const TLS_SKIP = NO_OPENSSL === null ? {} : { skip: NO_OPENSSL };

/** The test PKI plus the broken files the error cases name, all in pki.dir. */
interface TlsFiles {
  readonly pki: TestPki;
  /** Absolute paths. */
  readonly cert: string;
  readonly key: string;
  readonly ca: string;
  readonly otherKey: string;
  readonly encryptedKey: string;
  readonly encryptedTraditionalKey: string;
  readonly garbage: string;
  readonly brokenCert: string;
  readonly keyOnly: string;
  /** A line of the server key's base64 body: no output may contain it. */
  readonly keyBodyLine: string;
}

let tlsFiles: TlsFiles | null = null;
if (NO_OPENSSL === null) {
  const pki = makeTestPki();
  t.teardown(() => pki.cleanup());
  const file = (name: string, text: string): string => {
    const path = join(pki.dir, name);
    writeFileSync(path, text, { mode: 0o600 });
    return path;
  };
  const encryptedKey = join(pki.dir, 'encrypted.key');
  execFileSync('openssl', ['pkey', '-in', pki.server.key.path, '-aes256', '-passout', 'pass:secret', '-out', encryptedKey], { stdio: 'ignore' });
  const encryptedTraditionalKey = join(pki.dir, 'encrypted-traditional.key');
  execFileSync('openssl', ['rsa', '-in', pki.server.key.path, '-aes256', '-passout', 'pass:secret', '-traditional', '-out', encryptedTraditionalKey], { stdio: 'ignore' });
  const certLines = pki.server.cert.pem.trim().split('\n');
  tlsFiles = {
    pki,
    cert: pki.server.cert.path,
    key: pki.server.key.path,
    ca: pki.ca.cert.path,
    otherKey: pki.otherServer.key.path,
    encryptedKey,
    encryptedTraditionalKey,
    garbage: file('garbage.pem', 'not a PEM file at all\n'),
    // A certificate block whose DER is cut short.
    brokenCert: file('broken.pem', `${certLines.slice(0, 4).join('\n')}\n-----END CERTIFICATE-----\n`),
    keyOnly: file('key-only.pem', pki.server.key.pem),
    keyBodyLine: pki.server.key.pem.split('\n')[1]!,
  };
}

function files(): TlsFiles {
  if (!tlsFiles) throw new Error('no test PKI (openssl missing)');
  return tlsFiles;
}

interface TlsYamlOptions {
  /** Lines under `tls:` of the listener (without indentation); undefined = no tls key. */
  readonly tls?: readonly string[];
  /** Lines under `upstream.tls:`. */
  readonly upstreamTls?: readonly string[];
  readonly timeouts?: readonly string[];
}

/** One listener; line 4 is `host:`, then upstream.tls, then tls and timeouts. */
function tlsYaml(options: TlsYamlOptions): string {
  const block = (header: string, indent: string, lines: readonly string[] | undefined): string[] =>
    lines === undefined ? [] : [`${header}`, ...lines.map((l) => `${indent}${l}`)];
  return [
    'listeners:',
    '  - listen: "0.0.0.0:21"',
    '    upstream:',
    '      host: ftp.internal.example',
    ...block('      tls:', '        ', options.upstreamTls),
    ...block('    tls:', '      ', options.tls),
    ...block('    timeouts:', '      ', options.timeouts),
    '',
  ].join('\n');
}

/** The listener's minimal valid `tls:` lines. */
function serverTls(mode = 'explicit'): string[] {
  return [`mode: ${mode}`, `cert: ${files().cert}`, `key: ${files().key}`];
}

/** Every message a caller could print: the ConfigError's text, or the warnings. */
function everythingPrinted(text: string, options: Parameters<typeof validateConfigText>[2] = {}): string {
  try {
    return validateConfigText(text, 'test', options).warnings.map(formatIssue).join('\n');
  } catch (err) {
    if (err instanceof ConfigError) return err.message;
    throw err;
  }
}

t.test('tls: defaults for a listener and an upstream with only the required keys', TLS_SKIP, async (t) => {
  const f = files();
  const config = validateConfigText(tlsYaml({ tls: serverTls(), upstreamTls: ['mode: explicit'] }));
  const l = config.listeners[0]!;
  t.same(l.tls, {
    mode: 'explicit',
    certFile: f.cert,
    keyFile: f.key,
    certPem: f.pki.server.cert.pem,
    keyPem: f.pki.server.key.pem,
    require: false,
    dataSessionReuse: 'required',
    minVersion: 'TLSv1.2',
  });
  t.same(l.upstream.tls, { mode: 'explicit', caFile: null, caPem: null, servername: 'ftp.internal.example', verify: true }, 'system trust store, servername = upstream.host');
  t.equal(l.timeouts.tlsHandshakeMs, 10_000);
  t.same(config.warnings, [], 'no warnings');
  for (const [name, value] of [['tls', l.tls], ['upstream.tls', l.upstream.tls]] as const) t.ok(Object.isFrozen(value), `${name} frozen`);
});

t.test('tls: every key given', TLS_SKIP, async (t) => {
  const f = files();
  const config = validateConfigText(tlsYaml({
    tls: ['mode: implicit', `cert: ${f.cert}`, `key: ${f.key}`, 'dataSessionReuse: "off"', 'minVersion: TLSv1.3'],
    upstreamTls: ['mode: implicit', `ca: ${f.ca}`, 'servername: localhost', 'verify: true'],
    timeouts: ['tlsHandshakeSeconds: 2.5'],
  }));
  const l = config.listeners[0]!;
  t.match(l.tls, { mode: 'implicit', require: false, dataSessionReuse: 'off', minVersion: 'TLSv1.3' });
  t.same(l.upstream.tls, { mode: 'implicit', caFile: f.ca, caPem: f.pki.ca.cert.pem, servername: 'localhost', verify: true });
  t.equal(l.timeouts.tlsHandshakeMs, 2500, 'fractional seconds -> ms');
  t.same(config.warnings, []);
  const explicitRequired = validateConfigText(tlsYaml({ tls: [...serverTls(), 'require: true'] }));
  t.equal(explicitRequired.listeners[0]?.tls?.require, true, 'require: true with explicit TLS');
  const byIp = validateConfigText(tlsYaml({ upstreamTls: ['mode: explicit', 'servername: 10.20.0.5'] }));
  t.equal(byIp.listeners[0]?.upstream.tls?.servername, '10.20.0.5', 'servername may be an IP address');
});

t.test('upstream.tls mode off, or tls null, is plain (null)', TLS_SKIP, async (t) => {
  t.equal(validateConfigText(tlsYaml({ upstreamTls: ['mode: "off"'] })).listeners[0]?.upstream.tls, null, 'mode "off"');
  t.equal(validateConfigText(tlsYaml({ upstreamTls: ['mode: off'] })).listeners[0]?.upstream.tls, null, 'mode off (a string in YAML 1.2)');
  t.equal(validateConfigText(MINIMAL.replace('    upstream:\n', '    tls: null\n    upstream:\n')).listeners[0]?.tls, null, 'tls: null');
  const ignored = validateConfigText(tlsYaml({ upstreamTls: ['mode: off', `ca: ${files().garbage}`, 'verify: false'] }));
  t.equal(ignored.listeners[0]?.upstream.tls, null);
  t.same(ignored.warnings.map((w) => [w.path, w.line]), [['listeners[0].upstream.tls', 6]], 'one warning: the other keys are ignored (the CA file is not read)');
  t.match(ignored.warnings[0]?.message, /^ca, verify ignored: mode is off/);
});

t.test('timeouts.tlsHandshakeSeconds range 0.001..300', TLS_SKIP, async (t) => {
  t.equal(validateConfigText(tlsYaml({ timeouts: ['tlsHandshakeSeconds: 300'] })).listeners[0]?.timeouts.tlsHandshakeMs, 300_000);
  t.equal(validateConfigText(tlsYaml({ timeouts: ['tlsHandshakeSeconds: 0.001'] })).listeners[0]?.timeouts.tlsHandshakeMs, 1);
  for (const bad of ['0', '301', '-1', 'soon']) {
    const issues = issuesOf(tlsYaml({ timeouts: [`tlsHandshakeSeconds: ${bad}`] }));
    t.same(issues.map((i) => [i.path, i.line]), [['listeners[0].timeouts.tlsHandshakeSeconds', 6]], `${bad} refused`);
    t.match(issues[0]?.message, /from 0\.001 to 300/);
  }
});

t.test('tls errors: each reported at its key with a clear message, never with key material', TLS_SKIP, async (t) => {
  const f = files();
  const listener = (lines: string[]): TlsYamlOptions => ({ tls: lines });
  const upstream = (lines: string[]): TlsYamlOptions => ({ upstreamTls: lines });
  const cases: [name: string, options: TlsYamlOptions, errors: [path: string, message: RegExp][]][] = [
    ['mode missing', listener([`cert: ${f.cert}`, `key: ${f.key}`]), [['listeners[0].tls.mode', /^is required$/]]],
    ['mode unknown', listener(['mode: auth', `cert: ${f.cert}`, `key: ${f.key}`]), [['listeners[0].tls.mode', /^must be explicit or implicit$/]]],
    ['cert and key missing', listener(['mode: explicit']), [['listeners[0].tls.cert', /^is required$/], ['listeners[0].tls.key', /^is required$/]]],
    ['unknown key', listener([...serverTls(), 'ciphers: HIGH']), [['listeners[0].tls.ciphers', /^unknown key \(allowed: mode, cert, key, require, dataSessionReuse, minVersion\)$/]]],
    ['require not a boolean', listener([...serverTls(), 'require: "yes"']), [['listeners[0].tls.require', /true or false/]]],
    ['dataSessionReuse unknown', listener([...serverTls(), 'dataSessionReuse: optional']), [['listeners[0].tls.dataSessionReuse', /^must be required or off$/]]],
    ['minVersion TLSv1.1', listener([...serverTls(), 'minVersion: TLSv1.1']), [['listeners[0].tls.minVersion', /^must be TLSv1\.2 or TLSv1\.3$/]]],
    ['cert file missing', listener(['mode: explicit', `cert: ${f.pki.dir}/nope.pem`, `key: ${f.key}`]),
      [['listeners[0].tls.cert', new RegExp(`^cannot read ${escape(f.pki.dir)}/nope\\.pem: no such file or directory \\(ENOENT\\)$`)]]],
    ['key is a directory', listener(['mode: explicit', `cert: ${f.cert}`, `key: ${f.pki.dir}`]),
      [['listeners[0].tls.key', new RegExp(`^cannot read ${escape(f.pki.dir)}: illegal operation on a directory \\(EISDIR\\)$`)]]],
    ['cert file holds no certificate', listener(['mode: explicit', `cert: ${f.garbage}`, `key: ${f.key}`]), [['listeners[0].tls.cert', /garbage\.pem holds no PEM certificate/]]],
    ['cert file holds the key (swapped)', listener(['mode: explicit', `cert: ${f.key}`, `key: ${f.cert}`]),
      [['listeners[0].tls.cert', /server\.key holds no PEM certificate/], ['listeners[0].tls.key', /server\.pem is not a PEM private key$/]]],
    ['cert cut short', listener(['mode: explicit', `cert: ${f.brokenCert}`, `key: ${f.key}`]), [['listeners[0].tls.cert', /^certificate 1 in .*broken\.pem is not a valid PEM certificate: /]]],
    ['key file is garbage', listener(['mode: explicit', `cert: ${f.cert}`, `key: ${f.garbage}`]), [['listeners[0].tls.key', /garbage\.pem is not a PEM private key$/]]],
    ['key of another certificate', listener(['mode: explicit', `cert: ${f.cert}`, `key: ${f.otherKey}`]),
      [['listeners[0].tls.key', /^the key in .*other-server\.key does not match the certificate in .*server\.pem$/]]],
    ['encrypted key (PKCS#8)', listener(['mode: explicit', `cert: ${f.cert}`, `key: ${f.encryptedKey}`]), [['listeners[0].tls.key', /encrypted\.key: encrypted private keys are not supported/]]],
    ['encrypted key (traditional)', listener(['mode: explicit', `cert: ${f.cert}`, `key: ${f.encryptedTraditionalKey}`]),
      [['listeners[0].tls.key', /encrypted-traditional\.key: encrypted private keys are not supported/]]],
    ['upstream mode missing', upstream([`ca: ${f.ca}`]), [['listeners[0].upstream.tls.mode', /^is required$/]]],
    ['upstream mode unknown', upstream(['mode: starttls']), [['listeners[0].upstream.tls.mode', /^must be off, explicit or implicit$/]]],
    ['upstream unknown key', upstream(['mode: explicit', 'cert: x.pem']), [['listeners[0].upstream.tls.cert', /^unknown key \(allowed: mode, ca, servername, verify\)$/]]],
    ['ca file missing', upstream(['mode: explicit', `ca: ${f.pki.dir}/no-ca.pem`]), [['listeners[0].upstream.tls.ca', /^cannot read .*no-ca\.pem: no such file or directory \(ENOENT\)$/]]],
    ['ca file holds no certificate', upstream(['mode: explicit', `ca: ${f.keyOnly}`]), [['listeners[0].upstream.tls.ca', /key-only\.pem holds no PEM certificate/]]],
    ['ca certificate cut short', upstream(['mode: explicit', `ca: ${f.brokenCert}`]), [['listeners[0].upstream.tls.ca', /^certificate 1 in .*broken\.pem is not a valid PEM certificate/]]],
    ['servername not a name', upstream(['mode: explicit', 'servername: "ftp internal"']), [['listeners[0].upstream.tls.servername', /^"ftp internal" is neither a hostname nor an IP address$/]]],
    ['verify not a boolean', upstream(['mode: explicit', 'verify: "no"']), [['listeners[0].upstream.tls.verify', /true or false/]]],
  ];
  for (const [name, options, errors] of cases) {
    const text = tlsYaml(options);
    const issues = issuesOf(text);
    t.same(issues.map((i) => i.path), errors.map(([path]) => path), `${name}: paths`);
    errors.forEach(([path, message], n) => t.match(issues[n]?.message, message, `${name}: ${path} message`));
    const lines = text.split('\n');
    for (const issue of issues) {
      const key = issue.path.split('.').at(-1)!;
      const expected = lines.findIndex((l) => new RegExp(`^\\s*${key}:`).test(l)) + 1;
      t.equal(issue.line, expected > 0 ? expected : issue.line, `${name}: ${issue.path} at line ${issue.line}`);
      t.ok(issue.line >= 1, `${name}: line is 1-based`);
    }
    const printed = everythingPrinted(text);
    t.notMatch(printed, /PRIVATE KEY/, `${name}: no PEM header in the message`);
    t.notOk(printed.includes(f.keyBodyLine), `${name}: no key body in the message`);
  }
});

t.test('tls: not a mapping is one error', TLS_SKIP, async (t) => {
  for (const [text, path] of [
    [MINIMAL.replace('    upstream:\n', '    tls: explicit\n    upstream:\n'), 'listeners[0].tls'],
    [tlsYaml({}).replace('      host: ftp.internal.example\n', '      host: ftp.internal.example\n      tls: [explicit]\n'), 'listeners[0].upstream.tls'],
  ] as const) {
    const issues = issuesOf(text);
    t.same(issues.map((i) => [i.path, i.message]), [[path, 'must be a mapping']], path);
  }
});

t.test('tls warnings: implicit with require, verify false, an expired certificate', TLS_SKIP, async (t) => {
  const f = files();
  const implicit = validateConfigText(tlsYaml({ tls: [...serverTls('implicit'), 'require: true'] }));
  t.equal(implicit.listeners[0]?.tls?.require, false, 'require is false with implicit TLS');
  t.same(implicit.warnings, [{ path: 'listeners[0].tls.require', line: 9, message: 'require has no effect with implicit TLS' }]);
  t.same(validateConfigText(tlsYaml({ tls: [...serverTls('implicit'), 'require: false'] })).warnings, [], 'require: false says nothing');

  const unverified = validateConfigText(tlsYaml({ upstreamTls: ['mode: explicit', 'verify: false'] }));
  t.equal(unverified.listeners[0]?.upstream.tls?.verify, false);
  t.same(unverified.warnings.map((w) => [w.path, w.line]), [['listeners[0].upstream.tls.verify', 7]]);
  t.match(unverified.warnings[0]?.message, /certificate is not verified.*labs only/);

  const text = tlsYaml({ tls: serverTls() });
  t.same(validateConfigText(text).warnings, [], 'valid today');
  const later = validateConfigText(text, 'test', { now: Date.parse('2100-01-01T00:00:00Z') });
  t.ok(later.listeners[0]?.tls, 'an expired certificate still loads');
  t.same(later.warnings.map((w) => [w.path, w.line]), [['listeners[0].tls.cert', 7]]);
  t.match(later.warnings[0]?.message, new RegExp(`^the certificate in ${escape(f.cert)} has expired \\(notAfter \\w{3} +\\d+ [\\d:]+ \\d{4} GMT\\)`));

  const all = validateConfigText(tlsYaml({ tls: [...serverTls('implicit'), 'require: true'], upstreamTls: ['mode: explicit', 'verify: false'] }), 'test', { now: Date.parse('2100-01-01T00:00:00Z') });
  const printed = all.warnings.map(formatIssue).join('\n');
  t.equal(all.warnings.length, 3, 'three warnings together');
  t.notMatch(printed, /PRIVATE KEY/);
  t.notOk(printed.includes(f.keyBodyLine), 'no key body in a warning');
});

t.test('tls: a warning is not reported when the config has errors, the errors are', TLS_SKIP, async (t) => {
  const issues = issuesOf(tlsYaml({ tls: ['mode: implicit', `cert: ${files().cert}`, `key: ${files().otherKey}`, 'require: true'] }));
  t.same(issues.map((i) => i.path), ['listeners[0].tls.key']);
});

t.test('tls: relative file names resolve against the config file directory (loadConfigFile) or the current directory', TLS_SKIP, async (t) => {
  const f = files();
  const sub = join(f.pki.dir, 'conf.d');
  mkdirSync(sub, { recursive: true });
  const relativeYaml = (dir: string): string => tlsYaml({
    tls: ['mode: explicit', `cert: ${dir}${basename(f.cert)}`, `key: ${dir}${basename(f.key)}`],
    upstreamTls: ['mode: explicit', `ca: ${dir}${basename(f.ca)}`],
  });
  const expectFiles = (config: Awaited<ReturnType<typeof loadConfigFile>>, name: string): void => {
    const l = config.listeners[0]!;
    t.equal(l.tls?.certFile, f.cert, `${name}: certFile absolute`);
    t.equal(l.tls?.keyFile, f.key, `${name}: keyFile absolute`);
    t.equal(l.upstream.tls?.caFile, f.ca, `${name}: caFile absolute`);
    t.equal(l.tls?.keyPem, f.pki.server.key.pem, `${name}: the key read`);
  };
  const beside = join(f.pki.dir, 'proxy.yaml');
  writeFileSync(beside, relativeYaml(''));
  expectFiles(await loadConfigFile(beside), 'file beside the PEM files');
  const nested = join(sub, 'proxy.yaml');
  writeFileSync(nested, relativeYaml('../'));
  expectFiles(await loadConfigFile(nested), '../ from a sub-directory');
  expectFiles(await loadConfigFile(relative(process.cwd(), nested)), 'config named by a relative path');
  expectFiles(validateConfigText(relativeYaml(''), 'text', { baseDir: f.pki.dir }), 'validateConfigText with baseDir');
  const fromCwd = `${relative(process.cwd(), f.pki.dir)}/`;
  expectFiles(validateConfigText(relativeYaml(fromCwd)), 'validateConfigText without baseDir: the current directory');
  const wrongDir = issuesOf(relativeYaml(''));
  t.same(wrongDir.map((i) => i.path), ['listeners[0].upstream.tls.ca', 'listeners[0].tls.cert', 'listeners[0].tls.key'], 'not found in the current directory');
  t.match(wrongDir[1]?.message, new RegExp(`^cannot read ${escape(join(process.cwd(), basename(f.cert)))}: `), 'the error names the resolved path');
});

t.test('every example in conf/ validates (its /etc/ftp-nat-proxy/tls/ files replaced by test ones)', TLS_SKIP, async (t) => {
  // The examples name the files where an installation keeps them; those do not exist here.
  // The same names in a temporary directory let the rest of each file be checked as written.
  const f = files();
  const tlsDir = join(f.pki.dir, 'etc-tls');
  mkdirSync(tlsDir, { recursive: true });
  copyFileSync(f.cert, join(tlsDir, 'fullchain.pem'));
  copyFileSync(f.key, join(tlsDir, 'privkey.pem'));
  copyFileSync(f.ca, join(tlsDir, 'backend-ca.pem'));
  const confDir = fileURLToPath(new URL('../../conf/', import.meta.url));
  const examples = readdirSync(confDir).filter((name) => name.endsWith('.yaml')).sort();
  t.ok(examples.includes('ftps-edge.yaml') && examples.includes('ftps-client-side.yaml'), `the FTPS examples are there (${examples.join(', ')})`);
  const configs = new Map<string, ReturnType<typeof validateConfigText>>();
  for (const name of examples) {
    const text = readFileSync(join(confDir, name), 'utf8').replaceAll('/etc/ftp-nat-proxy/tls/', `${tlsDir}/`);
    try {
      const config = validateConfigText(text, name);
      t.same(config.warnings, [], `${name}: valid, no warnings`);
      configs.set(name, config);
    } catch (err) {
      t.fail(`${name}: ${(err as Error).message}`);
    }
  }
  const edge = configs.get('ftps-edge.yaml')?.listeners;
  t.match(edge?.map((l) => [l.tls?.mode, l.tls?.require, l.upstream.tls]), [['explicit', true, null], ['implicit', false, null]], 'ftps-edge: FTPS toward clients, plain toward vsftpd');
  const clientSide = configs.get('ftps-client-side.yaml')?.listeners[0];
  t.equal(clientSide?.tls, null, 'ftps-client-side: plain toward the clients');
  t.match(clientSide?.upstream.tls, { mode: 'explicit', caFile: join(tlsDir, 'backend-ca.pem'), servername: 'ftp.example.net', verify: true }, 'ftps-client-side: explicit FTPS toward the server');
});

function escape(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
