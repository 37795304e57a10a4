/**
 * Stable error codes. Every failure the proxy can hit carries one of these codes, a
 * human message with context (session id, host:port), and maps to exactly one FTP reply
 * the client sees (REPLY_FOR_CODE). The README table "Error codes" is kept in step with
 * this file by test/errors.test.ts.
 */
export const ERROR_CODES = {
  /** Configuration file unreadable, unparsable or invalid. */
  FTPP_ERR_CONFIG: 'FTPP_ERR_CONFIG',
  /** A client line that is not a command: no verb, or a verb that is not 1-8 letters (RFC 959 §5.3). */
  FTPP_ERR_BAD_COMMAND: 'FTPP_ERR_BAD_COMMAND',
  /** CR, LF or NUL inside a command's argument: refused, never forwarded (it could smuggle a second command). */
  FTPP_ERR_BAD_ARGUMENT: 'FTPP_ERR_BAD_ARGUMENT',
  /** A command line from the client exceeded the configured maximum length (RFC 959 §4.2.1 "500"). */
  FTPP_ERR_LINE_TOO_LONG: 'FTPP_ERR_LINE_TOO_LONG',
  /** A reply line or multi-line reply from the server exceeded its bound. */
  FTPP_ERR_UPSTREAM_REPLY_TOO_LONG: 'FTPP_ERR_UPSTREAM_REPLY_TOO_LONG',
  /** The server sent bytes that are not an FTP reply. */
  FTPP_ERR_UPSTREAM_PROTOCOL: 'FTPP_ERR_UPSTREAM_PROTOCOL',
  /** The upstream control connection could not be opened (refused, unreachable, timed out). */
  FTPP_ERR_UPSTREAM_UNREACHABLE: 'FTPP_ERR_UPSTREAM_UNREACHABLE',
  /** The upstream control connection could not be opened within upstreamConnectSeconds. */
  FTPP_ERR_UPSTREAM_CONNECT_TIMEOUT: 'FTPP_ERR_UPSTREAM_CONNECT_TIMEOUT',
  /** The server did not answer one of the proxy's own commands (EPSV/PASV/PORT) within upstreamReplySeconds. */
  FTPP_ERR_UPSTREAM_TIMEOUT: 'FTPP_ERR_UPSTREAM_TIMEOUT',
  /** The upstream control connection closed while the client was still connected. */
  FTPP_ERR_UPSTREAM_CLOSED: 'FTPP_ERR_UPSTREAM_CLOSED',
  /** Every port of a relay port range is leased or in use by someone else. */
  FTPP_ERR_POOL_EXHAUSTED: 'FTPP_ERR_POOL_EXHAUSTED',
  /** The client's address already holds limits.maxRelayPortsPerIp ports of a relay pool. */
  FTPP_ERR_RELAY_PORTS_PER_IP: 'FTPP_ERR_RELAY_PORTS_PER_IP',
  /** PORT/EPRT argument is not syntactically valid (RFC 959 §4.1.2, RFC 2428 §2). */
  FTPP_ERR_BAD_ADDRESS_SYNTAX: 'FTPP_ERR_BAD_ADDRESS_SYNTAX',
  /** PORT/EPRT names a host other than the client, or a privileged port (FTP bounce, RFC 2577 §3). */
  FTPP_ERR_BOUNCE_REFUSED: 'FTPP_ERR_BOUNCE_REFUSED',
  /** EPRT/EPSV family differs from the control connection's (RFC 2428 §2, "522"). */
  FTPP_ERR_WRONG_FAMILY: 'FTPP_ERR_WRONG_FAMILY',
  /** PASV on an IPv6 control connection: no IPv4 address can be given (protocol.md §2.5). */
  FTPP_ERR_PASV_ON_IPV6: 'FTPP_ERR_PASV_ON_IPV6',
  /** After EPSV ALL only EPSV may set up data connections (RFC 2428 §3). */
  FTPP_ERR_EPSV_ALL: 'FTPP_ERR_EPSV_ALL',
  /** The server refused or failed the upstream data-channel setup (EPSV/PASV/PORT). */
  FTPP_ERR_UPSTREAM_DATA_SETUP: 'FTPP_ERR_UPSTREAM_DATA_SETUP',
  /** A data connection (to the client or to the server) could not be opened in time. */
  FTPP_ERR_DATA_CONNECT: 'FTPP_ERR_DATA_CONNECT',
  /** client.dataSourcePort could not be bound: no CAP_NET_BIND_SERVICE for a port < 1024, or the same client address and port is still connected (or in TIME_WAIT) from it. */
  FTPP_ERR_DATA_SOURCE_PORT: 'FTPP_ERR_DATA_SOURCE_PORT',
  /** The server reported success for a transfer whose data the client did not fully receive (its data leg failed, or the proxy cut it after transferReplyHoldSeconds). */
  FTPP_ERR_TRANSFER_INCOMPLETE: 'FTPP_ERR_TRANSFER_INCOMPLETE',
  /** No acceptable data connection arrived on a leased port before the accept timeout. */
  FTPP_ERR_DATA_ACCEPT_TIMEOUT: 'FTPP_ERR_DATA_ACCEPT_TIMEOUT',
  /** The advertised address for PASV could not be determined (hostname unresolvable). */
  FTPP_ERR_ADVERTISE_UNRESOLVED: 'FTPP_ERR_ADVERTISE_UNRESOLVED',
  /** The command is recognised but the proxy does not offer it (LPRT, LPSV, REIN, AUTH...). */
  FTPP_ERR_NOT_IMPLEMENTED: 'FTPP_ERR_NOT_IMPLEMENTED',
  /** No traffic on the control connection for the idle timeout. */
  FTPP_ERR_IDLE_TIMEOUT: 'FTPP_ERR_IDLE_TIMEOUT',
  /** Too many commands or reply bytes queued: the peer does not read what it asked for. */
  FTPP_ERR_QUEUE_OVERFLOW: 'FTPP_ERR_QUEUE_OVERFLOW',
  /** The proxy is shutting down. */
  FTPP_ERR_SHUTDOWN: 'FTPP_ERR_SHUTDOWN',
  /** The client address is denied by the listener's ACL. */
  FTPP_ERR_ACL_DENIED: 'FTPP_ERR_ACL_DENIED',
  /** A session limit (total or per client IP) is reached. */
  FTPP_ERR_TOO_MANY_SESSIONS: 'FTPP_ERR_TOO_MANY_SESSIONS',
  /** The session has too many data channels (listeners or transfers) open at once. */
  FTPP_ERR_TOO_MANY_DATA_CHANNELS: 'FTPP_ERR_TOO_MANY_DATA_CHANNELS',
  /** No successful login within the login timeout. */
  FTPP_ERR_LOGIN_TIMEOUT: 'FTPP_ERR_LOGIN_TIMEOUT',
  /** PROXY protocol header missing, malformed, truncated, late, or from an untrusted sender. */
  FTPP_ERR_PROXY_PROTOCOL: 'FTPP_ERR_PROXY_PROTOCOL',
  /** A bug: something the proxy did not expect went wrong inside a session (logged with its stack). */
  FTPP_ERR_INTERNAL: 'FTPP_ERR_INTERNAL',
  /** The kernel data path (client.dataPath: kernel) cannot start, or one mapping failed (that transfer is relayed). */
  FTPP_ERR_KERNEL_PATH: 'FTPP_ERR_KERNEL_PATH',
  /** A security command out of order: PBSZ/PROT before AUTH, AUTH twice or after login (RFC 4217 §4, §9). */
  FTPP_ERR_TLS_SEQUENCE: 'FTPP_ERR_TLS_SEQUENCE',
  /** CCC: clearing the control connection is refused (it only gives up protection; protocol.md §5.1). */
  FTPP_ERR_TLS_POLICY: 'FTPP_ERR_TLS_POLICY',
  /** `tls.require`: USER before AUTH TLS, or a transfer with PROT C (vsftpd force_local_logins_ssl/force_local_data_ssl). */
  FTPP_ERR_TLS_REQUIRED: 'FTPP_ERR_TLS_REQUIRED',
  /** The client's control TLS handshake failed or timed out (timeouts.tlsHandshakeSeconds); the connection is closed. */
  FTPP_ERR_TLS_HANDSHAKE: 'FTPP_ERR_TLS_HANDSHAKE',
  /** A PROT P data connection's TLS handshake (either leg) failed or timed out. */
  FTPP_ERR_TLS_DATA_HANDSHAKE: 'FTPP_ERR_TLS_DATA_HANDSHAKE',
  /** `dataSessionReuse: required`: a client's PROT P data connection did not resume its control connection's TLS session. */
  FTPP_ERR_TLS_DATA_NOT_RESUMED: 'FTPP_ERR_TLS_DATA_NOT_RESUMED',
  /** TLS toward the server failed: AUTH TLS refused, handshake failed, or the certificate did not verify. Never a plain fallback. */
  FTPP_ERR_UPSTREAM_TLS: 'FTPP_ERR_UPSTREAM_TLS',
  /** Forward mode: `USER name@host` named a destination that does not parse, is refused by the policy, does not resolve or cannot be reached; the 530 says which. */
  FTPP_ERR_FORWARD_REFUSED: 'FTPP_ERR_FORWARD_REFUSED',
  /** Forward mode: `limits.maxLoginAttempts` destinations were refused in one session. */
  FTPP_ERR_LOGIN_ATTEMPTS: 'FTPP_ERR_LOGIN_ATTEMPTS',
  /** Transparent mode: the connection was not redirected (addressed to the proxy itself), or its original destination is one of the proxy's addresses. */
  FTPP_ERR_NOT_INTERCEPTED: 'FTPP_ERR_NOT_INTERCEPTED',
  /** Transparent mode: the original destination is refused by `upstream.transparent`'s policy, or could not be read. */
  FTPP_ERR_INTERCEPT_REFUSED: 'FTPP_ERR_INTERCEPT_REFUSED',
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

/** The FTP reply line (without CRLF) a client sees for each error code. */
export const REPLY_FOR_CODE: Readonly<Record<ErrorCode, string>> = Object.freeze({
  FTPP_ERR_CONFIG: '421 Service not available.',
  FTPP_ERR_BAD_COMMAND: '500 Syntax error, command unrecognized.',
  FTPP_ERR_BAD_ARGUMENT: '501 Syntax error in parameters or arguments.',
  FTPP_ERR_LINE_TOO_LONG: '500 Command line too long.',
  FTPP_ERR_UPSTREAM_REPLY_TOO_LONG: '421 Service not available: server reply too long.',
  FTPP_ERR_UPSTREAM_PROTOCOL: '421 Service not available: server protocol error.',
  FTPP_ERR_UPSTREAM_UNREACHABLE: '421 Service not available.',
  FTPP_ERR_UPSTREAM_CONNECT_TIMEOUT: '421 Service not available.',
  FTPP_ERR_UPSTREAM_TIMEOUT: '421 Service not available: server does not answer.',
  FTPP_ERR_UPSTREAM_CLOSED: '421 Service not available: server closed the connection.',
  FTPP_ERR_POOL_EXHAUSTED: "425 Can't open data connection: no free relay port.",
  FTPP_ERR_RELAY_PORTS_PER_IP: "425 Can't open data connection: too many data connections from your address.",
  FTPP_ERR_BAD_ADDRESS_SYNTAX: '501 Syntax error in parameters or arguments.',
  FTPP_ERR_BOUNCE_REFUSED: '500 Illegal PORT command.',
  FTPP_ERR_WRONG_FAMILY: '522 Network protocol not supported, use (1)',
  FTPP_ERR_PASV_ON_IPV6: '425 Use EPSV on an IPv6 connection.',
  FTPP_ERR_EPSV_ALL: '501 Only EPSV is allowed after EPSV ALL.',
  FTPP_ERR_UPSTREAM_DATA_SETUP: "425 Can't open data connection.",
  FTPP_ERR_DATA_CONNECT: "425 Can't open data connection.",
  FTPP_ERR_DATA_SOURCE_PORT: "425 Can't open data connection: source port unavailable.",
  FTPP_ERR_TRANSFER_INCOMPLETE: '426 Connection closed; transfer aborted.',
  FTPP_ERR_DATA_ACCEPT_TIMEOUT: "425 Can't open data connection: accept timed out.",
  FTPP_ERR_ADVERTISE_UNRESOLVED: "425 Can't open passive connection: address unknown.",
  FTPP_ERR_NOT_IMPLEMENTED: '502 Command not implemented.',
  FTPP_ERR_IDLE_TIMEOUT: '421 Timeout.',
  FTPP_ERR_QUEUE_OVERFLOW: '421 Too many pending commands.',
  FTPP_ERR_SHUTDOWN: '421 Service shutting down.',
  FTPP_ERR_ACL_DENIED: '421 Service not available for your address.',
  FTPP_ERR_TOO_MANY_SESSIONS: '421 Too many connections, try again later.',
  FTPP_ERR_TOO_MANY_DATA_CHANNELS: "425 Can't open data connection: too many data connections.",
  FTPP_ERR_LOGIN_TIMEOUT: '421 Login timeout.',
  FTPP_ERR_PROXY_PROTOCOL: '421 Service not available.',
  FTPP_ERR_INTERNAL: '421 Internal proxy error.',
  FTPP_ERR_KERNEL_PATH: "425 Can't open data connection.",
  FTPP_ERR_TLS_SEQUENCE: '503 Bad sequence of commands.',
  FTPP_ERR_TLS_POLICY: '534 Request denied for policy reasons.',
  FTPP_ERR_TLS_REQUIRED: '530 Non-anonymous sessions must use encryption.',
  FTPP_ERR_TLS_HANDSHAKE: '421 TLS negotiation failed.',
  FTPP_ERR_TLS_DATA_HANDSHAKE: "425 Can't open data connection: TLS negotiation failed.",
  FTPP_ERR_TLS_DATA_NOT_RESUMED: '522 TLS session of data connection not resumed.',
  FTPP_ERR_UPSTREAM_TLS: '421 Service not available: secure connection to the server failed.',
  FTPP_ERR_FORWARD_REFUSED: '530 Login incorrect: destination refused.',
  FTPP_ERR_LOGIN_ATTEMPTS: '421 Too many refused logins, closing.',
  FTPP_ERR_NOT_INTERCEPTED: '421 Service not available: this port serves redirected connections only.',
  FTPP_ERR_INTERCEPT_REFUSED: '421 Service not available: destination refused.',
});

/** Base class of every error the proxy raises on purpose. */
export class ProxyError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ProxyError';
    this.code = code;
  }
}

/** True when `err` is a ProxyError carrying `code`. */
export function isProxyError(err: unknown, code?: ErrorCode): err is ProxyError {
  return err instanceof ProxyError && (code === undefined || err.code === code);
}

/**
 * The server's own answer to a data-setup command of the proxy's (421 going away, 530 not
 * logged in): meaningful to the client as is, so it is passed on instead of a proxy reply.
 */
export class ServerReplyError extends Error {
  /** The server's reply, CRLF-terminated, exactly as received. */
  readonly raw: Buffer;
  readonly replyCode: number;
  constructor(replyCode: number, raw: Buffer) {
    super(`server replied ${replyCode}`);
    this.name = 'ServerReplyError';
    this.replyCode = replyCode;
    this.raw = raw;
  }
}
