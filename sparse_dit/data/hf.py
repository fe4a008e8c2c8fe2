"""Hugging Face ``datasets`` storage for videos: the physics-world schema, writing and reading.

Video encoding. ``video`` holds one video, uint8 (T, H, W, 3), stored losslessly as the bytes of
a compressed NumPy archive (``numpy.savez_compressed`` with one array named ``video``: zip +
deflate). Decode it with plain NumPy::

    frames = np.load(io.BytesIO(row["video"]))["video"]      # uint8 (T, H, W, 3)

or with :func:`decode_video`. Physics videos are mostly flat background, so deflate shrinks them
~20x (a 64x64, 32-frame video: 393,216 raw bytes -> about 17 KB; see BENCHMARKS.md). The column
``video_shape`` repeats [T, H, W, 3] so shapes are known without decoding (bucketing needs them).

Physics schema (one row per video; issue 4):

    video        binary    npz bytes of uint8 (T, H, W, 3)
    video_shape  [int32]   [T, H, W, 3]
    caption      string
    scenario     string
    states       {position [T][K][2] float32 (pixels, x right, y down, pixel centres at j + 0.5),
                  velocity [T][K][2] float32 (pixels per frame),
                  radius [K] float32 (pixels), color [K][3] uint8, visible [T][K] bool}
    params       string    JSON of the sampled simulation parameters
    fps          float32

Datasets converted from video folders (``sparse-dit data folder``) use the same ``video``,
``video_shape``, ``caption`` and ``fps`` columns plus ``source`` (the original file name).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import datasets
import numpy as np
from tqdm.auto import tqdm

from sparse_dit.data.physics import iter_physics_videos, parse_scenarios
from sparse_dit.schema import ConfigError

__all__ = [
    "DatasetKindError",
    "dataset_kind",
    "VIDEO_ENCODING",
    "encode_video",
    "decode_video",
    "physics_features",
    "folder_features",
    "physics_record",
    "decode_states",
    "write_dataset",
    "write_physics_dataset",
    "load_video_dataset",
]

VIDEO_ENCODING = "npz"  # stored in the dataset description; see the module docstring


class DatasetKindError(ConfigError):
    """A path that is not the kind of dataset asked for (not a saved dataset, or a video-folder
    dataset where a physics one is needed). A ConfigError: the CLI prints it as one line."""


def dataset_kind(ds: datasets.Dataset) -> str:
    """The ``kind`` this project stored in a dataset's description (``"sparse-dit physics world"``,
    ``"sparse-dit video folder"``), or ``"unknown"`` for datasets written elsewhere.

    Args:
        ds: a loaded dataset.
    """
    try:
        kind = json.loads(ds.info.description or "{}").get("kind")
    except (ValueError, AttributeError):
        kind = None
    return kind if isinstance(kind, str) else "unknown"


def encode_video(video: np.ndarray) -> bytes:
    """Losslessly compress a uint8 (T, H, W, 3) video to npz bytes.

    Args:
        video: uint8 array (T, H, W, 3).
    """
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be uint8 (T, H, W, 3), got {video.dtype} {video.shape}")
    buf = io.BytesIO()
    np.savez_compressed(buf, video=video)
    return buf.getvalue()


def decode_video(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_video`: npz bytes -> uint8 (T, H, W, 3).

    Args:
        data: the bytes of a ``video`` cell.
    """
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return archive["video"]


def _f32() -> datasets.Value:
    return datasets.Value("float32")


def physics_features() -> datasets.Features:
    """The physics dataset's features (schema in the module docstring)."""
    pair = datasets.List(_f32(), length=2)
    return datasets.Features(
        {
            "video": datasets.Value("binary"),
            "video_shape": datasets.List(datasets.Value("int32"), length=4),
            "caption": datasets.Value("string"),
            "scenario": datasets.Value("string"),
            "states": {
                "position": datasets.List(datasets.List(pair)),
                "velocity": datasets.List(datasets.List(pair)),
                "radius": datasets.List(_f32()),
                "color": datasets.List(datasets.List(datasets.Value("uint8"), length=3)),
                "visible": datasets.List(datasets.List(datasets.Value("bool"))),
            },
            "params": datasets.Value("string"),
            "fps": _f32(),
        }
    )


def folder_features() -> datasets.Features:
    """Features of a dataset converted from a folder of video files."""
    return datasets.Features(
        {
            "video": datasets.Value("binary"),
            "video_shape": datasets.List(datasets.Value("int32"), length=4),
            "caption": datasets.Value("string"),
            "fps": _f32(),
            "source": datasets.Value("string"),
        }
    )


def physics_record(row: dict) -> dict:
    """Turn an in-memory physics row (numpy video and states) into a dataset record.

    Args:
        row: a row from :func:`sparse_dit.data.physics.generate_video`.
    """
    states = row["states"]
    return {
        "video": encode_video(row["video"]),
        "video_shape": list(row["video"].shape),
        "caption": row["caption"],
        "scenario": row["scenario"],
        "states": {
            "position": np.asarray(states["position"], dtype=np.float32).tolist(),
            "velocity": np.asarray(states["velocity"], dtype=np.float32).tolist(),
            "radius": np.asarray(states["radius"], dtype=np.float32).tolist(),
            "color": np.asarray(states["color"], dtype=np.uint8).tolist(),
            "visible": np.asarray(states["visible"], dtype=bool).tolist(),
        },
        "params": row["params"] if isinstance(row["params"], str) else json.dumps(row["params"]),
        "fps": float(row["fps"]),
    }


def decode_states(states: dict) -> dict[str, np.ndarray]:
    """A dataset ``states`` cell as numpy arrays with the documented shapes and dtypes.

    Args:
        states: ``row["states"]`` as read from the dataset (nested lists).
    """
    num_frames = len(states["position"])
    num_balls = len(states["radius"])
    return {
        "position": np.asarray(states["position"], dtype=np.float32).reshape(num_frames, num_balls, 2),
        "velocity": np.asarray(states["velocity"], dtype=np.float32).reshape(num_frames, num_balls, 2),
        "radius": np.asarray(states["radius"], dtype=np.float32).reshape(num_balls),
        "color": np.asarray(states["color"], dtype=np.uint8).reshape(num_balls, 3),
        "visible": np.asarray(states["visible"], dtype=bool).reshape(num_frames, num_balls),
    }


def _records(rows: Iterable[dict], to_record) -> Iterator[dict]:
    for row in rows:
        yield to_record(row)


def write_dataset(
    rows: Iterable[dict],
    out: str | os.PathLike,
    features: datasets.Features,
    to_record=lambda r: r,
    description: str = "",
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
) -> datasets.Dataset:
    """Stream rows into an Arrow dataset at ``out`` (``datasets.load_from_disk(out)`` reads it).

    Rows are written to a temporary Arrow cache next to ``out`` as they arrive, so memory stays
    flat for any number of videos; the dataset is saved to a new folder next to ``out`` and
    swapped in at the end, so an existing ``out`` is replaced only once the new one is complete.

    Args:
        rows: an iterable of rows (consumed once).
        out: the output directory.
        features: the dataset features.
        to_record: converts a row into a record matching ``features``.
        description: stored as the dataset's description.
        overwrite: replace an existing ``out``.
        inputs: the paths the rows are read from; ``out`` may not be or hold any of them.
    """
    out = Path(out)
    _check_out(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows_iter = iter(rows)
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # the caller shows its own progress bar
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp") as tmp:
            # from_generator hashes its kwargs for a fingerprint: give it a unique, cheap token.
            token = {"tmp": tmp}
            gen_state = {"rows": rows_iter, "to_record": to_record}
            _GENERATORS[tmp] = gen_state
            try:
                ds = datasets.Dataset.from_generator(_generate, features=features, cache_dir=tmp, gen_kwargs=token)
            finally:
                _GENERATORS.pop(tmp, None)
            ds.info.description = description
            new = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new"))
            try:
                ds.save_to_disk(str(new))
                del ds
                _swap_in(new, out)
            finally:
                shutil.rmtree(new, ignore_errors=True)
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    return datasets.load_from_disk(str(out))


def _check_out(out: Path, overwrite: bool, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse an ``out`` that is a file, that holds an input, or that exists without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={str(out)!r} is a file; expected a folder (new, empty, or with --overwrite a dataset to replace)")
    real = out.resolve()
    for src in inputs:
        s = Path(src).resolve()
        if s == real or real in s.parents:
            raise ValueError(f"out={str(out)!r} holds the input {str(src)!r}; writing there would replace it: choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out={str(out)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _swap_in(new: Path, out: Path) -> None:
    """Put the finished folder ``new`` at ``out``; an old ``out`` is removed only after the rename."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old"))
    os.replace(out, old / out.name)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old / out.name, out)  # put the old one back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


_GENERATORS: dict[str, dict] = {}


def _generate(tmp: str) -> Iterator[dict]:
    state = _GENERATORS[tmp]
    yield from _records(state["rows"], state["to_record"])


def write_physics_dataset(
    out: str | os.PathLike,
    scenario: str | list[str],
    split: str,
    num_videos: int,
    frames: int,
    height: int,
    width: int,
    seed: int,
    fps: float = 10.0,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
) -> datasets.Dataset:
    """Generate physics-world videos and save them as a Hugging Face dataset at ``out``.

    Args:
        out: output directory (``datasets.load_from_disk(out)`` reads it).
        scenario: a scenario, a comma-separated list or "all" (see physics.SCENARIOS).
        split: ``"id"`` or ``"ood"``.
        num_videos: number of videos.
        frames: frames per video.
        height: frame height.
        width: frame width.
        seed: dataset seed (same seed, same dataset).
        fps: frames per second.
        workers: generator processes (default: all cores).
        progress: show a tqdm progress bar.
        overwrite: replace an existing ``out``.
        inputs: paths the command reads (a text encoder folder); ``out`` may not hold them.

    Returns:
        The saved dataset, loaded back from ``out``.
    """
    names = parse_scenarios(scenario)
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    rows = iter_physics_videos(names, split, num_videos, frames, height, width, seed, fps, workers)
    rows = tqdm(rows, total=num_videos, desc=f"physics {','.join(names)}/{split}", unit="video", disable=not progress)
    description = json.dumps(
        {
            "kind": "sparse-dit physics world",
            "video_encoding": VIDEO_ENCODING,
            "decode": "np.load(io.BytesIO(row['video']))['video'] -> uint8 (T, H, W, 3)",
            "scenarios": names,
            "split": split,
            "num_videos": num_videos,
            "frames": frames,
            "height": height,
            "width": width,
            "fps": fps,
            "seed": seed,
        }
    )
    return write_dataset(rows, out, physics_features(), physics_record, description, overwrite, inputs)


def load_video_dataset(path: str | os.PathLike) -> datasets.Dataset:
    """Load a dataset written by this module (``datasets.load_from_disk``), with a clear error.

    Args:
        path: the dataset directory.
    """
    path = Path(path)
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        what = "does not exist" if not path.exists() else "is not a saved Hugging Face dataset (no dataset_info.json)"
        raise DatasetKindError(f"path={str(path)!r} {what}; write one with `sparse-dit data physics --out DIR` or `sparse-dit data folder --out DIR`")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(f"path={str(path)!r} holds splits {list(ds)}; pass the directory of one split")
        ds = next(iter(ds.values()))
    return ds
