"""``sparse-dit quickstart``: the end-to-end run that ``make demo`` performs.

It generates a small set of moving-square videos in code, trains a debug-size class-conditional
video DiT with flow matching on the CPU (a progress bar shows the loss and the ETA), then
predicts the future of held-out clips from their first two frames and writes them, side by side
with the ground truth, as a GIF. It prints where everything went.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

__all__ = ["add_arguments", "run", "quickstart"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument("--steps", type=int, default=400, help="training steps (default: 400, about a minute)")
    parser.add_argument("--seed", type=int, default=0)


def quickstart(out: str | Path, steps: int = 400, seed: int = 0) -> dict:
    """Run the demo; returns a summary dict (also written to ``out/summary.json``).

    Args:
        out: output folder.
        steps: training steps.
        seed: seeds data, initialisation and sampling.
    """
    from tqdm.auto import tqdm

    from sparse_dit.config import DiffusionConfig
    from sparse_dit.data.synthetic import DIRECTIONS, moving_squares
    from sparse_dit.diffusion import EMA, FlowMatching, sample
    from sparse_dit.dit import SparseDiT, preset_config
    from sparse_dit.flops import count
    from sparse_dit.video_io import save_video, side_by_side, to_uint8

    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    T, H, W = 8, 16, 16
    videos, labels, captions = moving_squares(512, T, H, W, generator=g)
    val_videos, val_labels, _ = moving_squares(4, T, H, W, generator=torch.Generator().manual_seed(seed + 1))
    print(f"[1/3] data: {len(videos)} moving-square clips of {T}x{H}x{W} (e.g. {captions[0]!r})")

    cfg = preset_config("debug").replace(text_dim=0, cross_attention=False, num_classes=len(DIRECTIONS))
    model = SparseDiT(cfg)
    fm = FlowMatching(DiffusionConfig(timestep_sampling="uniform", shift=1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    ema = EMA(model, decay=0.99)
    macs = count(cfg, (3, T, H, W))
    print(f"[2/3] training debug DiT ({macs['total_params'] / 1e6:.2f}M params, {macs['gmacs'] * 1e3:.1f} MMACs/sample) for {steps} steps")
    losses = []
    start = time.monotonic()
    bar = tqdm(range(steps), desc="train", unit="step")
    for step in bar:
        idx = torch.randint(len(videos), (16,), generator=g)
        x0, y = videos[idx], labels[idx]
        # half the clips get their first frames as clean context (prediction), as the trainer does
        ctx = torch.zeros(16, T, dtype=torch.bool)
        ctx[: 8, :2] = True
        kw = {"class_labels": torch.where(torch.rand(16, generator=g) < 0.1, torch.full_like(y, cfg.num_classes), y)}
        loss = fm.training_losses(model, x0, kw, context_mask=ctx, generator=g)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    train_s = time.monotonic() - start

    ema_model = ema.averaged_model(model).eval()
    ctx = torch.zeros(len(val_videos), T, dtype=torch.bool)
    ctx[:, :2] = True
    pred = sample(ema_model, tuple(val_videos.shape), {"class_labels": val_labels}, num_inference_steps=20,
                  generator=torch.Generator().manual_seed(seed), context=val_videos, context_mask=ctx, progress=True)
    clips = [side_by_side([to_uint8(val_videos[i]), to_uint8(pred[i])]) for i in range(len(val_videos))]
    grid = side_by_side([c.transpose(0, 2, 1, 3) for c in clips], gap=2).transpose(0, 2, 1, 3)  # stack vertically
    video_path = save_video(out / "prediction.gif", grid, fps=4, scale=8)
    model_dir = ema_model.save_pretrained(out / "model")
    summary = {
        "video": str(video_path.resolve()),
        "model": str(model_dir.resolve()),
        "steps": steps,
        "train_seconds": round(train_s, 1),
        "first_loss": round(sum(losses[:20]) / min(20, len(losses)), 4),
        "last_loss": round(sum(losses[-20:]) / min(20, len(losses)), 4),
        "params": macs["total_params"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[3/3] loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} in {train_s:.0f}s")
    print(f"wrote {video_path.resolve()}  (left: ground truth, right: predicted from the first 2 frames)")
    print(f"model: {model_dir.resolve()}  summary: {(out / 'summary.json').resolve()}")
    return summary


def run(args: argparse.Namespace) -> int:
    quickstart(args.out, steps=args.steps, seed=args.seed)
    return 0
