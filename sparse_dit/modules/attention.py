"""Attention: 3D rotary positions, QK RMS-norm, full spacetime self-attention, cross-attention.

# B = batch, N = video tokens, L = text tokens, H = heads, Dh = head dim, D = model dim
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["RotaryEmbedding3D", "apply_rotary", "SelfAttention", "CrossAttention", "rope_axis_dims"]


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split an even head dim over the (t, h, w) axes; each part even.

    h and w get ``2 * (head_dim // 6)`` each and time the rest, so time gets at least a third
    (e.g. 64 -> (24, 20, 20), 32 -> (12, 10, 10)); time is the axis the world model extrapolates.
    """
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"rotary positions need an even head_dim >= 6, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


class RotaryEmbedding3D(nn.Module):
    """Rotary position embedding (Su et al. 2021) factorised over time, height and width.

    The head dim is split into three bands (:func:`rope_axis_dims`); each band rotates by the
    token's coordinate along its own axis, so ``q_i . k_j`` depends only on the offset
    ``p_i - p_j``: the model has no fixed grid and any (t, h, w) works, including sizes never
    seen in training.

    Args:
        head_dim: Dh (even).
        theta: base period (10000 as in RoFormer).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.axis_dims = rope_axis_dims(head_dim)

    def frequencies(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3) float positions (t, h, w) -> cos, sin of shape (N, Dh/2), float32."""
        angles = []
        for axis, d in enumerate(self.axis_dims):
            inv = 1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d)
            angles.append(positions[:, axis, None].float() * inv[None])  # (N, d/2)
        ang = torch.cat(angles, dim=1)  # (N, Dh/2)
        return ang.cos(), ang.sin()

    @staticmethod
    def grid_positions(grid: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
        """Integer (t, h, w) coordinates of a token grid in (t h w) order -> (N, 3)."""
        axes = [torch.arange(n, device=device) for n in grid]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    def forward(self, grid: tuple[int, int, int], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.frequencies(self.grid_positions(grid, device))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``x`` (B, H, N, Dh) by the given angles (N, Dh/2).

    Computed in float32 and cast back, so bf16 activations keep exact positions.
    """
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, N, Dh/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class SelfAttention(nn.Module):
    """Full spacetime multi-head self-attention over all tokens of a video.

    Args:
        dim: model width D.
        num_heads: H.
        qkv_bias: bias on the fused qkv projection (DiT/timm: True).
        qk_norm: RMS-normalise q and k per head before the rotation (SD3, Wan).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, H, N, Dh)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens (no positions on either side), with a key mask.

    Args:
        dim: model width D (text tokens are already projected to D).
        num_heads: H.
        qk_norm: RMS-normalise q and k per head.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = self.q_norm(rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads))  # (B, H, N, Dh)
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)
        k = self.k_norm(k)  # (B, H, L, Dh)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L), True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, D)
