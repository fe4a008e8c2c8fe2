"""Collectives on host (CPU) tensors under any backend.

The trainer reduces its step scalars, routing counts and NaN flags as small CPU tensors. gloo
(the CPU backend) reduces them where they are; NCCL reduces only tensors on the GPU and raises
on a CPU tensor. :func:`all_reduce_` hides the difference: under a backend other than gloo a
CPU tensor makes a round trip through the current accelerator device (a few bytes per step).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

__all__ = ["all_reduce_"]


def _needs_device(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and "gloo" not in str(dist.get_backend()).lower()


def all_reduce_(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place all-reduce of ``t`` over ``group`` (default: world), wherever ``t`` lives; returns ``t``.

    Nothing happens without an initialised process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return t
    if _needs_device(t):
        dev = t.to(get_accelerator().current_device_name(), copy=True)
        dist.all_reduce(dev, op=op, group=group)
        t.copy_(dev.to("cpu"))
    else:
        dist.all_reduce(t, op=op, group=group)
    return t
