"""Procedurally generated moving squares: a dataset built in code, for tests and smoke runs.

Each video shows one coloured square on a dark background moving at constant velocity and
bouncing off the frame edges. It has a known class (its dominant direction of motion) and a
templated caption, so class- and text-conditioning can both be exercised without any files.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["moving_squares", "MovingSquares", "DIRECTIONS"]

DIRECTIONS = ("right", "left", "down", "up")
_COLORS = {"red": (1.0, -0.8, -0.8), "green": (-0.8, 1.0, -0.8), "blue": (-0.8, -0.8, 1.0), "yellow": (1.0, 1.0, -0.8)}


def moving_squares(
    num_videos: int,
    frames: int = 8,
    height: int = 16,
    width: int = 16,
    generator: torch.Generator | None = None,
    size_range: tuple[float, float] = (0.2, 0.35),
    max_speed: float = 0.12,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Make ``num_videos`` clips of a bouncing square.

    Args:
        num_videos: number of clips N.
        frames, height, width: clip shape (T, H, W).
        generator: a seeded ``torch.Generator`` makes the set reproducible.
        size_range: square side as a fraction of min(H, W).
        max_speed: max speed per axis as a fraction of the frame per frame.

    Returns:
        ``(videos (N, 3, T, H, W) float in [-1, 1], labels (N,) index into DIRECTIONS, captions)``.
    """
    for name, v in (("num_videos", num_videos), ("frames", frames), ("height", height), ("width", width)):
        if v < 1:
            raise ValueError(f"{name}={v} must be >= 1")
    g = generator
    N, T, H, W = num_videos, frames, height, width
    side = (size_range[0] + (size_range[1] - size_range[0]) * torch.rand(N, generator=g)) * min(H, W)
    side = side.clamp(min=2.0)
    pos = torch.rand(N, 2, generator=g) * (torch.tensor([W, H]) - side[:, None])  # top-left x, y
    vel = (torch.rand(N, 2, generator=g) * 2 - 1) * max_speed * torch.tensor([W, H])
    color_names = list(_COLORS)
    color_idx = torch.randint(len(color_names), (N,), generator=g)
    colors = torch.tensor([_COLORS[c] for c in color_names])[color_idx]  # (N, 3)

    # Simulate with reflection off the walls (exact, per frame)
    lo = torch.zeros(N, 2)
    hi = torch.stack([W - side, H - side], dim=1)
    traj = []
    p, v = pos.clone(), vel.clone()
    for _ in range(T):
        traj.append(p.clone())
        p = p + v
        over, under = p > hi, p < lo
        p = torch.where(over, 2 * hi - p, torch.where(under, 2 * lo - p, p))
        v = torch.where(over | under, -v, v)
    traj_t = torch.stack(traj, dim=1)  # (N, T, 2)

    # Anti-aliased rasterisation: pixel coverage of [x, x + side) along each axis
    xs = torch.arange(W, dtype=torch.float32)
    ys = torch.arange(H, dtype=torch.float32)
    x0 = traj_t[..., 0, None]
    y0 = traj_t[..., 1, None]
    s = side[:, None, None]
    cov_x = (torch.minimum(xs + 1, x0 + s) - torch.maximum(xs, x0)).clamp(0, 1)  # (N, T, W)
    cov_y = (torch.minimum(ys + 1, y0 + s) - torch.maximum(ys, y0)).clamp(0, 1)  # (N, T, H)
    alpha = cov_y[..., :, None] * cov_x[..., None, :]  # (N, T, H, W)
    background = -0.9
    video = background + alpha[:, None] * (colors[:, :, None, None, None] - background)  # (N, 3, T, H, W)

    dx, dy = vel[:, 0], vel[:, 1]
    labels = torch.where(dx.abs() >= dy.abs(), torch.where(dx >= 0, 0, 1), torch.where(dy >= 0, 2, 3))
    captions = [f"a {color_names[int(c)]} square moving {DIRECTIONS[int(l)]}" for c, l in zip(color_idx, labels)]
    return video.clamp(-1, 1), labels, captions


class MovingSquares(Dataset):
    """A map-style dataset over :func:`moving_squares` (generated once, in memory).

    Items are ``{"video": (3, T, H, W), "label": int, "caption": str, "index": int}``.
    """

    def __init__(self, num_videos: int = 256, frames: int = 8, height: int = 16, width: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.videos, self.labels, self.captions = moving_squares(num_videos, frames, height, width, generator=g)

    def __len__(self) -> int:
        return self.videos.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"video": self.videos[i], "label": int(self.labels[i]), "caption": self.captions[i], "index": i}
