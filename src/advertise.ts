/**
 * Which IPv4 address goes into the 227 reply for a client: the first `advertiseFor` rule whose
 * CIDR holds the client, else `advertise` (a fixed IP, a hostname re-resolved when its DNS TTL
 * runs out, or `auto` = the local address the client dialled). Inexact 227 addresses break
 * BSD-derived clients, which demand the control peer's address (protocol.md §1.3).
 */
import dns from 'node:dns';
import { isIP } from 'node:net';
import { ipInCidr } from './control/ip.js';
import type { ClientSideConfig } from './config/schema.js';

export interface HostnameResolver {
  /** IPv4 addresses with TTL in seconds. */
  resolve4(hostname: string): Promise<Array<{ address: string; ttl: number }>>;
}

const systemResolver: HostnameResolver = {
  async resolve4(hostname) {
    try {
      return await dns.promises.resolve4(hostname, { ttl: true });
    } catch (err) {
      // Names only in /etc/hosts are not in DNS: fall back to getaddrinfo, no TTL known.
      const found = await dns.promises.lookup(hostname, { family: 4, all: true }).catch(() => {
        throw err;
      });
      return found.map((entry) => ({ address: entry.address, ttl: FALLBACK_TTL_SECONDS }));
    }
  },
};

const FALLBACK_TTL_SECONDS = 60;
const MIN_TTL_SECONDS = 5;

export class Advertiser {
  private readonly config: ClientSideConfig;
  private readonly resolver: HostnameResolver;
  private readonly now: () => number;
  private cached: { address: string; expiresAt: number } | null = null;
  private inflight: Promise<string | null> | null = null;
  /** Last resolution error, for logs. */
  lastError: Error | null = null;

  constructor(config: ClientSideConfig, resolver: HostnameResolver = systemResolver, now: () => number = Date.now) {
    this.config = config;
    this.resolver = resolver;
    this.now = now;
  }

  /** IPv4 address to write in 227 for this client, or null when none is known. */
  async addressFor(clientIp: string, localIp: string): Promise<string | null> {
    for (const rule of this.config.advertiseFor) {
      if (ipInCidr(clientIp, rule.from)) return rule.address;
    }
    const advertise = this.config.advertise;
    if (advertise.kind === 'ip') return advertise.address;
    if (advertise.kind === 'auto') return isIP(localIp) === 4 ? localIp : null;
    return this.resolveHostname(advertise.hostname);
  }

  private async resolveHostname(hostname: string): Promise<string | null> {
    if (this.cached && this.cached.expiresAt > this.now()) return this.cached.address;
    this.inflight ??= this.refresh(hostname).finally(() => {
      this.inflight = null;
    });
    return this.inflight;
  }

  private async refresh(hostname: string): Promise<string | null> {
    try {
      const records = await this.resolver.resolve4(hostname);
      const first = records[0];
      if (!first) throw new Error(`${hostname} has no IPv4 address`);
      this.cached = { address: first.address, expiresAt: this.now() + Math.max(first.ttl, MIN_TTL_SECONDS) * 1000 };
      this.lastError = null;
      return first.address;
    } catch (err) {
      this.lastError = err as Error;
      // Keep serving the last known address rather than failing every PASV while DNS is down.
      return this.cached?.address ?? null;
    }
  }
}
