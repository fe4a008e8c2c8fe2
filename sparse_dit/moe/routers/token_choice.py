"""Token choice: each token takes its top-k experts (Switch, Mixtral, DeepSeek-V3).

# T = tokens, E = experts, K = top-k

Optional capacity dropping keeps at most ``ceil(cf * T * K / E)`` routes per expert: first
choices before second choices, then by score (V-MoE priority); optional DeepSeek-V3 bias
steers the selection only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from sparse_dit.moe.routers.base import RouterBase, Routing
from sparse_dit.moe.stats import balance_loss, count_indices

__all__ = ["TokenChoiceRouter", "capacity_drop"]


def capacity_drop(
    expert_idx_TK: torch.Tensor, priority_TK: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` routes per expert: every first choice before any second choice,
    then the highest priority within a choice rank.

    V-MoE's rule (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts",
    routing with expert capacity): the experts are filled choice rank by choice rank, so a
    token's k-th choice only takes a slot that no token's earlier choice wanted, and within
    one rank routes with higher router scores go first (rather than the last tokens in
    sequence order, which for a video has no meaning). A second choice can never evict
    another token's first choice. Ties go to the earlier token (stable sorts).

    Args:
        expert_idx_TK: (T, K) int64 chosen experts; column k is each token's (k+1)-th choice.
        priority_TK: (T, K) router scores of those choices (higher = kept first within a column).
        num_experts: E; dropped routes get the sentinel ``E``.
        capacity: routes each expert keeps.

    Returns:
        (new expert_idx_TK with dropped routes set to E, (T, K) bool keep mask).
    """
    T, K = expert_idx_TK.shape
    e = expert_idx_TK.reshape(-1)  # token-major: route r = t * K + k
    choice = torch.arange(K, device=e.device).repeat(T)  # (R,) choice rank of each route
    # Lexicographic order (expert, choice rank, -priority) by stable sorts, least significant first.
    order = torch.argsort(priority_TK.reshape(-1), descending=True, stable=True)  # (R,)
    order = order.index_select(0, torch.argsort(choice.index_select(0, order), stable=True))
    order = order.index_select(0, torch.argsort(e.index_select(0, order), stable=True))
    counts = count_indices(e, num_experts)
    starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted position of each expert
    e_sorted = e.index_select(0, order)
    rank = torch.arange(e.numel(), device=e.device) - starts.index_select(0, e_sorted)  # place within expert
    keep = torch.empty_like(e, dtype=torch.bool)
    keep[order] = rank < capacity
    keep = keep.view_as(expert_idx_TK)
    return torch.where(keep, expert_idx_TK, torch.full_like(expert_idx_TK, num_experts)), keep


class TokenChoiceRouter(RouterBase):
    """Each token takes its ``top_k`` highest-scoring experts; token-major (T, K) routes.

    ``renormalize`` is ignored for ``top_k == 1``: the weight would be identically 1 and the
    router would learn from the auxiliary losses only (Switch Transformer keeps the raw
    probability for top-1). ``capacity_factor=None`` is dropless; a float keeps at most
    ``ceil(cf * T * K / E)`` routes per expert, first choices before second choices, then by
    score (:func:`capacity_drop`). Trains with the Switch
    balance loss; supports DeepSeek-V3 bias balancing. Other arguments: :class:`RouterBase`.
    """

    kind = "token_choice"
    supports_bias_balancing = True
    switch_balance_loss = True

    def __init__(self, dim: int, num_experts: int, top_k: int, **kwargs) -> None:
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is out of range; allowed: 1..num_experts ({num_experts})")
        super().__init__(dim, num_experts, top_k, **kwargs)

    def route(self, scores: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, B: int, N: int) -> Routing:
        T, E = scores.shape
        K = self.top_k
        if self.bias_balancing:
            # The bias steers selection only; the weights stay the unbiased scores (DeepSeek-V3).
            _, idx = torch.topk(scores + self.expert_bias, K, dim=-1)  # (T, K)
            weight = scores.gather(1, idx)
        else:
            weight, idx = torch.topk(scores, K, dim=-1)  # (T, K)
        priority = weight
        if self.renormalize and K > 1:
            weight = weight / weight.sum(-1, keepdim=True).clamp_min(1e-9)
        counts = count_indices(idx, E).float()  # (E,)
        if self.bias_balancing and self.training:
            self.balance_counts.add_(counts)
        if self.capacity_factor is None:
            return Routing(idx, weight, None, logits, probs, counts, counts.new_zeros(()), T * K, False)
        capacity = max(1, math.ceil(self.capacity_factor * T * K / E))
        idx, keep = capacity_drop(idx, priority.detach(), E, capacity)
        num_dropped = (~keep).sum().float()
        return Routing(idx, weight, None, logits, probs, counts, num_dropped, T * K, True)

    def balance_loss(self, r: Routing) -> torch.Tensor:
        """Switch load-balancing loss over the chosen routes (before capacity dropping)."""
        return balance_loss(r.probs, r.counts, self.top_k)
