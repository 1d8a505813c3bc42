"""Uncertainty of the figures a report gives: 95% intervals on accuracies and paired tests.

``wilson``: the Wilson score interval of k right answers out of n (Wilson 1927), which keeps
its coverage near the 0 and 1 ends where the normal approximation fails. ``mcnemar``: two
classifiers run on the same samples differ only where one is right and the other wrong; with b
and c such samples, the exact two-sided binomial test of b against Binomial(b + c, 1/2)
(McNemar 1947; the exact form for small b + c). A difference is called significant at p < 0.05.
"""

from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054


def wilson(k: float, n: int, z: float = Z95) -> list[float]:
    """[low, high] of the Wilson score interval for k successes in n trials."""
    if n <= 0:
        return [0.0, 1.0]
    p = min(max(k / n, 0.0), 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def mcnemar(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Paired comparison of two per-sample right/wrong vectors (1 = right) on the same samples."""
    a, b = a.bool(), b.bool()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        p = 1.0
    else:  # two-sided exact binomial: 2 P(X <= min(b, c)), X ~ Binomial(n, 1/2), in log space
        k = min(only_a, only_b)
        logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
                for i in range(k + 1)]
        top = max(logs)
        p = min(1.0, 2.0 * math.exp(top) * sum(math.exp(v - top) for v in logs))
    return {"only_this_right": only_a, "only_other_right": only_b, "p_value": p, "significant": p < 0.05}
