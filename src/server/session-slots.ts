/**
 * A listener's open sessions as its session limits count them: in total and per client
 * address. Admission takes a slot in the same synchronous step that checks the limits, so
 * two connections admitted one right after the other cannot both take the last free slot;
 * the session gives its slot back once, when it has closed. Pure: no sockets.
 */
export class SessionSlots {
  private totalValue = 0;
  private readonly perIp = new Map<string, number>();
  private emptyWaiters: Array<() => void> = [];

  /** Slots held now (the listener's open sessions). */
  get total(): number {
    return this.totalValue;
  }

  /** Slots held by sessions of client address `ip`. */
  heldBy(ip: string): number {
    return this.perIp.get(ip) ?? 0;
  }

  /** Take a slot for `ip`; the returned function gives it back (idempotent). */
  take(ip: string): () => void {
    this.totalValue += 1;
    this.perIp.set(ip, this.heldBy(ip) + 1);
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      this.totalValue -= 1;
      const left = this.heldBy(ip) - 1;
      if (left > 0) this.perIp.set(ip, left);
      else this.perIp.delete(ip);
      if (this.totalValue === 0) for (const wake of this.emptyWaiters.splice(0)) wake();
    };
  }

  /** Call `fn` once no slot is held (now, if none is). */
  whenEmpty(fn: () => void): void {
    if (this.totalValue === 0) fn();
    else this.emptyWaiters.push(fn);
  }
}
