"""Sampling latency of sparse (MoE) vs dense video DiTs of equal active compute (issue 11).

The MoE layers take their no-autograd inference path whenever gradients are off
(sparse_dit/moe/ops/inference.py), which the sampler always is. This script times the real
sampler (``sparse_dit.diffusion.sample``, what ``sparse-dit eval``'s latency and the pipeline run)
on both models side by side, round-robin (dense, sparse, dense, sparse, ...), and prints the
median latencies and the median of the per-round ratios, so that load from other processes hits
both alike. Sizes (issue 11's targets, fp32):

    quickstart: recipes/quickstart/{dense,moe}.yaml (d=128, 4 blocks, E4A1 full-width experts),
                one 8x24x24 clip (288 tokens), 3 context frames, 20 Euler steps     target <= 1.15x
    s2:         S/2 vs S/2-E8A2 (compute-matched experts), one 4x8x32x32 latent (2048 tokens),
                32 text tokens, 10 Euler steps                                       target <= 1.10x

    python benchmarks/moe_inference.py                          # both sizes, 5 rounds (idle machine)
    python benchmarks/moe_inference.py --sizes quickstart --repeats 9
    python benchmarks/moe_inference.py --precision bf16-autocast   # as the quickstart's eval samples
    python benchmarks/moe_inference.py --tiny                   # seconds: checks the script runs
    python benchmarks/moe_inference.py --processes 5            # each size in 5 fresh processes
    python benchmarks/moe_inference.py --compare-native         # also the sparse model on the Python path
    python benchmarks/moe_inference.py --compare-expert-threads # ... and on it without expert threads

The ratio moves between processes more than between rounds of one process (on the 2-core Xeon,
the quickstart at one thread measured 1.14-1.23 over 12 processes of identical code, 7 rounds
each): with ``--processes N`` each size runs in N fresh processes, one after another, and the
script prints every process's ratio, their median and their range.

Models are freshly initialised (fixed seed): the work per step does not depend on the weights,
except through how evenly the router spreads the tokens (a fresh router is near-uniform). Put the
printed CPU model name next to any number (shared/PITFALLS.md: the ratio changes between CPUs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Sleeping (not spinning) OpenMP workers: see benchmarks/moe_layer.py. Set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from sparse_dit.diffusion import sample  # noqa: E402
from sparse_dit.dit import SparseDiT  # noqa: E402
from sparse_dit.presets import load_recipe, preset_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _sizes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per size: the two configs, the latent shape, context frames, steps and conditioning."""
    qs_dense = load_recipe(ROOT / "recipes/quickstart/dense.yaml").model
    qs_moe = load_recipe(ROOT / "recipes/quickstart/moe.yaml").model
    s2_dense, s2_moe = preset_config("S/2"), preset_config("S/2-E8A2")
    s2_latent = tuple(args.s2_latent)
    return {
        "quickstart": {"dense": qs_dense, "sparse": qs_moe, "shape": (1, qs_dense.in_channels, 8, 24, 24), "context": 3,
                       "steps": args.steps or 20, "text_len": 0, "target": 1.15},
        "s2": {"dense": s2_dense, "sparse": s2_moe, "shape": (1, s2_dense.in_channels, *s2_latent), "context": 0,
               "steps": args.steps or 10, "text_len": 32, "target": 1.10},
    }


def _runner(model: SparseDiT, spec: dict[str, Any], autocast: bool) -> Callable[[], None]:
    """One generation with the real sampler, as ``sparse_dit.evals.cost.measure_generation`` runs it."""
    shape = spec["shape"]
    B, _, T = shape[:3]
    g = torch.Generator().manual_seed(0)
    context = mask = None
    if spec["context"]:
        context = torch.rand(shape, generator=g).mul(2).sub(1)
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[:, : spec["context"]] = True
    kwargs = None
    if spec["text_len"] and model.config.text_dim:
        kwargs = {"text_emb": torch.randn(B, spec["text_len"], model.config.text_dim, generator=g),
                  "text_mask": torch.ones(B, spec["text_len"], dtype=torch.bool)}

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            sample(model, shape, kwargs, num_inference_steps=spec["steps"], generator=torch.Generator().manual_seed(0),
                   context=context, context_mask=mask)

    return run


def _with_env(run: Callable[[], None], name: str, value: str) -> Callable[[], None]:
    """``run`` with the environment variable ``name`` set to ``value`` (the MoE layers read their
    switches at each call): ``SPARSE_DIT_NATIVE=0`` = the Python path, ``SPARSE_DIT_EXPERT_THREADS=0``
    = the Python path without expert threads."""

    def wrapped() -> None:
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            run()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old

    return wrapped


# The extra sparse runners: (flag, runner name, what it switches off, environment).
VARIANTS = [
    ("compare_native", "sparse-python", "native op off: SPARSE_DIT_NATIVE=0", {"SPARSE_DIT_NATIVE": "0"}),
    ("compare_expert_threads", "sparse-intra", "native op and expert threads off",
     {"SPARSE_DIT_NATIVE": "0", "SPARSE_DIT_EXPERT_THREADS": "0"}),
]


def bench_size(name: str, spec: dict[str, Any], repeats: int, autocast: bool, variants: tuple[str, ...] = ()) -> float:
    torch.manual_seed(0)
    models = {k: SparseDiT(spec[k]).eval() for k in ("dense", "sparse")}
    runs = {k: _runner(m, spec, autocast) for k, m in models.items()}
    for flag, runner, _, env in VARIANTS:  # the same sparse model again, with a path switched off
        if flag in variants:
            run = runs["sparse"]
            for key, value in env.items():
                run = _with_env(run, key, value)
            runs[runner] = run
    for run in runs.values():  # warm-up (allocator, workspaces, oneDNN kernels)
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    ratio = statistics.median(s / d for s, d in zip(times["sparse"], times["dense"]))
    moe = spec["sparse"].moe
    tokens = 1
    for s, p in zip(spec["shape"][2:], spec["dense"].patch_size):
        tokens *= s // p
    print(f"\n{name}: d={spec['dense'].hidden_size} depth={spec['dense'].depth}, E{moe.num_experts}A{moe.top_k} expert width "
          f"{moe.expert_hidden_dim} (dense FFN {spec['dense'].ffn_hidden}), latent {tuple(spec['shape'][1:])} = {tokens} tokens, "
          f"{spec['steps']} steps, {spec['context']} context frames, {repeats} rounds")
    for k in runs:
        print(f"  {k:<13} median {statistics.median(times[k]) * 1e3:9.1f} ms  (runs {', '.join(f'{t * 1e3:.0f}' for t in times[k])})")
    print(f"  sparse / dense: {ratio:.3f}  (median of per-round ratios; target <= {spec['target']:.2f})")
    for flag, runner, what, _ in VARIANTS:
        if flag in variants:
            off = statistics.median(s / d for s, d in zip(times[runner], times["dense"]))
            print(f"  {runner} / dense: {off:.3f}  ({what})")
    return ratio


def _across_processes(args: argparse.Namespace) -> int:
    """Each size in ``args.processes`` fresh processes of this script; the median and range of their ratios."""
    child = ["--repeats", str(args.repeats), "--precision", args.precision, "--s2-latent", *map(str, args.s2_latent)]
    child += (["--steps", str(args.steps)] if args.steps else []) + (["--threads", str(args.threads)] if args.threads else [])
    child += ["--tiny"] if args.tiny else []
    child += [f"--{flag.replace('_', '-')}" for flag, *_ in VARIANTS if getattr(args, flag)]
    targets = {name: spec["target"] for name, spec in _sizes(args).items()}
    print(f"{_cpu_name()}; each size in {args.processes} fresh processes: {' '.join(child)}", flush=True)
    for name in args.sizes:
        ratios: list[float] = []
        offs: dict[str, list[float]] = {runner: [] for _, runner, _, _ in VARIANTS}
        for k in range(args.processes):
            out = subprocess.run([sys.executable, __file__, "--sizes", name, *child], capture_output=True, text=True, check=False)
            line = next((ln.strip() for ln in out.stdout.splitlines() if ln.strip().startswith("sparse / dense:")), None)
            if out.returncode or line is None:
                raise SystemExit(f"process {k + 1} of size {name} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-500:]}")
            ratios.append(float(line.split(":")[1].split()[0]))
            print(f"  {name} process {k + 1}: {line}", flush=True)
            for runner in offs:
                off = next((ln.strip() for ln in out.stdout.splitlines() if ln.strip().startswith(f"{runner} / dense:")), None)
                if off is not None:
                    offs[runner].append(float(off.split(":")[1].split()[0]))
                    print(f"  {name} process {k + 1}: {off}", flush=True)
        print(f"{name}: sparse / dense over {len(ratios)} processes: median {statistics.median(ratios):.3f}, range "
              f"[{min(ratios):.3f}, {max(ratios):.3f}] (target <= {targets[name]:.2f})", flush=True)
        for (_, runner, what, _), vals in zip(VARIANTS, offs.values()):
            if vals:
                print(f"{name}: {runner} / dense ({what}) over {len(vals)} processes: median "
                      f"{statistics.median(vals):.3f}, range [{min(vals):.3f}, {max(vals):.3f}]", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["quickstart", "s2"], choices=["quickstart", "s2"])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per size (each: one dense + one sparse generation)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: 20 quickstart, 10 s2)")
    p.add_argument("--s2-latent", type=int, nargs=3, default=[8, 32, 32], metavar=("T", "H", "W"),
                   help="latent frames, height, width of the s2 size (default 8 32 32: 2048 tokens)")
    p.add_argument("--precision", choices=["fp32", "bf16-autocast"], default="fp32",
                   help="fp32 (issue 11's targets) or the quickstart eval's bf16 autocast (MoE experts stay fp32 there)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--tiny", action="store_true", help="smoke test: 1 round, 2 steps, s2 latent 1x8x8")
    p.add_argument("--compare-native", action="store_true",
                   help="also time the sparse model on the Python path (native op off, docs/moe.md), in the same rounds")
    p.add_argument("--compare-expert-threads", action="store_true",
                   help="also time the sparse model on the Python path without expert threads, in the same rounds")
    p.add_argument("--processes", type=int, default=1,
                   help="run each size in this many fresh processes and report the median and range of their ratios")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats} must be >= 1")
    if args.processes < 1:
        p.error(f"--processes={args.processes} must be >= 1")
    if args.processes > 1:
        return _across_processes(args)
    if args.tiny:
        args.repeats, args.steps, args.s2_latent = 1, 2, [1, 8, 8]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{_cpu_name()}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, {args.precision}, load avg {tuple(round(v, 2) for v in os.getloadavg())}")
    sizes = _sizes(args)
    for name in args.sizes:
        bench_size(name, sizes[name], args.repeats, args.precision == "bf16-autocast",
                   tuple(flag for flag, *_ in VARIANTS if getattr(args, flag)))
    print(f"\nload avg at end {tuple(round(v, 2) for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
