"""``sparse-dit generate``: sample videos from a trained run (its ``final/``) or any exported folder.

    sparse-dit generate runs/tiny-moe --out samples.gif
    sparse-dit generate runs/tiny-moe --out pred.gif --context-frames 2        # predict the future
    sparse-dit generate runs/tiny-moe/final --out t2v.gif --prompt "a red square moving left" \\
        --frames 6 --height 12 --width 12 --guidance 3

With ``--context-frames K`` the first K frames of held-out clips from the run's data source are
given clean and the model generates the rest (ground truth left, generated right). Shape,
sampler and data settings come from ``RUN_DIR/recipe.yaml`` when present; flags override them.
Runs in one CPU process, whatever parallelism trained the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from sparse_dit.config import RecipeConfig
from sparse_dit.diffusion import FlowMatching, sample
from sparse_dit.dit import SparseDiT
from sparse_dit.recipes.batches import Conditioner, build_dataset
from sparse_dit.schema import from_dict, load_yaml
from sparse_dit.video_io import save_video, side_by_side, to_uint8

__all__ = ["add_arguments", "run", "generate"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparse-dit generate``."""
    parser.add_argument("model", help="a run folder (with final/ and recipe.yaml) or a folder written by save_pretrained")
    parser.add_argument("--out", required=True, help="output video (.gif or .mp4)")
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--context-frames", type=int, default=0, help="clean leading frames taken from held-out clips (0 = generate all)")
    parser.add_argument("--prompt", default=None, help="caption for text-conditioned models (default: the held-out clips' captions)")
    parser.add_argument("--class-label", type=int, default=None, help="class for class-conditioned models")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the recipe's)")
    parser.add_argument("--shift", type=float, default=None, help="timestep shift of the sampling grid (default: the one training used)")
    parser.add_argument("--sampler", default=None, choices=("euler", "heun"), help="ODE sampler (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=4.0)


def generate(model_dir: str | Path, out: str | Path, num_samples: int = 2, context_frames: int = 0, prompt: Optional[str] = None,
             class_label: Optional[int] = None, frames: Optional[int] = None, height: Optional[int] = None,
             width: Optional[int] = None, steps: Optional[int] = None, guidance: Optional[float] = None,
             seed: int = 0, fps: float = 4.0, shift: Optional[float] = None, sampler: Optional[str] = None) -> Path:
    """Sample ``num_samples`` videos and write them side by side to ``out``.

    Args:
        model_dir: run folder or exported model folder.
        out: output ``.gif``/``.mp4``.
        num_samples: videos to generate.
        context_frames: clean leading frames from held-out clips (needs a run folder or flags
            giving the data shape; synthetic data only without a recipe).
        prompt: caption (text models); default: the held-out clips' captions.
        class_label: class index (class models); default: the held-out clips' labels.
        frames, height, width: video shape (default: the recipe's data shape).
        steps, guidance, shift, sampler: sampling steps, CFG scale, timestep shift, ODE sampler
            (defaults: the recipe's diffusion section; the shift is the one training used for
            this many tokens, ``diffusion.shift`` or the resolution shift).
        seed: sampling seed.
        fps: playback rate.

    Returns:
        The written file.
    """

    model_dir = Path(model_dir)
    run_dir = model_dir if (model_dir / "final").is_dir() else model_dir.parent
    weights = model_dir / "final" if (model_dir / "final").is_dir() else model_dir
    model = SparseDiT.from_pretrained(weights).eval()
    recipe_file = run_dir / "recipe.yaml"
    recipe = from_dict(RecipeConfig, load_yaml(recipe_file)) if recipe_file.is_file() else RecipeConfig(model=model.config)
    recipe = recipe.replace(model=model.config)
    d = recipe.data
    T, H, W = frames or d.num_frames, height or d.height, width or d.width
    if not 0 <= context_frames < T:
        raise ValueError(f"--context-frames={context_frames} must lie in [0, {T - 1}] for {T}-frame videos")
    if num_samples < 1:
        raise ValueError(f"--num-samples={num_samples} must be >= 1")
    recipe = recipe.replace(data=d.replace(num_frames=T, height=H, width=W))
    held = build_dataset(recipe, held_out=True)
    items = [held[i % len(held)] for i in range(num_samples)]
    videos = torch.stack([it["video"] for it in items])
    batch = {"video": videos, "caption": [prompt or it.get("caption", "") for it in items]}
    if class_label is not None:
        batch["label"] = torch.full((num_samples,), class_label)
    elif all("label" in it for it in items):
        batch["label"] = torch.tensor([int(it["label"]) for it in items])
    kwargs = Conditioner(recipe, "cpu", torch.float32)(batch)
    ctx = None
    if context_frames:
        ctx = torch.zeros(num_samples, T, dtype=torch.bool)
        ctx[:, :context_frames] = True
    shape = (num_samples, model.config.in_channels, T, H, W)
    settings = FlowMatching(recipe.diffusion).sampling_kwargs(shape, model.config.patch_size)
    overrides = {"num_inference_steps": steps, "guidance_scale": guidance, "shift": shift, "sampler": sampler}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    pred = sample(model, shape, kwargs, **settings, generator=torch.Generator().manual_seed(seed),
                  context=videos if ctx is not None else None, context_mask=ctx, progress=True)
    clips = []
    for i in range(num_samples):
        gen = to_uint8(pred[i])
        clips.append(side_by_side([to_uint8(videos[i]), gen]) if ctx is not None else gen)
    frames_out = side_by_side([c.transpose(0, 2, 1, 3) for c in clips]).transpose(0, 2, 1, 3)  # stack vertically
    path = save_video(out, frames_out, fps=fps, scale=max(1, 96 // max(H, W)))
    print(f"wrote {Path(path).resolve()}" + ("  (left: ground truth, right: generated)" if ctx is not None else ""))
    return Path(path)


def run(args: argparse.Namespace) -> int:
    """``sparse-dit generate``."""
    generate(args.model, args.out, num_samples=args.num_samples, context_frames=args.context_frames, prompt=args.prompt,
             class_label=args.class_label, frames=args.frames, height=args.height, width=args.width, steps=args.steps,
             guidance=args.guidance, seed=args.seed, fps=args.fps, shift=args.shift, sampler=args.sampler)
    return 0
