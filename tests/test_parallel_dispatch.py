"""The all-to-all expert-parallel dispatcher equals the local one, outputs and gradients (2 gloo ranks).

No DeepSpeed here: two processes with a plain gloo group, so this runs in a few seconds. Each rank
routes its own tokens; the reference is the unsharded layer run on the same tokens. Expert
gradients of the shard must equal the reference's expert gradients summed over both ranks
(each expert sees both ranks' tokens), restricted to the shard's experts.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_dit.parallel.engine import free_port


def _case(kwargs: dict, rank: int, group) -> None:
    import copy

    from sparse_dit.moe import MoEFeedForward
    from sparse_dit.parallel.expert_parallel import AllToAllDispatcher

    torch.manual_seed(0)
    ref = MoEFeedForward(16, 24, **kwargs)
    ep = copy.deepcopy(ref).shard_experts(rank, 2, AllToAllDispatcher(group, 2))
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(3, 10 + 4 * rank, 16, generator=g)  # different token counts per rank
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, aux_ref = ref(x1)
    y_ep, aux_ep = ep(x2)
    w = torch.randn(y_ref.shape, generator=g)
    ((y_ref * w).sum() + aux_ref.loss).backward()
    ((y_ep * w).sum() + aux_ep.loss).backward()
    torch.testing.assert_close(y_ep, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ep.router.gate.weight.grad, ref.router.gate.weight.grad, rtol=1e-4, atol=1e-5)
    lo, hi = ep.expert_slice
    for name, p in ref.experts.named_parameters():
        full = p.grad.clone()
        dist.all_reduce(full, group=group)  # each expert sees the tokens of both ranks
        # fp32 sums over both ranks' tokens in another order than the reference: 1e-4 relative
        torch.testing.assert_close(getattr(ep.experts, name).grad, full[lo:hi], rtol=1e-4, atol=1e-5)


def _worker(rank: int, port: int, failures) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        group = dist.new_group([0, 1])
        cases = [
            dict(num_experts=4, top_k=2),
            dict(num_experts=8, top_k=1),
            dict(num_experts=4, top_k=2, activation="swiglu", shared_experts=1),
            dict(num_experts=4, top_k=2, capacity_factor=0.5),  # drops routes
            dict(num_experts=4, top_k=2, router="expert_choice"),
            dict(num_experts=2, top_k=1),  # one expert per rank: many empty sends
        ]
        for kw in cases:
            try:
                _case(kw, rank, group)
            except Exception as exc:  # report which case failed, keep the collectives aligned
                failures.append(f"rank {rank} {kw}: {type(exc).__name__}: {exc}")
                raise
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_all_to_all_dispatcher_matches_local_outputs_and_grads():
    ctx = mp.get_context("spawn")
    failures = ctx.Manager().list()
    mp.start_processes(_worker, args=(free_port(), failures), nprocs=2, start_method="spawn", join=True)
    assert not list(failures)


def test_bad_ep_size_is_rejected_by_the_layer():
    from sparse_dit.moe import MoEFeedForward

    layer = MoEFeedForward(16, 24, num_experts=6, top_k=2)
    with pytest.raises(ValueError, match="not divisible by ep_size=4"):
        layer.shard_experts(0, 4, None)
