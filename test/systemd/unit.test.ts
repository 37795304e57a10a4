/**
 * systemd/ftp-nat-proxy.service: verified by systemd-analyze (no warnings), and the settings
 * an operator relies on are present and consistent with the proxy's defaults.
 */
import t from 'tap';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { run } from '../helpers/run.js';
import { DRAIN_SECONDS } from '../../src/config/load.js';

const UNIT = join(import.meta.dirname, '..', '..', 'systemd', 'ftp-nat-proxy.service');
const unit = readFileSync(UNIT, 'utf8');

function directive(name: string): string | undefined {
  const match = new RegExp(`^${name}=(.*)$`, 'm').exec(unit);
  return match?.[1]?.trim();
}

t.test('operator-facing directives', async (t) => {
  t.match(directive('Type') ?? '', /^(exec|notify)$/, 'Type=exec or notify');
  t.ok(directive('User') && directive('User') !== 'root', 'dedicated user');
  t.equal(directive('AmbientCapabilities'), 'CAP_NET_BIND_SERVICE CAP_NET_ADMIN', 'port 21 and port 20; nftables for dataPath auto/kernel; nothing else');
  t.equal(directive('CapabilityBoundingSet'), 'CAP_NET_BIND_SERVICE CAP_NET_ADMIN', 'bounding set limited too');
  t.match(unit, /CAP_NET_ADMIN \(with AF_NETLINK below\): client\.dataPath auto\/kernel/, 'the comment says what CAP_NET_ADMIN is for and how to drop it');
  t.match(unit, /client\.dataSourcePort below 1024/, 'the comment says the capability also serves client.dataSourcePort (port 20)');
  t.match(directive('ExecReload') ?? '', /kill -HUP \$MAINPID/, 'ExecReload sends HUP');
  const stop = Number(/^(\d+)s$/.exec(directive('TimeoutStopSec') ?? '')?.[1]);
  t.ok(stop > DRAIN_SECONDS, `TimeoutStopSec (${stop}s) above the default drain time (${DRAIN_SECONDS}s)`);
  t.ok(Number(directive('LimitNOFILE')) >= 16384, 'LimitNOFILE sized for the session limits');
  t.equal(directive('ProtectSystem'), 'strict');
  t.equal(directive('PrivateTmp'), 'yes');
  t.equal(directive('NoNewPrivileges'), 'yes');
  t.match(directive('RestrictAddressFamilies') ?? '', /AF_INET AF_INET6/);
  t.match(directive('RestrictAddressFamilies') ?? '', /AF_NETLINK/, 'netlink for libnftables');
  t.match(directive('ExecStart') ?? '', /dist\/cli\.js --config \S+\.yaml$/, 'ExecStart runs the CLI with a config');
});

const analyze = ['/usr/bin/systemd-analyze', '/bin/systemd-analyze'].find((p) => existsSync(p));
if (!analyze) {
  t.test('systemd-analyze verify', async (t) => t.plan(0, 'systemd-analyze not installed (apt-get install systemd); CI installs it'));
} else {
  t.test('systemd-analyze verify: clean, and it does catch a broken unit', async (t) => {
    const good = await run(analyze, ['verify', UNIT], { timeoutMs: 30000 });
    t.equal(good.code, 0, `verify exits 0 (${good.stderr.trim()})`);
    t.equal(good.stderr.trim(), '', 'no warnings');
    const dir = mkdtempSync(join(tmpdir(), 'ftpnp-unit-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    const broken = join(dir, 'ftp-nat-proxy.service');
    writeFileSync(broken, unit.replace('NoNewPrivileges=yes', 'NoNewPrivilegez=yes'));
    const bad = await run(analyze, ['verify', broken], { timeoutMs: 30000 });
    t.match(bad.stderr, /Unknown key/, 'a typo in the unit is reported, so the clean result above means something');
  });
}
