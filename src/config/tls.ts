/**
 * The TLS sections of a listener (`listeners[].tls`, toward clients) and of its upstream
 * (`upstream.tls`, toward the server), issue #12. The PEM files they name are read and checked
 * here, at load time (start and every reload): the certificate parses, the key is an
 * unencrypted private key that matches it, a CA file holds certificates. A broken file is a
 * config error like any other, so a reload with it is refused and the running material stays.
 *
 * Key material never reaches a message: problems name the file and an OpenSSL reason (a short
 * fixed phrase such as "no start line"), never the text read.
 */
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { resolve } from 'node:path';
import { X509Certificate, createPrivateKey, type KeyObject } from 'node:crypto';
import { createSecureContext } from 'node:tls';
import { Validator, bool, isHostname, isObject, section, str } from './validator.js';
import type { ClientTlsConfig, TlsMode, TlsVersion, UpstreamTlsConfig } from './schema.js';

/** Where relative file names resolve and what "now" is for the expiry check. */
export interface TlsFileContext {
  /** Absolute directory relative `cert`, `key` and `ca` paths are resolved against. */
  readonly baseDir: string;
  /** Milliseconds since the epoch. */
  readonly now: number;
}

type Path = (string | number)[];

const TLS_MODES: readonly TlsMode[] = ['explicit', 'implicit'];
const TLS_VERSIONS: readonly TlsVersion[] = ['TLSv1.2', 'TLSv1.3'];
const CERT_BLOCK = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g;
// PKCS#8 encrypted, or the traditional OpenSSL form with a Proc-Type header.
const ENCRYPTED_KEY = /-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type:\s*4,ENCRYPTED/;
// What Node reports for an encrypted key given without a passphrase (Node 20: OpenSSL's
// "interrupted or cancelled" from the passphrase callback; later versions: a missing passphrase).
const PASSPHRASE_CODES: ReadonlySet<string> = new Set(['ERR_MISSING_PASSPHRASE', 'ERR_OSSL_CRYPTO_INTERRUPTED_OR_CANCELLED']);

/** `listeners[].tls`: absent or null = no TLS offered to clients. */
export function readClientTls(v: Validator, path: Path, raw: unknown, ctx: TlsFileContext): ClientTlsConfig | null {
  if (raw === undefined || raw === null) return null;
  if (!isObject(raw)) return notAMapping(v, path);
  const before = v.issues.length;
  const o = section(v, path, raw, ['mode', 'cert', 'key', 'require', 'dataSessionReuse', 'minVersion']);
  const mode = oneOf(v, [...path, 'mode'], o.mode, undefined, TLS_MODES, 'explicit or implicit');
  const certText = str(v, [...path, 'cert'], o.cert, undefined);
  const keyText = str(v, [...path, 'key'], o.key, undefined);
  let requireTls = bool(v, [...path, 'require'], o.require, false);
  if (requireTls && mode === 'implicit') {
    // Implicit TLS has no plain phase to refuse (RFC 4217 covers only AUTH TLS).
    v.warn([...path, 'require'], 'require has no effect with implicit TLS');
    requireTls = false;
  }
  const dataSessionReuse = oneOf(v, [...path, 'dataSessionReuse'], o.dataSessionReuse, 'required', ['required', 'off'] as const, 'required or off');
  const minVersion = oneOf(v, [...path, 'minVersion'], o.minVersion, 'TLSv1.2', TLS_VERSIONS, 'TLSv1.2 or TLSv1.3');

  const cert = certText === undefined ? null : readPem(v, [...path, 'cert'], certText, ctx);
  const key = keyText === undefined ? null : readPem(v, [...path, 'key'], keyText, ctx);
  const leaf = cert ? checkCertificates(v, [...path, 'cert'], cert) : null;
  if (leaf && cert) {
    const notAfter = Date.parse(leaf.validTo);
    if (Number.isFinite(notAfter) && notAfter < ctx.now) {
      v.warn([...path, 'cert'], `the certificate in ${cert.file} has expired (notAfter ${leaf.validTo}): clients will refuse it`);
    }
  }
  const privateKey = key ? checkPrivateKey(v, [...path, 'key'], key) : null;
  if (leaf && cert && key && privateKey) {
    if (!leaf.checkPrivateKey(privateKey)) {
      v.fail([...path, 'key'], `the key in ${key.file} does not match the certificate in ${cert.file}`);
    } else if (minVersion) {
      // The context the listener will build: catches what the checks above cannot (a key
      // OpenSSL refuses to use at its security level, a broken chain entry).
      try {
        createSecureContext({ cert: cert.pem, key: key.pem, minVersion });
      } catch (err) {
        v.fail(path, `${cert.file} and ${key.file} cannot be used together: ${describeOpenSslError(err)}`);
      }
    }
  }
  if (v.issues.length > before || !mode || !cert || !key || !dataSessionReuse || !minVersion) return null;
  return { mode, certFile: cert.file, keyFile: key.file, certPem: cert.pem, keyPem: key.pem, require: requireTls, dataSessionReuse, minVersion };
}

/** `upstream.tls`: absent, null or `mode: off` = plain FTP toward the server. */
export function readUpstreamTls(v: Validator, path: Path, raw: unknown, upstreamHost: string, ctx: TlsFileContext): UpstreamTlsConfig | null {
  if (raw === undefined || raw === null) return null;
  if (!isObject(raw)) return notAMapping(v, path);
  const before = v.issues.length;
  const keys = ['mode', 'ca', 'servername', 'verify'];
  const o = section(v, path, raw, keys);
  const mode = oneOf(v, [...path, 'mode'], o.mode, undefined, ['off', ...TLS_MODES] as const, 'off, explicit or implicit');
  if (mode === 'off') {
    const ignored = keys.filter((k) => k !== 'mode' && o[k] !== undefined && o[k] !== null);
    if (ignored.length > 0) v.warn(path, `${ignored.join(', ')} ignored: mode is off (plain FTP toward the server)`);
    return null;
  }
  const caText = o.ca === undefined || o.ca === null ? null : str(v, [...path, 'ca'], o.ca, undefined);
  const servernameText = str(v, [...path, 'servername'], o.servername, upstreamHost);
  if (o.servername !== undefined && o.servername !== null && servernameText !== undefined && !isIP(servernameText) && !isHostname(servernameText)) {
    v.fail([...path, 'servername'], `"${servernameText}" is neither a hostname nor an IP address`);
  }
  const verify = bool(v, [...path, 'verify'], o.verify, true);
  if (!verify) {
    v.warn([...path, 'verify'], "the server's certificate is not verified: anyone on the path can impersonate the server (for labs only)");
  }
  let ca: PemText | null = null;
  if (caText !== null && caText !== undefined) {
    ca = readPem(v, [...path, 'ca'], caText, ctx);
    if (ca) checkCertificates(v, [...path, 'ca'], ca);
  }
  if (v.issues.length > before || !mode || servernameText === undefined) return null;
  return { mode, caFile: ca?.file ?? null, caPem: ca?.pem ?? null, servername: servernameText, verify };
}

/** One error, not one per required key inside. */
function notAMapping(v: Validator, path: Path): null {
  v.fail(path, 'must be a mapping');
  return null;
}

interface PemText {
  /** Absolute path the text was read from. */
  readonly file: string;
  readonly pem: string;
}

function readPem(v: Validator, path: Path, name: string, ctx: TlsFileContext): PemText | null {
  const file = resolve(ctx.baseDir, name);
  try {
    return { file, pem: readFileSync(file, 'utf8') };
  } catch (err) {
    v.fail(path, `cannot read ${file}: ${describeFsError(err)}`);
    return null;
  }
}

/** Every certificate in the file parses; returns the first (the leaf of a chain). */
function checkCertificates(v: Validator, path: Path, pem: PemText): X509Certificate | null {
  const blocks = pem.pem.match(CERT_BLOCK) ?? [];
  if (blocks.length === 0) {
    v.fail(path, `${pem.file} holds no PEM certificate (no "BEGIN CERTIFICATE" block)`);
    return null;
  }
  let first: X509Certificate | null = null;
  for (const [i, block] of blocks.entries()) {
    try {
      const cert = new X509Certificate(block);
      first ??= cert;
    } catch (err) {
      v.fail(path, `certificate ${i + 1} in ${pem.file} is not a valid PEM certificate: ${describeOpenSslError(err)}`);
      return null;
    }
  }
  return first;
}

function checkPrivateKey(v: Validator, path: Path, pem: PemText): KeyObject | null {
  if (ENCRYPTED_KEY.test(pem.pem)) {
    v.fail(path, `${pem.file}: encrypted private keys are not supported (store it unencrypted, readable only by the proxy's user)`);
    return null;
  }
  try {
    return createPrivateKey(pem.pem);
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    if (typeof code === 'string' && PASSPHRASE_CODES.has(code)) {
      v.fail(path, `${pem.file}: encrypted private keys are not supported (store it unencrypted, readable only by the proxy's user)`);
    } else if (code === 'ERR_OSSL_UNSUPPORTED' || code === 'ERR_OSSL_PEM_NO_START_LINE') {
      // OpenSSL's decoder found nothing it can read as a key: its reason says no more.
      v.fail(path, `${pem.file} is not a PEM private key`);
    } else {
      v.fail(path, `${pem.file} is not a PEM private key: ${describeOpenSslError(err)}`);
    }
    return null;
  }
}

/** A value from a fixed list; `fallback` undefined = required. */
function oneOf<T extends string>(v: Validator, path: Path, value: unknown, fallback: T | undefined, allowed: readonly T[], expected: string): T | undefined {
  const text = str(v, path, value, fallback);
  if (text === undefined) return undefined;
  if (!(allowed as readonly string[]).includes(text)) {
    v.fail(path, `must be ${expected}`);
    return undefined;
  }
  return text as T;
}

/** "no such file or directory (ENOENT)" from Node's "ENOENT: no such file or directory, open '/x'". */
function describeFsError(err: unknown): string {
  const e = err as NodeJS.ErrnoException;
  const match = /^[A-Z0-9_]+: ([^,]+),/.exec(e.message ?? '');
  if (match && e.code) return `${match[1]} (${e.code})`;
  return e.code ?? String(e.message ?? err);
}

/**
 * OpenSSL's reason ("no start line", "key values mismatch") in words an operator reads. Only
 * the reason or Node's own message is used, and anything that looks like PEM or base64 is
 * dropped: a message must never carry key material.
 */
export function describeOpenSslError(err: unknown): string {
  const e = err as { code?: unknown; reason?: unknown; message?: unknown };
  if (e.code === 'ERR_OSSL_X509_KEY_VALUES_MISMATCH') return 'key does not match the certificate';
  if (e.code === 'ERR_OSSL_PEM_NO_START_LINE') return 'no PEM block found';
  const text = typeof e.reason === 'string' && e.reason !== '' ? e.reason : String(e.message ?? 'unknown error');
  if (/-----|PRIVATE KEY|[A-Za-z0-9+/=]{32,}/.test(text)) return 'unreadable PEM data';
  return text;
}
