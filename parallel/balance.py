"""The collectives of MoE load balancing: sums of routing statistics over every rank.

Every rank routes distinct tokens with a replicated router (data parallelism, and expert
parallelism, which shards the experts but not the batch), so routing statistics are summed over
the whole world. The model code takes these as hooks (``reduce_fn``) and never imports
``torch.distributed``:

* :func:`connect_global_balance`: the global-batch balance loss
  (``model.moe.balance_scope: global``, :mod:`sparse_dit.moe.global_balance`) gets
  :func:`world_sum`; :func:`~sparse_dit.parallel.build_engine` calls it;
* the trainer passes :func:`world_sum` to :func:`sparse_dit.moe.update_balance_biases` (the
  DeepSeek-V3 bias counts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sparse_dit.moe.global_balance import GlobalBalance
from sparse_dit.parallel.comm import all_reduce_

__all__ = ["world_sum", "connect_global_balance"]


def world_sum(t: torch.Tensor) -> None:
    """In-place SUM all-reduce of ``t`` over the default (world) group; nothing without one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        all_reduce_(t)


def connect_global_balance(model: nn.Module) -> bool:
    """Give ``model.moe_balance`` (present when ``model.moe.balance_scope == "global"``) the
    world all-reduce. Every rank must then run the same number of training forwards per step
    (the trainer does: ``train.global_batch_size`` fixes the micro-steps on every rank).

    Returns:
        Whether the model has a global balance to connect.
    """
    gb = getattr(model, "moe_balance", None)
    if not isinstance(gb, GlobalBalance):
        return False
    gb.reduce_fn = world_sum
    return True
