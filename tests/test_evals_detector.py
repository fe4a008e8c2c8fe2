"""The physics eval's ball finder fails on frames with no ball (issue 15).

References are built here: discs and ellipses by 8x8 supersampling, noise from seeded NumPy, and
the physics world's own renders with their simulator states. Each found check (size, shape,
colour, contrast) has a blob only it rejects, so dropping any one of them fails a test.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparse_dit.data.physics import generate_physics_videos
from sparse_dit.evals import physics
from sparse_dit.evals.tracking import CHECKS, blob_checks, detect_balls

BG = np.array([12.0, 12.0, 12.0])
RED = np.array([230.0, 30.0, 30.0])
C = 3


def coverage(h: int, w: int, cx: float, cy: float, a: float, b: float | None = None, ss: int = 8) -> np.ndarray:
    """(H, W) fraction of each pixel inside the ellipse (x-cx)^2/a^2 + (y-cy)^2/b^2 <= 1 (8x8 samples)."""
    b = a if b is None else b
    sub = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(w)[:, None] + sub[None, :]).reshape(-1)
    ys = (np.arange(h)[:, None] + sub[None, :]).reshape(-1)
    inside = ((xs[None, :] - cx) / a) ** 2 + ((ys[:, None] - cy) / b) ** 2 <= 1.0
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def paint(alpha: np.ndarray, color: np.ndarray = RED, base: np.ndarray | None = None) -> np.ndarray:
    base = np.broadcast_to(BG, alpha.shape + (3,)) if base is None else base
    return np.clip(np.rint(base * (1 - alpha[..., None]) + color * alpha[..., None]), 0, 255).astype(np.uint8)


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) array (reflect padding), written here."""
    x = np.arange(-4, 5, dtype=np.float64)
    g = np.exp(-x**2 / (2 * sigma**2))
    g /= g.sum()
    p = np.pad(img, 4, mode="reflect")
    rows = np.stack([np.convolve(r, g, mode="valid") for r in p])
    return np.stack([np.convolve(c, g, mode="valid") for c in rows.T]).T


def find(frame: np.ndarray, r: float) -> tuple[bool, np.ndarray]:
    pos, found, _ = detect_balls(frame[None], RED[None], np.array([r]), BG)
    return bool(found[0, 0]), pos[0, 0]


R, CX, CY, S = 3.0, 16.3, 15.6, 32
DISC = coverage(S, S, CX, CY, R)


@pytest.mark.parametrize("name,alpha,base", [
    ("disc", DISC, None),
    ("disc blurred by sigma 0.7 px", blur(DISC, 0.7), None),
])
def test_balls_are_found_where_they_are(name, alpha, base):
    ok, pos = find(paint(alpha, base=base), R)
    assert ok, name
    assert np.hypot(pos[0] - CX, pos[1] - CY) < 0.1, (name, pos)


# Blobs of the ball's colour that are not the ball, each rejected by exactly one check.
GREY_PATCH = np.where((np.hypot(np.arange(S)[None, :] + 0.5 - CX, np.arange(S)[:, None] + 0.5 - CY) < R + 4)[..., None],
                      np.array([90.0, 90.0, 160.0]), BG)
ADVERSARIAL = {
    "shape": paint(coverage(S, S, CX, CY, 2.2 * R, 0.6 * R)),  # a 3.7:1 sausage of the ball's area x 1.3
    "size": paint(coverage(S, S, CX, CY, 1.45 * R)),  # a ball twice the area
    "colour": paint(0.35 * DISC),  # a faint ghost: alpha 0.35
    "contrast": paint(DISC, base=GREY_PATCH),  # the ball on a (non-static) patch of another colour
}


@pytest.mark.parametrize("check", CHECKS)
def test_each_check_rejects_its_blob(check):
    frame = ADVERSARIAL[check]
    # centroid of the ball's soft mask, as the finder places it: the checks are evaluated there
    pos, _, _ = detect_balls(frame[None], RED[None], np.array([R]), BG, max_area_fraction=1e9, max_spread=1e9,
                             min_core_alpha=0.0, min_contrast=0.0, min_area_fraction=1e-3)
    rel = frame.astype(np.float64) - BG
    d = RED - BG
    alpha = np.clip(rel @ d / (d @ d), 0, 1)
    resid = np.linalg.norm(rel - alpha[..., None] * d, axis=-1)
    weights = np.where((resid <= 60) & (alpha >= 0.2), alpha, 0.0)
    verdict = {k: bool(v[0]) for k, v in blob_checks(frame[None], weights[None], pos[:, 0], R, BG).items()}
    assert verdict == {k: k != check for k in CHECKS}, verdict
    assert not find(frame, R)[0]


@pytest.fixture(scope="module")
def world():
    """Physics-world renders (every scenario, id and ood, 24 and 32 px) with their states."""
    out = []
    for size in (24, 32):
        for sc in ("uniform", "collision", "parabola", "bounce", "occlusion"):
            for split in ("id", "ood"):
                rows = generate_physics_videos(sc, split, 4, 8, size, size, seed=11, fps=4.0, workers=1)
                out.append((np.stack([r["video"] for r in rows]), [r["states"] for r in rows]))
    return out


def _pooled(world, make):
    found = visible = 0
    pos, vel = [], []
    for videos, states in world:
        s = physics.score(make(videos, states, C), states, C)
        found, visible = found + s["num_found"], visible + s["num_visible"]
        pos.append((s["position_error"], s["num_position_pairs"]))
        vel.append((s["velocity_error"], s["num_velocity_pairs"]))
    mean = lambda pairs: (sum(e * n for e, n in pairs if n) / max(1, sum(n for _, n in pairs))) if any(n for _, n in pairs) else float("nan")
    return found / visible, mean(pos), mean(vel)


def test_world_ground_truth_is_found_with_small_error(world):
    det, pos, vel = _pooled(world, physics.ground_truth_videos)
    # before the found checks (issue 15) the same renders scored detection 1.0, position error
    # 0.029 px and velocity error 0.037 px/frame (docs/evals.md)
    assert det >= 0.995 and pos < 0.06 and vel < 0.08, (det, pos, vel)


@pytest.fixture(scope="module")
def copy_last(world):
    return _pooled(world, physics.copy_last_frame_videos)


@pytest.mark.parametrize("name", physics.BALL_FREE)
def test_ball_free_baselines_find_nothing(world, copy_last, name):
    det, pos, vel = _pooled(world, physics.BASELINES[name])
    assert det < 0.05, (name, det)
    _, _, vel_copy = copy_last
    # errors exist only on found balls: none here, so never better than copy-last-frame
    assert not vel < vel_copy and not pos < 0.5, (name, pos, vel, vel_copy)
