/**
 * The listener ACL as pure functions: no sockets, no logs. Admission (admission.ts) asks
 * them about the real client (the PROXY header's source when there is one), and about the
 * sender of a PROXY header (`proxyProtocol.from`).
 */
import type { AclConfig, CidrRule } from '../config/schema.js';
import { ipInCidr } from '../control/ip.js';

/** `ip` lies in at least one of `rules`. */
export function inAnyCidr(ip: string, rules: readonly CidrRule[]): boolean {
  return rules.some((rule) => ipInCidr(ip, rule.cidr));
}

/** Deny wins; a non-empty allow list admits only its members. */
export function aclAllows(ip: string, config: { readonly acl: AclConfig }): boolean {
  if (inAnyCidr(ip, config.acl.deny)) return false;
  return config.acl.allow.length === 0 || inAnyCidr(ip, config.acl.allow);
}
