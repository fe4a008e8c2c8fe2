"""Evaluating a latent-space DiT: the run's autoencoder between the pixel splits and the model.

Every evaluation reads pixel videos (the splits, the physics ground truth) and scores pixel
videos; a latent-space run (recipe ``autoencoder: <VAE folder>``) is evaluated through its VAE:

* predictions: the given first ``context_frames`` pixel frames are laid out in a full-length
  pixel video and encoded once (``sparse_dit.context_layout``, as the pipeline's modes do), the
  sampler fills the latent frames whose groups are not wholly given, and the result is decoded;
* held-out loss: the split's videos are encoded and the flow-matching loss is measured on the
  latents, the latent frames wholly covered by the given pixel frames left out (the loss is then
  in latent units: comparable between runs with the same VAE only);
* cost: the VAE's encode (of the given frames' layout) and decode MACs per video, reported apart
  from the DiT's (``vae_encode_gmacs``, ``vae_decode_gmacs``).

The identity autoencoder leaves all of this as it was (pixel space).

# N = videos, C = channels, T = pixel frames, t = latent frames
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional

import torch
from torch import nn

from sparse_dit.context_layout import frame_groups, place_clips
from sparse_dit.diffusion import sample
from sparse_dit.vae import IdentityVAE, vae_macs

__all__ = ["is_latent", "held_latent_frames", "encode_videos_batched", "predict_through", "autoencoder_cost"]


def is_latent(vae: Optional[nn.Module]) -> bool:
    """True for a compressing autoencoder (not None, not the identity)."""
    return vae is not None and not isinstance(vae, IdentityVAE)


def held_latent_frames(vae: nn.Module, frames: int, context_frames: int) -> int:
    """Latent frames wholly covered by the first ``context_frames`` of a ``frames``-frame video."""
    groups = frame_groups(frames, vae.temporal_compression)
    return sum(1 for g in groups if g.stop <= context_frames)


@torch.no_grad()
def encode_videos_batched(vae: nn.Module, videos: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Latents (N, c, t, h, w) of pixel videos (N, C, T, H, W), ``batch_size`` at a time."""
    dev = next(vae.parameters()).device
    return torch.cat([vae.encode(videos[s:s + batch_size].to(dev, torch.float32)).cpu() for s in range(0, len(videos), batch_size)])


@torch.no_grad()
def predict_through(model: nn.Module, vae: nn.Module, videos: torch.Tensor, context_frames: int, *, num_inference_steps: int,
                    sampler: str, shift: float, seed: int, batch_size: int, autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Continue pixel ``videos`` (N, C, T, H, W) from their first ``context_frames`` frames in latent
    space; returns decoded float videos (N, C, T, H, W) in [-1, 1] on the CPU.

    The initial noise is one latent tensor for the whole split drawn from ``seed`` (the same for
    every run with this VAE and any batch size).
    """
    N, _, T = videos.shape[:3]
    ft = vae.temporal_compression
    device = next(model.parameters()).device
    outs, noise = [], None
    for s in range(0, N, batch_size):
        xb = videos[s:s + batch_size].to(device, torch.float32)
        lay = place_clips([xb[:, :, :context_frames], T - context_frames], vae.encode, ft)
        if lay.partial and s == 0:
            warnings.warn(f"context_frames={context_frames} does not cover whole latent groups of the autoencoder (temporal compression "
                          f"{ft}): given frames {list(lay.partial)} are generated, not held; use 1 + {ft}k context frames", stacklevel=2)
        if noise is None:
            noise = torch.randn((N, *lay.context.shape[1:]), generator=torch.Generator().manual_seed(seed))
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            z = sample(model, tuple(lay.context.shape), {}, num_inference_steps=num_inference_steps, sampler=sampler, shift=shift,
                       latents=noise[s:s + xb.shape[0]], context=lay.context, context_mask=lay.mask, device=device)
        outs.append(vae.decode(z.float()).clamp(-1, 1).cpu())
    return torch.cat(outs)


def autoencoder_cost(vae: nn.Module, frames: int, height: int, width: int, decode_repeats: int = 0) -> dict[str, Any]:
    """The VAE's share of generating one (frames, height, width) video, apart from the DiT's:
    encode MACs of the (full-length) context layout, decode MACs of the result, its parameters,
    and, with ``decode_repeats`` > 0, the median wall time of one decode in ms."""
    m = vae_macs(vae.config, frames, height, width)
    out: dict[str, Any] = {"vae_params": m["params"], "vae_encode_gmacs": m["encode"] / 1e9, "vae_decode_gmacs": m["decode"] / 1e9}
    if decode_repeats > 0:
        dev = next(vae.parameters()).device
        z = torch.zeros((1, *vae.latent_shape(frames, height, width)), device=dev)
        times = []
        with torch.no_grad():
            vae.decode(z)  # warm-up
            for _ in range(decode_repeats):
                t0 = time.perf_counter()
                vae.decode(z)
                times.append((time.perf_counter() - t0) * 1e3)
        out["vae_decode_ms"] = sorted(times)[len(times) // 2]
    return out
