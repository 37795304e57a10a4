/**
 * A session's named timers (idle, login, close deadline, close grace): one place that arms,
 * re-arms and clears them, so teardown cannot forget one. Node only reports time; what a
 * timer means is the caller's callback.
 */
export class NamedTimers<Name extends string> {
  private readonly timers = new Map<Name, NodeJS.Timeout>();

  /** Arm `name` to call `fn` after `ms`, replacing the same timer if it was armed. */
  set(name: Name, ms: number, fn: () => void, options: { unref?: boolean } = {}): void {
    this.clear(name);
    const timer = setTimeout(() => {
      this.timers.delete(name);
      fn();
    }, ms);
    if (options.unref) timer.unref();
    this.timers.set(name, timer);
  }

  /** Arm `name` only if it is not armed already. */
  setOnce(name: Name, ms: number, fn: () => void, options: { unref?: boolean } = {}): void {
    if (!this.timers.has(name)) this.set(name, ms, fn, options);
  }

  has(name: Name): boolean {
    return this.timers.has(name);
  }

  clear(name: Name): void {
    const timer = this.timers.get(name);
    if (timer) clearTimeout(timer);
    this.timers.delete(name);
  }

  clearAll(): void {
    for (const timer of this.timers.values()) clearTimeout(timer);
    this.timers.clear();
  }
}
