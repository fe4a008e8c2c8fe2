"""Held-out flow-matching loss on a fixed grid of timesteps with fixed noise.

The training loss is a noisy estimate (random t, random noise per step), so two models are
compared on exactly the same problems instead: every validation video is noised at each t of a
fixed grid with noise drawn from a generator seeded by (seed, t index, video index). The noise
of a video therefore does not depend on the batch size, on the other videos or on the model,
and two runs evaluated with the same seed see bit-identical inputs. Open-Sora (Zheng et al.
2024) reports that this held-out loss tracks sample quality over training.

The grid is the midpoints ``t_j = (j + 1/2) / n`` of n equal bins of [0, 1]: the ends t = 0
(the clean video, a trivial problem) and t = 1 (pure noise) are left out, and the mean over the
grid is a midpoint-rule estimate of the uniform-t expected loss.

With ``context_frames = C > 0`` the first C frames are given clean (the world-model task:
predict the future from the past) and only the other frames count, exactly as in training
(:meth:`sparse_dit.diffusion.FlowMatching.training_losses`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from sparse_dit.diffusion import FlowMatching

__all__ = ["timestep_grid", "fixed_noise", "heldout_loss"]


def timestep_grid(num_t: int = 10) -> torch.Tensor:
    """The midpoints ``(j + 0.5) / num_t`` of ``num_t`` equal bins of [0, 1], ascending.

    Args:
        num_t: number of timesteps (>= 1).
    """
    if not isinstance(num_t, int) or isinstance(num_t, bool) or num_t < 1:
        raise ValueError(f"num_t={num_t!r} must be an int >= 1")
    return (torch.arange(num_t, dtype=torch.float64) + 0.5).div(num_t).float()


def fixed_noise(shape: Sequence[int], seed: int, t_index: int, video_index: int) -> torch.Tensor:
    """Standard normal noise of ``shape`` for one (t index, video), reproducible on any machine.

    Args:
        shape: (C, T, H, W) of one video.
        seed: the evaluation seed.
        t_index: index into the timestep grid.
        video_index: index of the video in the validation set.
    """
    # A distinct 63-bit seed per (seed, t, video): large odd multipliers keep them apart.
    key = (int(seed) * 1_000_003 + int(t_index)) * 2_147_483_629 + int(video_index)
    g = torch.Generator().manual_seed(key % (2**63 - 1))
    return torch.randn(tuple(shape), generator=g)


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    videos: torch.Tensor,
    *,
    context_frames: int = 3,
    num_t: int = 10,
    seed: int = 0,
    batch_size: int = 16,
    model_kwargs: dict[str, Any] | None = None,
    objective: FlowMatching | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Flow-matching MSE of ``model`` on ``videos`` at a fixed t grid with fixed noise.

    Args:
        model: a :class:`~sparse_dit.dit.SparseDiT` (put in eval mode here; restored after).
        videos: (N, C, T, H, W) clean validation latents in the model's convention.
        context_frames: C first frames given clean and left out of the loss (0 = generation).
        num_t: size of the timestep grid (see :func:`timestep_grid`).
        seed: seeds the noise (same seed = same problems for every model).
        batch_size: videos per forward pass (does not change the result).
        model_kwargs: conditioning for every video, e.g. ``{"text_emb": ..., "text_mask": ...}``
            with a leading dim N (sliced per batch) or broadcastable values.
        objective: the flow-matching objective (default: ``FlowMatching()``; only its noising
            and loss are used, never its timestep sampling).
        autocast_dtype: run the model under ``torch.autocast`` with this dtype (e.g. bfloat16).

    Returns:
        ``{"loss": mean over the grid, "per_t": [loss at each t], "t": [grid], "per_video": [each
        video's mean over the grid] (their mean is ``loss``; what intervals over videos resample),
        "num_videos": N, "context_frames": C, "seed": seed}``.
    """
    if not isinstance(videos, torch.Tensor) or videos.ndim != 5:
        raise ValueError(f"videos must be a (N, C, T, H, W) tensor; got {getattr(videos, 'shape', type(videos))}")
    N, _, T = videos.shape[:3]
    if N < 1:
        raise ValueError("videos is empty; heldout_loss needs at least one video")
    if not 0 <= context_frames < T:
        raise ValueError(f"context_frames={context_frames} must lie in [0, T={T}) (at least one frame to predict)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    objective = objective or FlowMatching()
    model_kwargs = dict(model_kwargs or {})
    grid = timestep_grid(num_t)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_t: list[float] = []
    per_video = torch.zeros(N, len(grid), dtype=torch.float64)  # (N, num_t): for intervals over videos
    try:
        for j, t_value in enumerate(grid.tolist()):
            total = 0.0
            for start in range(0, N, batch_size):
                stop = min(N, start + batch_size)
                x0 = videos[start:stop].to(device=device, dtype=torch.float32)
                B = x0.shape[0]
                noise = torch.stack([fixed_noise(x0.shape[1:], seed, j, i) for i in range(start, stop)]).to(device)
                t = torch.full((B,), t_value, device=device)
                ctx = None
                if context_frames:
                    ctx = torch.zeros(B, T, dtype=torch.bool, device=device)
                    ctx[:, :context_frames] = True
                kw = {k: (v[start:stop] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == N else v)
                      for k, v in model_kwargs.items()}
                with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                    out = objective.training_losses(model, x0, kw, context_mask=ctx, t=t, noise=noise)
                mse = out["mse_per_sample"].double().cpu()
                per_video[start:stop, j] = mse
                total += float(mse.sum())
            per_t.append(total / N)
    finally:
        model.train(was_training)
    return {
        "loss": sum(per_t) / len(per_t),
        "per_t": per_t,
        "t": grid.tolist(),
        "per_video": per_video.mean(dim=1).tolist(),
        "num_videos": int(N),
        "context_frames": int(context_frames),
        "seed": int(seed),
    }
