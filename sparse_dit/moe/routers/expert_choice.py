"""Expert choice (Zhou et al. 2022): each expert takes the tokens that score it highest.

# B = batch, N = tokens per sample, T = B*N, E = experts, C = capacity per sample

Routing groups are samples: each expert takes the same number C of tokens of every sample, so a
sample's output never depends on the rest of the batch (CFG doubling, batch size 1 at
inference) and C follows the sample's token count N (docs/moe.md, "expert choice").
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from sparse_dit.moe.routers.base import RouterBase, Routing

__all__ = ["ExpertChoiceRouter", "expert_choice_capacity"]


def expert_choice_capacity(tokens_per_sample: int, num_experts: int, top_k: int, capacity_factor: Optional[float]) -> int:
    """Tokens each expert takes per sample under expert choice: ``ceil(N * k * cf / E)``, at most N.

    Expert Choice (Zhou et al. 2022) sets capacity ``n * c / E`` for an average of ``c`` experts
    per token; here ``c = top_k * capacity_factor`` (``capacity_factor`` None counts as 1).
    """
    cf = 1.0 if capacity_factor is None else capacity_factor
    return max(1, min(tokens_per_sample, math.ceil(tokens_per_sample * top_k * cf / num_experts)))


class ExpertChoiceRouter(RouterBase):
    """Each expert takes its ``C = ceil(N * top_k * cf / E)`` best tokens of each sample.

    Routes are expert-major, (E*B*C, 1) with an explicit ``token_idx``. Every expert gets
    exactly its capacity, so there is no balance loss and no bias balancing; a token may be
    taken by several experts or by none (``num_dropped`` counts tokens no expert chose).
    ``top_k`` is the average number of experts per token and may exceed E; ``renormalize`` is
    not used. Other arguments: :class:`RouterBase`.
    """

    kind = "expert_choice"
    no_bias_balancing_reason = "expert choice is balanced by construction"

    def route(self, scores: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, B: int, N: int) -> Routing:
        E = self.num_experts
        C = expert_choice_capacity(N, E, self.top_k, self.capacity_factor)
        s_BEN = scores.view(B, N, E).transpose(1, 2)  # (B, E, N)
        weight_BEC, tok_BEC = torch.topk(s_BEN, C, dim=-1)  # (B, E, C)
        tok_BEC = tok_BEC + (torch.arange(B, device=tok_BEC.device) * N)[:, None, None]  # global token
        token_idx = tok_BEC.transpose(0, 1).reshape(-1, 1)  # (E*B*C, 1), expert-major
        weight = weight_BEC.transpose(0, 1).reshape(-1, 1)
        expert_idx = torch.arange(E, device=scores.device).repeat_interleave(B * C).view(-1, 1)
        counts = torch.full((E,), float(B * C), device=scores.device)
        chosen = torch.zeros(B * N, dtype=torch.bool, device=scores.device)
        chosen[token_idx.view(-1)] = True
        num_dropped = (~chosen).sum().float()
        return Routing(expert_idx, weight, token_idx, logits, probs, counts, num_dropped, B * N, False)

    def balance_loss(self, r: Routing) -> torch.Tensor:
        """Zero: every expert takes exactly its capacity."""
        return r.probs.new_zeros(())
