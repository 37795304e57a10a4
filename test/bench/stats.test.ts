/**
 * The bench's pooled comparison (test/bench/stats.ts ratioOfGeometricMeans): the kernel
 * section's edge ratios against its A/A ratios, worked out by hand on small inputs.
 */
import t from 'tap';
import { ratioOfGeometricMeans } from './stats.js';

t.test('ratioOfGeometricMeans: the ratio of geometric means', async (t) => {
  // Geometric means 0.9 and 1.0 with no spread: the interval collapses onto the ratio.
  const same = ratioOfGeometricMeans([0.9, 0.9, 0.9], [1, 1, 1, 1]);
  t.ok(same);
  t.equal(same!.ratio.toFixed(6), '0.900000');
  t.equal(same!.low.toFixed(6), '0.900000');
  t.equal(same!.high.toFixed(6), '0.900000');
  // 0.5 and 2 have the geometric mean 1; against a baseline of 1 the ratio is 1.
  const spread = ratioOfGeometricMeans([0.5, 2], [1, 1]);
  t.equal(spread!.ratio.toFixed(6), '1.000000');
  // ln 2 = 0.6931; the logs -0.6931 and +0.6931 have variance 0.9609 (n - 1), so the
  // standard error is sqrt(0.9609 / 2) = 0.6931 and the interval exp(±1.96 * 0.6931).
  t.equal(spread!.low.toFixed(4), Math.exp(-1.96 * Math.LN2).toFixed(4));
  t.equal(spread!.high.toFixed(4), Math.exp(1.96 * Math.LN2).toFixed(4));
  t.ok(spread!.low < 1 && spread!.high > 1, 'an interval around the ratio');
});

t.test('ratioOfGeometricMeans: failed transfers (NaN) and nonsense are left out', async (t) => {
  const r = ratioOfGeometricMeans([0.8, Number.NaN, 0.8, -1, 0], [1, 1, Number.POSITIVE_INFINITY]);
  t.equal(r!.ratio.toFixed(6), '0.800000');
  t.equal(ratioOfGeometricMeans([0.8], [1, 1]), null, 'one value is not a spread');
  t.equal(ratioOfGeometricMeans([0.8, 0.9], [Number.NaN, 1]), null);
  t.equal(ratioOfGeometricMeans([], []), null);
});
