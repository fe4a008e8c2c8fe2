"""Batch-level routing at inference: how far each inference rule is from the training rule.

A model trained with ``model.moe.router: batch`` routes, in training, the top ``k * T``
token-expert scores of its micro-batch. At inference the batch is different, so it uses a rule
that does not look at the batch (sparse_dit/moe/routers/batch.py). This script takes a trained
run, draws fresh clips (the recipe's data source with another seed), gives every sample a fixed
t (an even grid over (0, 1)) and fixed noise, and predicts the velocity with every batch router

* ``pool``: the training rule itself, a pool over ``--batch`` samples (the reference);
* ``threshold``: every pair whose score reaches the EMA threshold (the default inference rule);
* ``sample``: a pool over each sample's own scores (top ``k * N`` of the sample).

It prints, per rule, the flow-matching MSE against the true velocity, the relative difference
of the prediction from the pool's, and the experts per token (overall and per t quarter), as
a JSON line. Quality numbers, not timings: they do not depend on machine load.

    python benchmarks/batch_routing_inference.py RUN_DIR [--samples 64] [--batch 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from sparse_dit.diffusion import FlowMatching
from sparse_dit.dit import SparseDiT
from sparse_dit.moe import BatchRouter
from sparse_dit.presets import load_recipe
from sparse_dit.recipes.batches import Conditioner, build_dataset

RULES = ("pool", "threshold", "sample")


def set_rule(model: SparseDiT, rule: str) -> None:
    """Route every batch router of ``model`` by ``rule`` (the rest of the model stays in eval mode)."""
    for m in model.modules():
        if isinstance(m, BatchRouter):
            m.train(rule == "pool")
            m.inference_rule = "threshold" if rule == "pool" else rule


@torch.no_grad()
def measure(run_dir: Path, samples: int = 64, batch: int = 8, seed: int = 1234) -> dict:
    """Per-rule MSE, difference from the pool and experts per token on ``samples`` fresh clips."""
    recipe = load_recipe(run_dir / "recipe.yaml")
    model = SparseDiT.from_pretrained(run_dir / "final").eval()
    routers = [m for m in model.modules() if isinstance(m, BatchRouter)]
    if not routers:
        raise SystemExit(f"{run_dir}: the model has no router='batch' layer")
    fresh = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, num_videos=samples),
                                train=dataclasses.replace(recipe.train, seed=seed))
    data = build_dataset(fresh)
    cond = Conditioner(recipe, "cpu", torch.float32)
    g = torch.Generator().manual_seed(seed)
    fm = FlowMatching(recipe.diffusion)
    out: dict = {"run": str(run_dir), "samples": samples, "batch": batch, "top_k": model.config.moe.top_k,
                 "thresholds": [round(float(r.threshold), 5) for r in routers]}
    t_all = (torch.arange(samples, dtype=torch.float32) + 0.5) / samples  # an even grid of t
    perm = torch.randperm(samples, generator=g)  # every batch mixes noise levels, as in training
    res = {r: {"mse": [], "v": [], "routes": [], "t": []} for r in RULES}
    seen: list[torch.Tensor] = []

    def record(router, inputs, routing) -> None:  # (B,) routes per token of each sample in this layer
        B, N = inputs[0].shape[:2]
        seen.append(torch.bincount(routing.token_of_route() // N, minlength=B).float() / N)

    for r in routers:
        r.register_forward_hook(record)
    for i in range(0, samples, batch):
        idx = perm[i : i + batch].tolist()
        items = [data[j] for j in idx]
        x0 = torch.stack([it["video"] for it in items])
        b = {"video": x0, "caption": [it.get("caption", "") for it in items]}
        if all("label" in it for it in items):
            b["label"] = torch.tensor([int(it["label"]) for it in items])
        kwargs = cond(b)
        t = t_all[idx]
        noise = torch.randn(x0.shape, generator=g)
        x_t = fm.add_noise(x0, noise, t)
        for rule in RULES:
            set_rule(model, rule)
            seen.clear()
            v = model(x_t, t, **kwargs)[:, : x0.shape[1]]
            res[rule]["mse"].append(((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3, 4)))
            res[rule]["v"].append(v)
            res[rule]["routes"].append(torch.stack(seen).mean(0))  # routes per token of each sample, mean over layers
            res[rule]["t"].append(t)
    set_rule(model, "threshold")
    ref_v = torch.cat(res["pool"]["v"])
    for rule in RULES:
        r = res[rule]
        mse, routes, t = torch.cat(r["mse"]), torch.cat(r["routes"]), torch.cat(r["t"])
        v = torch.cat(r["v"])
        quarters = [float(routes[(t >= q / 4) & (t < (q + 1) / 4)].mean()) for q in range(4)]
        out[rule] = {
            "mse": round(float(mse.mean()), 5),
            "rel_diff_from_pool": round(float((v - ref_v).norm() / ref_v.norm()), 5),
            "experts_per_token": round(float(routes.mean()), 4),
            "experts_per_token_by_t_quarter": [round(q, 3) for q in quarters],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished run folder (final/ + recipe.yaml) trained with model.moe.router: batch")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="samples per pool for the training rule (the recipe's micro-batch)")
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.run, a.samples, a.batch, a.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
