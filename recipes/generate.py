"""``sparse-dit generate``: every prompting mode from the command line (issue 13).

    sparse-dit generate RUN --mode text --out t2v.mp4                          # from noise (and --prompt)
    sparse-dit generate RUN --mode image --out img.png
    sparse-dit generate RUN --mode image-to-video --image a.png [--last-image b.png] --out i2v.mp4
    sparse-dit generate RUN --mode extend --video clip.mp4 --direction backward --out ext.mp4
    sparse-dit generate RUN --mode interpolate --video a.mp4 --video b.mp4 --out mid.mp4
    sparse-dit generate RUN --mode loop --video clip.gif --out loop.gif
    sparse-dit generate RUN --mode sdedit --video clip.mp4 --strength 0.5 --out edit.mp4
    sparse-dit generate RUN --mode rollout --video clip.mp4 --frames 64 --out long.mp4
    sparse-dit generate RUN --out pred.gif --context-frames 2                  # held-out clips, predicted
    sparse-dit generate RUN --prompt "a red ball bouncing" [--expand mod:fn | --no-expand] --out t.mp4

``RUN`` is a run folder (``final/`` + ``recipe.yaml``) or a folder written by ``save_pretrained``.
Every sampling setting (steps, shift, guidance, sampler, grid) defaults to the recipe's
``diffusion`` section, the shift to the one training used; flags override them. Inputs are
read from mp4/gif/png/jpg, centre-cropped to the model's aspect ratio and resized to its
height x width. Each run writes ``OUT`` as .mp4, .gif and a contact-sheet .png (one row per
sample). Without ``--video``, the video modes take held-out clips of the run's data source.
``--prompt`` is expanded into a caption like the training captions (``sparse_dit.prompts``: the
template expander by default, ``--expand NAME_OR_MODULE:FUNCTION`` plugs another) unless
``--no-expand``. Bad inputs are one line naming the flag, the value and what is allowed. Runs in one CPU process,
whatever parallelism trained the model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from sparse_dit.autoencoder import load_autoencoder
from sparse_dit.config import TIMESTEP_GRIDS, ConfigError, RecipeConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.pipeline import VideoPipeline
from sparse_dit.prompts import expand_prompt, resolve_expander
from sparse_dit.recipes.batches import Conditioner, build_dataset
from sparse_dit.schema import from_dict, load_yaml
from sparse_dit.video_io import from_uint8, save_video, side_by_side, to_uint8

__all__ = ["add_arguments", "run", "generate", "generate_videos", "Generated", "GenerateError", "CLI_MODES", "read_frames",
           "contact_sheet", "write_outputs"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".gif") + IMAGE_SUFFIXES


class GenerateError(ValueError):
    """A bad ``sparse-dit generate`` input; ``run`` prints it as one line."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def read_frames(path: str | Path, flag: str, height: int, width: int) -> torch.Tensor:
    """Read an mp4/gif/png/jpg as (3, T, height, width) in [-1, 1]: centre-crop to the aspect
    ratio, then area-resize (antialiased bilinear). Every decoded frame is kept.

    Args:
        path: the file.
        flag: the CLI flag it came from (for error messages).
        height, width: the model's frame size.
    """
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise GenerateError(f"{flag} {path}: unsupported file type {path.suffix!r}; allowed: {', '.join(VIDEO_SUFFIXES)}")
    if not path.is_file():
        raise GenerateError(f"{flag} {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".mp4":  # PyAV: counts what it decoded (a truncated mp4 gives fewer frames, no error)
            frames = np.asarray(iio.imread(path, plugin="pyav", index=None))
        else:
            frames = np.asarray(iio.imread(path, index=None) if suffix == ".gif" else iio.imread(path))
    except Exception as exc:  # any decoder failure is a bad input, not a crash
        why = (str(exc).strip().splitlines() or [""])[0][:160]
        raise GenerateError(f"{flag} {path}: cannot be read as {suffix[1:]} ({type(exc).__name__}: {why})") from None
    if frames.ndim == 2:  # grey image
        frames = frames[None, ..., None]
    elif frames.ndim == 3 and path.suffix.lower() in IMAGE_SUFFIXES:
        frames = frames[None]
    elif frames.ndim == 3:  # grey video
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise GenerateError(f"{flag} {path}: decoded {frames.shape[0] if frames.ndim else 0} frames of shape {frames.shape[1:]}; need T >= 1 frames of H x W >= 1")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    frames = frames[..., :3].astype(np.uint8)  # drop alpha
    video = from_uint8(frames)  # (3, T, h, w)
    h, w = video.shape[2:]
    if h * width > w * height:  # too tall: crop rows
        ch = max(1, round(w * height / width))
        video = video[:, :, (h - ch) // 2 : (h - ch) // 2 + ch]
    elif h * width < w * height:  # too wide: crop columns
        cw = max(1, round(h * width / height))
        video = video[:, :, :, (w - cw) // 2 : (w - cw) // 2 + cw]
    if tuple(video.shape[2:]) != (height, width):
        video = F.interpolate(rearrange(video, "c t h w -> t c h w"), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        video = rearrange(video, "t c h w -> c t h w").clamp(-1, 1)
    return video


# --------------------------------------------------------------------------------------------
# Modes: CLI name -> how its inputs become pipeline calls (one table, as GENERATION_MODES)
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything a mode needs: the pipeline, the run's shape and the parsed flags."""

    pipe: VideoPipeline
    frames: int  # T of the recipe (or --frames)
    height: int
    width: int
    num_samples: int
    args: argparse.Namespace
    held_out: Callable[[], torch.Tensor]  # (B, 3, T, H, W) held-out clips of the run's data
    sampling: dict[str, Any]  # generate() kwargs: generator, model_kwargs
    window: int  # frames per model call in a rollout: the length the model was trained on
    recipe_context: Optional[int]  # train.context.frames of a prefix-trained model, else None


def _videos(job: Job, need: int = 1) -> list[torch.Tensor]:
    """The --video inputs as (B, 3, T, H, W) (held-out clips when none is given)."""
    paths = job.args.video or []
    if not paths:
        return [job.held_out()] * need
    if len(paths) != need:
        raise GenerateError(f"--video was given {len(paths)} times; --mode {job.args.mode} takes {need}")
    return [read_frames(p, "--video", job.height, job.width)[None].expand(job.num_samples, -1, -1, -1, -1) for p in paths]


def _context(job: Job, video: torch.Tensor, default: int, take: str) -> torch.Tensor:
    """The --context-frames frames of ``video`` a mode keeps (``take``: 'first' or 'last').
    Held-out clips are ground truth to compare against: their frames are taken from the side
    the generated ones continue (the first frames for forward, the last for backward)."""
    if not job.args.video:
        take = "last" if take == "first" else "first"
    k = job.args.context_frames if job.args.context_frames is not None else default
    T = video.shape[2]
    if not 1 <= k <= T:
        raise GenerateError(f"--context-frames={k} is not allowed; the input has {T} frames, so use 1..{T}")
    return video[:, :, :k] if take == "first" else video[:, :, T - k :]


def _count(flag: str, value: Optional[int], default: int, why: str) -> int:
    n = default if value is None else value
    if n < 1:
        raise GenerateError(f"{flag}={n} is not allowed ({why}); give an int >= 1")
    return n


def _mode_text(job: Job) -> torch.Tensor:
    return job.pipe.generate("text_to_video", height=job.height, width=job.width, num_frames=job.frames,
                             batch_size=job.num_samples, **job.sampling)


def _mode_image(job: Job) -> torch.Tensor:
    return job.pipe.generate("image", height=job.height, width=job.width, batch_size=job.num_samples, **job.sampling)


def _mode_image_to_video(job: Job) -> torch.Tensor:
    if job.args.image is None:
        raise GenerateError("--mode image-to-video needs --image PATH (png/jpg, or the first frame of an mp4/gif)")
    first = read_frames(job.args.image, "--image", job.height, job.width)[:, :1]
    first = first[None].expand(job.num_samples, -1, -1, -1, -1)
    if job.args.last_image is None:
        if job.frames < 2:
            raise GenerateError(f"--frames={job.frames} is not allowed for image-to-video; use >= 2")
        return job.pipe.generate("image_to_video", image=first[:, :, 0], num_frames=job.frames, **job.sampling)
    last = read_frames(job.args.last_image, "--last-image", job.height, job.width)[:, :1]
    last = last[None].expand(job.num_samples, -1, -1, -1, -1)
    if job.frames < 3:
        raise GenerateError(f"--frames={job.frames} is not allowed with --last-image; use >= 3 (first, between, last)")
    return job.pipe.generate("interpolate", start=first, end=last, num_frames_between=job.frames - 2, **job.sampling)


def _mode_extend(job: Job) -> torch.Tensor:
    (video,) = _videos(job)
    forward = job.args.direction == "forward"
    ctx = _context(job, video, _default_context(job, video), "last" if forward else "first")
    if job.args.new_frames is None and job.args.video and job.frames <= ctx.shape[2]:
        raise GenerateError(f"--video gives {ctx.shape[2]} frames, the recipe's length is {job.frames}; give --new-frames N "
                            "or --context-frames K < the recipe's length")
    new = _count("--new-frames", job.args.new_frames, job.frames - ctx.shape[2],
                 f"the recipe's {job.frames} frames minus {ctx.shape[2]} given")
    return job.pipe.generate(f"extend_{job.args.direction}", video=ctx, num_new_frames=new, **job.sampling)


def _mode_interpolate(job: Job) -> torch.Tensor:
    a, b = _videos(job, 2)
    k = _default_context(job, a)
    a, b = _context(job, a, min(k, a.shape[2]), "last"), _context(job, b, min(k, b.shape[2]), "first")
    new = _count("--new-frames", job.args.new_frames, job.frames - a.shape[2] - b.shape[2],
                 f"the recipe's {job.frames} frames minus {a.shape[2] + b.shape[2]} given")
    return job.pipe.generate("interpolate", start=a, end=b, num_frames_between=new, **job.sampling)


def _mode_loop(job: Job) -> torch.Tensor:
    (video,) = _videos(job)
    k = job.args.context_frames if job.args.context_frames is not None else min(2, video.shape[2])
    if not 1 <= k <= video.shape[2]:
        raise GenerateError(f"--context-frames={k} is not allowed; the input has {video.shape[2]} frames, so use 1..{video.shape[2]}")
    new = _count("--new-frames", job.args.new_frames, job.frames - 2 * k, f"the recipe's {job.frames} frames minus 2 x {k} given")
    return job.pipe.generate("loop", video=video, num_transition_frames=new, context_frames=k, **job.sampling)


def _mode_sdedit(job: Job) -> torch.Tensor:
    (video,) = _videos(job)
    s = job.args.strength
    if not 0.0 <= s <= 1.0:
        raise GenerateError(f"--strength={s} is not allowed; use a fraction of the schedule in [0, 1]")
    return job.pipe.generate("sdedit", video=video, strength=s, **job.sampling)


def _mode_rollout(job: Job) -> torch.Tensor:
    (video,) = _videos(job)
    window = job.window
    k = job.args.context_frames if job.args.context_frames is not None else _default_context(job, video)
    if not 1 <= k < window:
        raise GenerateError(f"--context-frames={k} is not allowed for a rollout in {window}-frame windows; use 1..{window - 1}")
    if video.shape[2] < k:
        raise GenerateError(f"--video has {video.shape[2]} frames; a rollout with --context-frames={k} needs at least {k}")
    start = video[:, :, :k]
    if job.args.frames is None:
        raise GenerateError("--mode rollout needs --frames N (the length of the rollout, given frames included)")
    if job.frames <= k:
        raise GenerateError(f"--frames={job.frames} is not allowed; a rollout from {k} given frames needs > {k}")
    sampling = dict(job.sampling)
    generator = sampling.pop("generator")
    return job.pipe.rollout(start, job.frames, window=window, context_frames=k, generator=generator, **sampling)


def _default_context(job: Job, video: torch.Tensor) -> int:
    """Given frames when --context-frames is not set: the recipe's prefix, else all of --video."""
    ctx = job.recipe_context
    if job.args.video:
        return video.shape[2] if job.args.mode != "rollout" else min(video.shape[2], ctx or video.shape[2])
    return ctx or max(1, job.frames // 2)


# CLI name -> (function, help)
CLI_MODES: dict[str, tuple[Callable[[Job], torch.Tensor], str]] = {
    "text": (_mode_text, "a video from noise (and --prompt / --class-label)"),
    "image": (_mode_image, "one frame from noise"),
    "image-to-video": (_mode_image_to_video, "--image is the first frame (--last-image the last)"),
    "extend": (_mode_extend, "--video continued --direction forward or backward"),
    "interpolate": (_mode_interpolate, "the frames between --video A and --video B"),
    "loop": (_mode_loop, "--video followed by a transition back to its start"),
    "sdedit": (_mode_sdedit, "--video edited: the last --strength of the schedule run on it"),
    "rollout": (_mode_rollout, "--video extended to --frames N, window by window (memory flat in N)"),
}


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def contact_sheet(clips: list[np.ndarray], gap: int = 2, max_columns: int = 16) -> np.ndarray:
    """uint8 (H', W', 3) grid: one row per clip, its frames left to right (at most
    ``max_columns`` evenly picked frames, first and last always shown)."""
    T = clips[0].shape[0]
    idx = np.unique(np.linspace(0, T - 1, min(T, max_columns)).round().astype(int))
    rows = [side_by_side([c[i : i + 1] for i in idx], gap=gap)[0] for c in clips]
    H, Wr = rows[0].shape[:2]
    sheet = np.full((len(rows) * (H + gap) - gap, Wr, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        sheet[r * (H + gap) : r * (H + gap) + H] = row
    return sheet


def write_outputs(out: Path, videos: torch.Tensor, fps: float, reference: Optional[torch.Tensor] = None) -> list[Path]:
    """Write (B, 3, T, H, W) as ``out``'s stem .mp4 and .gif (samples stacked vertically) and a
    contact-sheet .png; returns the paths. ``reference`` (same shape: ground truth) goes left."""
    clips = [to_uint8(v) for v in videos]
    if reference is not None and reference.shape == videos.shape:
        clips = [side_by_side([to_uint8(r), c]) for r, c in zip(reference, clips)]
    H, W = clips[0].shape[1:3]
    scale = max(1, 96 // max(H, W))
    stacked = side_by_side([c.transpose(0, 2, 1, 3) for c in clips]).transpose(0, 2, 1, 3)
    stem = out.with_suffix("") if out.suffix.lower() in (".mp4", ".gif", ".png") else out
    paths = [save_video(stem.with_suffix(".mp4"), stacked, fps=fps, scale=scale),
             save_video(stem.with_suffix(".gif"), stacked, fps=fps, scale=scale)]
    sheet = contact_sheet(clips)
    sheet = sheet.repeat(scale, axis=0).repeat(scale, axis=1)
    png = stem.with_suffix(".png")
    tmp = png.with_name(f".{png.stem}.tmp.png")
    iio.imwrite(tmp, sheet)
    tmp.replace(png)
    return [Path(p) for p in paths] + [png]


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _guidance_arg(text: str) -> tuple[float, ...]:
    """``--guidance``: one scale (``4``) or one per noise range, highest noise first (``5,3``)."""
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a comma-separated list of numbers (e.g. 4 or 5,3)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparse-dit generate``."""
    parser.add_argument("model", help="a run folder (with final/ and recipe.yaml) or a folder written by save_pretrained")
    parser.add_argument("--out", required=True, help="output path; its stem gets .mp4, .gif and a contact-sheet .png")
    parser.add_argument("--mode", default=None, choices=list(CLI_MODES),
                        help="prompting mode (default: text, or extend forward with --context-frames)")
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--image", default=None, help="image-to-video: the first frame (png/jpg/mp4/gif)")
    parser.add_argument("--last-image", default=None, help="image-to-video: the last frame")
    parser.add_argument("--video", action="append", default=None, help="input clip (mp4/gif/png/jpg); twice for interpolate")
    parser.add_argument("--direction", default="forward", choices=("forward", "backward"), help="extend: which way in time")
    parser.add_argument("--strength", type=float, default=0.6, help="sdedit: fraction of the schedule run on the input (diffusers' img2img meaning)")
    parser.add_argument("--context-frames", type=int, default=None,
                        help="frames of the input given to the model (default: all of --video; held-out clips: the recipe's prefix)")
    parser.add_argument("--new-frames", type=int, default=None, help="frames to generate (default: the recipe's length minus the given ones)")
    parser.add_argument("--prompt", default=None, help="caption for text-conditioned models (default: the held-out clips' captions)")
    parser.add_argument("--expand", default="template", metavar="NAME|MODULE:FUNCTION",
                        help="prompt expander for --prompt: 'template' (the physics world's captions), 'none', or a dotted path to a function str -> str")
    parser.add_argument("--no-expand", action="store_true", help="use --prompt exactly as given")
    parser.add_argument("--class-label", type=int, default=None, help="class for class-conditioned models")
    parser.add_argument("--frames", type=int, default=None, help="frames of the output (text, image-to-video, rollout; default: the recipe's)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    parser.add_argument("--guidance", "--guidance-scale", dest="guidance", type=_guidance_arg, default=None, metavar="W[,W...]",
                        help="classifier-free guidance scale (default: the recipe's); a noise-level MoE model takes one per "
                             "noise range, highest noise first, e.g. 5,3")
    parser.add_argument("--shift", type=float, default=None, help="timestep shift of the sampling grid (default: the one training used)")
    parser.add_argument("--sampler", default=None, choices=("euler", "heun"), help="ODE sampler (default: the recipe's)")
    parser.add_argument("--grid", default=None, choices=TIMESTEP_GRIDS, help="timestep grid (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=4.0)


def _namespace(**overrides: Any) -> argparse.Namespace:
    """The CLI's defaults with ``overrides`` (dest names) applied."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["MODEL", "--out", "OUT"])
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise TypeError(f"generate() got an unexpected argument {k!r}")
        setattr(args, k, v)
    return args


def _load(model_dir: Path) -> tuple[SparseDiT, RecipeConfig]:
    if not model_dir.is_dir():
        raise GenerateError(f"model {model_dir}: no such folder; give a run folder (final/ + recipe.yaml) or a save_pretrained folder")
    run_dir = model_dir if (model_dir / "final").is_dir() else model_dir.parent
    weights = model_dir / "final" if (model_dir / "final").is_dir() else model_dir
    if not (weights / "config.json").is_file():
        raise GenerateError(f"model {model_dir}: no final/config.json or config.json; is the run finished?")
    model = SparseDiT.from_pretrained(weights).eval()
    recipe_file = run_dir / "recipe.yaml"
    recipe = from_dict(RecipeConfig, load_yaml(recipe_file)) if recipe_file.is_file() else RecipeConfig(model=model.config)
    return model, recipe.replace(model=model.config)


@dataclass
class Generated:
    """What one ``sparse-dit generate`` made.

    Args:
        videos: (B, 3, T, H, W) in [-1, 1].
        reference: the held-out ground truth of the same shape (extend/interpolate/sdedit on
            held-out clips), else None.
        summary: one line: mode, shape and sampling settings.
    """

    videos: torch.Tensor
    reference: Optional[torch.Tensor]
    summary: str


def generate(model_dir: str | Path, out: str | Path, **flags: Any) -> list[Path]:
    """Run ``sparse-dit generate`` from Python; ``flags`` are the CLI's (``mode="loop"``,
    ``video=["a.mp4"]``, ``steps=3``, ...). Returns the written .mp4, .gif and .png.

    Args:
        model_dir: run folder or exported model folder.
        out: output path (its stem gets .mp4, .gif, .png).
        **flags: CLI flags by their dest names (see ``add_arguments``).
    """
    args = _namespace(**flags)
    res = generate_videos(model_dir, **vars(args) | {"model": None, "out": None})
    paths = write_outputs(Path(out), res.videos, args.fps, res.reference)
    side = "  (left: ground truth, right: generated)" if res.reference is not None else ""
    print(f"{res.summary} -> " + ", ".join(str(p) for p in paths) + side)
    return paths


def generate_videos(model_dir: str | Path, **flags: Any) -> Generated:
    """Sample what ``sparse-dit generate`` would write, without writing it (see :func:`generate`)."""
    flags = {k: v for k, v in flags.items() if k not in ("model", "out")}
    args = _namespace(**flags)
    model_dir = Path(model_dir)
    model, recipe = _load(model_dir)
    d, pc = recipe.data, model.config.patch_size
    vae = load_autoencoder(recipe.autoencoder, channels=model.config.in_channels)  # the recipe's: samples decode through it
    fs = vae.spatial_compression
    H = d.height if args.height is None else args.height
    W = d.width if args.width is None else args.width
    for flag, v, p in (("--height", H, pc[1] * fs), ("--width", W, pc[2] * fs)):
        if v < 1 or v % p:
            raise GenerateError(f"{flag}={v} is not allowed; the model's patch (and autoencoder) need a positive multiple of {p}")
    T = args.frames if args.frames is not None else d.num_frames
    if T < 1:
        raise GenerateError(f"--frames={T} is not allowed; use an int >= 1")
    if args.num_samples < 1:
        raise GenerateError(f"--num-samples={args.num_samples} is not allowed; use an int >= 1")
    mode = args.mode or ("extend" if args.context_frames else "text")
    args.mode = mode
    if args.frames is not None and mode not in ("text", "image-to-video", "rollout"):
        raise GenerateError(f"--frames is for text, image-to-video and rollout; --mode {mode} takes --new-frames")
    if args.steps is not None and args.steps < 1:
        raise GenerateError(f"--steps={args.steps} is not allowed; use an int >= 1")
    if args.shift is not None and not args.shift > 0:
        raise GenerateError(f"--shift={args.shift} is not allowed; use a number > 0 (1 = no shift)")
    guidance: dict[str, Any] = {}
    if isinstance(args.guidance, (int, float)):  # generate(..., guidance=4.0) from Python
        args.guidance = (float(args.guidance),)
    if args.guidance is not None:
        if any(not w >= 0 for w in args.guidance):
            raise GenerateError(f"--guidance={','.join(f'{w:g}' for w in args.guidance)} is not allowed; use numbers >= 0 (1 = no guidance)")
        ranges = model.config.moe.num_noise_ranges
        if len(args.guidance) not in (1, ranges):
            raise GenerateError(f"--guidance gives {len(args.guidance)} scales; this model has {ranges} noise range(s): give 1"
                                + (f" or {ranges} (highest noise first)" if ranges > 1 else ""))
        guidance = ({"guidance_scale": args.guidance[0], "guidance_scales": ()} if len(args.guidance) == 1
                    else {"guidance_scales": tuple(args.guidance)})
    diffusion = recipe.diffusion.replace(**guidance, **{k: v for k, v in (("shift", args.shift), ("sampler", args.sampler), ("timestep_grid", args.grid),
                                                                          ("num_inference_steps", args.steps)) if v is not None})
    pipe = VideoPipeline.from_config(model, diffusion, vae=vae)
    # the window a rollout slides: the length the model was trained on
    window = d.num_frames
    held: dict[str, Any] = {}

    def held_out() -> torch.Tensor:
        if "video" not in held:
            ds = build_dataset(recipe.replace(data=d.replace(height=H, width=W)), held_out=True)
            items = [ds[i % len(ds)] for i in range(args.num_samples)]
            if "latents" in items[0]:  # cached latents (data.source: latents): decoded to the clips they encode
                with torch.no_grad():
                    held["video"] = vae.decode(torch.stack([it["latents"] for it in items])).clamp(-1, 1)
            else:
                held["video"] = torch.stack([it["video"] for it in items])
            held["items"] = items
        return held["video"]

    # conditioning: --prompt (expanded unless --no-expand) / --class-label, else the held-out clips' captions and labels
    prompt = args.prompt
    if prompt:
        try:
            expander = resolve_expander(None if args.no_expand else args.expand)
        except ValueError as exc:
            raise GenerateError(f"--expand: {exc}") from None
        prompt = expand_prompt(prompt, expander)
    uses_held = mode in ("extend", "interpolate", "loop", "sdedit", "rollout") and not args.video
    # a text model asked for text-to-video without --prompt: the held-out clips' captions (as the trainer's samples)
    captions_from_held = mode == "text" and not prompt and recipe.model.text_dim > 0
    items = (held_out(), held["items"])[1] if uses_held or captions_from_held else [{} for _ in range(args.num_samples)]
    batch: dict[str, Any] = {"caption": [prompt or it.get("caption", "") for it in items]}
    if args.class_label is not None:
        batch["label"] = torch.full((args.num_samples,), args.class_label)
    elif items and all("label" in it for it in items):
        batch["label"] = torch.tensor([int(it["label"]) for it in items])
    cond = Conditioner(recipe, "cpu", torch.float32)
    model_kwargs = cond(batch) if cond.kind != "class" or "label" in batch else None
    if cond.kind == "class" and model_kwargs is None:
        raise GenerateError(f"this model is class-conditional (model.num_classes={recipe.model.num_classes}); give --class-label 0..{recipe.model.num_classes - 1}")

    ctx = recipe.train.context
    job = Job(pipe, T, H, W, args.num_samples, args, held_out,
              {"generator": torch.Generator().manual_seed(args.seed), "model_kwargs": model_kwargs},
              window=window,
              # train.context.frames counts latent frames: the pixel frames they wholly cover (1 + (k - 1) * ft)
              recipe_context=1 + (ctx.frames - 1) * vae.temporal_compression if ctx.mode == "prefix" else None)
    videos = CLI_MODES[mode][0](job)
    # with held-out clips, the ground truth goes left of what was generated (same length)
    reference = held.get("video") if uses_held and mode in ("extend", "interpolate", "sdedit") else None
    if reference is not None and reference.shape != videos.shape:
        reference = None
    summary = (f"sparse-dit generate --mode {mode}: {videos.shape[0]} x {videos.shape[2]} frames of {H}x{W} "
               f"(steps {diffusion.num_inference_steps}, shift {pipe.shift_for((1, 3, min(T, window), H, W)):g}, "
               f"guidance {','.join(f'{w:g}' for w in diffusion.guidance_scales) or f'{diffusion.guidance_scale:g}'}, {diffusion.sampler}, {diffusion.timestep_grid} grid)")
    if prompt:
        summary += f"; prompt {args.prompt!r}" + (f" expanded to {prompt!r}" if prompt != args.prompt else "")
    return Generated(videos, reference, summary)


def run(args: argparse.Namespace) -> int:
    """``sparse-dit generate``: bad inputs are one line on stderr and exit status 2."""
    flags = {k: v for k, v in vars(args).items() if k not in ("model", "out", "command")}
    try:
        generate(args.model, args.out, **flags)
    except (ValueError, ConfigError) as exc:  # GenerateError, ConfigError and the pipeline's argument checks
        print(f"sparse-dit generate: {exc}", file=sys.stderr)
        return 2
    return 0
