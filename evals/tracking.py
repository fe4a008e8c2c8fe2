"""Find coloured balls in video frames by their colour, and draw them back.

This is the measuring instrument of the physics eval (PhyWorld's protocol, Kang et al. 2024:
find each ball by its colour, its centroid is its position). Pixel geometry follows the physics
dataset (issue 4): pixel (row i, column j) covers [j, j+1) x [i, i+1), so its centre is
(j + 0.5, i + 0.5); x runs right, y runs down.

How a ball is found (``detect_balls``), for a frame and a ball of colour c and radius r on
background b:

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
4. Found only where a ball-shaped, ball-coloured blob of the ball's size stands out from the
   background around it. Colour alone is not enough: uniform noise holds every colour, and the
   colour rule above found a "ball" in about half of all noise frames (PITFALLS.md; 0.51 over
   the physics scenarios at 24-64 px before these checks, 0.00 after: docs/evals.md). Every
   check looks at the disc of radius ``r + 2.5`` around the centroid (a rendered ball's rim
   ends at r + 0.5), leaving out pixels outside the frame and pixels of a static occluder
   (``static_mask``):

   - ``size``: the soft-mask area m in that disc lies in
     ``[min_area_fraction, max_area_fraction] * pi r^2``;
   - ``shape``: the blob is compact: the mean squared distance of its n pixels from the
     centroid is at most ``max_spread`` times ``n / (2 pi)``, the value of a disc of n pixels
     (a disc is the most
     compact shape: 1.0; blurred by sigma = 1 px 1.2-1.35 at r = 1.5-3; a 3.7:1 ellipse 1.6-1.9;
     rings, streaks 3 or more; scattered noise 7 in
     the median), plus 0.5 px^2 for pixelation;
   - ``colour``: the blob's core, the pixels within ``max(r - 0.5, 0.75)`` of the centroid, has
     mean alpha at least ``min_core_alpha`` (the core of a rendered ball is the ball's colour);
   - ``contrast``: at least ``min_contrast`` of the ring ``r + 1 < d <= r + 2.5`` is within
     ``color_tolerance`` of the background or strongly another ball's colour (a ball stands out
     from its surroundings; balls touch in collisions).

   ``blob_checks`` returns each check separately.

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
    "CHECKS",
    "Track",
    "as_ball_states",
    "blob_checks",
    "check_videos",
    "detect_balls",
    "estimate_background",
    "render_balls",
    "static_mask",
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
    """The most frequent colour of the border pixels of a (H, W, 3) uint8 frame.

    The border, not the whole frame: in the ``occlusion`` scenario at small sizes the grey bar
    can cover more of the frame than the background does, but it spans the frame from top to
    bottom, so the left and right edges are still background (the mode of the whole frame was
    the bar's grey there).

    Args:
        frame: one uint8 frame, e.g. the first (given) frame of a video.
    """
    a = np.asarray(frame)
    if a.shape[0] > 2 and a.shape[1] > 2:
        a = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    f = a.astype(np.int64).reshape(-1, 3)
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


# Defaults of the found checks (module docstring, step 4); tuned on physics-world renders at
# 24-64 px and on noise frames (docs/evals.md gives the margins).
MAX_AREA_FRACTION = 1.6
MAX_SPREAD = 1.4
MIN_CORE_ALPHA = 0.45
MIN_CONTRAST = 0.5
CHECKS = ("size", "shape", "colour", "contrast")


def static_mask(frame: np.ndarray, colors: np.ndarray, background: np.ndarray, color_tolerance: float = 60.0) -> np.ndarray:
    """(H, W) bool: pixels of a static occluder in a given frame, left out of the found checks.

    A pixel is static when it is farther than ``color_tolerance`` from the background and from
    every background-to-ball-colour segment (the physics world's grey bar; see
    ``sparse_dit.data.render.OCCLUDER_COLOR``), or when it touches such a pixel, is not
    background and is not strongly ball-coloured (the bar's anti-aliased edge). Compute it on a given (context) frame, never on a
    generated one, so that a model cannot hide its own pixels from the checks.

    Args:
        frame: uint8 (H, W, 3).
        colors: (K, 3) ball colours.
        background: (3,) background colour.
        color_tolerance: as in :func:`detect_balls`.
    """
    colors = np.asarray(colors, dtype=np.float64)
    background = np.asarray(background, dtype=np.float64)
    rel = np.asarray(frame, dtype=np.float64) - background  # (H, W, 3)
    d = colors - background  # (K, 3)
    alpha = np.clip(np.einsum("hwc,kc->hwk", rel, d) / (d * d).sum(axis=1), 0.0, 1.0)
    resid = np.linalg.norm(rel[:, :, None, :] - alpha[..., None] * d, axis=-1)  # (H, W, K)
    dist = np.linalg.norm(rel, axis=-1)
    core = (dist > color_tolerance) & (resid > color_tolerance).all(axis=-1)
    # The occluder's anti-aliased edge (a mix of grey and background) can sit near a ball colour's
    # segment at low alpha; take the non-background, not strongly ball-coloured pixels beside it.
    grown = core.copy()
    grown[1:] |= core[:-1]
    grown[:-1] |= core[1:]
    grown[:, 1:] |= core[:, :-1]
    grown[:, :-1] |= core[:, 1:]
    ballish = ((alpha >= 0.5) & (resid <= color_tolerance)).any(axis=-1)
    return core | (grown & ~ballish & (dist > color_tolerance / 4))


def blob_checks(
    frames: np.ndarray,
    weights: np.ndarray,
    centres: np.ndarray,
    radius: float,
    background: np.ndarray,
    static: np.ndarray | None = None,
    others: np.ndarray | None = None,
    color_tolerance: float = 60.0,
    min_area_fraction: float = 0.25,
    max_area_fraction: float = MAX_AREA_FRACTION,
    max_spread: float = MAX_SPREAD,
    min_core_alpha: float = MIN_CORE_ALPHA,
    min_contrast: float = MIN_CONTRAST,
) -> dict[str, np.ndarray]:
    """The found checks of one ball in every frame (module docstring, step 4), each (T,) bool.

    Args:
        frames: uint8 (T, H, W, 3).
        weights: (T, H, W) the ball's soft colour mask.
        centres: (T, 2) the blob centroids (x, y).
        radius: the ball's radius r in px.
        background: (3,) background colour.
        static: optional (H, W) bool static-occluder pixels (:func:`static_mask`), left out.
        others: optional (T, H, W) bool pixels of the other balls (alpha >= 0.5 in their masks):
            they count as background in the ``contrast`` ring (balls touch in collisions).
        color_tolerance: max RGB distance of a ring pixel from the background to count as
            background.
        min_area_fraction: ``size``: least soft-mask area, in units of pi r^2.
        max_area_fraction: ``size``: largest soft-mask area, in units of pi r^2.
        max_spread: ``shape``: largest mean squared distance from the centroid, in units of a
            disc of the same area's.
        min_core_alpha: ``colour``: least mean alpha of the core.
        min_contrast: ``contrast``: least background fraction of the ring around the blob.

    Returns:
        ``{"size", "shape", "colour", "contrast"}`` -> (T,) bool; a ball is found where all hold.
    """
    t, h, w = weights.shape
    r = float(radius)
    xs = np.arange(w) + 0.5
    ys = np.arange(h) + 0.5
    cx, cy = centres[:, 0], centres[:, 1]
    d2 = (xs[None, None, :] - cx[:, None, None]) ** 2 + (ys[None, :, None] - cy[:, None, None]) ** 2  # (T, H, W)
    usable = np.ones((1, h, w), dtype=bool) if static is None else ~np.asarray(static, dtype=bool)[None]
    outer = (d2 <= (r + 2.5) ** 2) & usable
    wo = weights * outer
    m = wo.sum(axis=(1, 2))
    area = np.pi * r * r
    size = (m >= min_area_fraction * area) & (m <= max_area_fraction * area)
    # Shape of the blob's support (its pixels, whatever their alpha; faintness is the colour
    # check's business): mean squared distance from the centroid; a disc of n pixels has n / (2 pi).
    support = (wo > 0).astype(np.float64)
    n = support.sum(axis=(1, 2))
    spread = (support * d2).sum(axis=(1, 2)) / np.maximum(n, 1.0)
    # + 0.5 px^2: a one-pixel blur, so that 1-px balls rasterised beside an edge are not rejected.
    shape = (n > 0) & (spread <= max_spread * n / (2.0 * np.pi) + 0.5)
    core = (d2 <= max(r - 0.5, 0.75) ** 2) & usable
    n_core = core.sum(axis=(1, 2))
    colour = (n_core > 0) & ((weights * core).sum(axis=(1, 2)) >= min_core_alpha * np.maximum(n_core, 1))
    ring = (d2 > (r + 1.0) ** 2) & (d2 <= (r + 2.5) ** 2) & usable
    plain = np.linalg.norm(frames.astype(np.float64) - np.asarray(background, dtype=np.float64), axis=-1) <= color_tolerance
    if others is not None:
        plain = plain | others
    n_ring = ring.sum(axis=(1, 2))
    contrast = (ring & plain).sum(axis=(1, 2)) >= min_contrast * n_ring
    return {"size": size, "shape": shape, "colour": colour, "contrast": contrast}


def detect_balls(
    frames: np.ndarray,
    colors: np.ndarray,
    radii: np.ndarray,
    background: np.ndarray,
    color_tolerance: float = 60.0,
    min_alpha: float = 0.2,
    min_area_fraction: float = 0.25,
    *,
    static: np.ndarray | None = None,
    max_area_fraction: float = MAX_AREA_FRACTION,
    max_spread: float = MAX_SPREAD,
    min_core_alpha: float = MIN_CORE_ALPHA,
    min_contrast: float = MIN_CONTRAST,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Find each ball by its colour, shape, size and contrast in every frame (module docstring).

    Args:
        frames: uint8 (T, H, W, 3).
        colors: (K, 3) ball colours in [0, 255].
        radii: (K,) ball radii in px (size the search window and the size check).
        background: (3,) background colour.
        color_tolerance: max RGB distance (0-255 scale) of a pixel from the background-to-ball
            colour segment for it to count as part of the ball.
        min_alpha: min ball coverage fraction for a pixel to count (rejects faint noise).
        min_area_fraction: a ball is found when its soft mask holds at least this fraction of
            pi r^2 pixels (and the other checks of :func:`blob_checks` hold).
        static: optional (H, W) bool static-occluder pixels (:func:`static_mask` of a given frame).
        max_area_fraction: see :func:`blob_checks`.
        max_spread: see :func:`blob_checks`.
        min_core_alpha: see :func:`blob_checks`.
        min_contrast: see :func:`blob_checks`.

    Returns:
        ``(positions (T, K, 2), found (T, K), mass (T, K))``; positions are NaN where not found.
    """
    if color_tolerance <= 0 or not 0.0 < min_alpha <= 1.0 or not 0.0 < min_area_fraction <= 1.0:
        raise ValueError(f"need color_tolerance > 0, 0 < min_alpha <= 1, 0 < min_area_fraction <= 1; got "
                         f"{color_tolerance}, {min_alpha}, {min_area_fraction}")
    if max_area_fraction < min_area_fraction or max_spread < 1.0 or not 0.0 <= min_core_alpha <= 1.0 or not 0.0 <= min_contrast <= 1.0:
        raise ValueError(f"need max_area_fraction >= min_area_fraction, max_spread >= 1, min_core_alpha and min_contrast in "
                         f"[0, 1]; got {max_area_fraction}, {max_spread}, {min_core_alpha}, {min_contrast}")
    colors = np.asarray(colors, dtype=np.float64)
    background = np.asarray(background, dtype=np.float64)
    too_close = np.linalg.norm(colors - background, axis=1) < 1.0
    if np.any(too_close):
        raise ValueError(f"ball colour(s) {colors[too_close].tolist()} equal the background {background.tolist()}")
    t, h, w, _ = frames.shape
    if static is not None and np.shape(static) != (h, w):
        raise ValueError(f"static must be an (H, W) = {(h, w)} mask; got shape {np.shape(static)}")
    k = colors.shape[0]
    masks = _soft_masks(frames, colors, background, color_tolerance, min_alpha)  # (T, H, W, K)
    xs = np.arange(w) + 0.5
    ys = np.arange(h) + 0.5
    positions = np.full((t, k, 2), np.nan)
    mass = np.zeros((t, k))
    found = np.zeros((t, k), dtype=bool)
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
        others = (np.delete(masks, b, axis=-1) >= 0.5).any(axis=-1)
        checks = blob_checks(frames, wb, positions[:, b], r, background, static, others, color_tolerance, min_area_fraction,
                             max_area_fraction, max_spread, min_core_alpha, min_contrast)
        found[:, b] = np.logical_and.reduce([checks[name] for name in CHECKS])
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
            each video's first frame (a given frame, so generation cannot move it). A static
            occluder is found in that frame too (:func:`static_mask`).
        **detect_kwargs: ``color_tolerance``, ``min_alpha``, ``min_area_fraction`` and the
            found checks' settings (:func:`detect_balls`).
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
        static = static_mask(videos[i, 0], st.color, bg, detect_kwargs.get("color_tolerance", 60.0))
        pos, found, mass = detect_balls(videos[i], st.color, st.radius, bg, static=static, **detect_kwargs)
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
