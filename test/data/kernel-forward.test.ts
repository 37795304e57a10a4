/**
 * The kernel data path's nftables side (src/data/kernel-forward.ts): the scripts it writes,
 * which channels it refuses, the table's life cycle against a recording runner, and, as
 * root, the real libnftables in a network namespace of the test's own.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { KernelForwarder } from '../../src/data/kernel-forward.js';
import type { NftBatchRunner, NftResult, NftRunner } from '../../src/data/nft-runner.js';
import {
  COUNTER_SETS,
  CUT_HOLD_MS,
  addMappingScript,
  dnatKeyText,
  cutScript,
  getCountersScript,
  idleCountersScripts,
  listCounterScripts,
  parseCounters,
  payloadMoved,
  removeCountersScript,
  kernelPathBlocker,
  removeMappingScripts,
  removeSnatScript,
  staleTables,
  uncutScript,
  wireOf,
  tableName,
  tableScript,
  type ForwardMapping,
  type KernelPathFacts,
} from '../../src/data/kernel-nft.js';
import { isProxyError } from '../../src/errors.js';
import { labPrefix, netnsUnavailable, nftablesUnavailable } from '../helpers/netns.js';

/** A PASV/EPSV client at the edge: it opens, the target is vsftpd's passive port. */
const MAPPING: ForwardMapping = {
  opener: 'client',
  openerIp: '198.51.100.7',
  proxyIp: '203.0.113.10',
  proxyPort: 60001,
  targetIp: '10.20.0.5',
  targetPort: 31337,
  snatIp: '10.20.0.1',
};

/** A PORT client at the edge (upstream dataMode mirror): vsftpd opens, to our PORT on its side; the target is the client's PORT address. */
const ACTIVE: ForwardMapping = {
  opener: 'server',
  openerIp: '10.20.0.5',
  proxyIp: '10.20.0.1',
  proxyPort: 41000,
  targetIp: '198.51.100.7',
  targetPort: 50123,
  snatIp: '203.0.113.10',
};

/** An EPSV client over IPv6 (addresses written unnormalized: the scripts print them as nft does). */
const V6: ForwardMapping = {
  opener: 'client',
  openerIp: '2001:DB8:100:0:0:0:0:7',
  proxyIp: '2001:db8:100::10',
  proxyPort: 60001,
  targetIp: 'fd20::5',
  targetPort: 31337,
  snatIp: 'fd20::1',
};

/** The error `fn` throws, or null. */
function thrownBy(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  return null;
}

/** The error `promise` rejects with, or null. */
async function rejectionOf(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  return null;
}

/** A runner that records every script and answers from `answer` (default: success). */
function recordingRunner(answer: (script: string) => Partial<NftResult> = () => ({})): { run: NftRunner; scripts: string[] } {
  const scripts: string[] = [];
  const run: NftRunner = (script) => {
    scripts.push(script);
    return { ok: true, output: '', error: '', ...answer(script) };
  };
  return { run, scripts };
}

t.test('scripts', async (t) => {
  t.equal(tableName(4242), 'ftpnp_4242');
  const table = tableScript('ftpnp_1');
  t.match(table, /^add table inet ftpnp_1\ndelete table inet ftpnp_1\ntable inet ftpnp_1 \{/, 'a leftover table of the same name is replaced, never an error');
  for (const [suffix, addr, expr] of [['', 'ipv4_addr', 'ip'], ['6', 'ipv6_addr', 'ip6']] as const) {
    const family = suffix === '' ? 'IPv4' : 'IPv6';
    const type = `${addr} \\. ${addr} \\. inet_service`;
    t.match(table, new RegExp(`map dnat_to${suffix} \\{ type ${type} : ${addr} \\. inet_service; flags timeout; \\}`), `${family}: dnat_to${suffix}`);
    t.match(table, new RegExp(`map snat_to${suffix} \\{ type ${type} : ${addr}; \\}`), `${family}: SNAT elements are shared and counted, no timeout`);
    const dnat = `dnat ${expr} to ${expr} saddr \\. ${expr} daddr \\. tcp dport map @dnat_to${suffix}\n`;
    t.match(table, new RegExp(`hook prerouting priority dstnat; policy accept;\n(?:.*\n)*?    ${dnat}`), `${family}: remote openers`);
    t.match(table, new RegExp(`hook output priority -100; policy accept;\n(?:.*\n)*?    ${dnat}`), `${family}: openers on this host`);
    t.match(table, new RegExp(`hook postrouting priority srcnat; policy accept;\n(?:.*\n)*?    ct status dnat snat ${expr} to ${expr} saddr \\. ${expr} daddr \\. tcp dport map @snat_to${suffix}\n`), `${family}: SNAT only what we DNATed`);
    t.match(table, new RegExp(`map flows${suffix} \\{ type ct_dir \\. ${type} : verdict; flags timeout; counter; \\}`), `${family}: one counting map, keyed by direction too; cut elements expire by themselves`);
    t.match(table, new RegExp(`set ends${suffix} \\{ type ${type}; counter; \\}`), `${family}: FIN/RST counter set`);
    const key = `ct original ${expr} saddr \\. ct original ${expr} daddr \\. ct original proto-dst`;
    const n = suffix === '' ? 4 : 6;
    const lookup = `meta nfproto ipv${n} meta l4proto tcp ct direction . ${key.replaceAll('\\', '')} vmap @flows${suffix}`;
    for (const [chain, ours] of [['forward', 'ct status dnat'], ['filter_output', 'ct status dnat'], ['filter_input', 'ct status dnat iif != "lo"']] as const) {
      const rules = (new RegExp(`  chain ${chain} \\{\n((?:    .*\n)*)  \\}`).exec(table)?.[1] ?? '').split('\n').filter(Boolean).map((rule) => rule.trim());
      t.same(rules.slice(0, 2), [`type filter hook ${chain.replace('filter_', '')} priority filter; policy accept;`, `${ours} meta l4proto tcp tcp flags & (fin | rst) != 0 jump count_ends`], `${family} ${chain}: FIN/RST to count_ends first (a flags test for every other packet)`);
      t.ok(rules.includes(`${ours} ${lookup}`), `${family} ${chain}: then the one lookup, only for its own family's packets`);
      t.equal(rules.length, 4, `${family} ${chain}: nothing else per packet`);
    }
    t.match(table, new RegExp(`chain count_ends \\{\n(?:.*\n)*?    meta nfproto ipv${n} meta l4proto tcp ${key} @ends${suffix}\n`), `${family}: ends counts FIN and RST`);
  }
  t.match(table, /chain cut_reset \{ meta l4proto tcp tcp flags & rst == 0 reject with tcp reset; \}/, 'a cut connection is reset, but not our own reset');

  // A PORT client: the server opens to our port on its side and is sent on to the client's PORT address, from our client-side address.
  t.equal(
    addMappingScript('ftpnp_1', ACTIVE, 30000),
    [
      'add element inet ftpnp_1 snat_to { 10.20.0.5 . 198.51.100.7 . 50123 : 203.0.113.10 }',
      'create element inet ftpnp_1 dnat_to { 10.20.0.5 . 10.20.0.1 . 41000 timeout 30000ms : 198.51.100.7 . 50123 }',
      'add element inet ftpnp_1 flows { original . 10.20.0.5 . 10.20.0.1 . 41000 : accept, reply . 10.20.0.5 . 10.20.0.1 . 41000 : accept }',
      'add element inet ftpnp_1 ends { 10.20.0.5 . 10.20.0.1 . 41000 }',
    ].join('\n'),
    'active: keyed by the server (the opener), mapped to the client',
  );
  // IPv6: the family's own maps and sets; addresses as nft prints them (RFC 5952).
  t.equal(
    addMappingScript('ftpnp_1', V6, 30000),
    [
      'add element inet ftpnp_1 snat_to6 { 2001:db8:100::7 . fd20::5 . 31337 : fd20::1 }',
      'create element inet ftpnp_1 dnat_to6 { 2001:db8:100::7 . 2001:db8:100::10 . 60001 timeout 30000ms : fd20::5 . 31337 }',
      'add element inet ftpnp_1 flows6 { original . 2001:db8:100::7 . 2001:db8:100::10 . 60001 : accept, reply . 2001:db8:100::7 . 2001:db8:100::10 . 60001 : accept }',
      'add element inet ftpnp_1 ends6 { 2001:db8:100::7 . 2001:db8:100::10 . 60001 }',
    ].join('\n'),
    'IPv6: dnat_to6, snat_to6, flows6 and ends6',
  );
  t.equal(
    cutScript('ftpnp_1', V6, false, 5000),
    [
      'delete element inet ftpnp_1 flows6 { original . 2001:db8:100::7 . 2001:db8:100::10 . 60001 }',
      'delete element inet ftpnp_1 flows6 { reply . 2001:db8:100::7 . 2001:db8:100::10 . 60001 }',
      'delete element inet ftpnp_1 ends6 { 2001:db8:100::7 . 2001:db8:100::10 . 60001 }',
      'add element inet ftpnp_1 flows6 { original . 2001:db8:100::7 . 2001:db8:100::10 . 60001 timeout 5000ms : goto cut_reset, reply . 2001:db8:100::7 . 2001:db8:100::10 . 60001 timeout 5000ms : goto cut_reset }',
      'delete element inet ftpnp_1 dnat_to6 { 2001:db8:100::7 . 2001:db8:100::10 . 60001 }',
    ].join('\n'),
  );
  t.equal(uncutScript('ftpnp_1', V6), ['delete element inet ftpnp_1 flows6 { original . 2001:db8:100::7 . 2001:db8:100::10 . 60001 }', 'delete element inet ftpnp_1 flows6 { reply . 2001:db8:100::7 . 2001:db8:100::10 . 60001 }'].join('\n'));
  t.equal(uncutScript('ftpnp_1', MAPPING), ['delete element inet ftpnp_1 flows { original . 198.51.100.7 . 203.0.113.10 . 60001 }', 'delete element inet ftpnp_1 flows { reply . 198.51.100.7 . 203.0.113.10 . 60001 }'].join('\n'));
  t.same(removeMappingScripts('ftpnp_1', V6), ['delete element inet ftpnp_1 dnat_to6 { 2001:db8:100::7 . 2001:db8:100::10 . 60001 }', 'delete element inet ftpnp_1 snat_to6 { 2001:db8:100::7 . fd20::5 . 31337 }']);

  const counters = ['add element inet ftpnp_1 flows { original . 198.51.100.7 . 203.0.113.10 . 60001 : accept, reply . 198.51.100.7 . 203.0.113.10 . 60001 : accept }', 'add element inet ftpnp_1 ends { 198.51.100.7 . 203.0.113.10 . 60001 }'];
  t.equal(
    addMappingScript('ftpnp_1', MAPPING, 30000),
    [
      'add element inet ftpnp_1 snat_to { 198.51.100.7 . 10.20.0.5 . 31337 : 10.20.0.1 }',
      'create element inet ftpnp_1 dnat_to { 198.51.100.7 . 203.0.113.10 . 60001 timeout 30000ms : 10.20.0.5 . 31337 }',
      ...counters,
    ].join('\n'),
    'SNAT first: the DNAT element must never exist without its SNAT partner (one transaction anyway); the counters with them',
  );
  const removeCounters = [
    'delete element inet ftpnp_1 flows { original . 198.51.100.7 . 203.0.113.10 . 60001 }',
    'delete element inet ftpnp_1 flows { reply . 198.51.100.7 . 203.0.113.10 . 60001 }',
    'delete element inet ftpnp_1 ends { 198.51.100.7 . 203.0.113.10 . 60001 }',
  ];
  t.equal(removeCountersScript('ftpnp_1', MAPPING), removeCounters.join('\n'));
  t.equal(
    getCountersScript('ftpnp_1', MAPPING),
    ['get element inet ftpnp_1 flows { original . 198.51.100.7 . 203.0.113.10 . 60001, reply . 198.51.100.7 . 203.0.113.10 . 60001 }', 'get element inet ftpnp_1 ends { 198.51.100.7 . 203.0.113.10 . 60001 }'].join('\n'),
  );
  t.same(idleCountersScripts('ftpnp_1', 4), ['list map inet ftpnp_1 flows'], 'the idle check lists the one map');
  t.same(idleCountersScripts('ftpnp_1', 6), ['list map inet ftpnp_1 flows6']);
  t.same(listCounterScripts('ftpnp_1', 4, ['original', 'reply', 'ends']), ['list map inet ftpnp_1 flows', 'list set inet ftpnp_1 ends'], 'one script each (nft 1.0.6 fails several list commands in one script)');
  t.same(listCounterScripts('ftpnp_1', 6, ['ends']), ['list set inet ftpnp_1 ends6']);
  t.equal(
    cutScript('ftpnp_1', MAPPING),
    [
      ...removeCounters,
      `add element inet ftpnp_1 flows { original . 198.51.100.7 . 203.0.113.10 . 60001 timeout ${CUT_HOLD_MS}ms : goto cut_reset, reply . 198.51.100.7 . 203.0.113.10 . 60001 timeout ${CUT_HOLD_MS}ms : goto cut_reset }`,
      'delete element inet ftpnp_1 dnat_to { 198.51.100.7 . 203.0.113.10 . 60001 }',
      'delete element inet ftpnp_1 snat_to { 198.51.100.7 . 10.20.0.5 . 31337 }',
    ].join('\n'),
    'cut: counters gone, reset from now on, no new connection',
  );
  t.notMatch(cutScript('ftpnp_1', MAPPING, false), /snat_to/, 'a shared SNAT element stays');
  t.same(removeMappingScripts('ftpnp_1', MAPPING, false), ['delete element inet ftpnp_1 dnat_to { 198.51.100.7 . 203.0.113.10 . 60001 }'], 'nor removed while held');
  t.match(addMappingScript('ftpnp_1', MAPPING, 250), /timeout 1000ms/, 'at least a second: a shorter timeout would race the 227');
  t.match(addMappingScript('ftpnp_1', MAPPING, 1500.2), /timeout 1501ms/, 'whole milliseconds');
  t.same(removeMappingScripts('ftpnp_1', MAPPING), [
    'delete element inet ftpnp_1 dnat_to { 198.51.100.7 . 203.0.113.10 . 60001 }',
    'delete element inet ftpnp_1 snat_to { 198.51.100.7 . 10.20.0.5 . 31337 }',
  ]);
});

/** nft 1.0.6 output as seen on the test machine: `list table` (maps, sets, a multi-line set). */
const LIST_TABLE = `table inet ftpnp_7 {
	map dnat_to {
		type ipv4_addr . ipv4_addr . inet_service : ipv4_addr . inet_service
		flags timeout
		elements = { 10.1.0.4 . 10.1.0.1 . 40001 timeout 30s expires 29s992ms : 10.2.0.5 . 5000 }
	}

	map snat_to {
		type ipv4_addr . ipv4_addr . inet_service : ipv4_addr
		elements = { 10.1.0.2 . 10.2.0.5 . 5000 : 10.2.0.1 }
	}

	map flows {
		type ct_dir . ipv4_addr . ipv4_addr . inet_service : verdict
		flags timeout
		counter
		elements = { original . 10.1.0.3 . 10.1.0.1 . 21 counter packets 0 bytes 0 : accept,
			     original . 10.1.0.2 . 10.1.0.1 . 6000 counter packets 50 bytes 1002608 : accept,
			     reply . 10.1.0.2 . 10.1.0.1 . 6000 counter packets 56 bytes 2002920 : accept,
			     original . 192.168.100.200 . 10.1.0.1 . 65535 counter packets 3 bytes 156 : accept,
			     original . 10.1.0.4 . 10.1.0.1 . 40001 counter packets 0 bytes 0 timeout 2m10s expires 2m6s708ms : goto cut_reset,
			     reply . 10.1.0.4 . 10.1.0.1 . 40001 counter packets 9 bytes 468 timeout 2m10s expires 2m6s708ms : goto cut_reset }
	}

	set ends {
		type ipv4_addr . ipv4_addr . inet_service
		counter
		elements = { 10.1.0.2 . 10.1.0.1 . 6000 counter packets 2 bytes 104 }
	}

	map flows6 {
		type ct_dir . ipv6_addr . ipv6_addr . inet_service : verdict
		flags timeout
		counter
		elements = { original . 2001:db8:100::7 . 2001:db8:100::10 . 60001 counter packets 4 bytes 320 : accept, original . ::ffff:1.2.3.4 . fd20::1 . 41000 counter packets 1 bytes 80 : accept }
	}

	set ends6 {
		type ipv6_addr . ipv6_addr . inet_service
		counter
	}

	set original {
		type ipv4_addr . ipv4_addr . inet_service
		counter
		elements = { 10.9.9.9 . 10.1.0.1 . 6000 counter packets 5 bytes 500 }
	}

	chain count {
		meta l4proto tcp ct direction original ct original ip saddr . ct original ip daddr . ct original proto-dst @original
	}
}
`;

/** `get element` output as nft 1.0.6 prints it: no `counter` line in the header. */
const GET_ELEMENT = `table inet ftpnp_7 {
	map flows {
		type ct_dir . ipv4_addr . ipv4_addr . inet_service : verdict
		flags timeout
		elements = { original . 10.1.0.4 . 10.1.0.1 . 40001 counter packets 7 bytes 1234 : accept,
			     reply . 10.1.0.4 . 10.1.0.1 . 40001 counter packets 9 bytes 56789 : accept }
	}
}
table inet ftpnp_7 {
	set ends {
		type ipv4_addr . ipv4_addr . inet_service
		elements = { 10.1.0.4 . 10.1.0.1 . 40001 counter packets 1 bytes 52 }
	}
}
`;

t.test('parseCounters: every form nft prints', async (t) => {
  const table = parseCounters(LIST_TABLE);
  t.same([...table.keys()].sort(), ['ends', 'original', 'original6', 'reply'], 'the counters of flows and ends; a set that is not ours, the NAT maps and cut elements are not counters');
  t.same(Object.fromEntries(table.get('original6')!), {
    '2001:db8:100::7 . 2001:db8:100::10 . 60001': { packets: 4, bytes: 320 },
    '::ffff:1.2.3.4 . fd20::1 . 41000': { packets: 1, bytes: 80 },
  }, 'IPv6 elements, one with a dotted tail');
  t.same(Object.fromEntries(table.get('original')!), {
    '10.1.0.3 . 10.1.0.1 . 21': { packets: 0, bytes: 0 },
    '10.1.0.2 . 10.1.0.1 . 6000': { packets: 50, bytes: 1002608 },
    '192.168.100.200 . 10.1.0.1 . 65535': { packets: 3, bytes: 156 },
  }, 'several elements, comma-separated over several lines');
  t.same(Object.fromEntries(table.get('reply')!), { '10.1.0.2 . 10.1.0.1 . 6000': { packets: 56, bytes: 2002920 } }, 'the reply direction by itself; the cut element (goto) is skipped');
  t.notOk(table.has('ends6'), 'a set without elements adds nothing');
  t.same(Object.fromEntries(table.get('ends')!), { '10.1.0.2 . 10.1.0.1 . 6000': { packets: 2, bytes: 104 } });
  const got = parseCounters(GET_ELEMENT);
  t.same(got.get('original')?.get('10.1.0.4 . 10.1.0.1 . 40001'), { packets: 7, bytes: 1234 }, 'get element: one table block per command');
  t.same(got.get('reply')?.get('10.1.0.4 . 10.1.0.1 . 40001'), { packets: 9, bytes: 56789 });
  t.same(got.get('ends')?.get('10.1.0.4 . 10.1.0.1 . 40001'), { packets: 1, bytes: 52 });
  t.same(parseCounters('').size, 0, 'nothing');
  t.equal(dnatKeyText({ openerIp: '10.1.0.2', proxyIp: '10.1.0.1', proxyPort: 6000 }), '10.1.0.2 . 10.1.0.1 . 6000', 'the key as nft prints it');
  t.equal(dnatKeyText({ openerIp: '2001:0DB8:100::0:7', proxyIp: '::ffff:10.1.0.1', proxyPort: 6000 }), '2001:db8:100::7 . 10.1.0.1 . 6000', 'normalized as the proxy sees addresses');
  // Split anywhere inside an element's line, the element is lost, never misread.
  for (const [header, line, name] of [
    ['\tmap flows {', '\t\telements = { original . 10.1.0.2 . 10.1.0.1 . 6000 counter packets 50 bytes 1002608 : accept }', 'original'],
    ['\tmap flows {', '\t\telements = { reply . 10.1.0.2 . 10.1.0.1 . 6000 counter packets 50 bytes 1002608 timeout 2m10s expires 2m6s708ms : goto cut_reset }', null],
    ['\tset ends {', '\t\telements = { 10.1.0.2 . 10.1.0.1 . 6000 counter packets 50 bytes 1002608 }', 'ends'],
  ] as const) {
    let found = 0;
    for (let cut = 1; cut < line.length; cut++) {
      const parsed = parseCounters(`${header}\n${line.slice(0, cut)}\n${line.slice(cut)}\n\t}`);
      for (const [set, elements] of parsed) {
        const seen = elements.get('10.1.0.2 . 10.1.0.1 . 6000');
        if (!seen) continue;
        found += 1;
        if (set !== name || seen.packets !== 50 || seen.bytes !== 1002608) t.fail(`split at ${cut} misread as ${set}: ${JSON.stringify(seen)}`);
      }
    }
    t.ok(found < line.length - 1, `${name ?? 'a cut element'}: a split line loses the element (${found} of ${line.length - 1} splits still read it whole)`);
    t.same(Object.fromEntries(parseCounters(`${header}\n${line}\n\t}`).get(name ?? 'reply') ?? []), name ? { '10.1.0.2 . 10.1.0.1 . 6000': { packets: 50, bytes: 1002608 } } : {}, `${name ?? 'a cut element'}: read whole when not split`);
  }
});

/** A `list map`/`list set`/`get element` answer with these counters for MAPPING's key. */
function countersOutput(c: Partial<Record<(typeof COUNTER_SETS)[number], [number, number]>>): string {
  const key = dnatKeyText(MAPPING);
  const flows = (['original', 'reply'] as const).flatMap((direction) => {
    const value = c[direction];
    return value ? [`${direction} . ${key} counter packets ${value[0]} bytes ${value[1]} : accept`] : [];
  });
  const ends = c.ends ? `\t\telements = { ${key} counter packets ${c.ends[0]} bytes ${c.ends[1]} }\n` : '';
  return [`\tmap flows {\n\t\tcounter\n${flows.length ? `\t\telements = { ${flows.join(',\n\t\t\t     ')} }\n` : ''}\t}`, `\tset ends {\n\t\tcounter\n${ends}\t}`].join('\n');
}

t.test('KernelForwarder: idle cut and byte counts against a scripted nft', async (t) => {
  await t.test('no payload for idleMs once connected: cut once, counters read, then only the cut key left to remove', async (t) => {
    let now = 1000;
    let listing = countersOutput({});
    const { run, scripts } = recordingRunner((script) => (script.startsWith('list map inet ftpnp_8 ') || script.startsWith('get element') ? { output: listing } : {}));
    const forwarder = new KernelForwarder(run, { pid: 8, now: () => now, autoPoll: false });
    const forward = await forwarder.forward(MAPPING, 5000);
    let idle = 0;
    forwarder.poll();
    t.notOk(scripts.some((x) => /^(list (map|set)|get)/.test(x)), 'nothing watched: no listing at all');
    forward.watchIdle(3000, () => (idle += 1));
    now += 10000;
    forwarder.poll();
    t.equal(idle, 0, 'nobody connected yet: not idle (the accept timeout is another matter)');
    listing = countersOutput({ original: [3, 1180], reply: [2, 120] });
    forwarder.poll();
    now += 2999;
    forwarder.poll();
    t.equal(idle, 0, 'payload moved 2999 ms ago (1180 bytes in 3 packets: more than headers)');
    listing = countersOutput({ original: [6, 1300], reply: [9, 8000] });
    now += 2000;
    forwarder.poll();
    now += 2999;
    forwarder.poll();
    t.equal(idle, 0, 'payload moved toward the opener: the clock started again');
    listing = countersOutput({ original: [8, 1404], reply: [12, 8156] });
    const before = scripts.length;
    now += 1;
    forwarder.poll();
    t.equal(idle, 1, 'idle for 3000 ms: cut (2 and 3 more packets of 52 bytes: ACKs and zero-window probes are not payload)');
    t.same(scripts.slice(before), [...idleCountersScripts('ftpnp_8', 4), cutScript('ftpnp_8', MAPPING)], 'the flows map listed (both directions: nothing else to read), the cut (counters out, cut elements in)');
    t.same(await forward.wireBytes, { toClient: 8156, toServer: 1404 }, 'the counts as last listed');
    t.equal(forwarder.active, 0);
    now += 10000;
    forwarder.poll();
    t.equal(idle, 1, 'cut once');
    forward.remove();
    forward.remove();
    t.same(scripts.at(-1), uncutScript('ftpnp_8', MAPPING), 'the final reply came: the cut elements go early');
    forwarder.close();
  });

  await t.test('a cut whose DNAT element already expired still cuts (one by one)', async (t) => {
    const listing = countersOutput({ original: [3, 180] });
    const { run, scripts } = recordingRunner((script) =>
      script.startsWith('list map inet ftpnp_8 ') ? { output: listing } : script.includes('delete element inet ftpnp_8 dnat_to') ? { ok: false, error: 'No such file or directory' } : {},
    );
    let now = 0;
    const forwarder = new KernelForwarder(run, { pid: 8, now: () => now, autoPoll: false });
    const forward = await forwarder.forward(MAPPING, 5000);
    forward.watchIdle(1000, () => {});
    forwarder.poll();
    now = 1000;
    forwarder.poll();
    const lines = cutScript('ftpnp_8', MAPPING).split('\n');
    t.equal(lines.length, 6);
    t.ok(lines.every((line) => scripts.includes(line)), 'each line alone after the transaction failed');
    forwarder.close();
  });

  await t.test('remove(awaitEndMs): counts at the next poll when both FINs passed, else at the poll that sees them, else at the deadline', async (t) => {
    let now = 0;
    let answer = countersOutput({ original: [10, 1000], reply: [20, 50000], ends: [2, 104] });
    const { run, scripts } = recordingRunner((script) => (script.startsWith('get element') ? { output: answer } : {}));
    const forwarder = new KernelForwarder(run, { pid: 8, now: () => now, autoPoll: false });
    const pending = (wire: Promise<unknown>): Promise<unknown> => Promise.race([wire, new Promise((resolve) => setImmediate(() => resolve('pending')))]);
    const done = await forwarder.forward(MAPPING, 5000);
    done.watchIdle(60000, () => {});
    const before = scripts.length;
    done.remove(5000);
    t.same(scripts.slice(before), [removeMappingScripts('ftpnp_8', MAPPING).join('\n')], 'remove reads nothing itself (a get after a change reloads the whole set)');
    t.equal(await pending(done.wireBytes), 'pending');
    forwarder.poll();
    t.same(await done.wireBytes, { toClient: 50000, toServer: 1000 }, 'ended: read with get element at the next poll');
    t.equal(scripts.at(-2), getCountersScript('ftpnp_8', MAPPING));
    t.equal(scripts.at(-1), removeCountersScript('ftpnp_8', MAPPING));

    answer = countersOutput({ original: [10, 1000], reply: [20, 50000], ends: [1, 52] });
    const tail = await forwarder.forward(MAPPING, 5000);
    tail.watchIdle(60000, () => {});
    tail.remove(5000);
    forwarder.poll();
    t.equal(await pending(tail.wireBytes), 'pending', 'the server\'s FIN has not passed yet: wait');
    answer = countersOutput({ original: [11, 1052], reply: [25, 70000], ends: [2, 104] });
    forwarder.poll();
    t.same(await tail.wireBytes, { toClient: 70000, toServer: 1052 }, 'the tail counted');

    answer = countersOutput({ original: [10, 1000], reply: [20, 50000] });
    const hung = await forwarder.forward(MAPPING, 5000);
    hung.watchIdle(60000, () => {});
    hung.remove(5000);
    now += 4999;
    forwarder.poll();
    t.equal(await pending(hung.wireBytes), 'pending');
    now += 1;
    forwarder.poll();
    t.same(await hung.wireBytes, { toClient: 50000, toServer: 1000 }, 'at the deadline, whatever was counted');

    const failed = await forwarder.forward(MAPPING, 5000);
    failed.watchIdle(60000, () => {});
    failed.remove();
    forwarder.poll();
    t.same(await failed.wireBytes, { toClient: 50000, toServer: 1000 }, 'a failed transfer (no wait): at the next poll');

    answer = countersOutput({});
    const unused = await forwarder.forward(MAPPING, 5000);
    unused.watchIdle(60000, () => {});
    unused.remove(5000);
    forwarder.poll();
    t.same(await unused.wireBytes, { toClient: 0, toServer: 0 }, 'no connection was ever made: settled at once, not after the wait');
    forwarder.close();
  });

  await t.test('a port leased again while its last transfer waits for its FINs: the old count is read now, the new one starts from zero', async (t) => {
    let answer = countersOutput({ original: [10, 1000], reply: [20, 50000] });
    const { run, scripts } = recordingRunner((script) => (script.startsWith('list map inet ftpnp_8 ') || script.startsWith('get element') ? { output: answer } : {}));
    const forwarder = new KernelForwarder(run, { pid: 8, autoPoll: false });
    const first = await forwarder.forward(MAPPING, 5000);
    first.watchIdle(60000, () => {});
    first.remove(10000);
    let settled: unknown = 'pending';
    void first.wireBytes.then((wire) => (settled = wire));
    await Promise.resolve();
    t.equal(settled, 'pending', 'the first waits for its FINs');
    answer = countersOutput({ original: [11, 1052], reply: [24, 60000] });
    const before = scripts.length;
    const second = await forwarder.forward(MAPPING, 5000);
    t.same(scripts.slice(before), [getCountersScript('ftpnp_8', MAPPING), removeCountersScript('ftpnp_8', MAPPING), addMappingScript('ftpnp_8', MAPPING, 5000)], 'read, deleted, then the new mapping with fresh counters');
    t.same(await first.wireBytes, { toClient: 60000, toServer: 1052 }, 'the first counts what passed until the port was leased again');
    answer = countersOutput({ original: [3, 300], reply: [4, 4000], ends: [2, 104] });
    second.watchIdle(60000, () => {});
    second.remove(10000);
    forwarder.poll();
    t.same(await second.wireBytes, { toClient: 4000, toServer: 300 }, 'the second has its own');
    forwarder.close();
  });

  await t.test('a port leased again while its cut transfer awaits its final reply: the key leaves `cut` first', async (t) => {
    let now = 0;
    const answer = countersOutput({ original: [3, 180], reply: [2, 120] });
    const { run, scripts } = recordingRunner((script) => (script.startsWith('list map inet ftpnp_8 ') || script.startsWith('get element') ? { output: answer } : {}));
    const forwarder = new KernelForwarder(run, { pid: 8, now: () => now, autoPoll: false });
    const stalled = await forwarder.forward(MAPPING, 5000);
    let idle = 0;
    stalled.watchIdle(1000, () => (idle += 1));
    forwarder.poll();
    now += 2000;
    forwarder.poll();
    t.equal(idle, 1, 'cut');
    const before = scripts.length;
    const next = await forwarder.forward(MAPPING, 5000);
    t.same(scripts.slice(before), [uncutScript('ftpnp_8', MAPPING), addMappingScript('ftpnp_8', MAPPING, 5000)], 'the cut elements go, so the new connection is not reset (an add would leave them as they are)');
    const after = scripts.length;
    stalled.remove();
    t.equal(scripts.length, after, 'the cut transfer\'s own remove has nothing left to do');
    next.remove();
    forwarder.close();
  });

  await t.test('many transfers waiting for their FINs at once: one listing of flows and one of ends serve them all', async (t) => {
    const mappings = Array.from({ length: 40 }, (_, i): ForwardMapping => ({ ...MAPPING, proxyPort: 61000 + i }));
    let ends = 1;
    const listing = (name: string): string =>
      name === 'ends'
        ? `\tset ends {\n\t\telements = { ${mappings.map((m) => `${dnatKeyText(m)} counter packets ${ends} bytes ${ends * 52}`).join(',\n\t\t\t')} }\n\t}`
        : `\tmap flows {\n\t\telements = { ${mappings.flatMap((m, i) => [`original . ${dnatKeyText(m)} counter packets 10 bytes ${1000 + i} : accept`, `reply . ${dnatKeyText(m)} counter packets 10 bytes ${50000 + i} : accept`]).join(',\n\t\t\t')} }\n\t}`;
    const { run, scripts } = recordingRunner((script) => {
      const listed = /^list (?:set|map) inet ftpnp_8 (\w+)$/.exec(script);
      if (listed) return { output: listing(listed[1]!) };
      return script.startsWith('get element') ? { output: `${listing('flows')}\n${listing('ends')}` } : {};
    });
    let now = 0;
    const forwarder = new KernelForwarder(run, { pid: 8, now: () => now, autoPoll: false });
    const forwards = await Promise.all(mappings.map((m) => forwarder.forward(m, 5000)));
    for (const forward of forwards) {
      forward.watchIdle(600000, () => {});
      forward.remove(10000);
    }
    const before = scripts.length;
    forwarder.poll();
    t.same(scripts.slice(before), ['list map inet ftpnp_8 flows', 'list set inet ftpnp_8 ends'], 'two listings, no get per transfer; nobody ended yet');
    ends = 2;
    now += 250;
    forwarder.poll();
    const wires = await Promise.all(forwards.map((forward) => forward.wireBytes));
    t.same(wires[0], { toServer: 1000, toClient: 50000 });
    t.same(wires[39], { toServer: 1039, toClient: 50039 }, 'each its own counts');
    t.equal(scripts.at(-1)!.split('\n').length, 40 * 3, 'their counters (two flows elements and one ends element each) deleted in one transaction');
    forwarder.close();
  });

  await t.test('close settles what still waits, with null', async (t) => {
    const { run } = recordingRunner((script) => (script.startsWith('get element') ? { output: countersOutput({ original: [1, 60] }) } : {}));
    const forwarder = new KernelForwarder(run, { pid: 8, autoPoll: false });
    const forward = await forwarder.forward(MAPPING, 5000);
    forward.watchIdle(60000, () => {});
    forward.remove(5000);
    forwarder.close();
    t.equal(await forward.wireBytes, null);
  });

  await t.test('a failed listing is reported once per streak; watching goes on', async (t) => {
    let ok = false;
    const { run } = recordingRunner((script) => (script.startsWith('list map inet ftpnp_8 ') ? (ok ? { output: countersOutput({}) } : { ok: false, error: 'busy' }) : {}));
    const warnings: string[] = [];
    const forwarder = new KernelForwarder(run, { pid: 8, autoPoll: false, onWarning: (m) => warnings.push(m) });
    (await forwarder.forward(MAPPING, 5000)).watchIdle(1000, () => {});
    forwarder.poll();
    forwarder.poll();
    ok = true;
    forwarder.poll();
    ok = false;
    forwarder.poll();
    t.same(warnings, ['could not read the kernel data path counters', 'could not read the kernel data path counters']);
    forwarder.close();
  });
});

t.test('staleTables: ours, of dead processes, never our own', async (t) => {
  const listing = ['table ip filter', 'table ip ftpnp_100', 'table ip ftpnp_200', 'table ip ftpnp_300 ', 'table inet ftpnp_400', 'table ip ftpnp_x', 'table ip ftpnp_500'].join('\n');
  const alive = new Set([200]);
  t.same(staleTables(listing, (pid) => alive.has(pid), 500), [
    { family: 'ip', name: 'ftpnp_100' },
    { family: 'ip', name: 'ftpnp_300' },
    { family: 'inet', name: 'ftpnp_400' },
  ], 'ip tables of older versions and inet tables alike');
  t.same(staleTables('', () => false, 1), []);
});

t.test('kernelPathBlocker', async (t) => {
  const base: KernelPathFacts = {
    clientMode: 'passive',
    upstreamMode: 'passive',
    clientIp: '198.51.100.7',
    proxyClientSideIp: '203.0.113.10',
    serverIp: '10.20.0.5',
    proxyServerSideIp: '10.20.0.1',
    proxyProtocol: false,
  };
  const v6 = { clientIp: '2001:db8:100::7', proxyClientSideIp: '2001:db8:100::10', serverIp: 'fd20::5', proxyServerSideIp: 'fd20::1' };
  const noV6 = (family: 4 | 6): string | null => (family === 6 ? 'net.ipv6.conf.all.forwarding is 0' : null);
  const cases: Array<[string, Partial<KernelPathFacts>, [string, RegExp] | null]> = [
    ['edge PASV, all IPv4', {}, null],
    ['edge PORT with upstream mirror/active', { clientMode: 'active', upstreamMode: 'active' }, null],
    ['edge EPSV, all IPv6', v6, null],
    ['edge EPRT, all IPv6', { ...v6, clientMode: 'active', upstreamMode: 'active' }, null],
    ['all on loopback (the benchmark)', { clientIp: '127.0.0.1', proxyClientSideIp: '127.0.0.1', serverIp: '127.0.0.1', proxyServerSideIp: '127.0.0.1' }, null],
    ['all on ::1, IPv6 forwarding off: nothing is forwarded', { clientIp: '::1', proxyClientSideIp: '::1', serverIp: '::1', proxyServerSideIp: '::1', familyBlocked: noV6 }, null],
    ['IPv4 while IPv6 forwarding is off', { familyBlocked: noV6 }, null],
    ['PROXY protocol', { proxyProtocol: true }, ['proxy-protocol', /PROXY protocol/]],
    ['TLS data', { tls: true }, ['tls', /TLS data/]],
    ['PASV client, server connects too', { upstreamMode: 'active' }, ['both-connect', /both connect/]],
    ['PORT client, server listens too', { clientMode: 'active' }, ['both-listen', /both wait/]],
    ['PORT client whose firewall wants port 20', { clientMode: 'active', upstreamMode: 'active', dataSourcePort: 20 }, ['source-port', /dataSourcePort 20/]],
    ['PASV client with dataSourcePort set (only active data is dialled from it)', { dataSourcePort: 20 }, null],
    ['IPv6 client, IPv4 server', { clientIp: '2001:db8::7', proxyClientSideIp: '2001:db8::10' }, ['mixed-family', /server address 10\.20\.0\.5 is not IPv6/]],
    ['IPv4 client, IPv6 server', { serverIp: 'fd00::5', proxyServerSideIp: 'fd00::1' }, ['mixed-family', /server address fd00::5 is not IPv4/]],
    ['IPv6 upstream side only', { proxyServerSideIp: 'fd00::1' }, ['mixed-family', /upstream-side address/]],
    ['remote client, loopback server', { serverIp: '127.0.0.1', proxyServerSideIp: '127.0.0.1' }, ['loopback', /one side is on loopback/]],
    ['loopback client, remote server', { clientIp: '127.0.0.1', proxyClientSideIp: '127.0.0.1' }, ['loopback', /one side is on loopback/]],
    ['IPv6 while IPv6 forwarding is off', { ...v6, familyBlocked: noV6 }, ['host', /forwarding is 0/]],
  ];
  for (const [name, change, expected] of cases) {
    const blocker = kernelPathBlocker({ ...base, ...change });
    if (expected) {
      t.equal(blocker?.reason, expected[0], `${name}: ${expected[0]}`);
      t.match(blocker?.detail, expected[1], `${name}: says why`);
    } else {
      t.equal(blocker, null, name);
    }
  }
});

t.test('wireOf: the opener\'s direction is the original one', async (t) => {
  const counters = { original: { packets: 10, bytes: 1000 }, reply: { packets: 5, bytes: 300 }, ends: { packets: 2, bytes: 104 } };
  t.same(wireOf(counters, 'client'), { toServer: 1000, toClient: 300 }, 'PASV: the client opened');
  t.same(wireOf(counters, 'server'), { toClient: 1000, toServer: 300 }, 'PORT: the server opened');
});

t.test('payloadMoved: more bytes than headers alone, in either direction', async (t) => {
  const at = (o: [number, number], r: [number, number]) => ({ original: { packets: o[0], bytes: o[1] }, reply: { packets: r[0], bytes: r[1] } });
  const start = at([10, 5000], [8, 416]);
  const cases: Array<[string, ReturnType<typeof at>, 4 | 6, boolean]> = [
    ['nothing passed', start, 4, false],
    ['one full-size segment (1448 bytes of payload) from the opener', at([11, 6500], [8, 416]), 4, true],
    ['toward the opener, a GRO aggregate counted as one packet', at([10, 5000], [9, 65_536 + 416]), 4, true],
    ['ACKs only, with timestamps (52 bytes each)', at([13, 5156], [10, 520]), 4, false],
    ['ACKs carrying every TCP option there is (80 bytes)', at([13, 5240], [8, 416]), 4, false],
    ['81 bytes in one IPv4 packet: at least one byte of payload', at([11, 5081], [8, 416]), 4, true],
    ['Windows zero-window probes: one byte of payload, no timestamps (41 bytes)', at([14, 5164], [12, 576]), 4, false],
    ['an IPv6 ACK with every option (100 bytes)', at([11, 5100], [8, 416]), 6, false],
    ['101 bytes in one IPv6 packet', at([11, 5101], [8, 416]), 6, true],
    ['counters deleted and added again (smaller than before)', at([1, 60], [0, 0]), 4, false],
    ['a trickle of 20-byte segments with their ACKs: the blind spot', at([20, 5000 + 10 * 72], [18, 416 + 10 * 52]), 4, false],
  ];
  for (const [name, after, family, moved] of cases) t.equal(payloadMoved(start, after, family), moved, name);
});

t.test('KernelForwarder with a recording runner', async (t) => {
  await t.test('creates its table, removes stale ones, maps, unmaps once, deletes the table once', async (t) => {
    const { run, scripts } = recordingRunner((script) => (script === 'list tables' ? { output: 'table ip ftpnp_1\ntable inet ftpnp_77\n' } : {}));
    const warnings: string[] = [];
    const forwarder = new KernelForwarder(run, { pid: 77, isAlive: () => false, onWarning: (message, detail) => warnings.push(`${message} ${JSON.stringify(detail)}`) });
    t.equal(forwarder.table, 'ftpnp_77');
    t.same(scripts.slice(0, 2), ['list tables', 'delete table ip ftpnp_1'], 'the dead proxy 1 loses its table; our own name is not "stale"');
    t.equal(scripts[2], tableScript('ftpnp_77'));
    t.match(warnings[0], /ftpnp_1/);
    const forward = await forwarder.forward(MAPPING, 5000);
    t.equal(scripts[3], addMappingScript('ftpnp_77', MAPPING, 5000));
    t.equal(forwarder.active, 1);
    forward.remove();
    forward.remove();
    t.same(scripts.slice(4), [removeMappingScripts('ftpnp_77', MAPPING).join('\n'), removeCountersScript('ftpnp_77', MAPPING)], 'removed once, in one transaction; no transfer, so the counters go unread');
    t.equal(await forward.wireBytes, null, 'no transfer used it: no wire bytes');
    t.equal(forwarder.active, 0);
    forwarder.close();
    forwarder.close();
    t.same(scripts.slice(6), ['delete table inet ftpnp_77'], 'table deleted once');
    await t.rejects(forwarder.forward(MAPPING, 5000), /closed/, 'no mapping after close');
  });

  await t.test('two mappings to the same server port share one SNAT element (vsftpd reuses a port once accepted)', async (t) => {
    const { run, scripts } = recordingRunner();
    const forwarder = new KernelForwarder(run, { pid: 6 });
    const second: ForwardMapping = { ...MAPPING, proxyPort: 60002 };
    const a = await forwarder.forward(MAPPING, 5000);
    const b = await forwarder.forward(second, 5000);
    t.equal(scripts.at(-1), addMappingScript('ftpnp_6', second, 5000), 'the second adds the SNAT element too (`add` of one that exists changes nothing; adds run batched, none counts on another)');
    a.remove();
    t.equal(scripts.at(-2), removeMappingScripts('ftpnp_6', MAPPING, false).join('\n'), 'the first goes without the shared SNAT element');
    b.remove();
    t.equal(scripts.at(-2), removeMappingScripts('ftpnp_6', second, true).join('\n'), 'the last holder takes it');
    const other = await forwarder.forward(MAPPING, 5000);
    t.equal(scripts.at(-1), addMappingScript('ftpnp_6', MAPPING, 5000), 'and the next one adds it again');
    const err = await rejectionOf(forwarder.forward({ ...MAPPING, proxyPort: 60003, snatIp: '10.20.0.2' }, 5000));
    t.match((err as Error).message, /already sent from 10\.20\.0\.1, not 10\.20\.0\.2/, 'a different source for the same server port is refused (relayed)');
    other.remove();
  });

  await t.test('removing a mapping after close touches nothing (the table took it)', async (t) => {
    const { run, scripts } = recordingRunner();
    const forwarder = new KernelForwarder(run, { pid: 5 });
    const forward = await forwarder.forward(MAPPING, 5000);
    forwarder.close();
    const before = scripts.length;
    forward.remove();
    t.equal(scripts.length, before);
  });

  await t.test('an expired element does not stop the other one from going', async (t) => {
    const { run, scripts } = recordingRunner((script) => (script.startsWith('delete element inet ftpnp_5 dnat_to') ? { ok: false, error: 'No such file or directory' } : {}));
    const forwarder = new KernelForwarder(run, { pid: 5 });
    (await forwarder.forward(MAPPING, 5000)).remove();
    const [dnat, snat] = removeMappingScripts('ftpnp_5', MAPPING);
    t.same(scripts.slice(-4, -1), [`${dnat}\n${snat}`, dnat, snat], 'the transaction failed as a whole, then one by one');
  });

  await t.test('failures carry FTPP_ERR_KERNEL_PATH and nft\'s words', async (t) => {
    const cases: Array<[string, (script: string) => Partial<NftResult>, RegExp]> = [
      ['no permission to list', (s) => (s.startsWith('list') ? { ok: false, error: 'Operation not permitted' } : {}), /cannot list nftables tables: Operation not permitted \(needs CAP_NET_ADMIN\)/],
      ['table refused', (s) => (s.startsWith('add table') ? { ok: false, error: 'Could not process rule: No such file or directory' } : {}), /cannot create nftables table ftpnp_9: Could not process rule/],
      ['no error text', (s) => (s.startsWith('add table') ? { ok: false } : {}), /unknown error/],
    ];
    for (const [name, answer, message] of cases) {
      const { run } = recordingRunner(answer);
      const err = thrownBy(() => new KernelForwarder(run, { pid: 9 }));
      t.ok(isProxyError(err, 'FTPP_ERR_KERNEL_PATH'), `${name}: FTPP_ERR_KERNEL_PATH`);
      t.match((err as Error).message, message, name);
    }
    const { run, scripts } = recordingRunner((s) => (s.includes('create element') ? { ok: false, error: 'Could not process rule: File exists' } : {}));
    const forwarder = new KernelForwarder(run, { pid: 9 });
    const err = await rejectionOf(forwarder.forward(MAPPING, 5000));
    t.ok(isProxyError(err, 'FTPP_ERR_KERNEL_PATH'), 'a refused mapping: FTPP_ERR_KERNEL_PATH');
    t.match((err as Error).message, /cannot add the data mapping: Could not process rule: File exists/);
    t.equal(forwarder.active, 0, 'a refused mapping is not counted');
    t.equal(scripts.at(-1), removeSnatScript('ftpnp_9', MAPPING), 'the SNAT element it alone held goes (the add might have met one left behind)');
    const again = await rejectionOf(forwarder.forward(MAPPING, 5000));
    t.match((again as Error).message, /File exists/, 'the next try is refused the same way, not as a different SNAT source');
  });

  await t.test('a failed table delete is reported, not thrown', async (t) => {
    const { run } = recordingRunner((s) => (s.startsWith('delete table') ? { ok: false, error: 'busy' } : {}));
    const warnings: string[] = [];
    const forwarder = new KernelForwarder(run, { pid: 3, onWarning: (m) => warnings.push(m) });
    forwarder.close();
    t.same(warnings, ['could not delete the nftables table']);
  });
});

t.test('KernelForwarder with batches off the event loop', async (t) => {
  /** Batches are recorded and finish when the test says (errors: '' each unless given). */
  const batches: string[][] = [];
  const finishers: Array<(errors: readonly string[]) => void> = [];
  const runBatch: NftBatchRunner = (scripts, done) => {
    batches.push([...scripts]);
    finishers.push(done);
  };
  const finish = (i: number, errors?: string[]): void => finishers[i]!(errors ?? batches[i]!.map(() => ''));
  const { run, scripts } = recordingRunner();
  const forwarder = new KernelForwarder(run, { pid: 12, runBatch, autoPoll: false });
  const created = scripts.length;
  const second: ForwardMapping = { ...MAPPING, proxyPort: 60002 };
  let settled = false;
  const adding = forwarder.forward(MAPPING, 5000).finally(() => (settled = true));
  const addingSecond = forwarder.forward(second, 5000);
  await nextTurn();
  t.same(batches, [[addMappingScript('ftpnp_12', MAPPING, 5000), addMappingScript('ftpnp_12', second, 5000)]], 'two adds of one turn: one batch');
  t.equal(scripts.length, created, 'nothing ran on the event loop');
  t.notOk(settled, 'the mapping is not there before the batch has run');
  t.equal(forwarder.active, 0, 'nor counted');
  finish(0, ['', 'Could not process rule: File exists']);
  const first = await adding;
  t.equal(forwarder.active, 1, 'in the table once its batch ran');
  const refused = await rejectionOf(addingSecond);
  t.match((refused as Error).message, /cannot add the data mapping: Could not process rule: File exists/, 'the one that failed hears its own words');
  await nextTurn();
  t.equal(batches.length, 1, 'the shared SNAT element stays: the first still holds it');
  first.remove();
  const third: ForwardMapping = { ...MAPPING, proxyPort: 60003 };
  const addingThird = forwarder.forward(third, 5000);
  await nextTurn();
  t.same(
    batches[1],
    [...removeMappingScripts('ftpnp_12', MAPPING, true), removeCountersScript('ftpnp_12', MAPPING), addMappingScript('ftpnp_12', third, 5000)],
    'a removal and an add of one turn, in the order made: the SNAT element the removal took is added back by the add',
  );
  finish(1);
  const thirdForward = await addingThird;
  const addingFourth = forwarder.forward({ ...MAPPING, proxyPort: 60005 }, 5000);
  await nextTurn();
  finish(2);
  (await addingFourth).watchIdle(1000, () => {});
  thirdForward.remove();
  const before = scripts.length;
  forwarder.poll();
  t.equal(
    scripts[before],
    [...removeMappingScripts('ftpnp_12', third, false), removeCountersScript('ftpnp_12', third)].join('\n'),
    'a synchronous call (the idle listing) first runs what is still queued, in the caller',
  );
  t.match(scripts.slice(before + 1).join('\n'), /^list map/, 'then its own');
  const late = forwarder.forward({ ...MAPPING, proxyPort: 60004 }, 5000);
  forwarder.close();
  t.match(String(await rejectionOf(late)), /kernel data path closed/, 'an add still queued at close is refused, never left hanging');
  const inFlight = new KernelForwarder(recordingRunner().run, { pid: 13, runBatch, autoPoll: false });
  const pending = inFlight.forward(MAPPING, 5000);
  await nextTurn();
  inFlight.close();
  finishers.at(-1)!(['']);
  t.match(String(await rejectionOf(pending)), /kernel data path closed/, 'an add whose batch finishes after close is refused (the table is gone)');
  t.equal(inFlight.active, 0, 'and not counted');
  await inFlight.changesApplied();
});

// ------------------------------------------------------------- the real library, as root

const HERE = fileURLToPath(new URL('.', import.meta.url));
const DIST_MODULE = join(HERE, '../../dist/data/kernel-forward.js');
const DIST_RUNNER = join(HERE, '../../dist/data/nft-runner.js');
function realSkipReason(): string | null {
  return netnsUnavailable() ?? nftablesUnavailable() ?? (existsSync(DIST_MODULE) ? null : 'dist/ not built (npm test builds it in pretest)');
}

/**
 * Runs in a child inside the namespace (a process cannot move one thread of Node into
 * another namespace): the real addon, the real libnftables, the real kernel.
 */
const CHILD = `
import { KernelForwarder } from ${JSON.stringify(DIST_MODULE)};
import { loadNftRunner } from ${JSON.stringify(DIST_RUNNER)};
import { execFileSync } from 'node:child_process';
const out = {};
const nft = (...args) => execFileSync('nft', args, { encoding: 'utf8' });
const { run, runBatch, reason } = loadNftRunner();
out.reason = reason;
out.batches = typeof runBatch;
nft('add', 'table', 'ip', 'ftpnp_999999'); // a proxy that died (no such PID)
const forwarder = new KernelForwarder(run, { runBatch, onWarning: (m, d) => { out.warnings = [...(out.warnings ?? []), m + ' ' + d.table]; } });
out.table = forwarder.table;
out.tablesAfterOpen = nft('list', 'tables');
const m = { opener: 'client', openerIp: '192.0.2.7', proxyIp: '192.0.2.1', proxyPort: 60001, targetIp: '192.0.2.5', targetPort: 31337, snatIp: '192.0.2.1' };
const m6 = { opener: 'server', openerIp: 'fd20::5', proxyIp: 'fd20::1', proxyPort: 41000, targetIp: '2001:db8:100::7', targetPort: 50123, snatIp: '2001:db8:100::10' };
const maps = () => ['dnat_to', 'snat_to', 'dnat_to6', 'snat_to6'].map((map) => nft('list', 'map', 'inet', forwarder.table, map)).join('');
const forward = await forwarder.forward(m, 30000);
const forward6 = await forwarder.forward(m6, 30000);
out.mapped = maps();
try { await forwarder.forward({ ...m, targetPort: 31338 }, 30000); out.duplicate = 'accepted'; } catch (e) { out.duplicate = e.code + ': ' + e.message; }
forward.remove();
forward6.remove();
out.queued = maps(); // removals run off the event loop: not yet
await forwarder.changesApplied();
out.unmapped = maps();
// A port leased again at once: the old mapping's queued removal runs before the new add
// (else the add would be refused as a duplicate, or the late removal delete the new element).
const again = await forwarder.forward(m, 30000);
again.remove();
const reLeased = await forwarder.forward({ ...m, targetPort: 31339 }, 30000);
await forwarder.changesApplied();
out.reLeased = maps();
reLeased.remove();
// Many removals in one turn: one batch, every element gone.
const many = await Promise.all(Array.from({ length: 40 }, (_, i) => forwarder.forward({ ...m, proxyPort: 61000 + i }, 30000)));
for (const f of many) f.remove();
await forwarder.changesApplied();
out.manyRemoved = maps();
forwarder.close();
out.tablesAfterClose = nft('list', 'tables');
console.log(JSON.stringify(out));
`;

t.test('the real libnftables in a namespace of our own', async (t) => {
  const skip = realSkipReason();
  if (skip) {
    t.comment(`skipped: ${skip}`);
    t.pass(`skipped: ${skip}`);
    return;
  }
  const ns = `${labPrefix()}kf`;
  const ip = (...args: string[]): ReturnType<typeof spawnSync> => spawnSync('ip', args, { encoding: 'utf8' });
  t.equal(ip('netns', 'add', ns).status, 0, `namespace ${ns}`);
  t.teardown(() => void ip('netns', 'delete', ns));
  const child = spawnSync('ip', ['netns', 'exec', ns, process.execPath, '--input-type=module', '-e', CHILD], { encoding: 'utf8', timeout: 30000 });
  t.equal(child.status, 0, `child ran: ${child.stderr}`);
  const out = JSON.parse(child.stdout.trim().split('\n').at(-1) ?? '{}') as Record<string, string | string[]>;
  t.equal(out.reason, 'libnftables');
  t.equal(out.batches, 'function', 'the addon runs batches off the event loop');
  t.match(out.table, /^ftpnp_\d+$/);
  t.same(out.warnings, ['removed the nftables table of a proxy that is gone ftpnp_999999']);
  t.notMatch(out.tablesAfterOpen, /ftpnp_999999/, 'the dead proxy\'s table is gone');
  t.match(out.tablesAfterOpen, new RegExp(`table inet ${String(out.table)}`), 'ours exists, one inet table for both families');
  t.match(out.mapped, /192\.0\.2\.7 \. 192\.0\.2\.1 \. 60001 timeout 30s expires \S+ : 192\.0\.2\.5 \. 31337/, 'DNAT element with its timeout');
  t.match(out.mapped, /192\.0\.2\.7 \. 192\.0\.2\.5 \. 31337 : 192\.0\.2\.1/, 'SNAT element');
  t.match(out.mapped, /fd20::5 \. fd20::1 \. 41000 timeout 30s expires \S+ : 2001:db8:100::7 \. 50123/, 'IPv6 DNAT element (a server opening for a PORT client)');
  t.match(out.mapped, /fd20::5 \. 2001:db8:100::7 \. 50123 : 2001:db8:100::10/, 'IPv6 SNAT element');
  t.match(out.duplicate, /^FTPP_ERR_KERNEL_PATH: cannot add the data mapping: .*File exists/, 'the same mapping twice is refused, not silently merged');
  t.match(out.queued, /192\.0\.2\.7 \. 192\.0\.2\.1 \. 60001/, 'remove() returns before the removal ran (it is nobody\'s reply)');
  t.notMatch(out.unmapped, /192\.0\.2\.7|fd20::5/, 'every element removed once the batch ran');
  t.match(out.reLeased, /192\.0\.2\.7 \. 192\.0\.2\.1 \. 60001 timeout 30s expires \S+ : 192\.0\.2\.5 \. 31339/, 'a port leased again at once maps to its new target: the old removal ran first');
  t.notMatch(out.reLeased, /: 192\.0\.2\.5 \. 31337/, 'nothing of the old mapping is left');
  t.notMatch(out.manyRemoved, /192\.0\.2\.7/, '40 removals in one turn: every element gone');
  t.notMatch(out.tablesAfterClose, /ftpnp_/, 'no table left');
});

/**
 * Counting and the idle cut against the real kernel: a client and a server on the loopback of
 * a namespace of the test's own, the client dialling the mapped port (DNAT in the output hook,
 * the way the bench runs the kernel path).
 */
const TRAFFIC_CHILD = `
import { KernelForwarder } from ${JSON.stringify(DIST_MODULE)};
import { loadNftRunner } from ${JSON.stringify(DIST_RUNNER)};
import { execFileSync } from 'node:child_process';
import net from 'node:net';
const UP = 1000003, DOWN = 2000017;
const HOST = process.env.KF_HOST, OPENER = process.env.KF_OPENER;
const out = {};
const nft = (...args) => execFileSync('nft', args, { encoding: 'utf8' });
const { run, runBatch } = loadNftRunner();
const forwarder = new KernelForwarder(run, { runBatch, onWarning: (m) => { out.warnings = [...(out.warnings ?? []), m]; } });
const server = net.createServer({ allowHalfOpen: true });
await new Promise((resolve) => server.listen(0, HOST, resolve));
const serverPort = server.address().port;
const map = (proxyPort) => ({ opener: OPENER, openerIp: HOST, proxyIp: HOST, proxyPort, targetIp: HOST, targetPort: serverPort, snatIp: HOST });

// 1. A transfer each way, then remove(awaitEndMs): the counts.
server.once('connection', (socket) => {
  let got = 0;
  socket.on('data', (chunk) => { got += chunk.length; });
  socket.on('end', () => socket.end(Buffer.alloc(DOWN, 1)));
});
const first = await forwarder.forward(map(60001), 30000);
first.watchIdle(60000, () => { out.wrongIdle = true; });
const received = await new Promise((resolve, reject) => {
  const client = net.connect({ host: HOST, port: 60001, allowHalfOpen: true });
  let got = 0;
  client.on('data', (chunk) => { got += chunk.length; });
  client.on('end', () => { client.end(); resolve(got); });
  client.on('error', reject);
  client.end(Buffer.alloc(UP, 2));
});
out.received = received;
first.remove(3000);
out.wire = await first.wireBytes;
await forwarder.changesApplied();
out.afterRemove = nft('list', 'table', 'inet', forwarder.table);

// 2. A client that reads nothing: the server's sends stall, the cut resets it.
const idleMs = 500;
const serverEnd = new Promise((resolve) => {
  server.once('connection', (socket) => {
    const started = Date.now();
    socket.on('error', (err) => resolve({ code: err.code, ms: Date.now() - started }));
    socket.on('close', () => resolve({ code: 'closed', ms: Date.now() - started }));
    const chunk = Buffer.alloc(1 << 20, 3);
    const pump = () => { while (socket.write(chunk)) {} };
    socket.on('drain', pump);
    pump();
  });
});
const second = await forwarder.forward(map(60002), 30000);
const cutAt = new Promise((resolve) => second.watchIdle(idleMs, () => resolve(Date.now())));
const idleClient = net.connect({ host: HOST, port: 60002 });
idleClient.on('error', (err) => { out.clientError = err.code; });
idleClient.pause();
const connectedAt = Date.now();
out.cutAfterMs = (await cutAt) - connectedAt;
out.duringCut = nft('list', 'table', 'inet', forwarder.table);
let giveUp;
out.server = await Promise.race([serverEnd, new Promise((resolve) => { giveUp = setTimeout(() => resolve({ code: 'still open' }), 15000); })]);
clearTimeout(giveUp);
out.cutWire = await second.wireBytes;
second.remove();
await forwarder.changesApplied();
out.afterCut = nft('list', 'table', 'inet', forwarder.table);
idleClient.destroy();
server.close();
forwarder.close();
console.log(JSON.stringify(out));
`;

for (const [host, opener] of [['127.0.0.1', 'client'], ['::1', 'server']] as const) {
  t.test(`the real kernel counts a connection both ways and cuts an idle one (${host}, the ${opener} opening)`, async (t) => {
  const skip = realSkipReason();
  if (skip) {
    t.comment(`skipped: ${skip}`);
    t.pass(`skipped: ${skip}`);
    return;
  }
  const ns = `${labPrefix()}kt${opener === 'client' ? 4 : 6}`;
  const ip = (...args: string[]): ReturnType<typeof spawnSync> => spawnSync('ip', args, { encoding: 'utf8' });
  t.equal(ip('netns', 'add', ns).status, 0, `namespace ${ns}`);
  t.teardown(() => void ip('netns', 'delete', ns));
  t.equal(ip('-n', ns, 'link', 'set', 'lo', 'up').status, 0, 'loopback up');
  const child = spawnSync('ip', ['netns', 'exec', ns, process.execPath, '--input-type=module', '-e', TRAFFIC_CHILD], { encoding: 'utf8', timeout: 60000, env: { ...process.env, KF_HOST: host, KF_OPENER: opener } });
  t.equal(child.status, 0, `child ran: ${child.stderr}`);
  const out = JSON.parse(child.stdout.trim().split('\n').at(-1) ?? '{}') as Record<string, unknown>;
  const UP = 1000003;
  const DOWN = 2000017;
  // The socket that connects sends UP and receives DOWN; which FTP side that is depends on the opener.
  const [fromOpener, toOpener] = opener === 'client' ? (['toServer', 'toClient'] as const) : (['toClient', 'toServer'] as const);
  const header = host.includes(':') ? 60 : 40;
  const key = host.includes(':') ? '::1 \\. ::1' : '127\\.0\\.0\\.1 \\. 127\\.0\\.0\\.1';
  const suffix = host.includes(':') ? '6' : '';
  t.equal(out.received, DOWN, 'the opener got everything through the mapping');
  const wire = out.wire as { toClient: number; toServer: number } | null;
  t.ok(wire, `wire bytes read ${JSON.stringify(wire)}`);
  // IP bytes: the payload plus at least one header per segment the kernel handed on
  // (one per GSO/GRO aggregate: up to 64 KiB each), and the handshake and ACKs.
  t.ok(wire && wire[fromOpener] >= UP + header && wire[fromOpener] < UP * 1.1, `${fromOpener} ${wire?.[fromOpener]}: what the opener sent plus headers (${UP} payload)`);
  t.ok(wire && wire[toOpener] >= DOWN + header && wire[toOpener] < DOWN * 1.1, `${toOpener} ${wire?.[toOpener]}: what the opener got plus headers (${DOWN} payload)`);
  t.notOk(out.wrongIdle, 'a moving connection is not cut');
  t.notMatch(String(out.afterRemove), new RegExp(`${key} \\. 60001`), 'every element of the first mapping is gone');
  t.ok(Number(out.cutAfterMs) >= 500 && Number(out.cutAfterMs) < 3000, `cut after ${String(out.cutAfterMs)} ms of a 500 ms idle timeout (polls every 250 ms)`);
  t.match(String(out.duringCut), new RegExp(`map flows${suffix} \\{[^}]*elements = \\{[^}]*original \\. ${key} \\. 60002 counter packets \\d+ bytes \\d+ timeout \\S+ expires \\S+ : goto cut_reset`), 'the cut connection\'s flows elements send it to cut_reset');
  t.notMatch(String(out.duringCut), new RegExp(`dnat_to${suffix} \\{[^}]*60002`), 'no DNAT element for it any more');
  t.same((out.server as { code?: string }).code, 'ECONNRESET', `the stalled sender was reset ${JSON.stringify(out.server)}`);
  const cutWire = out.cutWire as { toClient: number; toServer: number } | null;
  t.ok(cutWire && cutWire.toClient > 0 && cutWire.toServer > 0, `the cut transfer's counts were read at the cut ${JSON.stringify(cutWire)}`);
  t.notMatch(String(out.afterCut), /60002/, 'after the final remove nothing of it is left');
  t.same(out.warnings, undefined, 'no warnings');
  });
}
