"""Grouped experts: E feed-forward networks with stacked weights, run by a backend of the table.

# R = routed rows (sorted by expert), T = tokens, D = model dim, F = expert hidden,
# E = experts held here

Weights are stacked ``[E, D, F]`` / ``[E, F, D]`` (``x @ W`` layout, as torchtitan and
``torch._grouped_mm`` want), so an expert-parallel rank simply holds a slice along E. The
compute is one entry of :data:`sparse_dit.moe.ops.EXPERT_BACKENDS` (``"loop"``,
``"fused_local"``, ``"grouped_mm"``, ``"megablocks"``, or ``"auto"``, a rule over the table);
this module owns the parameters and applies the one dtype rule: the weights are cast to the
input's dtype (differentiably) before any backend sees them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from sparse_dit.moe.ops import EXPERT_BACKENDS, ExpertRows, ExpertWeights, resolve_backend, run_inference

__all__ = ["GroupedExperts", "load_dense_into_experts"]


class GroupedExperts(nn.Module):
    """E independent FFN experts with the activations of :class:`sparse_dit.modules.mlp.FeedForward`.

    Args:
        num_experts: experts held by this module (a slice of the global experts under EP).
        dim: model width D.
        hidden_dim: expert hidden width F.
        activation: ``"gelu_tanh"`` (``gelu_tanh(x W1 + b1) W2 + b2``) or ``"swiglu"``
            (``(silu(x W1) * (x W3)) W2``, no biases).
        backend: ``"auto"`` or a key of :data:`sparse_dit.moe.ops.EXPERT_BACKENDS`.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, activation: str = "gelu_tanh", backend: str = "auto") -> None:
        super().__init__()
        if activation not in ("gelu_tanh", "swiglu"):
            raise ValueError(f"activation={activation!r} is not supported; choose one of ['gelu_tanh', 'swiglu']")
        if backend != "auto" and backend not in EXPERT_BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; choose one of {['auto', *EXPERT_BACKENDS]}")
        if num_experts < 1 or dim < 1 or hidden_dim < 1:
            raise ValueError(f"num_experts={num_experts}, dim={dim}, hidden_dim={hidden_dim} must all be >= 1")
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation, self.backend = activation, backend
        E, D, Fh = num_experts, dim, hidden_dim
        self.w1 = nn.Parameter(torch.empty(E, D, Fh))  # [E, D, F]
        self.w2 = nn.Parameter(torch.empty(E, Fh, D))  # [E, F, D]
        if activation == "swiglu":
            self.w3 = nn.Parameter(torch.empty(E, D, Fh))  # [E, D, F] gate
            self.b1 = self.b2 = None
        else:
            self.w3 = None
            self.b1 = nn.Parameter(torch.empty(E, Fh))  # [E, F]
            self.b2 = nn.Parameter(torch.empty(E, D))  # [E, D]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases per expert, as DiT initialises its dense MLP."""
        bound = math.sqrt(6.0 / (self.dim + self.hidden_dim))
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                nn.init.uniform_(w, -bound, bound)
        for b in (self.b1, self.b2):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, activation={self.activation}, backend={self.backend}"

    def params_in(self, dtype: torch.dtype) -> ExpertWeights:
        """The weights in ``dtype`` (the dtype rule of :mod:`sparse_dit.moe.ops`): the parameters
        themselves when they already have it, else differentiable casts (mixed precision: fp32
        master weights, bf16 compute, as autocast does for ``nn.Linear``)."""
        return ExpertWeights(*(None if p is None else (p if p.dtype == dtype else p.to(dtype)) for p in (self.w1, self.w2, self.w3, self.b1, self.b2)))

    def resolve_backend(self, x: torch.Tensor, local: bool) -> str:
        """The backend to run on ``x``: ``self.backend`` after its check, or what ``"auto"`` picks
        (:func:`sparse_dit.moe.ops.resolve_backend`). ``local``: the caller can hand over
        token-space rows (one process holding every expert)."""
        return resolve_backend(self.backend, x, self.dim, self.hidden_dim, local)

    def forward(self, x: torch.Tensor, rows: ExpertRows, backend: Optional[str] = None) -> torch.Tensor:
        """Run the experts on ``x`` laid out as ``rows`` (see :class:`sparse_dit.moe.ops.ExpertRows`).

        Callers go through this ``forward`` (not the op) so that module hooks, ZeRO-3
        parameter gathering, still run.

        Args:
            x: (R, D) expert-sorted rows, or the (T, D) tokens when ``rows`` is in token space.
            rows: the layout: per-expert ``counts`` (E,) (+ host ``sizes`` when the caller has
                them, which saves the loop's device-to-host sync), or a route ``plan`` + ``weight``,
                or (gradients off) the unsorted ``routes`` + ``weight`` of the inference path.
            backend: the resolved backend (the layer resolves once per forward); ``None`` =
                :meth:`resolve_backend`.

        Returns:
            (R, D) expert outputs in row order, or the (T, D) weighted sums in token space.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be (rows, {self.dim}), got {tuple(x.shape)}")
        if not rows.token_space and (rows.counts is None or rows.counts.shape != (self.num_experts,)):
            raise ValueError(
                f"rows.counts (tokens per expert) must have shape ({self.num_experts},), got "
                f"{None if rows.counts is None else tuple(rows.counts.shape)}"
            )
        if rows.inference:  # gradients off, one process (sparse_dit/moe/ops/inference.py)
            if torch.is_grad_enabled():
                raise ValueError("the inference layout (rows.routes) runs without autograd; call it under torch.no_grad()")
            return run_inference(x, rows, self.activation, self.params_in(x.dtype))
        name = self.resolve_backend(x, rows.token_space) if backend is None else backend
        spec = EXPERT_BACKENDS[name]
        if spec.token_space != rows.token_space:
            raise ValueError(
                f"backend {name!r} takes {'token-space' if spec.token_space else 'expert-sorted'} rows, "
                f"got {'token-space' if rows.token_space else 'expert-sorted'} ones"
            )
        return spec.run(x, rows, self.activation, self.params_in(x.dtype))


@torch.no_grad()
def load_dense_into_experts(experts: GroupedExperts, ffn: nn.Module, expert_ids: Optional[Sequence[int]] = None) -> None:
    """Copy a dense :class:`~sparse_dit.modules.mlp.FeedForward`'s weights into experts.

    Used to check that E=1, k=1 equals the dense FFN, and to upcycle a dense checkpoint into
    an MoE (Komatsuzaki et al. 2023, "Sparse Upcycling").

    Args:
        experts: the target; must have the FFN's dim, hidden width and activation.
        ffn: a ``FeedForward`` (``fc1``/``fc2`` for GELU, ``w1``/``w3``/``w2`` for SwiGLU).
        expert_ids: local experts to overwrite; ``None`` = all.
    """
    if getattr(ffn, "activation", None) != experts.activation:
        raise ValueError(f"ffn activation {getattr(ffn, 'activation', None)!r} != experts activation {experts.activation!r}")
    if ffn.dim != experts.dim or ffn.hidden_dim != experts.hidden_dim:
        raise ValueError(
            f"ffn (dim={ffn.dim}, hidden_dim={ffn.hidden_dim}) does not match experts "
            f"(dim={experts.dim}, hidden_dim={experts.hidden_dim})"
        )
    ids = range(experts.num_experts) if expert_ids is None else expert_ids
    for e in ids:
        if experts.activation == "gelu_tanh":
            experts.w1.data[e].copy_(ffn.fc1.weight.t())
            experts.w2.data[e].copy_(ffn.fc2.weight.t())
            experts.b1.data[e].copy_(ffn.fc1.bias if ffn.fc1.bias is not None else torch.zeros(experts.hidden_dim))
            experts.b2.data[e].copy_(ffn.fc2.bias if ffn.fc2.bias is not None else torch.zeros(experts.dim))
        else:
            experts.w1.data[e].copy_(ffn.w1.weight.t())
            experts.w3.data[e].copy_(ffn.w3.weight.t())
            experts.w2.data[e].copy_(ffn.w2.weight.t())
