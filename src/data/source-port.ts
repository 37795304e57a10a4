/**
 * client.dataSourcePort below 1024 needs CAP_NET_BIND_SERVICE (or root, or a lowered
 * net.ipv4.ip_unprivileged_port_start). A listener checks once when it starts or is reloaded
 * and warns, instead of every PORT client meeting a 425 first; each failed connect still says
 * so too (dial.ts, FTPP_ERR_DATA_SOURCE_PORT).
 */
import { readFileSync } from 'node:fs';

/** Bit of CAP_NET_BIND_SERVICE in the capability masks (linux/capability.h). */
const CAP_NET_BIND_SERVICE = 10n;

/** Reads a /proc file; null when it cannot (not Linux, hidden by a sandbox). */
export type ProcReader = (path: string) => string | null;

function readProc(path: string): string | null {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return null;
  }
}

/**
 * Why this process cannot bind `port` as a source port, or null when it can or cannot tell
 * (no /proc: say nothing rather than warn wrongly).
 */
export function sourcePortBindProblem(port: number, read: ProcReader = readProc): string | null {
  const start = Number.parseInt(read('/proc/sys/net/ipv4/ip_unprivileged_port_start') ?? '1024', 10);
  if (port >= (Number.isNaN(start) ? 1024 : start)) return null;
  const status = read('/proc/self/status');
  const capEff = status ? /^CapEff:\s*([0-9a-f]+)\s*$/im.exec(status)?.[1] : undefined;
  if (capEff === undefined) return null;
  if ((BigInt(`0x${capEff}`) >> CAP_NET_BIND_SERVICE) & 1n) return null;
  return `client.dataSourcePort ${port} is below ${start} and the process lacks CAP_NET_BIND_SERVICE: active data connections to PORT/EPRT clients will fail with 425 (set AmbientCapabilities=CAP_NET_BIND_SERVICE in the systemd unit)`;
}
