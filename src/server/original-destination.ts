/**
 * Where a transparently intercepted client meant to go (issue #13; upstream-selection.md
 * §B1, §B3). The NAT router redirects clients' port-21 connections to the proxy
 * (`tcp dport 21 redirect to :2121`); the accepted socket's own address is then the router's,
 * and only conntrack still knows the server the client dialled. The native addon asks it
 * with getsockopt(SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST) (src/native/original_dst.c); no
 * /proc/net/nf_conntrack parsing (root-only, possibly absent, a full table dump per lookup).
 *
 * Four outcomes, one union:
 *   - `redirected`: the original destination, normalized (v4-mapped IPv6 as IPv4);
 *   - `not-redirected`: the client addressed the proxy itself. The kernel says so two ways:
 *     ENOENT (no conntrack entry: conntrack is not active in this network namespace) or the
 *     socket's own local address and port (a tracked flow that was not NATed), which is what
 *     SuSE ftp-proxy compares with getsockname;
 *   - `unavailable`: no way to ask (not Linux, addon not built or too old, no descriptor);
 *   - `error`: the kernel refused for another reason (errno name in the reason).
 * Intercepted is not authorized: a redirected destination still goes through the destination
 * policy, including the loop check (a client dialling the router's own port 21 comes back
 * `redirected` to the router's address, port 21).
 *
 * Works only on the host that did the NAT, and only in the default conntrack zone (kernel
 * getorigdst()); the lookup is racy in the kernel's own words (tproxy.rst), so call it right
 * after accept.
 */
import type net from 'node:net';
import { constants } from 'node:os';
import { getSystemErrorName } from 'node:util';
import { normalizeIp, sameIp } from '../control/ip.js';
import { addressesOf, type Endpoint } from '../data/socket-address.js';
import { loadSpliceAddon, socketDescriptor } from '../data/splice-relay.js';

/** What the addon's originalDestination(fd) answers: the address, or the errno of the lookup. */
export type OriginalDestinationAnswer = { readonly ip: string; readonly port: number } | { readonly errno: number };

export type OriginalDestinationLookup = (fd: number) => OriginalDestinationAnswer;

export type OriginalDestination =
  /** The client dialled ip:port and the router redirected it here. */
  | { readonly kind: 'redirected'; readonly ip: string; readonly port: number }
  /** The client dialled the proxy itself (explicit / forward mode). */
  | { readonly kind: 'not-redirected' }
  /** The mechanism cannot be used here or for this socket. */
  | { readonly kind: 'unavailable'; readonly reason: string }
  /** The kernel lookup failed. */
  | { readonly kind: 'error'; readonly reason: string };

/** The lookup, or why there is none. */
export interface LoadedLookup {
  readonly lookup: OriginalDestinationLookup | null;
  readonly reason: string;
}

/** The addon's function as a lookup, or why it cannot be had (pure: tests pass fake addons). */
export function lookupFromAddon(addon: object | null, addonReason: string): LoadedLookup {
  if (!addon) return { lookup: null, reason: `transparent interception needs the native addon: ${addonReason}` };
  const fn = (addon as { originalDestination?: unknown }).originalDestination;
  if (typeof fn !== 'function') return { lookup: null, reason: 'the native addon predates transparent interception (rebuild: npm install)' };
  return { lookup: (fd) => (fn as OriginalDestinationLookup).call(addon, fd), reason: 'SO_ORIGINAL_DST through the native addon' };
}

/** The real lookup through the project's addon (loaded once, by loadSpliceAddon). */
export function loadOriginalDestinationLookup(platform: NodeJS.Platform = process.platform): LoadedLookup {
  // SO_ORIGINAL_DST is Linux netfilter; elsewhere the addon is not built anyway.
  if (platform !== 'linux') return { lookup: null, reason: `transparent interception (SO_ORIGINAL_DST) is Linux-only (platform ${platform})` };
  const { addon, reason } = loadSpliceAddon();
  return lookupFromAddon(addon, reason);
}

/**
 * Null when original destinations can be read on this machine, else one line saying why
 * not. Asks no socket: a listener with `upstream.transparent` refuses to start on it.
 */
export function originalDestinationUnavailable(loaded: LoadedLookup = loadOriginalDestinationLookup()): string | null {
  return loaded.lookup ? null : loaded.reason;
}

/**
 * The kernel's answer, judged against the socket's own local address (pure). ENOENT and
 * "the original destination is where the socket already is" both mean the client dialled us.
 */
export function classifyOriginalDestination(answer: OriginalDestinationAnswer, local: Endpoint | null): OriginalDestination {
  if ('errno' in answer) {
    if (answer.errno === constants.errno.ENOENT) return { kind: 'not-redirected' };
    return { kind: 'error', reason: `getsockopt(SO_ORIGINAL_DST) failed: ${errnoName(answer.errno)}` };
  }
  let ip: string;
  try {
    ip = normalizeIp(answer.ip);
  } catch {
    return { kind: 'error', reason: `getsockopt(SO_ORIGINAL_DST) answered an unreadable address "${answer.ip}"` };
  }
  if (!Number.isInteger(answer.port) || answer.port < 1 || answer.port > 65535) {
    return { kind: 'error', reason: `getsockopt(SO_ORIGINAL_DST) answered port ${answer.port}` };
  }
  // Without our own address the two answers cannot be told apart; the connection is gone anyway.
  if (!local) return { kind: 'error', reason: 'the socket has no local address (connection closed or reset)' };
  if (sameIp(ip, local.ip) && answer.port === local.port) return { kind: 'not-redirected' };
  return { kind: 'redirected', ip, port: answer.port };
}

/**
 * Where the client of an accepted socket meant to go. Call it right after accept, before
 * anything else can close the socket. `loaded` is for tests; the default is the addon.
 */
export function originalDestinationOf(socket: net.Socket, loaded: LoadedLookup = loadOriginalDestinationLookup()): OriginalDestination {
  if (!loaded.lookup) return { kind: 'unavailable', reason: loaded.reason };
  const fd = socketDescriptor(socket);
  if (fd === null) return { kind: 'unavailable', reason: 'the socket has no descriptor (not connected, or already destroyed)' };
  const answer = loaded.lookup(fd);
  return classifyOriginalDestination(answer, addressesOf(socket)?.local ?? null);
}

/** `ENOTCONN (errno 107)`; getSystemErrorName takes negative (libuv-style) numbers only. */
function errnoName(errno: number): string {
  return Number.isInteger(errno) && errno > 0 ? `${getSystemErrorName(-errno)} (errno ${errno})` : `errno ${errno}`;
}
