"""Embeddings: spacetime patches, timesteps, class labels, text, fixed sin-cos positions.

# B = batch, C = latent channels, D = model dim, N = tokens, L = text tokens, Dt = text dim
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "PatchEmbed3D",
    "TimestepEmbedder",
    "LabelEmbedder",
    "TextEmbedder",
    "timestep_embedding",
    "sincos_1d",
    "sincos_pos_embed",
]


class PatchEmbed3D(nn.Module):
    """Cut a latent video into (pt, ph, pw) spacetime patches and project each to D.

    A Conv3d with kernel = stride = patch size; with pt = 1 and T = 1 it is exactly DiT's
    Conv2d patch embedding.

    Args:
        in_channels: latent channels C.
        dim: model width D.
        patch_size: (pt, ph, pw).
    """

    def __init__(self, in_channels: int, dim: int, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def grid(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Token grid (t, h, w) for a latent of shape (T, H, W); raises if not divisible."""
        out = []
        for axis, size, p in zip("THW", shape, self.patch_size):
            if size % p:
                raise ValueError(
                    f"latent {axis}={size} is not divisible by the patch size {p} along {axis} "
                    f"(patch_size={list(self.patch_size)}); allowed: multiples of {p}"
                )
            out.append(size // p)
        return tuple(out)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grid(tuple(x.shape[2:]))
        x = self.proj(x)  # (B, D, t, h, w)
        return rearrange(x, "b d t h w -> b (t h w) d")  # (B, N, D), N = t*h*w


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos half first as in DiT.

    Args:
        t: (B,) timesteps; the DiT blocks get ``1000 * t`` so that t in [0, 1] spans the same
            frequencies as DiT's integer timesteps.
        dim: even embedding width.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal(1000 t) -> Linear -> SiLU -> Linear, as in DiT.

    Args:
        dim: model width D.
        freq_dim: sinusoidal width (DiT: 256).
    """

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(1000.0 * t, self.freq_dim)  # (B, F)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels -> D, with one extra "null" class (index ``num_classes``) for CFG.

    Args:
        num_classes: real classes; labels must lie in [0, num_classes], where num_classes is null.
        dim: model width D.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"class_labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(
                f"class_labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class); "
                f"got min {int(labels.min())}, max {int(labels.max())}"
            )
        return self.embedding_table(labels)  # (B, D)


class TextEmbedder(nn.Module):
    """Project text-encoder outputs for cross-attention (tokens) and adaLN (pooled).

    Tokens go through a GELU-tanh MLP Dt -> D -> D (PixArt-alpha's caption projection); the
    pooled vector through Linear -> SiLU -> Linear into the adaLN conditioning. A learned null
    token ``null_embedding`` (1, Dt) replaces the caption of samples whose text is dropped,
    for classifier-free guidance.

    Args:
        text_dim: width Dt of the text encoder's embeddings.
        dim: model width D.
        tokens: build the token projection (only needed with cross-attention).
    """

    def __init__(self, text_dim: int, dim: int, tokens: bool = True) -> None:
        super().__init__()
        self.text_dim = text_dim
        self.null_embedding = nn.Parameter(torch.randn(1, text_dim) / math.sqrt(text_dim))
        self.pooled = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.tokens = (
            nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)) if tokens else None
        )

    def forward(
        self,
        text_emb: torch.Tensor,
        text_mask: torch.Tensor | None,
        drop: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Return (tokens (B, L, D) or None, mask (B, L) bool, pooled (B, D)).

        Args:
            text_emb: (B, L, Dt) token embeddings.
            text_mask: (B, L) bool, True for real tokens; None = all real.
            drop: (B,) bool, True where the caption is replaced by the null embedding.
        """
        if text_emb.ndim != 3 or text_emb.shape[-1] != self.text_dim:
            raise ValueError(f"text_emb must have shape (B, L, {self.text_dim}), got {tuple(text_emb.shape)}")
        B, L, _ = text_emb.shape
        mask = torch.ones(B, L, dtype=torch.bool, device=text_emb.device) if text_mask is None else text_mask.bool()
        if mask.shape != (B, L):
            raise ValueError(f"text_mask must have shape {(B, L)}, got {tuple(mask.shape)}")
        null = self.null_embedding.to(text_emb.dtype)
        if drop is not None:
            drop = drop.bool().view(B, 1)
            text_emb = torch.where(drop[..., None], null.expand(B, L, -1), text_emb)
            first = torch.zeros(B, L, dtype=torch.bool, device=mask.device)
            first[:, 0] = True
            mask = torch.where(drop, first, mask)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("text_mask has a row with no True entry: every caption needs at least one token")
        m = mask[..., None].to(text_emb.dtype)
        pooled = (text_emb * m).sum(1) / m.sum(1)  # (B, Dt), mean over real tokens
        tokens = self.tokens(text_emb) if self.tokens is not None else None  # (B, L, D)
        return tokens, mask, self.pooled(pooled)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """ViT/MAE 1D sin-cos embedding: (N,) positions -> (N, dim), sin half then cos half."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_pos_embed(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed positions for a (t, h, w) token grid -> (t*h*w, dim), tokens in (t h w) order.

    The spatial part is exactly DiT's 2D sin-cos (facebookresearch/DiT ``get_2d_sincos_pos_embed``):
    its grid is ``np.meshgrid(grid_w, grid_h)``, so the first half of the channels encodes the
    column (w) and the second half the row (h); an official DiT checkpoint's ``pos_embed`` equals
    this at t = 1. For video, a 1D sin-cos of the frame index is added, minus its value at frame 0,
    so the first frame (and every image, t = 1) carries DiT's positions unchanged.
    """
    t, h, w = grid
    gt, gh, gw = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    spatial = torch.cat([sincos_1d(gw.flatten(), dim // 2), sincos_1d(gh.flatten(), dim // 2)], dim=1)
    if t == 1:
        return spatial  # (N, dim): DiT's layout exactly
    temporal = sincos_1d(gt.flatten(), dim) - sincos_1d(torch.zeros(1), dim)  # zero at frame 0
    return spatial + temporal  # (N, dim)
