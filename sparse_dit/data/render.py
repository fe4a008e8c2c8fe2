"""Anti-aliased renderer for the physics world, its colour palette, and ball detection by colour.

Pixel convention (issue 4): x runs right, y runs down; pixel (row i, column j) covers the square
[j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5). Ball positions are given in these
continuous pixel coordinates.

Anti-aliasing: a pixel's coverage by a disc of radius r whose centre is at distance d from the
pixel centre is approximated by ``clip(r' + 0.5 - d, 0, 1)`` (the signed distance to the circle,
clamped to one pixel). It is exact for a straight edge crossing a pixel perpendicular to an axis
and symmetric about the centre, so the coverage-weighted centroid of a whole disc is its centre.
Integrated over the plane this ramp covers pi * (r'^2 + 1/12), so ``r' = sqrt(r^2 - 1/12)`` makes
the total coverage equal the disc's area pi * r^2 (it matters for radii of a few pixels).

Detection: a rendered ball pixel is a blend ``p = (1 - a) * background + a * colour``. A pixel
belongs to ball colour ``c`` when its projection onto the segment background -> c has coverage
``a >= 0.5`` and lies close to that segment. Matching against segments instead of the nearest
palette point matters: a half-covered yellow pixel, (131, 116, 26), is nearer to red than to
yellow as a point, but it sits exactly on the black -> yellow segment.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "BACKGROUND",
    "OCCLUDER_COLOR",
    "PALETTE",
    "PALETTE_NAMES",
    "render_balls",
    "color_coverage",
    "ball_masks",
    "ball_centroids",
]

# Near-black background: every palette colour is at least 200 RGB units from it, so a ball stays
# distinct from the background even at 32x32 with anti-aliased edges.
BACKGROUND: tuple[int, int, int] = (12, 12, 12)

# Mid grey: off every background -> palette-colour segment by >= 89 RGB units, so an occluder
# pixel is never mistaken for a partly covered ball.
OCCLUDER_COLOR: tuple[int, int, int] = (128, 128, 128)

# Six saturated colours, pairwise >= 160 RGB units apart (at most 4 balls share a frame, each
# with its own colour). Names are used in captions; order is stable (evals index into it).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (40, 210, 60),
    "blue": (40, 60, 255),
    "yellow": (250, 220, 40),
    "magenta": (230, 60, 230),
    "cyan": (40, 220, 230),
}
PALETTE_NAMES: tuple[str, ...] = tuple(PALETTE)


def render_balls(
    positions: np.ndarray,
    radii: np.ndarray,
    colors: np.ndarray,
    height: int,
    width: int,
    occluders: np.ndarray | None = None,
) -> np.ndarray:
    """Render balls (and optional rectangular occluders drawn on top) into uint8 frames.

    Vectorised over the pixels of each ball's bounding box; loops over balls and frames.

    Args:
        positions: (T, K, 2) ball centres, pixel coordinates (x right, y down).
        radii: (K,) radii in pixels.
        colors: (K, 3) RGB colours, 0-255.
        height: frame height H in pixels.
        width: frame width W in pixels.
        occluders: optional (M, 4) rectangles ``[x0, y0, x1, y1]`` in pixel coordinates, drawn
            opaque (anti-aliased edges) in OCCLUDER_COLOR after the balls.

    Returns:
        uint8 array (T, H, W, 3).
    """
    positions = np.asarray(positions, dtype=np.float32)
    if positions.ndim != 3 or positions.shape[-1] != 2:
        raise ValueError(f"positions must have shape (T, K, 2), got {positions.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")
    num_frames, num_balls, _ = positions.shape
    radii = np.asarray(radii, dtype=np.float32).reshape(num_balls)
    colors = np.asarray(colors, dtype=np.float32).reshape(num_balls, 3)
    xs = np.arange(width, dtype=np.float32) + 0.5  # pixel centres
    ys = np.arange(height, dtype=np.float32) + 0.5
    frames = np.empty((num_frames, height, width, 3), dtype=np.float32)
    frames[:] = np.asarray(BACKGROUND, dtype=np.float32)
    for k in range(num_balls):
        r_eff = np.sqrt(max(float(radii[k]) ** 2 - 1.0 / 12.0, 0.0))  # area-preserving (see above)
        reach = r_eff + 1.0  # alpha is 0 for pixel centres farther than r_eff + 0.5
        for t in range(num_frames):
            # Only the ball's bounding box: 5-30x less work than whole frames.
            cx, cy = float(positions[t, k, 0]), float(positions[t, k, 1])
            x0, x1 = max(int(np.floor(cx - reach)), 0), min(int(np.ceil(cx + reach)) + 1, width)
            y0, y1 = max(int(np.floor(cy - reach)), 0), min(int(np.ceil(cy + reach)) + 1, height)
            if x0 >= x1 or y0 >= y1:
                continue  # wholly outside the frame
            dist = np.sqrt((ys[y0:y1, None] - cy) ** 2 + (xs[None, x0:x1] - cx) ** 2)  # (h, w)
            alpha = np.clip(r_eff + 0.5 - dist, 0.0, 1.0)[..., None]  # (h, w, 1)
            box = frames[t, y0:y1, x0:x1]
            box += alpha * (colors[k] - box)  # "over" compositing, painter's order
    if occluders is not None:
        occ = np.asarray(OCCLUDER_COLOR, dtype=np.float32)
        for x0, y0, x1, y1 in np.asarray(occluders, dtype=np.float32).reshape(-1, 4):
            # Exact area coverage of each pixel by an axis-aligned rectangle.
            cov_x = np.clip(np.minimum(xs + 0.5, x1) - np.maximum(xs - 0.5, x0), 0.0, 1.0)  # (W,)
            cov_y = np.clip(np.minimum(ys + 0.5, y1) - np.maximum(ys - 0.5, y0), 0.0, 1.0)  # (H,)
            alpha = (cov_y[:, None] * cov_x[None, :])[None, :, :, None]  # (1, H, W, 1)
            frames += alpha * (occ - frames)
    return np.rint(frames).astype(np.uint8)


def color_coverage(frames: np.ndarray, colors: np.ndarray, background=BACKGROUND, max_residual: float = 40.0) -> np.ndarray:
    """Estimated coverage of each pixel by each colour, from the background -> colour blend.

    Args:
        frames: uint8 or float RGB (..., H, W, 3) in 0-255.
        colors: (K, 3) RGB colours.
        background: background RGB.
        max_residual: RGB distance from the background -> colour segment beyond which the pixel
            is not a blend of that colour (coverage 0).

    Returns:
        float32 (..., H, W, K) coverage in [0, 1].
    """
    p = np.asarray(frames, dtype=np.float32) - np.asarray(background, dtype=np.float32)  # (..., 3)
    d = np.asarray(colors, dtype=np.float32).reshape(-1, 3) - np.asarray(background, dtype=np.float32)  # (K, 3)
    alpha = (p @ d.T) / np.sum(d * d, axis=1)  # (..., K)
    alpha = np.clip(alpha, 0.0, 1.0)
    residual = np.linalg.norm(p[..., None, :] - alpha[..., None] * d, axis=-1)  # (..., K)
    return np.where(residual <= max_residual, alpha, 0.0).astype(np.float32)


def ball_masks(frames: np.ndarray, colors: np.ndarray, background=BACKGROUND, threshold: float = 0.5) -> np.ndarray:
    """Boolean mask per colour: pixels at least ``threshold`` covered by that colour.

    Args:
        frames: RGB (..., H, W, 3) in 0-255.
        colors: (K, 3) RGB colours to look for (e.g. a row's ``states['color']`` or PALETTE).
        background: background RGB.
        threshold: minimum coverage.

    Returns:
        bool (..., K, H, W).
    """
    cov = color_coverage(frames, colors, background)
    return np.moveaxis(cov >= threshold, -1, -3)


def ball_centroids(frames: np.ndarray, colors: np.ndarray, background=BACKGROUND) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (pixel coordinates, pixel-centre convention) of each colour's mask per frame.

    Args:
        frames: RGB (T, H, W, 3).
        colors: (K, 3) RGB colours.
        background: background RGB.

    Returns:
        ``(centroids, counts)``: float (T, K, 2) as (x, y), NaN where the mask is empty, and
        int (T, K) mask pixel counts.
    """
    masks = ball_masks(frames, colors, background)  # (T, K, H, W)
    height, width = masks.shape[-2:]
    counts = masks.sum(axis=(-1, -2))
    xs = np.arange(width, dtype=np.float64) + 0.5
    ys = np.arange(height, dtype=np.float64) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (masks * xs[None, None, None, :]).sum(axis=(-1, -2)) / counts
        cy = (masks * ys[None, None, :, None]).sum(axis=(-1, -2)) / counts
    return np.stack([cx, cy], axis=-1), counts
