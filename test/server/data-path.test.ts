/** `dataPath: auto`'s host check (server/data-path.ts): IPv4 forwarding on, or why not. */
import t from 'tap';
import { forwardingBlocker, kernelPathHostBlocker } from '../../src/server/data-path.js';

t.test('ip_forward 1: nothing blocks; 0, empty or unreadable: the reason', async (t) => {
  t.equal(kernelPathHostBlocker(() => '1\n'), null);
  t.match(kernelPathHostBlocker(() => '0\n'), /ip_forward is 0/);
  t.match(kernelPathHostBlocker(() => ''), /ip_forward is empty/);
  t.match(kernelPathHostBlocker(() => {
    throw new Error('ENOENT: no such file');
  }), /cannot read \/proc\/sys\/net\/ipv4\/ip_forward: ENOENT/);
});

t.test('forwardingBlocker: each family\'s own sysctl, read each time', async (t) => {
  const values: Record<string, string> = { '/proc/sys/net/ipv4/ip_forward': '1\n', '/proc/sys/net/ipv6/conf/all/forwarding': '0\n' };
  const read = (path: string): string => {
    const value = values[path];
    if (value === undefined) throw new Error(`ENOENT: ${path}`);
    return value;
  };
  t.equal(forwardingBlocker(4, read), null, 'IPv4 forwarding on');
  t.match(forwardingBlocker(6, read), /net\.ipv6\.conf\.all\.forwarding is 0/, 'IPv6 forwarding off');
  values['/proc/sys/net/ipv6/conf/all/forwarding'] = '1\n';
  t.equal(forwardingBlocker(6, read), null, 'turned on after start: seen at once');
  delete values['/proc/sys/net/ipv4/ip_forward'];
  t.match(forwardingBlocker(4, read), /cannot read \/proc\/sys\/net\/ipv4\/ip_forward: ENOENT/);
});
