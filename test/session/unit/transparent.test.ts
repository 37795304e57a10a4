/**
 * Transparent interception's decision (session/transparent.ts): the original destination the
 * kernel reported, checked like a forward destination; not redirected, a loop to the proxy's
 * own address, and a lookup that failed are 421s with their own codes.
 */
import t from 'tap';
import { chooseTransparentTarget } from '../../../src/session/transparent.js';
import { parseUpstreamRule, parsePortList, type UpstreamPolicy } from '../../../src/control/upstream-policy.js';

function policy(allow: string[], deny: string[] = [], ports = '21'): UpstreamPolicy {
  const rule = (text: string) => {
    const parsed = parseUpstreamRule(text);
    if (!parsed.ok) throw new Error(parsed.reason);
    return parsed.rule;
  };
  return { allow: allow.map(rule), deny: deny.map(rule), ports: parsePortList(ports)! };
}

const OWN = ['192.168.50.1', '198.51.100.1'];
const OPEN = policy(['0.0.0.0/0', '::/0'], ['10.0.0.0/8']);

t.test('a redirected connection goes where the client was going, if the policy allows it', async (t) => {
  t.same(chooseTransparentTarget({ kind: 'redirected', ip: '203.0.113.20', port: 21 }, OPEN, OWN), { ok: true, target: { address: '203.0.113.20', port: 21, host: '203.0.113.20' } });
  t.same(chooseTransparentTarget({ kind: 'redirected', ip: '2001:db8::20', port: 21 }, OPEN, OWN), { ok: true, target: { address: '2001:db8::20', port: 21, host: '2001:db8::20' } });
});

t.test('refusals: code, metric result, reason', async (t) => {
  const table: Array<[string, Parameters<typeof chooseTransparentTarget>[0], UpstreamPolicy, string, string, RegExp]> = [
    ['denied range', { kind: 'redirected', ip: '10.99.0.5', port: 21 }, OPEN, 'FTPP_ERR_INTERCEPT_REFUSED', 'denied', /10\.99\.0\.5 is in a denied range/],
    ['port not allowed', { kind: 'redirected', ip: '203.0.113.20', port: 2121 }, OPEN, 'FTPP_ERR_INTERCEPT_REFUSED', 'port-not-allowed', /port 2121/],
    ['not in allow', { kind: 'redirected', ip: '203.0.113.20', port: 21 }, policy(['198.51.100.0/24']), 'FTPP_ERR_INTERCEPT_REFUSED', 'not-allowed', /not allowed/],
    ['the router\'s own WAN address: a loop', { kind: 'redirected', ip: '198.51.100.1', port: 21 }, OPEN, 'FTPP_ERR_NOT_INTERCEPTED', 'own-address', /address of this proxy/],
    ['loopback', { kind: 'redirected', ip: '127.0.0.1', port: 21 }, OPEN, 'FTPP_ERR_INTERCEPT_REFUSED', 'special-address', /loopback/],
    ['not redirected', { kind: 'not-redirected' }, OPEN, 'FTPP_ERR_NOT_INTERCEPTED', 'not-redirected', /not redirected/],
    ['lookup failed', { kind: 'error', reason: 'getsockopt(SO_ORIGINAL_DST) failed: ENOTCONN' }, OPEN, 'FTPP_ERR_INTERCEPT_REFUSED', 'lookup-failed', /ENOTCONN/],
    ['no addon', { kind: 'unavailable', reason: 'native addon not built' }, OPEN, 'FTPP_ERR_INTERCEPT_REFUSED', 'lookup-failed', /not built/],
  ];
  for (const [name, original, rules, code, result, reason] of table) {
    const choice = chooseTransparentTarget(original, rules, OWN);
    t.equal(choice.ok, false, `${name}: refused`);
    if (choice.ok) continue;
    t.equal(choice.code, code, `${name}: ${code}`);
    t.equal(choice.result, result, `${name}: counted as ${result}`);
    t.match(choice.reason, reason, `${name}: ${choice.reason}`);
  }
});
