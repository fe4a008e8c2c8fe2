"""Physics fidelity of generated videos: PhyWorld's protocol (Kang et al. 2024) on our physics world.

Condition on the first C frames, generate the rest, find each ball by its colour in every
generated frame (``sparse_dit.evals.tracking``), and compare with the simulator's ground truth.

Definitions used by :func:`score` (frames t = 0 .. T-1; generated frames are t = C .. T-1):

- position: the detected centroid p_hat[t, k]; error ``|p_hat - p|`` (Euclidean, px) over
  (generated frame, ball) pairs where the ball is visible in ground truth and found.
- velocity: backward differences ``v_hat[t] = p_hat[t] - p_hat[t-1]``, px/frame. The first
  generated frame's velocity uses the ball found in the last context frame (t = C-1), which is
  a given frame. The ground truth is the same difference of the simulator's positions,
  ``p[t] - p[t-1]``, not the instantaneous ``states.velocity``: under gravity or across a bounce
  they differ by up to half the per-frame acceleration, and a perfect video must score 0.
  ``velocity_error`` is the mean Euclidean norm ``|v_hat - v|`` over pairs where the ball is
  visible in ground truth at t and t-1 and found at t and t-1. A frozen video (copy of the
  last context frame) has v_hat = 0, so its error is the mean ground-truth speed over its pairs.
- detection: ``detection_rate`` is the fraction of ground-truth-visible (generated frame, ball)
  pairs in which the ball is found: object permanence. Position and velocity errors are only
  defined where the ball is found, so read them with the detection rate beside them.

Calibration baselines (always report them beside the models): the ground truth itself
(measures the instrument: ~0 error, detection 1), a copy of the last context frame, and
constant-velocity extrapolation of the balls found in the context frames; and three ball-free
ones (:data:`BALL_FREE`), whose generated frames hold no ball at all: uniform noise, Gaussian
noise (what a sampler that learned nothing emits) and blank frames of the background colour.
They must score detection ~0 (the instrument finds no ball where there is none) and no
position or velocity error, since errors are defined on found balls only (NaN, "-" in reports):
a ball-free video can never look better than copy-last-frame.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sparse_dit.evals.tracking import (
    as_ball_states,
    check_videos,
    detect_balls,
    estimate_background,
    render_balls,
    static_mask,
    track_videos,
)

__all__ = [
    "BALL_FREE",
    "BASELINES",
    "baseline_videos",
    "blank_videos",
    "constant_velocity_videos",
    "copy_last_frame_videos",
    "gaussian_noise_videos",
    "ground_truth_videos",
    "score",
    "score_baselines",
    "score_splits",
    "uniform_noise_videos",
]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def frame_pairs(tracks: Sequence[Any], c: int, n_gen: int) -> tuple[list[list[float]], list[list[float]], list[list[float]], np.ndarray, np.ndarray]:
    """Per generated frame i (time c + i): position errors of found balls, velocity errors of
    balls found in this and the previous frame, ground-truth speeds, and visible / found counts.

    Args:
        tracks: from :func:`~sparse_dit.evals.tracking.track_videos`.
        c: context frames (the first generated frame is ``c``; c >= 1).
        n_gen: generated frames scored.
    """
    pos_err: list[list[float]] = [[] for _ in range(n_gen)]
    vel_err: list[list[float]] = [[] for _ in range(n_gen)]
    speeds: list[list[float]] = [[] for _ in range(n_gen)]
    visible = np.zeros(n_gen, dtype=np.int64)
    found = np.zeros(n_gen, dtype=np.int64)
    for tr in tracks:
        for i in range(n_gen):
            t = c + i
            for k in range(tr.radius.shape[0]):
                if not tr.gt_visible[t, k]:
                    continue
                visible[i] += 1
                if tr.found[t, k]:
                    found[i] += 1
                    pos_err[i].append(float(np.linalg.norm(tr.positions[t, k] - tr.gt_positions[t, k])))
                if tr.gt_visible[t - 1, k]:
                    v_gt = tr.gt_positions[t, k] - tr.gt_positions[t - 1, k]
                    speeds[i].append(float(np.linalg.norm(v_gt)))
                    if tr.found[t, k] and tr.found[t - 1, k]:
                        v_hat = tr.positions[t, k] - tr.positions[t - 1, k]
                        vel_err[i].append(float(np.linalg.norm(v_hat - v_gt)))
    return pos_err, vel_err, speeds, visible, found


def score(
    videos: Any,
    states: Sequence[Any],
    context_frames: int = 3,
    *,
    color_tolerance: float = 60.0,
    min_alpha: float = 0.2,
    min_area_fraction: float = 0.25,
    background: Any = None,
) -> dict[str, Any]:
    """Score generated physics videos against the simulator's ground truth.

    Args:
        videos: uint8 (N, T, H, W, 3) whose first ``context_frames`` frames are the given ones.
        states: the dataset's ``states`` rows, one per video (position [T][K][2] in pixel
            coordinates with pixel centres at (j + 0.5, i + 0.5), radius [K], color [K][3],
            visible [T][K]); rows may hold more frames than the videos.
        context_frames: C, the number of given frames (PhyWorld conditions on 3).
        color_tolerance: see :func:`sparse_dit.evals.tracking.detect_balls`.
        min_alpha: see :func:`sparse_dit.evals.tracking.detect_balls`.
        min_area_fraction: see :func:`sparse_dit.evals.tracking.detect_balls`.
        background: (3,) or (N, 3) background colour; default: the most frequent colour of
            each video's first frame.

    Returns:
        A JSON-friendly dict. Scalars: ``velocity_error`` (px/frame), ``position_error`` (px),
        ``detection_rate``, ``gt_speed`` (mean |p[t] - p[t-1]| over ground-truth-visible
        generated pairs: the scale of velocity_error), ``context_detection_rate`` (the
        instrument on given frames). Curves over generated frames t = C .. T-1:
        ``velocity_error_per_frame``, ``position_error_per_frame``, ``detection_rate_per_frame``
        (NaN where a frame has no pair). Counts: ``num_videos``, ``num_balls``,
        ``context_frames``, ``generated_frames``, ``num_visible``, ``num_found``,
        ``num_position_pairs``, ``num_velocity_pairs``. NaN scalars mean no pair was defined.
    """
    tracks = track_videos(videos, states, context_frames, background=background,
                          color_tolerance=color_tolerance, min_alpha=min_alpha,
                          min_area_fraction=min_area_fraction)
    c = int(context_frames)
    n_gen = tracks[0].positions.shape[0] - c
    pos_err, vel_err, speed_per_frame, visible, found = frame_pairs(tracks, c, n_gen)
    speeds = [e for frame in speed_per_frame for e in frame]
    ctx_visible = sum(int(tr.gt_visible[:c].sum()) for tr in tracks)
    ctx_found = sum(int((tr.gt_visible[:c] & tr.found[:c]).sum()) for tr in tracks)
    all_pos = [e for frame in pos_err for e in frame]
    all_vel = [e for frame in vel_err for e in frame]
    num_visible, num_found = int(visible.sum()), int(found.sum())
    return {
        "velocity_error": _mean(all_vel),
        "position_error": _mean(all_pos),
        "detection_rate": num_found / num_visible if num_visible else float("nan"),
        "gt_speed": _mean(speeds),
        "context_detection_rate": ctx_found / ctx_visible if ctx_visible else float("nan"),
        "velocity_error_per_frame": [_mean(frame) for frame in vel_err],
        "position_error_per_frame": [_mean(frame) for frame in pos_err],
        "detection_rate_per_frame": [float(f / v) if v else float("nan") for f, v in zip(found, visible)],
        "num_videos": len(tracks),
        "num_balls": int(sum(tr.radius.shape[0] for tr in tracks)),
        "context_frames": c,
        "generated_frames": n_gen,
        "num_visible": num_visible,
        "num_found": num_found,
        "num_position_pairs": len(all_pos),
        "num_velocity_pairs": len(all_vel),
    }


# ------------------------------------------------------------------ calibration baselines


def ground_truth_videos(videos: Any, states: Sequence[Any] | None = None, context_frames: int = 3) -> np.ndarray:
    """The ground-truth videos themselves (a copy): scores the instrument, ideally 0 error.

    Args:
        videos: ground-truth uint8 (N, T, H, W, 3).
        states: unused; present so all baselines share one signature.
        context_frames: C given frames (validated only).
    """
    return check_videos(videos, context_frames).copy()


def copy_last_frame_videos(videos: Any, states: Sequence[Any] | None = None, context_frames: int = 3) -> np.ndarray:
    """Keep the C context frames and repeat the last one for every generated frame.

    Args:
        videos: ground-truth uint8 (N, T, H, W, 3); only the first C frames are read.
        states: unused; present so all baselines share one signature.
        context_frames: C given frames.
    """
    v = check_videos(videos, context_frames)
    out = v.copy()
    out[:, context_frames:] = v[:, context_frames - 1 : context_frames]
    return out


def constant_velocity_videos(
    videos: Any,
    states: Sequence[Any],
    context_frames: int = 3,
    *,
    color_tolerance: float = 60.0,
    min_alpha: float = 0.2,
    min_area_fraction: float = 0.25,
) -> np.ndarray:
    """Extrapolate each ball found in the context frames at constant velocity, and render it.

    Only the given frames are looked at (states supply each ball's colour and radius, its
    identity, never its future). Per ball: p = its centroid in the last context frame where
    it is found, v = p[C-1] - p[C-2] when it is found in both (else 0, and 0 when C = 1), and
    frame t shows it at ``p + (t - t_p) v``, where t_p is the frame of p. No walls, no
    gravity, no collisions: that is the point of the baseline.

    Drawing: the plate is the last context frame with every ball-coloured pixel painted with
    the background colour; pixels of the plate that are still far from the background
    (more than ``color_tolerance``) are a static occluder and stay in front of the balls.
    Balls are drawn with ``sparse_dit.evals.tracking.render_balls``.

    Args:
        videos: ground-truth uint8 (N, T, H, W, 3); only the first C frames are read.
        states: ``states`` rows (colour and radius of each ball).
        context_frames: C given frames.
        color_tolerance: see :func:`sparse_dit.evals.tracking.detect_balls`.
        min_alpha: see :func:`sparse_dit.evals.tracking.detect_balls`.
        min_area_fraction: see :func:`sparse_dit.evals.tracking.detect_balls`.
    """
    v = check_videos(videos, context_frames)
    if len(states) != v.shape[0]:
        raise ValueError(f"got {v.shape[0]} videos but {len(states)} states rows; they must pair one to one")
    c = int(context_frames)
    out = v.copy()
    for i in range(v.shape[0]):
        st = as_ball_states(states[i], i)
        bg = estimate_background(v[i, 0])
        ctx = v[i, :c]
        pos, found, _ = detect_balls(ctx, st.color, st.radius, bg, color_tolerance, min_alpha, min_area_fraction,
                                     static=static_mask(ctx[0], st.color, bg, color_tolerance))
        last = ctx[-1].astype(np.float64)
        # Clear every pixel any ball tints (a lower alpha than detection: erase the faint rim too).
        d = st.color - bg
        alpha = np.clip(np.einsum("hwc,kc->hwk", last - bg, d) / (d * d).sum(axis=1), 0.0, 1.0)
        resid = np.linalg.norm((last - bg)[:, :, None, :] - alpha[..., None] * d, axis=-1)
        tinted = ((alpha > 0.02) & (resid <= color_tolerance)).any(axis=-1)
        plate = last.copy()
        plate[tinted] = bg
        foreground = np.linalg.norm(plate - bg, axis=-1) > color_tolerance
        starts = np.full((st.radius.shape[0], 2), np.nan)
        vels = np.zeros((st.radius.shape[0], 2))
        t0 = np.zeros(st.radius.shape[0])
        for k in range(st.radius.shape[0]):
            seen = np.flatnonzero(found[:, k])
            if seen.size == 0:
                continue  # never seen in the context: the baseline cannot draw it
            t0[k] = seen[-1]
            starts[k] = pos[seen[-1], k]
            if c >= 2 and found[c - 1, k] and found[c - 2, k]:
                vels[k] = pos[c - 1, k] - pos[c - 2, k]
        for t in range(c, v.shape[1]):
            centres = starts + (t - t0)[:, None] * vels
            out[i, t] = render_balls(plate, centres, st.radius, st.color, foreground)
    return out


# Ball-free baselines draw their noise from this seed: every run of a report sees the same frames.
BALL_FREE_SEED = 0


def uniform_noise_videos(videos: Any, states: Sequence[Any] | None = None, context_frames: int = 3) -> np.ndarray:
    """Keep the C context frames; every generated pixel uniform in 0..255 (seeded, ball-free).

    Uniform noise holds every colour, so a colour-only detector "finds" balls in it (detection
    0.51 over the physics scenarios before the shape, size and contrast checks).

    Args:
        videos: ground-truth uint8 (N, T, H, W, 3); only the first C frames are read.
        states: unused; present so all baselines share one signature.
        context_frames: C given frames.
    """
    v = check_videos(videos, context_frames)
    out = v.copy()
    rng = np.random.default_rng(BALL_FREE_SEED)
    out[:, context_frames:] = rng.integers(0, 256, size=out[:, context_frames:].shape, dtype=np.uint8)
    return out


def gaussian_noise_videos(videos: Any, states: Sequence[Any] | None = None, context_frames: int = 3) -> np.ndarray:
    """Keep the C context frames; generated frames are N(0, 1) in the model's [-1, 1] range (seeded).

    This is what a sampler whose model learned nothing returns (the initial noise), converted to
    uint8 as generated videos are (``(x + 1) * 127.5``, rounded and clipped: about a third of each
    channel saturates at 0 or 255).

    Args:
        videos: ground-truth uint8 (N, T, H, W, 3); only the first C frames are read.
        states: unused; present so all baselines share one signature.
        context_frames: C given frames.
    """
    v = check_videos(videos, context_frames)
    out = v.copy()
    rng = np.random.default_rng(BALL_FREE_SEED + 1)
    x = rng.standard_normal(out[:, context_frames:].shape)
    out[:, context_frames:] = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return out


def blank_videos(videos: Any, states: Sequence[Any] | None = None, context_frames: int = 3) -> np.ndarray:
    """Keep the C context frames; every generated frame is the background colour of the first one.

    Args:
        videos: ground-truth uint8 (N, T, H, W, 3); only the first C frames are read.
        states: unused; present so all baselines share one signature.
        context_frames: C given frames.
    """
    v = check_videos(videos, context_frames)
    out = v.copy()
    for i in range(v.shape[0]):
        out[i, context_frames:] = estimate_background(v[i, 0]).astype(np.uint8)
    return out


BASELINES: dict[str, Callable[..., np.ndarray]] = {
    "ground_truth": ground_truth_videos,
    "copy_last_frame": copy_last_frame_videos,
    "constant_velocity": constant_velocity_videos,
    "uniform_noise": uniform_noise_videos,
    "gaussian_noise": gaussian_noise_videos,
    "blank": blank_videos,
}

# The baselines whose generated frames hold no ball: detection must be ~0 (docs/evals.md).
BALL_FREE: tuple[str, ...] = ("uniform_noise", "gaussian_noise", "blank")


def baseline_videos(videos: Any, states: Sequence[Any], context_frames: int = 3) -> dict[str, np.ndarray]:
    """The calibration baselines' videos, keyed by name (``BASELINES``' keys, ball-free ones included).

    Args:
        videos: ground-truth uint8 (N, T, H, W, 3).
        states: ``states`` rows, one per video.
        context_frames: C given frames.
    """
    return {name: make(videos, states, context_frames) for name, make in BASELINES.items()}


def score_baselines(videos: Any, states: Sequence[Any], context_frames: int = 3, **score_kwargs: Any) -> dict[str, dict[str, Any]]:
    """:func:`score` of every calibration baseline, keyed by baseline name.

    Args:
        videos: ground-truth uint8 (N, T, H, W, 3).
        states: ``states`` rows, one per video.
        context_frames: C given frames.
        **score_kwargs: detection settings passed to :func:`score`.
    """
    return {name: score(vids, states, context_frames, **score_kwargs)
            for name, vids in baseline_videos(videos, states, context_frames).items()}


def score_splits(
    videos: Mapping[str, Any],
    states: Mapping[str, Sequence[Any]],
    context_frames: int = 3,
    **score_kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Score each split (e.g. ``"id"`` and ``"ood"``) separately; never pool them.

    Args:
        videos: split name -> uint8 (N, T, H, W, 3).
        states: split name -> ``states`` rows; must have the same split names as ``videos``.
        context_frames: C given frames.
        **score_kwargs: passed to :func:`score`.

    Returns:
        split name -> :func:`score`'s dict.
    """
    if set(videos) != set(states):
        raise ValueError(f"videos and states must name the same splits; got {sorted(videos)} and {sorted(states)}")
    return {split: score(videos[split], states[split], context_frames, **score_kwargs) for split in videos}
