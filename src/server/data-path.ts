/**
 * `client.dataPath: auto` (issue #14): the kernel data path where the host allows it, the relay
 * otherwise. What the host must have beyond what opening the nftables table proves (the addon,
 * libnftables, CAP_NET_ADMIN): IPv4 forwarding, since every kernel-carried data connection to a
 * server on another host is a DNATed packet the kernel forwards; with `ip_forward=0` it drops
 * them and the transfer hangs where the relay would have worked.
 */
import { readFileSync } from 'node:fs';
import type { Family } from '../control/ip.js';

const IP_FORWARD = '/proc/sys/net/ipv4/ip_forward';
const IPV6_FORWARDING = '/proc/sys/net/ipv6/conf/all/forwarding';

/** Null when the host forwards IPv4, else why the kernel path would not work here. */
export function kernelPathHostBlocker(read: (path: string) => string = (path) => readFileSync(path, 'utf8')): string | null {
  let value: string;
  try {
    value = read(IP_FORWARD).trim();
  } catch (err) {
    return `cannot read ${IP_FORWARD}: ${(err as Error).message}`;
  }
  return value === '1' ? null : `net.ipv4.ip_forward is ${value || 'empty'}: the kernel would drop the data connections it NATs to the server`;
}

/**
 * Asked before each kernel mapping (kernel-nft.ts kernelPathBlocker, not for loopback-only
 * transfers): null when the host forwards this family now, else why the relay carries it.
 * Read each time, so a sysctl changed after start counts; IPv6 forwarding is often off where
 * IPv4 forwarding is on, and `auto` only checked IPv4 at start.
 */
export function forwardingBlocker(family: Family, read: (path: string) => string = (path) => readFileSync(path, 'utf8')): string | null {
  const path = family === 4 ? IP_FORWARD : IPV6_FORWARDING;
  const name = family === 4 ? 'net.ipv4.ip_forward' : 'net.ipv6.conf.all.forwarding';
  let value: string;
  try {
    value = read(path).trim();
  } catch (err) {
    return `cannot read ${path}: ${(err as Error).message}`;
  }
  return value === '1' ? null : `${name} is ${value || 'empty'}: the kernel would drop the data connections it NATs to the other side`;
}
