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
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sparse_dit.config import ConfigError, RecipeConfig
from sparse_dit.presets import load_recipe
from sparse_dit.schema import to_dict

__all__ = ["TrainingDiverged", "train", "add_arguments", "run", "main"]

# Order of the per-micro-step values all-reduced in one collective (mean over ranks).
_REDUCED = ("loss", "mse", "moe/aux_loss", "moe/balance_loss", "moe/z_loss", "moe/max_violation", "moe/router_entropy", "moe/dropped_fraction",
            "samples", "tokens")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving."""


def _rank0_print(rank: int, *args: Any) -> None:
    if rank == 0:
        print(*args, flush=True)


def _dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


class _Recorder:
    """Calls the engine and keeps the forward's :class:`~sparse_dit.dit.DiTAux` for logging."""

    def __init__(self, engine: Any, config: Any) -> None:
        self.engine, self.config, self.aux = engine, config, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.engine(*args, **kwargs)
        self.aux = out[1] if isinstance(out, tuple) else None
        return out


def _ema_update(ema: Any, model: torch.nn.Module, zero3: bool) -> None:
    if zero3:  # parameters are partitioned: gather them (read-only) to average the full tensors
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            ema.update(model)
    else:
        ema.update(model)


def _ema_init(model: torch.nn.Module, decay: float, zero3: bool) -> Any:
    from sparse_dit.diffusion import EMA

    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return EMA(model, decay=decay)
    return EMA(model, decay=decay)


def _plain_grad_norm(model: torch.nn.Module) -> float | None:
    """Global L2 norm of ``p.grad`` (ZeRO-0: gradients are all-reduced in place and replicated,
    expert parallelism is refused there, so every rank computes the same value)."""
    grads = [p.grad.detach().float() for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _write_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows a crashed run logged past the checkpoint being resumed."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(r + "\n" for r in rows))


def train(recipe: RecipeConfig, hooks: Optional[dict[str, Callable[..., Any]]] = None) -> dict:
    """Train ``recipe``; resumes from ``output_dir/checkpoints/latest`` when it exists.

    Works in one process (a one-rank gloo/nccl group is created) and under any launcher.

    Args:
        recipe: the validated recipe.
        hooks: optional callbacks for tests and tools: ``before_step(engine, step)`` after the
            last backward of a step (gradients reduced) and before the optimizer step;
            ``after_step(engine, step, metrics)``; ``at_end(engine, ema, info)`` before export.

    Returns:
        A summary dict: ``steps``, ``start_step``, ``first_loss``, ``last_loss``,
        ``samples_per_s``, ``tokens_per_s``, ``final_dir``, ``output_dir``, ``world_size``.

    Raises:
        TrainingDiverged: on a NaN/inf loss (the last good checkpoint is kept).
        ConfigError: for settings that cannot work (named field and value).
    """
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from sparse_dit.diffusion import FlowMatching, drop_conditioning
    from sparse_dit.dit import SparseDiT
    from sparse_dit.flops import count
    from sparse_dit.moe import summarize_aux, update_balance_biases
    from sparse_dit.parallel import (
        batch_layout, build_engine, check_parallel_config, export_final, init_distributed, latest_tag,
        load_checkpoint, resolve_precision, save_checkpoint, setup_expert_parallel,
    )
    from sparse_dit.recipes.batches import BatchSource, BucketSource, Conditioner, build_dataset, context_mask, step_generator
    from sparse_dit.recipes.tb import add_expert_histogram, open_writer

    hooks = hooks or {}
    rank, world = init_distributed()
    check_parallel_config(recipe, world)
    micro, accum, G = batch_layout(recipe, world)
    tc, par = recipe.train, recipe.parallel
    precision = resolve_precision(par.precision)
    dtype = _dtype(precision)
    zero3 = par.zero_stage == 3
    out_dir = Path(recipe.output_dir)
    ckpt_root = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    import yaml

    saved_recipe = out_dir / "recipe.yaml"
    if (ckpt_root / "latest").is_file() and saved_recipe.is_file():
        # Resuming: the checkpoint must hold this model (a reused output_dir is the usual mistake)
        before = (yaml.safe_load(saved_recipe.read_text()) or {}).get("model")
        if before != to_dict(recipe.model):
            diff = sorted(k for k in set(before or {}) | set(to_dict(recipe.model)) if (before or {}).get(k) != to_dict(recipe.model).get(k))
            raise ConfigError(
                f"output_dir={str(out_dir)!r} holds checkpoints of a different model (model.{diff[0] if diff else '?'} differs); "
                "use a new output_dir, or the recipe that wrote it to resume"
            )
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        saved_recipe.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))

    # 1. Model: same initialisation on every rank, then experts sharded over the EP group
    torch.manual_seed(tc.seed)
    model = SparseDiT(recipe.model)
    ep = setup_expert_parallel(model, par.ep_size)
    engine, ds_config = build_engine(model, recipe, world)
    model = engine.module
    device = engine.device
    ema = _ema_init(model, tc.ema_decay, zero3)
    fm = FlowMatching(recipe.diffusion)
    cond = Conditioner(recipe, device, dtype)
    null_class = model.y_embedder.null_class if model.y_embedder is not None else None

    # 2. Data: every rank is a data-parallel rank (EP shards experts, not the batch)
    dataset = build_dataset(recipe)
    if recipe.data.token_budget is not None:  # any-size: one bucket shape per micro-batch
        source = BucketSource(dataset, recipe.data.token_budget, recipe.model.patch_size, accum, rank, world, tc.seed)
    else:
        source = BatchSource(dataset, micro, accum, rank, world, tc.seed)
    sample0 = dataset[0]["video"]
    C, T, H, W = sample0.shape
    macs = count(recipe.model, (C, T, H, W), text_len=getattr(cond.encoder, "max_length", 0) if cond.encoder else 0)

    # 3. Resume
    start_step = 0
    tag = latest_tag(ckpt_root) if ckpt_root.exists() else None
    if tag is not None:
        state = load_checkpoint(engine, ckpt_root, tag)
        start_step = int(state["step"])
        ema.load_state_dict(state["ema"])
        _rank0_print(rank, f"resumed from {ckpt_root / tag} at step {start_step}")
    if rank == 0:
        _truncate_metrics(metrics_path, start_step)
    writer = open_writer(out_dir / "tensorboard", purge_step=start_step + 1 if start_step else None) if rank == 0 else None
    _rank0_print(
        rank,
        f"training {recipe.preset or 'model'}: {macs['total_params'] / 1e6:.2f}M params ({macs['active_params'] / 1e6:.2f}M active), "
        f"{world} rank(s), ZeRO-{par.zero_stage}, EP={par.ep_size}, {precision}, global batch {G} = {micro} x {accum} accum x {world}",
    )

    end_step = tc.max_steps if tc.stop_after is None else min(tc.max_steps, start_step + tc.stop_after)
    losses: list[float] = []
    step_times: list[float] = []
    step_samples: list[tuple[float, float]] = []
    last_tag = tag
    engine.train()
    bar = tqdm(range(start_step, end_step), initial=start_step, total=tc.max_steps, desc="train", unit="step", disable=rank != 0)
    batches = source.loader(start_step, end_step, recipe.data.num_workers)
    for step in bar:
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler advances in engine.step)
        sums = torch.zeros(len(_REDUCED), dtype=torch.float64)
        hist = None
        for m in range(accum):
            g = step_generator(tc.seed, step, m, rank)
            batch = next(batches)
            x0 = batch["video"].to(device=device, dtype=dtype)
            kwargs = drop_conditioning(cond(batch), recipe.diffusion.cond_dropout, generator=g, null_class=null_class)
            ctx = context_mask(x0.shape[0], x0.shape[2], tc.context, g).to(device)
            rec = _Recorder(engine, recipe.model)
            n_tok = math.prod(s // p for s, p in zip(x0.shape[2:], recipe.model.patch_size))  # tokens per sample
            out = fm.training_losses(rec, x0, kwargs, context_mask=ctx, generator=g, num_tokens=n_tok)
            scalars, h = summarize_aux(rec.aux.moe if rec.aux is not None else [])
            vals = [out["loss"].detach().double().item(), out["mse"].double().item()] + [scalars.get(k, 0.0) for k in _REDUCED[2:-2]]
            vals += [float(x0.shape[0]), float(x0.shape[0] * n_tok)]  # samples and tokens (summed below)
            vals_t = torch.tensor(vals, dtype=torch.float64)
            dist.all_reduce(vals_t)  # one collective: NaN check, global loss and MoE stats
            vals_t /= world
            if not torch.isfinite(vals_t[0]):
                bar.close()
                where = f"{ckpt_root / last_tag}" if last_tag else "none saved yet"
                msg = (
                    f"train/loss is {vals_t[0].item()} at step {step + 1} (micro-step {m}); stopping without saving. "
                    f"Last good checkpoint: {where}. Lower train.lr, raise train.warmup_steps or use parallel.precision=fp32."
                )
                _rank0_print(rank, msg)
                if writer is not None:
                    writer.close()
                raise TrainingDiverged(msg)
            sums += vals_t
            if h is not None:
                hist = h if hist is None else hist + h
            engine.backward(out["loss"])
            if m == accum - 1:
                if "before_step" in hooks:
                    hooks["before_step"](engine, step)
                pre_norm = _plain_grad_norm(model) if par.zero_stage == 0 else None
            engine.step()
        # after the optimizer step: grad norm, balance biases (counts summed over all ranks), EMA
        gn = engine.get_global_grad_norm()  # ZeRO and the bf16 optimizer record it; fp32 ZeRO-0 does not
        grad_norm = float(gn) if gn is not None else (pre_norm if pre_norm is not None else float("nan"))
        update_balance_biases(model, reduce_fn=lambda t: dist.all_reduce(t))
        _ema_update(ema, model, zero3)
        mean = (sums / accum).tolist()
        metrics = dict(zip(_REDUCED[:-2], mean[:-2]))
        samples, tokens = sums[-2].item() * world, sums[-1].item() * world  # summed over micro-steps and ranks
        dt = time.perf_counter() - t0
        step_times.append(dt)
        metrics.update({"step": step + 1, "lr": lr, "grad_norm": grad_norm, "samples": int(samples), "samples_per_s": samples / dt, "tokens_per_s": tokens / dt})
        step_samples.append((samples, tokens))
        losses.append(metrics["loss"])
        if hist is not None:
            dist.all_reduce(hist)
        if rank == 0:
            _write_metrics(metrics_path, metrics)
            writer.add_scalar("train/loss", metrics["loss"], step + 1)
            if (step + 1) % tc.log_every == 0 or step + 1 == end_step:
                writer.add_scalar("train/mse", metrics["mse"], step + 1)
                writer.add_scalar("train/lr", lr, step + 1)
                writer.add_scalar("train/grad_norm", grad_norm, step + 1)
                writer.add_scalar("perf/samples_per_s", metrics["samples_per_s"], step + 1)
                writer.add_scalar("perf/tokens_per_s", metrics["tokens_per_s"], step + 1)
                if recipe.data.token_budget is None:  # one shape: analytic FLOPs per sample apply
                    writer.add_scalar("perf/model_tflops", 3 * macs["macs"] * 2 * metrics["samples_per_s"] / 1e12, step + 1)
                if hist is not None:
                    for k in _REDUCED[2:-2]:
                        writer.add_scalar(k, metrics[k], step + 1)
                    add_expert_histogram(writer, "moe/tokens_per_expert", hist, step + 1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}", lr=f"{lr:.2e}")
        if "after_step" in hooks:
            hooks["after_step"](engine, step, metrics)
        if tc.sample_every and (step + 1) % tc.sample_every == 0:
            _log_samples(engine, recipe, cond, writer, out_dir, step + 1, dtype)
        done = step + 1 == end_step
        if (step + 1) % tc.save_every == 0 or done:
            last_tag = save_checkpoint(engine, ckpt_root, step + 1, {"ema": ema.state_dict()}, tc.keep_last)
    bar.close()

    info = {"ep": ep, "rank": rank, "world_size": world}
    if "at_end" in hooks:
        hooks["at_end"](engine, ema, info)
    final_dir = None
    if end_step == tc.max_steps:
        export_final(model, ema.shadow, par.ep_size, out_dir / "final")
        final_dir = str(out_dir / "final")
        _rank0_print(rank, f"exported EMA weights to {final_dir}")
    if writer is not None:
        writer.close()
    skip = 1 if len(step_times) > 1 else 0  # the first step pays warm-up costs
    secs = sum(step_times[skip:])
    sps = sum(s for s, _ in step_samples[skip:]) / secs if secs else float("nan")
    tps = sum(t for _, t in step_samples[skip:]) / secs if secs else float("nan")
    return {
        "steps": end_step, "start_step": start_step, "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "samples_per_s": sps, "tokens_per_s": tps,
        "final_dir": final_dir, "output_dir": str(out_dir), "world_size": world, "checkpoint": last_tag,
    }


@torch.no_grad()
def _log_samples(engine: Any, recipe: RecipeConfig, cond: Any, writer: Any, out_dir: Path, step: int, dtype: torch.dtype) -> None:
    """Predict held-out clips from their first 2 frames with the live weights; every rank runs
    the sampler (expert-parallel layers need all ranks), rank 0 writes GIF + TensorBoard image."""
    from sparse_dit.diffusion import resolution_shift, sample
    from sparse_dit.recipes.batches import build_dataset
    from sparse_dit.recipes.tb import add_gif
    from sparse_dit.video_io import save_video, side_by_side, to_uint8

    model = engine.module
    held = build_dataset(recipe, held_out=True)
    n = min(2, len(held))
    items = [held[i] for i in range(n)]
    videos = torch.stack([it["video"] for it in items]).to(engine.device, dtype)
    batch = {"video": videos, "caption": [it.get("caption", "") for it in items]}
    if all("label" in it for it in items):
        batch["label"] = torch.tensor([int(it["label"]) for it in items])
    ctx = torch.zeros(n, videos.shape[2], dtype=torch.bool, device=videos.device)
    ctx[:, : min(2, videos.shape[2] - 1)] = True
    was_training = model.training
    model.eval()
    pred = sample(model, tuple(videos.shape), cond(batch), num_inference_steps=recipe.diffusion.num_inference_steps,
                  sampler=recipe.diffusion.sampler, shift=1.0, generator=torch.Generator().manual_seed(recipe.train.seed),
                  context=videos, context_mask=ctx, device=videos.device, dtype=dtype)
    model.train(was_training)
    if writer is None:
        return
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
    parser.add_argument("--master-port", type=int, default=None, help="rendezvous port for --num-procs > 1 (default: a free one)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers


def _launch(args: argparse.Namespace) -> int:
    """Re-run this module under the deepspeed launcher with ``--num_gpus N`` (CPU ranks on CPU)."""
    from sparse_dit.parallel.engine import free_port

    port = args.master_port or free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.num_procs), "--master_port", str(port),
           "--no_local_rank", "--module", "sparse_dit.recipes.train", args.recipe]
    if args.overrides:
        cmd += ["--set", *args.overrides]
    env = dict(os.environ)
    print("launching:", " ".join(cmd[2:]).replace("deepspeed.launcher.runner", "deepspeed", 1), flush=True)
    return subprocess.call(cmd, env=env)


def run(args: argparse.Namespace) -> int:
    """``sparse-dit train``: validate the recipe, then train here or launch N ranks."""
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"sparse-dit train: {exc}", file=sys.stderr)
        return 2
    if args.num_procs < 1:
        print(f"sparse-dit train: --num-procs={args.num_procs} must be >= 1", file=sys.stderr)
        return 2
    if args.num_procs > 1 and "RANK" not in os.environ:
        from sparse_dit.parallel import check_parallel_config

        try:  # fail before spawning ranks
            check_parallel_config(recipe, args.num_procs)
        except ConfigError as exc:
            print(f"sparse-dit train: {exc}", file=sys.stderr)
            return 2
        return _launch(args)
    try:
        summary = train(recipe)
    except (ConfigError, TrainingDiverged) as exc:
        print(f"sparse-dit train: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 3
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "world_size"}, default=str))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m sparse_dit.recipes.train RECIPE [--set ...]`` (what the launchers run)."""
    parser = argparse.ArgumentParser(prog="sparse_dit.recipes.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
