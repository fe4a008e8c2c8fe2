"""MoE routers: one class per routing rule, one table.

Every router subclasses :class:`RouterBase` (the fp32 gate, scores, timestep conditioning and
bias buffers), takes the same constructor arguments and returns a :class:`Routing` from
``forward(x_BND, cond)``. A new rule is one file here plus one entry in :data:`ROUTERS`
(docs/architecture.md, "Extension points: routers and expert backends");
``model.moe.router`` names the entry.
"""

from sparse_dit.moe.routers.base import SCORE_FUNCS, RouterBase, Routing
from sparse_dit.moe.routers.batch import INFERENCE_RULES, BatchRouter, update_batch_thresholds
from sparse_dit.moe.routers.expert_choice import ExpertChoiceRouter, expert_choice_capacity
from sparse_dit.moe.routers.noise_level import NoiseLevelRouter, NoiseRouting, freeze_outside_noise_range, noise_range_interval, noise_range_of
from sparse_dit.moe.routers.token_choice import TokenChoiceRouter, capacity_drop

__all__ = [
    "ROUTERS",
    "RouterBase",
    "Routing",
    "TokenChoiceRouter",
    "ExpertChoiceRouter",
    "BatchRouter",
    "NoiseLevelRouter",
    "NoiseRouting",
    "INFERENCE_RULES",
    "update_batch_thresholds",
    "freeze_outside_noise_range",
    "noise_range_of",
    "noise_range_interval",
    "capacity_drop",
    "expert_choice_capacity",
    "SCORE_FUNCS",
]

ROUTERS: dict[str, type[RouterBase]] = {
    TokenChoiceRouter.kind: TokenChoiceRouter,
    ExpertChoiceRouter.kind: ExpertChoiceRouter,
    BatchRouter.kind: BatchRouter,
    NoiseLevelRouter.kind: NoiseLevelRouter,
}
"""Routing rules by name (``model.moe.router``); the MoE layer builds ``ROUTERS[name](...)``."""
