/**
 * tap types for the helpers.
 */
import type { TAP } from 'tap';

/** The part of a tap Test the helpers need (avoids depending on tap's plugin types). */
export interface TeardownHost {
  teardown(fn: () => unknown): void;
}

/** The type of `t` inside a `t.test(name, async (t) => ...)` callback. */
export type TapTest = Parameters<Parameters<TAP['test']>[0]>[0];
