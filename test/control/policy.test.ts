/**
 * Active-mode target policy: FTP bounce (CERT CA-97.27, RFC 2577 §3), port >= 1024, and the
 * NAT fix-up for clients behind NAT without an ALG (protocol.md §4.1, §8.13-15).
 */
import t from 'tap';
import { decideActiveTarget, MIN_ACTIVE_PORT, type ActiveTargetDecision, type ActiveTargetSource } from '../../src/control/policy.js';

const PEER = '198.51.100.7';
const PEER6 = '2001:db8::7';

const ok = (host: string, port: number, via: ActiveTargetSource): ActiveTargetDecision => ({ ok: true, target: { host, port }, via });
const THIRD: ActiveTargetDecision = { ok: false, reason: 'third-party' };
const LOW: ActiveTargetDecision = { ok: false, reason: 'privileged-port' };

t.test('MIN_ACTIVE_PORT is 1024 (vsftpd vsf_sysutil_is_port_reserved)', async (t) => {
  t.equal(MIN_ACTIVE_PORT, 1024);
});

t.test('decideActiveTarget table', async (t) => {
  const table: [name: string, host: string, port: number, client: string, fixup: boolean, expected: ActiveTargetDecision][] = [
    ['own address', PEER, 50000, PEER, true, ok(PEER, 50000, 'named')],
    ['own address, fix-up off', PEER, 50000, PEER, false, ok(PEER, 50000, 'named')],
    ['§8.13 port 1023 refused', PEER, 1023, PEER, true, LOW],
    ['§8.13 port 1024 accepted', PEER, 1024, PEER, true, ok(PEER, 1024, 'named')],
    ['port 20 refused', PEER, 20, PEER, true, LOW],
    ['port 65535', PEER, 65535, PEER, true, ok(PEER, 65535, 'named')],
    ['§8.13 bounce: public third party', '192.0.2.55', 50000, PEER, true, THIRD],
    ['§8.13 bounce: metadata service on port 80', '169.254.169.254', 80, PEER, true, LOW],
    ['§8.14 NAT fix-up: private address from a public peer', '192.168.1.10', 50000, PEER, true, ok(PEER, 50000, 'nat-fixup')],
    ['§8.14 fix-up disabled', '192.168.1.10', 50000, PEER, false, THIRD],
    ['fix-up for CGNAT', '100.64.1.2', 50000, PEER, true, ok(PEER, 50000, 'nat-fixup')],
    ['fix-up for 10/8', '10.1.2.3', 50000, PEER, true, ok(PEER, 50000, 'nat-fixup')],
    ['fix-up for link-local', '169.254.1.1', 50000, PEER, true, ok(PEER, 50000, 'nat-fixup')],
    ['fix-up never lowers the port rule', '192.168.1.10', 1023, PEER, true, LOW],
    ['private peer, other private address: third party', '192.168.1.10', 50000, '10.0.0.9', true, THIRD],
    ['private peer, own address', '10.0.0.9', 50000, '10.0.0.9', true, ok('10.0.0.9', 50000, 'named')],
    ['mapped peer matches plain address', PEER, 50000, `::ffff:${PEER}`, true, ok(`::ffff:${PEER}`, 50000, 'named')],
    ['broadcast is not a NAT address', '255.255.255.255', 50000, PEER, true, THIRD],
    ['multicast is not a NAT address', '224.0.0.1', 50000, PEER, true, THIRD],
    // A host behind NAT writes its LAN address, never loopback: that is refused.
    ['loopback from a public peer is refused', '127.0.0.1', 50000, PEER, true, THIRD],
    // Issue #10 defect 6: the unspecified address names no host, the client means itself
    // (lftp over IPv6: EPRT |2|::|p|). It used to be refused like loopback; now it is the peer.
    ['0.0.0.0 means the peer', '0.0.0.0', 50000, PEER, true, ok(PEER, 50000, 'unspecified')],
    ['0.0.0.0 means the peer, fix-up off', '0.0.0.0', 50000, PEER, false, ok(PEER, 50000, 'unspecified')],
    ['0.0.0.0 from a private peer (no NAT fix-up would apply)', '0.0.0.0', 50000, '10.0.0.9', true, ok('10.0.0.9', 50000, 'unspecified')],
    ['0.0.0.0 from a mapped peer', '0.0.0.0', 50000, `::ffff:${PEER}`, true, ok(`::ffff:${PEER}`, 50000, 'unspecified')],
    ['0.0.0.0 keeps the port rule: 1023', '0.0.0.0', 1023, PEER, true, LOW],
    ['0.0.0.0 keeps the port rule: 20', '0.0.0.0', 20, PEER, true, LOW],
    ['0.0.0.0 from an IPv6 peer: another family, refused', '0.0.0.0', 50000, PEER6, true, THIRD],
    ['§8.15 IPv6 own address', PEER6, 50000, PEER6, true, ok(PEER6, 50000, 'named')],
    ['§8.15 IPv6 ::1 from 2001:db8::7 refused (≠ peer, loopback)', '::1', 50000, PEER6, true, THIRD],
    ['IPv6 :: from 2001:db8::7 means the peer (issue #10 defect 6)', '::', 50000, PEER6, true, ok(PEER6, 50000, 'unspecified')],
    ['IPv6 :: keeps the port rule', '::', 1023, PEER6, true, LOW],
    ['IPv6 :: from an IPv4 peer: another family, refused', '::', 50000, PEER, true, THIRD],
    ['IPv6 :: from a mapped IPv4 peer: another family, refused', '::', 50000, `::ffff:${PEER}`, true, THIRD],
    ['::ffff:0.0.0.0 is not the unspecified address', '::ffff:0.0.0.0', 50000, PEER6, true, THIRD],
    ['IPv6 third party', '2001:db8::8', 50000, PEER6, true, THIRD],
    ['IPv6 same address, other spelling', '2001:0db8::0007', 50000, PEER6, true, ok(PEER6, 50000, 'named')],
  ];
  for (const [name, host, port, client, fixup, expected] of table) {
    t.same(decideActiveTarget({ host, port }, client, fixup), expected, name);
  }
});
