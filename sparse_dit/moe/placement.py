"""Which DiT blocks get an MoE FFN (``model.moe.every`` / ``model.moe.first_dense``)."""

from __future__ import annotations

from typing import Any

__all__ = ["is_moe_layer", "moe_layer_indices"]


def is_moe_layer(moe: Any, layer_idx: int) -> bool:
    """Whether block ``layer_idx`` gets an MoE FFN: MoE on, after ``first_dense`` dense blocks,
    then every ``every``-th block (``every=1``: all of them; DeepSeekMoE keeps the first dense).

    Args:
        moe: a :class:`~sparse_dit.config.MoEConfig`.
        layer_idx: 0-based block index.
    """
    return moe.enabled and layer_idx >= moe.first_dense and (layer_idx - moe.first_dense) % moe.every == 0


def moe_layer_indices(moe: Any, depth: int) -> list[int]:
    """The block indices that are MoE in a model of ``depth`` blocks."""
    return [i for i in range(depth) if is_moe_layer(moe, i)]
