/** `dataPath: auto`'s host check (server/data-path.ts): IPv4 forwarding on, or why not. */
import t from 'tap';
import { kernelPathHostBlocker } from '../../src/server/data-path.js';

t.test('ip_forward 1: nothing blocks; 0, empty or unreadable: the reason', async (t) => {
  t.equal(kernelPathHostBlocker(() => '1\n'), null);
  t.match(kernelPathHostBlocker(() => '0\n'), /ip_forward is 0/);
  t.match(kernelPathHostBlocker(() => ''), /ip_forward is empty/);
  t.match(kernelPathHostBlocker(() => {
    throw new Error('ENOENT: no such file');
  }), /cannot read \/proc\/sys\/net\/ipv4\/ip_forward: ENOENT/);
});
