/**
 * The admin listener against real traffic (README "Metrics and health"): an in-process proxy
 * with `admin.listen` in front of a real vsftpd; curl downloads N bytes and uploads M bytes;
 * /metrics then reports exactly those sessions, transfers and bytes, no open session and the
 * whole relay range free; /healthz is 200; /readyz is 200 while vsftpd runs and 503 after it
 * stopped.
 * Relay ports 19000-19999 belong to this file.
 */
import t from 'tap';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startVsftpd, vsftpdUnavailable, type VsftpdInstance } from '../helpers/vsftpd.js';
import { PortBlocks } from '../helpers/fake-server.js';
import { delay } from '../helpers/async.js';
import { sha256File, transfer, writeRandomFile } from '../helpers/clients.js';
import { opsYaml, takeFreeRange } from '../helpers/ops.js';
import { startTestProxy, type Metrics } from '../helpers/proxy.js';
import { REJECTION_REASONS } from '../../src/metrics.js';

const ports = new PortBlocks(19000);
const N = 777_777;
const M = 333_331;
const RANGE_SIZE = 5;

const reason = vsftpdUnavailable();
if (reason) {
  t.plan(0, reason);
} else {
  let vsftpd: VsftpdInstance;
  let dir: string;
  t.before(async () => {
    vsftpd = await startVsftpd();
    dir = mkdtempSync(join(tmpdir(), 'ftpnp-metrics-'));
  });
  t.teardown(async () => {
    await vsftpd?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  t.test('/metrics after a curl download and upload; /healthz; /readyz follows the upstream', async (t) => {
    const downHash = writeRandomFile(join(vsftpd.root, 'down.bin'), N);
    const upHash = writeRandomFile(join(dir, 'up.bin'), M);
    const range = await takeFreeRange(ports, RANGE_SIZE);
    const proxy = await startTestProxy(opsYaml({ name: 'edge-m', upstreamPort: vsftpd.port, passivePorts: range, admin: '127.0.0.1:0', level: 'info' }), { teardown: t });
    t.ok(proxy.admin, 'admin listener bound');
    t.equal(proxy.admin?.address.host, '127.0.0.1');
    t.ok((proxy.admin?.address.port ?? 0) > 0, `admin on port ${proxy.admin?.address.port}`);

    const fresh = await proxy.scrape();
    const L = { listener: 'edge-m' };
    t.equal(fresh.get('ftpnp_sessions_total', L), 0, 'series start at 0');
    t.equal(fresh.get('ftpnp_transfers_total', { ...L, direction: 'download', result: 'ok' }), 0, 'transfers start at 0');

    const endpoint = { host: proxy.host, port: proxy.port, user: vsftpd.user, password: vsftpd.password, timeoutMs: 30000 };
    const down = await transfer('curl', 'epsv', endpoint, 'get', 'down.bin', join(dir, 'down.bin'));
    t.equal(down.code, 0, `curl download (${down.stderr.slice(0, 300)})`);
    t.equal(sha256File(join(dir, 'down.bin')), downHash, 'downloaded file intact');
    const up = await transfer('curl', 'epsv', endpoint, 'put', 'up.bin', join(dir, 'up.bin'));
    t.equal(up.code, 0, `curl upload (${up.stderr.slice(0, 300)})`);
    t.equal(sha256File(join(vsftpd.root, 'up.bin')), upHash, 'uploaded file intact on vsftpd');

    let m: Metrics = await proxy.scrape();
    for (let i = 0; i < 50 && m.get('ftpnp_sessions_open', L) !== 0; i++) {
      await delay(100);
      m = await proxy.scrape();
    }
    t.equal(m.get('ftpnp_sessions_open', L), 0, 'ftpnp_sessions_open 0 once both sessions ended');
    t.equal(m.get('ftpnp_sessions_total', L), 2, 'ftpnp_sessions_total 2');
    t.equal(m.get('ftpnp_transfers_total', { ...L, direction: 'download', result: 'ok' }), 1, 'one ok download');
    t.equal(m.get('ftpnp_transfers_total', { ...L, direction: 'upload', result: 'ok' }), 1, 'one ok upload');
    for (const direction of ['download', 'upload']) {
      for (const result of ['failed', 'aborted']) {
        t.equal(m.get('ftpnp_transfers_total', { ...L, direction, result }), 0, `no ${result} ${direction}`);
      }
    }
    t.equal(m.get('ftpnp_transfer_bytes_total', { ...L, direction: 'download' }), N, `download bytes = N = ${N}`);
    t.equal(m.get('ftpnp_transfer_bytes_total', { ...L, direction: 'upload' }), M, `upload bytes = M = ${M}`);
    t.equal(m.get('ftpnp_transfer_duration_seconds_count', { ...L, direction: 'download' }), 1, 'one download duration observed');
    t.equal(m.get('ftpnp_transfer_duration_seconds_count', { ...L, direction: 'upload' }), 1, 'one upload duration observed');
    t.equal(m.get('ftpnp_upstream_connect_seconds_count', L), 2, 'two upstream connects timed');
    t.equal(m.get('ftpnp_upstream_connect_failures_total', L), 0, 'no upstream connect failure');
    t.equal(m.get('ftpnp_data_ports_free', { ...L, pool: 'passive' }), RANGE_SIZE, `every relay port free (${RANGE_SIZE})`);
    t.equal(m.get('ftpnp_data_ports_leased', { ...L, pool: 'passive' }), 0, 'none leased');
    t.equal(m.get('ftpnp_data_strangers_total', L), 0, 'no stranger');
    const rejections = m.samples.filter((s) => s.name === 'ftpnp_rejections_total' && s.labels.listener === 'edge-m');
    t.equal(rejections.length, REJECTION_REASONS.length, 'every rejection reason has a series');
    t.ok(rejections.every((s) => s.value === 0), 'and all are 0');
    t.ok(m.samples.some((s) => s.name.startsWith('process_') || s.name.startsWith('nodejs_')), 'process metrics included');

    const health = await proxy.adminGet('/healthz');
    t.equal(health.status, 200, '/healthz 200');
    t.equal(health.body, 'ok\n');
    const ready = await proxy.adminGet('/readyz');
    t.equal(ready.status, 200, `/readyz 200 with vsftpd up (${ready.body.trim()})`);
    t.same(JSON.parse(ready.body), { ready: true, checks: { running: true, 'edge-m.listening': true, 'edge-m.upstream': true } }, '/readyz body');

    await vsftpd.stop();
    const notReady = await proxy.adminGet('/readyz');
    t.equal(notReady.status, 503, `/readyz 503 after vsftpd stopped (${notReady.body.trim()})`);
    const body = JSON.parse(notReady.body) as { ready: boolean; checks: Record<string, unknown> };
    t.equal(body.ready, false);
    t.not(body.checks['edge-m.upstream'], true, 'the upstream check names the failure');
    t.equal(body.checks['edge-m.listening'], true, 'the listener is still bound');
    t.equal((await proxy.adminGet('/healthz')).status, 200, '/healthz stays 200 (liveness does not depend on the upstream)');
    t.equal((await proxy.adminGet('/nope')).status, 404, 'unknown path 404');
  });
}
