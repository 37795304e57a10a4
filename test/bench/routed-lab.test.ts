import t from 'tap';
import { isIPv4, isIPv6 } from 'node:net';
import { inNetns, routedLabPlan, routedLabSteps } from './routed-lab.js';

const lab = routedLabPlan('ftpnpbench4194304', 4194304);

t.test('names: per run, within IFNAMSIZ, all different', async (t) => {
  const names = [lab.client.ns, lab.server.ns, lab.client.dev, lab.client.edgeDev, lab.server.dev, lab.server.edgeDev];
  t.equal(new Set(names).size, names.length, 'no two alike');
  for (const dev of [lab.client.dev, lab.client.edgeDev, lab.server.dev, lab.server.edgeDev]) t.ok(dev.length <= 15, `${dev} fits a Linux interface name`);
  t.not(routedLabPlan('ftpnpbench7', 7).client.dev, lab.client.dev, 'another run gets other veth names');
  t.equal(lab.client.ns, 'ftpnpbench4194304c');
  t.equal(lab.edgeNs, 'ftpnpbench4194304');
});

t.test('addresses: private, one subnet per side, edge and end apart', async (t) => {
  for (const side of [lab.client, lab.server]) {
    t.ok(isIPv4(side.addr[4]) && side.addr[4].startsWith('10.'), `${side.addr[4]} is in 10/8`);
    t.ok(isIPv6(side.addr[6]) && side.addr[6].startsWith('fd'), `${side.addr[6]} is a unique local address`);
    t.not(side.addr[4], side.edgeAddr[4]);
    t.equal(side.addr[4].split('.').slice(0, 3).join('.'), side.edgeAddr[4].split('.').slice(0, 3).join('.'), 'end and edge share the /24');
  }
  t.not(lab.client.addr[4].split('.')[2], lab.server.addr[4].split('.')[2], 'the two sides are different subnets: traffic is routed');
});

t.test('steps: only the lab namespaces are touched, never the root one', async (t) => {
  const steps = routedLabSteps(lab);
  const ours = new Set([lab.edgeNs, lab.client.ns, lab.server.ns]);
  for (const step of steps) {
    t.equal(step[0], 'ip', step.join(' '));
    if (step[1] === 'netns') {
      t.same(step.slice(2), ['add', step[3]], 'netns add only');
      t.ok(ours.has(step[3]!));
    } else if (step[1] === '-n') {
      t.ok(ours.has(step[2]!), `${step.join(' ')} runs in a lab namespace`);
    } else {
      // `ip link add A netns X type veth peer name B netns Y`: both ends placed in lab namespaces.
      t.same(step.slice(1, 3), ['link', 'add'], step.join(' '));
      const placed = step.flatMap((word, i) => (word === 'netns' ? [step[i + 1]!] : []));
      t.equal(placed.length, 2, 'both veth ends are placed');
      for (const ns of placed) t.ok(ours.has(ns), `${ns} is a lab namespace`);
    }
  }
  const routes = steps.filter((s) => s.includes('route'));
  t.same(
    routes.map((s) => s.at(-1)),
    [lab.client.edgeAddr[4], lab.client.edgeAddr[6], lab.server.edgeAddr[4], lab.server.edgeAddr[6]],
    'each end routes through the edge, both families',
  );
  t.ok(steps.filter((s) => s.includes(lab.edgeNs) && s.includes('route')).length === 0, 'no route is added on the edge (it has both subnets on its links)');
  const netnsAdds = steps.map((s, i) => [s, i] as const).filter(([s]) => s[1] === 'netns');
  for (const [s, i] of netnsAdds) {
    const firstUse = steps.findIndex((x) => x !== s && x.includes(s[3]!));
    t.ok(firstUse > i, `${s[3]} exists before it is used`);
  }
});

t.test('inNetns: ip netns exec, the command and its arguments unchanged', async (t) => {
  t.same(inNetns('x', 'curl', ['-g', 'ftp://[fd00::1]/a']), ['ip', ['netns', 'exec', 'x', 'curl', '-g', 'ftp://[fd00::1]/a']]);
});
