"""Noise-level experts (Wan2.2, 2025): one expert set per timestep range.

# B = batch, N = tokens per sample, T = B*N, E = experts, K = top-k, R = noise ranges

Boundaries ``b`` (timesteps, largest first) cut [0, 1] into R = len(b) + 1 ranges; range 0 is the
highest noise (``t >= b[0]``, Wan2.2's high-noise expert lays out the scene), range R-1 the lowest
(details). Range r owns experts ``[r * E/R, (r + 1) * E/R)`` and their gate columns; a sample's
tokens route top-k among its range's experts only (the other logits are replaced before the
softmax, so the other ranges' weights cannot change its output, not even through the
normalisation). With ``E = R`` and ``top_k = 1`` every token of a range runs that range's one
expert: Wan2.2's switch, applied to the FFN. The balance loss is Switch's within each range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from sparse_dit.moe.routers.base import RouterBase, Routing
from sparse_dit.moe.stats import count_indices

__all__ = ["NoiseLevelRouter", "NoiseRouting", "noise_range_of", "noise_range_interval", "freeze_outside_noise_range"]

# Logit of an expert outside the sample's range: exp() of it is exactly 0 in fp32 (softmax and
# sigmoid), its gradient is exactly 0, and z-loss/entropy stay finite (unlike -inf).
_MASKED = -1.0e4


def noise_range_of(t: torch.Tensor, boundaries: Sequence[float]) -> torch.Tensor:
    """(B,) int64 range of each timestep: the number of boundaries above it (``t == b`` goes to
    the noisier range, as Wan2.2's ``t >= boundary`` switch)."""
    if not boundaries:
        return torch.zeros(t.shape, dtype=torch.long, device=t.device)
    b = torch.tensor(list(boundaries), dtype=torch.float32, device=t.device)
    return (t.float()[:, None] < b[None, :]).sum(1)


def noise_range_interval(r: int, boundaries: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` of range ``r`` for boundaries sorted largest first: t in [lo, hi) (range 0:
    [b[0], 1])."""
    b = sorted(boundaries, reverse=True)
    if not 0 <= r <= len(b):
        raise ValueError(f"noise range {r} is out of range; allowed: 0..{len(b)} for boundaries {b}")
    hi = 1.0 if r == 0 else b[r - 1]
    lo = 0.0 if r == len(b) else b[r]
    return lo, hi


@dataclass(frozen=True)
class NoiseRouting(Routing):
    """:class:`Routing` plus the (T,) int64 noise range of each token."""

    range_idx: Optional[torch.Tensor] = None


class NoiseLevelRouter(RouterBase):
    """Token choice among the experts of the sample's timestep range (Wan2.2 noise-level experts).

    Args:
        boundaries: timesteps between ranges (any order); ``num_experts`` must be divisible by
            ``len(boundaries) + 1`` and ``top_k`` at most the experts of one range.
        Other arguments: :class:`RouterBase`. ``capacity_factor`` and bias balancing are not
        available; ``renormalize`` works as in token choice.
    """

    kind = "noise_level"
    no_bias_balancing_reason = "experts are balanced within each noise range by the balance loss"

    def __init__(self, dim: int, num_experts: int, top_k: int, *, boundaries: Sequence[float] = (), **kwargs) -> None:
        R = len(boundaries) + 1
        if not boundaries:
            raise ValueError("router='noise_level' needs at least one boundary (noise_boundaries)")
        if num_experts % R:
            raise ValueError(f"num_experts={num_experts} is not divisible by the {R} noise ranges")
        if top_k > num_experts // R:
            raise ValueError(f"top_k={top_k} is out of range; allowed: 1..{num_experts // R} (the experts of one range)")
        if kwargs.get("capacity_factor") is not None:
            raise ValueError(f"capacity_factor={kwargs['capacity_factor']} is not available with router='noise_level'; use None")
        super().__init__(dim, num_experts, top_k, **kwargs)
        self.boundaries = tuple(sorted((float(b) for b in boundaries), reverse=True))
        self.num_ranges = R
        self.experts_per_range = num_experts // R

    def extra_repr(self) -> str:
        return super().extra_repr() + f", boundaries={list(self.boundaries)}"

    def expert_range(self, device: torch.device | None = None) -> torch.Tensor:
        """(E,) int64 range that owns each expert."""
        return torch.arange(self.num_experts, device=device) // self.experts_per_range

    def mask_logits(self, logits_BNE: torch.Tensor, timesteps: Optional[torch.Tensor]) -> torch.Tensor:
        B = logits_BNE.shape[0]
        if timesteps is None:
            raise ValueError("router='noise_level' needs the timesteps of the samples (timesteps=None was passed)")
        if timesteps.shape != (B,):
            raise ValueError(f"timesteps must have shape ({B},), got {tuple(timesteps.shape)}")
        r_B = noise_range_of(timesteps, self.boundaries)  # (B,)
        allowed_BE = self.expert_range(logits_BNE.device)[None, :] == r_B[:, None]  # (B, E)
        return torch.where(allowed_BE[:, None, :], logits_BNE, logits_BNE.new_full((), _MASKED))

    def route(self, scores: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, B: int, N: int) -> Routing:
        T, E = scores.shape
        K = self.top_k
        allowed = logits != _MASKED  # (T, E): the token's range
        _, idx = torch.topk(scores.masked_fill(~allowed, -1.0), K, dim=-1)  # (T, K), scores >= 0
        weight = scores.gather(1, idx)
        if self.renormalize and K > 1:
            weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-9)
        counts = count_indices(idx, E).float()
        range_T = idx[:, 0] // self.experts_per_range
        return NoiseRouting(idx, weight, None, logits, probs, counts, counts.new_zeros(()), T * K, False, range_idx=range_T)

    def balance_loss(self, r: Routing) -> torch.Tensor:
        """Switch's loss within each range, weighted by the range's share of the tokens:
        ``sum_r (T_r / T) * E_r * sum_{e in r} f_e P_e`` with ``f_e`` the fraction of range r's
        routes on expert e and ``P_e`` the mean probability of e over range r's tokens (1.0 when
        every range is balanced)."""
        T = r.probs.shape[0]
        Er, K, R = self.experts_per_range, self.top_k, self.num_ranges
        range_T = r.range_idx if isinstance(r, NoiseRouting) and r.range_idx is not None else r.probs.new_zeros(T, dtype=torch.long)
        # Per-range token counts and probability sums as one-hot products: no host read (a
        # boolean selection or int(count) per range would sync the GPU every layer and step).
        idx = torch.arange(R, device=range_T.device)
        onehot = (range_T[:, None] == idx).float()  # (T, R); F.one_hot would check its indices on the host
        T_r = onehot.sum(0)  # (R,)
        P_sum = (onehot[:, :, None] * r.probs.float()[:, None, :]).sum(0)  # (R, E): each range's probability sums (no GEMM: not model MACs)
        P = P_sum.view(R, R, Er)[idx, idx] / T_r.clamp_min(1)[:, None]  # (R, Er): range r's own experts
        f = r.counts.detach().float().view(R, Er) / (T_r * K).clamp_min(1)[:, None]  # a range without tokens has f = 0
        return ((T_r / T) * Er * (f * P).sum(-1)).sum()


def freeze_outside_noise_range(model: nn.Module, train_shared: bool = False) -> int:
    """Prepare ``model`` for training one noise range alone: only the noise-level MoE layers'
    routers and experts keep ``requires_grad`` (all of the model with ``train_shared``).

    The other ranges' experts and gate columns live in the same stacked tensors; they get
    exactly zero gradients when every sampled t lies in the trained range (their logits are
    replaced, their experts see no token), so a fresh AdamW without weight decay leaves them
    bitwise unchanged. Returns the number of parameters (elements) left trainable.

    Raises:
        ValueError: when ``model`` has no noise-level MoE layer.
    """
    layers = [m for m in model.modules() if isinstance(getattr(m, "router", None), NoiseLevelRouter)]
    if not layers:
        raise ValueError("train.noise_range needs a model with router='noise_level' MoE layers; this model has none")
    if not train_shared:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in layers:
            for p in list(m.router.parameters()) + list(m.experts.parameters()):
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
