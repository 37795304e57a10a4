/**
 * The kernel data path's nft(8) side, pure (table-tested): the table and its maps, the
 * counting map and set, the scripts that add, count, cut and remove one transfer's mapping,
 * the parser of their listings, whether payload moved between two readings, and whether a
 * data connection is one the kernel can carry at all.
 * kernel-forward.ts runs these through libnftables; why the table looks like this is told there.
 *
 * One `inet` table holds both families (issue #14): IPv4 mappings in maps and sets without a
 * suffix, IPv6 ones in the same names ending in `6`. nftables cannot translate between the
 * families, so a mapping is all IPv4 or all IPv6 (kernelPathBlocker says so first).
 */
import { familyOf, isLoopbackIp, normalizeIp, type Family } from '../control/ip.js';

/**
 * One transfer's mapping: whoever opens the data connection (the `opener`) connects to a port
 * the proxy leased, and the kernel sends that connection on to the `target` instead.
 *  - client-passive (PASV/EPSV, server passive): the client opens, to the port the 227/229
 *    advertised; the target is the server's passive port.
 *  - client-active (PORT/EPRT, server active): the server opens, to the port our own PORT/EPRT
 *    named on its side; the target is the address the client's PORT/EPRT named.
 */
export interface ForwardMapping {
  readonly opener: 'client' | 'server';
  /** The opener's address: the control connection's peer on its side. Only it may connect. */
  readonly openerIp: string;
  /** The proxy's own address the opener connects to (that side's control connection's local address). */
  readonly proxyIp: string;
  /** The leased port the opener was told. */
  readonly proxyPort: number;
  readonly targetIp: string;
  readonly targetPort: number;
  /** Source address the target sees: the proxy's address on the target's side (vsftpd pasv_promiscuous=NO, protocol.md §2.4). */
  readonly snatIp: string;
}

export const TABLE_PREFIX = 'ftpnp_';

export function tableName(pid: number): string {
  return `${TABLE_PREFIX}${pid}`;
}

/** What one address family's maps, sets and keys are called in the table. */
interface FamilyNames {
  readonly addrType: string;
  /** The nft(8) expression family: `ip saddr`, `ct original ip6 daddr`. */
  readonly expr: 'ip' | 'ip6';
  readonly suffix: '' | '6';
}

const NAMES: Record<Family, FamilyNames> = {
  4: { addrType: 'ipv4_addr', expr: 'ip', suffix: '' },
  6: { addrType: 'ipv6_addr', expr: 'ip6', suffix: '6' },
};

/**
 * A mapping's counters (kernel-forward.ts): `original` and `reply` are the two elements of the
 * `flows` verdict map (the packets from the opener and toward it, conntrack's directions),
 * `ends` is a set that counts FIN and RST packets.
 */
export const COUNTER_SETS = ['original', 'reply', 'ends'] as const;
export type CounterSet = (typeof COUNTER_SETS)[number];
/** The verdict map every packet of a mapped connection is looked up in, once (`ct direction . key`). */
export const FLOWS_MAP = 'flows';
export const ENDS_SET = 'ends';
/** Where a cut connection's elements in `flows` send its packets: a TCP reset for all but a RST. */
export const CUT_CHAIN = 'cut_reset';

/** The name of a map or set for this family: `dnat_to`, `dnat_to6`. */
export function setName(base: string, family: Family): string {
  return `${base}${NAMES[family].suffix}`;
}

function keyType(family: Family): string {
  const { addrType } = NAMES[family];
  return `${addrType} . ${addrType} . inet_service`;
}

function ctKey(family: Family): string {
  const { expr } = NAMES[family];
  return `ct original ${expr} saddr . ct original ${expr} daddr . ct original proto-dst`;
}

/** A mapping's family (the blocker has made sure all its addresses share it). */
export function familyOfMapping(m: Pick<ForwardMapping, 'openerIp'>): Family {
  return familyOf(m.openerIp);
}

/**
 * The table, created in one transaction. A table left by an earlier process with the same
 * PID (a crash, then PID reuse) is replaced: "add" then "delete" then create, so the script
 * never fails on a missing table. Priorities: dstnat (-100) and srcnat (100), the standard
 * NAT hooks; a map miss leaves the packet alone, so the rules touch nothing but our mappings.
 * `inet` NAT chains need Linux 5.2; `dnat ip to` in them matches IPv4 packets only, `dnat ip6 to` IPv6.
 */
export function tableScript(table: string): string {
  const families: Family[] = [4, 6];
  const each = (line: (f: FamilyNames, family: Family) => string): string[] => families.map((family) => line(NAMES[family], family));
  return [
    `add table inet ${table}`,
    `delete table inet ${table}`,
    `table inet ${table} {`,
    ...each(({ addrType }, family) => `  map ${setName('dnat_to', family)} { type ${keyType(family)} : ${addrType} . inet_service; flags timeout; }`),
    ...each(({ addrType }, family) => `  map ${setName('snat_to', family)} { type ${keyType(family)} : ${addrType}; }`),
    // Remote openers arrive through prerouting; an opener on this host through output.
    '  chain prerouting {',
    '    type nat hook prerouting priority dstnat; policy accept;',
    ...each(({ expr }, family) => `    dnat ${expr} to ${expr} saddr . ${expr} daddr . tcp dport map @${setName('dnat_to', family)}`),
    '  }',
    '  chain output {',
    '    type nat hook output priority -100; policy accept;',
    ...each(({ expr }, family) => `    dnat ${expr} to ${expr} saddr . ${expr} daddr . tcp dport map @${setName('dnat_to', family)}`),
    '  }',
    '  chain postrouting {',
    '    type nat hook postrouting priority srcnat; policy accept;',
    ...each(({ expr }, family) => `    ct status dnat snat ${expr} to ${expr} saddr . ${expr} daddr . tcp dport map @${setName('snat_to', family)}`),
    '  }',
    // One lookup per packet (issue #14). A set per counter plus one for the cut (up to three
    // lookups per packet, five rules per family) cost a forwarded transfer 10-15 % of plain
    // routing's throughput in the bench's routed lab; this lookup's element counts with its
    // counter and decides with its verdict: `accept`, or `goto cut_reset` once cut. FIN and RST
    // packets are also counted in `ends` (the flags test fails first for every other packet).
    // Each family's lookup only for its own packets.
    ...each(({ addrType }, family) => `  map ${setName(FLOWS_MAP, family)} { type ct_dir . ${addrType} . ${addrType} . inet_service : verdict; flags timeout; counter; }`),
    ...each((_, family) => `  set ${setName(ENDS_SET, family)} { type ${keyType(family)}; counter; }`),
    // Not a RST: the reset this sends belongs to the connection too and passes the output hook
    // (an opener or target on this host; and the reset itself) on its way.
    `  chain ${CUT_CHAIN} { meta l4proto tcp tcp flags & rst == 0 reject with tcp reset; }`,
    // FIN and RST packets only (the base chains test the flags first).
    '  chain count_ends {',
    ...each((_, family) => `    meta nfproto ipv${family} meta l4proto tcp ${ctKey(family)} @${setName(ENDS_SET, family)}`),
    '  }',
    // Each packet once: remote opener and target (forward); one on this host (output; input
    // only from outside: a packet over lo was already seen in output). The rules sit in the
    // base chains themselves, a jump fewer per packet.
    ...(
      [
        ['forward', 'forward', 'ct status dnat'],
        ['filter_output', 'output', 'ct status dnat'],
        ['filter_input', 'input', 'ct status dnat iif != "lo"'],
      ] as const
    ).flatMap(([chain, hook, ours]) => [
      `  chain ${chain} {`,
      `    type filter hook ${hook} priority filter; policy accept;`,
      `    ${ours} meta l4proto tcp tcp flags & (fin | rst) != 0 jump count_ends`,
      // After NAT the packet's own addresses are the target's; the ORIGINAL tuple is the key.
      ...each((_, family) => `    ${ours} meta nfproto ipv${family} meta l4proto tcp ct direction . ${ctKey(family)} vmap @${setName(FLOWS_MAP, family)}`),
      '  }',
    ]),
    '}',
  ].join('\n');
}

/**
 * How long a cut connection's `flows` elements stay: the reset can only answer a packet, and a
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

function element(table: string, base: string, m: ForwardMapping): string {
  return `inet ${table} ${setName(base, familyOfMapping(m))}`;
}

/** The `flows` elements of a mapping: its key behind each conntrack direction. */
function flowKeys(m: ForwardMapping): [original: string, reply: string] {
  const key = dnatKeyText(m);
  return [`original . ${key}`, `reply . ${key}`];
}

/**
 * The DNAT element with `create`, not `add`: `add` silently accepts an element that is already
 * there, and a key already mapped means a mapping we failed to remove; that transfer is relayed
 * instead. The SNAT element with `add`: another mapping to the same server port may hold it
 * already (the forwarder checks it maps to the same address), and adds run batched off the
 * event loop, so no add may count on another's having run (kernel-forward.ts).
 */
export function addMappingScript(table: string, m: ForwardMapping, timeoutMs: number): string {
  const [original, reply] = flowKeys(m);
  return [
    `add element ${element(table, 'snat_to', m)} { ${snatKeyText(m)} : ${ipText(m.snatIp)} }`,
    `create element ${element(table, 'dnat_to', m)} { ${dnatKeyText(m)} timeout ${nftTimeout(timeoutMs)} : ${ipText(m.targetIp)} . ${m.targetPort} }`,
    // `add`: the counters of a key we failed to delete go on; the transaction is what matters.
    `add element ${element(table, FLOWS_MAP, m)} { ${original} : accept, ${reply} : accept }`,
    `add element ${element(table, ENDS_SET, m)} { ${dnatKeyText(m)} }`,
  ].join('\n');
}

/** Delete one mapping's counter elements (the caller read them first). */
export function removeCountersScript(table: string, m: ForwardMapping): string {
  return [...flowKeys(m).map((key) => `delete element ${element(table, FLOWS_MAP, m)} { ${key} }`), `delete element ${element(table, ENDS_SET, m)} { ${dnatKeyText(m)} }`].join('\n');
}

/**
 * The idle cut: no new connection (DNAT element gone), and the next packet of the existing
 * one, either way, is answered with a TCP reset: its `flows` elements (the caller read their
 * counters) come back with the verdict `goto cut_reset` and expire by themselves.
 */
export function cutScript(table: string, m: ForwardMapping, withSnat = true, holdMs: number = CUT_HOLD_MS): string {
  const [original, reply] = flowKeys(m);
  const hold = `timeout ${nftTimeout(holdMs)} : goto ${CUT_CHAIN}`;
  return [
    ...removeCountersScript(table, m).split('\n'),
    `add element ${element(table, FLOWS_MAP, m)} { ${original} ${hold}, ${reply} ${hold} }`,
    ...removeMappingScripts(table, m, withSnat),
  ].join('\n');
}

/** Take a cut mapping's elements out of `flows` early (whoever answered has given the connection up). */
export function uncutScript(table: string, m: ForwardMapping): string {
  return flowKeys(m)
    .map((key) => `delete element ${element(table, FLOWS_MAP, m)} { ${key} }`)
    .join('\n');
}

/**
 * What the idle check reads: the `flows` map (both directions' counters). One script per map
 * or set: nft 1.0.6 fails a script of several `list` commands ("No such file or directory"
 * for the first: each one's cache filter drops the others), and a whole-table listing costs
 * ~90 µs per mapping (every map and set).
 */
export function idleCountersScripts(table: string, family: Family): string[] {
  return listCounterScripts(table, family, ['original', 'reply']);
}

/** `list map`/`list set` scripts that read these counters of one family, one script each (see idleCountersScripts). */
export function listCounterScripts(table: string, family: Family, names: readonly CounterSet[]): string[] {
  const scripts: string[] = [];
  if (names.includes('original') || names.includes('reply')) scripts.push(`list map inet ${table} ${setName(FLOWS_MAP, family)}`);
  if (names.includes('ends')) scripts.push(`list set inet ${table} ${setName(ENDS_SET, family)}`);
  return scripts;
}

/** Read one mapping's counters (`get element`, when the transfer ended between polls). */
export function getCountersScript(table: string, m: ForwardMapping): string {
  const [original, reply] = flowKeys(m);
  return [`get element ${element(table, FLOWS_MAP, m)} { ${original}, ${reply} }`, `get element ${element(table, ENDS_SET, m)} { ${dnatKeyText(m)} }`].join('\n');
}

/** An address as nft(8) prints it (RFC 5952 for IPv6, as inet_ntop writes it). */
function ipText(ip: string): string {
  return normalizeIp(ip);
}

/**
 * One element with its counter: after `{` or `,` (or at a continuation line's start), up to
 * `,` or `}`. In `flows` the key starts with the direction, a cut element has a timeout, and
 * the verdict follows the counter.
 */
const ELEMENT_COUNTER =
  /(?:^|[{,])\s*(?:(original|reply) \. )?([0-9a-fA-F:.]+) \. ([0-9a-fA-F:.]+) \. (\d{1,5}) counter packets (\d+) bytes (\d+)(?: timeout \S+)?(?: expires \S+)?(?: : (accept|goto \S+))?\s*(?=[,}])/g;

/** Our counting maps and sets of both families, by name in the table -> family. */
const COUNTING_NAMES: ReadonlyMap<string, Family> = new Map(([4, 6] as const).flatMap((family) => [FLOWS_MAP, ENDS_SET].map((base) => [setName(base, family), family] as const)));

/**
 * The counters in `list map`/`list set`/`get element` output (one or several, one table
 * block each): counter name with the family's suffix (`original`, `reply6`, `ends`, ...) ->
 * element key -> counter. Elements come one per line or several on one, comma-separated; the
 * header may or may not repeat `counter`; an element without a counter, a cut one (`goto`),
 * or a map or set that is not ours, is skipped.
 */
export function parseCounters(output: string): Map<string, Map<string, NftCounter>> {
  const sets = new Map<string, Map<string, NftCounter>>();
  let family: Family | null = null;
  let isFlows = false;
  const bucket = (name: string): Map<string, NftCounter> => {
    let found = sets.get(name);
    if (!found) sets.set(name, (found = new Map<string, NftCounter>()));
    return found;
  };
  for (const line of output.split('\n')) {
    const header = /^\s*(?:set|map) (\S+) \{/.exec(line);
    if (header) {
      family = COUNTING_NAMES.get(header[1]!) ?? null;
      isFlows = family !== null && header[1] === setName(FLOWS_MAP, family);
      continue;
    }
    if (family === null) continue;
    for (const match of line.matchAll(ELEMENT_COUNTER)) {
      const [, direction, opener, proxy, port, packets, bytes, verdict] = match;
      if (isFlows !== (direction !== undefined) || (verdict !== undefined && verdict !== 'accept')) continue;
      const name = isFlows ? direction! : ENDS_SET;
      bucket(setName(name, family)).set(`${opener} . ${proxy} . ${port}`, { packets: Number(packets), bytes: Number(bytes) });
    }
  }
  return sets;
}

/** One mapping's counters out of a parsed listing (zero when its element is not there). */
export function countersOf(sets: Map<string, Map<string, NftCounter>>, m: ForwardMapping): Record<CounterSet, NftCounter> {
  const zero: NftCounter = { packets: 0, bytes: 0 };
  const family = familyOfMapping(m);
  const key = dnatKeyText(m);
  const of = (set: CounterSet): NftCounter => sets.get(setName(set, family))?.get(key) ?? zero;
  return { original: of('original'), reply: of('reply'), ends: of('ends') };
}

/**
 * The most header one IP packet of a TCP connection can carry (IPv4 20 bytes, IPv6 40, TCP
 * with every option 60; IP options and IPv6 extension headers are not used on TCP data here).
 */
export const HEADER_BYTES_MAX: Readonly<Record<Family, number>> = { 4: 80, 6: 100 };

/**
 * Whether payload moved between two readings of a mapping's counters, in either direction:
 * more bytes than headers alone can explain. ACKs, zero-window probes (Linux sends them
 * without payload, Windows with one byte) and keepalives never pass it; a data segment of
 * a bulk transfer (or a GRO aggregate of them, counted as one packet) always does. A trickle
 * of segments averaging under 28 bytes of payload (IPv4) does not count as moving: the price of
 * counting with the one lookup per packet (a rule of its own that tests for payload, `@ih`,
 * cost another lookup for every data packet).
 */
export function payloadMoved(before: Pick<Record<CounterSet, NftCounter>, 'original' | 'reply'>, after: Pick<Record<CounterSet, NftCounter>, 'original' | 'reply'>, family: Family): boolean {
  return (['original', 'reply'] as const).some((direction) => {
    const packets = after[direction].packets - before[direction].packets;
    const bytes = after[direction].bytes - before[direction].bytes;
    return packets > 0 && bytes > packets * HEADER_BYTES_MAX[family];
  });
}

/**
 * One command per element, so that a DNAT element that already expired cannot stop the SNAT
 * element's removal. The SNAT element only when this was its last holder (`withSnat`).
 */
export function removeMappingScripts(table: string, m: ForwardMapping, withSnat = true): string[] {
  return [`delete element ${element(table, 'dnat_to', m)} { ${dnatKeyText(m)} }`, ...(withSnat ? [removeSnatScript(table, m)] : [])];
}

/** Delete a mapping's SNAT element (its last holder is gone). */
export function removeSnatScript(table: string, m: ForwardMapping): string {
  return `delete element ${element(table, 'snat_to', m)} { ${snatKeyText(m)} }`;
}

/** The key of a mapping in dnat_to and the counter and cut sets: the connection as the opener makes it. */
export function dnatKeyText(m: Pick<ForwardMapping, 'openerIp' | 'proxyIp' | 'proxyPort'>): string {
  return `${ipText(m.openerIp)} . ${ipText(m.proxyIp)} . ${m.proxyPort}`;
}

/** The key in snat_to: the connection after DNAT (opener to target). */
export function snatKeyText(m: ForwardMapping): string {
  return `${ipText(m.openerIp)} . ${ipText(m.targetIp)} . ${m.targetPort}`;
}

/** A table of ours in `list tables` output. */
export interface OwnTable {
  readonly family: string;
  readonly name: string;
}

/**
 * Tables of ours (from `list tables`) whose process is gone: a proxy killed with SIGKILL
 * cannot delete its table, and its mappings only expire one by one. Any family: versions
 * before the IPv6 kernel path made `ip` tables.
 */
export function staleTables(listing: string, isAlive: (pid: number) => boolean, ownPid: number): OwnTable[] {
  const stale: OwnTable[] = [];
  for (const line of listing.split('\n')) {
    const match = /^table (ip|ip6|inet) (ftpnp_(\d+))\s*$/.exec(line.trim());
    if (!match) continue;
    const pid = Number(match[3]);
    if (pid !== ownPid && !isAlive(pid)) stale.push({ family: match[1]!, name: match[2]! });
  }
  return stale;
}

/** Why a data connection is relayed instead (a stable label: metrics and logs). */
export type KernelFallbackReason =
  | 'proxy-protocol'
  | 'tls'
  | 'both-connect'
  | 'both-listen'
  | 'mixed-family'
  | 'loopback'
  | 'source-port'
  | 'host'
  | 'failed';

export const KERNEL_FALLBACK_REASONS: readonly KernelFallbackReason[] = ['proxy-protocol', 'tls', 'both-connect', 'both-listen', 'mixed-family', 'loopback', 'source-port', 'host', 'failed'];

export interface KernelPathBlock {
  readonly reason: KernelFallbackReason;
  readonly detail: string;
}

/** What the session knows when it decides how to carry a data connection. */
export interface KernelPathFacts {
  /** PASV/EPSV (the client connects) or PORT/EPRT (the client listens). */
  readonly clientMode: 'passive' | 'active';
  /** EPSV/PASV toward the server (it listens) or PORT/EPRT (it connects). */
  readonly upstreamMode: 'passive' | 'active';
  readonly clientIp: string;
  /** The proxy's address on the client's control connection. */
  readonly proxyClientSideIp: string;
  readonly serverIp: string;
  /** The proxy's address on its control connection to the server. */
  readonly proxyServerSideIp: string;
  /** The listener reads PROXY headers: the data connection's source is then a load balancer. */
  readonly proxyProtocol: boolean;
  /** Either leg's data is TLS (PROT P): the proxy must decrypt and re-encrypt it (RFC 4217). */
  readonly tls?: boolean;
  /** client.dataSourcePort: the client's firewall wants active data from this port. */
  readonly dataSourcePort?: number | null;
  /** Why this host cannot forward the family, if it cannot (auto: sysctls read at start). */
  readonly familyBlocked?: (family: Family) => string | null;
}

/** Null when the kernel can carry this data connection, else why not (the relay does). */
export function kernelPathBlocker(f: KernelPathFacts): KernelPathBlock | null {
  if (f.proxyProtocol) return { reason: 'proxy-protocol', detail: 'PROXY protocol: data connections come from the load balancer' };
  if (f.tls) return { reason: 'tls', detail: 'TLS data (PROT P): the proxy terminates TLS on each leg' };
  // One connection can be NATed; two that both start at the proxy, or two listeners waiting
  // for each other, only the relay can join (upstream.dataMode: mirror pairs them up).
  if (f.clientMode === 'passive' && f.upstreamMode === 'active') return { reason: 'both-connect', detail: 'client and server both connect to the proxy (PASV client, upstream dataMode active)' };
  if (f.clientMode === 'active' && f.upstreamMode === 'passive') return { reason: 'both-listen', detail: 'client and server both wait for a connection (PORT client, upstream dataMode passive; mirror lets the kernel carry it)' };
  if (f.clientMode === 'active' && f.dataSourcePort) return { reason: 'source-port', detail: `client.dataSourcePort ${f.dataSourcePort}: the relay dials the client from that port` };
  const family = familyOf(f.clientIp);
  for (const [what, ip] of [['client', f.clientIp], ['proxy', f.proxyClientSideIp], ['server', f.serverIp], ['upstream-side', f.proxyServerSideIp]] as const) {
    if (familyOf(ip) !== family) return { reason: 'mixed-family', detail: `${what} address ${ip} is not IPv${family} like the client's (nftables cannot translate between families)` };
  }
  // A packet from another host DNATed to 127.0.0.0/8 (or ::1), or one from loopback sent to
  // another host, is dropped as a martian unless route_localnet is set; the relay does both.
  if (isLoopbackIp(f.serverIp) !== isLoopbackIp(f.clientIp)) return { reason: 'loopback', detail: `one side is on loopback and the other is not (client ${f.clientIp}, server ${f.serverIp})` };
  // Between two loopback addresses nothing is forwarded.
  const hostBlock = isLoopbackIp(f.clientIp) ? null : (f.familyBlocked?.(family) ?? null);
  if (hostBlock) return { reason: 'host', detail: hostBlock };
  return null;
}

/** The counters as client/server bytes: the opener's packets are the original direction. */
export function wireOf(counters: Record<CounterSet, NftCounter>, opener: ForwardMapping['opener']): WireBytes {
  const fromOpener = counters.original.bytes;
  const toOpener = counters.reply.bytes;
  return opener === 'client' ? { toServer: fromOpener, toClient: toOpener } : { toClient: fromOpener, toServer: toOpener };
}
