"""Expert compute backends: one signature, one table.

# T = tokens, R = rows, D = model dim, F = expert hidden, E = experts held here,
# K = routes per token, P = rows of the fused op's padded layout

Every backend is one file here exposing an :class:`ExpertBackend` entry of
:data:`EXPERT_BACKENDS`, whose ``run`` has one signature::

    y = run(x, rows, activation, weights)

* ``x``: (R, D) expert-sorted rows, or the (T, D) tokens for a token-space backend;
* ``rows``: :class:`ExpertRows`, which rows belong to which expert: ``counts`` (E,) on the
  device and optionally the host ``sizes`` (sorted rows), or a route ``plan`` and the route
  ``weight`` (token space: the backend gathers and combines itself);
* ``activation``: ``"gelu_tanh"`` or ``"swiglu"``;
* ``weights``: :class:`ExpertWeights` ``(w1 [E, D, F], w2 [E, F, D], w3 [E, D, F] | None,
  b1 [E, F] | None, b2 [E, D] | None)``;
* returns (R, D) expert outputs in row order (rows past ``sum(counts)`` unspecified), or the
  (T, D) weighted sums in token space.

**Dtype rule** (one for every backend): the experts run in the dtype of ``x``. The caller
(:class:`sparse_dit.moe.GroupedExperts`) passes the weights already cast to it (differentiable
casts of fp32 master weights, as autocast does for ``nn.Linear``); every backend checks that
with :func:`check_expert_weights` and never casts on its own.

**"auto"** is a rule over the table: the first entry, in table order, whose ``auto(x, D, F,
local)`` holds (``local``: the layer holds every expert behind the plain local dispatcher).
Today: ``grouped_mm`` on CUDA for aligned shapes (no host sync), else ``fused_local`` in one
process, else ``loop``; ``megablocks`` only when named.

With gradients off, a layer holding every expert runs :mod:`~sparse_dit.moe.ops.inference`
instead (no autograd bookkeeping), which on float32 CPU tensors is one native op
(:mod:`~sparse_dit.moe.ops.native`, compiled on first use).

A new backend is one file here plus one entry below (docs/architecture.md, "Extension points:
routers and expert backends"); ``model.moe.backend`` names the entry.
"""

import torch

from sparse_dit.moe.ops.base import ExpertBackend, ExpertRows, ExpertWeights, check_expert_weights
from sparse_dit.moe.ops.expert_loop import LOOP, experts_loop
from sparse_dit.moe.ops.fused_local import FUSED_LOCAL, BlockPlan, fused_local_moe, plan_routes, release_workspace
from sparse_dit.moe.ops.grouped_mm import GROUPED_MM, grouped_mm_aligned, grouped_mm_available
from sparse_dit.moe.ops.inference import moe_inference, run_inference
from sparse_dit.moe.ops.megablocks import MEGABLOCKS

__all__ = [
    "EXPERT_BACKENDS",
    "resolve_backend",
    "ExpertBackend",
    "ExpertRows",
    "ExpertWeights",
    "check_expert_weights",
    "experts_loop",
    "fused_local_moe",
    "moe_inference",
    "run_inference",
    "plan_routes",
    "BlockPlan",
    "release_workspace",
    "grouped_mm_available",
    "grouped_mm_aligned",
]

EXPERT_BACKENDS: dict[str, ExpertBackend] = {
    "grouped_mm": GROUPED_MM,  # CUDA, aligned shapes: sync-free
    "fused_local": FUSED_LOCAL,  # one process holding every expert: batched GEMMs, own combine
    "loop": LOOP,  # anything: per-expert GEMMs behind any dispatcher
    "megablocks": MEGABLOCKS,  # optional CUDA package, explicit only
}
"""Expert backends by name (``model.moe.backend``, plus ``"auto"``); the order is ``"auto"``'s preference."""


def resolve_backend(name: str, x: torch.Tensor, dim: int, hidden: int, local: bool) -> str:
    """The backend to run for input ``x``: ``name`` itself after its check, or ``"auto"``'s pick.

    Args:
        name: a key of :data:`EXPERT_BACKENDS` or ``"auto"``.
        x: the expert input (its device and dtype decide).
        dim, hidden: D and F of the experts.
        local: whether the caller can run a token-space backend (one process, every expert).
    """
    if name == "auto":
        for key, backend in EXPERT_BACKENDS.items():
            if (local or not backend.token_space) and backend.auto(x, dim, hidden, local):
                return key
        raise RuntimeError("no expert backend accepts this input (the 'loop' entry should)")  # unreachable with LOOP
    if name not in EXPERT_BACKENDS:
        raise ValueError(f"backend={name!r} is not supported; choose one of {['auto', *EXPERT_BACKENDS]}")
    EXPERT_BACKENDS[name].check(x, dim, hidden, local)
    return name
