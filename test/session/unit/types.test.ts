/**
 * src/session/types.ts: the proxy's identity toward one client (HOST) and limit reports
 * (counted every time, logged once per session and limit).
 */
import t from 'tap';
import { validateConfigText } from '../../../src/config/load.js';
import { NOOP_METRICS, type ProxyMetrics, type RejectionReason } from '../../../src/metrics.js';
import { limitReporter, proxyIdentity } from '../../../src/session/types.js';
import { memoryLogger } from '../../helpers/logs.js';
import { proxyYaml } from '../../helpers/proxy.js';

const endpoints = { client: { ip: '198.51.100.7', port: 40000 }, dialled: { ip: '203.0.113.10', port: 21 }, local: { ip: '10.0.0.2', port: 21 }, initialData: null };

t.test('identity: what the client dialled, our end, and what advertise says', async (t) => {
  const ipConfig = validateConfigText(proxyYaml({ upstreamHost: '127.0.0.1', upstreamPort: 21, advertise: '192.0.2.44' }), 'test').listeners[0]!;
  t.same(proxyIdentity(endpoints, ipConfig), { addresses: ['203.0.113.10', '10.0.0.2', '192.0.2.44'], names: [] });
  const nameConfig = validateConfigText(proxyYaml({ upstreamHost: '127.0.0.1', upstreamPort: 21, advertise: 'ftp.proxy.example' }), 'test').listeners[0]!;
  t.same(proxyIdentity(endpoints, nameConfig), { addresses: ['203.0.113.10', '10.0.0.2'], names: ['ftp.proxy.example'] });
  t.ok(Object.isFrozen(proxyIdentity(endpoints, nameConfig).addresses), 'frozen');
});

t.test('limit reports: counted every time, logged once per limit', async (t) => {
  const counted: RejectionReason[] = [];
  const metrics: ProxyMetrics = { ...NOOP_METRICS, limitHit: (_listener, reason) => { counted.push(reason); } };
  const { log, records } = memoryLogger();
  const hit = limitReporter(metrics, 'edge', log);
  hit('idle-timeout', { idleMs: 5 });
  hit('idle-timeout');
  hit('relay-ports-per-ip', { max: 2 });
  t.same(counted, ['idle-timeout', 'idle-timeout', 'relay-ports-per-ip']);
  const logged = records().filter((r) => r.event === 'limit');
  t.same(logged.map((r) => r.limit), ['idle-timeout', 'relay-ports-per-ip'], 'each limit logged once');
  t.equal(logged[0]?.idleMs, 5, 'with its fields');
  t.equal(logged[0]?.level, 'warn', 'at warn');
});
