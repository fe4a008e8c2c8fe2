"""MoE layer speed: forward+backward time of MoE / dense FFN at equal active FLOPs (issue 3).

Runs side by side in one process, round-robin (dense, ours, DeepSpeed cf 1.0, DeepSpeed cf 1.25
in turn, repeated), and prints median times and the median of the per-round ratios, so that
load from other processes hits every contender alike. Shapes (issue 3):

    A: d=384, 4096 tokens,  E=8,  k=2
    B: d=768, 16384 tokens, E=8,  k=2
    C: d=512, 4096 tokens,  E=64, k=8 (fine-grained)

The dense FFN is the GELU-tanh MLP of width 4d; the MoE experts get the width that
:func:`sparse_dit.flops.match_compute` picks (router included), so both do the same active
MACs per token. DeepSpeed's ``deepspeed.moe.layer.MoE`` gets the same expert module (a dense
``FeedForward`` of the expert width) and runs in a single-process gloo group.

    python benchmarks/moe_layer.py                       # all shapes, fp32 + bf16, with DeepSpeed
    python benchmarks/moe_layer.py --shapes A C --dtypes fp32 --repeats 7 --no-deepspeed
    python benchmarks/moe_layer.py --backends fused_local grouped_mm   # compare our expert backends
    python benchmarks/moe_layer.py --threads 1                  # intrinsic overhead, less sensitive to load
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# OpenMP threads that spin while waiting (libgomp's default) turn every parallel region into a
# scheduler lottery when other processes load the cores: on this shared 2-core machine, with
# load average 6-7, a dense FFN step took 350 ms spinning and 196 ms passive, and the MoE layer
# (many more, smaller parallel regions) 827 ms vs 235 ms. PASSIVE is set before torch starts
# OpenMP; pass OMP_WAIT_POLICY=ACTIVE in the environment to measure the default behaviour.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from sparse_dit.config import ModelConfig  # noqa: E402
from sparse_dit.modules.mlp import FeedForward  # noqa: E402
from sparse_dit.moe import MoEFeedForward  # noqa: E402
from sparse_dit.flops import match_compute  # noqa: E402
from sparse_dit.moe.ops import EXPERT_BACKENDS, grouped_mm_aligned, plan_routes  # noqa: E402

SHAPES = {"A": (384, 4096, 8, 2), "B": (768, 16384, 8, 2), "C": (512, 4096, 64, 8)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _init_dist() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        # A single-process gloo group; without RANK/WORLD_SIZE DeepSpeed tries MPI discovery.
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(key, value)
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", rank=0, world_size=1, verbose=False)


def _deepspeed_moe(d: int, h: int, E: int, k: int, cf: float) -> torch.nn.Module:
    from deepspeed.moe.layer import MoE

    moe = MoE(
        hidden_size=d, expert=FeedForward(d, h), num_experts=E, ep_size=1, k=k,
        capacity_factor=cf, eval_capacity_factor=cf, min_capacity=4, drop_tokens=True,
        use_rts=False, top2_2nd_expert_sampling=False,
    )
    moe.set_deepspeed_parallelism()
    return moe


def _step(model: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    t0 = time.perf_counter()
    out = model(x)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(grad)
    t = time.perf_counter() - t0
    x.grad = None
    for p in model.parameters():
        p.grad = None
    return t


def bench_shape(name: str, dtype: torch.dtype, repeats: int, deepspeed: bool, backends: list[str]) -> dict[str, float]:
    d, T, E, k = SHAPES[name]
    dense_cfg = ModelConfig(hidden_size=d, num_heads=d // 64, mlp_ratio=4.0)
    cfg = match_compute(dense_cfg, num_experts=E, top_k=k)
    h = cfg.moe.expert_hidden_dim
    torch.manual_seed(0)
    models: dict[str, torch.nn.Module] = {"dense": FeedForward(d, 4 * d)}
    for b in backends:
        moe = MoEFeedForward(d, h, E, k, backend=b)
        if b == "grouped_mm" and not grouped_mm_aligned(d, h, dtype):
            print(f"  (moe[grouped_mm] skipped: expert width {h} is not 16-byte aligned in {dtype})")
            continue
        models[f"moe[{b}]"] = moe
    if deepspeed:
        models["deepspeed cf1.0"] = _deepspeed_moe(d, h, E, k, 1.0)
        models["deepspeed cf1.25"] = _deepspeed_moe(d, h, E, k, 1.25)
    for m in models.values():
        m.to(dtype)
    B = 4
    x = torch.randn(B, T // B, d, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, T // B, d, dtype=dtype)
    times: dict[str, list[float]] = {n: [] for n in models}
    for n, m in models.items():  # warm-up (allocator, DeepSpeed's lazy init)
        _step(m, x, grad)
    for _ in range(repeats):
        for n, m in models.items():
            times[n].append(_step(m, x, grad))
    med = {n: statistics.median(v) for n, v in times.items()}
    ratios = {n: statistics.median(a / b for a, b in zip(v, times["dense"])) for n, v in times.items()}
    print(f"\nshape {name}: d={d} tokens={T} E={E} k={k} expert_hidden={h} dense_hidden={4 * d} dtype={str(dtype)[6:]}")
    for n, m in models.items():
        if isinstance(m, MoEFeedForward) and EXPERT_BACKENDS[m.experts.resolve_backend(x, True)].token_space:
            with torch.no_grad():
                r = m.router(x)
            plan = plan_routes(r.expert_idx, E, T)
            print(f"  {n} layout: cap {plan.cap} rows/expert, {len(plan.spans)} overflow spans, padding {plan.padding:.1%}")
    print(f"  {'model':<22}{'median ms':>12}{'/ dense':>10}")
    for n in models:
        print(f"  {n:<22}{med[n] * 1e3:>12.1f}{ratios[n]:>10.3f}")
    return ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's MoE")
    p.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "fused_local", "loop", "grouped_mm"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, 2 here)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"load avg {tuple(round(v, 2) for v in os.getloadavg())}"
    )
    if not args.no_deepspeed:
        _init_dist()
    for s in args.shapes:
        for dt in args.dtypes:
            bench_shape(s, DTYPES[dt], args.repeats, not args.no_deepspeed, args.backends)
    print(f"\nload avg at end {tuple(round(v, 2) for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
