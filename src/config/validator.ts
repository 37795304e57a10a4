/**
 * The primitives config validation is built from: a Validator that records every error and
 * warning with its key path and 1-based line, typed readers for one value each, and the text
 * parsers for port ranges and listen addresses. load.ts walks the document with them.
 */
import { isIP } from 'node:net';
import ipaddr from 'ipaddr.js';
import type { Document, LineCounter, Node } from 'yaml';
import { parseCidr } from '../control/ip.js';
import { parsePortList, parseUpstreamRule, type UpstreamRule } from '../control/upstream-policy.js';
import type { CidrRule, ConfigIssue, HostAndPort, PortRange } from './schema.js';

export class Validator {
  readonly issues: ConfigIssue[] = [];
  /** Non-fatal: the config still loads (ProxyConfig.warnings). */
  readonly warnings: ConfigIssue[] = [];
  constructor(private readonly doc: Document, private readonly lines: LineCounter) {}

  lineOf(path: readonly (string | number)[]): number {
    for (let n = path.length; n >= 0; n--) {
      const node = (n === 0 ? this.doc.contents : this.doc.getIn(path.slice(0, n), true)) as Node | undefined;
      const start = node && (node as { range?: [number, number, number] }).range?.[0];
      if (typeof start === 'number') return this.lines.linePos(start).line;
    }
    return 0;
  }

  fail(path: readonly (string | number)[], message: string): void {
    this.issues.push({ path: formatPath(path), line: this.lineOf(path), message });
  }

  warn(path: readonly (string | number)[], message: string): void {
    this.warnings.push({ path: formatPath(path), line: this.lineOf(path), message });
  }
}

export function formatPath(path: readonly (string | number)[]): string {
  let out = '';
  for (const part of path) out += typeof part === 'number' ? `[${part}]` : out === '' ? part : `.${part}`;
  return out;
}

export type Obj = Record<string, unknown>;

export function isObject(value: unknown): value is Obj {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

export function checkKeys(v: Validator, path: (string | number)[], value: Obj, allowed: readonly string[]): void {
  for (const key of Object.keys(value)) {
    if (!allowed.includes(key)) v.fail([...path, key], `unknown key (allowed: ${allowed.join(', ')})`);
  }
}

export function section(v: Validator, path: (string | number)[], value: unknown, allowed: readonly string[]): Obj {
  if (value === undefined || value === null) return {};
  if (!isObject(value)) {
    v.fail(path, 'must be a mapping');
    return {};
  }
  checkKeys(v, path, value, allowed);
  return value;
}

export function parsePortRange(text: string): PortRange | null {
  const match = /^\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?$/.exec(text);
  if (!match) return null;
  const first = Number(match[1]);
  const last = match[2] === undefined ? first : Number(match[2]);
  if (first < 1 || last > 65535 || first > last) return null;
  return { first, last };
}

/** "host:port" or "[v6]:port"; host must be an IP literal. */
export function parseListenAddress(text: string): HostAndPort | null {
  const v6 = /^\[([^\]]+)\]:(\d{1,5})$/.exec(text);
  const v4 = /^([^:[\]]+):(\d{1,5})$/.exec(text);
  const match = v6 ?? v4;
  if (!match) return null;
  const host = match[1]!;
  const port = Number(match[2]);
  if (port > 65535) return null;
  if (v6 ? isIP(host) !== 6 : isIP(host) !== 4) return null;
  return { host: ipaddr.parse(host).toString(), port };
}

export function isHostname(text: string): boolean {
  // RFC 1123 §2.1: a host name never has the dotted-decimal form; an all-numeric last label
  // is a mistyped IP ("203.0.113.300"), which would otherwise only fail at run time.
  if (/(^|\.)\d+\.?$/.test(text)) return false;
  return text.length <= 253 && /^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$/.test(text);
}

export function str(v: Validator, path: (string | number)[], value: unknown, fallback: string | undefined): string | undefined {
  if (value === undefined || value === null) {
    if (fallback === undefined) v.fail(path, 'is required');
    return fallback;
  }
  if (typeof value !== 'string' && typeof value !== 'number') {
    v.fail(path, 'must be a string');
    return undefined;
  }
  return String(value);
}

export function int(v: Validator, path: (string | number)[], value: unknown, fallback: number, min: number, max: number): number {
  if (value === undefined || value === null) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < min || value > max) {
    v.fail(path, `must be a number from ${min} to ${max}`);
    return fallback;
  }
  return value;
}

/** `auto` (the default: a share of each pool, see relayPortsPerIpCap) or a whole number of ports. */
export function relayPortsPerIp(v: Validator, path: (string | number)[], value: unknown): number | 'auto' {
  if (value === undefined || value === null || value === 'auto') return 'auto';
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > 65535) {
    v.fail(path, 'must be "auto" or a whole number from 1 to 65535');
    return 'auto';
  }
  return value;
}

export function bool(v: Validator, path: (string | number)[], value: unknown, fallback: boolean): boolean {
  if (value === undefined || value === null) return fallback;
  if (typeof value !== 'boolean') {
    v.fail(path, 'must be true or false');
    return fallback;
  }
  return value;
}

export function cidrList(v: Validator, path: (string | number)[], value: unknown): CidrRule[] {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value)) {
    v.fail(path, 'must be a list of CIDRs such as 10.0.0.0/8');
    return [];
  }
  const out: CidrRule[] = [];
  value.forEach((item: unknown, i: number) => {
    const text = String(item);
    try {
      out.push(Object.freeze({ cidr: parseCidr(text), text }));
    } catch {
      v.fail([...path, i], `"${text}" is not a CIDR such as 10.0.0.0/8`);
    }
  });
  return out;
}


/**
 * `upstream.forward.allow`/`deny` and the transparent ones: a list of CIDRs, addresses, names
 * and `*.suffix` entries (control/upstream-policy.ts parseUpstreamRule); each bad entry is
 * reported at its index.
 */
export function upstreamRuleList(v: Validator, path: (string | number)[], value: unknown): UpstreamRule[] {
  if (value === undefined || value === null) return [];
  if (!Array.isArray(value)) {
    v.fail(path, 'must be a list of CIDRs, host names and *.suffix entries');
    return [];
  }
  const out: UpstreamRule[] = [];
  value.forEach((item: unknown, i: number) => {
    if (typeof item !== 'string' && typeof item !== 'number') {
      v.fail([...path, i], 'must be a string: a CIDR, a host name or *.suffix');
      return;
    }
    const text = String(item);
    const parsed = parseUpstreamRule(text);
    if (parsed.ok) out.push(Object.freeze(parsed.rule));
    else v.fail([...path, i], `"${text}": ${parsed.reason}`);
  });
  return out;
}

/** A port list such as `"21"` or `"21,990,2100-2199"` (a bare number too); null after an error. */
export function portList(v: Validator, path: (string | number)[], value: unknown, fallback: string): PortRange[] | null {
  const text = str(v, path, value, fallback);
  if (text === undefined) return null;
  const ports = parsePortList(text);
  if (!ports) v.fail(path, `"${text}" is not a port list such as "21" or "21,990,2100-2199" (ports 1-65535, ranges first-last)`);
  return ports;
}
