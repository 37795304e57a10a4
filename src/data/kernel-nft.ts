/**
 * The kernel data path's nft(8) side, pure (table-tested): the table and its maps, counter and
 * cut sets, the scripts that add, count, cut and remove one transfer's mapping, the parser of
 * `list table` output, and whether a data connection is one the kernel can carry at all.
 * kernel-forward.ts runs these through libnftables; why the table looks like this is told there.
 */
import { familyOf, isLoopbackIp } from '../control/ip.js';

/** One transfer's mapping. All addresses IPv4 (kernelPathBlocker says so first). */
export interface ForwardMapping {
  /** Source address of the client's data connection: the control connection's peer. */
  readonly clientIp: string;
  /** The proxy's own address the client's packets arrive at: the control connection's local address. */
  readonly proxyIp: string;
  /** The leased port the 227/229 advertises. */
  readonly proxyPort: number;
  readonly serverIp: string;
  readonly serverPort: number;
  /** Source address the server sees: the proxy's address on its control connection to the server. */
  readonly snatIp: string;
}

export const TABLE_PREFIX = 'ftpnp_';

export function tableName(pid: number): string {
  return `${TABLE_PREFIX}${pid}`;
}

/**
 * The table, created in one transaction. A table left by an earlier process with the same
 * PID (a crash, then PID reuse) is replaced: "add" then "delete" then create, so the script
 * never fails on a missing table. Priorities: dstnat (-100) and srcnat (100), the standard
 * NAT hooks; a map miss leaves the packet alone, so the rules touch nothing but our mappings.
 */
export function tableScript(table: string): string {
  return [
    `add table ip ${table}`,
    `delete table ip ${table}`,
    `table ip ${table} {`,
    '  map dnat_to { type ipv4_addr . ipv4_addr . inet_service : ipv4_addr . inet_service; flags timeout; }',
    '  map snat_to { type ipv4_addr . ipv4_addr . inet_service : ipv4_addr; }',
    // Remote clients arrive through prerouting; clients on this host through output.
    '  chain prerouting { type nat hook prerouting priority dstnat; policy accept; dnat ip to ip saddr . ip daddr . tcp dport map @dnat_to; }',
    '  chain output { type nat hook output priority -100; policy accept; dnat ip to ip saddr . ip daddr . tcp dport map @dnat_to; }',
    '  chain postrouting { type nat hook postrouting priority srcnat; policy accept; ct status dnat snat ip to ip saddr . ip daddr . tcp dport map @snat_to; }',
    ...COUNTER_SETS.map((set) => `  set ${set} { type ${KEY_TYPE}; counter; }`),
    `  set ${CUT_SET} { type ${KEY_TYPE}; flags timeout; }`,
    // After NAT the packet's own addresses are the server's; the ORIGINAL tuple is the key.
    '  chain count {',
    // Not a RST: the reset this rule sends belongs to the connection too and passes the
    // output hook (a client or server on this host; and the reset itself) on its way.
    `    meta l4proto tcp tcp flags & rst == 0 ${CT_KEY} @${CUT_SET} reject with tcp reset`,
    `    meta l4proto tcp ct direction original ${CT_KEY} @to_server`,
    `    meta l4proto tcp ct direction reply ${CT_KEY} @to_client`,
    // @ih loads the first payload byte: no payload (ACK, SYN, zero-window probe), no match.
    `    meta l4proto tcp @ih,0,8 & 0x0 == 0x0 ${CT_KEY} @moving`,
    `    meta l4proto tcp tcp flags & (fin | rst) != 0 ${CT_KEY} @ends`,
    '  }',
    // Each packet once: remote client and server (forward); a client or server on this host
    // (output; input only from outside: a packet over lo was already seen in output).
    '  chain forward { type filter hook forward priority filter; policy accept; ct status dnat jump count; }',
    '  chain filter_output { type filter hook output priority filter; policy accept; ct status dnat jump count; }',
    '  chain filter_input { type filter hook input priority filter; policy accept; ct status dnat iif != "lo" jump count; }',
    '}',
  ].join('\n');
}

/** The sets with a counter per mapping (see the file comment). */
export const COUNTER_SETS = ['to_server', 'to_client', 'moving', 'ends'] as const;
export type CounterSet = (typeof COUNTER_SETS)[number];
export const CUT_SET = 'cut';
const KEY_TYPE = 'ipv4_addr . ipv4_addr . inet_service';
const CT_KEY = 'ct original ip saddr . ct original ip daddr . ct original proto-dst';

/**
 * How long a cut connection's key stays in `cut`: the reset can only answer a packet, and a
 * sender facing a zero window probes at most every 120 s (Linux TCP_RTO_MAX).
 */
export const CUT_HOLD_MS = 130_000;

/** IP bytes of one kernel-carried data connection, each way, headers included. */
export interface WireBytes {
  readonly toClient: number;
  readonly toServer: number;
}

/** One element's counter. */
export interface NftCounter {
  readonly packets: number;
  readonly bytes: number;
}

/** nft(8) time: whole milliseconds, at least one second (shorter would race the 227). */
export function nftTimeout(ms: number): string {
  return `${Math.max(1000, Math.ceil(ms))}ms`;
}

/**
 * The DNAT element with `create`, not `add`: `add` silently accepts an element that is already
 * there, and a key already mapped means a mapping we failed to remove; that transfer is relayed
 * instead. The SNAT element only when no other mapping holds it yet (`withSnat`).
 */
export function addMappingScript(table: string, m: ForwardMapping, timeoutMs: number, withSnat = true): string {
  return [
    ...(withSnat ? [`add element ip ${table} snat_to { ${snatKeyText(m)} : ${m.snatIp} }`] : []),
    `create element ip ${table} dnat_to { ${dnatKeyText(m)} timeout ${nftTimeout(timeoutMs)} : ${m.serverIp} . ${m.serverPort} }`,
    // `add`: the counters of a key we failed to delete go on; the transaction is what matters.
    ...COUNTER_SETS.map((set) => `add element ip ${table} ${set} { ${dnatKeyText(m)} }`),
  ].join('\n');
}

/** Delete one mapping's counter elements (the caller read them first). */
export function removeCountersScript(table: string, m: ForwardMapping): string {
  return COUNTER_SETS.map((set) => `delete element ip ${table} ${set} { ${dnatKeyText(m)} }`).join('\n');
}

/**
 * The idle cut: no new connection (DNAT element gone), and the next packet of the existing
 * one, either way, is answered with a TCP reset. The `cut` element expires by itself.
 */
export function cutScript(table: string, m: ForwardMapping, withSnat = true, holdMs: number = CUT_HOLD_MS): string {
  return [
    `add element ip ${table} ${CUT_SET} { ${dnatKeyText(m)} timeout ${nftTimeout(holdMs)} }`,
    ...removeMappingScripts(table, m, withSnat),
  ].join('\n');
}

/**
 * The script that reads every mapping's counters: one call per poll, whatever their number.
 * The whole table: nft 1.0.6 fails a script of several `list set` commands ("No such file or
 * directory" for the first set: each one's cache filter drops the others).
 */
export function listCountersScript(table: string): string {
  return `list table ip ${table}`;
}

/** Read one mapping's counters (`get element`, when the transfer ended between polls). */
export function getCountersScript(table: string, m: ForwardMapping): string {
  return COUNTER_SETS.map((set) => `get element ip ${table} ${set} { ${dnatKeyText(m)} }`).join('\n');
}

/** The key text of a mapping in the counter sets, as nft(8) prints it. */
export function counterKey(m: Pick<ForwardMapping, 'clientIp' | 'proxyIp' | 'proxyPort'>): string {
  return dnatKeyText(m);
}

/** One element with its counter: after `{` or `,` (or at a continuation line's start), up to `,` or `}`. */
const ELEMENT_COUNTER = /(?:^|[{,])\s*(\d{1,3}(?:\.\d{1,3}){3}) \. (\d{1,3}(?:\.\d{1,3}){3}) \. (\d{1,5}) counter packets (\d+) bytes (\d+)\s*(?=[,}])/g;

/**
 * The counters in `list set` / `get element` output (one or several sets, one table block
 * each): set name -> element key -> counter. Elements come one per line or several on one,
 * comma-separated; the set header may or may not repeat `counter`; an element without a
 * counter, or a set that is not ours, is skipped.
 */
export function parseCounters(output: string): Map<CounterSet, Map<string, NftCounter>> {
  const sets = new Map<CounterSet, Map<string, NftCounter>>();
  let current: Map<string, NftCounter> | null = null;
  for (const line of output.split('\n')) {
    const header = /^\s*set (\S+) \{/.exec(line);
    if (header) {
      const name = header[1] as CounterSet;
      current = (COUNTER_SETS as readonly string[]).includes(name) ? (sets.get(name) ?? new Map<string, NftCounter>()) : null;
      if (current) sets.set(name, current);
      continue;
    }
    if (!current) continue;
    for (const match of line.matchAll(ELEMENT_COUNTER)) {
      current.set(`${match[1]} . ${match[2]} . ${match[3]}`, { packets: Number(match[4]), bytes: Number(match[5]) });
    }
  }
  return sets;
}

/** One mapping's counters out of a parsed listing (zero when its element is not there). */
export function countersOf(sets: Map<CounterSet, Map<string, NftCounter>>, key: string): Record<CounterSet, NftCounter> {
  const zero: NftCounter = { packets: 0, bytes: 0 };
  return {
    to_server: sets.get('to_server')?.get(key) ?? zero,
    to_client: sets.get('to_client')?.get(key) ?? zero,
    moving: sets.get('moving')?.get(key) ?? zero,
    ends: sets.get('ends')?.get(key) ?? zero,
  };
}

/**
 * One command per element, so that a DNAT element that already expired cannot stop the SNAT
 * element's removal. The SNAT element only when this was its last holder (`withSnat`).
 */
export function removeMappingScripts(table: string, m: ForwardMapping, withSnat = true): string[] {
  return [
    `delete element ip ${table} dnat_to { ${dnatKeyText(m)} }`,
    ...(withSnat ? [`delete element ip ${table} snat_to { ${snatKeyText(m)} }`] : []),
  ];
}

export function dnatKeyText(m: Pick<ForwardMapping, 'clientIp' | 'proxyIp' | 'proxyPort'>): string {
  return `${m.clientIp} . ${m.proxyIp} . ${m.proxyPort}`;
}

export function snatKeyText(m: ForwardMapping): string {
  return `${m.clientIp} . ${m.serverIp} . ${m.serverPort}`;
}

/**
 * Tables of ours (from `list tables`) whose process is gone: a proxy killed with SIGKILL
 * cannot delete its table, and its mappings only expire one by one.
 */
export function staleTables(listing: string, isAlive: (pid: number) => boolean, ownPid: number): string[] {
  const stale: string[] = [];
  for (const line of listing.split('\n')) {
    const match = /^table ip (ftpnp_(\d+))\s*$/.exec(line.trim());
    if (!match) continue;
    const pid = Number(match[2]);
    if (pid !== ownPid && !isAlive(pid)) stale.push(match[1]!);
  }
  return stale;
}

/** What the session knows when it decides how to carry a passive data connection. */
export interface KernelPathFacts {
  readonly clientIp: string;
  readonly proxyIp: string;
  readonly serverIp: string;
  readonly snatIp: string;
  /** The listener reads PROXY headers: the data connection's source is then a load balancer. */
  readonly proxyProtocol: boolean;
  /** Either leg's data is TLS (PROT P): the proxy must decrypt and re-encrypt it (RFC 4217). */
  readonly tls?: boolean;
}

/** Null when the kernel can carry this data connection, else why not (the relay does). */
export function kernelPathBlocker(f: KernelPathFacts): string | null {
  if (f.proxyProtocol) return 'PROXY protocol: data connections come from the load balancer';
  if (f.tls) return 'TLS data (PROT P): the proxy terminates TLS on each leg';
  for (const [what, ip] of [['client', f.clientIp], ['proxy', f.proxyIp], ['server', f.serverIp], ['upstream-side', f.snatIp]] as const) {
    if (familyOf(ip) !== 4) return `${what} address ${ip} is not IPv4 (the kernel path maps IPv4 only)`;
  }
  // A packet from another host DNATed to 127.0.0.0/8 is dropped as a martian unless
  // route_localnet is set; the relay reaches a loopback server without that.
  if (isLoopbackIp(f.serverIp) && !isLoopbackIp(f.clientIp)) return 'server is on loopback and the client is not';
  return null;
}

export function wireOf(counters: Record<CounterSet, NftCounter>): WireBytes {
  return { toClient: counters.to_client.bytes, toServer: counters.to_server.bytes };
}
