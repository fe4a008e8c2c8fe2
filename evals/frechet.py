"""Frechet distances between feature sets, and one over physics-trajectory features.

The Frechet (2-Wasserstein) distance between two Gaussians N(mu1, S1) and N(mu2, S2) is

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

(Dowson & Landau 1982; used as FID by Heusel et al. 2017 and as FVD by Unterthiner et al. 2018).
Most implementations take ``scipy.linalg.sqrtm(S1 @ S2)``: a general (non-symmetric) square
root that can return complex parts and fails on singular covariances, which are the norm when
there are fewer samples than feature dimensions. Here both square roots are of symmetric
positive semi-definite matrices, so they come from ``numpy.linalg.eigh`` with eigenvalues
clipped at zero, in float64. ``S1 @ S2`` and ``S1^1/2 S2 S1^1/2`` are similar matrices, so the
trace term is the same quantity.

The trajectory Frechet distance needs no pretrained network: every (video, ball) pair becomes
one 11-number feature vector describing the ball's detected motion over the generated frames
(see :func:`trajectory_features`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sparse_dit.evals.tracking import track_videos

__all__ = [
    "TRAJECTORY_FEATURE_NAMES",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "trajectory_features",
    "trajectory_features_from_tracks",
    "trajectory_frechet_distance",
    "trajectory_frechet_from_features",
    "STD_FLOOR",
]


def _as_2d_features(features: Any, name: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_samples, num_features); got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples for a covariance; got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf values")
    return x


def feature_statistics(features: Any, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature set, in float64.

    Args:
        features: array (num_samples, num_features).
        ddof: covariance divisor is ``num_samples - ddof``. 0 (divide by N) follows
            StyleGAN-V's ``FeatureStats.get_mean_cov``, so FVD numbers are comparable with it;
            1 gives the unbiased estimate (``numpy.cov``).

    Returns:
        ``(mu, sigma)`` with shapes (D,) and (D, D).
    """
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1; got {ddof!r}")
    x = _as_2d_features(features, "features")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - ddof)
    return mu, sigma


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; negative round-off eigenvalues are clipped to 0."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_stats(mu: Any, sigma: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be 1-D (D,); got shape {mu.shape}")
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma{name} must have shape {(mu.shape[0], mu.shape[0])} to match mu{name}; got {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"mu{name}/sigma{name} contain NaN or inf values")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
        raise ValueError(f"sigma{name} must be symmetric (a covariance matrix)")
    return mu, 0.5 * (sigma + sigma.T)


def frechet_distance_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the squared W2 distance).

    Stable for singular covariances (no inverse is taken; see the module docstring).
    Round-off can make a zero distance come out as -1e-12; the result is clipped at 0.

    Args:
        mu1: mean of the first set, shape (D,).
        sigma1: covariance of the first set, shape (D, D), symmetric PSD.
        mu2: mean of the second set, shape (D,).
        sigma2: covariance of the second set, shape (D, D), symmetric PSD.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: mu1 has {mu1.shape[0]}, mu2 has {mu2.shape[0]}")
    root1 = _sqrtm_psd(sigma1)
    product = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (product + product.T))
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    d2 = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(d2, 0.0)


def frechet_distance(features1: Any, features2: Any, ddof: int = 0) -> float:
    """Frechet distance between two feature sets, each summarised by its mean and covariance.

    Args:
        features1: array (N1, D).
        features2: array (N2, D).
        ddof: covariance divisor ``N - ddof``; see :func:`feature_statistics`.
    """
    a = _as_2d_features(features1, "features1")
    b = _as_2d_features(features2, "features2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: features1 has {a.shape[1]}, features2 has {b.shape[1]}")
    return frechet_distance_from_stats(*feature_statistics(a, ddof), *feature_statistics(b, ddof))


# One row per (video, ball). Units: px, px/frame, px/frame^2; detected_fraction in [0, 1].
TRAJECTORY_FEATURE_NAMES: tuple[str, ...] = (
    "mean_vx", "mean_vy",  # mean velocity over generated frames
    "std_vx", "std_vy",  # how much the velocity changes (bounces, gravity, jitter)
    "mean_speed",  # mean |v|
    "mean_ax", "mean_ay",  # mean acceleration (gravity shows up in mean_ay)
    "mean_accel",  # mean |a|: near 0 for free flight, spikes at collisions, large for jitter
    "disp_x", "disp_y",  # displacement from the last context frame to the last frame
    "detected_fraction",  # object permanence: fraction of generated frames the ball was found
)


def trajectory_features(
    videos: Any,
    states: Sequence[Any],
    context_frames: int = 3,
    **detect_kwargs: Any,
) -> np.ndarray:
    """Physics-trajectory features, one row per (video, ball); see ``TRAJECTORY_FEATURE_NAMES``.

    Each ball is found by its colour (``sparse_dit.evals.tracking``) in the last context frame
    and in every generated frame. A frame where the ball is not found repeats the last found
    position (a lost ball "stops"; the loss is counted in ``detected_fraction``); a ball never
    found in those frames stays at its ground-truth position in the last context frame.
    Velocities are backward differences ``p[t] - p[t-1]`` for t = C .. T-1 (the first one
    uses the last context frame), accelerations ``v[t] - v[t-1]`` for t = C+1 .. T-1.
    Ground-truth visibility is not used, so generated and real sets are treated alike.

    Args:
        videos: uint8 (N, T, H, W, 3), the first ``context_frames`` frames being the given ones.
        states: the dataset's ``states`` rows, one per video (colour and radius identify balls).
        context_frames: C, the number of given frames; needs ``T - C >= 2``.
        **detect_kwargs: passed to :func:`sparse_dit.evals.tracking.detect_balls`.

    Returns:
        float64 array (sum of balls over videos, 11).
    """
    return trajectory_features_from_tracks(track_videos(videos, states, context_frames, **detect_kwargs))


def trajectory_features_from_tracks(tracks: Sequence[Any]) -> np.ndarray:
    """:func:`trajectory_features` of already tracked videos (one row per (video, ball), in order).

    Args:
        tracks: from :func:`sparse_dit.evals.tracking.track_videos`.
    """
    rows = []
    for tr in tracks:
        c, t_total = tr.context_frames, tr.positions.shape[0]
        if t_total - c < 2:
            raise ValueError(f"trajectory features need at least 2 generated frames; got T={t_total}, context_frames={c}")
        for k in range(tr.positions.shape[1]):
            pos = np.empty((t_total - c + 1, 2))
            last = tr.gt_positions[c - 1, k]
            for i, t in enumerate(range(c - 1, t_total)):
                if tr.found[t, k]:
                    last = tr.positions[t, k]
                pos[i] = last
            v = np.diff(pos, axis=0)
            a = np.diff(v, axis=0)
            rows.append([
                *v.mean(axis=0), *v.std(axis=0), np.linalg.norm(v, axis=1).mean(),
                *a.mean(axis=0), np.linalg.norm(a, axis=1).mean(),
                *(pos[-1] - pos[0]), tr.found[c:, k].mean(),
            ])
    return np.asarray(rows, dtype=np.float64)


def trajectory_frechet_distance(
    videos: Any,
    reference_videos: Any,
    states: Sequence[Any],
    reference_states: Sequence[Any] | None = None,
    context_frames: int = 3,
    **detect_kwargs: Any,
) -> float:
    """Frechet distance between the trajectory features of generated and reference videos.

    Features are z-scored with the reference set's per-feature std (floored at 1e-3) so that
    px and fraction units weigh alike; no pretrained weights are involved.

    Args:
        videos: generated uint8 (N, T, H, W, 3).
        reference_videos: real uint8 (M, T', H, W, 3), e.g. the ground-truth continuations.
        states: ``states`` rows for ``videos``.
        reference_states: ``states`` rows for ``reference_videos``; defaults to ``states``
            (conditional generation: the same scenes).
        context_frames: number of given frames.
        **detect_kwargs: passed to :func:`sparse_dit.evals.tracking.detect_balls`.
    """
    gen = trajectory_features(videos, states, context_frames, **detect_kwargs)
    ref = trajectory_features(reference_videos, states if reference_states is None else reference_states,
                              context_frames, **detect_kwargs)
    return trajectory_frechet_from_features(gen, ref)


# Per-feature std floor of the z-scoring: a feature (nearly) constant in the reference set is
# divided by this, so any spread of it in the other set dominates the distance.
STD_FLOOR = 1e-3


def trajectory_frechet_from_features(features: Any, reference_features: Any) -> float:
    """The trajectory Frechet distance of two feature sets (:func:`trajectory_features` rows).

    Both sets are z-scored with the reference set's per-feature std (floored at
    :data:`STD_FLOOR`), then :func:`frechet_distance`; intervals over videos resample rows
    through this one function.

    Args:
        features: generated rows (N, 11).
        reference_features: reference rows (M, 11).
    """
    gen, ref = np.asarray(features, dtype=np.float64), np.asarray(reference_features, dtype=np.float64)
    scale = np.maximum(ref.std(axis=0), STD_FLOOR)
    return frechet_distance(gen / scale, ref / scale)
