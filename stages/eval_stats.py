"""The statistics behind evaluation numbers: means with standard errors, pass@k, calibration.

Pure functions over plain numbers, so a promotion gate can recompute any headline metric from the
per-item scores in `items.jsonl` and know how much of a difference is noise.

>>> mean_stderr([1.0, 0.0, 1.0, 1.0])
(0.75, 0.25)
>>> round(pass_at_k(n=5, c=2, k=2), 10)
0.7
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean): sample standard deviation (n - 1) over sqrt(n).

    The standard error is nan below two values: one observation says nothing about spread.

    >>> mean_stderr([2.0, 4.0])  # sd = sqrt(((2-3)^2 + (4-3)^2) / 1) = sqrt(2); se = sqrt(2)/sqrt(2)
    (3.0, 1.0)
    >>> mean_stderr([5.0])
    (5.0, nan)
    >>> mean_stderr([])
    (nan, nan)
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan
    return mean, float(x.std(ddof=1) / math.sqrt(x.size))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021), which never forms the huge
    binomials that overflow for n in the hundreds.

    >>> pass_at_k(5, 0, 2), pass_at_k(5, 4, 2), pass_at_k(5, 5, 5)  # none right / n-c < k: certain
    (0.0, 1.0, 1.0)
    >>> round(pass_at_k(10, 3, 1), 10)  # pass@1 is the plain fraction correct
    0.3
    >>> round(pass_at_k(200, 10, 100), 6) == round(1 - math.comb(190, 100) / math.comb(200, 100), 6)
    True
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[float], bins: int = 10) -> float:
    """Sum over equal-width confidence bins of (bin share) * |bin accuracy - bin mean confidence|.

    Bins are [0, 1/bins), [1/bins, 2/bins), ..., with a confidence of exactly 1 in the last bin.

    >>> round(expected_calibration_error([0.9, 0.8, 0.3, 0.6], [1, 0, 0, 1], bins=2), 12)  # worked in the tests
    0.15
    >>> expected_calibration_error([1.0, 1.0], [1, 1])  # sure and right: perfectly calibrated
    0.0
    """
    conf = np.asarray(confidences, dtype=np.float64)
    acc = np.asarray(correct, dtype=np.float64)
    if conf.shape != acc.shape:
        raise ValueError(f"{conf.size} confidences but {acc.size} correctness values")
    if conf.size == 0:
        return math.nan
    if bins < 1 or conf.min() < 0 or conf.max() > 1:
        raise ValueError(f"need bins >= 1 and confidences in [0, 1], got bins={bins}, "
                         f"range [{conf.min()}, {conf.max()}]")
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in np.unique(which):
        in_bin = which == b
        total += in_bin.mean() * abs(acc[in_bin].mean() - conf[in_bin].mean())
    return float(total)


def bootstrap_stderr(statistic: Callable[[np.ndarray], float], n: int, resamples: int = 200,
                     seed: int = 0) -> float:
    """Standard error of `statistic(indices)` over `resamples` resamplings of range(n) with replacement.

    For statistics that are not a mean of per-item values (ECE): their spread cannot be read from
    the items directly. Seeded, so the same items always give the same number.

    >>> data = np.array([0.0, 1.0] * 50)
    >>> se = bootstrap_stderr(lambda idx: float(data[idx].mean()), len(data), resamples=500)
    >>> abs(se - mean_stderr(data)[1]) < 0.01  # agrees with the analytic se of a mean (0.05)
    True
    """
    if n < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, size=n)) for _ in range(resamples)]
    return float(np.std(values, ddof=1))


def perplexity_stderr(nlls: Sequence[float]) -> tuple[float, float]:
    """(exp(mean NLL), its standard error by the delta method: exp(mean) * se(mean)).

    >>> ppl, se = perplexity_stderr([1.0, 3.0])  # mean 2, se 1
    >>> round(ppl, 4), round(se, 4)
    (7.3891, 7.3891)
    """
    mean, se = mean_stderr(nlls)
    ppl = math.exp(mean) if math.isfinite(mean) else math.nan
    return ppl, ppl * se


def softmax(logits: Sequence[float]) -> list[float]:
    """Probabilities from log-likelihoods (shifted by the max, so very negative sums stay finite).

    >>> softmax([math.log(1), math.log(3)])
    [0.25, 0.75]
    >>> softmax([-1000.0, -1000.0])
    [0.5, 0.5]
    """
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return [float(p) for p in e / e.sum()]


def paired_difference(challenger: Mapping[str, float], champion: Mapping[str, float]) -> tuple[float, float, int]:
    """(mean of challenger - champion over the items both scored, its standard error, items paired).

    Pairing removes the between-item variance that dominates two independent standard errors: the
    right test when both models answered the same questions.

    >>> paired_difference({"a": 1.0, "b": 1.0, "c": 0.0}, {"a": 0.0, "b": 1.0, "d": 1.0})
    (0.5, 0.5, 2)
    """
    shared = sorted(set(challenger) & set(champion))
    mean, se = mean_stderr([challenger[i] - champion[i] for i in shared])
    return mean, se, len(shared)
