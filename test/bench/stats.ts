/**
 * Small statistics and text-table helpers. On a 2-core machine single figures swing by
 * ±30 %, so the benchmark reports medians of several runs and ratios taken within a run.
 */

export function median(values: readonly number[]): number {
  const finite = values.filter((v) => Number.isFinite(v)).sort((a, b) => a - b);
  if (finite.length === 0) return Number.NaN;
  const mid = finite.length >> 1;
  return finite.length % 2 === 1 ? finite[mid]! : (finite[mid - 1]! + finite[mid]!) / 2;
}

export function fmt(value: number, digits = 0): string {
  if (!Number.isFinite(value)) return 'n/a';
  return value.toFixed(digits);
}

export function ratio(value: number, digits = 2): string {
  return Number.isFinite(value) ? `${value.toFixed(digits)}x` : 'n/a';
}

/** Render rows as a fixed-width text table; the first row is the header. */
export function table(rows: ReadonlyArray<readonly string[]>): string {
  const widths: number[] = [];
  for (const row of rows) row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, cell.length)));
  const line = (row: readonly string[]): string => row.map((cell, i) => cell.padEnd(widths[i]!)).join('  ').trimEnd();
  const out = [line(rows[0]!), widths.map((w) => '-'.repeat(w)).join('  ')];
  for (const row of rows.slice(1)) out.push(line(row));
  return out.join('\n');
}

/** Rotate so each target goes first once every `items.length` repetitions (order effects). */
export function rotate<T>(items: readonly T[], by: number): T[] {
  const n = items.length;
  if (n === 0) return [];
  const k = ((by % n) + n) % n;
  return [...items.slice(k), ...items.slice(0, k)];
}

/** The number at `path` inside a results object, or NaN. */
export function num(obj: unknown, ...path: string[]): number {
  let v: unknown = obj;
  for (const p of path) v = (v as Record<string, unknown> | undefined)?.[p];
  return typeof v === 'number' ? v : Number.NaN;
}

/** One target met or missed, for the summary after the table. */
export interface Verdict {
  readonly name: string;
  /** The proxy variant (process name) it is about; null when it is about none in particular. */
  readonly variant: string | null;
  readonly pass: boolean | null;
  readonly detail: string;
}

/**
 * The steps of a rate session at concurrency 1, in order, each timed by the load worker
 * (README "Performance": where a small session's time goes). Here, not in load-worker.ts:
 * importing that module runs a worker.
 */
export const SESSION_STEPS = ['connect to 220', 'USER', 'PASS', 'PASV + data connect', 'RETR to 150', '150 to data end', 'data end to 226', 'QUIT'] as const;

/** A ratio with its 95% interval. */
export interface RatioInterval {
  readonly ratio: number;
  readonly low: number;
  readonly high: number;
}

/**
 * How `values` compare with `baseline` when both are ratios measured many times (the kernel
 * section's edge and A/A ratios to direct, pooled over rows): the ratio of their geometric
 * means, with a 95% interval from the normal approximation on the logarithms, which a few
 * hundred pairs allow. Null with fewer than two finite positive values on either side.
 */
export function ratioOfGeometricMeans(values: readonly number[], baseline: readonly number[]): RatioInterval | null {
  const logs = (xs: readonly number[]): number[] => xs.filter((v) => Number.isFinite(v) && v > 0).map(Math.log);
  const [v, b] = [logs(values), logs(baseline)];
  if (v.length < 2 || b.length < 2) return null;
  const mean = (xs: number[]): number => xs.reduce((sum, x) => sum + x, 0) / xs.length;
  const variance = (xs: number[]): number => {
    const m = mean(xs);
    return xs.reduce((sum, x) => sum + (x - m) ** 2, 0) / (xs.length - 1);
  };
  const diff = mean(v) - mean(b);
  const se = Math.sqrt(variance(v) / v.length + variance(b) / b.length);
  return { ratio: Math.exp(diff), low: Math.exp(diff - 1.96 * se), high: Math.exp(diff + 1.96 * se) };
}
