"""Expert parallelism on DeepSpeed's process groups: sharding, the all-to-all dispatcher, tagging.

# T = tokens, D = model dim, E = global experts, L = local experts (E / ep_size), P = ep_size,
# R = routes sorted by global expert on the sending rank

With ``parallel.ep_size = P`` the ranks form groups of P consecutive ranks (DeepSpeed's
``deepspeed.utils.groups`` layout, named ``"ep_size_P"``): inside one *expert-parallel* group
each rank holds ``E / P`` experts of every MoE layer and tokens travel to their experts by
all-to-all; the ranks that hold the same experts form an *expert-data-parallel* group, over which
(and only over which) expert gradients are reduced. Everything else is replicated on all ranks
and reduced over the whole data-parallel group, as without MoE.

:func:`setup_expert_parallel` applies this to a :class:`~sparse_dit.dit.SparseDiT` from outside
(the model code never imports torch.distributed):

1. each :class:`~sparse_dit.moe.MoEFeedForward` keeps its slice of experts
   (``shard_experts``) and gets an :class:`AllToAllDispatcher`;
2. expert parameters are tagged the way ``deepspeed.moe.experts.Experts`` tags them
   (``param.allreduce = False``, ``param.group_name = "ep_size_P"``), so DeepSpeed's
   ``split_params_into_different_moe_groups_for_optimizer`` puts them in their own optimizer
   param groups, ZeRO-1/2 partitions those over the expert-data-parallel group, and the engine
   reduces their gradients over that group, dividing by the full data-parallel size (each
   expert rank sees the tokens of all P ranks, so the mean over P x edp ranks' micro-batches
   is the right average: the "expert gradients P times too large" bug does not happen);
3. a stateless :class:`ExpertParallelMarker` (a ``deepspeed.moe.layer.MoE`` subclass without
   gate or experts) is attached to the model. DeepSpeed only switches on its MoE code paths
   (``engine.has_moe_layers``: expert gradient reduction, MoE param groups in ZeRO) when it finds
   an instance of its ``MoE`` class; the marker is how a model with its own MoE layers gets them.
   It reports ``num_local_experts = 0`` because it holds no weights: DeepSpeed's per-expert
   checkpoint files assume its own layer's module names, so expert shards are checkpointed by
   :mod:`sparse_dit.parallel.checkpoint` instead.

With ``ep_size = 1`` nothing is tagged: experts are ordinary replicated parameters and plain data
parallelism (any ZeRO stage, including 3) applies.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from sparse_dit.config import ConfigError, RecipeConfig
from sparse_dit.moe import MoEFeedForward, moe_layers
from sparse_dit.moe.dispatch import DispatchMeta, LocalDispatcher, permute_rows

__all__ = [
    "check_parallel_config",
    "ep_group_name",
    "create_expert_groups",
    "all_to_all_single",
    "AllToAllDispatcher",
    "ExpertParallelMarker",
    "setup_expert_parallel",
    "tag_expert_params",
    "is_expert_param",
    "gather_expert_tensor",
]


def ep_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert(-data)-parallel groups of size ``ep_size``."""
    return f"ep_size_{ep_size}"


def check_parallel_config(recipe: RecipeConfig, world_size: int) -> None:
    """Reject parallel settings that cannot work, before any process group or engine exists.

    Args:
        recipe: the training recipe.
        world_size: number of ranks that will train.

    Raises:
        ConfigError: naming the field, the value and what to use instead.
    """
    par, moe = recipe.parallel, recipe.model.moe
    ep, stage = par.ep_size, par.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={stage!r} is not allowed; choose one of [0, 1, 2, 3]")
    if ep < 1:
        raise ConfigError(f"parallel.ep_size={ep} is out of range; allowed: >= 1")
    if ep == 1:
        return
    if not moe.enabled:
        raise ConfigError(f"parallel.ep_size={ep} needs an MoE model; model.moe.num_experts is 0 (dense). Use parallel.ep_size=1")
    if moe.num_experts % ep:
        divisors = [d for d in range(1, moe.num_experts + 1) if moe.num_experts % d == 0]
        raise ConfigError(
            f"parallel.ep_size={ep} does not divide model.moe.num_experts={moe.num_experts}; "
            f"allowed ep_size values: {divisors}"
        )
    if world_size % ep:
        raise ConfigError(
            f"parallel.ep_size={ep} must divide the number of ranks ({world_size}); "
            f"launch a multiple of {ep} ranks or lower parallel.ep_size"
        )
    if stage == 3:
        raise ConfigError(
            f"parallel.ep_size={ep} with parallel.zero_stage=3 is not supported: ZeRO-3 would partition "
            "each expert shard over all ranks, but expert shards must be partitioned over their "
            "expert-data-parallel group, which DeepSpeed only does for its AutoEP layers (AutoEP "
            "replaces the MoE layer by its own SwiGLU experts and refuses a load-balance loss, so "
            "this library's routers and experts would be lost). Use parallel.zero_stage=1 or 2 with "
            "expert parallelism, or parallel.zero_stage=3 with parallel.ep_size=1 (see docs/training.md)"
        )
    if stage == 0:
        raise ConfigError(
            f"parallel.ep_size={ep} with parallel.zero_stage=0 is not supported: without ZeRO, "
            "DeepSpeed clips gradients with the mean of per-rank norms, which is wrong when ranks "
            "hold different experts. Use parallel.zero_stage=1 or 2 (ZeRO-1 costs no extra "
            "communication over plain data parallelism)"
        )


def create_expert_groups(ep_size: int) -> None:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups (idempotent).

    Args:
        ep_size: ranks per expert-parallel group (consecutive ranks).
    """
    if ep_group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)


# --------------------------------------------------------------------------------------------
# Autograd-aware all-to-all with variable splits
# --------------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """out = all_to_all_single(x); the backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all_single(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Differentiable ``torch.distributed.all_to_all_single`` along dim 0 with variable splits.

    Args:
        x: (sum(in_splits), ...) rows; ``in_splits[r]`` go to rank r of ``group``.
        out_splits: rows received from each rank.
        in_splits: rows sent to each rank.
        group: the process group.
    """
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


# --------------------------------------------------------------------------------------------
# The dispatcher
# --------------------------------------------------------------------------------------------


class AllToAllDispatcher(LocalDispatcher):
    """Dropless expert-parallel dispatcher: the exchange of :class:`~sparse_dit.moe.LocalDispatcher`
    becomes two all-to-alls over the expert-parallel group.

    Forward of one layer on rank p (see :mod:`sparse_dit.moe.dispatch` for the protocol):

    1. ``permute`` sorts this rank's routes by global expert (no sync);
    2. counts per global expert (E,) are exchanged by one all-to-all, so rank p learns how many
       rows every rank sends to each of its L experts; one ``.tolist()`` brings send and receive
       counts to the host (the layer's one device-to-host sync) to size the buffers;
    3. the kept rows go out with ``all_to_all_single`` (variable splits, autograd-aware);
    4. received rows arrive ordered (source rank, local expert) and are permuted into
       local-expert order for the grouped experts;
    5. ``combine`` undoes 4 and 3 (the reverse all-to-all) and the owner rank weights and sums.

    Args:
        group: the expert-parallel process group.
        ep_size: its size P.
    """

    def __init__(self, group: Any, ep_size: int) -> None:
        super().__init__()
        self.group, self.ep_size = group, ep_size

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(ep_size={self.ep_size}, expert_offset={self.expert_offset}, num_local_experts={self.num_local_experts})"

    def _exchange(self, x_perm: torch.Tensor, counts_E: torch.Tensor, meta: DispatchMeta):
        P, E = self.ep_size, meta.num_experts
        L = E // P
        if self.num_local_experts != L:
            raise ValueError(f"dispatcher serves {self.num_local_experts} local experts, expected E/ep_size = {L}")
        send_PL = counts_E.view(P, L).contiguous()  # rows this rank sends to (rank, local expert)
        recv_PL = torch.empty_like(send_PL)  # rows each source sends to my local experts
        dist.all_to_all_single(recv_PL, send_PL, group=self.group)
        host = torch.cat([send_PL.sum(1), recv_PL.flatten()]).tolist()  # the one host sync
        in_splits, recv_flat = host[:P], host[P:]
        out_splits = [sum(recv_flat[s * L : (s + 1) * L]) for s in range(P)]
        kept = sum(in_splits)
        x_recv = all_to_all_single(x_perm[:kept], out_splits, in_splits, self.group)  # (S, D), (source, expert)
        # Reorder rows from (source, local expert) to (local expert, source) blocks.
        recv_cnt = recv_PL.flatten()
        starts = torch.cumsum(recv_cnt, 0) - recv_cnt  # start of block (s, j) in arrival order
        sizes_JS = recv_PL.t().flatten()  # block sizes in target order (j, s)
        starts_JS = starts.view(P, L).t().flatten()
        total = sum(out_splits)
        target_starts = torch.cumsum(sizes_JS, 0) - sizes_JS
        idx = torch.repeat_interleave(starts_JS - target_starts, sizes_JS, output_size=total) + torch.arange(total, device=x_perm.device)
        inv = torch.empty_like(idx)
        inv[idx] = torch.arange(total, device=idx.device)
        x_sorted = permute_rows(x_recv, idx, inv)
        tokens_per_local = recv_PL.sum(0)  # (L,)
        split_sizes = tuple(sum(recv_flat[s * L + j] for s in range(P)) for j in range(L))
        state = (idx, inv, in_splits, out_splits, x_perm.shape[0])
        return x_sorted, tokens_per_local, split_sizes, state

    def _exchange_back(self, y_sorted: torch.Tensor, state: Any) -> torch.Tensor:
        idx, inv, in_splits, out_splits, rows = state
        y_recv = permute_rows(y_sorted[: idx.numel()], inv, idx)  # back to (source, expert) order
        y_kept = all_to_all_single(y_recv, in_splits, out_splits, self.group)  # (kept, D), permute order
        tail = rows - y_kept.shape[0]
        if tail:  # dropped routes: unpermute masks these rows
            y_kept = torch.cat([y_kept, y_kept.new_zeros(tail, y_kept.shape[1])])
        return y_kept


# --------------------------------------------------------------------------------------------
# Tagging and the DeepSpeed marker
# --------------------------------------------------------------------------------------------


def _marker_class() -> type:
    class ExpertParallelMarker(MoE):
        """Stateless stand-in that makes DeepSpeed enable its MoE code paths (see module docstring).

        Args:
            num_experts: global experts per MoE layer.
            ep_size: expert-parallel size.
        """

        def __init__(self, num_experts: int, ep_size: int) -> None:
            nn.Module.__init__(self)  # deliberately not MoE.__init__: no gate, no experts
            self.num_experts, self.ep_size = num_experts, ep_size
            self.expert_group_name = ep_group_name(ep_size)
            self.num_local_experts = 0  # holds no expert weights (checkpoint.py saves the shards)
            self.enable_expert_tensor_parallelism = False
            self.use_residual = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            create_expert_groups(self.ep_size)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("ExpertParallelMarker is a tag for DeepSpeed and is never called")

        def extra_repr(self) -> str:
            return f"num_experts={self.num_experts}, ep_size={self.ep_size} (DeepSpeed MoE tag, no weights)"

    return ExpertParallelMarker


def ExpertParallelMarker(num_experts: int, ep_size: int) -> nn.Module:  # noqa: N802 - a class factory
    """Build the marker (the class derives from deepspeed's MoE, so it is made on first use)."""
    global _MARKER
    if _MARKER is None:
        _MARKER = _marker_class()
    return _MARKER(num_experts, ep_size)


_MARKER: Optional[type] = None


def is_expert_param(p: torch.Tensor) -> bool:
    """Whether ``p`` is tagged as an expert-parallel parameter (DeepSpeed's ``is_moe_param``)."""
    return getattr(p, "allreduce", True) is False


def tag_expert_params(model: nn.Module, ep_size: int) -> int:
    """Tag every routed-expert parameter as DeepSpeed's ``Experts`` does; returns how many.

    Args:
        model: the model holding :class:`~sparse_dit.moe.MoEFeedForward` layers.
        ep_size: expert-parallel size (names the group).
    """
    n = 0
    for layer in moe_layers(model):
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = ep_group_name(ep_size)
            n += 1
    return n


def setup_expert_parallel(model: nn.Module, ep_size: int) -> dict[str, int]:
    """Shard every MoE layer of ``model`` over the expert-parallel group of this rank.

    Call after ``torch.distributed`` is initialised and before the engine is built (the
    optimizer must see the sharded, tagged parameters).

    Args:
        model: a :class:`~sparse_dit.dit.SparseDiT` (modified in place).
        ep_size: expert-parallel size; 1 leaves the model untouched.

    Returns:
        ``{"ep_size", "ep_rank", "expert_offset", "num_local_experts"}``.
    """
    if ep_size == 1:
        return {"ep_size": 1, "ep_rank": 0, "expert_offset": 0, "num_local_experts": -1}
    create_expert_groups(ep_size)
    group = groups._get_expert_parallel_group(ep_group_name(ep_size))
    ep_rank = dist.get_rank(group=group)
    layers = list(moe_layers(model))
    if not layers:
        raise ConfigError(f"parallel.ep_size={ep_size} needs MoE layers, but the model has none")
    for layer in layers:
        if layer.num_experts % ep_size:
            raise ConfigError(f"parallel.ep_size={ep_size} does not divide num_experts={layer.num_experts}")
        layer.shard_experts(ep_rank, ep_size, AllToAllDispatcher(group, ep_size))
    tag_expert_params(model, ep_size)
    model.add_module("expert_parallel_marker", ExpertParallelMarker(layers[0].num_experts, ep_size))
    lo, hi = layers[0].expert_slice
    return {"ep_size": ep_size, "ep_rank": ep_rank, "expert_offset": lo, "num_local_experts": hi - lo}


def gather_expert_tensor(local: torch.Tensor, ep_size: int) -> torch.Tensor:
    """Concatenate a local expert shard (L, ...) from every rank of the EP group into (E, ...).

    Args:
        local: this rank's slice along the expert axis.
        ep_size: expert-parallel size (1 returns ``local``).
    """
    if ep_size == 1:
        return local
    group = groups._get_expert_parallel_group(ep_group_name(ep_size))
    parts = [torch.empty_like(local) for _ in range(ep_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, 0)
