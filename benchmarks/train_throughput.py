"""Trainer throughput: dense vs compute-matched MoE, and EP=1 vs EP=2 on 2 CPU ranks.

Everything goes through the real trainer (``sparse_dit.recipes.train``: DeepSpeed engine, ZeRO,
EMA, logging), measured side by side in one invocation, alternating the configurations
``--repeats`` times and keeping each one's best (other processes on a shared machine only ever
slow a run down). Samples/s is the trainer's own figure: global batch / step time, first
step excluded.

1. One process: dense model vs its compute-matched MoE (``sparse_dit.flops.match_compute``:
   8 experts, top-2, forward MACs equal within 1 %), ZeRO-2.
2. Two CPU ranks (gloo), MoE, ZeRO-2: EP=1 (experts replicated, plain data parallelism) vs
   EP=2 (experts sharded, tokens exchanged by all-to-all).

Every rank runs one thread (OMP_NUM_THREADS=1), so 1 process uses 1 core and 2 ranks use 2;
on a shared, loaded machine two-thread processes stall on each other (measured: 10x slower).

    python benchmarks/train_throughput.py            # about 3 minutes on 2 cores
    python benchmarks/train_throughput.py --quick    # fewer steps, one repeat
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def base_recipe(steps: int, out: str) -> dict:
    """A CPU-sized recipe: d=128, 4 blocks, 8 frames of 16x16 pixels (512 tokens), batch 8."""
    return {
        "model": {"in_channels": 3, "patch_size": [1, 2, 2], "hidden_size": 128, "depth": 4, "num_heads": 4,
                  "text_dim": 32, "cross_attention": True},
        "diffusion": {"timestep_sampling": "uniform", "shift": 1.0},
        "train": {"max_steps": steps, "global_batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "save_every": 10**6,
                  "log_every": 10**6, "seed": 0},
        "data": {"source": "synthetic", "num_videos": 64, "num_frames": 8, "height": 16, "width": 16},
        "parallel": {"zero_stage": 2, "ep_size": 1, "precision": "fp32"},
        "output_dir": out,
    }


def moe_recipe(steps: int, out: str) -> dict:
    """The base recipe's model, compute-matched with 8 experts, top-2."""
    from sparse_dit.config import ModelConfig
    from sparse_dit.flops import match_compute
    from sparse_dit.schema import from_dict, to_dict

    r = base_recipe(steps, out)
    dense = from_dict(ModelConfig, r["model"])
    r["model"] = to_dict(match_compute(dense, num_experts=8, top_k=2))
    return r


def run_ranks(recipe: dict, world: int, tmp: Path) -> float:
    """Train ``recipe`` on ``world`` CPU ranks in fresh processes; the median samples/s of steps 2+."""
    from sparse_dit.parallel.engine import free_port

    path = tmp / f"recipe_{os.getpid()}_{world}_{recipe['parallel']['ep_size']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "sparse_dit.recipes.train", str(path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("training failed:\n" + outs[0][-3000:])
    rows = [json.loads(line) for line in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, repeats = (8, 1) if args.quick else (args.steps, args.repeats)
    import torch

    from sparse_dit.config import ModelConfig
    from sparse_dit.flops import count
    from sparse_dit.schema import from_dict

    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        configs = {
            "1 process, dense": (base_recipe, 1, 1),
            "1 process, MoE E8A2 (matched)": (moe_recipe, 1, 1),
            "2 ranks, MoE, EP=1": (moe_recipe, 2, 1),
            "2 ranks, MoE, EP=2": (moe_recipe, 2, 2),
        }
        for rep in range(repeats):
            for name, (make, world, ep) in configs.items():
                recipe = make(steps, str(tmp / f"run_{rep}_{name.replace(' ', '').replace(',', '_')}"))
                recipe["parallel"]["ep_size"] = ep
                sps = run_ranks(recipe, world, tmp)
                best[name] = max(best.get(name, 0.0), sps)
                print(f"  [{rep + 1}/{repeats}] {name}: {sps:.1f} samples/s", flush=True)
        dense_cfg = from_dict(ModelConfig, base_recipe(1, "x")["model"])
        moe_cfg = from_dict(ModelConfig, moe_recipe(1, "x")["model"])
        cd, cm = count(dense_cfg, (3, 8, 16, 16), 48), count(moe_cfg, (3, 8, 16, 16), 48)
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPU cores, {steps} steps, best of {repeats}")
    print(f"dense: {cd['total_params'] / 1e6:.2f}M params, {cd['gmacs'] * 1e3:.1f} MMACs/sample; "
          f"MoE E8A2: {cm['total_params'] / 1e6:.2f}M params ({cm['active_params'] / 1e6:.2f}M active), {cm['gmacs'] * 1e3:.1f} MMACs/sample")
    print("| configuration | samples/s | ratio |")
    print("|---|---|---|")
    ref = {"1 process": best["1 process, dense"], "2 ranks": best["2 ranks, MoE, EP=1"]}
    for name, sps in best.items():
        base = ref[name.split(",")[0]]
        print(f"| {name} | {sps:.1f} | {sps / base:.2f} |")


if __name__ == "__main__":
    main()
