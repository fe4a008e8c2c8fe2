"""``sparse-dit quickstart``: the main job that ``make demo`` runs.

On 2 CPU cores in under 30 minutes it

1. simulates a small physics dataset (PhyWorld's ``uniform`` scenario: one ball at constant
   velocity) and writes it as Hugging Face datasets (train, in-distribution and
   out-of-distribution validation);
2. trains the dense and the compute-matched sparse model of ``recipes/quickstart/dense.yaml``
   and ``moe.yaml`` with the library trainer (:func:`sparse_dit.recipes.train.train`, the
   DeepSpeed engine; ``--num-procs N`` runs it on N ranks through the deepspeed launcher, as
   ``sparse-dit train`` does): the same active MACs per sample, steps and batch, hence the same
   training FLOPs;
3. evaluates both on the same videos and noise (held-out loss, physics fidelity against the
   calibration baselines, PSNR/SSIM, inference cost) with :func:`sparse_dit.evals.compare`;
4. writes the comparison (``DIR/report.md``, ``DIR/report.json``, plots, sample GIFs,
   TensorBoard scalars), with the sparse model's routing per MoE layer while it sampled (expert
   load, max violation, router entropy, heat maps ``routing_sparse_*.png``; evals/routing.py).
   Each model's training TensorBoard is ``DIR/runs/<name>/tensorboard`` (the trainer's own).

Each model is an ordinary run: ``DIR/recipes/<name>.yaml`` is the exact recipe it trained
(the packaged file with this run's data path, output folder and budget), and
``sparse-dit train DIR/recipes/sparse.yaml`` reruns (or resumes) it alone.

``--budget X`` multiplies the training steps (and, below 1, shrinks the validation set and the
dataset): ``--budget 4`` trains four times longer for users with more time or a GPU; the tests
run the whole pipeline with ``--budget 0.01``. Why these settings: the comments of the two
recipe files and docs/world_model.md, where each choice was measured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from sparse_dit.config import ConfigError, RecipeConfig
from sparse_dit.data import write_physics_dataset
from sparse_dit.evals.compare import compare, load_split
from sparse_dit.evals.report import write_report
from sparse_dit.evals.stats_report import paired_difference
from sparse_dit.flops import count
from sparse_dit.presets import load_recipe
from sparse_dit.recipes.train import TrainingDiverged, launch, train
from sparse_dit.schema import to_dict

__all__ = ["LaunchFailed", "QUICKSTART_DATA", "RECIPE_FILES", "quickstart_recipes", "quickstart", "add_arguments", "run"]

# The packaged recipes of the two models (recipes/quickstart/), by report name.
RECIPE_FILES: dict[str, Path] = {
    "dense": Path(__file__).parent / "quickstart" / "dense.yaml",
    "sparse": Path(__file__).parent / "quickstart" / "moe.yaml",
}

# The simulated data (docs/world_model.md). Clip shape (frames, height, width) comes from the recipes.
QUICKSTART_DATA: dict[str, Any] = {
    "scenario": "uniform",
    # 4 fps: PhyWorld's speeds (1-4 units/s) become 0.6-2.4 px/frame at 24x24, so the ball visibly
    # moves (copy-last-frame's velocity error = the true speed, ~1.5 px/frame) but stays on screen.
    "fps": 4.0,
    "train_videos": 4096,
    "val_videos": 48,
}


def _val_videos(budget: float) -> int:
    # Below budget 0.25 the run is a smoke test of the pipeline: a few validation videos.
    return QUICKSTART_DATA["val_videos"] if budget >= 0.25 else 4


def quickstart_recipes(out: str | Path, budget: float = 1.0, seed: int = 0) -> dict[str, RecipeConfig]:
    """The dense and the sparse recipe of the quickstart for a run in ``out``.

    The packaged files with this run's data path (``out/data/train``), output folders
    (``out/runs/<name>``), seed and budget (steps x budget; below budget 0.25 fewer sampler
    steps and training videos).

    Args:
        out: the quickstart folder.
        budget: multiplies the training steps.
        seed: training seed.
    """
    out = Path(out)
    recipes = {}
    for name, path in RECIPE_FILES.items():
        base = load_recipe(path)
        steps = max(2, int(round(base.train.max_steps * budget)))
        sets = [
            f"data.path={out / 'data' / 'train'}",
            f"output_dir={out / 'runs' / name}",
            f"train.seed={seed}",
            f"train.max_steps={steps}",
            f"train.warmup_steps={min(base.train.warmup_steps, max(1, steps // 4))}",
            f"train.save_every={min(base.train.save_every, steps)}",
        ]
        if budget < 1:
            sets.append(f"data.num_videos={max(64, int(base.data.num_videos * budget))}")
        if budget < 0.25:
            sets.append("diffusion.num_inference_steps=4")
        recipes[name] = load_recipe(path, sets)
    return recipes


def _write_data(out: Path, recipe: RecipeConfig, budget: float, seed: int, log: Callable[[str], None]) -> dict[str, Path]:
    q, d = QUICKSTART_DATA, recipe.data
    n_train, n_val = d.num_videos, _val_videos(budget)
    paths = {"train": Path(d.path), "id": out / "data" / "val_id", "ood": out / "data" / "val_ood"}
    # Disjoint seeds: the validation scenes are never trained on.
    plan = {"train": ("id", n_train, seed), "id": ("id", n_val, seed + 1_000_001), "ood": ("ood", n_val, seed + 2_000_003)}
    spec = {k: [*v, q["scenario"], d.num_frames, d.height, d.width, q["fps"]] for k, v in plan.items()}
    marker = out / "data" / "plan.json"
    old = json.loads(marker.read_text()) if marker.is_file() else {}
    for name, (split, n, s) in plan.items():
        if old.get(name) == spec[name] and (paths[name] / "dataset_info.json").is_file():
            continue  # already written with these settings (a rerun in the same folder)
        write_physics_dataset(paths[name], q["scenario"], split, n, d.num_frames, d.height, d.width, seed=s, fps=q["fps"],
                              workers=None if n >= 256 else 1, progress=n >= 256, overwrite=True)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(spec))
    log(f"      {n_train} training videos, {n_val} + {n_val} validation videos (id, ood) under {out / 'data'}")
    return paths


class LaunchFailed(RuntimeError):
    """A multi-rank training run exited with a non-zero code."""


def _train_one(recipe_file: Path, recipe: RecipeConfig, num_procs: int) -> dict[str, Any]:
    """Train one model with the library trainer: in this process, or on ``num_procs`` ranks."""
    if num_procs == 1:
        return train(recipe)
    code = launch(recipe_file, num_procs=num_procs)
    if code != 0:
        raise LaunchFailed(f"training {recipe_file} on {num_procs} ranks failed (exit code {code}); its log is above")
    return json.loads((Path(recipe.output_dir) / "summary.json").read_text())


def quickstart(out: str | Path = "runs/quickstart", budget: float = 1.0, seed: int = 0, num_procs: int = 1,
               log: Callable[[str], None] = print) -> dict:
    """Run the main job; returns the report (also written to ``out/report.json``).

    Args:
        out: output folder.
        budget: multiplies the training steps (1 = about 20 minutes on 2 CPU cores).
        seed: seeds data, initialisation and sampling.
        num_procs: ranks per training run (> 1: the deepspeed launcher, as ``sparse-dit train --num-procs``).
        log: progress printer.
    """
    if not budget > 0:
        raise ValueError(f"budget={budget} must be > 0")
    if num_procs < 1:
        raise ValueError(f"num_procs={num_procs} must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    recipes = quickstart_recipes(out, budget, seed)
    q, d = QUICKSTART_DATA, recipes["dense"].data
    log(f"[1/4] simulating the physics world ({q['scenario']}, {d.num_frames} frames of {d.height}x{d.width} at {q['fps']:g} fps)")
    paths = _write_data(out, recipes["dense"], budget, seed, log)
    # The exact recipes trained, as files: `sparse-dit train out/recipes/sparse.yaml` reruns one.
    recipe_files = {}
    (out / "recipes").mkdir(exist_ok=True)
    for name, r in recipes.items():
        recipe_files[name] = out / "recipes" / f"{name}.yaml"
        recipe_files[name].write_text(yaml.safe_dump(to_dict(r), sort_keys=False))
    shape = (d.channels, d.num_frames, d.height, d.width)
    for name, r in recipes.items():
        c = count(r.model, shape)
        moe = f", {r.model.moe.num_experts} experts top-{r.model.moe.top_k}" if r.model.moe.enabled else ""
        log(f"      {name}: {c['total_params'] / 1e6:.2f}M params, {c['active_params'] / 1e6:.2f}M active{moe}, "
            f"{c['gmacs']:.3f} GMACs per sample ({recipe_files[name]})")
    dm, sm = (count(recipes[k].model, shape)["macs"] for k in ("dense", "sparse"))
    log(f"      active MACs per sample: sparse / dense = {sm / dm:.4f}")
    summaries = {}
    for i, (name, r) in enumerate(recipes.items()):
        log(f"[{2 + i}/4] training {name} with sparse_dit.recipes.train: {r.train.max_steps} steps x batch "
            f"{r.train.global_batch_size} on {num_procs} rank(s) ({time.monotonic() - t_start:.0f}s elapsed)")
        summaries[name] = _train_one(recipe_files[name], r, num_procs)
        if i == 0:
            eta = summaries[name]["train_seconds"] * 1.3 + 120
            log(f"      {name}: loss {summaries[name]['first_loss']:.3f} -> {summaries[name]['final_loss']:.3f} "
                f"(mean of the last 50 steps); ETA for the rest: about {eta / 60:.0f} min")
    log(f"[4/4] evaluating both on the same videos and noise ({time.monotonic() - t_start:.0f}s elapsed)")
    splits = [load_split("id", paths["id"]), load_split("ood", paths["ood"])]
    context_frames = recipes["dense"].train.context.frames
    report, videos = compare({k: r.output_dir for k, r in recipes.items()}, splits, context_frames=context_frames, seed=seed,
                             num_inference_steps=recipes["dense"].diffusion.num_inference_steps, log=lambda m: log("    " + m))
    report["description"] = (
        f"Quickstart: a dense and a compute-matched sparse video DiT trained by sparse_dit.recipes.train for "
        f"{recipes['dense'].train.max_steps} steps x batch {recipes['dense'].train.global_batch_size} on PhyWorld's "
        f"`{q['scenario']}` scenario, then asked to continue held-out videos from their first {context_frames} frames. "
        f"Budget {budget:g}, {num_procs} rank(s).")
    report["quickstart"] = {"budget": budget, "seed": seed, "num_procs": num_procs, **q,
                            "recipes": {k: str(v) for k, v in recipe_files.items()}, "train": summaries,
                            "wall_seconds": round(time.monotonic() - t_start, 1)}
    write_report(report, videos, out, title="sparse-dit quickstart: dense vs sparse")
    base = report["baselines"]["copy_last_frame"]["velocity_error"]
    log(f"done in {(time.monotonic() - t_start) / 60:.1f} min. Velocity error (px/frame, lower is better; "
        f"copy-last-frame {base:.2f}, constant velocity {report['baselines']['constant_velocity']['velocity_error']:.2f}):")
    for name, m in report["models"].items():
        log(f"      {name:<7} {_num(m.get('velocity_error'))}  ({_against_copy_last(report, name)})  position error "
            f"{_num(m.get('position_error'))} px, detection {_num(m.get('detection_rate'))}, held-out loss "
            f"{_num(m.get('val_loss'), 4)}, latency {_num(m.get('latency_ms'), 0)} ms")
    routing = report["models"].get("sparse", {}).get("routing")
    if routing:
        per_layer = ", ".join(f"{lay['max_violation']:.2f}" for lay in routing["layers"])
        changed = routing["change_fraction"]
        log(f"      sparse routing while sampling: max violation per layer {per_layer} (0 = balanced, "
            f"{routing['num_experts'] - 1} = collapsed); tokens changing experts between steps "
            f"{'-' if changed is None else f'{changed:.2f}'}")
    log(f"report: {(out / 'report.md').resolve()}  (json, plots, samples_id.gif, tb/ beside it); "
        f"training TensorBoard: tensorboard --logdir {out / 'runs'}")
    return report


def _num(x: Any, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"  # None/NaN: no ball found, nothing to score


def _against_copy_last(report: dict, name: str, split: str = "id") -> str:
    """The paired velocity-error difference to copy-last-frame on the same videos, with its 95 %
    interval (evals/stats_report.py): "beats" only when the interval excludes 0."""
    pv = report.get("per_video", {}).get(split, {})
    base, mine = pv.get("baseline:copy_last_frame"), pv.get(name)
    if base is None or mine is None:
        return "vs copy-last-frame: no per-video values"
    try:
        d = paired_difference("velocity_error", base, mine, split=split, a="copy-last-frame", b=name)
    except (KeyError, ValueError) as exc:
        return f"vs copy-last-frame: {exc}"
    lo, hi = d.get("ci95") or (float("nan"), float("nan"))
    ci = (f"difference {d['difference']:+.2f} [{lo:+.2f}, {hi:+.2f}] px/frame" if all(map(math.isfinite, (d["difference"], lo, hi)))
          else "no interval")
    if not d.get("resolved"):
        return f"not resolved against copy-last-frame: {ci}"
    return f"{'beats' if d.get('better') == name else 'does NOT beat'} copy-last-frame: {ci}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparse-dit quickstart``."""
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="multiplies the training steps (1 = ~20 min on 2 CPU cores; 0.01 = a one-minute smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, initialisation and sampling (default 0)")
    parser.add_argument("--num-procs", type=int, default=1,
                        help="ranks per training run; > 1 runs the deepspeed launcher, as `sparse-dit train --num-procs` (default 1)")


def run(args: argparse.Namespace) -> int:
    """``sparse-dit quickstart``."""
    try:
        quickstart(args.out, budget=args.budget, seed=args.seed, num_procs=args.num_procs)
    except (ValueError, ConfigError, TrainingDiverged, LaunchFailed) as exc:
        print(f"sparse-dit quickstart: {exc}", file=sys.stderr)
        return 2
    return 0
