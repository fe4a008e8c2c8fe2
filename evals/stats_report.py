"""95 % intervals for a comparison report: per-video values, intervals over videos and seeds, resolved differences.

:func:`add_intervals` runs after :func:`sparse_dit.evals.compare.compare` has scored every
model and baseline; it reads the videos compare already holds (no model is run again) and adds:

- ``ci95`` beside every scalar (``[low, high]``) of each model (per split and headline) and of
  each calibration baseline, which also gain PSNR, SSIM and the trajectory Frechet distance so
  the models' numbers have a scale;
- ``differences``: for every pair of models and every metric, the paired difference (the same
  resampled videos for both) with its interval, ``resolved`` and one sentence;
- ``trajectory_fd_check``: the Frechet distance's sample count against its feature dimension
  (``reliable``, ``note``: "unreliable: N samples <= feature dim D"), features constant in the
  ground truth that dominate it, and ``frechet_floor``: the distance between two halves of the
  ground truth, the value two sets of real videos of that size already reach;
- ``variants``: where several runs of one recipe differ only in their training seed, each
  metric's mean over seeds with a t-interval over seeds and a bootstrap interval over videos,
  and their differences (resolved only when both intervals exclude 0).

How each interval is computed and why: :mod:`sparse_dit.evals.stats` and docs/evals.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sparse_dit.evals.frechet import (STD_FLOOR, TRAJECTORY_FEATURE_NAMES, frechet_distance, trajectory_features_from_tracks,
                                      trajectory_frechet_from_features)
from sparse_dit.evals.physics import BASELINES, frame_pairs
from sparse_dit.evals.stats import LEVEL, MIN_SAMPLES, N_RESAMPLES, bootstrap_interval, frechet_reliability, t_interval, verdict, welch_interval
from sparse_dit.evals.tracking import as_ball_states, track_videos
from sparse_dit.evals.video_metrics import PSNR_CAP_DB, psnr, ssim

__all__ = ["VideoStat", "VIDEO_STATS", "FD_RESAMPLES", "I3D_FEATURE_DIM", "per_video_values", "video_intervals",
           "trajectory_fd_interval", "batched_trajectory_fd", "paired_difference", "variant_key", "add_intervals"]

# Frechet resamples: each is a covariance fit and two eigendecompositions in a Python loop.
FD_RESAMPLES = 1000
# FVD's I3D features are the 400 Kinetics logits (evals/fvd.py).
I3D_FEATURE_DIM = 400


@dataclass(frozen=True)
class VideoStat:
    """A report scalar as a function of per-video values, so it can be recomputed on resampled videos.

    Args:
        key: the report key (``velocity_error``).
        label: words for sentences (``velocity error``).
        unit: unit for sentences ("" when none).
        lower_is_better: direction.
        num: the per-video array summed (a ratio) or averaged (a mean).
        den: the per-video denominator of a ratio (pairs, visible balls); None for a mean over
            videos. A ratio weighs each video by its pairs, as the report's pooled number does.
    """

    key: str
    label: str
    unit: str
    lower_is_better: bool
    num: str
    den: str | None = None

    def __call__(self, values: Mapping[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
        """The statistic on the videos ``idx`` ((n,) or (B, n) indices; reduced over the last axis)."""
        a = values[self.num][idx]
        if self.den is None:
            return a.mean(axis=-1)
        d = values[self.den][idx].sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(d > 0, a.sum(axis=-1) / np.where(d > 0, d, 1), np.nan)


VIDEO_STATS: dict[str, VideoStat] = {s.key: s for s in (
    VideoStat("val_loss", "held-out loss", "", True, "val_loss"),
    VideoStat("velocity_error", "velocity error", "px/frame", True, "velocity_error_sum", "velocity_pairs"),
    VideoStat("position_error", "position error", "px", True, "position_error_sum", "position_pairs"),
    VideoStat("detection_rate", "detection rate", "", False, "found", "visible"),
    VideoStat("psnr", "PSNR", "dB", False, "psnr"),
    VideoStat("ssim", "SSIM", "", False, "ssim"),
)}
_FD = VideoStat("trajectory_fd", "trajectory Frechet distance", "", True, "")


_PHYSICS = ("velocity_error", "position_error", "detection_rate")


def per_video_values(generated: np.ndarray, ground_truth: np.ndarray, states: Sequence[Any] | None,
                     context_frames: int, keys: Sequence[str], tracks: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
    """Each video's share of the report's scalars, for the ``keys`` asked (see :data:`VIDEO_STATS`).

    Physics: each video's (frame, ball) pairs from :func:`sparse_dit.evals.physics.frame_pairs`,
    the helper :func:`~sparse_dit.evals.physics.score` pools: error sums and pair counts, which
    summed over videos give the pooled score exactly (a test checks it). PSNR/SSIM: each
    video's mean over its generated frames (every video has as many, so their mean is the
    report's). Nothing is scored for keys not asked.

    Args:
        generated: uint8 (N, T, H, W, 3) whose first ``context_frames`` frames are given.
        ground_truth: the real uint8 videos (N, T, H, W, 3).
        states: the simulator's rows (physics keys only).
        context_frames: C.
        keys: report keys wanted.
        tracks: ``track_videos(generated, states, context_frames)`` when already computed.
    """
    n, c = generated.shape[0], int(context_frames)
    out: dict[str, np.ndarray] = {}
    if states is not None and any(k in keys for k in _PHYSICS):
        tracks = track_videos(generated, states, c) if tracks is None else tracks
        cols = {k: np.zeros(n) for k in ("velocity_error_sum", "velocity_pairs", "position_error_sum", "position_pairs",
                                         "found", "visible")}
        n_gen = generated.shape[1] - c
        for i, tr in enumerate(tracks):
            pos_err, vel_err, _, visible, found = frame_pairs([tr], c, n_gen)
            cols["velocity_error_sum"][i] = sum(e for f in vel_err for e in f)
            cols["velocity_pairs"][i] = sum(len(f) for f in vel_err)
            cols["position_error_sum"][i] = sum(e for f in pos_err for e in f)
            cols["position_pairs"][i] = sum(len(f) for f in pos_err)
            cols["found"][i], cols["visible"][i] = found.sum(), visible.sum()
        out.update(cols)
    if "psnr" in keys:
        out["psnr"] = np.minimum(psnr(generated[:, c:], ground_truth[:, c:]), PSNR_CAP_DB).mean(axis=1)  # as frame_metrics
    if "ssim" in keys:
        out["ssim"] = ssim(generated[:, c:], ground_truth[:, c:]).mean(axis=1)
    return out


def video_intervals(values: Mapping[str, np.ndarray], keys: Sequence[str], *, seed: int = 0,
                    n_resamples: int = N_RESAMPLES) -> dict[str, list[float]]:
    """``{key: [low, high]}``: the 95 % BCa interval over videos of each statistic in ``keys``.

    Args:
        values: :func:`per_video_values`' arrays.
        keys: keys of :data:`VIDEO_STATS` whose arrays are present.
        seed: resampling seed.
        n_resamples: bootstrap resamples.
    """
    out = {}
    for k in keys:
        stat = VIDEO_STATS[k]
        if stat.num not in values or (stat.den is not None and stat.den not in values):
            continue
        n = len(values[stat.num])
        out[k] = list(bootstrap_interval(lambda idx, s=stat: s(values, idx), n, seed=seed, n_resamples=n_resamples))
    return out


class _Features:
    """Trajectory feature rows of one set of videos, grouped by video for resampling."""

    def __init__(self, tracks: Sequence[Any], states: Sequence[Any]) -> None:
        self.rows = trajectory_features_from_tracks(tracks)
        counts = [as_ball_states(s, i).radius.shape[0] for i, s in enumerate(states)]
        if sum(counts) != self.rows.shape[0]:
            raise ValueError(f"{self.rows.shape[0]} feature rows for {sum(counts)} balls")
        starts = np.cumsum([0, *counts])
        self.of_video = [np.arange(starts[i], starts[i + 1]) for i in range(len(counts))]
        # every video with the same number of balls: resamples gather as one (B, n * k) index array
        self.table = np.stack(self.of_video) if len(set(counts)) == 1 else None

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows of the videos ``idx``: (n,) -> (rows, D); (B, n) -> (B, rows, D) (equal ball counts)."""
        idx = np.asarray(idx, dtype=np.intp)
        if idx.ndim == 1:
            return self.rows[np.concatenate([self.of_video[i] for i in idx])]
        if self.table is None:
            raise ValueError("videos hold different numbers of balls: resample one index row at a time")
        return self.rows[self.table[idx].reshape(idx.shape[0], -1)]


def batched_trajectory_fd(gen: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """:func:`~sparse_dit.evals.frechet.trajectory_frechet_from_features` for a batch of resamples.

    The same formula (z-scoring by the reference's std floored at ``STD_FLOOR``, covariances
    divided by N, the trace term from the eigenvalues of ``S1^1/2 S2 S1^1/2``), written over a
    leading batch axis so a thousand resamples cost a few batched eigendecompositions
    (a test checks it against the one-set function).

    Args:
        gen: (B, N, D) generated rows per resample.
        ref: (B, M, D) reference rows per resample.

    Returns:
        (B,) distances; NaN where a set has fewer than 2 rows.
    """
    if gen.shape[1] < 2 or ref.shape[1] < 2:
        return np.full(gen.shape[0], np.nan)
    scale = np.maximum(ref.std(axis=1), STD_FLOOR)[:, None, :]
    x, y = gen / scale, ref / scale

    def stats(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu = z.mean(axis=1)
        c = z - mu[:, None, :]
        sigma = np.einsum("bnd,bne->bde", c, c) / z.shape[1]
        return mu, 0.5 * (sigma + np.swapaxes(sigma, 1, 2))

    (mu1, s1), (mu2, s2) = stats(x), stats(y)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))[:, None, :]) @ np.swapaxes(v, 1, 2)
    prod = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (prod + np.swapaxes(prod, 1, 2)))
    trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum(axis=1)
    d2 = ((mu1 - mu2) ** 2).sum(axis=1) + np.trace(s1, axis1=1, axis2=2) + np.trace(s2, axis1=1, axis2=2) - 2 * trace_sqrt
    return np.maximum(d2, 0.0)


def _fd(gen: _Features, ref: _Features, idx: np.ndarray) -> Any:
    """The trajectory FD of ``gen`` against ``ref`` on the videos ``idx`` ((n,) -> float; (B, n) -> (B,))."""
    idx = np.asarray(idx, dtype=np.intp)
    if idx.ndim == 2:
        if gen.table is not None and ref.table is not None:
            return batched_trajectory_fd(gen.take(idx), ref.take(idx))
        return np.array([_fd(gen, ref, row) for row in idx])
    try:
        return trajectory_frechet_from_features(gen.take(idx), ref.take(idx))
    except ValueError:  # < 2 rows
        return float("nan")


def trajectory_fd_interval(gen: _Features, ref: _Features, *, seed: int = 0,
                           n_resamples: int = FD_RESAMPLES) -> tuple[float, list[float], dict[str, Any]]:
    """The trajectory FD of ``gen`` against ``ref`` (the same scenes), its interval and reliability.

    The interval is a percentile bootstrap over videos (a video's balls stay together; the
    generated and real rows of a video are resampled together). A Frechet distance is biased
    upwards at small N, and so are its resamples (repeated videos shrink the covariance), so
    the interval is indicative; differences between two models, resampled on the same
    videos, are what the verdicts use.
    """
    n = len(gen.of_video)
    value = _fd(gen, ref, np.arange(n))
    low, high = bootstrap_interval(lambda idx: _fd(gen, ref, idx), n, seed=seed, n_resamples=n_resamples,
                                   method="percentile")
    std = ref.rows.std(axis=0)
    const = [name for name, s in zip(TRAJECTORY_FEATURE_NAMES, std) if s < STD_FLOOR]
    check = frechet_reliability(min(gen.rows.shape[0], ref.rows.shape[0]), ref.rows.shape[1], const)
    return value, [low, high], check


def variant_key(recipe: Any) -> str | None:
    """A short hash of a run's recipe without its seed, output folder and parallel layout.

    Runs with equal keys and different ``train.seed`` are seeds of one variant. None without a
    recipe.

    Args:
        recipe: a :class:`~sparse_dit.config.RecipeConfig` (or None).
    """
    if recipe is None:
        return None
    d = recipe.to_dict()
    d.pop("output_dir", None)
    d.pop("parallel", None)
    d.get("train", {}).pop("seed", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _fmt(x: float) -> str:
    return f"{x:+.3g}" if math.isfinite(x) else "nan"


def _difference(stat: VideoStat, split: str, a: str, b: str, f: Callable[[np.ndarray], Any], n: int, *, seed: int,
                vectorized: bool = True, n_resamples: int = N_RESAMPLES, method: str = "BCa",
                over_seeds: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """One paired difference ``b - a`` on ``n`` videos (``f(idx)``) with its interval and sentence."""
    d = float(np.asarray(f(np.arange(n))).reshape(()))
    low, high = bootstrap_interval(f, n, vectorized=vectorized, seed=seed, n_resamples=n_resamples, method=method)
    entry: dict[str, Any] = {"split": split, "metric": stat.key, "a": a, "b": b, "difference": d, "ci95": [low, high],
                             "videos": n, "method": method}
    ok = verdict(low, high) == "resolved"
    unit = f" {stat.unit}" if stat.unit else ""
    if not math.isfinite(d):
        entry.update(resolved=False, sentence=f"{stat.label} ({split}): {b} - {a} is not defined (no value for one "
                                              f"of them, e.g. no ball found): not resolved.")
        return entry
    if not (math.isfinite(low) and math.isfinite(high)):
        why = f"{n} videos; an interval needs >= {MIN_SAMPLES}" if n < MIN_SAMPLES else "undefined on too many resamples"
        entry.update(resolved=False, sentence=f"{stat.label} ({split}): {b} - {a} = {_fmt(d)}{unit}; no interval "
                                              f"({why}): not resolved.")
        return entry
    text = f"{b} - {a} = {_fmt(d)} [{_fmt(low)}, {_fmt(high)}]{unit} over {n} paired videos"
    if over_seeds is not None:
        entry["ci95_seeds"] = [over_seeds[1], over_seeds[2]]
        seeds_ok = verdict(over_seeds[1], over_seeds[2]) == "resolved"
        text += f", [{_fmt(over_seeds[1])}, {_fmt(over_seeds[2])}] over seeds"
        ok = ok and seeds_ok
    entry["resolved"] = ok
    if ok:
        better = b if (d < 0) == stat.lower_is_better else a
        entry["better"] = better
        text += f": resolved, {better} is better"
    else:
        text += ": not resolved"
    entry["sentence"] = f"{stat.label} ({split}): {text}."
    return entry


def paired_difference(key: str, values_a: Mapping[str, np.ndarray], values_b: Mapping[str, np.ndarray], *, split: str,
                      a: str, b: str, seed: int = 0, n_resamples: int = N_RESAMPLES) -> dict[str, Any]:
    """The difference ``b - a`` of the statistic ``key`` on the same videos, with its interval and verdict.

    Args:
        key: a key of :data:`VIDEO_STATS`.
        values_a: per-video arrays of ``a`` (:func:`per_video_values`).
        values_b: those of ``b``, on the same videos in the same order.
        split: split name (for the sentence).
        a: first name.
        b: second name.
        seed: resampling seed.
        n_resamples: bootstrap resamples.

    Returns:
        ``{"difference", "ci95", "resolved", "better" (when resolved), "sentence", ...}``.
    """
    stat = VIDEO_STATS[key]
    n = len(values_a[stat.num])
    if len(values_b[stat.num]) != n:
        raise ValueError(f"{a} has {n} videos and {b} {len(values_b[stat.num])}: a paired difference needs the same videos")
    return _difference(stat, split, a, b, lambda idx: stat(values_b, idx) - stat(values_a, idx), n, seed=seed,
                       n_resamples=n_resamples)


def _split_entries(report: Mapping[str, Any], split: str) -> dict[str, dict[str, Any]]:
    """name -> the dict holding that name's scalars on ``split`` (models and baselines)."""
    base = report["baselines_by_split"].get(split, {})
    out = {f"baseline:{b}": base[b] for b in sorted(base, key=lambda b: b != "ground_truth")}
    out.update({n: m["splits"][split] for n, m in report["models"].items() if split in m.get("splits", {})})
    return out


def _variants(report: Mapping[str, Any]) -> dict[str, list[str]]:
    """Variant name -> its runs, for recipes run with two or more distinct seeds."""
    groups: dict[str, list[str]] = {}
    for n, m in report["models"].items():
        if m.get("variant"):
            groups.setdefault(m["variant"], []).append(n)
    out = {}
    for names in groups.values():
        seeds = [report["models"][n].get("train_seed") for n in names]
        if len(names) < 2 or None in seeds or len(set(seeds)) != len(seeds):
            continue  # one run, or the same seed twice (the same run listed twice is not two seeds)
        prefix = names[0]
        for n in names[1:]:
            while not n.startswith(prefix):
                prefix = prefix[:-1]
        name = prefix.rstrip("_-.@") or "+".join(names)
        while name in out or (name in report["models"] and name not in names):
            name += "'"
        out[name] = names
    return out


def add_intervals(report: dict[str, Any], splits: Sequence[Any], videos: Mapping[str, Mapping[str, np.ndarray]],
                  context_frames: int, *, seed: int = 0, n_resamples: int = N_RESAMPLES,
                  fd_resamples: int = FD_RESAMPLES, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Add intervals, differences, Frechet checks and seed variants to ``report`` (in place; returned).

    Args:
        report: :func:`~sparse_dit.evals.compare.compare`'s report.
        splits: its splits (``name``, ``videos``, ``states``).
        videos: its videos: split -> name -> uint8 (N, T, H, W, 3), ``ground_truth`` included.
        context_frames: C.
        seed: resampling seed.
        n_resamples: bootstrap resamples for the per-video statistics.
        fd_resamples: bootstrap resamples for Frechet distances.
        log: progress printer.
    """
    models = report["models"]
    names = list(models)
    head = report.get("headline_split", splits[0].name)
    per_video: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    features: dict[str, dict[str, _Features]] = {}
    diffs: list[dict[str, Any]] = []
    report["frechet_floor"] = {}
    for split in splits:
        s, n = split.name, split.videos.shape[0]
        entries = _split_entries(report, s)  # ground truth first: the others' Frechet reference
        per_video[s], features[s] = {}, {}
        gt = videos[s]["ground_truth"]
        have = dict(videos[s])
        for ename in entries:  # baselines compare scored but did not keep (ball-free ones): redrawn, seeded
            b = ename.split(":", 1)[1] if ename.startswith("baseline:") else None
            if b is not None and b not in have and b in BASELINES:
                try:
                    have[b] = BASELINES[b](gt, split.states, context_frames)
                except (ValueError, TypeError) as exc:
                    log(f"  intervals: baseline {b}/{s} not redrawn: {exc}")
        want_fd = any("trajectory_fd" in entries.get(m, {}) for m in names)
        ref: _Features | None = None
        floor = float("nan")
        for ename, entry in entries.items():
            vname = ename.split(":", 1)[1] if ename.startswith("baseline:") else ename
            if vname not in have:
                continue
            is_gt = vname == "ground_truth"
            keys = [k for k in VIDEO_STATS if k in entry]
            if ename.startswith("baseline:") and not is_gt:  # PSNR/SSIM of the baselines: the models' scale
                keys += [k for k in ("psnr", "ssim") if k not in keys and any(k in entries.get(m, {}) for m in names)]
            fd_here = want_fd and (is_gt or "trajectory_fd" in entry or ename.startswith("baseline:"))
            tracks = None
            try:  # one tracking per (video set, split), shared by the physics values and the FD features
                if split.states is not None and (fd_here or any(k in keys for k in _PHYSICS)):
                    tracks = track_videos(have[vname], split.states, context_frames)
                pv = per_video_values(have[vname], gt, split.states, context_frames, keys, tracks=tracks)
            except ValueError as exc:  # e.g. states of another kind: no physics intervals
                log(f"  intervals: {vname}/{s}: {exc}")
                continue
            for k in _PHYSICS:  # the per-video split must reproduce the reported pooled value
                if k in entry and VIDEO_STATS[k].num in pv:
                    mine, theirs = float(VIDEO_STATS[k](pv, np.arange(n))), entry[k]
                    if theirs is not None and math.isfinite(theirs) and not math.isclose(mine, theirs, rel_tol=1e-6, abs_tol=1e-9):
                        log(f"  intervals: {vname}/{s}: per-video {k} {mine} != reported {theirs}; no interval for it")
                        pv.pop(VIDEO_STATS[k].num)
            if ename in models and s == head and models[ename].get("val_loss_per_video") is not None:
                pv["val_loss"] = np.asarray(models[ename]["val_loss_per_video"], dtype=np.float64)
            for k in ("psnr", "ssim"):
                if k in pv and k not in entry and not is_gt:
                    entry[k] = float(pv[k].mean())
            per_video[s][ename] = pv
            entry["ci95"] = video_intervals(pv, [k for k in keys if k != "val_loss"], seed=seed, n_resamples=n_resamples)
            if ename in models and "val_loss" in pv:
                models[ename]["ci95"] = {"val_loss": video_intervals(pv, ["val_loss"], seed=seed, n_resamples=n_resamples)["val_loss"]}
            if not fd_here or tracks is None:
                continue
            try:
                feats = _Features(tracks, split.states)
            except ValueError as exc:  # fewer than 2 generated frames
                log(f"  intervals: trajectory features of {vname}/{s}: {exc}")
                continue
            features[s][ename] = feats
            if is_gt:
                # Ground truth against ground truth (even- vs odd-numbered videos, z-scored as the models
                # are, by the whole split's std): what two sets of real videos of this size already score.
                ref = feats
                scale = np.maximum(ref.rows.std(axis=0), STD_FLOOR)
                try:
                    floor = frechet_distance(ref.take(np.arange(0, n, 2)) / scale, ref.take(np.arange(1, n, 2)) / scale)
                except ValueError:  # fewer than 2 videos in a half
                    floor = float("nan")
                report["frechet_floor"][s] = {
                    "trajectory_fd": floor, "videos": [len(range(0, n, 2)), len(range(1, n, 2))],
                    "note": "ground truth vs ground truth: even- against odd-numbered videos of the split"}
            elif ref is not None:
                value, ci, check = trajectory_fd_interval(feats, ref, seed=seed, n_resamples=fd_resamples)
                entry.setdefault("trajectory_fd", value)
                entry["ci95"]["trajectory_fd"] = ci
                entry["trajectory_fd_check"] = {**check, "floor": floor}
        for ename, entry in entries.items():
            if "fvd" in entry:
                entry["fvd_check"] = frechet_reliability(n, I3D_FEATURE_DIM)
        # Paired differences between models: the same resampled videos for both.
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                pa, pb = per_video[s].get(a), per_video[s].get(b)
                if pa is None or pb is None:
                    continue
                for k, stat in VIDEO_STATS.items():
                    if stat.num in pa and stat.num in pb:
                        diffs.append(_difference(stat, s, a, b, lambda idx, st=stat: st(pb, idx) - st(pa, idx), n,
                                                 seed=seed, n_resamples=n_resamples))
                fa, fb, ref = features[s].get(a), features[s].get(b), features[s].get("baseline:ground_truth")
                if fa is not None and fb is not None:
                    diffs.append(_difference(_FD, s, a, b, lambda idx: _fd(fb, ref, idx) - _fd(fa, ref, idx), n,
                                             seed=seed, n_resamples=fd_resamples, method="percentile"))
    for n_ in names:  # the headline split's intervals head each model's entry
        hs = models[n_].get("splits", {}).get(head, {})
        models[n_].setdefault("ci95", {}).update({k: v for k, v in hs.get("ci95", {}).items()})
        if "trajectory_fd_check" in hs:
            models[n_]["trajectory_fd_check"] = hs["trajectory_fd_check"]
    report["differences"] = diffs
    report["variants"] = _seed_variants(report, per_video, seed=seed, n_resamples=n_resamples)
    report["per_video"] = per_video
    report["intervals"] = {
        "level": LEVEL,
        "videos": (f"BCa bootstrap over videos (scipy.stats.bootstrap, {n_resamples} resamples, seed {seed}); differences "
                   "are paired: both models on the same resampled videos"),
        "frechet": (f"percentile bootstrap over videos ({fd_resamples} resamples); indicative (a Frechet distance is "
                    "biased upwards at small N); frechet_floor = ground truth against ground truth"),
        "seeds": "Student t over training seeds (Welch for differences); where a recipe was run with >= 2 seeds",
        "resolved": "a difference is resolved when its 95 % interval excludes 0 (over videos, and over seeds where measured)",
        "min_videos": MIN_SAMPLES,
    }
    return report


def _seed_variants(report: Mapping[str, Any], per_video: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], *,
                   seed: int, n_resamples: int) -> dict[str, Any]:
    """Variants run with several seeds: mean over seeds, intervals over seeds and over videos, differences.

    The per-video statistics only (the Frechet distance is left out: its seed mean has no
    per-video form).
    """
    groups = _variants(report)
    if not groups:
        return {}
    grouped = {n for ns in groups.values() for n in ns}
    # every other model is a variant of one seed, so a seeded variant can be compared with it
    all_groups = {**groups, **{n: [n] for n in report["models"] if n not in grouped}}
    out: dict[str, Any] = {}
    for vname, runs in groups.items():
        out[vname] = {"runs": runs, "seeds": [report["models"][r].get("train_seed") for r in runs], "splits": {}}
        for s, pvs in per_video.items():
            if not all(r in pvs for r in runs):
                continue
            res: dict[str, Any] = {}
            n = len(next(iter(pvs[runs[0]].values())))
            for k, stat in VIDEO_STATS.items():
                if not all(stat.num in pvs[r] for r in runs):
                    continue
                per_seed = [float(stat(pvs[r], np.arange(n))) for r in runs]
                mean, lo, hi = t_interval(per_seed)
                vlo, vhi = bootstrap_interval(lambda idx, st=stat: np.mean([st(pvs[r], idx) for r in runs], axis=0), n,
                                              seed=seed, n_resamples=n_resamples)
                res[k] = {"mean": mean, "per_seed": per_seed, "ci95_seeds": [lo, hi], "ci95_videos": [vlo, vhi]}
            out[vname]["splits"][s] = res
    diffs = []
    order = list(all_groups)
    for i, va in enumerate(order):
        for vb in order[i + 1 :]:
            ra, rb = all_groups[va], all_groups[vb]
            if len(ra) < 2 and len(rb) < 2:
                continue  # single runs: the per-model differences already say it
            for s, pvs in per_video.items():
                if not all(r in pvs for r in ra + rb):
                    continue
                n = len(next(iter(pvs[ra[0]].values())))
                for k, stat in VIDEO_STATS.items():
                    if not all(stat.num in pvs[r] for r in ra + rb):
                        continue
                    sa = [float(stat(pvs[r], np.arange(n))) for r in ra]
                    sb = [float(stat(pvs[r], np.arange(n))) for r in rb]
                    w = welch_interval(sa, sb) if len(ra) >= 2 and len(rb) >= 2 else None

                    def f(idx: np.ndarray, st: VideoStat = stat) -> np.ndarray:
                        return np.mean([st(pvs[r], idx) for r in rb], axis=0) - np.mean([st(pvs[r], idx) for r in ra], axis=0)

                    e = _difference(stat, s, va, vb, f, n, seed=seed, n_resamples=n_resamples, over_seeds=w)
                    if w is None:
                        e["sentence"] = e["sentence"][:-1] + " (one side has a single seed: seed-to-seed spread not measured)."
                    diffs.append(e)
    return {"groups": out, "differences": diffs}
