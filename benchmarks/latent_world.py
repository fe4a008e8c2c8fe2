"""A latent-space world model at 64x64 on the physics world (issue 12), end to end, with the CLI.

Steps (each a ``sparse-dit`` command a user would type; all files under ``--root``):

1. ``data physics``: training clips (``uniform``, 17 frames at 64x64, 4 fps) and a held-out split;
2. ``train-vae recipes/latent/vae.yaml``: the light VAE (2x temporal, 4x4 spatial, 8 channels);
3. ``data encode``: the training clips through the VAE once (cached latents);
4. ``train recipes/latent/dit.yaml``: the quickstart's dense DiT on the latents;
5. ``eval compare``: the DiT's continuations of the held-out clips from their first 3 frames,
   decoded through the VAE, scored against the simulator (velocity error) next to
   copy-last-frame; and the VAE's own reconstructions scored the same way (the floor the VAE sets).

Writes ``ROOT/result.json`` (steps, wall time of every step, the numbers) and prints it. A step
whose output exists is skipped (rerun to resume; the trainer resumes from its checkpoints).

    python benchmarks/latent_world.py                  # the recorded run (hours on 2 CPU cores)
    python benchmarks/latent_world.py --smoke          # every step with tiny settings (minutes)
    python benchmarks/latent_world.py --vae-init runs/vae-light-mixed/final --vae-steps 1500 --vae-set train.lr=5e-4
                                                       # fine-tune a VAE trained elsewhere (e.g. at 32x32)

Wall times depend on the machine and its load: record ``lscpu``'s model name with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparse_dit.autoencoder import load_autoencoder
from sparse_dit.evals.compare import load_split
from sparse_dit.evals.physics import score
from sparse_dit.evals.video_metrics import to_uint8_videos

FULL = dict(train_videos=1024, val_videos=64, vae_steps=400, dit_steps=2000, eval_steps=20)
SMOKE = dict(train_videos=8, val_videos=4, vae_steps=2, dit_steps=2, eval_steps=2)


def _cli(*args: str) -> float:
    """Run ``sparse-dit ARGS``; return its wall time (s); stop on failure."""
    cmd = [sys.executable, "-m", "sparse_dit.cli", *args]
    print("$ sparse-dit " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    if rc:
        raise SystemExit(f"step failed (exit {rc}): sparse-dit {' '.join(args)}")
    return round(time.perf_counter() - t0, 1)


def _vae_floor(vae_dir: Path, val: Path, context: int) -> dict:
    """Velocity error of the VAE's reconstructions of the held-out clips (no DiT): the floor."""
    vae = load_autoencoder(str(vae_dir))
    split = load_split("id", val)
    x = split.model_videos()
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(x[s:s + 8])).clamp(-1, 1) for s in range(0, len(x), 8)])
    vids = to_uint8_videos(rec)
    vids[:, :context] = split.videos[:, :context]
    s = score(vids, split.states, context)
    return {k: s[k] for k in ("velocity_error", "position_error", "detection_rate")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="output folder (default runs/latent, or runs/latent-smoke with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks that every step runs")
    for key in FULL:
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"override {key} (full run: {FULL[key]})")
    p.add_argument("--vae-init", default=None, metavar="DIR",
                   help="start the VAE from a trained one (train.init_from: a save_pretrained folder or a finished train-vae run), "
                        "then fine-tune it for --vae-steps on the 64x64 clips")
    p.add_argument("--vae-set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for train-vae (e.g. train.lr=5e-4)")
    args = p.parse_args(argv)
    s = dict(SMOKE if args.smoke else FULL)
    s.update({k: getattr(args, k) for k in FULL if getattr(args, k) is not None})
    root = Path(args.root or ("runs/latent-smoke" if args.smoke else "runs/latent"))
    data, val, lat = root / "data" / "train", root / "data" / "val", root / "data" / "train-latents"
    vae_run, dit_run, ev = root / "vae", root / "dit", root / "eval"
    wall: dict[str, float] = {}
    if not (data / "dataset_info.json").is_file():
        wall["data_train"] = _cli("data", "physics", "--scenario", "uniform", "--split", "id", "--num-videos", str(s["train_videos"]),
                                  "--frames", "17", "--resolution", "64x64", "--fps", "4", "--seed", "0", "--out", str(data), "--overwrite")
    if not (val / "dataset_info.json").is_file():
        wall["data_val"] = _cli("data", "physics", "--scenario", "uniform", "--split", "id", "--num-videos", str(s["val_videos"]),
                                "--frames", "17", "--resolution", "64x64", "--fps", "4", "--seed", "1", "--out", str(val), "--overwrite")
    if not (vae_run / "final" / "model.safetensors").is_file():
        wall["train_vae"] = _cli("train-vae", "recipes/latent/vae.yaml", "--set", f"output_dir={vae_run}", f"data.path={data}",
                                 f"train.max_steps={s['vae_steps']}", *(["train.save_every=2", "loss.stats_videos=4"] if args.smoke else []),
                                 *([f"train.init_from={args.vae_init}"] if args.vae_init else []), *args.vae_set)
    if not (lat / "dataset_info.json").is_file():
        wall["encode"] = _cli("data", "encode", str(data), "--vae", str(vae_run / "final"), "--out", str(lat), "--overwrite")
    if not (dit_run / "final" / "model.safetensors").is_file():
        wall["train_dit"] = _cli("train", "recipes/latent/dit.yaml", "--set", f"output_dir={dit_run}", f"data.path={lat}",
                                 f"autoencoder={vae_run / 'final'}", f"train.max_steps={s['dit_steps']}",
                                 *(["train.save_every=2", "train.global_batch_size=2"] if args.smoke else []))
    wall["eval"] = _cli("eval", "compare", str(dit_run), "--data", f"id={val}", "--context-frames", "3", "--steps", str(s["eval_steps"]),
                        "--latency-repeats", "0", "--out", str(ev))
    report = json.loads((ev / "report.json").read_text())
    model = next(iter(report["models"].values()))
    copy = report["baselines"].get("copy_last_frame", {})
    summary = json.loads((dit_run / "summary.json").read_text())
    result = {
        "settings": {**s, "vae_init": args.vae_init, "vae_set": list(args.vae_set)}, "smoke": args.smoke, "wall_seconds": wall,
        "dit": {"steps": summary.get("steps"), "train_seconds": summary.get("train_seconds"), "final_loss": summary.get("final_loss"),
                "velocity_error": model.get("velocity_error"), "position_error": model.get("position_error"),
                "detection_rate": model.get("detection_rate"), "val_loss_latent": model.get("val_loss"),
                "dit_gmacs_per_video": model.get("gmacs_per_video"), "vae_encode_gmacs": model.get("vae_encode_gmacs"),
                "vae_decode_gmacs": model.get("vae_decode_gmacs")},
        "copy_last_frame": {k: copy.get(k) for k in ("velocity_error", "position_error", "detection_rate")},
        "vae_reconstruction": _vae_floor(vae_run / "final", val, 3),
        "ground_truth": {k: report["baselines"].get("ground_truth", {}).get(k) for k in ("velocity_error", "position_error", "detection_rate")},
    }
    ve, cv = result["dit"]["velocity_error"], result["copy_last_frame"]["velocity_error"]
    result["beats_copy_last_frame"] = bool(ve is not None and cv is not None and np.isfinite(ve) and ve < cv)
    result = json.loads(json.dumps(result), parse_constant=lambda c: None)  # NaN (no ball found) -> null: plain JSON
    (root / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
