/**
 * Bounded waiting for tests: every wait ends, and no timer here keeps the process alive.
 */

/** The default bound of a helper's wait (a reply, a read, a connect). */
export const DEFAULT_WAIT_MS = 5000;

/** Race `promise` against a timer; the timer never keeps the process alive. */
export function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | null = null;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    timer.unref();
  });
  return Promise.race([promise, timeout]).finally(() => {
    if (timer) clearTimeout(timer);
  });
}

export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Poll `check` until it returns true or `ms` runs out; returns the last result. */
export async function waitFor(check: () => boolean, ms = 3000, stepMs = 20): Promise<boolean> {
  const end = Date.now() + ms;
  for (;;) {
    if (check()) return true;
    if (Date.now() >= end) return false;
    await delay(stepMs);
  }
}

/** Whether `promise` has settled by the next turn of the event loop. */
export function isSettled(promise: Promise<unknown>): Promise<boolean> {
  let settled = false;
  void promise.then(() => {
    settled = true;
  });
  return new Promise((resolve) => setImmediate(() => resolve(settled)));
}
