/**
 * Which address goes into 227: advertiseFor (first matching CIDR), a fixed IP, auto (the
 * address the client dialled), or a hostname re-resolved when its TTL runs out, keeping the
 * last good address while DNS fails. The resolver and the clock are injected.
 */
import t from 'tap';
import { Advertiser, type HostnameResolver } from '../../src/advertise.js';
import { validateConfigText } from '../../src/config/load.js';
import type { ClientSideConfig } from '../../src/config/schema.js';

function clientConfig(client: string): ClientSideConfig {
  const yaml = ['listeners:', '  - listen: "127.0.0.1:0"', '    upstream: { host: 127.0.0.1 }', '    client:', ...client.split('\n').map((l) => `      ${l}`)].join('\n');
  return validateConfigText(yaml).listeners[0]!.client;
}

class FakeResolver implements HostnameResolver {
  calls = 0;
  answers: Array<Array<{ address: string; ttl: number }> | Error> = [];
  async resolve4(): Promise<Array<{ address: string; ttl: number }>> {
    this.calls += 1;
    const next = this.answers.shift();
    if (!next) throw new Error('no answer scripted');
    if (next instanceof Error) throw next;
    return next;
  }
}

t.test('auto: the IPv4 the client dialled; none for IPv6', async (t) => {
  const a = new Advertiser(clientConfig('advertise: auto'));
  t.equal(await a.addressFor('198.51.100.7', '203.0.113.10'), '203.0.113.10');
  t.equal(await a.addressFor('2001:db8::7', '2001:db8::10'), null, 'a 227 cannot carry IPv6');
});

t.test('fixed IP, and advertiseFor: first matching CIDR wins', async (t) => {
  const a = new Advertiser(clientConfig([
    'advertise: 203.0.113.10',
    'advertiseFor:',
    '  - { from: 10.20.0.0/24, address: 10.20.0.1 }',
    '  - { from: 10.0.0.0/8, address: 10.0.0.1 }',
  ].join('\n')));
  t.equal(await a.addressFor('10.20.0.7', '10.20.0.1'), '10.20.0.1', 'first rule');
  t.equal(await a.addressFor('10.9.9.9', '10.20.0.1'), '10.0.0.1', 'second rule');
  t.equal(await a.addressFor('198.51.100.7', '10.20.0.1'), '203.0.113.10', 'everyone else: advertise');
  t.equal(await a.addressFor('2001:db8::7', '10.20.0.1'), '203.0.113.10', 'an IPv6 client matches no IPv4 rule');
});

t.test('hostname: cached for its TTL, re-resolved after, last good kept when DNS fails', async (t) => {
  let now = 1_000_000;
  const resolver = new FakeResolver();
  const a = new Advertiser(clientConfig('advertise: ftp.example.net'), resolver, () => now);
  resolver.answers.push([{ address: '203.0.113.10', ttl: 60 }]);
  t.equal(await a.addressFor('198.51.100.7', '10.0.0.1'), '203.0.113.10');
  t.equal(await a.addressFor('198.51.100.8', '10.0.0.1'), '203.0.113.10');
  t.equal(resolver.calls, 1, 'one lookup within the TTL');
  now += 61_000;
  resolver.answers.push([{ address: '203.0.113.11', ttl: 1 }]);
  t.equal(await a.addressFor('198.51.100.7', '10.0.0.1'), '203.0.113.11', 'new address after the TTL');
  t.equal(resolver.calls, 2);
  now += 2_000;
  t.equal(await a.addressFor('198.51.100.7', '10.0.0.1'), '203.0.113.11', 'a TTL below 5 s is held for 5 s');
  t.equal(resolver.calls, 2);
  now += 4_000;
  resolver.answers.push(new Error('SERVFAIL'));
  t.equal(await a.addressFor('198.51.100.7', '10.0.0.1'), '203.0.113.11', 'DNS down: the last good address is kept');
  t.match(a.lastError?.message ?? '', /SERVFAIL/, 'the error is kept for logs');
});

t.test('hostname never resolved: null (the session answers 425)', async (t) => {
  const resolver = new FakeResolver();
  resolver.answers.push(new Error('NXDOMAIN'));
  const a = new Advertiser(clientConfig('advertise: nowhere.example.net'), resolver);
  t.equal(await a.addressFor('198.51.100.7', '10.0.0.1'), null);
  resolver.answers.push([]);
  t.equal(await a.addressFor('198.51.100.7', '10.0.0.1'), null, 'an empty answer is no address either');
});

t.test('concurrent lookups share one query', async (t) => {
  const resolver = new FakeResolver();
  resolver.answers.push([{ address: '203.0.113.10', ttl: 60 }]);
  const a = new Advertiser(clientConfig('advertise: ftp.example.net'), resolver);
  const got = await Promise.all([a.addressFor('198.51.100.7', ''), a.addressFor('198.51.100.8', ''), a.addressFor('198.51.100.9', '')]);
  t.same(got, ['203.0.113.10', '203.0.113.10', '203.0.113.10']);
  t.equal(resolver.calls, 1);
});

