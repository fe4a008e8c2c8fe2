"""Data sources: one table, ``DATA_SOURCES``, from ``data.source`` to the dataset it builds.

Every entry turns the recipe's ``data`` section into a map-style dataset whose items are dicts
with ``video`` (C, T, H, W) in [-1, 1] and ``caption`` (plus ``label`` for ``synthetic``; the
``latents`` source gives ``latents`` (c, t, h, w) instead of ``video``). The
trainer and ``sparse-dit generate`` reach the table through
``sparse_dit.recipes.batches.build_dataset``, which checks ``data.path`` and computes the
any-size buckets; a new source is one builder here plus one entry, and its name added to
``DataConfig.source``'s choices (a test keeps the two equal).

    DATA_SOURCES["physics"].build(data, held_out=False, seed=0, buckets=None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch.utils.data import Dataset

from sparse_dit.config import DataConfig
from sparse_dit.data.loaders import HFVideoDataset, PhysicsVideoDataset, VideoFolderDataset
from sparse_dit.data.latents import LatentDataset
from sparse_dit.data.synthetic import MovingSquares

__all__ = ["DataSource", "DATA_SOURCES", "HELD_OUT_SEED_OFFSET", "HELD_OUT_SYNTHETIC_VIDEOS"]

Buckets = Optional[Sequence[tuple[int, int, int]]]

# The synthetic held-out set: a few clips from a seed the training set (seed + 0) never uses.
HELD_OUT_SEED_OFFSET = 10_000
HELD_OUT_SYNTHETIC_VIDEOS = 4


@dataclass(frozen=True)
class DataSource:
    """One entry of :data:`DATA_SOURCES`.

    Args:
        name: the ``data.source`` value.
        build: ``build(data, *, held_out, seed, buckets) -> Dataset``. ``held_out`` asks for a few
            clips the training set does not hold, deterministically cropped; ``seed`` is
            ``train.seed``; ``buckets`` are (T, H, W) shapes for any-size training (None: every
            clip cropped to ``num_frames x height x width``).
        needs_path: ``data.path`` must name a dataset folder.
        bucketed: honours ``buckets`` (``data.token_budget``); otherwise none are computed.
        description: one line for docs and error messages.
    """

    name: str
    build: Callable[..., Dataset]
    needs_path: bool
    bucketed: bool
    description: str


def _clip_kwargs(data: DataConfig, buckets: Buckets) -> dict:
    # With buckets the loader picks each clip's shape; without, one crop size for every clip.
    return dict(buckets=buckets) if buckets is not None else dict(num_frames=data.num_frames, size=(data.height, data.width))


def _synthetic(data: DataConfig, *, held_out: bool, seed: int, buckets: Buckets = None) -> Dataset:
    if held_out:
        return MovingSquares(HELD_OUT_SYNTHETIC_VIDEOS, data.num_frames, data.height, data.width, seed=seed + HELD_OUT_SEED_OFFSET)
    return MovingSquares(data.num_videos, data.num_frames, data.height, data.width, seed=seed)


def _physics(data: DataConfig, *, held_out: bool, seed: int, buckets: Buckets = None) -> Dataset:
    return PhysicsVideoDataset(data.path, **_clip_kwargs(data, buckets))


def _video_kwargs(data: DataConfig, held_out: bool, seed: int) -> dict:
    # Real video: the stated frame rate, its low-rate rule, and the clips per video (the held-out
    # set takes one deterministic window per video: its start).
    clips = {} if held_out else dict(clip_stride=data.clip_stride, random_clips=data.random_clips)
    return dict(random_crop=not held_out, seed=seed, target_fps=data.fps, low_fps=data.low_fps, **clips)


def _folder(data: DataConfig, *, held_out: bool, seed: int, buckets: Buckets = None) -> Dataset:
    return VideoFolderDataset(data.path, **_video_kwargs(data, held_out, seed), **_clip_kwargs(data, buckets))


def _hf(data: DataConfig, *, held_out: bool, seed: int, buckets: Buckets = None) -> Dataset:
    return HFVideoDataset(data.path, **_video_kwargs(data, held_out, seed), **_clip_kwargs(data, buckets))


def _latents(data: DataConfig, *, held_out: bool, seed: int, buckets: Buckets = None) -> Dataset:
    # Cached latents hold no held-out split: the "held-out" clips (sample videos) are the first
    # few rows, training clips (docs/data.md "Cached latents").
    ds = LatentDataset(data.path)
    return LatentDataset(data.path, indices=range(min(HELD_OUT_SYNTHETIC_VIDEOS, len(ds)))) if held_out else ds


DATA_SOURCES: dict[str, DataSource] = {
    s.name: s
    for s in (
        DataSource("synthetic", _synthetic, needs_path=False, bucketed=False,
                   description="procedural moving squares built in code (class labels + captions); no files"),
        DataSource("physics", _physics, needs_path=True, bucketed=True,
                   description="a folder written by `sparse-dit data physics` (videos, captions, ground-truth states)"),
        DataSource("folder", _folder, needs_path=True, bucketed=True,
                   description="a folder of video files + captions.jsonl (PyAV)"),
        DataSource("hf", _hf, needs_path=True, bucketed=True,
                   description="a saved Hugging Face dataset with a video/frames column"),
        DataSource("latents", _latents, needs_path=True, bucketed=False,
                   description="latents cached by `sparse-dit data encode` (trained as they are; the recipe's autoencoder must match)"),
    )
}
