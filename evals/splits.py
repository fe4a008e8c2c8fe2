"""Validation splits for the evals: physics (simulated or saved) and any video dataset (issue 15).

A split is the real videos every run is scored on, with the simulator's ground truth where there
is one::

    load_split("id", "data/val_id")            # `sparse-dit data physics`: videos + states
    load_split("id", "data/my_clips", frames=8, height=32, width=32)
                                               # `sparse-dit data folder` / `data hf`: videos only
    physics_split("id", "uniform", "id", 48, 8, 32, 32, seed=1_000_001, fps=4.0)

Splits without states are scored with the metrics that need no ground truth (held-out loss,
PSNR/SSIM, FVD with a detector); the physics metrics are skipped with a named reason
(:mod:`sparse_dit.evals.metrics`).

:func:`data_mismatch` names what differs between a split and the data a run trained on (the kind
of source, the resolution, the frame rate): an eval on the wrong data is warned about in one
line, or refused with ``--strict``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sparse_dit.config import ConfigError, RecipeConfig
from sparse_dit.data import HFVideoDataset, PhysicsVideoDataset, from_model_video, generate_physics_videos, load_video_dataset
from sparse_dit.data.hf import dataset_kind

__all__ = ["EvalSplit", "SOURCE_KINDS", "physics_split", "load_split", "training_data", "data_mismatch"]

# What a data source is, for the wrong-data check: the recipe's data.source -> its kind.
SOURCE_KINDS = {"synthetic": "synthetic moving squares", "physics": "physics world", "folder": "video", "hf": "video"}
_PHYSICS_COLUMNS = {"states", "params", "scenario"}


@dataclass
class EvalSplit:
    """Validation videos of one split, with their ground truth where the data has one.

    Args:
        name: split name (``"id"``, ``"ood"``).
        videos: uint8 (N, T, H, W, 3).
        states: the physics dataset's ``states`` rows, one per video; None for a dataset
            without them (``sparse-dit data folder`` / ``data hf``).
        source: ``"physics"`` (simulated or saved physics world), ``"folder"`` or ``"hf"``.
        fps: the videos' frame rate (None: unknown).
        path: the dataset folder (None: simulated in memory).
        skipped: (item, reason) of every video left out (undecodable, too short).
    """

    name: str
    videos: np.ndarray
    states: Optional[list] = None
    source: str = "physics"
    fps: Optional[float] = None
    path: Optional[str] = None
    skipped: list = field(default_factory=list)

    def __post_init__(self) -> None:
        v = np.asarray(self.videos)
        if v.dtype != np.uint8 or v.ndim != 5 or v.shape[-1] != 3:
            raise ConfigError(f"split {self.name!r}: videos must be uint8 (N, T, H, W, 3); got {v.dtype} {v.shape}")
        if self.states is not None and len(self.states) != v.shape[0]:
            raise ConfigError(f"split {self.name!r}: {v.shape[0]} videos but {len(self.states)} states rows")
        self.videos = v

    @property
    def has_states(self) -> bool:
        """True when the split carries the simulator's ground truth (physics metrics can run)."""
        return self.states is not None

    def model_videos(self) -> torch.Tensor:
        """The videos in the model convention: float (N, 3, T, H, W) in [-1, 1]."""
        return torch.from_numpy(self.videos).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def physics_split(name: str, scenario: str, split: str, num_videos: int, frames: int, height: int, width: int,
                  seed: int, fps: float = 10.0, workers: int | None = 1) -> EvalSplit:
    """Simulate a validation split in memory (``sparse_dit.data.generate_physics_videos``).

    Args:
        name: the split's name in the report.
        scenario: physics scenario(s) (see ``sparse_dit.data.SCENARIOS``).
        split: ``"id"`` or ``"ood"``.
        num_videos: videos N.
        frames: frames T.
        height: frame height.
        width: frame width.
        seed: dataset seed (use one the training set did not use).
        fps: frames per second.
        workers: generator processes.
    """
    rows = generate_physics_videos(scenario, split, num_videos, frames, height, width, seed=seed, fps=fps, workers=workers)
    return EvalSplit(name, np.stack([r["video"] for r in rows]), [r["states"] for r in rows], source="physics", fps=float(fps))


def _mean_fps(ds: Any) -> Optional[float]:
    if "fps" not in ds.column_names or len(ds) == 0:
        return None
    values = [float(x) for x in ds["fps"] if x is not None]
    return float(np.mean(values)) if values else None


def load_split(name: str, path: str | Path, limit: int | None = None, *, frames: int | None = None,
               height: int | None = None, width: int | None = None) -> EvalSplit:
    """Read a saved dataset as a validation split: a physics dataset, or any video dataset.

    A physics dataset (``sparse-dit data physics``) keeps its stored videos whole, with their
    states. Any other dataset with a video column (``sparse-dit data folder``, ``data hf``) is
    read through :class:`sparse_dit.data.HFVideoDataset`: each video's first ``frames`` frames,
    resized to cover ``height`` x ``width`` and centre-cropped (the training loader's
    transform, without its random crops); videos too short or undecodable are left out and
    listed in ``skipped``.

    Args:
        name: the split's name in the report.
        path: the dataset directory.
        limit: use only the first ``limit`` videos.
        frames: frames per clip for a video dataset (default: every video's own length; they
            must then agree).
        height: output height for a video dataset (with ``width``; default: native).
        width: output width for a video dataset.
    """
    path = Path(path)
    ds = load_video_dataset(path)
    if _PHYSICS_COLUMNS <= set(ds.column_names):
        pds = PhysicsVideoDataset(ds)
        n = len(pds) if limit is None else min(len(pds), int(limit))
        if n < 1:
            raise ConfigError(f"dataset {path} holds no videos")
        return EvalSplit(name, np.stack([pds.raw_video(i) for i in range(n)]), [pds.states(i) for i in range(n)],
                         source="physics", fps=_mean_fps(ds), path=str(path))
    if (height is None) != (width is None):
        raise ConfigError(f"give both height and width for dataset {path}, or neither; got height={height}, width={width}")
    source = "folder" if dataset_kind(ds) == "sparse-dit video folder" or "source" in ds.column_names else "hf"
    vds = HFVideoDataset(ds, num_frames=frames, size=(height, width) if height is not None else None, random_crop=False)
    n = len(vds) if limit is None else min(len(vds), int(limit))
    skipped = [(str(item), str(reason)) for item, reason in vds.skipped]
    if vds.num_too_short:
        skipped.append((f"{vds.num_too_short} video(s)", f"fewer than frames={frames} frames"))
    if n < 1:
        why = "; ".join(f"{i}: {r}" for i, r in skipped) or "it is empty"
        raise ConfigError(f"dataset {path} has no usable video ({why})")
    items = [vds[k] for k in range(n)]
    clips = [from_model_video(item["video"]) for item in items]
    shapes = sorted({c.shape for c in clips})
    if len(shapes) > 1:
        raise ConfigError(f"dataset {path}: videos of different shapes {shapes[:3]}...; pass --frames, --height and --width "
                         "(a run's recipe gives them by default) so that every clip is cut to one size")
    fps = [float(item["fps"]) for item in items]
    return EvalSplit(name, np.stack(clips), None, source=source, fps=float(np.mean(fps)) if fps else None, path=str(path),
                     skipped=skipped)


def training_data(recipe: RecipeConfig) -> dict[str, Any]:
    """What a run trained on, for :func:`data_mismatch`: ``source``, ``kind``, ``height``, ``width``, ``fps``.

    The frame rate is not in the recipe; it is read from the training dataset (``data.path``)
    when that folder is still there (the physics dataset's description, else its ``fps``
    column), else None (not compared). With any-size training (``data.token_budget``) the
    resolution varies, so it is None too.

    Args:
        recipe: the run's recipe.
    """
    d = recipe.data
    fps = None
    source, path = d.source, d.path
    if source == "latents" and path and Path(path).is_dir():  # cached latents: compare with the clips they encode
        try:
            src = json.loads(load_video_dataset(path).info.description or "{}").get("source")
            if src and Path(src).is_dir():
                source = "physics" if _PHYSICS_COLUMNS <= set(load_video_dataset(src).column_names) else "hf"
                path = src
        except (ValueError, OSError, AttributeError):
            pass
    if path and Path(path).is_dir():
        try:
            ds = load_video_dataset(path)
            meta = json.loads(ds.info.description or "{}") if ds.info.description else {}
            fps = float(meta["fps"]) if isinstance(meta, dict) and meta.get("fps") else _mean_fps(ds)
        except (ValueError, OSError, json.JSONDecodeError):
            fps = None
    any_size = d.token_budget is not None or d.source == "latents"  # a cache's recipe sizes are not checked against it
    return {"source": source, "kind": SOURCE_KINDS.get(source, source),
            "height": None if any_size else d.height, "width": None if any_size else d.width, "fps": fps}


def data_mismatch(recipe: Optional[RecipeConfig], split: EvalSplit) -> list[str]:
    """What differs between ``split`` and the data ``recipe`` trained on, one phrase each (empty: nothing).

    Compared: the kind of source (physics world / video / synthetic moving squares), the
    resolution (H x W) and the frame rate (to 1 %), each only where both sides know it.

    Args:
        recipe: the run's recipe (None: nothing known, nothing compared).
        split: the eval split.
    """
    if recipe is None:
        return []
    train = training_data(recipe)
    kind = SOURCE_KINDS.get(split.source, split.source)
    out = []
    if kind != train["kind"]:
        out.append(f"source {split.source} ({kind}) vs training's {train['source']} ({train['kind']})")
    h, w = split.videos.shape[2:4]
    if train["height"] is not None and (h, w) != (train["height"], train["width"]):
        out.append(f"resolution {h}x{w} vs training's {train['height']}x{train['width']}")
    if split.fps is not None and train["fps"] is not None and not math.isclose(split.fps, train["fps"], rel_tol=0.01):
        out.append(f"frame rate {split.fps:g} fps vs training's {train['fps']:g} fps")
    return out
