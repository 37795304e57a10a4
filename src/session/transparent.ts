/**
 * Transparent interception (issue #13, upstream-selection.md B3): the router redirected the
 * client's port-21 connection here, and the server is the address the client dialled. Which
 * one that was comes from the kernel (server/original-destination.ts, SO_ORIGINAL_DST); this
 * decides whether the session may go there. Interception is no authorization: the same
 * allow/deny/ports policy as forward mode applies, and a connection addressed to the proxy
 * itself, or redirected to one of its own addresses, is refused (a loop, B7).
 */
import { decideUpstream, type UpstreamPolicy } from '../control/upstream-policy.js';
import type { ErrorCode } from '../errors.js';
import type { UpstreamChoiceResult } from '../metrics.js';
import type { UpstreamTarget } from './server-leg.js';
import type { OriginalDestination } from '../server/original-destination.js';

export type TransparentChoice =
  | { readonly ok: true; readonly target: UpstreamTarget }
  | { readonly ok: false; readonly result: Exclude<UpstreamChoiceResult, 'ok'>; readonly code: ErrorCode; readonly reason: string };

export function chooseTransparentTarget(original: OriginalDestination, policy: UpstreamPolicy, ownAddresses: readonly string[]): TransparentChoice {
  switch (original.kind) {
    case 'not-redirected':
      return { ok: false, result: 'not-redirected', code: 'FTPP_ERR_NOT_INTERCEPTED', reason: 'the connection was addressed to the proxy itself, not redirected' };
    case 'unavailable':
    case 'error':
      return { ok: false, result: 'lookup-failed', code: 'FTPP_ERR_INTERCEPT_REFUSED', reason: `the original destination could not be read: ${original.reason}` };
    case 'redirected': {
      const decision = decideUpstream(policy, { kind: 'ip', address: original.ip }, original.port, ownAddresses);
      if (decision.ok) return { ok: true, target: { address: decision.address, port: decision.port, host: decision.address } };
      // The client dialled one of our own addresses on port 21 and the router redirected it: a loop, not a destination.
      const code: ErrorCode = decision.code === 'own-address' ? 'FTPP_ERR_NOT_INTERCEPTED' : 'FTPP_ERR_INTERCEPT_REFUSED';
      return { ok: false, result: decision.code, code, reason: decision.reason };
    }
  }
}
