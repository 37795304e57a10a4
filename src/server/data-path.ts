/**
 * `client.dataPath: auto` (issue #14): the kernel data path where the host allows it, the relay
 * otherwise. What the host must have beyond what opening the nftables table proves (the addon,
 * libnftables, CAP_NET_ADMIN): IPv4 forwarding, since every kernel-carried data connection to a
 * server on another host is a DNATed packet the kernel forwards; with `ip_forward=0` it drops
 * them and the transfer hangs where the relay would have worked.
 */
import { readFileSync } from 'node:fs';

const IP_FORWARD = '/proc/sys/net/ipv4/ip_forward';

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
