"""What the router statistics cost at the quickstart's size (issue 11/15: "collection must be cheap").

The quickstart's sparse model (``recipes/quickstart/moe.yaml``: d=128, 4 MoE layers of 4 experts,
top-1, 288 tokens per clip, batch 8), measured piece by piece, each against what it rides on:

1. per training micro-step: ``StepRouting.from_aux`` + ``+`` + ``pack``/``unpack`` and the extra
   all-reduce (a one-rank gloo group, as ``make demo`` runs), against a training step of the same
   model (forward with aux, backward, AdamW; bf16 autocast, fp32 experts, as the recipe);
2. per log step (every ``train.log_every`` = 10 steps): ``sparse_dit.recipes.tb.add_routing``
   (per-layer scalars, histograms, two heat-map PNGs) into a real ``SummaryWriter``;
3. evaluation: the quickstart's headline sampling (16 videos per batch, 20 Euler steps) with and
   without the ``RoutingCollector`` hooks, alternated, best of ``--repeats``;
4. the report's routing PNGs (``sparse_dit.evals.routing.plot_routing``) and markdown.

It prints each piece in ms, its share of what it rides on, and the total it adds to ``make demo``
(2,000 steps, 200 log steps, 3 headline batches). Best of the repeats for every timing (other
processes only slow a run down); run it on an idle machine.

    OMP_NUM_THREADS=1 python benchmarks/routing_stats_overhead.py            # ~1-2 minutes
    OMP_NUM_THREADS=1 python benchmarks/routing_stats_overhead.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sparse_dit.diffusion import sample
from sparse_dit.dit import SparseDiT
from sparse_dit.evals.routing import plot_routing, routing_markdown
from sparse_dit.moe.routing_stats import RoutingCollector, StepRouting
from sparse_dit.presets import load_recipe
from sparse_dit.recipes.tb import add_routing, open_writer

REPO = Path(__file__).resolve().parents[1]
STEPS, LOG_EVERY, EVAL_BATCHES = 2000, 10, 3  # make demo: steps per model, train.log_every, 48 videos / 16


def best(fn, repeats: int, inner: int = 1) -> float:
    """Best wall time of ``fn`` over ``repeats`` (each ``inner`` calls), in ms per call."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) * 1e3 / inner)
    return min(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and sampler steps (a smoke run)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    reps = 2 if args.quick else args.repeats
    torch.manual_seed(0)
    recipe = load_recipe(REPO / "recipes" / "quickstart" / "moe.yaml")
    cfg = recipe.model
    model = SparseDiT(cfg)
    with torch.no_grad():  # a trained model's blocks are open; adaLN-Zero's are shut at init
        for block in model.blocks:
            block.adaLN_modulation[-1].bias.normal_(std=0.5)
        model.final_layer.linear.weight.normal_(std=0.02)
    B, shape = recipe.train.global_batch_size, (cfg.in_channels, recipe.data.num_frames, recipe.data.height, recipe.data.width)
    x, t = torch.randn(B, *shape), torch.rand(B)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, aux = model(x, t, return_aux=True)
        (out.float().square().mean() + aux.loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_ms = best(train_step, reps, 3)
    _, aux = model(x, t, return_aux=True)
    auxes = [a._replace(loss=a.loss.detach()) for a in aux.moe]

    # 1. per micro-step + the all-reduce of one step
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)

        def per_step() -> None:
            r = StepRouting.from_aux(auxes)
            r = r + StepRouting.from_aux(auxes)
            flat = r.pack()
            dist.all_reduce(flat)
            r.unpack(flat)

        micro_ms = best(per_step, reps, 200)
        dist.destroy_process_group()
    routing = StepRouting.from_aux(auxes)
    # 2. per log step
    with tempfile.TemporaryDirectory() as tmp:
        w = open_writer(tmp)
        step = [0]

        def log() -> None:
            step[0] += 1
            add_routing(w, routing, step[0])

        log_ms = best(log, reps, 20)
        w.close()
    # 3. sampling with and without the hooks (alternated)
    n_steps = 4 if args.quick else recipe.diffusion.num_inference_steps
    eval_shape = (4 if args.quick else 16, *shape)
    model.eval()
    plain, hooked, summary = [], [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        sample(model, eval_shape, num_inference_steps=n_steps, generator=torch.Generator().manual_seed(0))
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with RoutingCollector(model) as rc:
            sample(model, eval_shape, num_inference_steps=n_steps, generator=torch.Generator().manual_seed(0))
        hooked.append(time.perf_counter() - t0)
        summary = rc.summary()
    sample_ms, hooked_ms = min(plain) * 1e3, min(hooked) * 1e3
    # 4. report
    report = {"models": {"sparse": {"routing": summary}}, "headline_split": "id"}
    with tempfile.TemporaryDirectory() as tmp:
        plot_ms = best(lambda: (plot_routing(report, tmp), routing_markdown(report)), min(reps, 3))

    added_s = (STEPS * micro_ms + STEPS / LOG_EVERY * log_ms + EVAL_BATCHES * (hooked_ms - sample_ms) + plot_ms) / 1e3
    print(f"quickstart sparse model: d={cfg.hidden_size}, {cfg.depth} blocks, {cfg.moe.num_experts} experts top-{cfg.moe.top_k}, "
          f"batch {B}, clip {shape}")
    print(f"training step (fwd+bwd+AdamW, bf16 autocast):    {step_ms:8.2f} ms")
    print(f"  routing stats per step (pack + all-reduce):    {micro_ms:8.3f} ms  ({100 * micro_ms / step_ms:.2f} % of a step)")
    print(f"  TensorBoard routing per log step:              {log_ms:8.3f} ms  ({100 * log_ms / LOG_EVERY / step_ms:.2f} % of a "
          f"step at log_every={LOG_EVERY})")
    print(f"sampling {eval_shape[0]} videos x {n_steps} steps:          {sample_ms:8.1f} ms; with the collector {hooked_ms:.1f} ms "
          f"({100 * (hooked_ms / sample_ms - 1):+.2f} %)")
    print(f"report routing PNGs + markdown:                  {plot_ms:8.1f} ms")
    print(f"added to make demo (sparse run: {STEPS} steps, {STEPS // LOG_EVERY} log steps, {EVAL_BATCHES} eval batches, report): "
          f"about {added_s:.1f} s")
    if os.environ.get("OMP_NUM_THREADS") is None:
        print("(set OMP_NUM_THREADS=1 as make demo's trainer runs one process on the shared cores)")


if __name__ == "__main__":
    main()
