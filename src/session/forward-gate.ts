/**
 * Forward mode's choice of server (issue #13, upstream-selection.md A5): from a parsed
 * `USER name@host[:port]` to the one address the session may dial, or a 530 that says why not.
 * It resolves the name (every address, one lookup: the session connects to exactly the
 * address checked here, so a second lookup cannot rebind it), asks the policy
 * (control/upstream-policy.ts) about the name, every address and the port, and counts refused
 * attempts against `limits.maxLoginAttempts`. It owns no socket: ServerLeg dials what it chose.
 */
import { lookup } from 'node:dns/promises';
import { networkInterfaces } from 'node:os';
import { forwardHostText, type ForwardLoginParse } from '../control/forward-login.js';
import { decideUpstream, type UpstreamDestination, type UpstreamPolicy } from '../control/upstream-policy.js';
import type { UpstreamChoiceResult } from '../metrics.js';

/** The server a session chose, and how the client named it. */
export interface ChosenServer {
  /** The exact address to dial (checked by the policy). */
  readonly address: string;
  readonly port: number;
  /** The host as the client wrote it (a name, or the address): logs, and the TLS name to verify. */
  readonly host: string;
  /** The user name for the server (everything before the last `@`). */
  readonly user: string;
}

export type GateOutcome =
  | { readonly ok: true; readonly server: ChosenServer }
  | {
      readonly ok: false;
      readonly result: Exclude<UpstreamChoiceResult, 'ok'>;
      /** The `530` line (never the client's raw input: the policy's texts name the destination as parsed). */
      readonly line: string;
    };

export interface ForwardGateOptions {
  readonly policy: UpstreamPolicy;
  /** The proxy's addresses as this session sees them (dialled, local); interface addresses are added. */
  readonly sessionAddresses: readonly string[];
  readonly maxAttempts: number;
  /** How long a name may take to resolve. */
  readonly resolveMs: number;
  /** Resolver (tests replace it); returns every address of `name`. */
  readonly resolve?: (name: string) => Promise<string[]>;
}

export class ForwardGate {
  private readonly options: ForwardGateOptions;
  private refusals = 0;

  constructor(options: ForwardGateOptions) {
    this.options = options;
  }

  /** Refused attempts so far. */
  get attempts(): number {
    return this.refusals;
  }

  /** The limit is reached: the session must close (421) after answering. */
  get exhausted(): boolean {
    return this.refusals >= this.options.maxAttempts;
  }

  /** Count a refusal that happened after choose() said yes (the server could not be reached). */
  refused(): void {
    this.refusals += 1;
  }

  /** Where `login` may go, or a 530 saying why not (counted). */
  async choose(login: ForwardLoginParse): Promise<GateOutcome> {
    const outcome = await this.decide(login);
    if (!outcome.ok) this.refused();
    return outcome;
  }

  private async decide(login: ForwardLoginParse): Promise<GateOutcome> {
    if (!login.ok) return { ok: false, result: 'bad-login', line: `530 ${login.reason}` };
    let destination: UpstreamDestination;
    const host = forwardHostText(login.host);
    if (login.host.kind === 'ip') {
      destination = { kind: 'ip', address: login.host.address };
    } else {
      const resolved = await this.resolve(login.host.name);
      if (!resolved.ok) return { ok: false, result: 'unresolved', line: `530 Cannot resolve ${login.host.name}: ${resolved.reason}.` };
      destination = { kind: 'name', name: login.host.name, addresses: resolved.addresses };
    }
    const decision = decideUpstream(this.options.policy, destination, login.port, [...this.options.sessionAddresses, ...interfaceAddresses()]);
    if (!decision.ok) return { ok: false, result: decision.code, line: `530 Not allowed: ${decision.reason}.` };
    return { ok: true, server: { address: decision.address, port: decision.port, host, user: login.user } };
  }

  private async resolve(name: string): Promise<{ ok: true; addresses: string[] } | { ok: false; reason: string }> {
    const resolver = this.options.resolve ?? resolveAll;
    let timer: NodeJS.Timeout | undefined;
    // getaddrinfo cannot be cancelled: past the deadline its answer is dropped.
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer within ${this.options.resolveMs} ms`)), this.options.resolveMs);
    });
    try {
      const addresses = await Promise.race([resolver(name), deadline]);
      return { ok: true, addresses };
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      // ENOTFOUND: the name does not exist; EAI_AGAIN: no resolver answered.
      const reason = code === 'ENOTFOUND' || code === 'ENODATA' ? 'no such host' : code === 'EAI_AGAIN' ? 'the resolver did not answer' : (err as Error).message;
      return { ok: false, reason };
    } finally {
      clearTimeout(timer);
    }
  }
}

/** Every address of `name` in the resolver's order (RFC 6724 sorting by getaddrinfo). */
async function resolveAll(name: string): Promise<string[]> {
  const results = await lookup(name, { all: true, verbatim: true });
  return results.map((result) => result.address);
}

/** Every address of every interface of this host: a destination among them is a loop. */
export function interfaceAddresses(): string[] {
  const out: string[] = [];
  for (const list of Object.values(networkInterfaces())) {
    for (const entry of list ?? []) out.push(entry.address);
  }
  return out;
}
