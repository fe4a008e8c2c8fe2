"""The router contract: one :class:`Routing` result, one :class:`RouterBase` with the shared gate.

# B = batch, N = tokens per sample, T = B*N tokens, D = model dim, E = experts, K = top-k,
# R = routes

A router turns tokens into a route table (see :mod:`sparse_dit.moe.dispatch`) plus the fp32
logits and scores that the balancing losses and statistics need. Every routing rule is one
subclass of :class:`RouterBase` (one file in this package, one entry in
:data:`sparse_dit.moe.routers.ROUTERS`); it implements :meth:`RouterBase.route` and
:meth:`RouterBase.balance_loss`. The base owns what every rule shares: the fp32 gate, the
softmax/sigmoid scores, timestep-aware conditioning and the DeepSeek-V3 bias buffers.

Timestep-aware routing: with ``cond_dim`` set, the router sees the concatenation of the token
and the conditioning vector (timestep + class/text embedding). A linear map of a concatenation
is a sum, ``logits = x W_x + c W_c``, and ``c W_c`` is computed once per sample (B x E), not
per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Routing", "RouterBase", "SCORE_FUNCS"]

SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Routing:
    """A routing decision: the one result type of every router.

    Attributes:
        expert_idx: (R_T, R_K) int64 expert of each route, ``E`` where the route was dropped.
            Token-major routers return (T, K) (row t holds token t's routes); others any 2-D
            shape, with ``token_idx`` naming each route's token.
        weight: same shape, fp32 combine weights.
        token_idx: ``None`` for token-major routes; else the int64 token of each route, same
            shape as ``expert_idx``.
        logits: (T, E) fp32 router logits (before the balancing bias).
        probs: (T, E) fp32 scores normalised to sum to one per token (softmax, or sigmoid
            scores divided by their sum), used by the balance loss and the entropy.
        counts: (E,) fp32 routes per expert as the router chose them (before capacity dropping).
        num_dropped: fp32 scalar, what the router dropped: routes (token choice) or tokens no
            expert chose (expert choice).
        num_droppable: what ``num_dropped`` counts out of (routes, or tokens), so that
            ``num_dropped / num_droppable`` is the dropped fraction.
        may_drop: whether ``expert_idx`` can hold the dropped sentinel ``E``.
    """

    expert_idx: torch.Tensor
    weight: torch.Tensor
    token_idx: Optional[torch.Tensor]
    logits: torch.Tensor
    probs: torch.Tensor
    counts: torch.Tensor
    num_dropped: torch.Tensor
    num_droppable: int
    may_drop: bool

    def token_of_route(self) -> torch.Tensor:
        """(R,) int64 token of each route, in route order."""
        if self.token_idx is not None:
            return self.token_idx.reshape(-1)
        R = self.expert_idx.numel()
        return torch.div(torch.arange(R, device=self.expert_idx.device), self.expert_idx.shape[1], rounding_mode="floor")


class RouterBase(nn.Module):
    """fp32 linear router with softmax or sigmoid scores; subclasses choose the routes.

    Every router takes the same constructor arguments (the MoE layer builds any entry of
    ``ROUTERS`` the same way); a rule that does not use one documents it.

    Args:
        dim: model width D (router input).
        num_experts: E.
        top_k: experts per token (token choice) or average experts per token (expert choice).
        score_func: ``"softmax"`` or ``"sigmoid"`` (DeepSeek-V3).
        renormalize: rescale the chosen weights to sum to one per token (token choice).
        cond_dim: width of the conditioning vector for timestep-aware routing; ``None`` = off.
        capacity_factor: ``None`` = the rule's default capacity; see each rule.
        bias_balancing: keep the DeepSeek-V3 selection bias (buffer ``expert_bias``) and count
            routes into ``balance_counts`` in training forwards (rules with
            ``supports_bias_balancing`` only).
    """

    kind: ClassVar[str] = ""
    """The rule's key in :data:`sparse_dit.moe.routers.ROUTERS` (and ``model.moe.router``)."""
    supports_bias_balancing: ClassVar[bool] = False
    """Whether the DeepSeek-V3 selection bias applies to this rule."""
    no_bias_balancing_reason: ClassVar[str] = "the rule does not select by biased scores"
    """Why not, for the error message."""
    switch_balance_loss: ClassVar[bool] = False
    """Whether :meth:`balance_loss` is Switch's ``E * sum_e f_e P_e`` over ``Routing.counts`` and
    ``Routing.probs`` (then ``model.moe.balance_scope="global"`` can compute it over the global
    batch, :mod:`sparse_dit.moe.global_balance`)."""

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        renormalize: bool = True,
        cond_dim: Optional[int] = None,
        capacity_factor: Optional[float] = None,
        bias_balancing: bool = False,
    ) -> None:
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={score_func!r} is not supported; choose one of {list(SCORE_FUNCS)}")
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1")
        if top_k < 1:
            raise ValueError(f"top_k={top_k} is out of range; allowed: >= 1")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0 (or None for dropless)")
        if bias_balancing and not self.supports_bias_balancing:
            raise ValueError(
                f"bias balancing (bias_update_rate > 0) is not available with router={self.kind!r}: "
                f"{self.no_bias_balancing_reason}; set bias_update_rate=0"
            )
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.score_func, self.renormalize = score_func, renormalize
        self.capacity_factor, self.bias_balancing = capacity_factor, bias_balancing
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.cond_proj = nn.Linear(cond_dim, num_experts, bias=False) if cond_dim else None
        # DeepSeek-V3 balancing bias: added to the scores for *selection* only; persistent so a
        # checkpoint reproduces the routing (every rule holds it, so state dicts have one shape).
        # Updated by sparse_dit.moe.update_balance_biases.
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

    def forward(self, x_BND: torch.Tensor, cond: Optional[torch.Tensor] = None, timesteps: Optional[torch.Tensor] = None) -> Routing:
        """Route tokens.

        Args:
            x_BND: (B, N, D) tokens. Routers see samples, not a flat (T, D): a rule may route
                within each sample (expert choice does).
            cond: (B, cond_dim) conditioning vector; used only when ``cond_dim`` was set (then
                it is required).
            timesteps: (B,) t of each sample; only rules that route by noise level use it
                (:meth:`mask_logits`).
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
        logits = self.mask_logits(logits, timesteps)  # (B, N, E); a rule may shut experts off per sample
        logits = logits.reshape(B * N, E)  # (T, E)
        if self.score_func == "softmax":
            scores = torch.softmax(logits, dim=-1)  # (T, E)
            probs = scores
        else:
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-9)
        return self.route(scores, logits, probs, B, N)

    def mask_logits(self, logits_BNE: torch.Tensor, timesteps: Optional[torch.Tensor]) -> torch.Tensor:
        """Logits with the experts a sample may not use replaced (every expert usable here)."""
        return logits_BNE

    def route(self, scores_TE: torch.Tensor, logits_TE: torch.Tensor, probs_TE: torch.Tensor, B: int, N: int) -> Routing:
        """The rule: routes from the (T, E) fp32 scores of ``B`` samples of ``N`` tokens."""
        raise NotImplementedError

    def balance_loss(self, r: Routing) -> torch.Tensor:
        """The unweighted balance loss this rule trains with (a zero scalar if it needs none)."""
        raise NotImplementedError

