"""``sparse-dit eval``: quality, inference cost and dense-vs-sparse reports.

    sparse-dit eval compare RUN_DIR [RUN_DIR ...] --out DIR [--data id=PATH --data ood=PATH]
    sparse-dit eval physics [RUN_DIR] --data id=PATH      (calibration baselines; a run's scores)
    sparse-dit eval cost PRESET_OR_RUN --size 8,32,32 --size 16,64,64 [--no-measure]
    sparse-dit eval loss RUN_DIR --data id=PATH
    sparse-dit eval rollout RUN_DIR --frames 32 [--scenario occlusion] [--ood] [--out rollout.json]

Validation data is either saved datasets (``--data NAME=PATH``, repeatable; the first is the
headline split) or simulated on the fly (``--scenario uniform --fps 4 --num-videos 48`` makes an
``id`` split, plus ``ood`` with ``--ood``), at the size given by ``--frames/--height/--width`` or
else the first run's recipe. A saved dataset is a physics one (``sparse-dit data physics``:
videos and the simulator's states) or any video dataset (``sparse-dit data folder`` / ``data
hf``: clips cut to that size; the physics metrics are skipped, with the reason). Data whose
source, resolution or frame rate differ from a run's training data is warned about in one line
(``--strict``: refused, exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from sparse_dit.dit import SparseDiT
from sparse_dit.config import ConfigError
from sparse_dit.evals.compare import check_eval_data, compare, evaluate_run, load_run, load_split, physics_split
from sparse_dit.evals.metrics import DEFAULT_METRICS
from sparse_dit.evals.splits import EvalSplit
from sparse_dit.evals.cost import cost_report
from sparse_dit.evals.latent import encode_videos_batched, held_latent_frames, is_latent
from sparse_dit.evals.loss import heldout_loss
from sparse_dit.evals.physics import score_baselines
from sparse_dit.evals.report import _clean, write_report
from sparse_dit.evals.rollout import evaluate_rollout, pipeline_predictor, simulate_rollout_split
from sparse_dit.pipeline import VideoPipeline
from sparse_dit.presets import preset_config

__all__ = ["add_arguments", "run"]


def _size(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must be three comma-separated ints T,H,W") from None
    return t, h, w


def _steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(v) for v in text.split(","))
    except ValueError:
        steps = ()
    if not steps or any(n < 1 for n in steps):
        raise argparse.ArgumentTypeError(f"steps {text!r} must be comma-separated ints >= 1, e.g. 5,10,20")
    return steps


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation data")
    g.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="a saved dataset as split NAME (repeatable): physics (`data physics`) or any video (`data folder`, `data hf`)")
    g.add_argument("--strict", action="store_true", help="refuse eval data whose source, resolution or fps differ from a run's training data")
    g.add_argument("--limit", type=int, default=None, help="use the first N videos of each --data split")
    g.add_argument("--scenario", default="uniform", help="simulate splits of this scenario when no --data is given")
    g.add_argument("--fps", type=float, default=4.0, help="frame rate of simulated splits (the quickstart's: 4)")
    g.add_argument("--num-videos", type=int, default=48)
    g.add_argument("--data-seed", type=int, default=1_000_001, help="seed of simulated splits (not the training seed)")
    g.add_argument("--ood", action="store_true", help="also simulate an out-of-distribution split")
    g.add_argument("--frames", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--context-frames", type=int, default=3, help="given frames (PhyWorld: 3)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the recipe's)")
    p.add_argument("--sampler", choices=("euler", "heun"), default=None)
    p.add_argument("--seed", type=int, default=0, help="noise seed shared by all runs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bf16", action="store_true", help="evaluate under bfloat16 autocast")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="EVAL")
    sub.required = True
    p = sub.add_parser("compare", help="evaluate finished runs on the same data and noise; write a report")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--latency-repeats", type=int, default=5, help="timed generations per model (>= 5; 0 = skip)")
    p.add_argument("--size", type=_size, action="append", default=[], help="extra T,H,W for the cost table (repeatable)")
    p.add_argument("--samples", type=int, default=4, help="videos per sample GIF")
    p.add_argument("--steps-sweep", type=_steps, default=(), metavar="N,N,...",
                   help="also generate the headline split at these sampler step counts: quality vs steps curve "
                        "(quality_vs_steps.png; one more generation per count)")
    p.add_argument("--fvd-detector", default=None, metavar="PATH", help="StyleGAN-V's I3D TorchScript file: adds FVD (any video data)")
    p.add_argument("--fvd-frames", type=int, default=16, help="frames per video FVD uses (FVD16: 16)")
    _data_args(p)
    _eval_args(p)
    p = sub.add_parser("physics", help="physics scores of the calibration baselines (and of a run)")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR")
    _data_args(p)
    _eval_args(p)
    p = sub.add_parser("cost", help="params, MACs per video, latency and memory at several sizes")
    p.add_argument("model", help="a preset name, or a run / save_pretrained folder")
    p.add_argument("--size", type=_size, action="append", default=[], help="T,H,W (repeatable; default 8,32,32)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-measure", action="store_true", help="analytic numbers only")
    p = sub.add_parser("loss", help="held-out flow-matching loss at a fixed t grid with fixed noise")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--num-t", type=int, default=10)
    _data_args(p)
    _eval_args(p)
    p = sub.add_parser("rollout", help="roll a run out N frames from simulated clips; errors per horizon bucket vs baselines")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--frames", type=int, required=True, help="N: frames rolled out after the given ones (buckets 1-8, 9-16, 17-32, ...)")
    p.add_argument("--scenario", default="uniform", help="physics scenario(s) to simulate (e.g. occlusion: balls pass behind a bar)")
    p.add_argument("--ood", action="store_true", help="also score an out-of-distribution split (speeds/radii outside training's)")
    p.add_argument("--num-videos", type=int, default=8)
    p.add_argument("--fps", type=float, default=4.0, help="frame rate of the simulation: the training data's (the quickstart's: 4)")
    p.add_argument("--data-seed", type=int, default=1_000_003, help="seed of the simulated scenes (not the training seed)")
    p.add_argument("--context-frames", type=int, default=None, help="given / carried frames (default: the recipe's prefix, else 3)")
    p.add_argument("--window", type=int, default=None, help="frames per model call (default: the recipe's clip length)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="write the result as JSON to this file")
    p.add_argument("--strict", action="store_true", help="refuse a run trained on other data than the simulated physics world at --fps")
    for sp in sub.choices.values():
        sp.add_argument("--json", action="store_true", help="print one JSON object")


def _splits(args: argparse.Namespace) -> list:
    T, H, W = args.frames, args.height, args.width
    runs = getattr(args, "runs", None) or []
    if runs and None in (T, H, W):
        r = load_run(runs[0]).recipe
        if r is not None:
            T, H, W = T or r.data.num_frames, H or r.data.height, W or r.data.width
    if args.data:
        out = []
        for item in args.data:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--data {item!r} must look like NAME=PATH")
            split = load_split(name, path, args.limit, frames=T, height=H if W else None, width=W if H else None)
            for what, why in split.skipped:
                print(f"sparse-dit eval: split {name!r}: left out {what}: {why}", file=sys.stderr)
            out.append(split)
        return out
    T, H, W = T or 8, H or 32, W or 32
    splits = [physics_split("id", args.scenario, "id", args.num_videos, T, H, W, args.data_seed, args.fps)]
    if args.ood:
        splits.append(physics_split("ood", args.scenario, "ood", args.num_videos, T, H, W, args.data_seed, args.fps))
    return splits


def _eval_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"num_inference_steps": args.steps, "sampler": args.sampler, "seed": args.seed, "batch_size": args.batch_size,
            "autocast_dtype": torch.bfloat16 if args.bf16 else None}


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_clean(obj)))
    else:
        print(json.dumps(_clean(obj), indent=2))


def _rollout_table(result: dict[str, Any]) -> str:
    """Plain-text tables: one per split, a row per (predictor, bucket)."""
    lines = []
    for split, res in result["splits"].items():
        lines.append(f"split {split}: {res['model']['num_videos']} videos, {res['model']['context_frames']} given frames, "
                     f"{res['model']['generated_frames']} rolled out")
        lines.append(f"  {'predictor':<18} {'horizon':>8} {'vel err':>8} {'pos err':>8} {'detect':>7} {'gt speed':>8} {'pairs':>6}")
        rows = [("model", res["model"])] + list(res["baselines"].items())
        for name, sc in rows:
            for b in res["buckets"]:
                r = sc["per_bucket"][b]
                lines.append(f"  {name:<18} {b:>8} {r['velocity_error']:8.3f} {r['position_error']:8.2f} "
                             f"{r['detection_rate']:7.3f} {r['gt_speed']:8.3f} {r['num_visible']:6d}")
    return "\n".join(lines)


def _run_rollout(args: argparse.Namespace) -> int:
    if args.frames < 1:
        raise ValueError(f"--frames={args.frames} is not allowed; give the number of frames to roll out, an int >= 1")
    if args.num_videos < 1:
        raise ValueError(f"--num-videos={args.num_videos} is not allowed; use an int >= 1")
    if not args.fps > 0:
        raise ValueError(f"--fps={args.fps} is not allowed; use a number > 0")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} is not allowed; use an int >= 1")
    run = load_run(args.run)
    r = run.recipe
    if r is None:
        raise ValueError(f"{args.run}: no recipe.yaml; a rollout needs the training size, clip length and sampler settings")
    ctx = args.context_frames if args.context_frames is not None else (r.train.context.frames if r.train.context.mode == "prefix" else 3)
    window = args.window if args.window is not None else r.data.num_frames
    if window < 2:
        raise ValueError(f"--window={window} is not allowed; a window holds the carried frames and at least one new one, so use >= 2")
    if not 1 <= ctx < window:
        raise ValueError(f"--context-frames={ctx} is not allowed with {window}-frame windows; use 1..{window - 1}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps={args.steps} is not allowed; use an int >= 1")
    pipe = VideoPipeline.from_config(run.model, r.diffusion, vae=run.autoencoder)  # a latent-space run decodes through its VAE
    predict = pipeline_predictor(pipe, window, ctx, seed=args.seed, batch_size=args.batch_size, num_inference_steps=args.steps)
    result: dict[str, Any] = {"run": str(args.run), "scenario": args.scenario, "frames": args.frames, "fps": args.fps,
                              "window": window, "context_frames": ctx, "splits": {}}
    for split in ("id", "ood") if args.ood else ("id",):
        videos, states = simulate_rollout_split(args.scenario, split, args.num_videos, ctx, args.frames, r.data.height, r.data.width,
                                                args.data_seed, args.fps)
        if split == "id":  # simulated physics at --fps: say so when the run trained on other data
            check_eval_data([run], [EvalSplit(split, videos, states, source="physics", fps=args.fps)], strict=args.strict, log=_warn)
        result["splits"][split], _ = evaluate_rollout(predict, videos, states, ctx)
    if args.out:
        Path(args.out).write_text(json.dumps(_clean(result), indent=2))
    if args.json:
        _print(result, True)
    else:
        print(_rollout_table(result))
        if args.out:
            print(f"wrote {Path(args.out).resolve()}")
    return 0


def _warn(line: str) -> None:
    print(f"sparse-dit eval: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """``sparse-dit eval``; bad input (a run, a dataset, a setting, data unlike training's with
    ``--strict``) is one line on stderr and exit status 2."""
    try:
        return _run(args)
    except (ValueError, ConfigError, FileNotFoundError, OSError) as exc:
        text = str(exc).strip().splitlines()
        print(f"sparse-dit eval {args.eval_command}: {text[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    cmd = args.eval_command
    if cmd == "rollout":
        return _run_rollout(args)
    if cmd == "compare":
        splits = _splits(args)
        kw: dict[str, Any] = {}
        if args.fvd_detector:
            if not Path(args.fvd_detector).is_file():
                raise FileNotFoundError(f"--fvd-detector {args.fvd_detector!r} is not a file (an I3D TorchScript; nothing is downloaded)")
            kw = {"metrics": [*DEFAULT_METRICS, "fvd"],
                  "metric_options": {"fvd_detector": args.fvd_detector, "fvd_num_frames": args.fvd_frames}}
        report, videos = compare(args.runs, splits, context_frames=args.context_frames, latency_repeats=args.latency_repeats,
                                 cost_sizes=args.size, strict=args.strict, steps_sweep=args.steps_sweep, **kw,
                                 **_eval_kwargs(args))
        write_report(report, videos, args.out, num_samples=args.samples)
        out = Path(args.out).resolve()
        if args.json:
            _print(report, True)
        else:
            print((out / "report.md").read_text())
            print(f"wrote {out}/report.md, report.json, plots, sample GIFs and tb/")
        return 0
    if cmd == "physics":
        splits = _splits(args)
        for s in splits:
            if not s.has_states:
                raise ConfigError(f"split {s.name!r} ({s.source} data, {s.path}) has no simulator states; eval physics needs a "
                                  "`sparse-dit data physics` dataset (eval loss and eval compare take any video dataset)")
        runs = [load_run(d) for d in args.runs]
        check_eval_data(runs, splits, strict=args.strict, log=_warn)
        result: dict[str, Any] = {"baselines": {s.name: score_baselines(s.videos, s.states, args.context_frames) for s in splits}}
        for d, run_ in zip(args.runs, runs):
            m, _ = evaluate_run(run_, splits, context_frames=args.context_frames, latency_repeats=0,
                                log=lambda s: None, **_eval_kwargs(args))
            result[str(d)] = {s: {k: v[k] for k in ("velocity_error", "position_error", "detection_rate")} for s, v in m["splits"].items()}
        _print(result, args.json)
        return 0
    if cmd == "cost":
        model = load_run(args.model).model if Path(args.model).is_dir() else SparseDiT(preset_config(args.model)).eval()
        sizes = args.size or [(8, 32, 32)]
        rows = cost_report(model, sizes, num_inference_steps=args.steps, sampler=args.sampler, guidance_scale=args.guidance_scale,
                           measure=not args.no_measure, **({} if args.no_measure else {"batch_size": args.batch_size, "repeats": args.repeats}))
        _print(rows, args.json)
        return 0
    if cmd == "loss":
        splits = _splits(args)
        runs = [load_run(d) for d in args.runs]
        check_eval_data(runs, splits, strict=args.strict, log=_warn)
        result = {}
        for d, run_ in zip(args.runs, runs):
            model = run_.model
            result[str(d)] = {}
            for s in splits:
                videos, ctx = s.model_videos(), args.context_frames
                if is_latent(run_.autoencoder):  # on the encoded latents (evals/latent.py), latent frames the context covers left out
                    ctx = held_latent_frames(run_.autoencoder, videos.shape[2], ctx)
                    videos = encode_videos_batched(run_.autoencoder, videos, args.batch_size)
                result[str(d)][s.name] = heldout_loss(model, videos, context_frames=ctx, num_t=args.num_t, seed=args.seed,
                                                      batch_size=args.batch_size)
        _print(result, args.json)
        return 0
    raise SystemExit(f"sparse-dit eval: unknown command {cmd!r}")
