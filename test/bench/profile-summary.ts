/**
 * Where a proxy's CPU went, from the V8 profiles `npm run bench -- --cpu-prof` writes
 * (bench-results/profiles/<proxy>.cpuprofile): self time per function and per part of the
 * process (the proxy's own modules, Node's internals by module, pino, the garbage collector,
 * native code V8 cannot attribute), as shares of the busy time (idle excluded). Printed at the
 * end of a --cpu-prof run; also `node bench-results/.build/test/bench/profile-summary.js
 * FILE...`.
 */
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { fileURLToPath } from 'node:url';

interface ProfileNode {
  readonly id: number;
  readonly callFrame: { readonly functionName: string; readonly url: string; readonly lineNumber: number };
  readonly hitCount?: number;
}

interface CpuProfile {
  readonly nodes: readonly ProfileNode[];
  readonly startTime: number;
  readonly endTime: number;
  readonly samples?: readonly number[];
  readonly timeDeltas?: readonly number[];
}

export interface ProfileSummary {
  /** Sampled time not idle, ms. */
  readonly busyMs: number;
  /** Share of busy time by part of the process, largest first. */
  readonly parts: ReadonlyArray<{ readonly part: string; readonly ms: number; readonly share: number }>;
  /** The functions with the most self time, largest first. */
  readonly functions: ReadonlyArray<{ readonly name: string; readonly where: string; readonly ms: number; readonly share: number }>;
}

/** The part of the process a frame belongs to. */
export function partOf(url: string, functionName: string): string {
  if (functionName === '(garbage collector)') return 'garbage collection';
  if (functionName === '(program)') return 'native, unattributed (syscalls, libuv, V8)';
  if (url === '' && functionName.startsWith('(')) return functionName;
  if (url.startsWith('node:')) return url;
  if (url.includes('/node_modules/pino') || url.includes('/node_modules/sonic-boom') || url.includes('/node_modules/thread-stream')) return 'pino (logging)';
  const dist = url.indexOf('/dist/');
  if (dist >= 0) return `proxy: ${url.slice(dist + '/dist/'.length)}`;
  if (url === '') return `native: ${functionName || '(anonymous)'}`;
  return url.replace(/^file:\/\//, '');
}

/** Self time per node (ms): each sample's time delta goes to the node it hit. */
function selfTimes(profile: CpuProfile): Map<number, number> {
  const self = new Map<number, number>();
  const { samples, timeDeltas } = profile;
  if (samples && timeDeltas && samples.length === timeDeltas.length && samples.length > 0) {
    // timeDeltas[i] is the time from sample i-1 to sample i: it belongs to sample i-1.
    for (let i = 1; i < samples.length; i++) self.set(samples[i - 1]!, (self.get(samples[i - 1]!) ?? 0) + timeDeltas[i]! / 1000);
    return self;
  }
  const hits = profile.nodes.reduce((sum, node) => sum + (node.hitCount ?? 0), 0);
  const perHit = hits > 0 ? (profile.endTime - profile.startTime) / 1000 / hits : 0;
  for (const node of profile.nodes) self.set(node.id, (node.hitCount ?? 0) * perHit);
  return self;
}

export function summarize(profile: CpuProfile, topFunctions = 12): ProfileSummary {
  const self = selfTimes(profile);
  const parts = new Map<string, number>();
  const functions = new Map<string, { name: string; where: string; ms: number }>();
  let busy = 0;
  for (const node of profile.nodes) {
    const ms = self.get(node.id) ?? 0;
    const { functionName, url, lineNumber } = node.callFrame;
    if (ms === 0 || functionName === '(idle)') continue;
    busy += ms;
    const part = partOf(url, functionName);
    parts.set(part, (parts.get(part) ?? 0) + ms);
    const where = url ? `${partOf(url, functionName).replace(/^proxy: /, '')}:${lineNumber + 1}` : '';
    const key = `${functionName}@${where}`;
    const entry = functions.get(key) ?? { name: functionName || '(anonymous)', where, ms: 0 };
    entry.ms += ms;
    functions.set(key, entry);
  }
  const share = (ms: number): number => (busy > 0 ? ms / busy : 0);
  return {
    busyMs: busy,
    parts: [...parts.entries()].map(([part, ms]) => ({ part, ms, share: share(ms) })).sort((a, b) => b.ms - a.ms),
    functions: [...functions.values()].sort((a, b) => b.ms - a.ms).slice(0, topFunctions).map((f) => ({ ...f, share: share(f.ms) })),
  };
}

/** The summary as text lines (the bench prints them). */
export function summaryLines(name: string, summary: ProfileSummary, topParts = 10): string[] {
  const pct = (share: number): string => `${(share * 100).toFixed(1)}%`;
  return [
    `${name}: ${summary.busyMs.toFixed(0)} ms busy`,
    '  by part:',
    ...summary.parts.slice(0, topParts).map((p) => `    ${pct(p.share).padStart(6)}  ${p.part}`),
    '  by function (self time):',
    ...summary.functions.map((f) => `    ${pct(f.share).padStart(6)}  ${f.name}${f.where ? `  ${f.where}` : ''}`),
  ];
}

export function summarizeFile(file: string): string[] {
  return summaryLines(basename(file, '.cpuprofile'), summarize(JSON.parse(readFileSync(file, 'utf8')) as CpuProfile));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  for (const file of process.argv.slice(2)) console.log(summarizeFile(file).join('\n'));
}
