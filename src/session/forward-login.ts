/**
 * Forward mode's login (issue #13, upstream-selection.md A): the commands of a forward-mode
 * session until its server is chosen (control/pre-login.ts says what each gets), the
 * `USER name@host[:port]` that chooses it, and every later USER. The session hands those
 * commands here and gets its server connection through ServerLeg.login(); everything after
 * the login relays as in any session.
 */
import type { ClientCommand } from '../control/command.js';
import { forwardHostText, parseForwardLogin, type ForwardLoginParse } from '../control/forward-login.js';
import { formatEndpoint } from '../control/ip.js';
import { decidePreLogin, withServerBanner } from '../control/pre-login.js';
import { replyLine, type Reply } from '../control/reply.js';
import type { CommandDecision, SessionView } from '../control/rewrite.js';
import { DEFAULT_FTP_PORT } from '../control/upstream-policy.js';
import type { ListenerConfig } from '../config/schema.js';
import { REPLY_FOR_CODE } from '../errors.js';
import type { Logger } from '../log.js';
import type { ProxyMetrics, RejectionReason, UpstreamChoiceResult } from '../metrics.js';
import type { ReplyQueue, ReplySlot } from '../reply-queue.js';
import type { ChosenServer, ForwardGate } from './forward-gate.js';
import type { ServerLeg, UpstreamTarget } from './server-leg.js';

export interface ForwardLoginParts {
  readonly config: ListenerConfig;
  readonly metrics: ProxyMetrics;
  readonly log: Logger;
  readonly replies: ReplyQueue;
  readonly server: ServerLeg<unknown>;
  readonly gate: ForwardGate;
}

export interface ForwardLoginHooks {
  view(): SessionView;
  /** A command of the client leg's own (AUTH, PBSZ, PROT, CCC, HOST naming the proxy). */
  carryOut(command: ClientCommand, decision: CommandDecision): Promise<void>;
  /** The session takes no more work. */
  finished(): boolean;
  /** The session has its server connection (ServerLeg.login made it `open`). */
  open(): boolean;
  close(reason: string, replyText?: string): void;
  limitHit(reason: RejectionReason, fields?: Record<string, unknown>): void;
  /** The user name now logging in; `server` when the login chose it. */
  chosen(server: ChosenServer | null, user: string): void;
}

export class ForwardLogin {
  private readonly parts: ForwardLoginParts;
  private readonly hooks: ForwardLoginHooks;
  private server: ChosenServer | null = null;

  constructor(parts: ForwardLoginParts, hooks: ForwardLoginHooks) {
    this.parts = parts;
    this.hooks = hooks;
  }

  /** The server the client chose, once connected. */
  get chosen(): ChosenServer | null {
    return this.server;
  }

  /** A command before the server is chosen, or any USER. */
  async execute(command: ClientCommand): Promise<void> {
    if (this.server) return this.relogin(command, this.server);
    const decision = decidePreLogin(command, this.hooks.view(), this.parts.config.tls !== null);
    switch (decision.kind) {
      case 'login':
        return this.login(decision.login);
      case 'own':
        return this.hooks.carryOut(command, decision.decision);
      case 'reply':
        this.parts.replies.append(replyLine(decision.line));
        return;
      case 'quit':
        this.parts.replies.append(replyLine(decision.line));
        this.hooks.close('client quit');
        return;
    }
  }

  /**
   * `USER name@host[:port]`: choose (parse, resolve, policy), dial exactly the checked
   * address, read the server's greeting, then send `USER name`; the client's answer is the
   * server's, with its banner in front (withServerBanner). A refusal is a 530 and the client
   * may try again, up to limits.maxLoginAttempts.
   */
  private async login(login: ForwardLoginParse): Promise<void> {
    const { gate, replies, server: leg } = this.parts;
    const slot = replies.open();
    const outcome = await gate.choose(login);
    if (this.hooks.finished()) return replies.end(slot);
    if (!outcome.ok) return this.refuse(slot, outcome.result, outcome.line);
    const server = outcome.server;
    const target: UpstreamTarget = { address: server.address, port: server.port, host: server.host };
    const where = formatEndpoint(server.address, server.port);
    let greeting: Reply | null;
    try {
      greeting = await leg.login(target);
    } catch (err) {
      gate.refused();
      return this.refuse(slot, 'unreachable', `530 Cannot connect to ${server.host === server.address ? where : `${server.host} (${where})`}: ${(err as Error).message}.`);
    }
    // The session gave up meanwhile (client gone, shutdown): the connection was dropped.
    if (!greeting || !this.hooks.open()) return replies.end(slot);
    this.server = server;
    this.hooks.chosen(server, server.user);
    this.parts.metrics.upstreamChoice(this.parts.config.name, 'forward', 'ok');
    this.parts.log.info({ event: 'upstream-chosen', mode: 'forward', host: server.host, upstream: where }, 'forward login: server chosen');
    leg.exchange.forward(Buffer.from(`USER ${server.user}`, 'latin1'), slot, { transform: (reply) => withServerBanner(greeting, reply) });
  }

  private refuse(slot: ReplySlot, result: Exclude<UpstreamChoiceResult, 'ok'>, line: string): void {
    const { gate, replies, config } = this.parts;
    this.parts.metrics.upstreamChoice(config.name, 'forward', result);
    this.parts.log.info({ event: 'upstream-refused', mode: 'forward', code: 'FTPP_ERR_FORWARD_REFUSED', result, reply: line, attempt: gate.attempts }, 'forward login refused');
    replies.push(slot, replyLine(line));
    replies.end(slot);
    if (!gate.exhausted) return;
    this.hooks.limitHit('login-attempts', { code: 'FTPP_ERR_LOGIN_ATTEMPTS', max: config.limits.maxLoginAttempts });
    this.hooks.close('too many refused logins', REPLY_FOR_CODE.FTPP_ERR_LOGIN_ATTEMPTS);
  }

  /**
   * Another USER once the server is chosen (a retry after a wrong password): the same
   * destination is stripped and the name goes on; a different one would need another
   * connection, which this session cannot switch to.
   */
  private relogin(command: ClientCommand, chosen: ChosenServer): void {
    const login = parseForwardLogin(command.argument);
    const host = login.ok ? forwardHostText(login.host) : null;
    if (login.ok && host === chosen.host && (login.port ?? DEFAULT_FTP_PORT) === chosen.port) {
      this.hooks.chosen(null, login.user);
      this.parts.server.exchange.forward(Buffer.from(`USER ${login.user}`, 'latin1'), this.parts.replies.open());
      return;
    }
    const line = `530 This session is connected to ${chosen.host}${chosen.port === DEFAULT_FTP_PORT ? '' : `:${chosen.port}`}: log in as user@ that server, or reconnect for another one.`;
    this.parts.replies.append(replyLine(line));
  }
}
