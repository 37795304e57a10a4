/**
 * The topology of upstream-selection.test.ts (issue #13: forward mode and transparent
 * interception): one client LAN behind a MASQUERADE router with no FTP helper, two public
 * vsftpd servers the client may reach by name or address, and two hosts that must never see a
 * connection from the proxy (a private one behind the router, a public one not in `allow`).
 *
 *                        "internet" namespace: bridge br0, routes between
 *                        203.0.113.0/24 (.254) and 198.51.100.0/24 (.254)
 *         +---------------------------+---------------------+---------------------+
 *   rtr wan 198.51.100.1        oth 198.51.100.7       srva 203.0.113.20     srvb 203.0.113.30
 *   MASQUERADE out of wan       (listener :21,         (vsftpd "A")          (vsftpd "B"; .31 is a
 *   no FTP helper; the proxy     not in allow)                                second address with
 *   runs here                                                                 nothing on :21)
 *   br0 192.168.50.1/24   br1 10.99.0.1/24
 *     |                     |
 *   lanc 192.168.50.10    insd 10.99.0.5 (listener :21, in deny)
 *   (the clients)
 *
 * The router resolves names from its own /etc/netns/<ns>/hosts (ROUTER_HOSTS) and asks a
 * resolver on 127.0.0.1 that does not exist, so an unknown name fails at once.
 */
import { NetnsLab } from '../helpers/netns.js';

/** Documentation ranges (RFC 5737) outside, RFC 1918 inside. */
export const UP_ADDR = {
  internetToServers: '203.0.113.254',
  internetToClients: '198.51.100.254',
  routerWan: '198.51.100.1',
  routerLan: '192.168.50.1',
  routerInside: '10.99.0.1',
  lanClient: '192.168.50.10',
  serverA: '203.0.113.20',
  serverB: '203.0.113.30',
  /** A second address of server B's host where nothing listens on :21 (connect refused). */
  serverBClosed: '203.0.113.31',
  /** A public host that `allow` does not name. */
  other: '198.51.100.7',
  /** A private host behind the router, in `deny`. */
  inside: '10.99.0.5',
} as const;

/** Names the router (and so the proxy) resolves, from its own hosts file. */
export const UP_NAMES = {
  serverA: 'srv-a.ftp.test',
  serverB: 'srv-b.ftp.test',
  inside: 'inside.ftp.test',
  /** Two addresses: server B and the denied private host. */
  mixed: 'mixed.ftp.test',
  loopback: 'loop.ftp.test',
  unknown: 'nosuch.ftp.test',
} as const;

const ROUTER_HOSTS = [
  '127.0.0.1 localhost',
  `${UP_ADDR.serverA} ${UP_NAMES.serverA}`,
  `${UP_ADDR.serverB} ${UP_NAMES.serverB}`,
  `${UP_ADDR.inside} ${UP_NAMES.inside}`,
  `${UP_ADDR.serverB} ${UP_NAMES.mixed}`,
  `${UP_ADDR.inside} ${UP_NAMES.mixed}`,
  `127.0.0.1 ${UP_NAMES.loopback}`,
  '',
].join('\n');

/** No resolver listens on 127.0.0.1:53 in the router namespace: a lookup is refused at once. */
const ROUTER_RESOLV = ['nameserver 127.0.0.1', 'options timeout:1 attempts:1', ''].join('\n');

export interface UpstreamTopology {
  readonly internet: string;
  readonly router: string;
  readonly lanClient: string;
  readonly serverA: string;
  readonly serverB: string;
  readonly other: string;
  readonly inside: string;
  /** The router's LAN interface (a bridge), for nftables `iifname`. */
  readonly routerLanIf: string;
}

export function buildUpstreamTopology(lab: NetnsLab): UpstreamTopology {
  const [internet, router, lanClient, serverA, serverB, other, inside] = lab.addNamespaces('inet', 'rtr', 'lanc', 'srva', 'srvb', 'oth', 'insd') as [
    string, string, string, string, string, string, string,
  ];

  lab.addBridge(internet, 'br0', [`${UP_ADDR.internetToServers}/24`, `${UP_ADDR.internetToClients}/24`]);
  lab.enableForwarding(internet);
  // Unreachable addresses must fail at once, not after the ICMP rate limit (nat-lab.ts).
  lab.sysctl(internet, 'net.ipv4.icmp_ratelimit=0');
  const onInternet = (fromName: string, toNs: string, toName: string, address: string): void => {
    const gateway = address.startsWith('198.51.100.') ? UP_ADDR.internetToClients : UP_ADDR.internetToServers;
    lab.link({ fromNs: internet, bridge: 'br0', fromName, toNs, toName, cidr: `${address}/24`, gateway });
  };
  onInternet('rtr', router, 'wan', UP_ADDR.routerWan);
  onInternet('oth', other, 'eth0', UP_ADDR.other);
  onInternet('srva', serverA, 'eth0', UP_ADDR.serverA);
  onInternet('srvb', serverB, 'eth0', UP_ADDR.serverB);
  lab.ip(serverB, 'addr', 'add', `${UP_ADDR.serverBClosed}/24`, 'dev', 'eth0');

  // The client LAN behind a plain MASQUERADE (no FTP conntrack helper: active FTP breaks).
  lab.addBridge(router, 'br0', [`${UP_ADDR.routerLan}/24`]);
  lab.enableForwarding(router);
  lab.iptables(router, '-t', 'nat', '-A', 'POSTROUTING', '-o', 'wan', '-j', 'MASQUERADE');
  lab.link({ fromNs: router, bridge: 'br0', fromName: 'lanc', toNs: lanClient, toName: 'eth0', cidr: `${UP_ADDR.lanClient}/24`, gateway: UP_ADDR.routerLan });

  // A private network the router (and so the proxy) reaches directly.
  lab.addBridge(router, 'br1', [`${UP_ADDR.routerInside}/24`]);
  lab.link({ fromNs: router, bridge: 'br1', fromName: 'insd', toNs: inside, toName: 'eth0', cidr: `${UP_ADDR.inside}/24`, gateway: UP_ADDR.routerInside });

  lab.setEtcFiles(router, { hosts: ROUTER_HOSTS, 'resolv.conf': ROUTER_RESOLV });

  return { internet, router, lanClient, serverA, serverB, other, inside, routerLanIf: 'br0' };
}
