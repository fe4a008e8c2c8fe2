"""Issue 12, real video in: many clips per video at a stated frame rate, aspect-ratio buckets,
mp4/webm/mkv/avi with audio ignored, nothing dropped without a name.

The videos are real codec files made by imageio-ffmpeg's ffmpeg. Each frame is one flat colour
that spells its own frame index (red = index % 16, green = index // 16, in steps of 16 levels),
so the decoded clip says which source frames it took. Every expectation (which source frames a
clip at 12 fps takes, how many windows fit, which bucket an aspect ratio gets) is computed here
from frame numbers with integer arithmetic, not with the loader's helpers.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_dit.data.bucketing import make_buckets
from sparse_dit.data.loaders import HFVideoDataset, VideoFolderDataset

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

TARGET_FPS = 12
T = 4  # frames per clip (the one bucket duration)
CLIP_STRIDE = 3
BUCKETS = make_buckets(resolutions=(16,), frame_counts=(T,), multiple=2)

# name -> (codec args, height, width, native fps, frames, audio codec or None)
VIDEOS = {
    "wide.mp4": (["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "5"], 16, 32, 30, 40, "aac"),
    "tall.webm": (["-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", "-g", "5", "-deadline", "realtime", "-cpu-used", "8"], 32, 16, 30, 30, None),
    "square.mkv": (["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "5"], 24, 24, 25, 26, "libvorbis"),
    "slow.avi": (["-c:v", "mjpeg", "-pix_fmt", "yuvj420p", "-q:v", "2"], 16, 32, 10, 20, None),
}


def colour(index: int) -> tuple[int, int, int]:
    """The flat RGB colour of frame ``index``."""
    return 16 * (index % 16) + 8, 16 * (index // 16) + 8, 128


def decoded_indices(video: torch.Tensor) -> list[int]:
    """Frame indices spelled by a decoded clip (C, T, H, W) in [-1, 1]."""
    rgb = ((video.float() + 1) * 127.5).mean(dim=(2, 3))  # (C, T)
    return [int(round((r - 8) / 16)) + 16 * int(round((g - 8) / 16)) for r, g in zip(rgb[0].tolist(), rgb[1].tolist())]


def make_video(path: Path, codec: list[str], height: int, width: int, fps: int, frames: int, audio: str | None) -> None:
    raw = np.stack([np.broadcast_to(np.array(colour(i), np.uint8), (height, width, 3)) for i in range(frames)])
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
           "-r", str(fps), "-i", "-"]
    if audio:  # a sine on a second stream: the loader must decode the video stream alone
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={frames / fps:.3f}", "-c:a", audio, "-shortest"]
    subprocess.run(cmd + codec + [str(path)], input=raw.tobytes(), check=True, timeout=60)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real_video")
    for name, spec in VIDEOS.items():
        make_video(root / name, *spec)
    (root / "broken.mkv").write_bytes(b"\x1aE\xdf\xa3" + b"not a matroska file" * 40)  # corrupt
    return root


def timeline(native: int, frames: int, target: int) -> list[int]:
    """Source frames of a video resampled to ``target`` fps: the frame on screen at j / target."""
    out, j = [], 0
    while j * native // target < frames:
        out.append(j * native // target)
        j += 1
    return out


def strided(length: int) -> list[int]:
    starts, s = [], 0
    while s + T <= length:
        starts.append(s)
        s += CLIP_STRIDE
    return starts


def nearest_bucket(height: int, width: int) -> tuple[int, int]:
    spatial = sorted({(h, w) for _, h, w in BUCKETS})
    return min(spatial, key=lambda hw: abs(math.log(hw[0] / hw[1]) - math.log(height / width)))


def test_folder_gives_strided_and_random_windows_at_the_stated_rate_in_aspect_buckets(folder):
    import av

    with av.open(str(folder / "wide.mp4")) as c:  # the test files really carry audio where asked
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
    with pytest.warns(UserWarning) as warned:
        ds = VideoFolderDataset(folder, buckets=BUCKETS, target_fps=TARGET_FPS, clip_stride=CLIP_STRIDE, random_clips=2, seed=3, random_crop=False)
    # 30 and 25 fps videos are resampled; the 10 fps avi is below 12 fps; broken.mkv never decodes.
    dropped = {d["file"]: d["reason"] for d in ds.dropped}
    assert dropped == {"broken.mkv": "undecodable", "slow.avi": "low fps"}
    assert "10 fps, below the asked 12 fps" in next(d["detail"] for d in ds.dropped if d["file"] == "slow.avi")
    assert any("slow.avi" in str(w.message) for w in warned) and any("broken.mkv" in str(w.message) for w in warned)

    names = ds._names()
    used = {n: VIDEOS[n] for n in ("wide.mp4", "tall.webm", "square.mkv")}
    expected_total = 0
    for name, (_, height, width, fps, frames, _) in used.items():
        frames_at_12 = timeline(fps, frames, TARGET_FPS)
        starts = strided(len(frames_at_12))
        mine = [k for k in range(len(ds)) if names[ds.items[k]] == name]
        assert len(mine) == len(starts) + 2, name  # strided windows + 2 random ones
        expected_total += len(starts) + 2
        h, w = nearest_bucket(height, width)
        for k, start in zip(mine, starts + [None, None]):
            item = ds[k]
            got = decoded_indices(item["video"])
            assert got == item["frame_indices"].tolist(), (name, k)  # the decoded frames are the ones it names
            if start is not None:
                assert got == frames_at_12[start : start + T], (name, start)
            else:  # a random window: T consecutive frames of the 12 fps timeline
                assert any(got == frames_at_12[s : s + T] for s in range(len(frames_at_12) - T + 1)), (name, got)
            assert item["fps"] == TARGET_FPS
            assert item["bucket"].tolist() == [T, h, w] and tuple(item["video"].shape) == (3, T, h, w)
    assert len(ds) == expected_total
    # aspect ratios survive: wide stays wide, tall stays tall, square square
    shape = {names[ds.items[k]]: ds.sample_shapes()[k] for k in range(len(ds))}
    assert shape["wide.mp4"][2] > shape["wide.mp4"][1] and shape["tall.webm"][1] > shape["tall.webm"][2]
    assert shape["square.mkv"][1] == shape["square.mkv"][2]

    # random windows: the same within an epoch, reproducible across datasets, new across epochs
    randoms = [k for k in range(len(ds)) if ds.clips[k][1] is None]
    first = [ds.clip_plan(k)[0].tolist() for k in randoms]
    again = VideoFolderDataset(folder, buckets=BUCKETS, target_fps=TARGET_FPS, clip_stride=CLIP_STRIDE, random_clips=2, seed=3)
    assert [again.clip_plan(k)[0].tolist() for k in randoms] == first
    epochs = []
    for epoch in range(1, 4):
        ds.set_epoch(epoch)
        epochs.append([ds.clip_plan(k)[0].tolist() for k in randoms])
    assert any(e != first for e in epochs)
    ds.set_epoch(1)
    assert [ds.clip_plan(k)[0].tolist() for k in randoms] == epochs[0]


def test_a_video_below_the_rate_is_kept_at_its_own_rate_when_asked_and_named(folder):
    with pytest.warns(UserWarning, match="slow.avi"):
        ds = VideoFolderDataset(folder, num_frames=T, size=(16, 32), target_fps=TARGET_FPS, clip_stride=CLIP_STRIDE, low_fps="keep", random_crop=False)
    assert [n for n, _ in ds.kept_low_fps] == ["slow.avi"] and "slow.avi" not in {d["file"] for d in ds.dropped}
    names = ds._names()
    mine = [k for k in range(len(ds)) if names[ds.items[k]] == "slow.avi"]
    assert len(mine) == len(strided(20))  # every native frame: 20 frames at 10 fps
    item = ds[mine[-1]]
    assert item["fps"] == 10 and decoded_indices(item["video"]) == list(range(strided(20)[-1], strided(20)[-1] + T))


def test_unknown_rate_is_named_when_a_rate_is_asked():
    frames = np.zeros((8, 8, 8, 3), np.uint8).tolist()
    import datasets

    rows = datasets.Dataset.from_dict({"frames": [frames], "caption": ["no fps column"]})
    with pytest.warns(UserWarning, match="unknown or lower frame rate"):
        ds = HFVideoDataset(rows, num_frames=4, target_fps=5)
    assert len(ds) == 0 and ds.dropped == [{"file": "row 0", "reason": "unknown fps", "detail": "no frame rate stated; cannot resample to 5 fps"}]
    assert len(HFVideoDataset(rows, num_frames=4)) == 1  # no rate asked: used as it is


def test_data_folder_command_writes_one_row_per_clip_with_its_bucket_and_names_what_it_left_out(folder, tmp_path, capsys):
    import datasets

    from sparse_dit.cli import main

    out = tmp_path / "ds"
    with pytest.warns(UserWarning):
        rc = main(["data", "folder", "--videos", str(folder), "--out", str(out), "--fps", str(TARGET_FPS), "--clip-stride", str(CLIP_STRIDE),
                   "--bucket-resolutions", "16", "--bucket-frame-counts", str(T), "--bucket-multiple", "2", "--workers", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    ds = datasets.load_from_disk(str(out))
    for name, (_, height, width, fps, frames, _) in VIDEOS.items():
        rows = [r for r in ds if r["source"] == name]
        if name == "slow.avi":
            assert rows == []
            continue
        frames_at_12 = timeline(fps, frames, TARGET_FPS)
        assert [r["frame_indices"] for r in rows] == [frames_at_12[s : s + T] for s in strided(len(frames_at_12))]
        assert all(r["bucket"] == [T, *nearest_bucket(height, width)] and r["video_shape"][:3] == r["bucket"] for r in rows)
        assert all(r["fps"] == TARGET_FPS for r in rows)
    skipped = {r["file"]: r["reason"] for r in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert skipped == {"broken.mkv": "undecodable", "slow.avi": "low fps"}
    assert "skipped 1 undecodable, 0 too-short and 0 uncaptioned file(s), 1 below --fps and 0 of unknown rate" in printed


@pytest.mark.parametrize("argv, message", [
    (["--clip-stride", "0"], "--clip-stride: must be an integer >= 1"),
    (["--fps", "-3"], "--fps: must be a number > 0"),
    (["--clip-stride", "2"], "--clip-stride/--random-clips need --frames"),
    (["--bucket-resolutions", "16"], "--bucket-resolutions and --bucket-frame-counts go together"),
])
def test_bad_clip_flags_are_one_line(folder, tmp_path, capsys, argv, message):
    from sparse_dit.cli import main

    try:
        rc = main(["data", "folder", "--videos", str(folder), "--out", str(tmp_path / "x"), "--workers", "0", "--no-progress", *argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith(("usage", " "))]
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_trainer_batches_carry_the_epoch_to_workers():
    """The trainer's BatchSource sets the epoch in process and hands it to DataLoader workers
    with each index: the same random windows either way."""
    import datasets

    from sparse_dit.recipes.batches import BatchSource

    video = np.stack([np.broadcast_to(np.array(colour(i), np.uint8), (4, 4, 3)) for i in range(20)])
    rows = datasets.Dataset.from_dict({"frames": [video.tolist()] * 2, "caption": ["a", "b"], "fps": [10.0, 10.0]})
    ds = HFVideoDataset(rows, num_frames=3, random_clips=2, seed=1)
    source = BatchSource(ds, micro_batch=2, accum=1, rank=0, world_size=1, seed=0)
    steps = 3 * source.per_epoch  # three epochs
    in_process = [decoded_indices(v) for b in source.loader(0, steps, num_workers=0) for v in b["video"]]
    in_workers = [decoded_indices(v) for b in source.loader(0, steps, num_workers=1) for v in b["video"]]
    assert in_process == in_workers
    per_epoch = len(in_process) // 3
    assert in_process[:per_epoch] != in_process[per_epoch : 2 * per_epoch] or in_process[:per_epoch] != in_process[2 * per_epoch :]


def test_the_trainers_any_size_path_gets_real_aspect_ratios_and_clips(folder):
    """A recipe with data.source=folder, a stated fps, strided + random windows and a token
    budget: build_dataset and BucketSource (what sparse-dit train runs) batch wide, tall and
    square clips in their own buckets (multiples of 8 at side 16: 16x24, 24x16, 16x16)."""
    from sparse_dit.config import DataConfig, ModelConfig, RecipeConfig, TrainConfig
    from sparse_dit.recipes.batches import BucketSource, build_dataset

    recipe = RecipeConfig(model=ModelConfig(in_channels=3, patch_size=(1, 4, 4), hidden_size=32, depth=1, num_heads=2, text_dim=0),
                          train=TrainConfig(seed=7),
                          data=DataConfig(source="folder", path=str(folder), fps=TARGET_FPS, clip_stride=CLIP_STRIDE, random_clips=1,
                                          token_budget=T * 6 * 6, bucket_resolutions=(16,), bucket_frame_counts=(T,)))
    with pytest.warns(UserWarning):
        ds = build_dataset(recipe)
    names = ds._names()
    per_video = {n: sum(1 for k in range(len(ds)) if names[ds.items[k]] == n) for n in ("wide.mp4", "tall.webm", "square.mkv")}
    assert per_video == {n: len(strided(len(timeline(VIDEOS[n][3], VIDEOS[n][4], TARGET_FPS)))) + 1 for n in per_video}
    shapes = {names[ds.items[k]]: ds.sample_shapes()[k] for k in range(len(ds))}
    assert shapes == {"wide.mp4": (T, 16, 24), "tall.webm": (T, 24, 16), "square.mkv": (T, 16, 16)}
    source = BucketSource(ds, recipe.data.token_budget, recipe.model.patch_size, accum=1, rank=0, world_size=1, seed=7)
    batch_shapes = {tuple(source.batch(step, 0)["video"].shape[2:]) for step in range(source.per_epoch)}
    assert batch_shapes == set(shapes.values())
