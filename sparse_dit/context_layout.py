"""Context frames under a causal video VAE: given pixel clips placed in a full-length pixel video.

A causal VAE with temporal compression ``ft`` groups the frames of a ``1 + k * ft`` frame video
as ``[0], [1..ft], [ft+1..2ft], ...``: latent frame 0 is an image-style encoding of frame 0
alone, latent frame j >= 1 encodes the ``ft`` frames of group j (and depends on every earlier
frame: the convolutions pad time on the left only). A clip encoded *on its own* therefore puts
its own image-style latent first; laid into the middle of a latent sequence that latent is
decoded as a group of ``ft`` frames and the given clip does not come back (issue 12: max pixel
error 1.7 for backward extension, interpolation and loops).

The fix used by every generation mode (:mod:`sparse_dit.pipeline`): the given clips and the
gaps are laid out **in pixel frames** into one full-length video (free frames filled with the
nearest given frame, so the causal encoder sees a plausible, static past), the whole video is
encoded once, and a latent frame is held as context only when **every pixel frame of its group
is given**. A given pixel frame whose group also holds free frames (a *partially covered
group*) cannot be held without freezing the free frames of the group with it, so its group is
generated (the given frame only guides its neighbours) and it is reported in
:attr:`PixelLayout.partial` (the pipeline warns, naming the frames). A clip comes back whole
(within the VAE's reconstruction error) when it covers whole groups: at the start of the video,
``1 + a * ft`` frames; elsewhere, a start at ``1 + j * ft`` and ``a * ft`` frames, or running
to the last frame. With the identity VAE (``ft = 1``) every frame is its own group and all of
this reduces to placing the clips.

# B = batch, C = channels, T = pixel frames, t = latent frames
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["PixelLayout", "frame_groups", "place_clips", "fitting_lengths"]


def frame_groups(frames: int, temporal_compression: int) -> list[range]:
    """The pixel frames each latent frame of a ``frames``-frame video covers.

    Args:
        frames: T (``1 + k * ft`` for ``ft > 1``).
        temporal_compression: ft (1 = every frame its own latent frame).
    """
    ft = temporal_compression
    if ft == 1:
        return [range(i, i + 1) for i in range(frames)]
    if frames < 1 or (frames - 1) % ft:
        raise ValueError(f"{frames} frames do not fit a causal VAE with temporal compression {ft}; it needs 1 + {ft}k frames")
    return [range(0, 1)] + [range(1 + (j - 1) * ft, 1 + j * ft) for j in range(1, 1 + (frames - 1) // ft)]


def fitting_lengths(frames: int, temporal_compression: int) -> tuple[int, int]:
    """The nearest valid video lengths (``1 + k * ft``) at or below and above ``frames``."""
    ft = temporal_compression
    below = frames - (frames - 1) % ft if frames >= 1 else 1
    return max(1, below), below + ft if below < frames else below


@dataclass(frozen=True)
class PixelLayout:
    """Given clips placed in a full-length video, and the latent context that follows from it.

    Args:
        video: (B, C, T, H, W) pixels: the given frames in place, free frames filled with the
            nearest given frame.
        given: (T,) bool, True for a given pixel frame.
        context: (B, c, t, h, w) the encoding of ``video``.
        mask: (B, t) bool, True for a latent frame whose whole group is given (held clean).
        partial: given pixel frames whose group also holds free frames (generated, not held).
    """

    video: torch.Tensor
    given: torch.Tensor
    context: torch.Tensor
    mask: torch.Tensor
    partial: tuple[int, ...]


def place_clips(parts: Sequence[torch.Tensor | int], encode: Callable[[torch.Tensor], torch.Tensor],
                temporal_compression: int) -> PixelLayout:
    """Lay out given pixel clips and free gaps along time, encode the whole, mark the context.

    Args:
        parts: (B, C, T_i, H, W) pixel clips and ints (free pixel frames), in time order.
        encode: pixel video (B, C, T, H, W) -> latents (B, c, t, h, w) (the VAE's ``encode``).
        temporal_compression: the VAE's ft.

    Raises:
        ValueError: clips of different (B, C, H, W), a negative gap, no clip at all, or a total
            length the VAE cannot encode.
    """
    clips = [p for p in parts if isinstance(p, torch.Tensor)]
    if not clips:
        raise ValueError("a context layout needs at least one given clip")
    ref = clips[0]
    B, C, _, H, W = ref.shape
    pieces, flags = [], []
    for p in parts:
        if isinstance(p, int):
            if p < 0:
                raise ValueError(f"a gap of {p} frames is not allowed; use >= 0")
            pieces.append(ref.new_zeros(B, C, p, H, W))
            flags += [False] * p
        else:
            if p.shape[0] != B or p.shape[1] != C or p.shape[3:] != (H, W):
                raise ValueError(f"prompt clips must share (B, C, H, W); got {tuple(p.shape)} vs {tuple(ref.shape)}")
            pieces.append(p)
            flags += [True] * p.shape[2]
    video = torch.cat(pieces, dim=2)
    given = torch.tensor(flags, dtype=torch.bool)
    T = len(flags)
    # Fill every free frame with the nearest given frame (ties: the earlier one).
    idx = torch.nonzero(given).flatten()
    nearest = idx[(torch.arange(T)[:, None] - idx[None, :]).abs().argmin(dim=1)]
    video = video.index_select(2, nearest.to(video.device))
    groups = frame_groups(T, temporal_compression)  # raises for a length the VAE cannot encode
    held = [bool(given[g.start:g.stop].all()) for g in groups]
    partial = tuple(i for g, h in zip(groups, held) if not h for i in g if given[i])
    context = encode(video)
    if context.shape[2] != len(groups):
        raise ValueError(f"the encoder gave {context.shape[2]} latent frames for {T} pixel frames; expected {len(groups)}")
    mask = torch.tensor(held, device=context.device).expand(B, -1).clone()
    return PixelLayout(video, given, context, mask, partial)
