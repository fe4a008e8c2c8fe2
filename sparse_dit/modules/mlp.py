"""Dense feed-forward networks: the GELU-tanh MLP of DiT/ViT and SwiGLU.

# T = tokens, D = model dim, F = ffn hidden
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeedForward", "ACTIVATIONS"]

ACTIVATIONS = ("gelu_tanh", "swiglu")


class FeedForward(nn.Module):
    """Position-wise FFN, the dense counterpart of :class:`sparse_dit.moe.MoEFeedForward`.

    Args:
        dim: model width D.
        hidden_dim: hidden width F.
        activation: ``"gelu_tanh"`` (``fc2(gelu_tanh(fc1 x))``, as DiT) or ``"swiglu"``
            (``w2(silu(w1 x) * w3 x)``, as LLaMA; three matrices, no biases).
        bias: biases on the linear layers (GELU only; SwiGLU is bias-free by convention).
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu_tanh", bias: bool = True) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; choose one of {list(ACTIVATIONS)}")
        if dim < 1 or hidden_dim < 1:
            raise ValueError(f"dim={dim} and hidden_dim={hidden_dim} must be positive")
        self.dim, self.hidden_dim, self.activation = dim, hidden_dim, activation
        if activation == "gelu_tanh":
            self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
            self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        else:
            self.w1 = nn.Linear(dim, hidden_dim, bias=False)
            self.w3 = nn.Linear(dim, hidden_dim, bias=False)
            self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu_tanh":
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # (..., D)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (..., D)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, activation={self.activation}"
