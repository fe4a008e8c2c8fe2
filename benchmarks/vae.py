"""The causal VAE measured (issue 12): reconstruction quality against a classical baseline,
the physics score of reconstructions against the ground-truth floor, and peak memory and
videos per second against video length, one-shot vs chunked/tiled.

    # quality of a trained VAE (sparse-dit train-vae) on held-out physics and codec videos
    python benchmarks/vae.py quality --vae runs/vae-light/final --physics data/physics-held --frames 17
    # a training folder: the physics videos (lossless) + codec clips from other lavfi sources
    python benchmarks/vae.py train-clips --physics data/physics-vae --out data/vae-mixed --codec-videos 256
    # peak memory (RSS above the loaded model and input) and videos/s against length
    python benchmarks/vae.py memory --preset vae-2x4x4-c8 --size 64 --lengths 9 17 33 65 129 --chunk 8 --tile 32

Quality: PSNR (dB) and SSIM per frame (``sparse_dit.evals.video_metrics``) of decode(encode(x))
on (a) the held-out physics videos of a ``sparse-dit data physics`` folder and (b) real-codec
videos made here with the ffmpeg that imageio-ffmpeg ships (lavfi sources testsrc2, mandelbrot,
life, cellauto, gradients, sierpinski at several seeds, area-downscaled, H.264 CRF 23, decoded
with PyAV): neither set was trained on. The baseline stores the same number of floats as the
latent: trilinear downsampling to the latent's frame count with the largest 3-channel spatial
size that fits the latent's float count (``time`` allocation), or to all frames at a smaller size
(``space`` allocation), then trilinear upsampling; the better of the two is the baseline.
Physics: ``sparse_dit.evals.physics.score`` of the reconstructions vs of the ground-truth videos
(the detector's floor) on the same states.

Memory: each (length, mode) runs in a fresh process; the figure is the peak RSS
(``ru_maxrss``) above the RSS after the model and the input video are loaded. Chunked decoding
consumes ``decode_chunks`` piece by piece (as a writer would), so its peak does not hold the
whole output. Numbers depend on the CPU: run on an idle machine and note ``lscpu``'s model name.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

CODEC_SOURCES = ["testsrc2", "mandelbrot", "life=seed={s}:mold=10", "cellauto=rule={r}:random_seed={s}", "gradients=seed={s}", "sierpinski=seed={s}"]
# Training clips (``train-clips``): none of the held-out set's deterministic sources (testsrc2,
# mandelbrot), other cellular-automaton rules, seeds from 10000 up (the held-out set draws them
# below 10000), and zone plates, which the held-out set has none of.
TRAIN_CODEC_SOURCES = ["life=seed={s}:mold={m}", "cellauto=rule={r}:random_seed={s}", "gradients=seed={s}:speed=0.02",
                       "sierpinski=seed={s}", "zoneplate=kt2={k}:kx2={k}:ky2={k}"]
TRAIN_RULES = [18, 45, 54, 60, 73, 105, 126]


# ----------------------------------------------------------------------------------- quality


def make_codec_videos(out: Path, n: int, frames: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` H.264 clips of ``frames`` frames at ``size`` x ``size`` from ffmpeg's lavfi sources."""
    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        src = CODEC_SOURCES[i % len(CODEC_SOURCES)].format(s=int(rng.integers(1, 10_000)), r=int(rng.choice([30, 90, 110, 150])))
        start = int(rng.integers(0, 40))  # a different stretch of each source
        paths.append(_lavfi_h264(ffmpeg, src, size, frames, start, out / f"{i:03d}_{src.partition('=')[0]}.mp4"))
    return paths


def _lavfi_h264(ffmpeg: str, src: str, size: int, frames: int, start: int, path: Path) -> Path:
    """One lavfi source rendered at 4x ``size``, area-downscaled, from frame ``start``, H.264 CRF 23."""
    name, _, opts = src.partition("=")
    if name == "gradients" and "c0=" not in opts:
        # its colours are drawn at random on every run unless given: derive them from the source
        # string, so a clip is the same file every time (the held-out baseline moved 0.6 dB before)
        crng = np.random.default_rng(zlib.crc32(src.encode()))
        opts += ":nb_colors=4" + "".join(f":c{j}=0x{int(crng.integers(0, 1 << 24)):06x}" for j in range(4))
    big = size * 4
    spec = f"{name}=size={big}x{big}:rate=10" + (f":{opts}" if opts else "")
    subprocess.run([ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i", spec, "-vf", f"trim=start_frame={start},setpts=PTS-STARTPTS,scale={size}:{size}:flags=area",
                    "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "23", str(path)], check=True)
    return path


def make_train_clips(out: Path, n: int, frames: int, size: int, seed: int = 1) -> list[Path]:
    """``n`` H.264 training clips (CRF 23, as the held-out set) from :data:`TRAIN_CODEC_SOURCES`."""
    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        src = TRAIN_CODEC_SOURCES[i % len(TRAIN_CODEC_SOURCES)].format(
            s=int(rng.integers(10_000, 1_000_000)), r=int(rng.choice(TRAIN_RULES)), m=int(rng.choice([3, 5, 20])), k=int(rng.integers(1, 8)))
        start = int(rng.integers(0, 60))
        paths.append(_lavfi_h264(ffmpeg, src, size, frames, start, out / f"codec_{i:04d}_{src.partition('=')[0]}.mp4"))
    return paths


def write_lossless(out: Path, videos_u8: np.ndarray, prefix: str) -> list[Path]:
    """(N, T, H, W, 3) uint8 videos as FFV1 .mkv files (lossless; the folder loader reads them)."""
    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, v in enumerate(videos_u8):
        T, H, W, _ = v.shape
        path = out / f"{prefix}_{i:04d}.mkv"
        subprocess.run([ffmpeg, "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{W}x{H}", "-r", "10", "-i", "-",
                        "-c:v", "ffv1", "-pix_fmt", "bgr0", str(path)], input=np.ascontiguousarray(v).tobytes(), check=True)
        paths.append(path)
    return paths


def train_clips(args: argparse.Namespace) -> dict:
    """A training folder for the VAE: the physics videos (lossless) and codec clips from other sources."""
    from sparse_dit.data.loaders import PhysicsVideoDataset

    out = Path(args.out)
    res: dict = {"out": str(out)}
    if args.physics:
        ds = PhysicsVideoDataset(args.physics, num_frames=args.frames)
        gt_u8, _ = ds.ground_truth(range(len(ds)))
        res["physics"] = len(write_lossless(out, gt_u8[:, : args.frames], "physics"))
    res["codec"] = len(make_train_clips(out, args.codec_videos, args.frames, args.size, args.seed))
    print(f"{out}: {res.get('physics', 0)} physics videos (FFV1), {res['codec']} codec clips (H.264 CRF 23) from {TRAIN_CODEC_SOURCES}")
    return res


def baseline(x: torch.Tensor, latent: tuple[int, int, int, int]) -> tuple[torch.Tensor, dict]:
    """Trilinear down/up-sampling storing at most the latent's float count; the better allocation."""
    C, t, h, w = latent
    B, c, T, H, W = x.shape
    budget = C * t * h * w
    best = None
    for name, tb in (("time", t), ("space", T)):
        s = math.sqrt(budget / (c * tb * H * W))
        hb, wb = max(1, int(H * s)), max(1, int(W * s))
        while c * tb * hb * wb > budget:
            hb, wb = hb - 1, wb - 1
        d = F.interpolate(x, size=(tb, hb, wb), mode="trilinear", align_corners=False)
        u = F.interpolate(d, size=(T, H, W), mode="trilinear", align_corners=False).clamp(-1, 1)
        mse = float((u - x).pow(2).mean())
        if best is None or mse < best[2]:
            best = (u, {"allocation": name, "shape": [c, tb, hb, wb], "floats": c * tb * hb * wb, "latent_floats": budget}, mse)
    return best[0], best[1]


def _frame_scores(pred_u8: np.ndarray, gt_u8: np.ndarray) -> dict:
    from sparse_dit.evals.video_metrics import psnr, ssim

    p = psnr(pred_u8, gt_u8)
    p = np.where(np.isinf(p), 100.0, p)
    return {"psnr": float(p.mean()), "ssim": float(ssim(pred_u8, gt_u8).mean())}


@torch.no_grad()
def reconstruct(vae, videos: torch.Tensor, batch: int = 8, refine_steps: int = 0) -> torch.Tensor:
    """decode(encode(videos)) in [-1, 1], ``batch`` clips at a time; ``refine_steps`` > 0 refines
    each batch's latents through the decoder first (CausalVideoVAE.refine)."""
    out = []
    for i in tqdm(range(0, len(videos), batch), desc="reconstruct", unit="batch", disable=not refine_steps):
        z = vae.encode(videos[i:i + batch], refine_steps=refine_steps)  # refine enables gradients for the latents only
        out.append(vae.decode(z).clamp(-1, 1))
    return torch.cat(out)


def quality(args: argparse.Namespace) -> dict:
    from sparse_dit.data.loaders import PhysicsVideoDataset
    from sparse_dit.data.video import read_video
    from sparse_dit.evals.physics import score
    from sparse_dit.vae import CausalVideoVAE
    from sparse_dit.video_io import from_uint8, to_uint8

    vae = CausalVideoVAE.from_pretrained(args.vae)
    results: dict = {"vae": str(args.vae), "config": json.loads((Path(args.vae) / "config.json").read_text()), "refine_steps": args.refine_steps}
    sets = {}
    if args.physics:
        ds = PhysicsVideoDataset(args.physics, num_frames=args.frames)
        n = min(len(ds), args.max_videos)
        gt_u8, states = ds.ground_truth(range(n))
        gt_u8 = gt_u8[:, : args.frames]
        sets["physics"] = (gt_u8, states)
    if args.codec_videos > 0:
        with tempfile.TemporaryDirectory() as tmp:
            size = args.codec_size or (sets["physics"][0].shape[2] if sets else 32)
            paths = make_codec_videos(Path(tmp), args.codec_videos, args.frames, size)
            sets["codec"] = (np.stack([read_video(p)[: args.frames] for p in paths]), None)
    if not sets:
        raise SystemExit("quality: nothing to measure (give --physics DIR, or --codec-videos N > 0)")
    for name, (gt_u8, states) in sets.items():
        x = torch.stack([from_uint8(v) for v in gt_u8])
        latent = vae.latent_shape(*x.shape[2:])
        rec = reconstruct(vae, x, refine_steps=args.refine_steps)
        base, alloc = baseline(x, latent)
        rec_u8 = np.stack([to_uint8(v) for v in rec])
        base_u8 = np.stack([to_uint8(v) for v in base])
        row = {"videos": len(x), "shape": list(x.shape[1:]), "latent": list(latent), "vae": _frame_scores(rec_u8, gt_u8),
               "baseline": {**_frame_scores(base_u8, gt_u8), **alloc}}
        if states is not None:
            kw = dict(context_frames=args.context_frames)
            phys = {k: score(v, states, **kw) for k, v in (("ground_truth", gt_u8), ("vae", rec_u8), ("baseline", base_u8))}
            row["physics"] = {k: {m: v[m] for m in ("velocity_error", "position_error", "detection_rate")} for k, v in phys.items()}
            row["physics"]["vae_over_floor"] = phys["vae"]["velocity_error"] / phys["ground_truth"]["velocity_error"]
        results[name] = row
        print(f"{name}: {len(x)} videos {list(x.shape[1:])} -> latent {list(latent)}; VAE PSNR {row['vae']['psnr']:.2f} dB SSIM "
              f"{row['vae']['ssim']:.4f}; trilinear ({alloc['allocation']}, {alloc['floats']} <= {alloc['latent_floats']} floats) PSNR "
              f"{row['baseline']['psnr']:.2f} dB SSIM {row['baseline']['ssim']:.4f}", flush=True)
        if "physics" in row:
            p = row["physics"]
            print(f"  physics velocity error (px/frame): ground truth {p['ground_truth']['velocity_error']:.3f}, VAE {p['vae']['velocity_error']:.3f} "
                  f"({p['vae_over_floor']:.2f}x the floor), baseline {p['baseline']['velocity_error']:.3f}; detection rate GT "
                  f"{p['ground_truth']['detection_rate']:.3f} VAE {p['vae']['detection_rate']:.3f} baseline {p['baseline']['detection_rate']:.3f}", flush=True)
    return results


# ----------------------------------------------------------------------------------- memory


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _child(spec: dict) -> dict:
    """One measurement in this (fresh) process: peak RSS above the loaded state, and seconds."""
    from sparse_dit.presets import VAE_PRESETS
    from sparse_dit.vae import CausalVideoVAE

    torch.set_num_threads(spec["threads"])
    vae = CausalVideoVAE.from_pretrained(spec["vae"]) if spec.get("vae") else CausalVideoVAE(VAE_PRESETS[spec["preset"]]()).eval()
    T, S = spec["frames"], spec["size"]
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.randn(1, 3, T, S // 8, S // 8, generator=g), size=(T, S, S), mode="trilinear").tanh()
    chunk, tile = spec["chunk"], spec["tile"]
    fs = vae.spatial_compression
    with torch.no_grad():
        if spec["op"] == "encode":
            base = _rss_kb()
            t0 = time.perf_counter()
            vae.encode(x, chunk_frames=chunk * vae.temporal_compression if chunk else None, tile=tile or None, tile_overlap=tile // 2)
        else:
            z = torch.randn(1, *vae.latent_shape(T, S, S), generator=g)
            del x
            base = _rss_kb()
            t0 = time.perf_counter()
            for piece in vae.decode_chunks(z, chunk_frames=chunk or None, tile=tile // fs if tile else None, tile_overlap=tile // fs // 2 if tile else 0):
                piece.clamp(-1, 1)  # a writer would turn it into frames here
        secs = time.perf_counter() - t0
    return {"peak_mib": (_rss_kb() - base) / 1024, "seconds": secs}


def memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    modes = [("one-shot", 0, 0), (f"chunks of {args.chunk} latent frames", args.chunk, 0)]
    if args.tile:
        modes.append((f"chunks + {args.tile}px tiles", args.chunk, args.tile))
    print(f"{'op':7} {'mode':34} " + " ".join(f"T={t:>4}" for t in args.lengths) + "   (peak MiB above model+input; videos/s)")
    for op in ("encode", "decode"):
        for label, chunk, tile in modes:
            cells = []
            for T in args.lengths:
                spec = {"op": op, "frames": T, "size": args.size, "chunk": chunk, "tile": tile, "preset": args.preset, "vae": args.vae,
                        "threads": args.threads}
                out = subprocess.run([sys.executable, __file__, "_child", json.dumps(spec)], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({**spec, **r, "mode": label})
                cells.append(f"{r['peak_mib']:6.0f}/{1 / r['seconds']:.2f}")
            print(f"{op:7} {label:34} " + " ".join(cells), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_child":
        print(json.dumps(_child(json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality", help="PSNR/SSIM vs the trilinear baseline; physics score vs the ground-truth floor")
    q.add_argument("--vae", required=True, help="a CausalVideoVAE.from_pretrained folder (train-vae's output_dir/final)")
    q.add_argument("--physics", default=None, help="a held-out `sparse-dit data physics` folder")
    q.add_argument("--frames", type=int, default=17, help="frames per clip (1 + k x the temporal compression)")
    q.add_argument("--max-videos", type=int, default=48)
    q.add_argument("--codec-videos", type=int, default=24, help="real-codec clips to make with ffmpeg (0: none)")
    q.add_argument("--codec-size", type=int, default=None, help="their side in pixels (default: the physics videos')")
    q.add_argument("--context-frames", type=int, default=1, help="physics score: frames before scoring starts")
    q.add_argument("--refine-steps", type=int, default=0, help="refine the latents through the decoder first (CausalVideoVAE.refine)")
    q.add_argument("--json", default=None, help="also write the results here")
    m = sub.add_parser("memory", help="peak memory and videos/s against length: one-shot vs chunks (and tiles)")
    m.add_argument("--preset", default="vae-2x4x4-c8")
    m.add_argument("--vae", default=None, help="a trained VAE folder instead of a preset's random weights")
    m.add_argument("--size", type=int, default=64)
    m.add_argument("--lengths", type=int, nargs="+", default=[9, 17, 33, 65])
    m.add_argument("--chunk", type=int, default=4, help="latent frames per chunk")
    m.add_argument("--tile", type=int, default=0, help="pixel tile side (0 = no tiles); overlap = half a tile")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--json", default=None)
    c = sub.add_parser("train-clips", help="a VAE training folder: physics videos (lossless) + codec clips from sources the held-out set lacks")
    c.add_argument("--out", required=True)
    c.add_argument("--physics", default=None, help="a `sparse-dit data physics` folder to include (written as FFV1 .mkv)")
    c.add_argument("--codec-videos", type=int, default=256)
    c.add_argument("--frames", type=int, default=9)
    c.add_argument("--size", type=int, default=32)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    res = {"quality": quality, "memory": memory, "train-clips": train_clips}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
