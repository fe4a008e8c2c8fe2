"""World rollouts scored by horizon (issue 13): how long does a model keep the physics right?

A rollout starts from the first C frames of a simulated video and runs for N more frames
(:meth:`sparse_dit.pipeline.VideoPipeline.rollout`: window by window, each window seeing the
last C frames made so far). The physics world simulates the same scene for C + N frames at the
same fps, so every rolled-out frame has a ground truth. Frames are scored with the physics
eval's instrument (:mod:`sparse_dit.evals.physics`: balls found by colour, the same definitions
of velocity error, position error and detection rate), grouped by *horizon*: the h-th
generated frame (h = 1 .. N, frame t = C - 1 + h) falls into a bucket

    1-8, 9-16, 17-32, 33-64, 65-128, ...   (the last bucket ends at N)

so that errors that grow with the horizon show up as a rising row instead of one average.
Every bucket pools its (frame, ball) pairs (a bucket's error is the mean over its pairs, not
the mean of per-frame means). Beside the model, each bucket has the calibration baselines of
the physics eval: ``ground_truth`` (the instrument: ~0 error, detection 1), ``copy_last_frame``
(velocity error = the true speed) and ``constant_velocity`` (no walls, no gravity).

Object permanence: ``detection_rate`` counts the (frame, ball) pairs where the simulator says
the ball is visible and the ball is found. In the ``occlusion`` scenario balls pass behind a
grey bar; a model that forgets a hidden ball fails to bring it back out, and its detection
rate falls in the later buckets.

Splits: ``id`` draws radii and speeds from the training ranges, ``ood`` moves the speed, the
radius or both outside them (``sparse_dit.data.physics``); they are scored separately.

    sparse-dit eval rollout RUN_DIR --frames 32 [--scenario occlusion] [--ood] [--num-videos 8]
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from sparse_dit.data import generate_physics_videos
from sparse_dit.evals.physics import BASELINES, frame_pairs
from sparse_dit.evals.tracking import check_videos, track_videos
from sparse_dit.evals.video_metrics import to_uint8_videos
from sparse_dit.pipeline import VideoPipeline
from sparse_dit.video_io import from_uint8

__all__ = [
    "Predictor",
    "horizon_buckets",
    "bucket_label",
    "score_by_horizon",
    "simulate_rollout_split",
    "pipeline_predictor",
    "evaluate_rollout",
]

# (given uint8 (N, C, H, W, 3), total frames C + N) -> uint8 (N, C + N, H, W, 3)
Predictor = Callable[[np.ndarray, int], np.ndarray]

# The first two buckets are 8 frames wide (the quickstart's clip length), then they double.
_FIRST_BUCKET = 8


def horizon_buckets(num_frames: int) -> list[tuple[int, int]]:
    """Horizon buckets (first, last), 1-based and inclusive: 1-8, 9-16, 17-32, 33-64, ...

    The last bucket is cut at ``num_frames`` (N = 20 gives 1-8, 9-16, 17-20).

    Args:
        num_frames: N, the number of rolled-out frames (>= 1).
    """
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r} must be an int >= 1 (frames rolled out after the given ones)")
    buckets, lo, hi = [], 1, _FIRST_BUCKET
    while lo <= num_frames:
        buckets.append((lo, min(hi, int(num_frames))))
        lo, hi = hi + 1, (2 * hi if hi >= 2 * _FIRST_BUCKET else hi + _FIRST_BUCKET)
    return buckets


def bucket_label(bucket: tuple[int, int]) -> str:
    """``"1-8"`` for (1, 8); ``"17"`` for a one-frame bucket (17, 17).

    Args:
        bucket: (first, last) horizon, 1-based, inclusive.
    """
    lo, hi = bucket
    return f"{lo}-{hi}" if hi > lo else f"{lo}"


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def score_by_horizon(
    videos: Any,
    states: Sequence[Any],
    context_frames: int,
    buckets: Optional[Sequence[tuple[int, int]]] = None,
    **detect_kwargs: Any,
) -> dict[str, Any]:
    """Velocity error, position error and detection rate of rolled-out frames, per horizon bucket.

    The definitions are :func:`sparse_dit.evals.physics.score`'s: velocity is the backward
    difference of positions (the first generated frame's uses the ball found in the last given
    frame), the ground-truth velocity the same difference of the simulator's positions; a pair
    counts where the simulator says the ball is visible (both frames for velocity).

    Args:
        videos: uint8 (N, C + H_max, H, W, 3) whose first ``context_frames`` frames are given.
        states: the simulator's ``states`` rows, one per video, with at least as many frames.
        context_frames: C given frames.
        buckets: (first, last) horizons; default :func:`horizon_buckets` of the generated length.
        **detect_kwargs: ``color_tolerance``, ``min_alpha``, ``min_area_fraction``
            (see :func:`sparse_dit.evals.tracking.detect_balls`).

    Returns:
        ``{"buckets": [labels], "per_bucket": {label: {velocity_error, position_error,
        detection_rate, gt_speed, num_visible, num_found, num_position_pairs,
        num_velocity_pairs}}, "overall": {same keys over every generated frame}}``. NaN means
        no pair was defined in that bucket (e.g. every ball had left the frame).
    """
    videos = check_videos(videos, context_frames)
    c, n_gen = int(context_frames), videos.shape[1] - int(context_frames)
    buckets = list(buckets) if buckets is not None else horizon_buckets(n_gen)
    for lo, hi in buckets:
        if not 1 <= lo <= hi <= n_gen:
            raise ValueError(f"bucket {lo}-{hi} is not allowed: horizons run 1..{n_gen} (the generated frames)")
    tracks = track_videos(videos, states, c, **detect_kwargs)
    # per generated frame h = 1..n_gen: lists of errors and visible/found counts
    pos_err, vel_err, speeds, visible, found = frame_pairs(tracks, c, n_gen)

    def pooled(lo: int, hi: int) -> dict[str, Any]:
        sl = slice(lo - 1, hi)
        pe = [e for f in pos_err[sl] for e in f]
        ve = [e for f in vel_err[sl] for e in f]
        sp = [e for f in speeds[sl] for e in f]
        nv, nf = int(visible[sl].sum()), int(found[sl].sum())
        return {"velocity_error": _mean(ve), "position_error": _mean(pe),
                "detection_rate": nf / nv if nv else float("nan"), "gt_speed": _mean(sp),
                "num_visible": nv, "num_found": nf, "num_position_pairs": len(pe), "num_velocity_pairs": len(ve)}

    return {
        "buckets": [bucket_label(b) for b in buckets],
        "per_bucket": {bucket_label(b): pooled(*b) for b in buckets},
        "overall": pooled(1, n_gen),
        "num_videos": len(tracks),
        "context_frames": c,
        "generated_frames": n_gen,
    }


def simulate_rollout_split(scenario: str, split: str, num_videos: int, context_frames: int, num_frames: int,
                           height: int, width: int, seed: int, fps: float) -> tuple[np.ndarray, list]:
    """Simulate C + N frames of ``num_videos`` scenes: the rollouts' start and ground truth.

    Args:
        scenario: a physics scenario (``sparse_dit.data.SCENARIOS``) or a comma-separated list.
        split: ``"id"`` or ``"ood"``.
        num_videos: videos to simulate.
        context_frames: C given frames.
        num_frames: N frames to roll out.
        height, width: frame size (the model's).
        seed: dataset seed (use one training did not use).
        fps: frames per second (the training data's: the model learnt motion per frame).

    Returns:
        (uint8 (num_videos, C + N, H, W, 3), ``states`` rows).
    """
    if num_videos < 1:
        raise ValueError(f"num_videos={num_videos} must be >= 1")
    rows = generate_physics_videos(scenario, split, num_videos, context_frames + num_frames, height, width,
                                   seed=seed, fps=fps, workers=1)
    return np.stack([r["video"] for r in rows]), [r["states"] for r in rows]


def pipeline_predictor(pipe: VideoPipeline, window: int, context_frames: int, *, seed: int = 0, batch_size: int = 8,
                       num_inference_steps: Optional[int] = None, model_kwargs: Optional[dict] = None) -> Predictor:
    """A :data:`Predictor` that rolls ``pipe``'s model out with :meth:`VideoPipeline.rollout`.

    Args:
        pipe: the pipeline (its sampler settings: use ``VideoPipeline.from_config`` with the recipe).
        window: frames per model call (the length the model was trained on).
        context_frames: frames carried from one window to the next (the recipe's prefix).
        seed: noise seed; one generator runs through all batches (reproducible).
        batch_size: videos per rollout call.
        num_inference_steps: sampler steps (None: the pipeline's).
        model_kwargs: extra conditioning passed to the model (batch-first, for a batch of all videos).
    """
    def predict(given: np.ndarray, total: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(seed)
        x = torch.stack([from_uint8(v) for v in given])  # (N, 3, C, H, W)
        outs = []
        for s in range(0, x.shape[0], batch_size):
            mk = None if model_kwargs is None else {k: v[s : s + batch_size] for k, v in model_kwargs.items()}
            with torch.no_grad():
                outs.append(pipe.rollout(x[s : s + batch_size], total, window=window, context_frames=context_frames,
                                         generator=gen, num_inference_steps=num_inference_steps, model_kwargs=mk))
        return to_uint8_videos(torch.cat(outs).clamp(-1, 1))

    return predict


def evaluate_rollout(predict: Predictor, videos: Any, states: Sequence[Any], context_frames: int,
                     baselines: Sequence[str] = tuple(BASELINES), **detect_kwargs: Any) -> tuple[dict[str, Any], np.ndarray]:
    """Roll ``predict`` out from the first C frames of ``videos`` and score it and the baselines by horizon.

    Args:
        predict: (given uint8 (N, C, H, W, 3), total frames T) -> uint8 (N, T, H, W, 3).
        videos: simulated uint8 (N, T, H, W, 3) (:func:`simulate_rollout_split`): T = C + N.
        states: their ``states`` rows.
        context_frames: C given frames.
        baselines: names in :data:`sparse_dit.evals.physics.BASELINES` to score beside the model.
        **detect_kwargs: detection settings for :func:`score_by_horizon`.

    Returns:
        ``{"model": score_by_horizon(...), "baselines": {name: score_by_horizon(...)},
        "buckets": [labels]}``; the model's given frames are replaced by the real ones.
    """
    videos = check_videos(videos, context_frames)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines={unknown} unknown; allowed: {list(BASELINES)}")
    c = int(context_frames)
    pred = np.asarray(predict(videos[:, :c].copy(), videos.shape[1]))
    if pred.dtype != np.uint8 or pred.shape != videos.shape:
        raise ValueError(f"the rollout gave {pred.dtype} {tuple(pred.shape)}; expected uint8 {tuple(videos.shape)}")
    pred = pred.copy()
    pred[:, :c] = videos[:, :c]  # the given frames are the real ones, exactly
    model = score_by_horizon(pred, states, c, **detect_kwargs)
    base = {name: score_by_horizon(BASELINES[name](videos, states, c), states, c, **detect_kwargs) for name in baselines}
    return {"model": model, "baselines": base, "buckets": model["buckets"]}, pred
