"""MoE routers, computed in fp32: token-choice top-k and expert choice.

# B = batch, N = tokens per sample, T = B*N tokens, D = model dim, E = experts, K = top-k,
# C = expert-choice capacity per sample

A router turns tokens into a route table (see :mod:`sparse_dit.moe.dispatch`) plus the fp32
logits and scores that the balancing losses and statistics need.

Timestep-aware routing: with ``cond_dim`` set, the router sees the concatenation of the token
and the conditioning vector (timestep + class/text embedding). A linear map of a concatenation
is a sum, ``logits = x W_x + c W_c``, and ``c W_c`` is computed once per sample (B x E), not
per token.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Routing", "Router", "capacity_drop", "expert_choice_capacity", "ROUTER_KINDS", "SCORE_FUNCS"]

ROUTER_KINDS = ("token_choice", "expert_choice")
SCORE_FUNCS = ("softmax", "sigmoid")


class Routing(NamedTuple):
    """A routing decision.

    Attributes:
        expert_idx: token choice: (T, K) int64 expert per route, ``E`` where capacity dropped it;
            expert choice: (E*B*C, 1) expert of each route.
        weight: same shape, fp32 combine weights.
        token_idx: ``None`` for token choice (row t is token t); expert choice: the token of
            each route, same shape as ``expert_idx``.
        logits: (T, E) fp32 router logits (before the balancing bias).
        probs: (T, E) fp32 scores normalised to sum to one per token (softmax, or sigmoid
            scores divided by their sum), used by the balance loss and the entropy.
        counts: (E,) fp32 routes per expert as the router chose them (before capacity dropping).
        num_dropped: fp32 scalar, dropped routes (token choice) or tokens no expert chose
            (expert choice).
        may_drop: whether ``expert_idx`` can hold the dropped sentinel.
    """

    expert_idx: torch.Tensor
    weight: torch.Tensor
    token_idx: Optional[torch.Tensor]
    logits: torch.Tensor
    probs: torch.Tensor
    counts: torch.Tensor
    num_dropped: torch.Tensor
    may_drop: bool


def expert_choice_capacity(tokens_per_sample: int, num_experts: int, top_k: int, capacity_factor: Optional[float]) -> int:
    """Tokens each expert takes per sample under expert choice: ``ceil(N * k * cf / E)``, at most N.

    Expert Choice (Zhou et al. 2022) sets capacity ``n * c / E`` for an average of ``c`` experts
    per token; here ``c = top_k * capacity_factor`` (``capacity_factor`` None counts as 1).
    """
    cf = 1.0 if capacity_factor is None else capacity_factor
    return max(1, min(tokens_per_sample, math.ceil(tokens_per_sample * top_k * cf / num_experts)))


def capacity_drop(
    expert_idx_TK: torch.Tensor, priority_TK: torch.Tensor, num_experts: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity`` routes per expert, the ones with the highest priority.

    Batch-prioritised routing (Riquelme et al. 2021, V-MoE): when an expert is over capacity it
    drops its lowest-scoring routes rather than the last tokens in sequence order, which for a
    video has no meaning. Ties go to the earlier route (stable sorts).

    Args:
        expert_idx_TK: (T, K) int64 chosen experts.
        priority_TK: (T, K) router scores of those choices (higher = kept first).
        num_experts: E; dropped routes get the sentinel ``E``.
        capacity: routes each expert keeps.

    Returns:
        (new expert_idx_TK with dropped routes set to E, (T, K) bool keep mask).
    """
    e = expert_idx_TK.reshape(-1)
    by_priority = torch.argsort(priority_TK.reshape(-1), descending=True, stable=True)  # (R,)
    regroup = torch.argsort(e.index_select(0, by_priority), stable=True)
    order = by_priority.index_select(0, regroup)  # routes grouped by expert, best first
    counts = torch.bincount(e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted position of each expert
    e_sorted = e.index_select(0, order)
    rank = torch.arange(e.numel(), device=e.device) - starts.index_select(0, e_sorted)  # rank within expert
    keep = torch.empty_like(e, dtype=torch.bool)
    keep[order] = rank < capacity
    keep = keep.view_as(expert_idx_TK)
    return torch.where(keep, expert_idx_TK, torch.full_like(expert_idx_TK, num_experts)), keep


class Router(nn.Module):
    """Linear router with softmax or sigmoid scores, token-choice top-k or expert choice.

    Args:
        dim: model width D (router input).
        num_experts: E.
        top_k: experts per token (token choice) or average experts per token (expert choice).
        kind: ``"token_choice"`` or ``"expert_choice"``.
        score_func: ``"softmax"`` or ``"sigmoid"`` (DeepSeek-V3).
        renormalize: rescale the top-k weights to sum to one. Ignored for ``top_k == 1``: the
            weight would be identically 1 and the router would learn from the auxiliary losses
            only (Switch Transformer keeps the raw probability for top-1).
        cond_dim: width of the conditioning vector for timestep-aware routing; ``None`` = off.
        capacity_factor: token choice: ``None`` = dropless, a float drops routes beyond
            ``ceil(cf * T * K / E)`` per expert; expert choice: scales each expert's capacity.
        bias_balancing: keep the DeepSeek-V3 selection bias (buffer ``expert_bias``) and count
            routes into ``balance_counts`` in training forwards.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        kind: str = "token_choice",
        score_func: str = "softmax",
        renormalize: bool = True,
        cond_dim: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        bias_balancing: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"router kind={kind!r} is not supported; choose one of {list(ROUTER_KINDS)}")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={score_func!r} is not supported; choose one of {list(SCORE_FUNCS)}")
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1")
        if top_k < 1 or (kind == "token_choice" and top_k > num_experts):
            raise ValueError(f"top_k={top_k} is out of range; allowed: 1..num_experts ({num_experts})")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0 (or None for dropless)")
        if bias_balancing and kind == "expert_choice":
            raise ValueError("bias balancing (bias_update_rate > 0) applies to token-choice routing only; expert choice is balanced by construction")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.kind, self.score_func, self.renormalize = kind, score_func, renormalize
        self.capacity_factor, self.bias_balancing = capacity_factor, bias_balancing
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.cond_proj = nn.Linear(cond_dim, num_experts, bias=False) if cond_dim else None
        # DeepSeek-V3 balancing bias: added to the scores for *selection* only; persistent so a
        # checkpoint reproduces the routing. Updated by sparse_dit.moe.update_balance_biases.
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)
        # Routes per expert accumulated over training forwards since the last bias update.
        self.register_buffer("balance_counts", torch.zeros(num_experts), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small normal gate (std 0.02, near-uniform routing at init); zero conditioning projection
        so that timestep-aware routing starts as plain routing."""
        nn.init.normal_(self.gate.weight, std=0.02)
        if self.cond_proj is not None:
            nn.init.zeros_(self.cond_proj.weight)

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, num_experts={self.num_experts}, top_k={self.top_k}, score_func={self.score_func}, "
            f"renormalize={self.renormalize}, capacity_factor={self.capacity_factor}, bias_balancing={self.bias_balancing}"
        )

    def forward(self, x_BND: torch.Tensor, cond: Optional[torch.Tensor] = None) -> Routing:
        """Route tokens.

        Args:
            x_BND: (B, N, D) tokens.
            cond: (B, cond_dim) conditioning vector; used only when ``cond_dim`` was set (then
                it is required).
        """
        B, N, D = x_BND.shape
        E = self.num_experts
        # fp32 router: bf16 logits flip top-k choices and make the z-loss noisy (ST-MoE, Sec. 3).
        logits = F.linear(x_BND.float(), self.gate.weight.float())  # (B, N, E)
        if self.cond_proj is not None:
            if cond is None:
                raise ValueError("timestep-aware routing is on (cond_dim set) but cond=None was passed")
            if cond.shape != (B, self.cond_proj.in_features):
                raise ValueError(f"cond must have shape ({B}, {self.cond_proj.in_features}), got {tuple(cond.shape)}")
            logits = logits + F.linear(cond.float(), self.cond_proj.weight.float())[:, None, :]  # (B, 1, E)
        logits = logits.reshape(B * N, E)  # (T, E)
        if self.score_func == "softmax":
            scores = torch.softmax(logits, dim=-1)  # (T, E)
            probs = scores
        else:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-9)
        if self.kind == "expert_choice":
            return self._expert_choice(scores, logits, probs, B, N)
        return self._token_choice(scores, logits, probs)

    def _token_choice(self, scores: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor) -> Routing:
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
        counts = torch.bincount(idx.reshape(-1), minlength=E).float()  # (E,)
        if self.bias_balancing and self.training:
            self.balance_counts.add_(counts)
        if self.capacity_factor is None:
            return Routing(idx, weight, None, logits, probs, counts, counts.new_zeros(()), False)
        capacity = max(1, math.ceil(self.capacity_factor * T * K / E))
        idx, keep = capacity_drop(idx, priority.detach(), E, capacity)
        num_dropped = (~keep).sum().float()
        return Routing(idx, weight, None, logits, probs, counts, num_dropped, True)

    def _expert_choice(self, scores: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, B: int, N: int) -> Routing:
        # Routing groups are samples: each expert takes the same C tokens of every sample, so a
        # sample's output never depends on the rest of the batch (CFG doubling, batch size 1 at
        # inference) and C follows the sample's token count N (docs/moe.md, "expert choice").
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
        return Routing(expert_idx, weight, token_idx, logits, probs, counts, num_dropped, False)
