"""Mixture-of-Experts feed-forward layers for the DiT (issue 3).

Parts, torchtitan style (one idea per file):

* :mod:`~sparse_dit.moe.routers`: one class per routing rule (token-choice top-k with
  optional renormalisation, capacity dropping and DeepSeek-V3 selection bias; expert choice)
  on a shared fp32 gate with optional timestep-aware routing; one table, :data:`ROUTERS`.
* :mod:`~sparse_dit.moe.dispatch`: ``dispatch()``/``combine()`` with a frozen metadata
  dataclass; :class:`LocalDispatcher` here, the all-to-all one in ``sparse_dit.parallel``.
* :mod:`~sparse_dit.moe.experts`: grouped experts with stacked ``[E, D, F]`` weights.
* :mod:`~sparse_dit.moe.ops`: expert compute backends with one signature (loop, the fused
  single-process op, grouped_mm, megablocks); one table, :data:`EXPERT_BACKENDS`.
* :mod:`~sparse_dit.moe.layer`: :class:`MoEFeedForward` composing them (+ shared experts).
* :mod:`~sparse_dit.moe.stats`: balance loss, z-loss, statistics, :class:`MoEAux`.
* :mod:`~sparse_dit.moe.balancing`: :func:`update_balance_biases` (outside the forward).

Counting and compute matching are in :mod:`sparse_dit.flops`, MoE presets in :mod:`sparse_dit.presets`.

See docs/moe.md.
"""

from sparse_dit.moe.balancing import moe_layers, update_balance_biases
from sparse_dit.moe.dispatch import DispatchMeta, LocalDispatcher
from sparse_dit.moe.experts import GroupedExperts, load_dense_into_experts
from sparse_dit.moe.global_balance import GlobalBalance, reset_global_balance
from sparse_dit.moe.layer import MoEFeedForward, expert_hidden_dim
from sparse_dit.moe.ops import EXPERT_BACKENDS, release_workspace
from sparse_dit.moe.placement import is_moe_layer, moe_layer_indices
from sparse_dit.moe.routers import (
    ROUTERS, BatchRouter, ExpertChoiceRouter, NoiseLevelRouter, RouterBase, Routing, TokenChoiceRouter, update_batch_thresholds,
)
from sparse_dit.moe.stats import MoEAux, summarize_aux

__all__ = [
    "MoEFeedForward",
    "MoEAux",
    "summarize_aux",
    "update_balance_biases",
    "GlobalBalance",
    "reset_global_balance",
    "update_batch_thresholds",
    "BatchRouter",
    "NoiseLevelRouter",
    "moe_layers",
    "ROUTERS",
    "RouterBase",
    "TokenChoiceRouter",
    "ExpertChoiceRouter",
    "Routing",
    "EXPERT_BACKENDS",
    "LocalDispatcher",
    "DispatchMeta",
    "GroupedExperts",
    "load_dense_into_experts",
    "expert_hidden_dim",
    "is_moe_layer",
    "moe_layer_indices",
    "release_workspace",
]
