"""TensorBoard helpers: per-layer routing statistics and animated GIF "videos".

``SummaryWriter.add_video`` needs moviepy and, on these machines, writes nothing without it
(shared/PITFALLS.md). TensorBoard's image dashboard plays animated GIFs, which is all
``add_video`` produces anyway, so :func:`add_gif` encodes the GIF itself and writes a plain
image summary.

TensorBoard's histograms re-bin integer counts onto a float axis and a per-expert load summed
over layers hides a collapse in one layer (shared/PITFALLS.md): :func:`add_routing` logs every
MoE layer separately, as scalars, as one exact-bucket histogram per layer and as heat-map images.
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

from sparse_dit.moe.routing_stats import StepRouting, relative_load

__all__ = ["gif_bytes", "add_gif", "add_expert_histogram", "heatmap_image", "add_routing", "open_writer"]


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
        tokens_per_expert: (E,) counts of one layer (summing layers hides a collapse in one).
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


# viridis at 0, 0.25, 0.5, 0.75, 1 (matplotlib's values): a heat map without importing matplotlib.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def heatmap_image(values: np.ndarray | torch.Tensor, vmax: float = 2.0, cell: int = 12, gap: int = 1) -> np.ndarray:
    """A uint8 (H, W, 3) heat map of a 2-D array: one ``cell x cell`` square per entry, viridis
    from 0 (dark purple) to ``vmax`` and above (yellow), ``gap`` white pixels between cells.

    Args:
        values: (rows, cols) array, e.g. relative loads (1 = balanced).
        vmax: the value drawn brightest (fixed, so images of different steps compare).
        cell: pixels per entry.
        gap: white pixels between entries.
    """
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"values must be a non-empty 2-D array, got shape {v.shape}")
    if not vmax > 0:
        raise ValueError(f"vmax={vmax} must be > 0")
    x = np.clip(np.nan_to_num(v / vmax), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (x - lo)[..., None]
    rgb = (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).round().astype(np.uint8)  # (rows, cols, 3)
    R, C = v.shape
    out = np.full((R * (cell + gap) + gap, C * (cell + gap) + gap, 3), 255, dtype=np.uint8)
    for r in range(R):
        for c in range(C):
            y0, x0 = gap + r * (cell + gap), gap + c * (cell + gap)
            out[y0 : y0 + cell, x0 : x0 + cell] = rgb[r, c]
    return out


def add_routing(writer: Any, routing: StepRouting, step: int, prefix: str = "moe") -> None:
    """Per-layer routing of one training step (all micro-steps and ranks), layer by layer.

    Writes, for each MoE layer ``i`` (in model order):

    * scalars ``{prefix}/layer{i}/max_violation`` (``max load / mean load - 1`` of that layer's
      routes this step, over the global batch) and ``{prefix}/layer{i}/router_entropy`` (nats);
    * a histogram ``{prefix}/layer{i}/tokens_per_expert`` with one bucket per expert;

    and two images (:func:`heatmap_image`, colour = load / mean load, 0 dark to >= 2 yellow):

    * ``{prefix}/load_layer_x_expert``: a row per layer (top = first), a column per expert;
    * ``{prefix}/load_expert_x_timestep_bin``: one panel per layer, left to right, each with a
      row per expert and a column per timestep bin (low t = clean on the left), each column
      relative to that bin's mean (only when the forwards had timesteps).

    Args:
        writer: a ``SummaryWriter``.
        routing: :class:`~sparse_dit.moe.routing_stats.StepRouting` of the step.
        step: global step.
        prefix: tag prefix.
    """
    mv, ent = routing.max_violation.tolist(), routing.router_entropy.tolist()
    for i in range(routing.num_layers):
        writer.add_scalar(f"{prefix}/layer{i}/max_violation", mv[i], step)
        writer.add_scalar(f"{prefix}/layer{i}/router_entropy", ent[i], step)
        add_expert_histogram(writer, f"{prefix}/layer{i}/tokens_per_expert", routing.load[i], step)
    writer.add_image(f"{prefix}/load_layer_x_expert", heatmap_image(relative_load(routing.load)), step, dataformats="HWC")
    if routing.timestep_load is not None:
        rel = relative_load(routing.timestep_load).transpose(1, 2)  # (L, E, S), per bin
        panels = [heatmap_image(p) for p in rel]
        sep = np.full((panels[0].shape[0], 6, 3), 255, dtype=np.uint8)
        image = np.concatenate([x for p in panels for x in (p, sep)][:-1], axis=1)
        writer.add_image(f"{prefix}/load_expert_x_timestep_bin", image, step, dataformats="HWC")


def open_writer(log_dir: str | Path, purge_step: Optional[int] = None) -> Any:
    """A ``SummaryWriter`` on ``log_dir``; ``purge_step`` drops events a crashed run wrote past
    the checkpoint it resumes from."""

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
