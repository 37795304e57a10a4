/**
 * The kernel section's routed lab: the edge is the bench namespace itself, with a client
 * namespace on one side and a server namespace on the other (one veth pair each), so every
 * byte crosses the edge the way it does on a real network edge, and "direct" is plain
 * routing through that same edge (issue #14: "ratio to direct routing on the same path").
 *
 * Why not loopback: with client, proxy and server on one loopback, the kernel path's DNAT
 * happens in the output hook, where the kernel routes every NATed packet a second time
 * (ip_route_me_harder); measured on the bench VM, a bare DNAT on loopback cost about 10 % of
 * throughput against no NAT, and a forwarded one about 2 % (README "Kernel data path").
 *
 * The plan (names, addresses, commands) is pure and table-tested; run.ts runs the commands.
 * Addresses are private ones inside namespaces this run creates and deletes: the root
 * namespace never gets an address or a route (test-environment.md, the network safety rule).
 */
import type { Family } from '../../src/control/ip.js';

export interface RoutedSide {
  /** The namespace's name (`ip netns`). */
  readonly ns: string;
  /** The veth end in that namespace, and its peer in the edge (bench) namespace. */
  readonly dev: string;
  readonly edgeDev: string;
  /** Per family: the address in that namespace and the edge's address facing it. */
  readonly addr: Record<Family, string>;
  readonly edgeAddr: Record<Family, string>;
}

export interface RoutedLab {
  readonly edgeNs: string;
  readonly client: RoutedSide;
  readonly server: RoutedSide;
}

const PREFIX_LEN: Record<Family, number> = { 4: 24, 6: 64 };

/** Names derive from the bench namespace's (unique per run); veth names stay within IFNAMSIZ. */
export function routedLabPlan(edgeNs: string, pid: number): RoutedLab {
  const tag = String(pid % 100_000);
  const side = (letter: 'c' | 's', subnet: number): RoutedSide => ({
    ns: `${edgeNs}${letter}`,
    dev: `fb${tag}${letter}0`,
    edgeDev: `fb${tag}${letter}1`,
    addr: { 4: `10.251.${subnet}.2`, 6: `fd00:251:${subnet}::2` },
    edgeAddr: { 4: `10.251.${subnet}.1`, 6: `fd00:251:${subnet}::1` },
  });
  return { edgeNs, client: side('c', 1), server: side('s', 2) };
}

/**
 * The commands that build the lab, in order, each run by itself (argv arrays). The edge
 * already forwards (run.ts sets ip_forward and IPv6 forwarding in the bench namespace).
 * `nodad`: an IPv6 address is usable at once instead of after duplicate address detection.
 */
export function routedLabSteps(lab: RoutedLab): string[][] {
  const steps: string[][] = [];
  for (const side of [lab.client, lab.server]) {
    steps.push(['ip', 'netns', 'add', side.ns]);
    steps.push(['ip', '-n', side.ns, 'link', 'set', 'lo', 'up']);
    steps.push(['ip', 'link', 'add', side.dev, 'netns', side.ns, 'type', 'veth', 'peer', 'name', side.edgeDev, 'netns', lab.edgeNs]);
    for (const family of [4, 6] as const) {
      const nodad = family === 6 ? ['nodad'] : [];
      steps.push(['ip', '-n', side.ns, 'addr', 'add', `${side.addr[family]}/${PREFIX_LEN[family]}`, 'dev', side.dev, ...nodad]);
      steps.push(['ip', '-n', lab.edgeNs, 'addr', 'add', `${side.edgeAddr[family]}/${PREFIX_LEN[family]}`, 'dev', side.edgeDev, ...nodad]);
    }
    steps.push(['ip', '-n', side.ns, 'link', 'set', side.dev, 'up']);
    steps.push(['ip', '-n', lab.edgeNs, 'link', 'set', side.edgeDev, 'up']);
    steps.push(['ip', '-n', side.ns, 'route', 'add', 'default', 'via', side.edgeAddr[4]]);
    steps.push(['ip', '-n', side.ns, '-6', 'route', 'add', 'default', 'via', side.edgeAddr[6]]);
  }
  return steps;
}

/** argv that runs `command` inside a namespace of the lab (`ip netns exec` execs it: same PID). */
export function inNetns(ns: string, command: string, args: readonly string[]): [string, string[]] {
  return ['ip', ['netns', 'exec', ns, command, ...args]];
}
