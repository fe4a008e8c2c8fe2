"""``sparse-dit data ...``: build and inspect video datasets.

    sparse-dit data physics --scenario collision --split id --num-videos 1000 --frames 32 \\
        --resolution 64x64 --seed 0 --out data/collision_id
    sparse-dit data folder --videos my_clips/ --out data/my_clips --frames 16 --resolution 64x64
    sparse-dit data folder --videos my_clips/ --out data/my_clips --fps 10 --clip-stride 8 --random-clips 2 \
        --bucket-resolutions 64 --bucket-frame-counts 16
    sparse-dit data embed data/collision_id --text-encoder minilm
    sparse-dit data encode data/collision_id --vae runs/vae-light/final --out data/collision_id-latents --frames 17
    sparse-dit data info data/collision_id

Every written directory loads with ``datasets.load_from_disk(DIR)``; see docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from sparse_dit.data.bucketing import make_buckets
from sparse_dit.data.hf import encode_video, folder_features, load_video_dataset, write_dataset, write_physics_dataset
from sparse_dit.data.latents import add_encode_arguments, run_encode
from sparse_dit.data.loaders import VideoFolderDataset
from sparse_dit.data.text import cache_caption_embeddings, load_text_encoder
from sparse_dit.data.video import from_model_video

__all__ = ["add_arguments", "run", "parse_resolution"]


def parse_resolution(text: str) -> tuple[int, int]:
    """``"HxW"`` -> (H, W).

    Args:
        text: e.g. ``"64x64"`` or ``"32x48"``.
    """
    parts = text.lower().split("x")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--resolution must be HxW with positive integers (e.g. 64x64), got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"--resolution must be HxW with positive integers (e.g. 64x64), got {text!r}")
    return height, width


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1 (e.g. 32,64), got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``data`` subcommands to ``parser``.

    Args:
        parser: the ``sparse-dit data`` parser.
    """
    sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    sub.required = True

    p = sub.add_parser("physics", help="simulate a physics-world video dataset (pymunk ground truth)")
    p.add_argument("--scenario", required=True, help="uniform, collision, parabola, bounce, occlusion; a comma-separated list; or all")
    p.add_argument("--split", required=True, choices=("id", "ood"), help="in-distribution or out-of-distribution parameters")
    p.add_argument("--num-videos", type=int, required=True, help="number of videos")
    p.add_argument("--frames", type=int, default=32, help="frames per video (PhyWorld: 32)")
    p.add_argument("--resolution", type=parse_resolution, default=(64, 64), help="HxW in pixels (default 64x64)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (same seed, same dataset)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second (PhyWorld: 10, i.e. 0.1 s per frame)")
    p.add_argument("--workers", type=int, default=None, help="generator processes (default: all cores)")
    p.add_argument("--text-encoder", default=None, help="also cache caption embeddings: hash, minilm or a model directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    f = sub.add_parser("folder", help="turn a folder of videos (+ captions.jsonl) into a dataset")
    f.add_argument("--videos", required=True, help="folder of video files")
    f.add_argument("--captions", default=None, help="jsonl of {\"file\": ..., \"caption\": ...} (default VIDEOS/captions.jsonl if present)")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--frames", type=_positive_int, default=None, help="frames per clip (default: all; one clip from the start of each video)")
    f.add_argument("--resolution", type=parse_resolution, default=None, help="HxW: resize to cover, centre-crop (default: native)")
    f.add_argument("--fps", type=_positive_float, default=None, help="the clips' frame rate: each video resampled to it by frame selection (default: native)")
    f.add_argument("--low-fps", choices=("skip", "keep"), default="skip",
                   help="a video below --fps (or of unknown rate): skip it (named in skipped.jsonl) or keep it at its own rate (named)")
    f.add_argument("--clip-stride", type=_positive_int, default=None, help="a clip every N frames (at --fps) of each video (strided windows)")
    f.add_argument("--random-clips", type=_count, default=0, help="also N random windows per video (seeded by --seed)")
    f.add_argument("--seed", type=_count, default=0, help="seed of the random windows (default 0)")
    f.add_argument("--bucket-resolutions", type=_int_list, default=None,
                   help="aspect-ratio buckets instead of --resolution: square-equivalent sides, e.g. 32,64 (needs --bucket-frame-counts)")
    f.add_argument("--bucket-frame-counts", type=_int_list, default=None, help="bucket durations in frames, e.g. 8,16")
    f.add_argument("--bucket-multiple", type=_positive_int, default=8, help="bucket H and W are multiples of this (default 8)")
    f.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    f.add_argument("--text-encoder", default=None, help="also cache caption embeddings: hash, minilm or a model directory")
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    f.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    e = sub.add_parser("embed", help="precompute caption embeddings and store them with a dataset")
    e.add_argument("dataset", help="dataset directory")
    e.add_argument("--text-encoder", default="minilm", help="hash, minilm (needs the text extra) or a model directory")
    e.add_argument("--batch-size", type=int, default=64)

    add_encode_arguments(sub)  # sparse-dit data encode DATASET --vae DIR --out DIR (sparse_dit/data/latents.py)

    i = sub.add_parser("info", help="summarise a dataset directory")
    i.add_argument("dataset", help="dataset directory")


def _embed(path: str, encoder_name: str, batch_size: int = 64) -> None:
    encoder = load_text_encoder(encoder_name)
    out = cache_caption_embeddings(path, encoder, batch_size=batch_size)
    print(f"caption embeddings ({encoder.name}, dim {encoder.dim}) -> {out}")


def _bytes_per_video(ds) -> float:
    return float(np.mean([len(b) for b in ds.select_columns(["video"])["video"]])) if len(ds) else 0.0


def _paths(*values: str | None) -> list[str]:
    """The arguments that name existing files or folders (a text encoder may be a name, not a path)."""
    return [v for v in values if v and os.path.exists(v)]


def _physics(args: argparse.Namespace) -> int:
    height, width = args.resolution
    ds = write_physics_dataset(
        args.out, args.scenario, args.split, args.num_videos, args.frames, height, width, args.seed,
        fps=args.fps, workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite, inputs=_paths(args.text_encoder),
    )
    raw = args.frames * height * width * 3
    stored = _bytes_per_video(ds)
    print(f"wrote {len(ds)} videos ({args.frames}x{height}x{width}) to {args.out}: {stored:,.0f} bytes per video stored "
          f"({raw:,} raw, {raw / max(stored, 1):.1f}x smaller, lossless npz)")
    if args.text_encoder:
        _embed(args.out, args.text_encoder)
    return 0


class _Rows(torch.utils.data.Dataset):
    """The folder dataset's clips for ``data folder``: a clip that fails to decode comes back as
    its error (never another clip in its place, as training's substitution would)."""

    def __init__(self, ds: VideoFolderDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, k: int) -> dict:
        try:
            return self.ds._load(k)
        except Exception as exc:  # PyAV raises many types; the file is named and skipped
            frames = self.ds.clip_plan(k)[0]
            return {"error": f"clip of source frames {int(frames[0])}..{int(frames[-1])}: {type(exc).__name__}: {exc}", "index": self.ds.items[k]}


SKIPPED_FILE = "skipped.jsonl"  # beside the dataset: one {"file", "reason", "detail"} per file left out


def _report_skipped(dropped: list[dict], out: str | None) -> None:
    """Print every file left out with its reason; write them to ``out/skipped.jsonl`` (atomically)."""
    counts = Counter(d["reason"] for d in dropped)
    where = f" (listed in {os.path.join(out, SKIPPED_FILE)})" if out else ""
    fps = f", {counts['low fps']} below --fps and {counts['unknown fps']} of unknown rate" if counts["low fps"] + counts["unknown fps"] else ""
    print(f"skipped {counts['undecodable']} undecodable, {counts['too short']} too-short and {counts['missing caption']} "
          f"uncaptioned file(s){fps}{where}")
    for d in dropped:
        print(f"  skipped {d['file']}: {d['detail']} [{d['reason']}]")
    if out:
        path = os.path.join(out, SKIPPED_FILE)
        tmp = os.path.join(out, f".{SKIPPED_FILE}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(d) + "\n" for d in dropped)
        os.replace(tmp, path)


def _folder_dataset(args: argparse.Namespace) -> VideoFolderDataset:
    """The folder's clips as ``data folder``'s flags ask (ValueError: one line for the user)."""
    bucketed = args.bucket_resolutions is not None or args.bucket_frame_counts is not None
    if bucketed and (args.bucket_resolutions is None or args.bucket_frame_counts is None):
        raise ValueError("--bucket-resolutions and --bucket-frame-counts go together; give both")
    if bucketed and (args.resolution is not None or args.frames is not None):
        raise ValueError("--resolution/--frames and buckets exclude each other: buckets set each clip's shape")
    shape = dict(buckets=make_buckets(args.bucket_resolutions, args.bucket_frame_counts, multiple=args.bucket_multiple)) if bucketed \
        else dict(num_frames=args.frames, size=args.resolution)
    if (args.clip_stride is not None or args.random_clips) and not bucketed and args.frames is None:
        raise ValueError("--clip-stride/--random-clips need --frames (or buckets): the clip length")
    return VideoFolderDataset(args.videos, captions=args.captions, target_fps=args.fps, low_fps=args.low_fps, clip_stride=args.clip_stride,
                              random_clips=args.random_clips, seed=args.seed, random_crop=False, **shape)


def _folder(args: argparse.Namespace) -> int:
    ds = _folder_dataset(args)
    dropped = ds.dropped
    if len(ds) == 0:
        print(f"no usable video in {args.videos}", file=sys.stderr)
        for d in dropped:
            print(f"  skipped {d['file']}: {d['detail']} [{d['reason']}]", file=sys.stderr)
        return 1
    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    loader = torch.utils.data.DataLoader(_Rows(ds), batch_size=None, num_workers=workers if workers > 1 else 0)
    names = ds._names()

    def rows():
        for item in tqdm(loader, total=len(ds), desc="videos", unit="video", disable=args.no_progress):
            if "error" in item:  # probed fine, failed to decode: named, never replaced by another clip
                dropped.append({"file": names[int(item["index"])], "reason": "undecodable", "detail": item["error"]})
                continue
            frames = from_model_video(item["video"])
            yield {"video": encode_video(frames), "video_shape": list(frames.shape), "caption": item["caption"],
                   "fps": float(item["fps"]), "source": names[int(item["index"])],
                   "frame_indices": item["frame_indices"].tolist(), "bucket": item["bucket"].tolist()}

    description = json.dumps({"kind": "sparse-dit video folder", "video_encoding": "npz", "source": os.path.abspath(args.videos)})
    inputs = [args.videos, *_paths(args.captions, args.text_encoder)]
    # Per clip also the source frames it took and its (T, H, W) bucket.
    features = datasets.Features({**folder_features(), "frame_indices": datasets.List(datasets.Value("int32")),
                                  "bucket": datasets.List(datasets.Value("int32"), length=3)})
    out = write_dataset(rows(), args.out, features, description=description, overwrite=args.overwrite, inputs=inputs)
    print(f"wrote {len(out)} clips from {len(set(out['source']))} videos to {args.out} ({_bytes_per_video(out):,.0f} bytes per clip)")
    for name, detail in ds.kept_low_fps:
        print(f"  kept {name} at its own rate: {detail} [low fps, --low-fps keep]")
    _report_skipped(dropped, args.out)
    if args.text_encoder:
        _embed(args.out, args.text_encoder)
    return 0


def _info(args: argparse.Namespace) -> int:
    ds = load_video_dataset(args.dataset)
    print(f"{args.dataset}: {len(ds)} rows, columns {ds.column_names}")
    if "video" in ds.column_names and len(ds):
        print(f"  {_bytes_per_video(ds):,.0f} bytes per video (npz)")
        if "video_shape" in ds.column_names:
            print(f"  video shape (T, H, W, C) of row 0: {tuple(ds[0]['video_shape'])}")
    if "scenario" in ds.column_names:
        print(f"  scenarios: {dict(Counter(ds['scenario']))}")
    if "caption" in ds.column_names and len(ds):
        print(f"  caption of row 0: {ds[0]['caption']!r}")
    folder = os.path.join(args.dataset, "text_embeddings")
    if os.path.isdir(folder):
        print(f"  cached caption embeddings: {sorted(n[:-12] for n in os.listdir(folder) if n.endswith('.safetensors'))}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run a ``sparse-dit data`` subcommand; returns the exit code.

    Args:
        args: parsed arguments.
    """
    try:
        if args.data_command == "physics":
            return _physics(args)
        if args.data_command == "folder":
            return _folder(args)
        if args.data_command == "encode":
            return run_encode(args)
        if args.data_command == "embed":
            _embed(args.dataset, args.text_encoder, args.batch_size)
            return 0
        return _info(args)
    except ValueError as exc:
        print(f"sparse-dit data {args.data_command}: error: {exc}", file=sys.stderr)
        return 2
