"""Batch-level routing (Expert Race, DiffMoE, 2025): the micro-batch's top ``k * T`` token-expert scores.

# B = batch, N = tokens per sample, T = B*N, E = experts, K = top-k, R = routes

In training every token-expert score of the micro-batch competes in one pool, and the ``K * T``
highest become routes: a hard token may take several experts, an easy one none, and the
average stays exactly K per token, so the compute equals token choice's. The pool is what one
forward sees on one rank (a micro-batch); under expert parallelism routing happens before the
all-to-all, on the rank that owns the tokens, so EP=1 and EP=2 pool the same tokens.

At inference the batch is different (batch size 1, classifier-free guidance doubling it, all
samples at one timestep), so the pool cannot be the rule. The rule here is Expert Race's: a
token takes every expert whose score reaches a **threshold**, the EMA over training steps of
the pool's cut-off score (the ``K * T``-th largest). The threshold is per layer, estimated
outside the forward by :func:`update_batch_thresholds` (after each optimizer step, summed over
ranks like the balance counts), so it is identical on every rank and saved in checkpoints.
Before any estimate exists the inference rule falls back to a per-sample pool (top ``K * N`` of
each sample's scores). docs/moe.md, "Batch-level routing", measures both rules.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from sparse_dit.moe.routers.base import RouterBase, Routing
from sparse_dit.moe.stats import balance_loss, count_indices

__all__ = ["BatchRouter", "update_batch_thresholds", "INFERENCE_RULES"]

INFERENCE_RULES = ("threshold", "sample")
"""What a batch router does outside training: ``"threshold"`` (the EMA cut-off; the default) or
``"sample"`` (a pool of each sample's own scores, top ``K * N``)."""


class BatchRouter(RouterBase):
    """Top ``K * T`` over the flattened (T, E) scores of the micro-batch in training; the
    EMA threshold at inference.

    Routes are (R, 1) with an explicit ``token_idx`` (a token may have 0..E routes); the
    combine weights are the raw scores of the chosen pairs (``renormalize`` is not used: it
    would give a one-route token weight 1 and no router gradient). ``capacity_factor`` and bias
    balancing are not available; the Switch balance loss applies. ``num_dropped`` counts tokens
    that got no expert (they pass through the residual).

    Attributes:
        inference_rule: one of :data:`INFERENCE_RULES` (``"threshold"``); used when not training.
        threshold_momentum: EMA momentum of the threshold per optimizer step.
    """

    kind = "batch"
    switch_balance_loss = True  # Switch's E * sum_e f_e P_e over the routes: balance_scope "global" applies
    no_bias_balancing_reason = "the pool ranks scores, not biased scores; use the balance loss"
    threshold_momentum: float = 0.99

    def __init__(self, dim: int, num_experts: int, top_k: int, **kwargs) -> None:
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is out of range; allowed: 1..num_experts ({num_experts})")
        if kwargs.get("capacity_factor") is not None:
            raise ValueError(f"capacity_factor={kwargs['capacity_factor']} is not used by router='batch'; use None")
        super().__init__(dim, num_experts, top_k, **kwargs)
        self.inference_rule = "threshold"
        # The inference threshold and how many optimizer steps estimated it (0 = none yet):
        # persistent, so a checkpoint or an exported model routes the same way.
        self.register_buffer("threshold", torch.zeros(()), persistent=True)
        self.register_buffer("threshold_steps", torch.zeros(()), persistent=True)
        # Sum and count of the pool cut-offs of training forwards since the last update.
        self.register_buffer("cutoff_sum", torch.zeros(()), persistent=False)
        self.register_buffer("cutoff_count", torch.zeros(()), persistent=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", inference_rule={self.inference_rule}"

    def route(self, scores: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, B: int, N: int) -> Routing:
        T, E = scores.shape
        K = self.top_k
        if self.training:
            weight, flat = torch.topk(scores.reshape(-1), K * T)  # the pool: all T*E pairs of the micro-batch
            self.cutoff_sum.add_(weight[-1].detach())
            self.cutoff_count.add_(1.0)
        elif self.inference_rule == "threshold" and float(self.threshold_steps) > 0:
            flat = torch.nonzero(scores.detach().reshape(-1) >= self.threshold).squeeze(1)  # (R,)
            weight = scores.reshape(-1).index_select(0, flat)
        else:  # a pool per sample: top K*N of each sample's N*E scores
            if self.inference_rule not in INFERENCE_RULES:
                raise ValueError(f"inference_rule={self.inference_rule!r} is not allowed; choose one of {list(INFERENCE_RULES)}")
            w_BR, i_BR = torch.topk(scores.reshape(B, N * E), K * N, dim=-1)
            flat = (i_BR + (torch.arange(B, device=scores.device) * (N * E))[:, None]).reshape(-1)
            weight = w_BR.reshape(-1)
        token = torch.div(flat, E, rounding_mode="floor")
        expert = flat - token * E
        counts = count_indices(expert, E).float()
        chosen = torch.zeros(T, dtype=torch.bool, device=scores.device)
        chosen[token] = True
        num_dropped = (~chosen).sum().float()
        return Routing(expert.view(-1, 1), weight.view(-1, 1), token.view(-1, 1), logits, probs, counts, num_dropped, T, False)

    def balance_loss(self, r: Routing) -> torch.Tensor:
        """Switch load-balancing loss over the pool's routes (``f_e`` = routes of e / (K * T))."""
        return balance_loss(r.probs, r.counts, self.top_k)


@torch.no_grad()
def update_batch_thresholds(model: nn.Module, reduce_fn: Optional[Callable[[torch.Tensor], None]] = None) -> int:
    """Fold the pool cut-offs seen since the last call into every batch router's threshold EMA.

    Call after each optimizer step (the trainer does). Each router's mean cut-off over the
    training forwards since the last call (all micro-batches; with ``reduce_fn``, all ranks)
    becomes ``threshold = m * threshold + (1 - m) * mean`` (the first estimate is taken as is).

    Args:
        model: any module holding :class:`BatchRouter` s.
        reduce_fn: in-place SUM all-reduce of a 1-D float tensor over the ranks that route
            distinct tokens (the whole world in DP + EP); called once for all layers.

    Returns:
        The number of routers updated (0: no collective was made).
    """
    routers = [m for m in model.modules() if isinstance(m, BatchRouter)]
    if not routers:
        return 0
    flat = torch.stack([t for r in routers for t in (r.cutoff_sum, r.cutoff_count)]).float()  # (2L,)
    if reduce_fn is not None:
        reduce_fn(flat)
    for r, (s, n) in zip(routers, flat.view(-1, 2).tolist()):
        if n > 0:
            mean = s / n
            if float(r.threshold_steps) == 0:
                r.threshold.fill_(mean)
            else:
                r.threshold.mul_(r.threshold_momentum).add_((1.0 - r.threshold_momentum) * mean)
            r.threshold_steps.add_(1.0)
        r.cutoff_sum.zero_()
        r.cutoff_count.zero_()
    return len(routers)
