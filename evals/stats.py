"""Intervals and verdicts for evaluation numbers: a bootstrap over videos, a t-interval over seeds.

**Over videos: the bootstrap (BCa).** The report's numbers are not all means of independent
per-video values: the velocity error is a sum of per-(frame, ball) errors over the number of
such pairs (a ratio whose denominator changes from video to video: a video where the ball is
lost adds no pair), the detection rate is found / visible, and a Frechet distance is no mean
at all. A t-interval needs a mean of i.i.d. values; resampling the videos (the unit that was
sampled) and recomputing each statistic exactly as the report does serves every one of them,
and pairs naturally: a difference between two models is recomputed on the *same* resampled
videos, so the per-video difficulty that both share cancels. The bias-corrected and
accelerated interval (BCa; Efron 1987, "Better bootstrap confidence intervals") corrects the
percentile interval for the bias and skew of ratios and of rates near 1. The resampling is
``scipy.stats.bootstrap`` (a well-kept implementation) with a fixed seed, so a report is
reproducible; a statistic is written as a function of the resampled *video indices*, which
lets one call cover ratios, pairs and Frechet distances alike.

**Over seeds: Student's t.** Two to five training seeds are too few to resample (a bootstrap
of 3 values has 10 distinct resamples); the t distribution with S - 1 degrees of freedom is
the exact interval for the mean of S normal values and is wide when S is small, as it should
be. Differences between two variants over seeds use Welch's interval (unequal variances).

**Resolved**: a difference is resolved when its 95 % interval excludes 0, otherwise "not
resolved" (the data cannot tell the two apart at this sample size; not "equal").

**Too few samples**: a Frechet distance fits a D-dimensional Gaussian to N samples; with
N <= D the covariance is singular and the number measures the sample size more than the
videos (:func:`frechet_reliability`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats as _st

__all__ = [
    "LEVEL",
    "N_RESAMPLES",
    "MIN_SAMPLES",
    "bootstrap_interval",
    "t_interval",
    "welch_interval",
    "resolved",
    "verdict",
    "frechet_reliability",
]

LEVEL = 0.95  # every interval in a report is a 95 % interval
N_RESAMPLES = 2000  # bootstrap resamples: the BCa end points move by < 1 % of the width beyond this
# Fewer resampled units than this and a bootstrap interval is too narrow (3 videos have 10
# distinct resamples; coverage of the percentile interval of a mean is ~0.8 at n = 5): no interval.
MIN_SAMPLES = 10


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def bootstrap_interval(
    statistic: Callable[[np.ndarray], Any],
    n: int,
    *,
    vectorized: bool = True,
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    method: str = "BCa",
    min_n: int = MIN_SAMPLES,
) -> tuple[float, float]:
    """A bootstrap interval of ``statistic`` over ``n`` resampled units (videos).

    Args:
        statistic: ``statistic(idx)`` for an int array of video indices; with ``vectorized``
            ``idx`` may be (B, n) and the result must then be (B,) (reduce over the last axis).
        n: number of videos.
        vectorized: ``statistic`` accepts a batch of index rows.
        n_resamples: bootstrap resamples.
        level: confidence level.
        seed: the resampling seed (fixed: the same report twice gives the same interval).
        method: ``"BCa"`` (default), ``"percentile"`` or ``"basic"`` (scipy's names).
        min_n: fewer videos than this give no interval (NaN ends); see :data:`MIN_SAMPLES`.

    Returns:
        ``(low, high)``; ``(v, v)`` when every resample gives the same value ``v`` (a constant
        statistic, e.g. a detection rate of 1 on every video); NaN when ``n < max(2, min_n)``
        or the statistic is not finite on the full sample.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n={n!r} must be an int >= 0 (the number of videos)")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} must lie in (0, 1)")
    if n < max(2, min_n):
        return float("nan"), float("nan")
    full = float(np.asarray(statistic(np.arange(n))).reshape(()))
    if not math.isfinite(full):
        return float("nan"), float("nan")

    if vectorized:
        def stat(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.asarray(statistic(np.asarray(idx, dtype=np.intp)), dtype=np.float64)
    else:
        def stat(idx: np.ndarray) -> float:
            return float(np.asarray(statistic(np.asarray(idx, dtype=np.intp))).reshape(()))

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # degenerate or NaN resamples are handled below
        res = _st.bootstrap((np.arange(n),), stat, vectorized=vectorized, n_resamples=n_resamples,
                            confidence_level=level, method=method, random_state=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    ok = dist[np.isfinite(dist)]
    if ok.size and float(ok.max() - ok.min()) <= 1e-12 * max(1.0, abs(full)):
        return full, full  # every resample gives the same value
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isfinite(low) and math.isfinite(high):
        return low, high
    # BCa undefined (e.g. NaN resamples where no pair survived): percentile of the finite ones,
    # only when they are nearly all of them.
    if ok.size >= 0.95 * dist.size:
        a = (1 - level) / 2
        return float(np.quantile(ok, a)), float(np.quantile(ok, 1 - a))
    return float("nan"), float("nan")


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Student's t interval for the mean of a few values (e.g. one metric over training seeds).

    ``mean +- t_{(1+level)/2, S-1} * sd / sqrt(S)`` with the sample standard deviation (S - 1).

    Args:
        values: S >= 2 finite values for an interval (fewer: NaN ends).
        level: confidence level.

    Returns:
        ``(mean, low, high)``.
    """
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)):
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = float(_st.t.ppf((1 + level) / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Welch's interval for ``mean(b) - mean(a)`` (two groups of seeds, unequal variances).

    Args:
        a: values of the first group (>= 2).
        b: values of the second group (>= 2).
        level: confidence level.

    Returns:
        ``(difference, low, high)``; NaN ends when a group has fewer than 2 values.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size == 0 or y.size == 0 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return float("nan"), float("nan"), float("nan")
    d = float(y.mean() - x.mean())
    if x.size < 2 or y.size < 2:
        return d, float("nan"), float("nan")
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se2 = vx + vy
    if se2 == 0:
        return d, d, d
    dof = se2**2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
    half = float(_st.t.ppf((1 + level) / 2, dof)) * math.sqrt(se2)
    return d, d - half, d + half


def resolved(low: Any, high: Any) -> bool:
    """True when the interval ``[low, high]`` of a difference excludes 0 (both ends finite)."""
    return _finite(low) and _finite(high) and (float(low) > 0 or float(high) < 0)


def verdict(low: Any, high: Any) -> str:
    """``"resolved"`` when the interval of a difference excludes 0, else ``"not resolved"``."""
    return "resolved" if resolved(low, high) else "not resolved"


def frechet_reliability(num_samples: int, feature_dim: int, constant_features: Sequence[str] = ()) -> dict[str, Any]:
    """Whether a Frechet distance on ``num_samples`` feature vectors of ``feature_dim`` means anything.

    Args:
        num_samples: feature vectors per set (the smaller set).
        feature_dim: D.
        constant_features: features (nearly) constant in the reference set; z-scored by a
            floor, any spread of them in the other set dominates the distance.

    Returns:
        ``{"samples", "feature_dim", "reliable", "note"}``: ``reliable`` is False when
        ``num_samples <= feature_dim`` (the covariance of N samples has rank <= N - 1 < D);
        ``note`` says why in words ("" when there is nothing to say).
    """
    if num_samples < 0 or feature_dim < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 0 and feature_dim={feature_dim} >= 1")
    reliable = num_samples > feature_dim
    notes = []
    if not reliable:
        notes.append(f"unreliable: {num_samples} samples <= feature dim {feature_dim} (singular covariance)")
    if constant_features:
        notes.append("dominated by feature(s) constant in the ground truth: " + ", ".join(constant_features))
    return {"samples": int(num_samples), "feature_dim": int(feature_dim), "reliable": bool(reliable), "note": "; ".join(notes)}
