"""Data throughput (issue 4): physics videos generated per second, and loader samples per second
next to what a small DiT training step consumes, measured side by side in one run.

    python benchmarks/data_throughput.py                 # defaults: 64x64, 32 frames
    python benchmarks/data_throughput.py --videos 256 --shapes 32x32x16 64x64x32

Generation: ``generate_physics_videos`` over all five scenarios with 1 worker and with all cores
(render-only and simulate-only times per video are printed too). Storage: bytes per video in the
written dataset. Loading: ``PhysicsVideoDataset`` + ``BucketBatchSampler`` through a
``DataLoader`` with 0 and 2 workers and ``collate_clips`` (and, for comparison, torch's
``default_collate`` with 0 workers). Training: forward+backward+AdamW of the ``debug`` DiT preset
(as in ``sparse-dit quickstart``) on batches of the same shape; the ratio loader / trainer says
how many times faster the data arrives than the model eats it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def _timeit(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_generation(num_videos: int, frames: int, height: int, width: int) -> dict:
    from sparse_dit.data.physics import generate_physics_videos, sample_scene, simulate
    from sparse_dit.data.render import PALETTE, render_balls

    out = {}
    for workers in (1, os.cpu_count() or 1):
        seconds = _timeit(lambda: generate_physics_videos("all", "id", num_videos, frames, height, width, seed=0, workers=workers), 2)
        out[f"videos_per_s_workers{workers}"] = num_videos / seconds
    rng = np.random.default_rng(0)
    scene = sample_scene("collision", "id", height, width, frames / 10.0, rng)
    pos, _ = simulate(scene, frames, 10.0)
    radii = np.array([b.radius for b in scene.balls])
    colors = np.array([PALETTE[b.color] for b in scene.balls])
    out["render_ms_per_video_2balls"] = 1e3 * _timeit(lambda: render_balls(pos, radii, colors, height, width), 20)
    out["simulate_ms_per_video_2balls"] = 1e3 * _timeit(lambda: simulate(scene, frames, 10.0), 20)
    return out


def bench_loader(path: str, frames: int, budget_tokens: int, workers: int, epochs: int = 2, default_collate: bool = False) -> float:
    from sparse_dit.data.bucketing import BucketBatchSampler
    from sparse_dit.data.loaders import PhysicsVideoDataset, collate_clips

    ds = PhysicsVideoDataset(path, num_frames=frames, random_crop=True)
    sampler = BucketBatchSampler(ds.sample_shapes(), token_budget=budget_tokens, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                                         collate_fn=None if default_collate else collate_clips)
    next(iter(loader))  # start workers outside the timing
    count, start = 0, time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            count += batch["video"].shape[0]
    return count / (time.perf_counter() - start)


def bench_trainer(frames: int, height: int, width: int, batch: int, steps: int) -> float | None:
    try:
        from sparse_dit.config import DiffusionConfig
        from sparse_dit.diffusion import FlowMatching
        from sparse_dit.dit import SparseDiT
        from sparse_dit.presets import preset_config
    except ImportError:
        return None
    cfg = preset_config("debug").replace(text_dim=0, cross_attention=False)
    model = SparseDiT(cfg)
    fm = FlowMatching(DiffusionConfig(timestep_sampling="uniform", shift=1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.randn(batch, 3, frames, height, width)

    def step():
        loss = fm.training_losses(model, x0, {})["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    return batch / _timeit(step, steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=128, help="videos per measurement")
    parser.add_argument("--shapes", nargs="+", default=["64x64x32", "32x32x16"], help="HxWxT; the first is used for generation")
    parser.add_argument("--token-budget", type=int, default=32768, help="loader batch token budget (patch 1x2x2)")
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from sparse_dit.data.bucketing import tokens_per_sample
    from sparse_dit.data.hf import write_physics_dataset

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    height, width, frames = shapes[0]
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    gen = bench_generation(args.videos, frames, height, width)
    for key, value in gen.items():
        print(f"generate {height}x{width}x{frames}: {key} = {value:.1f}")
    results = {"generation": gen, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for h, w, t in shapes:
            path = os.path.join(tmp, f"d{h}x{w}x{t}")
            start = time.perf_counter()
            ds = write_physics_dataset(path, "all", "id", args.videos, t, h, w, seed=0, progress=False)
            write_s = time.perf_counter() - start
            stored = float(np.mean([len(b) for b in ds.select_columns(["video"])["video"]]))
            row = {"write_videos_per_s": args.videos / write_s, "bytes_per_video": stored, "raw_bytes": t * h * w * 3}
            for workers in (0, 2):
                row[f"loader_samples_per_s_workers{workers}"] = bench_loader(path, t, args.token_budget, workers)
            row["loader_samples_per_s_workers0_default_collate"] = bench_loader(path, t, args.token_budget, 0, default_collate=True)
            batch = max(1, args.token_budget // tokens_per_sample((t, h, w)))
            # One step at >8k tokens per sample: full attention makes it take tens of seconds.
            steps = args.train_steps if tokens_per_sample((t, h, w)) <= 8192 else 1
            trainer = bench_trainer(t, h, w, batch, steps)
            row["trainer_batch"] = batch
            row["trainer_samples_per_s"] = trainer
            if trainer:
                row["loader_over_trainer"] = row["loader_samples_per_s_workers0"] / trainer
            results["shapes"][f"{h}x{w}x{t}"] = row
            print(f"{h}x{w}x{t}: " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in row.items()))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
