"""Video I/O at the edges: [-1, 1] tensors <-> uint8 frames, and writing GIF/MP4 files.

# B = batch, C = channels, T = frames
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import imageio.v3 as iio
import numpy as np
import torch
from einops import rearrange

__all__ = ["to_uint8", "from_uint8", "save_video", "side_by_side"]


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(C, T, H, W) float in [-1, 1] -> (T, H, W, C) uint8 (values outside [-1, 1] are clipped)."""
    if video.ndim != 4:
        raise ValueError(f"video must have shape (C, T, H, W), got {tuple(video.shape)}")
    v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(v, "c t h w -> t h w c").cpu().numpy()


def from_uint8(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(T, H, W, C) uint8 -> (C, T, H, W) float in [-1, 1]."""
    x = torch.as_tensor(np.asarray(frames))
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"frames must be uint8 (T, H, W, C), got {x.dtype} {tuple(x.shape)}")
    return rearrange(x.float() / 127.5 - 1, "t h w c -> c t h w")


def side_by_side(videos: Sequence[np.ndarray], gap: int = 2, scale: int = 1) -> np.ndarray:
    """Concatenate uint8 (T, H, W, 3) clips horizontally (same T and H), with a white gap."""
    if not videos:
        raise ValueError("side_by_side needs at least one video")
    T, H = videos[0].shape[:2]
    parts = []
    for i, v in enumerate(videos):
        if v.shape[:2] != (T, H):
            raise ValueError(f"video {i} has (T, H)={v.shape[:2]}, expected {(T, H)}")
        if i:
            parts.append(np.full((T, H, gap, v.shape[3]), 255, dtype=np.uint8))
        parts.append(v)
    out = np.concatenate(parts, axis=2)
    if scale > 1:
        out = out.repeat(scale, axis=1).repeat(scale, axis=2)
    return out


def save_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0, scale: int = 1) -> Path:
    """Write uint8 (T, H, W, 3) frames as ``.gif`` (Pillow) or ``.mp4`` (ffmpeg via imageio).

    Args:
        path: output file; the suffix picks the format.
        frames: uint8 (T, H, W, 3).
        fps: frames per second.
        scale: integer nearest-neighbour upscaling, so tiny videos are viewable.
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if suffix == ".gif":
        iio.imwrite(tmp, frames, extension=".gif", duration=1000.0 / fps, loop=0)
    elif suffix == ".mp4":
        # H.264 wants even sizes; pad by edge replication rather than cropping anything away
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        iio.imwrite(tmp, frames, extension=".mp4", fps=fps, codec="libx264", plugin="pyav")
    else:
        raise ValueError(f"unsupported video suffix {suffix!r} in {str(path)!r}; use .gif or .mp4")
    os.replace(tmp, path)
    return path
