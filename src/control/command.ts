/**
 * Client command parsing: Telnet cleanup, verb + argument split (RFC 959 §5.3).
 * Pure: no I/O.
 */
export interface ClientCommand {
  /** Upper-cased verb ("RETR"); verbs are case-insensitive (RFC 959 §5.3). */
  readonly verb: string;
  /** Argument bytes after the first SP, exactly as sent (path names may start with a space). */
  readonly argumentBytes: Buffer;
  /** Argument as latin1 text, for the proxy's own parsing (PORT, EPRT, EPSV, TYPE...). */
  readonly argument: string;
  /** The cleaned line (Telnet commands removed), without terminator: what goes upstream. */
  readonly line: Buffer;
}

export type CommandParse =
  | { readonly ok: true; readonly command: ClientCommand }
  | { readonly ok: false; readonly reason: 'empty' | 'bad-verb' | 'bad-argument' };

const IAC = 0xff;
const SB = 0xfa;
const SE = 0xf0;
const WILL = 0xfb;
const DONT = 0xfe;
const SP = 0x20;
const MAX_VERB_LENGTH = 8;

/**
 * Remove Telnet commands from a control line (RFC 854, RFC 959 §4.1).
 *
 * Node cannot read TCP urgent data, so ABOR arrives as `\xff\xf4\xf2ABOR` (BSD clients:
 * the second IAC was the urgent byte), `\xff\xf4\xffABOR` (lftp: the DM was urgent) or
 * `\xff\xf4\xff\xf2ABOR` (protocol.md §1.4, §8.19). Rules: `IAC IAC` is a literal 0xFF and
 * kept as is; option negotiation (`IAC WILL..DONT x`) and subnegotiation are dropped; `IAC x`
 * with x >= 0xF0 is dropped; a lone IAC before other data is dropped; and stray bytes >= 0x80
 * before the verb (a DM whose IAC went missing) are dropped.
 */
export function stripTelnet(text: Buffer): Buffer {
  if (text.indexOf(IAC) === -1 && (text.length === 0 || text[0]! < 0x80)) return text;
  const out = Buffer.allocUnsafe(text.length);
  let n = 0;
  let i = 0;
  let sawVerbByte = false;
  while (i < text.length) {
    const b = text[i]!;
    if (b === IAC) {
      const next = text[i + 1];
      if (next === undefined) { i += 1; continue; }
      if (next === IAC) { out[n++] = IAC; out[n++] = IAC; sawVerbByte = true; i += 2; continue; }
      if (next >= WILL && next <= DONT) { i += 3; continue; }
      if (next === SB) {
        const end = findSubnegotiationEnd(text, i + 2);
        i = end;
        continue;
      }
      if (next >= SE) { i += 2; continue; }
      i += 1; // lone IAC followed by ordinary data: drop the IAC, keep the data
      continue;
    }
    if (!sawVerbByte && b >= 0x80) { i += 1; continue; }
    sawVerbByte = true;
    out[n++] = b;
    i += 1;
  }
  return out.subarray(0, n);
}

function findSubnegotiationEnd(text: Buffer, from: number): number {
  for (let j = from; j < text.length - 1; j++) {
    if (text[j] === IAC && text[j + 1] === SE) return j + 2;
  }
  return text.length;
}

/** Parse one framed line from the client into verb and argument. */
export function parseCommandLine(text: Buffer): CommandParse {
  const line = stripTelnet(text);
  if (line.length === 0) return { ok: false, reason: 'empty' };
  const sp = line.indexOf(SP);
  const verbBytes = sp === -1 ? line : line.subarray(0, sp);
  if (verbBytes.length === 0 || verbBytes.length > MAX_VERB_LENGTH) return { ok: false, reason: 'bad-verb' };
  for (const b of verbBytes) {
    const isLetter = (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a);
    if (!isLetter) return { ok: false, reason: 'bad-verb' };
  }
  const argumentBytes = sp === -1 ? Buffer.alloc(0) : line.subarray(sp + 1);
  // Reject, don't repair (style.md #3): a command ends at its CRLF (RFC 959 §5.3), so CR, LF
  // or NUL inside it is not a valid argument. Forwarded as is, "NOOP\rPORT ..." would smuggle
  // an unchecked second command to any server that ends lines at CR.
  if (argumentBytes.indexOf(0x0d) !== -1 || argumentBytes.indexOf(0x0a) !== -1 || argumentBytes.indexOf(0x00) !== -1) {
    return { ok: false, reason: 'bad-argument' };
  }
  return {
    ok: true,
    command: {
      verb: verbBytes.toString('latin1').toUpperCase(),
      argumentBytes,
      argument: argumentBytes.toString('latin1'),
      line,
    },
  };
}

/**
 * True when a line still waiting for its LF is CPython's urgent ABOR (`ABOR\r`, the LF was
 * sent as TCP urgent data and vanished; protocol.md §1.4, §8.20).
 */
export function isUnterminatedAbort(pending: Buffer): boolean {
  if (pending.length === 0 || pending[pending.length - 1] !== 0x0d) return false;
  let end = pending.length;
  while (end > 0 && pending[end - 1] === 0x0d) end--;
  const cleaned = stripTelnet(pending.subarray(0, end));
  return cleaned.length === 4 && cleaned.toString('latin1').toUpperCase() === 'ABOR';
}

/**
 * Split a line that is CPython's urgent `ABOR\r` with the next command glued behind it
 * (test-environment.md: the LF went out as TCP urgent data and Node never sees it, so
 * `ABOR\rNOOP\r\n` arrives as one line). Returns the pieces to treat as separate lines:
 * `[ABOR, rest]` for such a line, `[text]` for any other.
 */
export function splitGluedAbort(text: Buffer): Buffer[] {
  const cr = text.indexOf(0x0d);
  if (cr === -1) return [text];
  const head = stripTelnet(text.subarray(0, cr));
  if (head.length !== 4 || head.toString('latin1').toUpperCase() !== 'ABOR') return [text];
  let restStart = cr;
  while (text[restStart] === 0x0d) restStart++;
  const rest = text.subarray(restStart);
  return rest.length > 0 ? [text.subarray(0, cr), rest] : [text.subarray(0, cr)];
}

/** Verbs whose argument is a secret (RFC 959 §4.1.1: PASS, and ACCT's account information). */
const SECRET_VERBS: ReadonlySet<string> = new Set(['PASS', 'ACCT']);

/**
 * SITE subcommands (RFC 959 §4.1.3: server-specific) whose arguments carry a password, as
 * documented by the servers that have them:
 * PSWD <old> <new> (Serv-U, Wing FTP); CHPASS [<user>] <new> (wzdftpd, glftpd);
 * PASSWD <new> (glftpd, FTP4ALL); CHPWD <account> <old> <new> (Axway SecureTransport, base64
 * only); GPASS <group password> (wu-ftpd); ADDUSER <user> <password> ... (wzdftpd, FTP4ALL);
 * CHANGE <user> pass <new> (wzdftpd; every CHANGE is masked, its other fields are no secret
 * but not worth a parser).
 */
const SECRET_SITE_SUBCOMMANDS: ReadonlySet<string> = new Set(['PSWD', 'CHPASS', 'PASSWD', 'CHPWD', 'GPASS', 'ADDUSER', 'CHANGE']);

/** The first word of a SITE argument; blanks separate it, and a run of them counts as one. */
const SITE_SUBCOMMAND = /^[ \t]*([^ \t]+)/;

/**
 * Text safe for logs: the PASS (and ACCT) argument is never shown, nor anything after a
 * password-setting SITE subcommand (`SITE PSWD ****`: the subcommand stays, for debugging).
 */
export function describeCommandForLog(command: ClientCommand): string {
  if (SECRET_VERBS.has(command.verb)) return `${command.verb} ****`;
  if (command.verb === 'SITE') {
    const subcommand = SITE_SUBCOMMAND.exec(command.argument)?.[1]?.toUpperCase();
    if (subcommand !== undefined && SECRET_SITE_SUBCOMMANDS.has(subcommand)) return `SITE ${subcommand} ****`;
  }
  const arg = command.argument.length > 200 ? `${command.argument.slice(0, 200)}...` : command.argument;
  return arg.length > 0 ? `${command.verb} ${arg}` : command.verb;
}
