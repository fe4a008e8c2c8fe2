"""Train a recipe under DeepSpeed: one process, N CPU ranks, or a GPU cluster, one code path.

Launch commands::

    # one process (CPU: a one-rank gloo group; GPU: one device)
    sparse-dit train recipes/tiny/moe.yaml
    # N ranks on this machine through the deepspeed launcher; this runs
    #   deepspeed --num_gpus 2 --master_port P --no_local_rank --module sparse_dit.recipes.train RECIPE --set ...
    sparse-dit train recipes/tiny/moe.yaml --num-procs 2 --set parallel.ep_size=2
    # a cluster: the same module under the deepspeed launcher and a hostfile
    deepspeed --hostfile hostfile --module sparse_dit.recipes.train recipes/small/moe.yaml --set output_dir=/shared/run1
    # or any launcher that sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK
    torchrun --nproc_per_node 8 -m sparse_dit.recipes.train recipes/small/moe.yaml

Rerunning the same command resumes from ``output_dir/checkpoints/latest``. Overrides:
``--set section.key=value`` (e.g. ``train.max_steps=200 parallel.zero_stage=2 output_dir=runs/x``).

From Python (same engine, a one-rank group when no launcher ran)::

    from sparse_dit.presets import load_recipe
    from sparse_dit.recipes.train import train
    summary = train(load_recipe("recipes/tiny/moe.yaml", ["train.max_steps=50"]))
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import deepspeed
import torch
import torch.distributed as dist
import yaml
from tqdm.auto import tqdm

from sparse_dit.autoencoder import IDENTITY, check_fits, encode_videos, latent_shape, load_autoencoder
from sparse_dit.config import ConfigError, RecipeConfig
from sparse_dit.data.latents import check_cached_vae
from sparse_dit.diffusion import EMA, FlowMatching, drop_conditioning, sample
from sparse_dit.dit import SparseDiT
from sparse_dit.flops import count
from sparse_dit.moe import reset_global_balance, summarize_aux, update_balance_biases, update_batch_thresholds
from sparse_dit.moe.routing_stats import StepRouting
from sparse_dit.parallel import (
    CheckpointError, batch_layout, build_engine, check_parallel_config, export_final, init_distributed, latest_tag,
    load_checkpoint, nonfinite_state, resolve_precision, save_checkpoint, setup_expert_parallel,
)
from sparse_dit.parallel.comm import all_reduce_
from sparse_dit.parallel.engine import free_port
from sparse_dit.presets import load_recipe
from sparse_dit.recipes.init_from import load_init_weights, noise_range_setup
from sparse_dit.recipes.batches import BatchSource, BucketSource, Conditioner, build_dataset, context_mask, step_generator
from sparse_dit.parallel.checkpoint import check_layout
from sparse_dit.recipes.run_dir import RESUME_FREE, append_metrics, atomic_write, check_resume, clean_tmp, clear_run, truncate_metrics
from sparse_dit.recipes.tb import add_gif, add_routing, open_writer
from sparse_dit.schema import to_dict
from sparse_dit.video_io import save_video, side_by_side, to_uint8

__all__ = [
    "TrainingDiverged", "DiffusionTask", "DIFFUSION", "TrainRun", "StepResult", "build_run", "train_step", "log_step", "maybe_save", "finish", "train",
    "maybe_export", "launch", "add_arguments", "run", "main",
]

# Order of the per-micro-step values all-reduced in one collective (mean over ranks).
_REDUCED = ("loss", "mse", "moe/aux_loss", "moe/balance_loss", "moe/z_loss", "moe/max_violation", "moe/router_entropy", "moe/dropped_fraction",
            "samples", "tokens")

Hooks = dict[str, Callable[..., Any]]


class TrainingDiverged(RuntimeError):
    """The loss, the weights, the optimizer state or the gradient norm became NaN or infinite;
    the run stopped without saving."""


def _rank0_print(rank: int, *args: Any) -> None:
    if rank == 0:
        print(*args, flush=True)


def _dtype(precision: str) -> torch.dtype:
    """The dtype of the batches fed to the engine: the weights' dtype (fp32 under autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


class _Recorder:
    """Calls the engine and keeps the forward's :class:`~sparse_dit.dit.DiTAux` for logging."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.aux = engine, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.engine(*args, **kwargs)
        self.aux = out[1] if isinstance(out, tuple) else None
        return out


def _gathered(model: torch.nn.Module, zero3: bool) -> Any:
    """ZeRO-3 partitions parameters: gather them (read-only) to see the full tensors."""
    return deepspeed.zero.GatheredParameters(list(model.parameters())) if zero3 else contextlib.nullcontext()


def _plain_grad_norm(model: torch.nn.Module) -> float | None:
    """Global L2 norm of ``p.grad`` (ZeRO-0: gradients are all-reduced in place and replicated,
    expert parallelism is refused there, so every rank computes the same value)."""
    grads = [p.grad.detach().float() for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


# --------------------------------------------------------------------------------------------
# 0. What is trained: the task (the DiT's flow matching by default; the VAE's in train_vae.py)
# --------------------------------------------------------------------------------------------


class DiffusionTask:
    """What the trainer trains, as a small interface; this default is the DiT under flow matching.

    Everything else (process group, DeepSpeed engine, EMA, data sharding, the step, NaN checks,
    checkpoints, metrics.jsonl, TensorBoard, summary.json, resume) is the task-independent
    trainer. Another task (``sparse_dit.recipes.train_vae.VAETask``) overrides these methods and
    is passed as ``train(recipe, task=...)``.
    """

    name = "diffusion"
    module = "sparse_dit.recipes.train"  # what the deepspeed launcher runs on each rank
    logged: tuple[str, ...] = ()  # extra metrics (from :meth:`terms`) written to TensorBoard as train/<name>

    def load_recipe(self, path: str | Path, overrides: Sequence[str] = ()) -> Any:
        """The validated recipe of a YAML file with ``--set`` overrides (ConfigError otherwise)."""
        return load_recipe(path, list(overrides))

    def check(self, recipe: Any, world: int) -> None:
        """Reject settings that cannot work on ``world`` ranks (ConfigError), before anything is built."""
        check_parallel_config(recipe, world)

    def build_model(self, recipe: Any) -> torch.nn.Module:
        """The freshly initialised model (seeded before the call: the same on every rank)."""
        return SparseDiT(recipe.model)

    def init_weights(self, model: torch.nn.Module, path: str) -> Path:
        """``train.init_from``: copy saved weights into the fresh model; returns the folder read."""
        return load_init_weights(model, path)

    def conditioner(self, recipe: Any, device: Any, dtype: torch.dtype) -> Any:
        """``cond(batch) -> model kwargs``."""
        try:
            return Conditioner(recipe, device, dtype)
        except (ValueError, OSError, ImportError) as exc:  # a missing or unusable text encoder
            raise ConfigError(f"data.text_encoder={recipe.data.text_encoder!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def model_kwargs(self, run: "TrainRun", batch: dict, generator: torch.Generator, null_class: Optional[int]) -> dict:
        """The model kwargs of a micro-batch: its conditioning, with classifier-free-guidance dropout."""
        return drop_conditioning(run.cond(batch), run.recipe.diffusion.cond_dropout, generator=generator, null_class=null_class)

    def autoencoder(self, recipe: Any, device: Any) -> torch.nn.Module:
        """The frozen compression network the model trains through (``recipe.autoencoder``: identity
        or a VAE folder; identity for recipes without the key), in eval mode on ``device``."""
        model = getattr(recipe, "model", None)
        try:
            return load_autoencoder(getattr(recipe, "autoencoder", IDENTITY), channels=getattr(model, "in_channels", 3), map_location=device)
        except (FileNotFoundError, ValueError) as exc:  # weights that do not fit their config
            raise ConfigError(f"autoencoder={getattr(recipe, 'autoencoder', IDENTITY)!r}: {exc}") from None

    def inputs(self, run: "TrainRun", batch: dict) -> torch.Tensor:
        """What the model is trained on for a micro-batch: its cached ``latents``, or its videos
        encoded by the frozen autoencoder (no gradients; the identity returns them)."""
        if "latents" in batch:
            return batch["latents"]
        return encode_videos(run.autoencoder, batch["video"]) if run.autoencoder is not None else batch["video"]

    def objective(self, recipe: Any, t_range: Any) -> Any:
        """The object whose ``training_losses(model, x0, kwargs, context_mask=, generator=, num_tokens=)``
        returns ``{"loss", "mse"}`` for one micro-batch."""
        return FlowMatching(recipe.diffusion, t_range=t_range)

    def count(self, recipe: Any, shape: tuple[int, int, int, int], cond: Any) -> dict:
        """``{"total_params", "active_params", "macs"}`` of one sample of ``shape`` (C, T, H, W)."""
        return count(recipe.model, shape, text_len=getattr(cond.encoder, "max_length", 0) if cond.encoder else 0)

    def tokens(self, recipe: Any, shape: Sequence[int]) -> int:
        """Tokens per sample of a (T, H, W) clip (for tokens/s)."""
        return math.prod(s // p for s, p in zip(shape, recipe.model.patch_size))

    def terms(self, run: "TrainRun") -> dict[str, float]:
        """Extra metrics of the step just taken (collective: every rank calls it)."""
        return {}

    def export(self, run: "TrainRun", out_dir: Path) -> None:
        """Write the trained (EMA) weights as a ``from_pretrained`` folder (collective)."""
        export_final(run.model, run.ema.shadow, run.recipe.parallel.ep_size, out_dir)


DIFFUSION = DiffusionTask()


# --------------------------------------------------------------------------------------------
# 1. Building: process group, model, engine, data, resume
# --------------------------------------------------------------------------------------------


@dataclass
class TrainRun:
    """Everything one training run holds between steps (built by :func:`build_run`)."""

    recipe: RecipeConfig
    rank: int
    world: int
    micro: int  # micro-batch per rank
    accum: int  # gradient accumulation steps
    precision: str  # resolved parallel.precision
    dtype: torch.dtype  # dtype of the batches fed to the engine
    engine: Any  # deepspeed.DeepSpeedEngine
    ema: EMA
    fm: FlowMatching
    cond: Conditioner
    source: BatchSource
    macs: dict  # sparse_dit.flops.count of one training sample
    ep: Any  # expert-parallel info from setup_expert_parallel
    start_step: int
    end_step: int
    last_tag: Optional[str]  # newest checkpoint written or resumed
    done_steps: int  # optimizer steps completed so far (start_step before the first)
    writer: Any  # TensorBoard writer on rank 0, else None
    last_grad_norm: Optional[float] = None  # of the last step taken (checked before each save)
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    step_samples: list[tuple[float, float]] = field(default_factory=list)
    task: DiffusionTask = DIFFUSION  # what is trained (section 0)
    autoencoder: Optional[torch.nn.Module] = None  # frozen, eval mode: batches' videos -> latents (identity: pixel space)

    @property
    def model(self) -> torch.nn.Module:
        return self.engine.module

    @property
    def out_dir(self) -> Path:
        return Path(self.recipe.output_dir)

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def zero3(self) -> bool:
        return self.recipe.parallel.zero_stage == 3


def build_run(recipe: RecipeConfig, allow_changed: Sequence[str] = (), overwrite: bool = False, task: DiffusionTask = DIFFUSION) -> TrainRun:
    """Create (or join) the process group, build model, engine, EMA and data, and resume from
    ``output_dir/checkpoints/latest`` when it exists.

    Args:
        recipe: the validated recipe.
        allow_changed: recipe fields (dotted, a section, or ``all``) a resume may change beyond
            :data:`RESUME_FREE`; the accepted changes are printed and appended to ``recipe_changes.log``.
        overwrite: delete the run files of ``output_dir`` (``recipes.run_dir.RUN_FILES``: checkpoints,
            final/, logs) first and start over, instead of resuming.
        task: what is trained (default: the DiT's flow matching; section 0).

    Raises:
        ConfigError: settings that cannot work on this many ranks, or a checkpoint of another recipe.
        CheckpointError: a checkpoint written by another number of ranks or ``parallel.ep_size``.
    """
    rank, world = init_distributed(recipe.parallel.timeout_s)
    if overwrite:
        removed = clear_run(Path(recipe.output_dir)) if rank == 0 else []
        _rank0_print(rank, f"--overwrite: removed {', '.join(removed)} from {recipe.output_dir}" if removed else "--overwrite: nothing to remove")
        dist.barrier()
    check_layout(Path(recipe.output_dir) / "checkpoints", world, recipe.parallel.ep_size)  # before the recipe check: say what to pass
    task.check(recipe, world)
    micro, accum, G = batch_layout(recipe, world)
    tc, par = recipe.train, recipe.parallel
    precision = resolve_precision(par.precision)
    dtype = _dtype(precision)
    out_dir = Path(recipe.output_dir)
    accepted = check_resume(recipe, out_dir, allow_changed)
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            clean_tmp(out_dir)
            if accepted:
                print("resuming with a changed recipe:\n  " + "\n  ".join(accepted), flush=True)
                with open(out_dir / "recipe_changes.log", "a", encoding="utf-8") as fh:
                    fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} " + "; ".join(accepted) + "\n")
            atomic_write(out_dir / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
        except OSError as exc:  # read-only, a file in the way, no space: one line, no traceback
            raise ConfigError(f"output_dir={recipe.output_dir!r} cannot be written ({exc.strerror or exc}: {exc.filename or out_dir})") from None

    # Model: the same initialisation on every rank, then experts sharded over the EP group
    torch.manual_seed(tc.seed)
    model = task.build_model(recipe)
    if tc.init_from is not None and not ((out_dir / "checkpoints").exists() and latest_tag(out_dir / "checkpoints") is not None):
        _rank0_print(rank, f"initialised from {task.init_weights(model, tc.init_from)}")  # a new run; a resume loads its checkpoint
    ep = setup_expert_parallel(model, par.ep_size)
    t_range = noise_range_setup(model, recipe)  # train.noise_range: one noise range alone (issue 11)
    engine, ds_config = build_engine(model, recipe, world)
    if rank == 0:  # the resolved DeepSpeed config, as deepspeed.initialize received it
        atomic_write(out_dir / "ds_config.json", json.dumps(ds_config, indent=2, default=repr) + "\n")
    model = engine.module
    with _gathered(model, par.zero_stage == 3):
        ema = EMA(model, decay=tc.ema_decay)
    cond = task.conditioner(recipe, engine.device, dtype)
    autoencoder = task.autoencoder(recipe, engine.device)

    # Data: every rank is a data-parallel rank (EP shards experts, not the batch)
    try:
        dataset = build_dataset(recipe)
    except (FileNotFoundError, ValueError) as exc:  # a missing or unreadable dataset: one line, no traceback
        raise ConfigError(f"data.source={recipe.data.source!r} data.path={recipe.data.path!r}: {exc}") from exc
    if recipe.data.token_budget is not None:  # any-size: one bucket shape per micro-batch
        source: BatchSource = BucketSource(dataset, recipe.data.token_budget, recipe.model.patch_size, accum, rank, world, tc.seed)
    else:
        source = BatchSource(dataset, micro, accum, rank, world, tc.seed)
    first = dataset[0]
    spec = getattr(recipe, "autoencoder", IDENTITY)
    try:
        if "latents" in first:  # cached by `sparse-dit data encode`: they must come from this recipe's autoencoder
            check_cached_vae(getattr(dataset, "meta", {}), autoencoder, spec)
            shape = tuple(first["latents"].shape)
        else:
            shape = latent_shape(autoencoder, tuple(first["video"].shape))
        check_fits(getattr(getattr(recipe, "model", None), "in_channels", shape[0]), shape, f"autoencoder={spec!r}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    macs = task.count(recipe, shape, cond)

    # Resume
    ckpt_root = out_dir / "checkpoints"
    start_step = 0
    tag = latest_tag(ckpt_root) if ckpt_root.exists() else None
    if tag is not None:
        state = load_checkpoint(engine, ckpt_root, tag, par.ep_size)
        bad = nonfinite_state(engine)
        if bad is not None:  # written before issue 17's save check, or edited
            raise CheckpointError(f"checkpoint {ckpt_root / tag}: {bad}; point {ckpt_root / 'latest'} at an earlier step_* or start a new output_dir")
        start_step = int(state["step"])
        ema.load_state_dict(state["ema"])
        _rank0_print(rank, f"resumed from {ckpt_root / tag} at step {start_step}")
    if rank == 0:
        truncate_metrics(out_dir / "metrics.jsonl", start_step)
    writer = open_writer(out_dir / "tensorboard", purge_step=start_step + 1 if start_step else None) if rank == 0 else None
    _rank0_print(
        rank,
        f"training {recipe.preset or 'model'}: {macs['total_params'] / 1e6:.2f}M params ({macs['active_params'] / 1e6:.2f}M active), "
        f"{world} rank(s), ZeRO-{par.zero_stage}, EP={par.ep_size}, {precision}, global batch {G} = {micro} x {accum} accum x {world}",
    )
    end_step = tc.max_steps if tc.stop_after is None else min(tc.max_steps, start_step + tc.stop_after)
    return TrainRun(recipe=recipe, rank=rank, world=world, micro=micro, accum=accum, precision=precision, dtype=dtype, engine=engine,
                    ema=ema, fm=task.objective(recipe, t_range), cond=cond, source=source, macs=macs, ep=ep, start_step=start_step,
                    end_step=end_step, last_tag=tag, done_steps=start_step, writer=writer, task=task, autoencoder=autoencoder)


# --------------------------------------------------------------------------------------------
# 2. One optimizer step
# --------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What :func:`train_step` measured: the logged scalars and the per-layer expert loads."""

    metrics: dict[str, float]
    tokens_per_expert: Optional[torch.Tensor]  # (L, E) per MoE layer, summed over micro-steps and ranks; None for dense
    routing: Optional[StepRouting] = None  # per-layer loads, entropy, timestep-bin loads (same sums); None for dense


def train_step(run: TrainRun, step: int, batches: Any, hooks: Optional[Hooks] = None) -> StepResult:
    """One optimizer step (``step`` is 0-based): ``run.accum`` micro-batches forward and backward,
    the optimizer step, then balance biases and EMA.

    Args:
        run: from :func:`build_run`.
        step: the optimizer step about to be taken.
        batches: the iterator of micro-batches (``run.source.loader(...)``).
        hooks: optional ``before_step(engine, step)``, called after the last backward (gradients
            reduced) and before the optimizer step.

    Raises:
        TrainingDiverged: a non-finite loss on any rank; nothing of this step is applied.
    """
    hooks = hooks or {}
    recipe, engine, model, tc = run.recipe, run.engine, run.model, run.recipe.train
    t0 = time.perf_counter()
    lr = engine.get_lr()[0]  # the rate this step uses (the scheduler advances in engine.step)
    null_class = model.y_embedder.null_class if getattr(model, "y_embedder", None) is not None else None
    sums = torch.zeros(len(_REDUCED), dtype=torch.float64)
    routing = None
    pre_norm = None
    for m in range(run.accum):
        g = step_generator(tc.seed, step, m, run.rank)
        batch = next(batches)
        x0 = run.task.inputs(run, batch).to(device=engine.device, dtype=run.dtype)  # latents (the videos in pixel space)
        kwargs = run.task.model_kwargs(run, batch, g, null_class)
        ctx = context_mask(x0.shape[0], x0.shape[2], tc.context, g).to(engine.device)
        rec = _Recorder(engine)
        n_tok = run.task.tokens(recipe, x0.shape[2:])  # tokens per sample
        out = run.fm.training_losses(rec, x0, kwargs, context_mask=ctx, generator=g, num_tokens=n_tok)
        scalars, _ = summarize_aux(rec.aux.moe if rec.aux is not None else [])
        layer_routing = StepRouting.from_aux(rec.aux.moe if rec.aux is not None else [])  # per layer, never summed over layers
        vals = [out["loss"].detach().double().item(), out["mse"].double().item()] + [scalars.get(k, 0.0) for k in _REDUCED[2:-2]]
        vals += [float(x0.shape[0]), float(x0.shape[0] * n_tok)]  # samples and tokens (summed below)
        vals_t = torch.tensor(vals, dtype=torch.float64)
        all_reduce_(vals_t)  # one collective: NaN check, global loss and MoE stats
        vals_t /= run.world
        if not torch.isfinite(vals_t[0]):
            where = f"{run.ckpt_root / run.last_tag}" if run.last_tag else "none saved yet"
            raise TrainingDiverged(
                f"train/loss is {vals_t[0].item()} at step {step + 1} (micro-step {m}); stopping without saving. "
                f"Last good checkpoint: {where}. Lower train.lr, raise train.warmup_steps or use parallel.precision=fp32."
            )
        sums += vals_t
        if layer_routing is not None:
            routing = layer_routing if routing is None else routing + layer_routing
        engine.backward(out["loss"])
        if m == run.accum - 1:
            if "before_step" in hooks:
                hooks["before_step"](engine, step)
            pre_norm = _plain_grad_norm(model) if recipe.parallel.zero_stage == 0 else None
        engine.step()
    # after the optimizer step: grad norm, balance biases (counts summed over all ranks), EMA
    gn = engine.get_global_grad_norm()  # ZeRO and the bf16 optimizer record it; fp32 ZeRO-0 does not
    grad_norm = float(gn) if gn is not None else (pre_norm if pre_norm is not None else float("nan"))
    update_balance_biases(model, reduce_fn=all_reduce_)
    update_batch_thresholds(model, reduce_fn=all_reduce_)  # router: batch (no collective without one)
    reset_global_balance(model)  # balance_scope=global: the next step's micro-batches start a new window
    with _gathered(model, run.zero3):
        run.ema.update(model)
    if routing is not None:
        flat = routing.pack()
        all_reduce_(flat)  # one collective: routes per expert over the global batch, per layer
        routing = routing.unpack(flat)
    mean = (sums / run.accum).tolist()
    metrics = dict(zip(_REDUCED[:-2], mean[:-2]))
    if routing is not None:  # the imbalance of the global batch's load (all micro-steps and ranks), not a mean over ranks
        mv = routing.max_violation
        metrics["moe/max_violation"], metrics["moe/max_violation_worst"] = float(mv.mean()), float(mv.max())
    samples, tokens = sums[-2].item() * run.world, sums[-1].item() * run.world  # summed over micro-steps and ranks
    dt = time.perf_counter() - t0
    run.step_times.append(dt)
    run.step_samples.append((samples, tokens))
    run.losses.append(metrics["loss"])
    run.done_steps = step + 1
    run.last_grad_norm = grad_norm
    metrics.update(run.task.terms(run))
    metrics.update({"step": step + 1, "lr": lr, "grad_norm": grad_norm, "samples": int(samples), "samples_per_s": samples / dt,
                    "tokens_per_s": tokens / dt})
    return StepResult(metrics, routing.load if routing is not None else None, routing)


# --------------------------------------------------------------------------------------------
# 3. Logging and checkpointing
# --------------------------------------------------------------------------------------------


def log_step(run: TrainRun, result: StepResult) -> None:
    """Rank 0: append the step's row to ``metrics.jsonl`` and, every ``train.log_every`` steps
    (and at the last step), write the TensorBoard scalars and per-layer expert loads."""
    if run.rank != 0:
        return
    metrics, step = result.metrics, int(result.metrics["step"])
    append_metrics(run.out_dir / "metrics.jsonl", metrics)
    w = run.writer
    w.add_scalar("train/loss", metrics["loss"], step)
    if step % run.recipe.train.log_every and step != run.end_step:
        return
    w.add_scalar("train/mse", metrics["mse"], step)
    for k in run.task.logged:
        w.add_scalar(f"train/{k}", metrics[k], step)
    w.add_scalar("train/lr", metrics["lr"], step)
    w.add_scalar("train/grad_norm", metrics["grad_norm"], step)
    w.add_scalar("perf/samples_per_s", metrics["samples_per_s"], step)
    w.add_scalar("perf/tokens_per_s", metrics["tokens_per_s"], step)
    if run.recipe.data.token_budget is None:  # one shape: analytic FLOPs per sample apply
        w.add_scalar("perf/model_tflops", 3 * run.macs["macs"] * 2 * metrics["samples_per_s"] / 1e12, step)
    if result.tokens_per_expert is not None:
        for k in _REDUCED[2:-2]:
            w.add_scalar(k, metrics[k], step)
    if result.routing is not None:
        add_routing(w, result.routing, step)  # per layer: scalars, histograms, heat maps (recipes/tb.py)


def maybe_save(run: TrainRun, step: int) -> Optional[str]:
    """After 0-based ``step``: write a checkpoint every ``train.save_every`` steps and at the end
    of this invocation; returns the tag written, or None."""
    n = step + 1
    if n % run.recipe.train.save_every and n != run.end_step:
        return None
    bad = nonfinite_state(run.engine, run.last_grad_norm)  # the loss check cannot see a step that poisons the weights
    if bad is not None:
        where = f"{run.ckpt_root / run.last_tag}" if run.last_tag else "none saved yet"
        raise TrainingDiverged(
            f"{bad} after step {n}; stopping without saving. Last good checkpoint: {where}. "
            "Lower train.lr, raise train.warmup_steps or use parallel.precision=fp32."
        )
    run.last_tag = save_checkpoint(run.engine, run.ckpt_root, n, {"ema": run.ema.state_dict()}, run.recipe.train.keep_last,
                                   ep_size=run.recipe.parallel.ep_size)
    return run.last_tag


def maybe_export(run: TrainRun, step: int) -> Optional[Path]:
    """After 0-based ``step``: when ``step + 1`` is in ``train.export_steps``, export the EMA weights
    to ``output_dir/exports/step_<N>`` (``config.json`` + ``model.safetensors``; collective).

    The folder is written under a temporary name and renamed when complete, so a folder that
    exists is whole. A resumed run that repeats step N writes it again (the same weights: the
    resume is exact). Returns the folder on rank 0.
    """
    n = step + 1
    if n not in run.recipe.train.export_steps:
        return None
    final = run.out_dir / "exports" / f"step_{n:08d}"
    tmp = run.out_dir / "exports" / f".tmp-step_{n:08d}"
    run.task.export(run, tmp)  # what finish() writes to final/ (the DiT: export_final, collective)
    if run.rank == 0 and tmp.is_dir():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    return final if run.rank == 0 else None


def finish(run: TrainRun, hooks: Optional[Hooks] = None) -> dict:
    """After the last step: ``at_end`` hook, export the EMA weights to ``output_dir/final`` when
    the schedule is complete (``train.max_steps`` steps done), write ``output_dir/summary.json`` (rank 0) and return the summary.

    The summary: ``steps``, ``start_step``, ``batch_size``, ``train_seconds`` (this invocation),
    ``first_loss``/``last_loss`` (first and last step of this invocation), ``final_loss`` (mean of
    its last 50 steps), ``samples_per_s``/``tokens_per_s`` (without the warm-up step),
    ``final_dir``, ``output_dir``, ``world_size``, ``checkpoint``.
    """
    hooks = hooks or {}
    if "at_end" in hooks:
        hooks["at_end"](run.engine, run.ema, {"ep": run.ep, "rank": run.rank, "world_size": run.world})
    final_dir = None
    if run.done_steps == run.recipe.train.max_steps:
        run.task.export(run, run.out_dir / "final")
        final_dir = str(run.out_dir / "final")
        _rank0_print(run.rank, f"exported EMA weights to {final_dir}")
    if run.writer is not None:
        run.writer.close()
    skip = 1 if len(run.step_times) > 1 else 0  # the first step pays warm-up costs
    secs = sum(run.step_times[skip:])
    losses = run.losses
    summary = {
        "steps": run.done_steps, "start_step": run.start_step, "batch_size": run.recipe.train.global_batch_size,
        "train_seconds": round(sum(run.step_times), 2),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else None,
        "samples_per_s": sum(s for s, _ in run.step_samples[skip:]) / secs if secs else None,  # None: JSON has no NaN
        "tokens_per_s": sum(t for _, t in run.step_samples[skip:]) / secs if secs else None,
        "final_dir": final_dir, "output_dir": str(run.out_dir), "world_size": run.world, "checkpoint": run.last_tag,
    }
    if run.rank == 0:
        atomic_write(run.out_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def train(recipe: RecipeConfig, hooks: Optional[Hooks] = None, allow_changed: Sequence[str] = (), overwrite: bool = False,
          task: DiffusionTask = DIFFUSION) -> dict:
    """Train ``recipe``; resumes from ``output_dir/checkpoints/latest`` when it exists.

    Works in one process (a one-rank gloo/nccl group is created) and under any launcher. The
    pieces (:func:`build_run`, :func:`train_step`, :func:`log_step`, :func:`maybe_save`,
    :func:`finish`) can be called on their own.

    Args:
        recipe: the validated recipe.
        hooks: optional callbacks for tests and tools: ``before_step(engine, step)`` after the
            last backward of a step (gradients reduced) and before the optimizer step;
            ``after_step(engine, step, metrics)``; ``at_end(engine, ema, info)`` before export.
        allow_changed: recipe fields a resume may change (see :func:`build_run`).
        overwrite: start over in ``output_dir`` instead of resuming (see :func:`build_run`).
        task: what is trained (default: the DiT's flow matching; ``train_vae.VAE_TASK`` for a VAE).

    Returns:
        The summary of :func:`finish` (also written to ``output_dir/summary.json``).

    Raises:
        TrainingDiverged: on a NaN/inf loss (the last good checkpoint is kept).
        ConfigError: for settings that cannot work (named field and value).
    """
    hooks = hooks or {}
    run = build_run(recipe, allow_changed, overwrite, task)
    tc = recipe.train
    run.engine.train()
    bar = tqdm(range(run.start_step, run.end_step), initial=run.start_step, total=tc.max_steps, desc="train", unit="step",
               disable=run.rank != 0, dynamic_ncols=True)
    batches = run.source.loader(run.start_step, run.end_step, recipe.data.num_workers)
    try:
        for step in bar:
            try:
                result = train_step(run, step, batches, hooks)
            except TrainingDiverged as exc:
                bar.close()
                _rank0_print(run.rank, str(exc))
                if run.writer is not None:
                    run.writer.close()
                raise
            log_step(run, result)
            if run.rank == 0:
                recent = run.losses[-10:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{result.metrics['lr']:.2e}")
            if "after_step" in hooks:
                hooks["after_step"](run.engine, step, result.metrics)
            if tc.sample_every and (step + 1) % tc.sample_every == 0:
                _log_samples(run.engine, recipe, run.cond, run.writer, run.out_dir, step + 1, run.dtype, run.autoencoder)
            try:
                maybe_export(run, step)  # before the save: a checkpoint past step N implies export N is complete
                maybe_save(run, step)
            except TrainingDiverged as exc:
                _rank0_print(run.rank, str(exc))
                if run.writer is not None:
                    run.writer.close()
                raise
    finally:
        bar.close()
    return finish(run, hooks)


@torch.no_grad()
def _log_samples(engine: Any, recipe: RecipeConfig, cond: Any, writer: Any, out_dir: Path, step: int, dtype: torch.dtype,
                 autoencoder: Optional[torch.nn.Module] = None) -> None:
    """Predict held-out clips from their first 2 (latent) frames with the live weights; every rank
    runs the sampler (expert-parallel layers need all ranks), rank 0 writes GIF + TensorBoard image
    (decoded through the recipe's autoencoder)."""
    model = engine.module
    held = build_dataset(recipe, held_out=True)
    n = min(2, len(held))
    items = [held[i] for i in range(n)]
    if "latents" in items[0]:
        videos = torch.stack([it["latents"] for it in items])
    else:
        videos = torch.stack([it["video"] for it in items])
        videos = encode_videos(autoencoder, videos) if autoencoder is not None else videos
    videos = videos.to(engine.device, dtype)
    batch = {"video": videos, "caption": [it.get("caption", "") for it in items]}
    if all("label" in it for it in items):
        batch["label"] = torch.tensor([int(it["label"]) for it in items])
    ctx = torch.zeros(n, videos.shape[2], dtype=torch.bool, device=videos.device)
    ctx[:, : min(2, videos.shape[2] - 1)] = True
    was_training = model.training
    model.eval()
    # the recipe's steps, sampler, guidance and the shift training used (issue 13)
    pred = sample(model, tuple(videos.shape), cond(batch), **FlowMatching(recipe.diffusion).sampling_kwargs(tuple(videos.shape), model.config.patch_size),
                  generator=torch.Generator().manual_seed(recipe.train.seed),
                  context=videos, context_mask=ctx, device=videos.device, dtype=dtype)
    model.train(was_training)
    if writer is None:
        return
    if autoencoder is not None:  # latents -> pixels for the GIF
        videos, pred = (autoencoder.decode(x.float()) for x in (videos, pred))
    clips = [side_by_side([to_uint8(videos[i].float()), to_uint8(pred[i].float())]) for i in range(n)]
    frames = side_by_side([c.transpose(0, 2, 1, 3) for c in clips]).transpose(0, 2, 1, 3)
    save_video(out_dir / "samples" / f"step_{step:08d}.gif", frames, fps=4, scale=4)
    add_gif(writer, "samples/prediction", frames, step)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparse-dit train``."""
    parser.add_argument("recipe", help="recipe YAML (e.g. recipes/tiny/moe.yaml)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override recipe fields, e.g. --set train.max_steps=100 parallel.ep_size=2")
    parser.add_argument("--num-procs", type=int, default=1,
                        help="ranks on this machine; >1 runs the deepspeed launcher (default: 1 process)")
    parser.add_argument("--allow-changed", default="", metavar="FIELDS",
                        help="resume although these recipe fields changed: comma-separated dotted fields or sections, or 'all' "
                             f"(always allowed: {', '.join(RESUME_FREE)})")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over: delete output_dir's checkpoints, final/ and logs instead of resuming from them")
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port for --num-procs > 1 (default: a free one)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers


def launch(recipe: str | Path, overrides: Sequence[str] = (), num_procs: int = 2, master_port: Optional[int] = None,
           allow_changed: str = "", module: str = "sparse_dit.recipes.train") -> int:
    """Run ``recipe`` on ``num_procs`` ranks of this machine through the deepspeed launcher
    (``--num_gpus N``: CPU ranks on a CPU machine); returns the launcher's exit code.

    Args:
        recipe: recipe YAML path.
        overrides: ``--set`` overrides.
        num_procs: ranks.
        master_port: rendezvous port (default: a free one).
        allow_changed: ``--allow-changed`` for a resume.
        module: the module each rank runs (``sparse_dit.recipes.train_vae`` for a VAE recipe).
    """
    port = master_port or free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs), "--master_port", str(port),
           "--no_local_rank", "--module", module, str(recipe)]
    if allow_changed:
        cmd += ["--allow-changed", allow_changed]
    if overrides:
        cmd += ["--set", *overrides]
    print("launching:", " ".join(cmd[2:]).replace("deepspeed.launcher.runner", "deepspeed", 1), flush=True)
    return subprocess.call(cmd, env=dict(os.environ))


def run(args: argparse.Namespace, task: DiffusionTask = DIFFUSION) -> int:
    """``sparse-dit train`` (and, with the VAE task, ``sparse-dit train-vae``): validate the
    recipe, then train here or launch N ranks."""
    try:
        recipe = task.load_recipe(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"sparse-dit train: {exc}", file=sys.stderr)
        return 2
    if args.num_procs < 1:
        print(f"sparse-dit train: --num-procs={args.num_procs} must be >= 1", file=sys.stderr)
        return 2
    launched = "RANK" in os.environ  # a rank under a launcher (ours, deepspeed's, torchrun)
    if not launched:  # fail before any process group or rank exists
        try:
            task.check(recipe, args.num_procs)
            if args.overwrite:  # only once the settings are known to work
                removed = clear_run(Path(recipe.output_dir))
                if removed:
                    print(f"--overwrite: removed {', '.join(removed)} from {recipe.output_dir}", flush=True)
            else:
                check_layout(Path(recipe.output_dir) / "checkpoints", args.num_procs, recipe.parallel.ep_size)
        except (ConfigError, CheckpointError) as exc:
            print(f"sparse-dit train: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"sparse-dit train: --overwrite: cannot remove run files of output_dir={recipe.output_dir!r} ({exc})", file=sys.stderr)
            return 2
        if args.num_procs > 1:  # the ranks resume the folder this process checked (or cleared)
            return launch(args.recipe, args.overrides, args.num_procs, args.master_port, args.allow_changed, task.module)
    try:
        summary = train(recipe, allow_changed=[a.strip() for a in args.allow_changed.split(",") if a.strip()],
                        overwrite=args.overwrite and launched, task=task)
    except (ConfigError, CheckpointError, TrainingDiverged) as exc:
        print(f"sparse-dit train: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, TrainingDiverged) else 2
    except RuntimeError as exc:  # torch's DistBackendError and gloo's errors are RuntimeErrors
        if not _peer_lost(exc):
            raise
        rank = os.environ.get("RANK", "0")
        first = str(exc).strip().splitlines()[0][:300]
        print(f"sparse-dit train: rank {rank}: {_silent_ranks(int(rank), int(os.environ.get('WORLD_SIZE', '1')))} stopped answering "
              f"(frozen or dead) within parallel.timeout_s={recipe.parallel.timeout_s:g}; stopping. Resume from output_dir's latest "
              f"checkpoint. ({first})", file=sys.stderr, flush=True)
        os._exit(4)  # the process group is broken: its teardown could wait on the lost rank
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "world_size"}, default=str))
    return 0


_PEER_LOST = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe", "connection refused")


def _peer_lost(exc: BaseException) -> bool:
    """A collective failed because another rank froze or died (gloo/NCCL wording)."""
    return dist.is_initialized() and any(w in str(exc).lower() for w in _PEER_LOST)


def _silent_ranks(me: int, world: int, wait_s: float = 3.0) -> str:
    """Name the ranks that froze or died: every rank that hits a lost peer says so in the
    rendezvous store; after ``wait_s`` the ranks that did not are the silent ones."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=wait_s))
        store.set(f"sparse_dit/lost/{me}", "1")
        time.sleep(wait_s)
        silent = [r for r in range(world) if r != me and not store.check([f"sparse_dit/lost/{r}"])]
    except Exception:  # the store lives in rank 0's process: it does not answer when rank 0 froze
        return "rank 0 (it hosts the rendezvous store, which does not answer)" if me != 0 else "another rank"
    if not silent:
        return "another rank"
    return f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))}"


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m sparse_dit.recipes.train RECIPE [--set ...]`` (what the launchers run)."""
    parser = argparse.ArgumentParser(prog="sparse_dit.recipes.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
