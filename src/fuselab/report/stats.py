"""Statistics for comparing methods over seeds and test predictions.

* :func:`mean_ci` -- mean, sample standard deviation and t-based confidence-interval half-width.
* :func:`paired_ttest` -- paired t-test over seeds (two-sided).
* :func:`mcnemar` -- exact McNemar test on paired per-sample correctness (two-sided).
* :func:`holm` -- Holm step-down correction for multiple comparisons.

All functions take plain sequences or numpy arrays and return Python floats / numpy arrays, so they
can be used outside the report tables too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = ["holm", "mcnemar", "mean_ci", "paired_ttest"]


def _as_float_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def mean_ci(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean, sample standard deviation and confidence-interval half-width of ``values``.

    The interval is the Student-t interval ``mean +- t_{(1+c)/2, n-1} * std / sqrt(n)``.

    Args:
        values: one value per seed (at least one).
        confidence: coverage of the interval, in (0, 1).

    Returns:
        ``(mean, std, half_width)``; with a single value the std is 0 and the half-width is nan.

    Raises:
        ValueError: if ``values`` is empty or ``confidence`` is not in (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    arr = _as_float_1d(values, "values")
    n = arr.size
    mean = float(np.mean(arr))
    if n == 1:
        return mean, 0.0, math.nan
    std = float(np.std(arr, ddof=1))
    t_crit = float(stats.t.ppf(0.5 + confidence / 2.0, df=n - 1))
    return mean, std, t_crit * std / math.sqrt(n)


def paired_ttest(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Two-sided p-value of the paired t-test of ``a`` against ``b`` (:func:`scipy.stats.ttest_rel`).

    ``a[i]`` and ``b[i]`` must come from the same seed.

    Returns:
        The p-value; 1.0 if every difference is exactly zero, nan with fewer than two pairs. Identical
        non-zero differences (zero variance) give 0.0.

    Raises:
        ValueError: if the inputs have different lengths.
    """
    x = np.asarray(a, dtype=float).reshape(-1)
    y = np.asarray(b, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired_ttest needs paired samples, got lengths {x.size} and {y.size}")
    if x.size < 2:
        return math.nan
    diff = x - y
    if np.all(diff == 0.0):
        return 1.0
    with warnings.catch_warnings():
        # Nearly constant differences trigger a precision warning; the result is still meaningful.
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_rel(x, y)
    return float(result.pvalue)


def mcnemar(
    correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray
) -> float:
    """Two-sided exact McNemar test on paired per-sample correctness.

    Counts the discordant pairs (``a`` right and ``b`` wrong, and the reverse) and runs an exact
    binomial test with ``p = 0.5`` on them (:func:`scipy.stats.binomtest`).

    Args:
        correct_a: per test sample, whether method A was right.
        correct_b: the same samples, whether method B was right.

    Returns:
        The p-value; 1.0 when there are no discordant pairs.

    Raises:
        ValueError: if the inputs have different lengths.
    """
    x = np.asarray(correct_a, dtype=bool).reshape(-1)
    y = np.asarray(correct_b, dtype=bool).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"mcnemar needs paired samples, got lengths {x.size} and {y.size}")
    only_a = int(np.count_nonzero(x & ~y))
    only_b = int(np.count_nonzero(~x & y))
    n_discordant = only_a + only_b
    if n_discordant == 0:
        return 1.0
    return float(stats.binomtest(only_a, n_discordant, p=0.5, alternative="two-sided").pvalue)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values.

    With the ``m`` finite p-values sorted ascending, ``p_(i)`` becomes
    ``max_{j <= i} min(1, (m - j + 1) * p_(j))``. nan entries stay nan and do not count in ``m``.

    Returns:
        Adjusted p-values in the input order (float array of the input's length).
    """
    p = np.asarray(pvalues, dtype=float).reshape(-1)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if m == 0:
        return adjusted
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted
