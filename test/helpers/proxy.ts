/**
 * Run a proxy in-process for a test: one starter for every test that needs the real proxy
 * (session harness, integration, operations). Logs go to memory for assertions; the admin
 * listener, when the configuration has one, can be scraped; the proxy is closed at a
 * teardown when one is given. Also: the YAML of a one-listener proxy, Prometheus text
 * parsing and small HTTP GETs.
 */
import http from 'node:http';
import { Writable } from 'node:stream';
import { validateConfigText } from '../../src/config/load.js';
import { startProxy, type RunningProxy } from '../../src/index.js';
import { createLogger } from '../../src/log.js';
import type { KernelForwarder } from '../../src/data/kernel-forward.js';
import { delay, withTimeout } from './async.js';
import type { TeardownHost } from './tap.js';

export type LogRecord = Record<string, unknown>;

export interface TestProxy extends RunningProxy {
  /** The first listener's address and name. */
  readonly host: string;
  readonly port: number;
  readonly name: string;
  /** Every log record so far, parsed. */
  logs(): LogRecord[];
  /** Raw log text (to check that no password leaked). */
  logText(): string;
  /** Wait until a log record matching `pred` exists; returns it or null on timeout. */
  waitLog(pred: (r: LogRecord) => boolean, timeoutMs?: number): Promise<LogRecord | null>;
  /** GET /metrics from the admin listener (fails when there is none). */
  scrape(): Promise<Metrics>;
  /** GET any admin path. */
  adminGet(path: string): Promise<HttpResult>;
}

export interface StartTestProxyOptions {
  /** Close the proxy at this teardown; without it the caller closes it. */
  readonly teardown?: TeardownHost;
  /** Stands in for the nftables table (client.dataPath: kernel). */
  readonly openKernelForwarder?: () => KernelForwarder;
  /** Stands in for `dataPath: auto`'s host check (ip_forward). */
  readonly kernelHostBlocker?: () => string | null;
}

/**
 * Validate `yaml` (a whole configuration file: proxyYaml() here, opsYaml() in ops.ts) and
 * start the proxy with an in-memory logger.
 */
export async function startTestProxy(yaml: string, options: StartTestProxyOptions = {}): Promise<TestProxy> {
  const config = validateConfigText(yaml, 'test');
  let text = '';
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      text += chunk.toString();
      cb();
    },
  });
  const logger = createLogger(config.log.level, sink);
  const running = await startProxy(config, {
    logger,
    ...(options.openKernelForwarder ? { openKernelForwarder: options.openKernelForwarder } : {}),
    ...(options.kernelHostBlocker ? { kernelHostBlocker: options.kernelHostBlocker } : {}),
  });
  options.teardown?.teardown(() => running.close());
  const first = running.listeners[0]!;
  const logs = (): LogRecord[] => text.split('\n').filter(Boolean).map((line) => JSON.parse(line) as LogRecord);
  const adminGet = (path: string): Promise<HttpResult> => {
    if (!running.admin) throw new Error('no admin listener configured');
    return httpGet(running.admin.address.host, running.admin.address.port, path);
  };
  return {
    ...running,
    host: first.host,
    port: first.port,
    name: first.name,
    logs,
    logText: () => text,
    waitLog: async (pred, timeoutMs = 3000) => {
      const end = Date.now() + timeoutMs;
      for (;;) {
        const found = logs().find(pred);
        if (found) return found;
        if (Date.now() >= end) return null;
        await delay(20);
      }
    },
    scrape: async () => {
      const res = await adminGet('/metrics');
      if (res.status !== 200) throw new Error(`/metrics answered ${res.status}: ${res.body.slice(0, 200)}`);
      return parseMetrics(res.body);
    },
    adminGet,
  };
}

// ------------------------------------------------------------------ one-listener configuration text

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
  readonly dataPath?: 'relay' | 'kernel' | 'auto';
}

let nextPassiveBase = 30000 + Math.floor(Math.random() * 200) * 20;

/** A distinct port range per proxy of this test process. */
export function nextPortRange(size = 10): string {
  const first = nextPassiveBase;
  nextPassiveBase += size;
  return `${first}-${first + size - 1}`;
}

/** A configuration file with one listener named `test` and no admin listener. */
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

// ------------------------------------------------------------------ HTTP and Prometheus text

export interface HttpResult {
  readonly status: number;
  readonly body: string;
  readonly headers: http.IncomingHttpHeaders;
}

export function httpGet(host: string, port: number, path: string, timeoutMs = 5000): Promise<HttpResult> {
  const request = new Promise<HttpResult>((resolve, reject) => {
    const req = http.get({ host, port, path, agent: false, timeout: timeoutMs }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body, headers: res.headers }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${path} timed out`)));
    req.on('error', reject);
  });
  return withTimeout(request, timeoutMs + 500, `GET http://${host}:${port}${path}`);
}

export interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

export class Metrics {
  readonly samples: readonly Sample[];
  readonly text: string;
  constructor(text: string, samples: Sample[]) {
    this.text = text;
    this.samples = samples;
  }

  /** The value of the one sample of `name` whose labels include `labels`; undefined if none. */
  get(name: string, labels: Record<string, string> = {}): number | undefined {
    const matches = this.samples.filter(
      (s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v),
    );
    if (matches.length > 1) throw new Error(`${name} ${JSON.stringify(labels)} matches ${matches.length} samples`);
    return matches[0]?.value;
  }
}

/** Prometheus text exposition format (the subset prom-client writes). */
export function parseMetrics(text: string): Metrics {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels: Record<string, string> = {};
    const labelText = match[2] ?? '';
    const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (let m = re.exec(labelText); m; m = re.exec(labelText)) labels[m[1]!] = m[2]!.replace(/\\(.)/g, '$1');
    samples.push({ name: match[1]!, labels, value: Number(match[3]) });
  }
  return new Metrics(text, samples);
}
