"""Dense-vs-sparse comparison: evaluate finished runs on the same data and the same noise.

A run directory is what the trainer writes (``sparse_dit.recipes.train``)::

    RUN_DIR/final/config.json + model.safetensors   the EMA weights (SparseDiT.save_pretrained)
    RUN_DIR/recipe.yaml (or config.yaml, recipe.json) the recipe it trained (train FLOPs, shapes)
    RUN_DIR/summary.json (or train_summary.json)      optional: steps done, wall time, losses

A folder holding ``config.json`` + ``model.safetensors`` itself also works (no train FLOPs
then). Every run is evaluated on the same validation videos, with the same fixed-t, fixed-noise
held-out loss (:mod:`sparse_dit.evals.loss`) and the same sampling noise, so differences come
from the models alone. :func:`compare` returns one JSON-friendly report; :mod:`.report` writes
it out (report.md, report.json, plots, sample GIFs, TensorBoard scalars).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from sparse_dit.autoencoder import load_autoencoder
from sparse_dit.config import ConfigError, RecipeConfig
from sparse_dit.diffusion import sample
from sparse_dit.dit import SparseDiT
from sparse_dit.evals.cost import cost_report, generation_macs, measure_generation
from sparse_dit.evals.latent import autoencoder_cost, is_latent, predict_through
from sparse_dit.evals.metrics import METRICS, Metric, MetricInput, select_metrics
from sparse_dit.evals.physics import BALL_FREE, BASELINES, baseline_videos, score
from sparse_dit.evals.splits import EvalSplit, data_mismatch, load_split, physics_split
from sparse_dit.evals.stats_report import add_intervals, per_video_values, variant_key, video_intervals
from sparse_dit.moe.routing_stats import RoutingCollector
from sparse_dit.evals.video_metrics import frame_metrics, to_uint8_videos
from sparse_dit.flops import count
from sparse_dit.presets import load_recipe
from sparse_dit.schema import from_dict

__all__ = [
    "EvalSplit",
    "Run",
    "STATELESS_BASELINES",
    "check_eval_data",
    "load_run",
    "load_split",
    "physics_split",
    "training_flops",
    "generate_predictions",
    "evaluate_run",
    "compare",
    "HEADLINE_METRICS",
]

# The physics metrics a report puts in its headline table, taken from the first split ("id").
HEADLINE_METRICS = tuple(METRICS["physics"].lower_is_better)  # velocity_error, position_error, detection_rate

_RECIPE_FILES = ("recipe.yaml", "config.yaml", "recipe.yml", "recipe.json")
_SUMMARY_FILES = ("summary.json", "train_summary.json")


# Baselines that need no simulator states (copy-last-frame and the ball-free ones): the ones a
# split of plain video gets, scored by PSNR/SSIM.
STATELESS_BASELINES: tuple[str, ...] = ("copy_last_frame", *BALL_FREE)


@dataclass
class Run:
    """A finished training run: its EMA model, recipe (if found) and train summary (if found)."""

    name: str
    path: Path
    model: SparseDiT
    recipe: RecipeConfig | None = None
    summary: dict = field(default_factory=dict)
    autoencoder: Any = None  # the recipe's (evals/latent.py); None or identity: pixel space


def _read_recipe(path: Path) -> RecipeConfig | None:
    for name in _RECIPE_FILES:
        f = path / name
        if f.is_file():
            if f.suffix == ".json":
                return from_dict(RecipeConfig, json.loads(f.read_text()))
            return load_recipe(f)
    return None


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """Load a run directory (see the module docstring).

    Args:
        run_dir: the run's output directory (or a ``save_pretrained`` folder).
        name: its name in the report (default: the directory name).
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist")
    weights = path / "final" if (path / "final" / "config.json").is_file() else path
    if not (weights / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no final/config.json (nor config.json): is it a finished run?")
    model = SparseDiT.from_pretrained(weights).eval()
    summary: dict = {}
    for f in _SUMMARY_FILES:
        if (path / f).is_file():
            summary = json.loads((path / f).read_text())
            break
    try:
        recipe = _read_recipe(path)
    except ConfigError:
        recipe = None
    autoencoder = load_autoencoder(recipe.autoencoder, channels=model.config.in_channels) if recipe is not None else None
    return Run(name or path.resolve().name, path, model, recipe, summary, autoencoder)


def training_flops(config: Any, latent_shape: tuple[int, int, int, int], steps: int, batch_size: int, text_len: int = 0) -> float:
    """Training FLOPs: 3 forward passes' worth (forward + backward) x 2 FLOPs per MAC.

    The backward pass costs about twice the forward (Kaplan et al. 2020), so one training
    sample costs ``6 x forward MACs`` FLOPs; active MACs for MoE models.

    Args:
        config: the model config.
        latent_shape: (C, T, H, W) of one training sample.
        steps: optimizer steps.
        batch_size: global batch size.
        text_len: caption tokens.
    """
    return 6.0 * count(config, latent_shape, text_len=text_len)["macs"] * steps * batch_size


@torch.no_grad()
def generate_predictions(model: SparseDiT, split: EvalSplit, *, context_frames: int = 3, num_inference_steps: int = 25,
                         sampler: str = "euler", shift: float = 1.0, seed: int = 0, batch_size: int = 16,
                         autocast_dtype: torch.dtype | None = None, autoencoder: Any = None) -> np.ndarray:
    """Predict every video of ``split`` from its first ``context_frames`` frames.

    The initial noise is one tensor for the whole split drawn from ``seed``, so every model
    (and every batch size) starts from the same noise.

    Returns:
        uint8 (N, T, H, W, 3) whose first ``context_frames`` frames are the given ones.
    """
    x = split.model_videos()
    N, C, T = x.shape[:3]
    if not 1 <= context_frames < T:
        raise ValueError(f"context_frames={context_frames} must lie in [1, T={T})")
    if is_latent(autoencoder):  # a latent-space run: encode the given frames in place, decode the result (evals/latent.py)
        out = predict_through(model, autoencoder, x, context_frames, num_inference_steps=num_inference_steps, sampler=sampler,
                              shift=shift, seed=seed, batch_size=batch_size, autocast_dtype=autocast_dtype)
        vids = to_uint8_videos(out)
        vids[:, :context_frames] = split.videos[:, :context_frames]
        return vids
    noise = torch.randn(tuple(x.shape), generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    outs = []
    for s in range(0, N, batch_size):
        xb = x[s : s + batch_size].to(device)
        mask = torch.zeros(xb.shape[0], T, dtype=torch.bool, device=device)
        mask[:, :context_frames] = True
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            out = sample(model, tuple(xb.shape), {}, num_inference_steps=num_inference_steps, sampler=sampler, shift=shift,
                         latents=noise[s : s + batch_size], context=xb, context_mask=mask, device=device)
        outs.append(out.float().clamp(-1, 1).cpu())
    vids = to_uint8_videos(torch.cat(outs))
    vids[:, :context_frames] = split.videos[:, :context_frames]  # exact given frames (no rounding)
    return vids


def _run_metrics(metrics: Sequence[Metric], x: MetricInput, into: dict[str, Any], skipped: dict[str, str],
                 log: Callable[[str], None], run_name: str) -> list[str]:
    """Score ``x`` with each metric in order into ``into``; record skips; return the log summaries."""
    lines = []
    for metric in metrics:
        reason = metric.skip_reason(x)
        if reason is not None:
            skipped[metric.name] = reason
            log(f"  {run_name}/{x.split.name}: {metric.name} skipped: {reason}")
            continue
        result = metric.compute(x)
        into.update(result)
        if metric.summary is not None:
            lines.append(metric.summary(result))
    return lines


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def evaluate_run(
    run: Run,
    splits: Sequence[EvalSplit],
    *,
    context_frames: int = 3,
    num_inference_steps: int | None = None,
    sampler: str | None = None,
    shift: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    num_t: int = 10,
    latency_repeats: int = 5,
    cost_sizes: Sequence[tuple[int, int, int]] = (),
    autocast_dtype: torch.dtype | None = None,
    metrics: Sequence[str] | None = None,
    metric_options: Mapping[str, Any] | None = None,
    steps_sweep: Sequence[int] = (),
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Evaluate one run on every split with the metrics of :data:`sparse_dit.evals.metrics.METRICS`.

    Args:
        run: from :func:`load_run`.
        splits: validation splits; the first one is the headline (in-distribution).
        context_frames: given frames (PhyWorld: 3).
        num_inference_steps: sampler steps (default: the recipe's, else 25).
        sampler: ``"euler"``/``"heun"`` (default: the recipe's, else euler).
        shift: sampling timestep shift.
        seed: noise seed shared by every run (held-out loss and sampling).
        batch_size: videos per forward pass.
        num_t: held-out loss timestep grid size.
        latency_repeats: timed generations of one video (>= 5); 0 skips the measurement.
        cost_sizes: extra (T, H, W) sizes for the analytic + measured cost table.
        autocast_dtype: evaluate under autocast (default: fp32).
        metrics: names in ``METRICS`` to run, in table order (default: ``DEFAULT_METRICS``, every
            metric that is not opt-in; add ``"fvd"`` for FVD).
        metric_options: per-metric settings, e.g. ``{"fvd_detector": "i3d_torchscript.pt"}``.
        steps_sweep: extra sampler step counts: the headline split is generated again at each
            and scored with the per-split metrics (with 95 % intervals over videos) into
            ``steps_sweep`` (quality against sampling steps; off by default: each count costs
            one more generation of the split).
        log: progress printer.

    Returns:
        (metrics dict, split name -> generated uint8 videos). Metrics that could not run are
        listed with their reason under ``skipped_metrics``.
    """
    model, cfg = run.model, run.model.config
    diff = run.recipe.diffusion if run.recipe is not None else None
    steps = num_inference_steps or (diff.num_inference_steps if diff else 25)
    sampler = sampler or (diff.sampler if diff else "euler")
    first = splits[0]
    T, H, W = first.videos.shape[1:4]
    vae = run.autoencoder if is_latent(run.autoencoder) else None
    latent = tuple(vae.latent_shape(T, H, W)) if vae is not None else (cfg.in_channels, T, H, W)
    gen = generation_macs(cfg, latent, steps, sampler)
    m: dict[str, Any] = {
        "run_dir": str(run.path),
        "total_params": gen["total_params"],
        "active_params": gen["active_params"],
        "gmacs_per_sample": gen["gmacs_per_sample"],
        "gmacs_per_video": gen["gmacs_per_video"],
        "model_calls_per_video": gen["model_calls"],
        "tokens": gen["tokens"],
        "num_inference_steps": steps,
        "sampler": sampler,
        "moe": {"num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k} if cfg.moe.enabled else None,
    }
    # Training compute: the steps the run actually made (summary) else the recipe's max_steps.
    if run.recipe is not None:
        r = run.recipe
        train_steps = int(run.summary.get("steps", r.train.max_steps))
        shape = (cfg.in_channels, r.data.num_frames, r.data.height, r.data.width)
        if vae is not None:  # the DiT trained on latents (the VAE's training and encoding not counted)
            shape = tuple(vae.latent_shape(r.data.num_frames, r.data.height, r.data.width))
        m.update(train_steps=train_steps, train_batch=r.train.global_batch_size,
                 train_flops=training_flops(cfg, shape, train_steps, r.train.global_batch_size))
    else:
        m.update(train_steps=run.summary.get("steps"), train_batch=run.summary.get("batch_size"), train_flops=run.summary.get("train_flops"))
    m["train_seconds"] = run.summary.get("train_seconds")
    if vae is not None:  # the autoencoder's share of one video, apart from the DiT's (gmacs_per_video)
        m["autoencoder"] = run.recipe.autoencoder if run.recipe is not None else None
        m.update(autoencoder_cost(vae, T, H, W, decode_repeats=latency_repeats))
    # Runs of one recipe that differ only in train.seed are seeds of one variant (intervals over seeds).
    m["variant"] = variant_key(run.recipe)
    m["train_seed"] = run.recipe.train.seed if run.recipe is not None else None

    table = select_metrics(metrics)
    skipped: dict[str, str] = {}
    common = dict(model=model, seed=seed, batch_size=batch_size, num_t=num_t, autocast_dtype=autocast_dtype,
                  options=dict(metric_options or {}), autoencoder=vae)

    # Per-run metrics (held-out loss): once, on the headline split, before any sampling.
    for metric in (mt for mt in table if not mt.per_split):
        t0 = time.monotonic()
        for line in _run_metrics([metric], MetricInput(first, context_frames, **common), m, skipped, log, run.name):
            log(f"  {run.name}: {line} ({time.monotonic() - t0:.0f}s)")

    per_split = [mt for mt in table if mt.per_split]
    videos: dict[str, np.ndarray] = {}
    m["splits"] = {}
    for split in splits:
        t0 = time.monotonic()
        # Routing statistics (evals/routing.py): hooks on the MoE routers during the headline split's sampling.
        with RoutingCollector(model) if split is first else contextlib.nullcontext() as routing:
            pred = generate_predictions(model, split, context_frames=context_frames, num_inference_steps=steps, sampler=sampler,
                                        shift=shift, seed=seed, batch_size=batch_size, autocast_dtype=autocast_dtype, autoencoder=vae)
        if routing is not None and routing.stats is not None:
            m["routing"] = routing.summary()
        videos[split.name] = pred
        m["splits"][split.name] = {}
        lines = _run_metrics(per_split, MetricInput(split, context_frames, generated=pred, **common), m["splits"][split.name],
                             skipped, log, run.name)
        log(f"  {run.name}/{split.name}: {', '.join(lines) or 'generated'} ({time.monotonic() - t0:.0f}s)")
    head = m["splits"][first.name]
    for metric in per_split:  # the headline split's scalars head the model's entry
        m.update({k: head[k] for k in metric.lower_is_better if k in head})
    if skipped:
        m["skipped_metrics"] = skipped
    if steps_sweep:
        m["steps_sweep"] = _steps_sweep(model, first, per_split, sorted({int(n) for n in steps_sweep} | {steps}), steps,
                                        m["splits"][first.name], videos[first.name], context_frames=context_frames,
                                        sampler=sampler, shift=shift, common=common, log=log, run_name=run.name)

    if latency_repeats:
        lat = measure_generation(model, tuple(latent[1:]), batch_size=1, num_inference_steps=steps, sampler=sampler,
                                 context_frames=context_frames, repeats=latency_repeats, autocast_dtype=autocast_dtype)
        m.update(latency_ms=lat["latency_ms"], latency_runs_ms=lat["latency_runs_ms"],
                 throughput_videos_per_s=lat["throughput_videos_per_s"], peak_memory_bytes=lat["peak_memory_bytes"],
                 peak_memory_kind=lat["peak_memory_kind"])
        log(f"  {run.name}: latency {lat['latency_ms']:.0f} ms per video ({steps} steps, median of {latency_repeats})")
    if cost_sizes:
        m["cost"] = cost_report(model, cost_sizes, num_inference_steps=steps, sampler=sampler, measure=bool(latency_repeats),
                                repeats=max(5, latency_repeats), context_frames=0, autocast_dtype=autocast_dtype)
    return m, videos


def _steps_sweep(model: SparseDiT, split: EvalSplit, metrics: Sequence[Metric], counts: Sequence[int], steps: int,
                 scored: Mapping[str, Any], generated: np.ndarray, *, context_frames: int, sampler: str, shift: float,
                 common: Mapping[str, Any], log: Callable[[str], None], run_name: str) -> list[dict[str, Any]]:
    """Quality against sampler steps on ``split``: one entry per step count, the run's own ``steps`` reused."""
    if any(n < 1 for n in counts):
        raise ValueError(f"steps_sweep={list(counts)}: every step count must be >= 1")
    out = []
    for n in counts:
        t0 = time.monotonic()
        if n == steps:
            res, pred = dict(scored), generated
        else:
            pred = generate_predictions(model, split, context_frames=context_frames, num_inference_steps=n, sampler=sampler,
                                        shift=shift, seed=common["seed"], batch_size=common["batch_size"],
                                        autocast_dtype=common["autocast_dtype"], autoencoder=common.get("autoencoder"))
            res = {}
            _run_metrics(metrics, MetricInput(split, context_frames, generated=pred, **common), res, {}, log, run_name)
        keys = [k for k in ("velocity_error", "position_error", "detection_rate", "psnr", "ssim") if k in res]
        pv = per_video_values(pred, split.videos, split.states, context_frames, keys)
        out.append({"steps": n, **{k: res[k] for k in keys}, "ci95": video_intervals(pv, keys, seed=common["seed"])})
        log(f"  {run_name}/{split.name}: {n} sampler steps scored ({time.monotonic() - t0:.0f}s)")
    return out


def check_eval_data(runs: Iterable[Run], splits: Sequence[EvalSplit], *, strict: bool = False,
                    log: Callable[[str], None] = print) -> list[str]:
    """Warn (or with ``strict`` raise) where a split differs from the data a run trained on.

    One line per (run, split) naming what differs (:func:`sparse_dit.evals.splits.data_mismatch`:
    source kind, resolution, frame rate); runs without a recipe are not checked.

    Args:
        runs: loaded runs.
        splits: the eval splits.
        strict: raise :class:`~sparse_dit.config.ConfigError` on the first difference.
        log: where warnings go.

    Returns:
        The warning lines (empty when the data matches).
    """
    lines = []
    for run in runs:
        for split in splits:
            diffs = data_mismatch(run.recipe, split)
            if not diffs:
                continue
            line = f"eval data {split.name!r} is not what {run.name} trained on: {'; '.join(diffs)}"
            if strict:
                raise ConfigError(f"{line} (--strict)")
            lines.append(line)
            log(f"warning: {line} (--strict makes this an error)")
    return lines


def compare(
    run_dirs: Sequence[str | Path] | Mapping[str, str | Path],
    splits: Sequence[EvalSplit],
    *,
    context_frames: int = 3,
    strict: bool = False,
    log: Callable[[str], None] = print,
    **eval_kwargs: Any,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Evaluate several runs and the calibration baselines on the same splits.

    Splits without simulator states (a ``sparse-dit data folder`` / ``data hf`` dataset) get the
    metrics that need none (held-out loss, PSNR/SSIM, FVD when asked for); the physics metrics
    are skipped with their reason, and the baselines that need no states (copy-last-frame and
    the ball-free ones) are scored by PSNR/SSIM. Data that differs from a run's training data
    (:func:`check_eval_data`) is warned about, or refused with ``strict``.

    Args:
        run_dirs: run directories, or a mapping name -> directory.
        splits: validation splits (first = headline).
        context_frames: given frames.
        strict: raise :class:`~sparse_dit.config.ConfigError` when the eval data's source,
            resolution or frame rate differ from a run's training data (default: a warning).
        log: progress printer.
        **eval_kwargs: passed to :func:`evaluate_run` (steps, seed, latency_repeats, ...).

    Returns:
        (report, videos): ``report`` has ``models`` (name -> metrics), ``baselines`` (baseline
        name -> headline-split score), ``baselines_by_split`` (split -> baseline -> score),
        ``splits`` (name -> size), ``settings``; ``videos`` maps split -> name -> uint8 videos
        (ground truth, each baseline, each model) for the sample GIFs. The report also holds 95 %
        intervals over videos (and seeds) and the resolved differences
        (:func:`sparse_dit.evals.stats_report.add_intervals`).
    """
    if not splits:
        raise ValueError("compare needs at least one validation split")
    named = dict(run_dirs) if isinstance(run_dirs, Mapping) else {}
    if not named:
        for d in run_dirs:  # type: ignore[union-attr]
            base = Path(d).resolve().name
            name, i = base, 2
            while name in named:
                name, i = f"{base}_{i}", i + 1
            named[name] = d
    if not named:
        raise ValueError("compare needs at least one run directory")
    videos: dict[str, dict[str, np.ndarray]] = {s.name: {"ground_truth": s.videos} for s in splits}
    baselines_by_split: dict[str, dict[str, Any]] = {}
    runs = {name: load_run(d, name) for name, d in named.items()}
    data_warnings = check_eval_data(runs.values(), splits, strict=strict, log=log)
    for s in splits:
        if s.has_states:
            base = baseline_videos(s.videos, s.states, context_frames)
            baselines_by_split[s.name] = {k: score(v, s.states, context_frames) for k, v in base.items()}
        else:  # no simulator states: the baselines that need none, scored by PSNR/SSIM
            base = {k: BASELINES[k](s.videos, None, context_frames) for k in STATELESS_BASELINES}
            baselines_by_split[s.name] = {k: frame_metrics(v, s.videos, context_frames) for k, v in base.items()}
        # sample GIFs: the baselines that draw balls (noise and blank columns would show nothing)
        videos[s.name].update({k: v for k, v in base.items() if k != "ground_truth" and k not in BALL_FREE})
    models: dict[str, Any] = {}
    for name, run in runs.items():
        log(f"evaluating {name} ({run.path})")
        models[name], vids = evaluate_run(run, splits, context_frames=context_frames, log=log, **eval_kwargs)
        for split_name, v in vids.items():
            videos[split_name][name] = v
    first = splits[0].name
    report = {
        "models": models,
        "baselines": baselines_by_split[first],
        "baselines_by_split": baselines_by_split,
        "splits": {s.name: {"num_videos": int(s.videos.shape[0]), "shape": list(s.videos.shape[1:4]), "source": s.source,
                            "fps": s.fps, "has_states": s.has_states, "skipped": [list(x) for x in s.skipped]} for s in splits},
        "data_warnings": data_warnings,
        "headline_split": first,
        "settings": {"context_frames": context_frames, **{k: v for k, v in eval_kwargs.items() if isinstance(v, (int, float, str, type(None)))}},
    }
    t0 = time.monotonic()
    add_intervals(report, splits, videos, context_frames, seed=int(eval_kwargs.get("seed", 0)), log=log)
    log(f"95% intervals over videos and differences ({time.monotonic() - t0:.1f}s)")
    return report, videos
