"""``sparse-dit quickstart``: the main job that ``make demo`` runs (issue 6).

On 2 CPU cores in about 30 minutes it

1. simulates a small physics dataset (PhyWorld's ``uniform`` scenario: one ball at constant
   velocity) and writes it as Hugging Face datasets (train, in-distribution and
   out-of-distribution validation);
2. trains a dense video DiT and a compute-matched sparse (MoE) one: the same active MACs per
   sample (``sparse_dit.flops.match_compute``, within 1 %), the same steps and batch, hence the
   same training FLOPs;
3. evaluates both on the same videos and noise (held-out loss, physics fidelity against the
   calibration baselines, PSNR/SSIM, inference cost) with ``sparse_dit.evals.compare``;
4. writes the comparison (``DIR/report.md``, ``DIR/report.json``, plots, sample GIFs,
   TensorBoard scalars).

``--budget X`` multiplies the training steps (and, below 1, shrinks the validation set and the
dataset): ``--budget 4`` trains four times longer for users with more time or a GPU; the tests
run the whole pipeline with ``--budget 0.02``. Why these settings (scenario, frame rate,
resolution, patch, timestep sampling, learning rate, context frames): docs/world_model.md, where
each choice was measured.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from sparse_dit.config import DataConfig, DiffusionConfig, ModelConfig, ParallelConfig, RecipeConfig, TrainConfig, to_dict

__all__ = ["add_arguments", "run", "quickstart", "quickstart_recipes", "QUICKSTART"]

# The measured recipe (docs/world_model.md). Steps are for budget 1 on an idle 2-core CPU.
QUICKSTART: dict[str, Any] = {
    "scenario": "uniform",
    # 4 fps: PhyWorld's speeds (1-4 units/s) become 0.6-2.4 px/frame at 24x24, so the ball visibly
    # moves (copy-last-frame's velocity error = the true speed, ~1.5 px/frame) but stays on screen.
    # 24x24 with 4x4 patches (288 tokens per video) learned in 1400 steps what 32x32 (512 tokens)
    # had not learned in 1600 (docs/world_model.md).
    "fps": 4.0,
    "frames": 8,
    "height": 24,
    "width": 24,
    "context_frames": 3,
    "train_videos": 4096,
    "val_videos": 48,
    # Batch 8 beat batch 16 at equal compute (twice the steps); lr 2e-3 beat 1e-3.
    "steps": 2000,
    "batch_size": 8,
    "lr": 2e-3,
    "warmup_steps": 50,
    # A short run: a 10-step EMA window; 0.99 lagged the still-improving weights.
    "ema_decay": 0.9,
    # Training timesteps: logit-normal (SD3) shifted towards noise. At high t the model must
    # say where the ball goes (the world-model part); uniform t learned it far slower.
    "timestep_sampling": "logit_normal",
    "shift": 6.0,
    "sampler_steps": 20,
    "num_experts": 4,
    "top_k": 1,
}


def _dense_model() -> ModelConfig:
    # 3D rotary positions matter: learned absolute positions learned no motion in 10 CPU minutes.
    return ModelConfig(in_channels=3, patch_size=(1, 4, 4), hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0,
                       activation="gelu_tanh", pos_embed="rope", qk_norm=True, text_dim=0, num_classes=0, cross_attention=False)


def quickstart_recipes(out: str | Path, budget: float = 1.0, seed: int = 0) -> dict[str, RecipeConfig]:
    """The dense and the compute-matched sparse recipe of the quickstart.

    Args:
        out: the quickstart folder (runs go to ``out/runs/<name>``, data is read from ``out/data``).
        budget: multiplies the training steps.
        seed: training seed.
    """
    from sparse_dit.flops import match_compute

    q = QUICKSTART
    steps = max(2, int(round(q["steps"] * budget)))
    dense = _dense_model()
    sparse = match_compute(dense, num_experts=q["num_experts"], top_k=q["top_k"])
    recipes = {}
    for name, model in (("dense", dense), ("sparse", sparse)):
        recipes[name] = RecipeConfig(
            model=model,
            diffusion=DiffusionConfig(timestep_sampling=q["timestep_sampling"], shift=q["shift"], sampler="euler",
                                      num_inference_steps=_sampler_steps(budget), guidance_scale=1.0, cond_dropout=0.0),
            train=TrainConfig(max_steps=steps, global_batch_size=q["batch_size"], lr=q["lr"], min_lr_ratio=0.1,
                              warmup_steps=min(q["warmup_steps"], max(1, steps // 4)), weight_decay=0.0, betas=(0.9, 0.99),
                              grad_clip=1.0, ema_decay=q["ema_decay"], seed=seed, save_every=max(steps, 1), log_every=10,
                              context_prob=1.0),
            data=DataConfig(source="physics", path=str(Path(out) / "data" / "train"), num_frames=q["frames"],
                            height=q["height"], width=q["width"], channels=3, num_videos=q["train_videos"]),
            parallel=ParallelConfig(zero_stage=0, precision="bf16"),
            output_dir=str(Path(out) / "runs" / name),
        )
    return recipes


# --------------------------------------------------------------------------------------------
# Training. `--trainer local` (default): the single-process loop below, the same objective,
# optimizer and schedule as the library trainer, with every sample given its first frames as
# context (the one task the demo asks). `--trainer library`: sparse_dit.recipes.train under
# DeepSpeed, whose context masks are random tasks (train.context_prob); docs/world_model.md
# measures the difference.
# --------------------------------------------------------------------------------------------


def _lr_at(step: int, train: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    progress = min(1.0, (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps))
    return train.lr * (train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _experts_in_fp32(model: torch.nn.Module) -> None:
    """Run MoE layers in fp32 under bf16 autocast.

    The expert kernels (sparse_dit.moe) take rows in their weights' dtype and torch.autocast
    does not reach them (they are not nn.Linear), so each MoE layer runs with autocast off on
    fp32 input: the experts compute in fp32, the rest of the model in bf16.
    """
    from sparse_dit.moe import MoEFeedForward

    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            def forward(x: torch.Tensor, *args: Any, _inner: Callable = m.forward, **kwargs: Any) -> Any:
                with torch.autocast("cpu", enabled=False):
                    return _inner(x.float(), *args, **kwargs)

            m.forward = forward  # type: ignore[method-assign]


def _train_local(recipe: RecipeConfig, context_frames: int, desc: str = "train") -> dict[str, Any]:
    """Single-process training with flow matching; writes ``output_dir/final`` (EMA weights)."""
    import numpy as np
    import yaml
    from tqdm.auto import tqdm

    from sparse_dit.data import PhysicsVideoDataset
    from sparse_dit.diffusion import EMA, FlowMatching
    from sparse_dit.dit import SparseDiT

    tr, out = recipe.train, Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds = PhysicsVideoDataset(recipe.data.path)
    videos = torch.from_numpy(np.stack([ds.raw_video(i) for i in range(len(ds))]))
    x_all = videos.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)  # (N, C, T, H, W) in [-1, 1]
    torch.manual_seed(tr.seed)
    model = SparseDiT(recipe.model).train()
    bf16 = recipe.parallel.precision == "bf16"
    if bf16:
        _experts_in_fp32(model)
    fm = FlowMatching(recipe.diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay)
    ema = EMA(model, decay=tr.ema_decay)
    g = torch.Generator().manual_seed(tr.seed)
    B, T = tr.global_batch_size, recipe.data.num_frames
    losses: list[float] = []
    start = time.monotonic()
    bar = tqdm(range(tr.max_steps), desc=desc, unit="step", dynamic_ncols=True)
    for step in bar:
        x0 = x_all[torch.randint(len(x_all), (B,), generator=g)]
        # The world-model task: the first frames are given clean, the rest are generated.
        ctx = torch.zeros(B, T, dtype=torch.bool)
        ctx[:, :context_frames] = True
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, tr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fm.training_losses(model, x0, {}, context_mask=ctx, generator=g)
        opt.zero_grad(set_to_none=True)
        loss["loss"].backward()
        if tr.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
        opt.step()
        ema.update(model)
        losses.append(float(loss["mse"]))
        if step % 10 == 0 or step == tr.max_steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    train_s = time.monotonic() - start
    final = model.save_pretrained(out / "final", state_dict={k: v for k, v in ema.shadow.items()})
    (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    summary = {"steps": tr.max_steps, "batch_size": B, "train_seconds": round(train_s, 1), "seconds_per_step": train_s / tr.max_steps,
               "first_loss": float(np.mean(losses[:20])), "final_loss": float(np.mean(losses[-50:])), "final": str(final),
               "trainer": "sparse_dit.quickstart (single process)"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _train_library(recipe: RecipeConfig) -> dict[str, Any]:
    """The library trainer (DeepSpeed, ``sparse_dit.recipes.train``); its context-frame masks
    are random tasks (``train.context_prob``), not always the first frames."""
    from sparse_dit.recipes.train import train

    start = time.monotonic()
    summary = dict(train(recipe))
    summary.update(train_seconds=round(time.monotonic() - start, 1), batch_size=recipe.train.global_batch_size,
                   first_loss=summary.get("first_loss"), final_loss=summary.get("last_loss"),
                   trainer="sparse_dit.recipes.train (DeepSpeed)")
    (Path(recipe.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _train(recipe: RecipeConfig, context_frames: int, desc: str, trainer: str = "local") -> dict[str, Any]:
    if trainer == "library":
        return _train_library(recipe)
    if trainer != "local":
        raise ValueError(f"trainer={trainer!r} is not supported; choose 'local' or 'library'")
    return _train_local(recipe, context_frames, desc)


# --------------------------------------------------------------------------------------------


def _val_videos(budget: float) -> int:
    # Below budget 0.25 the run is a smoke test of the pipeline: a few validation videos.
    return QUICKSTART["val_videos"] if budget >= 0.25 else 4


def _sampler_steps(budget: float) -> int:
    return QUICKSTART["sampler_steps"] if budget >= 0.25 else 4


def _write_data(out: Path, budget: float, seed: int, log: Callable[[str], None]) -> dict[str, Path]:
    from sparse_dit.data import write_physics_dataset

    q = QUICKSTART
    n_train = q["train_videos"] if budget >= 1 else max(64, int(q["train_videos"] * budget))
    n_val = _val_videos(budget)
    paths = {"train": out / "data" / "train", "id": out / "data" / "val_id", "ood": out / "data" / "val_ood"}
    # Disjoint seeds: the validation scenes are never trained on.
    plan = {"train": ("id", n_train, seed), "id": ("id", n_val, seed + 1_000_001), "ood": ("ood", n_val, seed + 2_000_003)}
    spec = {k: [*v, q["scenario"], q["frames"], q["height"], q["width"], q["fps"]] for k, v in plan.items()}
    marker = out / "data" / "plan.json"
    old = json.loads(marker.read_text()) if marker.is_file() else {}
    for name, (split, n, s) in plan.items():
        if old.get(name) == spec[name] and (paths[name] / "dataset_info.json").is_file():
            continue  # already written with these settings (a rerun in the same folder)
        write_physics_dataset(paths[name], q["scenario"], split, n, q["frames"], q["height"], q["width"], seed=s, fps=q["fps"],
                              workers=None if n >= 256 else 1, progress=n >= 256, overwrite=True)
    marker.write_text(json.dumps(spec))
    log(f"      {n_train} training videos, {n_val} + {n_val} validation videos (id, ood) under {out / 'data'}")
    return paths


def quickstart(out: str | Path = "runs/quickstart", budget: float = 1.0, seed: int = 0, log: Callable[[str], None] = print,
               trainer: str = "local") -> dict:
    """Run the main job; returns the report (also written to ``out/report.json``).

    Args:
        out: output folder.
        budget: multiplies the training steps (1 = about 30 minutes on 2 CPU cores).
        seed: seeds data, initialisation and sampling.
        log: progress printer.
        trainer: ``"local"`` (single process, every sample gets the first frames as context) or
            ``"library"`` (``sparse_dit.recipes.train`` under DeepSpeed, random context tasks).
    """
    from sparse_dit.evals.compare import compare, load_split
    from sparse_dit.evals.report import write_report
    from sparse_dit.flops import count

    if not budget > 0:
        raise ValueError(f"budget={budget} must be > 0")
    q = QUICKSTART
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    log(f"[1/4] simulating the physics world ({q['scenario']}, {q['frames']} frames of {q['height']}x{q['width']} at {q['fps']:g} fps)")
    paths = _write_data(out, budget, seed, log)
    recipes = quickstart_recipes(out, budget, seed)
    shape = (3, q["frames"], q["height"], q["width"])
    for name, r in recipes.items():
        c = count(r.model, shape)
        moe = f", {r.model.moe.num_experts} experts top-{r.model.moe.top_k}" if r.model.moe.enabled else ""
        log(f"      {name}: {c['total_params'] / 1e6:.2f}M params, {c['active_params'] / 1e6:.2f}M active{moe}, "
            f"{c['gmacs']:.3f} GMACs per sample")
    d, s = (count(recipes[k].model, shape)["macs"] for k in ("dense", "sparse"))
    log(f"      active MACs per sample: sparse / dense = {s / d:.4f}")
    summaries = {}
    for i, (name, r) in enumerate(recipes.items()):
        log(f"[{2 + i}/4] training {name}: {r.train.max_steps} steps x batch {r.train.global_batch_size} "
            f"({time.monotonic() - t_start:.0f}s elapsed)")
        summaries[name] = _train(r, q["context_frames"], desc=name, trainer=trainer)
        if i == 0:
            eta = summaries[name]["train_seconds"] * 1.3 + 120
            log(f"      {name}: loss {summaries[name]['first_loss']:.3f} -> {summaries[name]['final_loss']:.3f}; "
                f"ETA for the rest: about {eta / 60:.0f} min")
    log(f"[4/4] evaluating both on the same videos and noise ({time.monotonic() - t_start:.0f}s elapsed)")
    splits = [load_split("id", paths["id"]), load_split("ood", paths["ood"])]
    report, videos = compare({k: r.output_dir for k, r in recipes.items()}, splits, context_frames=q["context_frames"],
                             seed=seed, num_inference_steps=_sampler_steps(budget), log=lambda m: log("    " + m))
    report["description"] = (
        f"Quickstart: a dense and a compute-matched sparse video DiT trained for {recipes['dense'].train.max_steps} steps x batch "
        f"{q['batch_size']} on PhyWorld's `{q['scenario']}` scenario, then asked to continue held-out videos from their first "
        f"{q['context_frames']} frames. Budget {budget:g}.")
    report["quickstart"] = {"budget": budget, "seed": seed, **q, "train": summaries,
                            "wall_seconds": round(time.monotonic() - t_start, 1)}
    write_report(report, videos, out, title="sparse-dit quickstart: dense vs sparse")
    base = report["baselines"]["copy_last_frame"]["velocity_error"]
    log(f"done in {(time.monotonic() - t_start) / 60:.1f} min. Velocity error (px/frame, lower is better; "
        f"copy-last-frame {base:.2f}, constant velocity {report['baselines']['constant_velocity']['velocity_error']:.2f}):")
    for name, m in report["models"].items():
        verdict = "beats" if m["velocity_error"] < base else "does NOT beat"
        log(f"      {name:<7} {m['velocity_error']:.2f}  ({verdict} copy-last-frame)  position error {m['position_error']:.2f} px, "
            f"detection {m['detection_rate']:.2f}, held-out loss {m['val_loss']:.4f}, latency {m['latency_ms']:.0f} ms")
    log(f"report: {(out / 'report.md').resolve()}  (json, plots, samples_id.gif, tb/ beside it)")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="multiplies the training steps (1 = ~30 min on 2 CPU cores; 0.02 = a one-minute smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainer", choices=("local", "library"), default="local",
                        help="local: single-process loop, always the first 3 frames as context (default); "
                             "library: sparse_dit.recipes.train under DeepSpeed with random context tasks")


def run(args: argparse.Namespace) -> int:
    quickstart(args.out, budget=args.budget, seed=args.seed, trainer=args.trainer)
    return 0
