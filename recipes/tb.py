"""TensorBoard helpers: per-expert token histograms and animated GIF "videos".

``SummaryWriter.add_video`` needs moviepy and, on these machines, writes nothing without it
(shared/PITFALLS.md). TensorBoard's image dashboard plays animated GIFs, which is all
``add_video`` produces anyway, so :func:`add_gif` encodes the GIF itself and writes a plain
image summary.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import imageio.v3 as iio
import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

__all__ = ["gif_bytes", "add_gif", "add_expert_histogram", "open_writer"]


def gif_bytes(frames: np.ndarray, fps: float = 4.0) -> bytes:
    """Encode uint8 (T, H, W, 3) frames as an animated GIF (looping).

    Args:
        frames: uint8 frames.
        fps: playback rate.
    """

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    buf = io.BytesIO()
    iio.imwrite(buf, frames, extension=".gif", duration=1000.0 / fps, loop=0)
    return buf.getvalue()


def add_gif(writer: Any, tag: str, frames: np.ndarray, step: int, fps: float = 4.0) -> None:
    """Write an animated GIF as a TensorBoard image summary (plays in the Images tab).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``.
        tag: summary tag, e.g. ``"samples/prediction"``.
        frames: uint8 (T, H, W, 3).
        step: global step.
        fps: playback rate.
    """

    T, H, W, C = frames.shape
    image = Summary.Image(height=H, width=W, colorspace=C, encoded_image_string=gif_bytes(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def add_expert_histogram(writer: Any, tag: str, tokens_per_expert: torch.Tensor, step: int) -> None:
    """Histogram whose bucket e holds the tokens routed to expert e (x axis: expert index).

    Args:
        writer: a ``SummaryWriter``.
        tag: e.g. ``"moe/tokens_per_expert"``.
        tokens_per_expert: (E,) counts (summed over layers and ranks).
        step: global step.
    """
    counts = tokens_per_expert.detach().double().cpu()
    E = counts.numel()
    experts = torch.arange(E, dtype=torch.float64)
    total = float(counts.sum())
    writer.add_histogram_raw(
        tag, min=0.0, max=float(E - 1), num=total, sum=float((experts * counts).sum()),
        sum_squares=float((experts**2 * counts).sum()), bucket_limits=[e + 0.5 for e in range(E)],
        bucket_counts=counts.tolist(), global_step=step,
    )


def open_writer(log_dir: str | Path, purge_step: Optional[int] = None) -> Any:
    """A ``SummaryWriter`` on ``log_dir``; ``purge_step`` drops events a crashed run wrote past
    the checkpoint it resumes from."""

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
