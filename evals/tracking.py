"""Find coloured balls in video frames by their colour, and draw them back.

This is the measuring instrument of the physics eval (PhyWorld's protocol, Kang et al. 2024:
find each ball by its colour, its centroid is its position). Pixel geometry follows the physics
dataset (issue 4): pixel (row i, column j) covers [j, j+1) x [i, i+1), so its centre is
(j + 0.5, i + 0.5); x runs right, y runs down.

How a ball is found (``detect_balls``), for a frame and a ball of colour c on background b:

1. Soft colour mask. Every pixel p is projected on the segment from b to c:
   ``alpha = clip(<p - b, c - b> / |c - b|^2, 0, 1)`` is the fraction of the pixel the ball
   covers if p is an anti-aliased mix of b and c, and ``residual = |p - b - alpha (c - b)|`` is
   how far p is from any such mix. A pixel belongs to the ball whose segment is nearest (the
   nearest-colour rule, background included, since alpha = 0 is the background), if that
   residual is at most ``color_tolerance`` and ``alpha >= min_alpha``; its weight is alpha.
   ``min_alpha`` keeps faint background noise (a generated video is never exactly flat) from
   dragging the centroid toward the image centre.
2. Seed: the pixel whose (2 ceil(r) + 1)^2 box holds the most weight, so stray pixels of the
   right colour elsewhere do not move the estimate.
3. Centroid: the weighted centroid of the pixels within ``r + 1.5`` px of the current centre,
   iterated three times (the anti-aliased rim lies within r + 0.71 of the true centre).
4. Found: the weight inside that window is at least ``min_area_fraction * pi r^2``.

On anti-aliased renders of fully visible balls the centroid is within a few hundredths of a
pixel of the true centre (see tests/test_evals_metrics.py). Two balls of the same colour in
one video cannot be told apart by colour; ``track_videos`` raises on that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "BallStates",
    "Track",
    "as_ball_states",
    "check_videos",
    "detect_balls",
    "estimate_background",
    "render_balls",
    "track_videos",
]


@dataclass(frozen=True)
class BallStates:
    """One video's ``states`` row as arrays. T = frames, K = balls."""

    position: np.ndarray  # (T, K, 2) float64, px, pixel-centre convention
    radius: np.ndarray  # (K,) float64, px
    color: np.ndarray  # (K, 3) float64 in [0, 255]
    visible: np.ndarray  # (T, K) bool


@dataclass(frozen=True)
class Track:
    """Detections of every ball in one video, beside its ground truth."""

    positions: np.ndarray  # (T, K, 2) detected centroids; NaN where not found
    found: np.ndarray  # (T, K) bool
    mass: np.ndarray  # (T, K) soft-mask area in px
    gt_positions: np.ndarray  # (T, K, 2)
    gt_visible: np.ndarray  # (T, K) bool
    radius: np.ndarray  # (K,)
    color: np.ndarray  # (K, 3)
    background: np.ndarray  # (3,)
    context_frames: int


def as_ball_states(row: Any, index: int = 0) -> BallStates:
    """Convert one dataset ``states`` row (dict of nested lists or arrays) to :class:`BallStates`.

    Args:
        row: mapping with ``position`` [T][K][2], ``radius`` [K], ``color`` [K][3] and
            ``visible`` [T][K] (``velocity`` is not needed: velocities are measured from
            positions, see ``sparse_dit.evals.physics``).
        index: the row's index, used in error messages only.
    """
    if isinstance(row, BallStates):
        return row
    if not isinstance(row, Mapping):
        raise ValueError(f"states[{index}] must be a mapping with position/radius/color/visible; got {type(row).__name__}")
    missing = [key for key in ("position", "radius", "color", "visible") if key not in row]
    if missing:
        raise ValueError(f"states[{index}] lacks field(s) {missing}; the physics dataset's states rows have them")
    pos = np.asarray(row["position"], dtype=np.float64)
    radius = np.asarray(row["radius"], dtype=np.float64).reshape(-1)
    color = np.asarray(row["color"], dtype=np.float64)
    visible = np.asarray(row["visible"], dtype=bool)
    k = radius.shape[0]
    if pos.ndim != 3 or pos.shape[1:] != (k, 2):
        raise ValueError(f"states[{index}].position must be [T][K][2] with K={k} balls; got shape {pos.shape}")
    if color.shape != (k, 3):
        raise ValueError(f"states[{index}].color must be [K][3] with K={k}; got shape {color.shape}")
    if visible.shape != pos.shape[:2]:
        raise ValueError(f"states[{index}].visible must be [T][K] = {pos.shape[:2]}; got shape {visible.shape}")
    if np.any(radius <= 0):
        raise ValueError(f"states[{index}].radius must be positive; got {radius.tolist()}")
    return BallStates(position=pos, radius=radius, color=color, visible=visible)


def check_videos(videos: Any, context_frames: int) -> np.ndarray:
    """Validate uint8 videos (N, T, H, W, 3) with at least one generated frame; return the array.

    Args:
        videos: array-like of uint8; a torch tensor is accepted too.
        context_frames: C >= 1 given frames at the start of every video.
    """
    if hasattr(videos, "detach"):  # torch.Tensor, without importing torch here
        videos = videos.detach().cpu().numpy()
    videos = np.asarray(videos)
    if videos.dtype != np.uint8:
        raise ValueError(f"videos must be uint8 (N, T, H, W, 3); got dtype {videos.dtype} "
                         "(convert [-1, 1] floats with ((x + 1) * 127.5).round().clip(0, 255))")
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must have shape (N, T, H, W, 3); got {videos.shape}")
    if not isinstance(context_frames, (int, np.integer)) or context_frames < 1:
        raise ValueError(f"context_frames must be an int >= 1; got {context_frames!r}")
    if videos.shape[1] <= context_frames:
        raise ValueError(f"videos have T={videos.shape[1]} frames, so context_frames={context_frames} leaves no generated frame")
    return videos


def estimate_background(frame: np.ndarray) -> np.ndarray:
    """The most frequent colour of a (H, W, 3) uint8 frame (plain backgrounds dominate the frame).

    Args:
        frame: one uint8 frame, e.g. the first (given) frame of a video.
    """
    f = np.asarray(frame).astype(np.int64).reshape(-1, 3)
    packed = (f[:, 0] << 16) | (f[:, 1] << 8) | f[:, 2]
    values, counts = np.unique(packed, return_counts=True)
    mode = int(values[np.argmax(counts)])
    return np.array([(mode >> 16) & 255, (mode >> 8) & 255, mode & 255], dtype=np.float64)


def _soft_masks(frames: np.ndarray, colors: np.ndarray, background: np.ndarray,
                color_tolerance: float, min_alpha: float) -> np.ndarray:
    """Per-ball soft masks (T, H, W, K): alpha where the pixel belongs to ball k, else 0."""
    rel = frames.astype(np.float64) - background  # (T, H, W, 3)
    d = colors - background  # (K, 3)
    dn2 = (d * d).sum(axis=1)  # (K,)
    dot = np.einsum("thwc,kc->thwk", rel, d)
    alpha = np.clip(dot / dn2, 0.0, 1.0)
    resid2 = (rel * rel).sum(axis=-1, keepdims=True) - 2.0 * alpha * dot + alpha * alpha * dn2
    resid2 = np.maximum(resid2, 0.0)
    nearest = np.argmin(resid2, axis=-1)[..., None] == np.arange(colors.shape[0])
    keep = nearest & (resid2 <= color_tolerance**2) & (alpha >= min_alpha)
    return np.where(keep, alpha, 0.0)


def _box_sum(w: np.ndarray, half: int) -> np.ndarray:
    """Sum of w (T, H, W) over the (2 half + 1)^2 box around each pixel (zero padded)."""
    p = np.pad(w, ((0, 0), (half + 1, half), (half + 1, half)))
    c = p.cumsum(axis=1).cumsum(axis=2)
    s = 2 * half + 1
    return c[:, s:, s:] - c[:, :-s, s:] - c[:, s:, :-s] + c[:, :-s, :-s]


def detect_balls(
    frames: np.ndarray,
    colors: np.ndarray,
    radii: np.ndarray,
    background: np.ndarray,
    color_tolerance: float = 60.0,
    min_alpha: float = 0.2,
    min_area_fraction: float = 0.25,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Find each ball by its colour in every frame (algorithm in the module docstring).

    Args:
        frames: uint8 (T, H, W, 3).
        colors: (K, 3) ball colours in [0, 255].
        radii: (K,) ball radii in px (size the search window and the found threshold).
        background: (3,) background colour.
        color_tolerance: max RGB distance (0-255 scale) of a pixel from the background-to-ball
            colour segment for it to count as part of the ball.
        min_alpha: min ball coverage fraction for a pixel to count (rejects faint noise).
        min_area_fraction: a ball is found when its soft mask holds at least this fraction of
            pi r^2 pixels.

    Returns:
        ``(positions (T, K, 2), found (T, K), mass (T, K))``; positions are NaN where not found.
    """
    if color_tolerance <= 0 or not 0.0 < min_alpha <= 1.0 or not 0.0 < min_area_fraction <= 1.0:
        raise ValueError(f"need color_tolerance > 0, 0 < min_alpha <= 1, 0 < min_area_fraction <= 1; got "
                         f"{color_tolerance}, {min_alpha}, {min_area_fraction}")
    colors = np.asarray(colors, dtype=np.float64)
    background = np.asarray(background, dtype=np.float64)
    too_close = np.linalg.norm(colors - background, axis=1) < 1.0
    if np.any(too_close):
        raise ValueError(f"ball colour(s) {colors[too_close].tolist()} equal the background {background.tolist()}")
    t, h, w, _ = frames.shape
    k = colors.shape[0]
    masks = _soft_masks(frames, colors, background, color_tolerance, min_alpha)  # (T, H, W, K)
    xs = np.arange(w) + 0.5
    ys = np.arange(h) + 0.5
    positions = np.full((t, k, 2), np.nan)
    mass = np.zeros((t, k))
    for b in range(k):
        wb = masks[..., b]
        r = float(radii[b])
        seed = _box_sum(wb, int(math.ceil(r))).reshape(t, -1).argmax(axis=1)
        cx, cy = xs[seed % w], ys[seed // w]
        m = np.zeros(t)
        for _ in range(3):
            inside = ((xs[None, None, :] - cx[:, None, None]) ** 2
                      + (ys[None, :, None] - cy[:, None, None]) ** 2) <= (r + 1.5) ** 2
            ww = wb * inside
            m = ww.sum(axis=(1, 2))
            safe = np.maximum(m, 1e-12)
            cx = np.where(m > 0, (ww * xs[None, None, :]).sum(axis=(1, 2)) / safe, cx)
            cy = np.where(m > 0, (ww * ys[None, :, None]).sum(axis=(1, 2)) / safe, cy)
        mass[:, b] = m
        positions[:, b, 0], positions[:, b, 1] = cx, cy
    found = mass >= min_area_fraction * math.pi * np.asarray(radii, dtype=np.float64)[None, :] ** 2
    positions[~found] = np.nan
    return positions, found, mass


def track_videos(
    videos: Any,
    states: Sequence[Any],
    context_frames: int = 3,
    background: Any = None,
    **detect_kwargs: Any,
) -> list[Track]:
    """Detect every ball of every video; pair the detections with the ground truth.

    Args:
        videos: uint8 (N, T, H, W, 3).
        states: N ``states`` rows with at least T frames (extra frames are ignored, so a
            shorter generated clip can be scored against a longer simulation).
        context_frames: C given frames.
        background: (3,) or (N, 3) background colour; by default the most frequent colour of
            each video's first frame (a given frame, so generation cannot move it).
        **detect_kwargs: ``color_tolerance``, ``min_alpha``, ``min_area_fraction``.
    """
    videos = check_videos(videos, context_frames)
    n, t = videos.shape[:2]
    if len(states) != n:
        raise ValueError(f"got {n} videos but {len(states)} states rows; they must pair one to one")
    if background is not None:
        background = np.broadcast_to(np.asarray(background, dtype=np.float64), (n, 3))
    tracks = []
    for i in range(n):
        st = as_ball_states(states[i], i)
        if st.position.shape[0] < t:
            raise ValueError(f"states[{i}] has {st.position.shape[0]} frames but the video has {t}")
        dup = np.linalg.norm(st.color[:, None] - st.color[None, :], axis=-1) + 1e9 * np.eye(len(st.radius))
        if np.any(dup < 1.0):
            raise ValueError(f"states[{i}] has two balls of the same colour; colour tracking cannot tell them apart")
        bg = estimate_background(videos[i, 0]) if background is None else background[i]
        pos, found, mass = detect_balls(videos[i], st.color, st.radius, bg, **detect_kwargs)
        tracks.append(Track(positions=pos, found=found, mass=mass, gt_positions=st.position[:t],
                            gt_visible=st.visible[:t], radius=st.radius, color=st.color, background=bg,
                            context_frames=int(context_frames)))
    return tracks


def render_balls(
    plate: np.ndarray,
    positions: np.ndarray,
    radii: np.ndarray,
    colors: np.ndarray,
    foreground: np.ndarray | None = None,
) -> np.ndarray:
    """Draw anti-aliased discs on a copy of ``plate``; return a uint8 frame.

    Coverage of a pixel is ``clip(r + 0.5 - d, 0, 1)`` with d the distance from the pixel
    centre to the disc centre (a one-pixel linear ramp across the rim), blended over the plate
    in ball order. NaN positions are skipped.

    Args:
        plate: (H, W, 3) background image (float or uint8).
        positions: (K, 2) disc centres, pixel-centre convention.
        radii: (K,) px.
        colors: (K, 3) in [0, 255].
        foreground: optional (H, W) bool mask of static objects in front of the balls (an
            occluder); those pixels keep the plate's colour.
    """
    img = np.asarray(plate, dtype=np.float64).copy()
    h, w = img.shape[:2]
    xs = np.arange(w)[None, :] + 0.5
    ys = np.arange(h)[:, None] + 0.5
    for (x, y), r, c in zip(np.asarray(positions, dtype=np.float64), radii, np.asarray(colors, dtype=np.float64)):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        d = np.sqrt((xs - x) ** 2 + (ys - y) ** 2)
        a = np.clip(r + 0.5 - d, 0.0, 1.0)[..., None]
        img = img * (1.0 - a) + c * a
    if foreground is not None:
        img[foreground] = np.asarray(plate, dtype=np.float64)[foreground]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
