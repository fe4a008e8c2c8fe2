"""The Switch balance loss over the global batch: every micro-batch of a step, every rank.

# L = MoE layers with a Switch loss, E = experts, T = tokens

The per-micro-batch loss (``model.moe.balance_scope: micro_batch``, the default) is
``E * sum_e f_e P_e`` with ``f_e`` the fraction of *this rank's micro-batch's* routes on
expert e. A micro-batch of a few videos is a narrow sample (one scene, a few noise levels), so
the loss pushes every micro-batch to spread its tokens evenly, which fights experts
specialising on content. Qiu et al. 2025 ("Demons in the Detail: On Implementing Load
Balancing Loss for Training Specialized Mixture-of-Expert Models") compute ``f`` over the
global batch instead and report better models and more specialised experts; Megatron-Core
offers the same as its ``global_aux_loss``.

``balance_scope: global`` (this module) computes, for micro-batch m of an optimizer step:

* ``f_e``: routes on expert e summed over all ranks and over micro-batches ``0..m`` of the
  step, divided by their total (the later micro-batches have not been routed yet when m's
  backward runs; at the last micro-batch ``f`` is the whole global batch's). No gradient.
* ``P_e``: the mean router probability of this rank's tokens, with gradient, weighted by
  ``T_rank / mean_r T_r`` (tokens on this rank over the mean over ranks of this micro-step).
  The data-parallel gradient average over ranks then equals the gradient of ``P_e`` over the
  concatenated tokens of all ranks, also when ranks hold different token counts.

So with one micro-batch per step the mean over ranks of the loss, and its gradient, equal the
Switch loss of the concatenated global batch computed in one process (tests/test_moe_semantics.py).
The statistics cross ranks through one SUM all-reduce of a flat float tensor per micro-step
(all layers packed), which :mod:`sparse_dit.parallel` supplies as ``reduce_fn``; this module
never imports ``torch.distributed``. It runs in the model's forward, outside the blocks, so
activation checkpointing never recomputes (or repeats) it. Call :func:`reset_global_balance`
after every optimizer step (the library trainer does).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from sparse_dit.moe.stats import MoEAux

__all__ = ["GlobalBalance", "reset_global_balance"]


class GlobalBalance:
    """Rewrites each layer's balance loss over the global batch (see the module docstring).

    Held by :class:`~sparse_dit.dit.SparseDiT` as ``model.moe_balance`` when
    ``model.moe.balance_scope == "global"``; applied to training forwards with gradients only
    (evaluation forwards keep the per-micro-batch value and run no collective).

    Args:
        reduce_fn: in-place SUM all-reduce of a 1-D float tensor over every rank that routes
            distinct tokens (the whole world under data + expert parallelism); ``None`` for one
            process. :func:`sparse_dit.parallel.connect_global_balance` sets it.
    """

    def __init__(self, reduce_fn: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        self.reduce_fn = reduce_fn
        self.counts: Optional[torch.Tensor] = None  # flat: global routes of this step's micro-batches so far

    def __repr__(self) -> str:
        return f"GlobalBalance(reduce_fn={'set' if self.reduce_fn is not None else None})"

    def reset(self) -> None:
        """Start a new optimizer step: forget the routes of the previous step's micro-batches."""
        self.counts = None

    def __call__(self, auxes: Sequence[MoEAux], aux_loss_coefs: Sequence[float]) -> list[MoEAux]:
        """Replace ``balance_loss`` (and its share of ``loss``) of every layer that has
        ``balance_probs`` by the global-batch value.

        Args:
            auxes: one :class:`MoEAux` per MoE layer of one forward, in model order.
            aux_loss_coefs: each layer's ``aux_loss_coef`` (same order).

        Returns:
            The new list (layers without a Switch loss unchanged).
        """
        if len(auxes) != len(aux_loss_coefs):
            raise ValueError(f"got {len(auxes)} MoE outputs but {len(aux_loss_coefs)} coefficients")
        idx = [i for i, a in enumerate(auxes) if a.balance_probs is not None]
        if not idx:
            return list(auxes)
        local = [auxes[i].tokens_per_expert.detach().float() for i in idx]  # routes per expert, this rank
        sizes = [c.numel() for c in local]
        flat = torch.cat(local + [local[0].new_ones(1)])  # the trailing 1 counts the ranks
        if self.reduce_fn is not None:
            self.reduce_fn(flat)
        glob, ranks = flat[:-1], flat[-1]
        if self.counts is None or self.counts.shape != glob.shape:
            self.counts = glob.clone()
        else:
            self.counts = self.counts + glob
        out = list(auxes)
        for i, c_local, c_glob, c_step in zip(idx, local, glob.split(sizes), self.counts.split(sizes)):
            a = auxes[i]
            E = c_local.numel()
            f = c_step / c_step.sum().clamp_min(1.0)  # fraction of the step's global routes so far
            # this rank's tokens over the mean per rank (routes = tokens * k on every rank)
            share = c_local.sum() * ranks / c_glob.sum().clamp_min(1.0)
            bal = E * torch.dot(f, a.balance_probs.float()) * share
            # swap the balance term inside the weighted loss (its other terms are untouched)
            loss = a.loss + aux_loss_coefs[i] * (bal - a.balance_loss)
            out[i] = a._replace(loss=loss, balance_loss=bal)
        return out


def reset_global_balance(model: nn.Module) -> bool:
    """After an optimizer step: start the next step's global balance window.

    Args:
        model: a module with a ``moe_balance`` attribute (a :class:`~sparse_dit.dit.SparseDiT`),
            or any other module (then nothing happens).

    Returns:
        Whether the model had a global balance window to reset.
    """
    gb = getattr(model, "moe_balance", None)
    if isinstance(gb, GlobalBalance):
        gb.reset()
        return True
    return False
