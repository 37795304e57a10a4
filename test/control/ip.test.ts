/**
 * Address helpers (protocol.md §2.4 normalization, §4.1 unroutable ranges).
 */
import t from 'tap';
import { familyOf, ipInCidr, isIp, isUnroutableIp, normalizeIp, parseCidr, parseIpLiteral, sameIp } from '../../src/control/ip.js';

t.test('normalizeIp', async (t) => {
  const table: [string, string][] = [
    ['127.0.0.1', '127.0.0.1'],
    ['::ffff:127.0.0.1', '127.0.0.1'], // Node on `::` reports IPv4 peers this way (§2.4)
    ['::FFFF:198.51.100.7', '198.51.100.7'],
    ['2001:0DB8:0000::0007', '2001:db8::7'],
    ['fe80::1%eth0', 'fe80::1'],
    ['::1', '::1'],
    ['::', '::'],
  ];
  for (const [input, expected] of table) t.equal(normalizeIp(input), expected, input);
  t.throws(() => normalizeIp('not an ip'), 'garbage throws');
});

t.test('familyOf', async (t) => {
  t.equal(familyOf('198.51.100.7'), 4);
  t.equal(familyOf('::ffff:198.51.100.7'), 4, 'mapped counts as IPv4');
  t.equal(familyOf('2001:db8::7'), 6);
  t.equal(familyOf('fe80::1%eth0'), 6, 'zone id accepted');
});

t.test('isIp', async (t) => {
  const table: [string, boolean][] = [
    ['198.51.100.7', true],
    ['2001:db8::7', true],
    ['::ffff:1.2.3.4', true],
    ['', false],
    ['example.com', false],
    ['1.2.3', true], // ipaddr.js accepts classful shorthands; config uses node:net isIP instead
  ];
  for (const [input, expected] of table) t.equal(isIp(input), expected, JSON.stringify(input));
});

t.test('parseIpLiteral (an address in a host field, RFC 7151 HOST)', async (t) => {
  const table: [string, string | null][] = [
    ['198.51.100.7', '198.51.100.7'],
    ['::1', '::1'],
    ['[::1]', '::1'],
    ['[2001:DB8:0::7]', '2001:db8::7'],
    ['::ffff:127.0.0.1', '127.0.0.1'],
    ['[::ffff:127.0.0.1]', '127.0.0.1'],
    ['[fe80::1%eth0]', 'fe80::1'],
    ['[127.0.0.1]', null], // brackets hold IPv6 only (RFC 3986 §3.2.2)
    ['127.1', null], // classful shorthands are names in a host field
    ['2130706433', null],
    ['0x7f.0.0.1', null],
    ['010.0.0.1', null],
    ['[::1', null],
    ['::1]', null],
    ['[]', null],
    ['', null],
    ['ftp.example.com', null],
  ];
  for (const [input, expected] of table) t.equal(parseIpLiteral(input), expected, JSON.stringify(input));
});

t.test('sameIp', async (t) => {
  const table: [string, string, boolean][] = [
    ['198.51.100.7', '198.51.100.7', true],
    ['198.51.100.7', '::ffff:198.51.100.7', true],
    ['2001:db8::7', '2001:0db8:0:0::7', true],
    ['fe80::1%eth0', 'fe80::1', true],
    ['198.51.100.7', '198.51.100.8', false],
    ['::1', '127.0.0.1', false],
    ['garbage', 'garbage', false],
    ['', '', false],
  ];
  for (const [a, b, expected] of table) t.equal(sameIp(a, b), expected, `${a} vs ${b}`);
});

t.test('isUnroutableIp (§4.1 NAT fix-up ranges)', async (t) => {
  const table: [string, boolean][] = [
    ['10.0.0.5', true],
    ['172.16.0.1', true],
    ['172.31.255.255', true],
    ['192.168.1.10', true],
    ['100.64.0.1', true], // RFC 6598 CGNAT
    ['169.254.169.254', true],
    ['127.0.0.1', true],
    ['0.0.0.0', true],
    ['::ffff:192.168.1.10', true],
    ['fe80::1', true],
    ['fc00::1', true],
    ['fd12:3456::1', true],
    ['::1', true],
    ['::', true],
    ['198.51.100.7', false], // RFC 5737 documentation ranges act as "internet" in the tests
    ['203.0.113.10', false],
    ['192.0.2.55', false],
    ['8.8.8.8', false],
    ['172.32.0.1', false],
    ['100.128.0.1', false],
    ['2001:db8::7', false],
    ['2606:4700::1', false],
  ];
  for (const [input, expected] of table) t.equal(isUnroutableIp(input), expected, input);
});

t.test('parseCidr / ipInCidr', async (t) => {
  const ten = parseCidr('10.0.0.0/8');
  t.equal(ten[1], 8);
  t.equal(ipInCidr('10.1.2.3', ten), true);
  t.equal(ipInCidr('::ffff:10.1.2.3', ten), true, 'mapped peer matches an IPv4 CIDR');
  t.equal(ipInCidr('11.0.0.1', ten), false);
  t.equal(ipInCidr('2001:db8::1', ten), false, 'family mismatch is no match (no throw)');
  const host = parseCidr('198.51.100.7');
  t.equal(host[1], 32, 'bare IPv4 is /32');
  t.equal(ipInCidr('198.51.100.7', host), true);
  t.equal(ipInCidr('198.51.100.8', host), false);
  const v6 = parseCidr('2001:db8::/32');
  t.equal(ipInCidr('2001:db8::7', v6), true);
  t.equal(ipInCidr('10.0.0.1', v6), false);
  t.equal(parseCidr('2001:db8::7')[1], 128, 'bare IPv6 is /128');
  for (const bad of ['10.0.0.0/33', '10.0.0.0/', 'x/8', '', '2001:db8::/129']) {
    t.throws(() => parseCidr(bad), `${JSON.stringify(bad)} throws`);
  }
});
