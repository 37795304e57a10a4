/**
 * Configuration: read, parse (YAML), validate every key reporting *all* errors with key path
 * and line, fill defaults, freeze. Nothing downstream re-checks what is validated here.
 */
import { readFile } from 'node:fs/promises';
import { isIP } from 'node:net';
import { dirname, resolve } from 'node:path';
import { LineCounter, parseDocument } from "yaml";
import ipaddr from 'ipaddr.js';
import { ProxyError } from '../errors.js';
import { parseCidr } from '../control/ip.js';
import { readClientTls, readUpstreamTls, type TlsFileContext } from './tls.js';
import { DEFAULT_UPSTREAM_PORTS, type UpstreamPolicy } from '../control/upstream-policy.js';
import { Validator, bool, checkKeys, cidrList, int, isHostname, isObject, parseListenAddress, parsePortRange, portList, relayPortsPerIp, section, str, upstreamRuleList } from './validator.js';
import type {
  Advertise,
  AdvertiseRule,
  DataPath,
  DataMode,
  ListenerConfig,
  PortRange,
  ProxyConfig,
  TimeoutsConfig,
  LimitsConfig,
  AclConfig,
  AdminConfig,
  ConfigIssue,
  ProxyProtocolAccept,
  ProxyProtocolConfig,
  HostAndPort,
  UpstreamSelection,
} from './schema.js';

export type { ConfigIssue } from './schema.js';
export { parseListenAddress, parsePortRange } from './validator.js';

export class ConfigError extends ProxyError {
  readonly issues: readonly ConfigIssue[];
  constructor(source: string, issues: readonly ConfigIssue[]) {
    super('FTPP_ERR_CONFIG', `${source}: ${issues.length} error(s)\n${issues.map(formatIssue).join('\n')}`);
    this.name = 'ConfigError';
    this.issues = issues;
  }
}

export function formatIssue(issue: ConfigIssue): string {
  return `  ${issue.path || '(root)'}${issue.line > 0 ? ` (line ${issue.line})` : ''}: ${issue.message}`;
}

const LOG_LEVELS = new Set(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']);
const DATA_MODES: ReadonlySet<string> = new Set(['passive', 'active', 'mirror']);
/** The ways to choose the server, one per upstream (issue #13). */
const SELECTION_KEYS = ['host', 'forward', 'transparent'] as const;

/** Defaults, in seconds where the YAML key says Seconds. Documented in README and conf/. */
export const TIMEOUT_DEFAULTS = {
  upstreamConnectSeconds: 10,
  upstreamReplySeconds: 30,
  dataConnectSeconds: 10,
  dataAcceptSeconds: 30,
  // Longer than vsftpd's idle_session_timeout (300) so the server's own 421 normally wins
  // (protocol.md §4.3).
  idleSeconds: 600,
  transferReplyHoldSeconds: 30,
  dataLingerSeconds: 10,
  abortIdleMilliseconds: 200,
  // No successful login (230) within this time: 421 and close.
  loginSeconds: 60,
  // A data connection that moves no byte in either direction for this long is reset.
  dataIdleSeconds: 300,
  // One TLS handshake (control or data connection, either leg); at most 300.
  tlsHandshakeSeconds: 10,
} as const;

export const LIMIT_DEFAULTS = {
  // vsftpd's VSFTP_MAX_COMMAND_LINE (protocol.md §1.1).
  maxLineBytes: 4096,
  maxReplyBytes: 1024 * 1024,
  maxQueuedCommands: 64,
  maxSessions: 1000,
  maxSessionsPerIp: 20,
  maxDataChannelsPerSession: 4,
  // Forward mode: refused `USER name@host` in one session before it is closed (vsftpd's max_login_fails).
  maxLoginAttempts: 3,
} as const;

export const PROXY_PROTOCOL_TIMEOUT_SECONDS = 5;
export const DRAIN_SECONDS = 30;

export const DEFAULT_PASSIVE_PORTS = '60000-60099';

function validateListener(v: Validator, index: number, raw: unknown, files: TlsFileContext): ListenerConfig | null {
  const base: (string | number)[] = ['listeners', index];
  const before = v.issues.length;
  const obj = section(v, base, raw, ['name', 'listen', 'upstream', 'client', 'timeouts', 'limits', 'acl', 'proxyProtocol', 'tls']);
  const name = str(v, [...base, 'name'], obj.name, `listener${index}`) ?? `listener${index}`;
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) v.fail([...base, 'name'], 'must be 1-64 characters of A-Z a-z 0-9 _ . -');

  const listenText = str(v, [...base, 'listen'], obj.listen, undefined);
  const listen = listenText === undefined ? null : parseListenAddress(listenText);
  if (listenText !== undefined && !listen) v.fail([...base, 'listen'], `"${listenText}" is not host:port with an IP host (IPv6 as "[::1]:21")`);

  const upPath = [...base, 'upstream'];
  const up = section(v, upPath, obj.upstream, ['host', 'port', 'forward', 'transparent', 'dataMode', 'activePorts', 'bind', 'tls']);
  if (obj.upstream === undefined) v.fail(upPath, 'is required');
  // Exactly one way to choose the server (issue #13). A key written without a value
  // (`forward:`) still says which: it reads as an empty mapping.
  const chosen = SELECTION_KEYS.filter((key) => up[key] !== undefined);
  if (chosen.length > 1) v.fail([...upPath, chosen[1]!], `cannot be combined with ${chosen[0]}: give exactly one of host, forward, transparent`);
  const selectionKey = chosen[0] ?? 'host';
  let upHost = '';
  let upPort = 0;
  let selection: UpstreamSelection | null = null;
  if (selectionKey === 'host') {
    if (up.host === undefined && obj.upstream !== undefined) v.fail([...upPath, 'host'], 'is required (or upstream.forward, or upstream.transparent)');
    upHost = str(v, [...upPath, 'host'], up.host, '') ?? '';
    if (up.host === null) v.fail([...upPath, 'host'], 'is required');
    if (upHost !== '' && !isIP(upHost) && !isHostname(upHost)) v.fail([...upPath, 'host'], `"${upHost}" is neither an IP address nor a hostname`);
    upPort = int(v, [...upPath, 'port'], up.port, 21, 1, 65535);
    // int() allows fractions (seconds); a TCP port must be whole or connect() throws at run time.
    if (!Number.isInteger(upPort)) v.fail([...upPath, 'port'], 'must be a whole number');
    selection = { kind: 'fixed', host: upHost, port: upPort };
  } else {
    if (up.port !== undefined && up.port !== null) {
      const from = selectionKey === 'forward' ? 'the client names it (USER name@host:port, else 21)' : 'it is the port the client dialled';
      v.warn([...upPath, 'port'], `ignored with ${selectionKey}: ${from}, and ${selectionKey}.ports limits it`);
    }
    const policy = readUpstreamPolicy(v, [...upPath, selectionKey], up[selectionKey], selectionKey);
    if (policy) selection = { kind: selectionKey, policy };
  }
  const dataModeText = str(v, [...base, 'upstream', 'dataMode'], up.dataMode, 'passive') ?? 'passive';
  if (!DATA_MODES.has(dataModeText)) v.fail([...base, 'upstream', 'dataMode'], 'must be passive, active or mirror');
  const dataMode = (DATA_MODES.has(dataModeText) ? dataModeText : 'passive') as DataMode;
  let activePorts: PortRange | null = null;
  if (up.activePorts !== undefined && up.activePorts !== null) {
    activePorts = parsePortRange(String(up.activePorts));
    if (!activePorts) v.fail([...base, 'upstream', 'activePorts'], 'must be "first-last" within 1-65535');
  } else if (dataMode !== 'passive') {
    v.fail([...base, 'upstream', 'activePorts'], `is required when dataMode is ${dataMode}`);
  }
  let bind: string | null = null;
  if (up.bind !== undefined && up.bind !== null) {
    bind = String(up.bind);
    if (!isIP(bind)) v.fail([...base, 'upstream', 'bind'], 'must be an IP address');
    else bind = ipaddr.parse(bind).toString();
  }
  const upstreamTls = readUpstreamTls(v, [...base, 'upstream', 'tls'], up.tls, upHost, files);
  if (upstreamTls && selectionKey !== 'host' && isObject(up.tls) && up.tls.servername !== undefined && up.tls.servername !== null) {
    // Without it the session's own destination is meant (UpstreamTlsConfig.servername).
    v.warn([...upPath, 'tls', 'servername'], `one name for every ${selectionKey} destination: servers without a certificate for "${upstreamTls.servername}" will fail verification`);
  }

  const cl = section(v, [...base, 'client'], obj.client, ['advertise', 'advertiseFor', 'passivePorts', 'portNatFixup', 'bindAllPassivePorts', 'dataPath', 'dataSourcePort']);
  const advertiseText = str(v, [...base, 'client', 'advertise'], cl.advertise, 'auto') ?? 'auto';
  let advertise: Advertise = { kind: 'auto' };
  if (advertiseText === 'auto') advertise = { kind: 'auto' };
  else if (isIP(advertiseText)) advertise = { kind: 'ip', address: ipaddr.parse(advertiseText).toString() };
  else if (isHostname(advertiseText)) advertise = { kind: 'hostname', hostname: advertiseText };
  else v.fail([...base, 'client', 'advertise'], 'must be an IP address, a hostname or "auto"');
  if (advertise.kind === 'ip' && isIP(advertise.address) !== 4) {
    if (listen && isIP(listen.host) === 6 && !ipaddr.IPv6.parse(advertise.address).isIPv4MappedAddress()) {
      // The address an IPv6 listener serves on: nowhere to put it, but no mistake either.
      // (An IPv4-mapped address means an IPv4 one and stays an error below.)
      v.warn(
        [...base, 'client', 'advertise'],
        'ignored, the listener uses "auto": 227 replies carry only IPv4 and 229 replies carry no address (PASV on an IPv6 connection is refused; EPSV needs no address)',
      );
      advertise = { kind: 'auto' };
    } else {
      v.fail([...base, 'client', 'advertise'], 'must be an IPv4 address: 227 replies carry IPv4 only (IPv6 clients use EPSV)');
    }
  }

  const advertiseFor: AdvertiseRule[] = [];
  if (cl.advertiseFor !== undefined && cl.advertiseFor !== null) {
    if (!Array.isArray(cl.advertiseFor)) v.fail([...base, 'client', 'advertiseFor'], 'must be a list');
    else {
      cl.advertiseFor.forEach((rule: unknown, i: number) => {
        const rp = [...base, 'client', 'advertiseFor', i];
        const r = section(v, rp, rule, ['from', 'address']);
        const fromText = str(v, [...rp, 'from'], r.from, undefined);
        const address = str(v, [...rp, 'address'], r.address, undefined);
        let from = null;
        if (fromText !== undefined) {
          try {
            from = parseCidr(fromText);
          } catch {
            v.fail([...rp, 'from'], `"${fromText}" is not a CIDR such as 10.0.0.0/8`);
          }
        }
        if (address !== undefined && isIP(address) !== 4) v.fail([...rp, 'address'], 'must be an IPv4 address');
        if (from && fromText !== undefined && address !== undefined && isIP(address) === 4) {
          advertiseFor.push(Object.freeze({ from, fromText, address: ipaddr.parse(address).toString() }));
        }
      });
    }
  }
  const passiveText = str(v, [...base, 'client', 'passivePorts'], cl.passivePorts, DEFAULT_PASSIVE_PORTS) ?? DEFAULT_PASSIVE_PORTS;
  const passivePorts = parsePortRange(passiveText);
  if (!passivePorts) v.fail([...base, 'client', 'passivePorts'], 'must be "first-last" within 1-65535');
  const portNatFixup = bool(v, [...base, 'client', 'portNatFixup'], cl.portNatFixup, true);
  const bindAllPassivePorts = bool(v, [...base, 'client', 'bindAllPassivePorts'], cl.bindAllPassivePorts, false);
  const dataPathText = str(v, [...base, 'client', 'dataPath'], cl.dataPath, 'relay') ?? 'relay';
  if (dataPathText !== 'relay' && dataPathText !== 'kernel' && dataPathText !== 'auto') v.fail([...base, 'client', 'dataPath'], 'must be relay, kernel or auto');
  const dataPath: DataPath = dataPathText === 'kernel' || dataPathText === 'auto' ? dataPathText : 'relay';
  const dataSourcePort = readDataSourcePort(v, [...base, 'client', 'dataSourcePort'], cl.dataSourcePort, listen, passivePorts, activePorts);

  const tp = [...base, 'timeouts'];
  const t = section(v, tp, obj.timeouts, [...Object.keys(TIMEOUT_DEFAULTS)]);
  const seconds = (key: keyof typeof TIMEOUT_DEFAULTS, max = 86400): number =>
    Math.round(int(v, [...tp, key], t[key], TIMEOUT_DEFAULTS[key], 0.001, max) * 1000);
  const timeouts: TimeoutsConfig = {
    upstreamConnectMs: seconds('upstreamConnectSeconds'),
    upstreamReplyMs: seconds('upstreamReplySeconds'),
    dataConnectMs: seconds('dataConnectSeconds'),
    dataAcceptMs: seconds('dataAcceptSeconds'),
    idleMs: seconds('idleSeconds'),
    transferReplyHoldMs: seconds('transferReplyHoldSeconds'),
    dataLingerMs: seconds('dataLingerSeconds'),
    abortIdleMs: Math.round(int(v, [...tp, 'abortIdleMilliseconds'], t.abortIdleMilliseconds, TIMEOUT_DEFAULTS.abortIdleMilliseconds, 1, 10000)),
    loginMs: seconds('loginSeconds'),
    dataIdleMs: seconds('dataIdleSeconds'),
    tlsHandshakeMs: seconds('tlsHandshakeSeconds', 300),
  };

  const lp = [...base, 'limits'];
  const l = section(v, lp, obj.limits, [...Object.keys(LIMIT_DEFAULTS), 'maxRelayPortsPerIp']);
  const limits: LimitsConfig = {
    maxLineBytes: Math.floor(int(v, [...lp, 'maxLineBytes'], l.maxLineBytes, LIMIT_DEFAULTS.maxLineBytes, 512, 65536)),
    maxReplyBytes: Math.floor(int(v, [...lp, 'maxReplyBytes'], l.maxReplyBytes, LIMIT_DEFAULTS.maxReplyBytes, 4096, 64 * 1024 * 1024)),
    maxQueuedCommands: Math.floor(int(v, [...lp, 'maxQueuedCommands'], l.maxQueuedCommands, LIMIT_DEFAULTS.maxQueuedCommands, 1, 10000)),
    maxSessions: Math.floor(int(v, [...lp, 'maxSessions'], l.maxSessions, LIMIT_DEFAULTS.maxSessions, 1, 1_000_000)),
    maxSessionsPerIp: Math.floor(int(v, [...lp, 'maxSessionsPerIp'], l.maxSessionsPerIp, LIMIT_DEFAULTS.maxSessionsPerIp, 1, 1_000_000)),
    maxDataChannelsPerSession: Math.floor(int(v, [...lp, 'maxDataChannelsPerSession'], l.maxDataChannelsPerSession, LIMIT_DEFAULTS.maxDataChannelsPerSession, 1, 64)),
    maxRelayPortsPerIp: relayPortsPerIp(v, [...lp, 'maxRelayPortsPerIp'], l.maxRelayPortsPerIp),
    maxLoginAttempts: Math.floor(int(v, [...lp, 'maxLoginAttempts'], l.maxLoginAttempts, LIMIT_DEFAULTS.maxLoginAttempts, 1, 100)),
  };

  const ap = [...base, 'acl'];
  const a = section(v, ap, obj.acl, ['allow', 'deny', 'action']);
  const actionText = str(v, [...ap, 'action'], a.action, 'reply') ?? 'reply';
  if (actionText !== 'reply' && actionText !== 'close') v.fail([...ap, 'action'], 'must be reply or close');
  const acl: AclConfig = {
    allow: cidrList(v, [...ap, 'allow'], a.allow),
    deny: cidrList(v, [...ap, 'deny'], a.deny),
    action: actionText === 'close' ? 'close' : 'reply',
  };

  const pp = [...base, 'proxyProtocol'];
  const ppo = section(v, pp, obj.proxyProtocol, ['accept', 'from', 'timeoutSeconds', 'dataPorts']);
  const acceptText = str(v, [...pp, 'accept'], ppo.accept, 'off') ?? 'off';
  if (!['off', 'v1', 'v2', 'any'].includes(acceptText)) v.fail([...pp, 'accept'], 'must be off, v1, v2 or any');
  const from = cidrList(v, [...pp, 'from'], ppo.from);
  if (acceptText !== 'off' && from.length === 0) {
    v.fail([...pp, 'from'], 'must list the load balancers allowed to send a PROXY header');
  }
  const proxyProtocol: ProxyProtocolConfig = {
    accept: (['off', 'v1', 'v2', 'any'].includes(acceptText) ? acceptText : 'off') as ProxyProtocolAccept,
    from,
    timeoutMs: Math.round(int(v, [...pp, 'timeoutSeconds'], ppo.timeoutSeconds, PROXY_PROTOCOL_TIMEOUT_SECONDS, 0.1, 60) * 1000),
    dataPorts: bool(v, [...pp, 'dataPorts'], ppo.dataPorts, false),
  };
  if (proxyProtocol.dataPorts && proxyProtocol.accept === 'off') v.fail([...pp, 'dataPorts'], 'needs accept to be v1, v2 or any');
  if (dataPath === 'kernel' && proxyProtocol.accept !== 'off') {
    // Behind a PROXY-speaking load balancer the data connections come from the balancer,
    // not from the client the kernel mapping is keyed on.
    v.fail([...base, 'client', 'dataPath'], 'kernel cannot be used with proxyProtocol (data connections come from the load balancer); use relay');
  }

  const tls = readClientTls(v, [...base, 'tls'], obj.tls, files);

  if (selection?.kind === 'forward' && acl.allow.length === 0) {
    const everywhere = selection.policy.allow.find((rule) => rule.kind === 'cidr' && rule.cidr[1] === 0);
    if (everywhere) {
      // upstream-selection.md A5.1: who may use a forward proxy matters as much as where to.
      v.warn([...upPath, 'forward', 'allow'], `${everywhere.text} with an empty acl.allow: anyone who can reach this listener can use it to reach any server (an open relay); list the clients in acl.allow`);
    }
  }

  if (v.issues.length > before || !listen || !passivePorts || !selection) return null;
  return {
    name,
    listen,
    upstream: { host: upHost, port: upPort, selection, dataMode, activePorts, bind, tls: upstreamTls },
    client: { advertise, advertiseFor, passivePorts, portNatFixup, bindAllPassivePorts, dataPath, dataSourcePort },
    timeouts,
    limits,
    acl,
    proxyProtocol,
    tls,
  };
}

/**
 * `upstream.forward` or `upstream.transparent`: `allow`, `deny` (control/upstream-policy.ts
 * rules) and `ports` (default "21"). An empty `allow` is legal but refuses every session: a
 * warning says so.
 */
function readUpstreamPolicy(v: Validator, path: (string | number)[], raw: unknown, kind: 'forward' | 'transparent'): UpstreamPolicy | null {
  if (raw !== null && !isObject(raw)) {
    v.fail(path, 'must be a mapping with allow, deny and ports');
    return null;
  }
  const before = v.issues.length;
  const o = section(v, path, raw, ['allow', 'deny', 'ports']);
  const allow = upstreamRuleList(v, [...path, 'allow'], o.allow);
  const deny = upstreamRuleList(v, [...path, 'deny'], o.deny);
  const ports = portList(v, [...path, 'ports'], o.ports, DEFAULT_UPSTREAM_PORTS);
  if (v.issues.length > before || !ports) return null;
  if (allow.length === 0) {
    v.warn(
      [...path, 'allow'],
      kind === 'forward'
        ? 'empty: forwards nowhere, every USER name@host is refused (list CIDRs, host names or *.suffix)'
        : 'empty: every redirected connection is refused (list the CIDRs clients may reach)',
    );
  }
  return { allow, deny, ports };
}

/**
 * `client.dataSourcePort`: one whole port, not one the listener itself binds (the listen
 * port, the relay ranges): an outgoing connection cannot bind a port a listening socket holds.
 */
function readDataSourcePort(
  v: Validator,
  path: (string | number)[],
  raw: unknown,
  listen: HostAndPort | null,
  passivePorts: PortRange | null,
  activePorts: PortRange | null,
): number | null {
  if (raw === undefined || raw === null) return null;
  const port = int(v, path, raw, 0, 1, 65535);
  if (port === 0) return null;
  if (!Number.isInteger(port)) {
    v.fail(path, 'must be a whole number');
    return null;
  }
  const inside = (range: PortRange | null): boolean => range !== null && port >= range.first && port <= range.last;
  if (inside(passivePorts)) v.fail(path, `${port} lies in client.passivePorts: the relay listeners hold those ports`);
  else if (inside(activePorts)) v.fail(path, `${port} lies in upstream.activePorts: the proxy listens on those ports`);
  else if (listen?.port === port) v.fail(path, `${port} is the listen port`);
  return port;
}

export interface ValidateOptions {
  /**
   * Directory relative TLS file names (`tls.cert`, `tls.key`, `upstream.tls.ca`) resolve
   * against. loadConfigFile passes the config file's directory; default: the current directory.
   */
  readonly baseDir?: string;
  /** Clock for the certificate expiry warning, ms since the epoch (tests); default Date.now(). */
  readonly now?: number;
}

/**
 * Validate a parsed YAML document. Throws ConfigError listing every problem; non-fatal ones
 * come back in the config's `warnings`. The PEM files named by TLS sections are read here.
 */
export function validateConfigText(text: string, source = 'config', options: ValidateOptions = {}): ProxyConfig {
  const lines = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lines, prettyErrors: false, uniqueKeys: true });
  const v = new Validator(doc, lines);
  for (const err of doc.errors) {
    // `linePos` is only filled in with prettyErrors: true; take the line from the error's
    // offset instead, or every syntax error is reported at line 0.
    v.issues.push({ path: '', line: lines.linePos(err.pos[0]).line, message: `YAML: ${err.message.split('\n')[0]}` });
  }
  if (v.issues.length > 0) throw new ConfigError(source, v.issues);
  const root = doc.toJS() as unknown;
  if (!isObject(root)) throw new ConfigError(source, [{ path: '', line: 1, message: 'must be a mapping with a "listeners" list' }]);
  checkKeys(v, [], root, ['log', 'listeners', 'admin', 'shutdown']);
  const adminObj = section(v, ['admin'], root.admin, ['listen']);
  let admin: AdminConfig | null = null;
  if (root.admin !== undefined && root.admin !== null) {
    const text = str(v, ['admin', 'listen'], adminObj.listen, undefined);
    const listen = text === undefined ? null : parseListenAddress(text);
    if (text !== undefined && !listen) v.fail(['admin', 'listen'], `"${text}" is not host:port with an IP host`);
    if (listen) admin = { listen };
  }
  const shutdownObj = section(v, ['shutdown'], root.shutdown, ['drainSeconds']);
  const drainMs = Math.round(int(v, ['shutdown', 'drainSeconds'], shutdownObj.drainSeconds, DRAIN_SECONDS, 0, 86400) * 1000);
  const logObj = section(v, ['log'], root.log, ['level']);
  const level = str(v, ['log', 'level'], logObj.level, 'info') ?? 'info';
  if (!LOG_LEVELS.has(level)) v.fail(['log', 'level'], `must be one of ${[...LOG_LEVELS].join(', ')}`);

  const files: TlsFileContext = { baseDir: resolve(options.baseDir ?? '.'), now: options.now ?? Date.now() };
  const listeners: ListenerConfig[] = [];
  if (!Array.isArray(root.listeners) || root.listeners.length === 0) {
    v.fail(['listeners'], 'must be a non-empty list');
  } else {
    // Index in the file of each valid listener: `listeners` skips invalid ones, so its own
    // index would name the wrong entry (and line) in the duplicate-name error.
    const fileIndex: number[] = [];
    root.listeners.forEach((raw: unknown, i: number) => {
      const listener = validateListener(v, i, raw, files);
      if (listener) {
        listeners.push(listener);
        fileIndex.push(i);
      }
    });
    const names = new Set<string>();
    listeners.forEach((l, n) => {
      if (names.has(l.name)) v.fail(['listeners', fileIndex[n]!, 'name'], `duplicate listener name "${l.name}"`);
      names.add(l.name);
    });
  }
  if (v.issues.length > 0) throw new ConfigError(source, v.issues);
  return deepFreeze({ log: { level }, listeners, admin, shutdown: { drainMs }, warnings: v.warnings });
}

/** Read and validate a file; relative TLS file names resolve against the file's directory. */
export async function loadConfigFile(path: string): Promise<ProxyConfig> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new ConfigError(path, [{ path: '', line: 0, message: `cannot read file: ${(err as Error).message}` }]);
  }
  return validateConfigText(text, path, { baseDir: dirname(resolve(path)) });
}

function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const inner of Object.values(value as object)) deepFreeze(inner);
  }
  return value;
}

