/**
 * Run a proxy in-process for a test, with logs captured in memory for assertions.
 */
import { Writable } from 'node:stream';
import { validateConfigText } from '../../src/config/load.js';
import { startProxy, type RunningProxy } from '../../src/index.js';
import { createLogger } from '../../src/log.js';
import type { KernelForwarder } from '../../src/data/kernel-forward.js';

export interface TestProxy extends RunningProxy {
  readonly host: string;
  readonly port: number;
  /** Every log record so far, parsed. */
  logs(): Array<Record<string, unknown>>;
  /** Raw log text (to check that no password leaked). */
  logText(): string;
}

export interface TestProxyOptions {
  readonly upstreamHost: string;
  readonly upstreamPort: number;
  readonly listen?: string;
  readonly dataMode?: 'passive' | 'active' | 'mirror';
  readonly activePorts?: string;
  readonly passivePorts?: string;
  readonly advertise?: string;
  /** Extra YAML lines appended under the listener (already indented by 4 spaces). */
  readonly extraYaml?: string;
  readonly level?: string;
  readonly dataPath?: 'relay' | 'kernel';
  /** Stands in for the nftables table (client.dataPath: kernel). */
  readonly openKernelForwarder?: () => KernelForwarder;
}

let nextPassiveBase = 30000 + Math.floor(Math.random() * 200) * 20;

/** A distinct port range per proxy of this test process. */
export function nextPortRange(size = 10): string {
  const first = nextPassiveBase;
  nextPassiveBase += size;
  return `${first}-${first + size - 1}`;
}

export function proxyYaml(options: TestProxyOptions): string {
  return [
    `log: { level: ${options.level ?? 'debug'} }`,
    'listeners:',
    '  - name: test',
    `    listen: "${options.listen ?? '127.0.0.1:0'}"`,
    '    upstream:',
    `      host: ${options.upstreamHost}`,
    `      port: ${options.upstreamPort}`,
    `      dataMode: ${options.dataMode ?? 'passive'}`,
    ...(options.activePorts ? [`      activePorts: "${options.activePorts}"`] : []),
    '    client:',
    `      advertise: ${options.advertise ?? 'auto'}`,
    `      passivePorts: "${options.passivePorts ?? nextPortRange()}"`,
    ...(options.dataPath ? [`      dataPath: ${options.dataPath}`] : []),
    ...(options.extraYaml ? [options.extraYaml] : []),
  ].join('\n');
}

export async function startTestProxy(options: TestProxyOptions): Promise<TestProxy> {
  const config = validateConfigText(proxyYaml(options), 'test');
  let text = '';
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      text += chunk.toString();
      cb();
    },
  });
  const logger = createLogger(config.log.level, sink);
  const running = await startProxy(config, { logger, ...(options.openKernelForwarder ? { openKernelForwarder: options.openKernelForwarder } : {}) });
  const first = running.listeners[0]!;
  return {
    ...running,
    host: first.host,
    port: first.port,
    logs: () => text.split('\n').filter(Boolean).map((line) => JSON.parse(line) as Record<string, unknown>),
    logText: () => text,
  };
}
