/**
 * The forward/transparent destination policy (issue #13, upstream-selection.md A5): deny
 * first, every resolved address checked, names matched only exactly or as `*.suffix`, port
 * lists, and the implicit refusals (loopback, own addresses, 0/8, link-local, multicast)
 * that only an allow CIDR inside their range unlocks.
 */
import t from 'tap';
import {
  DEFAULT_FTP_PORT,
  DEFAULT_UPSTREAM_PORTS,
  decideUpstream,
  parsePortList,
  parseUpstreamRule,
  portInRanges,
  ruleMatchesName,
  specialRangeOf,
  type UpstreamDecision,
  type UpstreamDestination,
  type UpstreamPolicy,
  type UpstreamRefusal,
  type UpstreamRule,
} from '../../src/control/upstream-policy.js';

function rule(text: string): UpstreamRule {
  const parsed = parseUpstreamRule(text);
  if (!parsed.ok) throw new Error(`${text}: ${parsed.reason}`);
  return parsed.rule;
}

function policy(allow: string[], deny: string[] = [], ports = DEFAULT_UPSTREAM_PORTS): UpstreamPolicy {
  const list = parsePortList(ports);
  if (!list) throw new Error(`ports ${ports}`);
  return { allow: allow.map(rule), deny: deny.map(rule), ports: list };
}

const ip = (address: string): UpstreamDestination => ({ kind: 'ip', address });
const named = (name: string, ...addresses: string[]): UpstreamDestination => ({ kind: 'name', name, addresses });

/** Only the outcome: the address and port on success, the code on refusal. */
function outcome(decision: UpstreamDecision): string {
  return decision.ok ? `ok ${decision.address} ${decision.port}` : decision.code;
}

const OWN = ['192.0.2.1', '10.0.0.1', '127.0.0.1', '::1', 'fe80::1%eth0', '2001:db8:ffff::1'];
const ISSUE_FORWARD = policy(['203.0.113.0/24', 'ftp.partner.example', '*.partner.example']);
const ISSUE_TRANSPARENT = policy(['0.0.0.0/0'], ['10.0.0.0/8']);

t.test('parseUpstreamRule table', async (t) => {
  const table: [text: string, expected: string][] = [
    ['203.0.113.0/24', 'cidr 203.0.113.0/24'],
    ['203.0.113.7', 'cidr 203.0.113.7/32'],
    ['0.0.0.0/0', 'cidr 0.0.0.0/0'],
    ['2001:db8::/32', 'cidr 2001:db8::/32'],
    ['2001:DB8::1', 'cidr 2001:db8::1/128'],
    ['::/0', 'cidr ::/0'],
    ['::ffff:10.0.0.0/104', 'cidr 10.0.0.0/8'],
    ['::ffff:127.0.0.1', 'cidr 127.0.0.1/32'],
    ['::ffff:0:0/96', 'cidr 0.0.0.0/0'],
    ['ftp.partner.example', 'name ftp.partner.example'],
    ['FTP.Partner.Example.', 'name ftp.partner.example'],
    ['localhost', 'name localhost'],
    ['*.partner.example', 'suffix partner.example'],
    ['*.Partner.EXAMPLE.', 'suffix partner.example'],
    ['*.example', 'suffix example'],
    // errors
    ['203.0.113.0/33', 'error'],
    ['2001:db8::/129', 'error'],
    ['203.0.113.0/', 'error'],
    ['203.0.113.0/024', 'error'],
    ['203.0.113.0/-1', 'error'],
    ['10.1/16', 'error'],
    ['010.0.0.0/8', 'error'],
    ['fe80::1%eth0', 'error'],
    ['203.0.113.300', 'error'],
    ['*', 'error'],
    ['*.', 'error'],
    ['*.*.example', 'error'],
    ['ftp*.example', 'error'],
    ['*partner.example', 'error'],
    ['ftp.*.example', 'error'],
    ['partner.example/24', 'error'],
    ['ftp partner', 'error'],
    ['', 'error'],
    ['0x7f000001', 'error'],
  ];
  for (const [text, expected] of table) {
    const parsed = parseUpstreamRule(text);
    let got = 'error';
    if (parsed.ok) {
      const r = parsed.rule;
      got = r.kind === 'cidr' ? `cidr ${r.cidr[0].toString()}/${r.cidr[1]}` : r.kind === 'name' ? `name ${r.name}` : `suffix ${r.suffix}`;
      t.equal(r.text, text, `${JSON.stringify(text)} keeps its text`);
    } else {
      t.ok(parsed.reason.length > 0, `${JSON.stringify(text)} has a reason`);
    }
    t.equal(got, expected, JSON.stringify(text));
  }
});

t.test('parsePortList table', async (t) => {
  const table: [text: string, expected: [number, number][] | null][] = [
    ['21', [[21, 21]]],
    ['21,990,2100-2199', [[21, 21], [990, 990], [2100, 2199]]],
    [' 21 , 990 , 2100 - 2199 ', [[21, 21], [990, 990], [2100, 2199]]],
    ['1-65535', [[1, 65535]]],
    ['021', [[21, 21]]],
    ['0', null],
    ['65536', null],
    ['2199-2100', null],
    ['', null],
    ['21,', null],
    [',21', null],
    ['21,,990', null],
    ['21 990', null],
    ['21-', null],
    ['-21', null],
    ['21-22-23', null],
    ['ftp', null],
    ['0x15', null],
  ];
  for (const [text, expected] of table) {
    const got = parsePortList(text);
    t.same(got === null ? null : got.map((r) => [r.first, r.last]), expected, JSON.stringify(text));
  }
  t.equal(DEFAULT_UPSTREAM_PORTS, '21');
  t.equal(DEFAULT_FTP_PORT, 21);
});

t.test('portInRanges', async (t) => {
  const ports = parsePortList('21,990,2100-2199')!;
  for (const [port, expected] of [[21, true], [20, false], [22, false], [990, true], [2100, true], [2150, true], [2199, true], [2200, false], [2099, false]] as const) {
    t.equal(portInRanges(ports, port), expected, String(port));
  }
});

t.test('names match exactly or as *.suffix, never by substring', async (t) => {
  const exact = rule('ftp.partner.example');
  const suffix = rule('*.partner.example');
  const table: [name: string, exactMatch: boolean, suffixMatch: boolean][] = [
    ['ftp.partner.example', true, true],
    ['a.b.partner.example', false, true],
    ['partner.example', false, false], // *.suffix is subdomains only: list the apex by its name
    ['ftp.partner.example.evil.tld', false, false], // mod_proxy #179
    ['evilpartner.example', false, false],
    ['ftp.partner.example2', false, false],
    ['xftp.partner.example', false, true],
    ['ftp.partner.exampl', false, false],
    ['example', false, false],
  ];
  for (const [name, e, s] of table) {
    t.equal(ruleMatchesName(exact, name), e, `exact ${name}`);
    t.equal(ruleMatchesName(suffix, name), s, `suffix ${name}`);
  }
  t.equal(ruleMatchesName(rule('203.0.113.0/24'), '203.0.113.0'), false, 'a CIDR never matches a name');
});

t.test('specialRangeOf', async (t) => {
  const table: [address: string, label: string | null][] = [
    ['0.0.0.0', '"this network" (0.0.0.0/8)'],
    ['0.1.2.3', '"this network" (0.0.0.0/8)'],
    ['127.0.0.1', 'loopback'],
    ['127.255.255.254', 'loopback'],
    ['169.254.169.254', 'link-local'],
    ['224.0.0.1', 'multicast'],
    ['239.255.255.255', 'multicast'],
    ['240.0.0.1', 'reserved (240.0.0.0/4, broadcast)'],
    ['255.255.255.255', 'reserved (240.0.0.0/4, broadcast)'],
    ['::', 'unspecified'],
    ['::1', 'loopback'],
    ['fe80::1', 'link-local'],
    ['febf::1', 'link-local'],
    ['ff02::1', 'multicast'],
    ['10.0.0.1', null],
    ['192.168.1.1', null],
    ['100.64.0.1', null],
    ['fd00::1', null],
    ['203.0.113.7', null],
    ['2001:db8::1', null],
    ['fec0::1', null],
  ];
  for (const [address, label] of table) t.equal(specialRangeOf(address)?.label ?? null, label, address);
});

t.test('decideUpstream: the issue example, forward mode', async (t) => {
  const table: [name: string, destination: UpstreamDestination, port: number | null, expected: string][] = [
    ['allowed name', named('ftp.partner.example', '198.51.100.7'), null, 'ok 198.51.100.7 21'],
    ['allowed name, any case and trailing dot already normalized by the parser', named('ftp.partner.example', '198.51.100.7'), 21, 'ok 198.51.100.7 21'],
    ['subdomain by *.suffix', named('eu.ftp.partner.example', '198.51.100.8'), null, 'ok 198.51.100.8 21'],
    ['apex is not *.suffix', named('partner.example', '198.51.100.9'), null, 'not-allowed'],
    ['substring is no match', named('ftp.partner.example.evil.tld', '198.51.100.7'), null, 'not-allowed'],
    ['prefix is no match', named('evilpartner.example', '198.51.100.7'), null, 'not-allowed'],
    ['address in the allowed CIDR', ip('203.0.113.10'), null, 'ok 203.0.113.10 21'],
    ['address outside', ip('198.51.100.7'), null, 'not-allowed'],
    ['unlisted name, every address in the allowed CIDR', named('ftp.other.example', '203.0.113.5', '203.0.113.6'), null, 'ok 203.0.113.5 21'],
    ['unlisted name, one address outside the CIDR', named('ftp.other.example', '203.0.113.5', '198.51.100.1'), null, 'not-allowed'],
    ['port not allowed', named('ftp.partner.example', '198.51.100.7'), 2121, 'port-not-allowed'],
    ['port 21 given', ip('203.0.113.10'), 21, 'ok 203.0.113.10 21'],
    ['unresolved', named('ftp.partner.example'), null, 'unresolved'],
    ['IPv4-mapped destination is its IPv4 address', ip('::ffff:203.0.113.10'), null, 'ok 203.0.113.10 21'],
    ['resolver garbage', named('ftp.partner.example', 'not-an-ip'), null, 'bad-address'],
    ['resolver shorthand is garbage too', named('ftp.partner.example', '127.1'), null, 'bad-address'],
  ];
  for (const [name, destination, port, expected] of table) t.equal(outcome(decideUpstream(ISSUE_FORWARD, destination, port, OWN)), expected, name);
});

t.test('decideUpstream: every resolved address must pass (a name resolving into a denied range)', async (t) => {
  const p = policy(['*.partner.example', '0.0.0.0/0', '::/0'], ['10.0.0.0/8', 'fc00::/7', 'bad.partner.example']);
  const table: [name: string, destination: UpstreamDestination, expected: string][] = [
    ['all addresses fine: the first is used', named('ftp.partner.example', '198.51.100.7', '198.51.100.8'), 'ok 198.51.100.7 21'],
    ['resolves into a denied range', named('ftp.partner.example', '10.1.2.3'), 'denied'],
    ['one of several addresses denied', named('ftp.partner.example', '198.51.100.7', '10.1.2.3'), 'denied'],
    ['the denied one listed last still refuses', named('ftp.partner.example', '198.51.100.7', '198.51.100.8', '10.9.9.9'), 'denied'],
    ['IPv6 address in a denied range', named('ftp.partner.example', '2001:db8::7', 'fd12::1'), 'denied'],
    ['mapped address in a denied IPv4 range', named('ftp.partner.example', '::ffff:10.0.0.5'), 'denied'],
    ['denied name beats the allowed *.suffix', named('bad.partner.example', '198.51.100.7'), 'denied'],
    ['denied name, deeper name still allowed (exact deny)', named('x.bad.partner.example', '198.51.100.7'), 'ok 198.51.100.7 21'],
    ['deny beats an allowed IP', ip('10.0.0.9'), 'denied'],
    ['IPv6 first address is used as is', named('ftp.partner.example', '2001:DB8::7', '198.51.100.7'), 'ok 2001:db8::7 21'],
  ];
  for (const [name, destination, expected] of table) t.equal(outcome(decideUpstream(p, destination, null, OWN)), expected, name);
});

t.test('decideUpstream: deny is checked first, an exact deny host beats an exact allow host', async (t) => {
  const p = policy(['203.0.113.7', 'ftp.partner.example'], ['203.0.113.7/32', '*.partner.example']);
  t.equal(outcome(decideUpstream(p, ip('203.0.113.7'), null, [])), 'denied');
  t.equal(outcome(decideUpstream(p, named('ftp.partner.example', '198.51.100.7'), null, [])), 'denied', 'deny *.suffix beats allow name');
  t.equal(outcome(decideUpstream(p, ip('203.0.113.7'), 2121, [])), 'denied', 'deny reported before the port');
});

t.test('decideUpstream: an empty allow forwards nowhere', async (t) => {
  const p = policy([]);
  for (const destination of [ip('203.0.113.7'), ip('2001:db8::1'), named('ftp.partner.example', '198.51.100.7'), ip('127.0.0.1')]) {
    const d = decideUpstream(p, destination, null, OWN);
    t.equal(outcome(d), 'not-allowed', JSON.stringify(destination));
  }
  t.equal(outcome(decideUpstream(policy([], ['0.0.0.0/0']), ip('203.0.113.7'), null, [])), 'denied', 'deny-only: still refused, deny first');
});

t.test('decideUpstream: ports lists and ranges', async (t) => {
  const p = policy(['0.0.0.0/0'], [], '21,990,2100-2199');
  const table: [port: number | null, expected: string][] = [
    [null, 'ok 203.0.113.7 21'],
    [21, 'ok 203.0.113.7 21'],
    [990, 'ok 203.0.113.7 990'],
    [2100, 'ok 203.0.113.7 2100'],
    [2199, 'ok 203.0.113.7 2199'],
    [2200, 'port-not-allowed'],
    [22, 'port-not-allowed'],
    [20, 'port-not-allowed'],
  ];
  for (const [port, expected] of table) t.equal(outcome(decideUpstream(p, ip('203.0.113.7'), port, [])), expected, String(port));
  t.equal(outcome(decideUpstream(policy(['0.0.0.0/0'], [], '2121'), ip('203.0.113.7'), null, [])), 'port-not-allowed', 'no port given means 21, which this list leaves out');
});

t.test('decideUpstream: implicit refusals, and only a CIDR inside the range unlocks them', async (t) => {
  const wide = policy(['0.0.0.0/0', '::/0', '*.partner.example', 'localhost']);
  const table: [name: string, p: UpstreamPolicy, destination: UpstreamDestination, expected: string][] = [
    // refused under the widest allow
    ['loopback', wide, ip('127.0.0.1'), 'special-address'],
    ['other loopback address', wide, ip('127.0.0.53'), 'special-address'],
    ['IPv6 loopback', wide, ip('::1'), 'special-address'],
    ['mapped loopback', wide, ip('::ffff:127.0.0.1'), 'special-address'],
    ['0.0.0.0', wide, ip('0.0.0.0'), 'special-address'],
    ['0/8', wide, ip('0.1.2.3'), 'special-address'],
    ['IPv6 unspecified', wide, ip('::'), 'special-address'],
    ['link-local (metadata service)', wide, ip('169.254.169.254'), 'special-address'],
    ['IPv6 link-local', wide, ip('fe80::1234'), 'special-address'],
    ['multicast', wide, ip('224.0.0.251'), 'special-address'],
    ['IPv6 multicast', wide, ip('ff02::1'), 'special-address'],
    ['broadcast', wide, ip('255.255.255.255'), 'special-address'],
    ['own address', wide, ip('192.0.2.1'), 'own-address'],
    ['own private address', wide, ip('10.0.0.1'), 'own-address'],
    ['own IPv6 address', wide, ip('2001:db8:ffff::1'), 'own-address'],
    ['own link-local address (listed with a zone): link-local first', wide, ip('fe80::1'), 'special-address'],
    ['own link-local address (listed with a zone) once link-local is unlocked', policy(['fe80::/10']), ip('fe80::1'), 'own-address'],
    ['own address, mapped', wide, ip('::ffff:192.0.2.1'), 'own-address'],
    // a name match does not unlock them
    ['allowed name resolving to loopback', wide, named('localhost', '127.0.0.1'), 'special-address'],
    ['allowed *.suffix resolving to link-local', wide, named('meta.partner.example', '169.254.169.254'), 'special-address'],
    ['allowed *.suffix resolving to the proxy', wide, named('me.partner.example', '192.0.2.1'), 'own-address'],
    ['one good, one loopback address', wide, named('x.partner.example', '198.51.100.7', '127.0.0.1'), 'special-address'],
    // an explicit CIDR inside the range unlocks
    ['127.0.0.0/8 unlocks loopback', policy(['127.0.0.0/8']), ip('127.0.0.53'), 'ok 127.0.0.53 21'],
    ['127.0.0.53 unlocks exactly that', policy(['127.0.0.53']), ip('127.0.0.53'), 'ok 127.0.0.53 21'],
    ['127.0.0.53 does not unlock another loopback', policy(['127.0.0.53', '0.0.0.0/0']), ip('127.0.0.54'), 'special-address'],
    ['0.0.0.0/1 (wider than 127/8) does not unlock', policy(['0.0.0.0/1']), ip('127.0.0.1'), 'special-address'],
    ['::1 unlocks IPv6 loopback', policy(['::1']), ip('::1'), 'ok ::1 21'],
    ['mapped CIDR unlocks IPv4 loopback', policy(['::ffff:127.0.0.0/104']), ip('127.0.0.2'), 'ok 127.0.0.2 21'],
    ['169.254.0.0/16 unlocks link-local', policy(['169.254.0.0/16']), ip('169.254.1.1'), 'ok 169.254.1.1 21'],
    ['fe80::/10 unlocks IPv6 link-local', policy(['fe80::/10']), ip('fe80::99'), 'ok fe80::99 21'],
    ['fe80::/9 is wider than link-local', policy(['fe80::/9']), ip('fe80::99'), 'special-address'],
    ['239.1.1.1 unlocks that multicast address', policy(['239.1.1.1/32']), ip('239.1.1.1'), 'ok 239.1.1.1 21'],
    ['0.0.0.0/8 unlocks this-network', policy(['0.0.0.0/8']), ip('0.0.0.7'), 'ok 0.0.0.7 21'],
    ['a name plus an unlocking CIDR', policy(['localhost', '127.0.0.1']), named('localhost', '127.0.0.1'), 'ok 127.0.0.1 21'],
    ['own address unlocked by exactly it', policy(['192.0.2.1']), ip('192.0.2.1'), 'ok 192.0.2.1 21'],
    ['own address not unlocked by its /24', policy(['192.0.2.0/24']), ip('192.0.2.1'), 'own-address'],
    ['own loopback needs the /32: 127/8 is not enough', policy(['127.0.0.0/8']), ip('127.0.0.1'), 'own-address'],
    ['own loopback unlocked by 127.0.0.1', policy(['127.0.0.1']), ip('127.0.0.1'), 'ok 127.0.0.1 21'],
    ['deny still beats an unlock', policy(['127.0.0.1'], ['127.0.0.0/8']), ip('127.0.0.1'), 'denied'],
    // private ranges are not implicit refusals (deny them where needed)
    ['private address under 0.0.0.0/0', wide, ip('10.20.30.40'), 'ok 10.20.30.40 21'],
    ['ULA under ::/0', wide, ip('fd00::5'), 'ok fd00::5 21'],
  ];
  for (const [name, p, destination, expected] of table) t.equal(outcome(decideUpstream(p, destination, null, OWN)), expected, name);
});

t.test('decideUpstream: the issue example, transparent mode', async (t) => {
  const table: [name: string, destination: UpstreamDestination, port: number, expected: string][] = [
    ['public server', ip('198.51.100.7'), 21, 'ok 198.51.100.7 21'],
    ['denied LAN range', ip('10.1.1.1'), 21, 'denied'],
    ['IPv6 not in allow', ip('2001:db8::1'), 21, 'not-allowed'],
    ['redirected to the proxy itself: a loop', ip('192.0.2.1'), 21, 'own-address'],
    ['loopback under 0.0.0.0/0', ip('127.0.0.1'), 21, 'special-address'],
    ['port other than 21', ip('198.51.100.7'), 2121, 'port-not-allowed'],
  ];
  for (const [name, destination, port, expected] of table) t.equal(outcome(decideUpstream(ISSUE_TRANSPARENT, destination, port, OWN)), expected, name);
});

t.test('decideUpstream: refusal reasons name the destination, codes are stable', async (t) => {
  const expectations: [UpstreamDecision, UpstreamRefusal, RegExp][] = [
    [decideUpstream(ISSUE_TRANSPARENT, ip('10.1.1.1'), 21, OWN), 'denied', /^10\.1\.1\.1 is in a denied range$/],
    [decideUpstream(ISSUE_FORWARD, named('ftp.other.example', '203.0.113.1', '198.51.100.1'), 21, OWN), 'not-allowed', /^ftp\.other\.example \(198\.51\.100\.1\) is not allowed$/],
    [decideUpstream(policy(['*.partner.example'], ['10.0.0.0/8']), named('x.partner.example', '10.1.1.1'), 21, OWN), 'denied', /^x\.partner\.example \(10\.1\.1\.1\) is in a denied range$/],
    [decideUpstream(ISSUE_FORWARD, ip('203.0.113.10'), 2121, OWN), 'port-not-allowed', /^203\.0\.113\.10: port 2121 is not allowed$/],
    [decideUpstream(ISSUE_TRANSPARENT, ip('127.0.0.1'), 21, OWN), 'special-address', /^127\.0\.0\.1 is loopback$/],
    [decideUpstream(ISSUE_TRANSPARENT, ip('192.0.2.1'), 21, OWN), 'own-address', /^192\.0\.2\.1 is an address of this proxy$/],
    [decideUpstream(ISSUE_FORWARD, named('ftp.partner.example'), 21, OWN), 'unresolved', /^ftp\.partner\.example does not resolve to any address$/],
    [decideUpstream(policy([]), ip('203.0.113.7'), 21, OWN), 'not-allowed', /^203\.0\.113\.7: no destination is allowed$/],
  ];
  for (const [decision, code, reason] of expectations) {
    if (decision.ok) {
      t.fail(`expected ${code}`);
      continue;
    }
    t.equal(decision.code, code);
    t.match(decision.reason, reason, code);
    t.notOk(/[\r\n]/.test(decision.reason), 'single line');
  }
});
