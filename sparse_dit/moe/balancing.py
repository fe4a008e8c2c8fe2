"""Auxiliary-loss-free load balancing (DeepSeek-V3), applied outside the forward pass.

Every token-choice router with ``bias_update_rate > 0`` adds its routes per expert to the
buffer ``router.balance_counts`` in training forwards. After each optimizer step the trainer
calls :func:`update_balance_biases`, which moves each expert's selection bias by
``rate * sign(mean load - load)`` (DeepSeek-V3, Sec. 2.1.2: raise under-loaded experts, lower
over-loaded ones), re-centres the biases and zeroes the counts. The bias changes which experts
are *selected*, never the combine weights, so it adds no gradient and no loss.

Under data or expert parallelism each rank routes different tokens with a replicated router,
so the counts of all ranks must be summed before the update, or the ranks' biases diverge.
``update_balance_biases(model, reduce_fn=lambda t: torch.distributed.all_reduce(t))`` does
that with one collective for all layers (the counts of every layer are packed into one flat
tensor, all-reduced with SUM over the ranks that route distinct tokens: the whole world in
DP + EP). The model code itself never imports torch.distributed.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import nn

from sparse_dit.moe.layer import MoEFeedForward

__all__ = ["moe_layers", "update_balance_biases"]


def moe_layers(model: nn.Module) -> Iterator[MoEFeedForward]:
    """Every :class:`MoEFeedForward` in ``model``, in module order."""
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            yield m


@torch.no_grad()
def update_balance_biases(model: nn.Module, reduce_fn: Optional[Callable[[torch.Tensor], None]] = None) -> int:
    """Apply one DeepSeek-V3 bias update to every MoE layer with ``bias_update_rate > 0``.

    Args:
        model: any module holding :class:`MoEFeedForward` layers.
        reduce_fn: in-place SUM all-reduce of a 1-D float tensor across data-parallel ranks
            (``None`` for one process). Called once, on all layers' counts packed together.

    Returns:
        The number of layers updated.
    """
    layers = [m for m in moe_layers(model) if m.bias_update_rate > 0 and m.router.bias_balancing]
    if not layers:
        return 0
    flat = torch.cat([m.router.balance_counts for m in layers])  # (sum E,)
    if reduce_fn is not None:
        reduce_fn(flat)
    for m, counts in zip(layers, flat.split([m.num_experts for m in layers])):
        delta = torch.sign(counts.mean() - counts)  # +1 under-loaded, -1 over-loaded, 0 if no tokens
        delta = delta - delta.mean()  # keep the biases centred (torchtitan does the same)
        m.router.expert_bias.add_(m.bias_update_rate * delta)
        m.router.balance_counts.zero_()
    return len(layers)
