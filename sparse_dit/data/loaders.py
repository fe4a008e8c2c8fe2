"""Torch datasets over video: folders of files, Hugging Face datasets, and physics datasets.

Every dataset returns ``dict(video=(C, T, H, W) float32 in [-1, 1], caption=str, index=int,
fps=float, frame_indices=(T,) int64)`` (plus ``text_tokens``/``text_mask``/``text_pooled`` when a
caption-embedding cache is attached), so ``torch.utils.data.default_collate`` batches them.

Shapes. Each item's output shape is fixed when the dataset is built (``sample_shapes()``), so a
:class:`~sparse_dit.data.bucketing.BucketBatchSampler` can group items of one shape:

- ``buckets=[(T, H, W), ...]``: each video goes to its nearest aspect-ratio bucket and the
  longest bucket duration it fills; it is resized to cover the bucket and cropped;
- else ``size=(H, W)`` and/or ``num_frames=T`` fix those dimensions; unset ones keep the video's.

Temporal sampling. Each video is first turned into a timeline of source frames: at a stated
frame rate ``target_fps`` (resampled by frame selection, :func:`~sparse_dit.data.video.
resample_indices`), else every ``frame_stride``-th frame. A video whose rate is unknown or below
``target_fps`` (by more than 1%) is left out (``low_fps="skip"``, reasons ``unknown fps`` /
``low fps``) or kept at its own rate (``low_fps="keep"``, named in ``kept_low_fps``). Then each
video gives many clips (items): ``clip_stride`` makes the strided windows (starts 0, s, 2s, ...
on the timeline) and ``random_clips`` adds that many random windows per video, their starts drawn
from ``(seed, epoch, item)`` (:meth:`ClipDataset.set_epoch`; reproducible, new each epoch). With
neither, a video gives one window: a random one with ``random_crop=True``, else its start.
``random_crop`` also makes the spatial crop random (else centred). Nothing is left out without a name: ``dropped`` lists every
file not used, as ``{"file", "reason", "detail"}`` with reason ``undecodable`` (also in
``skipped``), ``too short`` (also in ``too_short``) or ``missing caption`` (a video file in the
folder that ``captions.jsonl`` does not list; :class:`VideoFolderDataset` only), each warned about.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import datasets as hf
import numpy as np
import torch
from torch.utils.data import Dataset

from sparse_dit.data.bucketing import Shape, assign_bucket
from sparse_dit.data.hf import DatasetKindError, dataset_kind, decode_states, decode_video, load_video_dataset
from sparse_dit.data.video import VIDEO_EXTENSIONS, VideoMeta, probe_video, read_video, resample_indices, resize_crop, to_model_video, window_starts

__all__ = ["ClipDataset", "VideoFolderDataset", "HFVideoDataset", "PhysicsVideoDataset", "read_captions_jsonl", "collate_clips"]


def collate_clips(items: list[dict]) -> dict:
    """Batch dataset items: tensors stacked, strings and numbers listed/tensored.

    Same result as ``torch.utils.data.default_collate`` but stacks with NumPy (one thread): in
    the main process torch's multi-threaded stack took ~33 ms for 8 clips of 3x16x32x32 on a
    loaded 2-core machine, making loading 5-16x slower (BENCHMARKS.md, issue 4).

    Args:
        items: dicts from one of these datasets, all with the same shapes.
    """
    out: dict = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(f"cannot batch {key!r} of different shapes {sorted(shapes)}; use a BucketBatchSampler")
            out[key] = torch.from_numpy(np.stack([v.numpy() for v in values]))
        elif isinstance(values[0], str):
            out[key] = values
        elif isinstance(values[0], float):
            out[key] = torch.tensor(values, dtype=torch.float64)  # as default_collate
        else:
            out[key] = torch.tensor(values)
    return out


class ClipDataset(Dataset):
    """Base class: subclasses list their items and implement ``_probe`` / ``_read``.

    Args:
        num_frames: frames per clip (None: all that fit; ignored with ``buckets``).
        size: (H, W) output size (None: native; ignored with ``buckets``).
        buckets: bucket shapes (T, H, W) for any-size training.
        frame_stride: keep every ``frame_stride``-th frame (without ``target_fps``).
        target_fps: the clips' frame rate: each video resampled to it by frame selection.
        random_crop: with neither clip option, one random window per video (else its start);
            the spatial crop is random (else centred).
        seed: seed of the random windows and crops.
        text_cache: a CaptionEmbeddingCache whose embeddings are added to each item.
        clip_stride: strided windows: a clip every ``clip_stride`` frames of the timeline.
        random_clips: random windows per video (seeded by seed, epoch and item).
        low_fps: ``"skip"`` or ``"keep"`` a video whose rate is unknown/below ``target_fps``
            (unknown rates are always skipped when a rate is asked).
    """

    def __init__(
        self,
        num_frames: int | None = None,
        size: tuple[int, int] | None = None,
        buckets: Sequence[Shape] | None = None,
        frame_stride: int = 1,
        target_fps: float | None = None,
        random_crop: bool = True,
        seed: int = 0,
        text_cache: Any = None,
        clip_stride: int | None = None,
        random_clips: int = 0,
        low_fps: str = "skip",
    ):
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(f"size must be (H, W) with positive entries or None, got {size}")
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        if target_fps is not None and not target_fps > 0:
            raise ValueError(f"target_fps must be > 0 or None, got {target_fps}")
        if clip_stride is not None and clip_stride < 1:
            raise ValueError(f"clip_stride must be >= 1 or None, got {clip_stride}")
        if random_clips < 0:
            raise ValueError(f"random_clips must be >= 0, got {random_clips}")
        if low_fps not in ("skip", "keep"):
            raise ValueError(f"low_fps must be 'skip' or 'keep', got {low_fps!r}")
        if (clip_stride is not None or random_clips) and num_frames is None and not buckets:
            raise ValueError("clip_stride / random_clips need num_frames or buckets (a window's length)")
        self.clip_stride, self.random_clips, self.low_fps = clip_stride, int(random_clips), low_fps
        self.epoch = 0
        self.num_frames, self.size, self.buckets = num_frames, tuple(size) if size else None, list(buckets) if buckets else None
        self.frame_stride, self.target_fps, self.random_crop, self.seed = frame_stride, target_fps, random_crop, seed
        self.text_cache = text_cache
        self.skipped: list[tuple[str, str]] = []  # undecodable: (item name, error)
        self.too_short: list[tuple[str, str]] = []  # (item name, frames it has vs the clip's)
        self.missing_caption: list[str] = []  # folder files captions.jsonl does not list (VideoFolderDataset)
        self.fps_skipped: list[tuple[str, str, str]] = []  # (item name, "low fps" | "unknown fps", detail)
        self.kept_low_fps: list[tuple[str, str]] = []  # low_fps="keep": (item name, its rate vs the asked one)
        self.num_failed_reads = 0  # decode errors after probing, in this process

    # -- subclass hooks -----------------------------------------------------------------------
    def _names(self) -> list[str]:
        raise NotImplementedError

    def _probe(self, i: int) -> VideoMeta:
        raise NotImplementedError

    def _read(self, i: int, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _caption(self, i: int) -> str:
        raise NotImplementedError

    # -- shared logic -------------------------------------------------------------------------
    def _timeline(self, name: str, meta: VideoMeta) -> tuple[np.ndarray, float, str] | None:
        """The video's source frames at the clips' rate, that rate, and how it was made; None
        (and the video named in ``fps_skipped``) when its rate is unknown or too low."""
        if self.target_fps is None:
            return np.arange(0, meta.num_frames, self.frame_stride), meta.fps / self.frame_stride, f"stride {self.frame_stride}"
        if not meta.fps_known:
            self.fps_skipped.append((name, "unknown fps", f"no frame rate stated; cannot resample to {self.target_fps:g} fps"))
            return None
        if meta.fps < self.target_fps / 1.01:
            detail = f"{meta.fps:g} fps, below the asked {self.target_fps:g} fps"
            if self.low_fps == "skip":
                self.fps_skipped.append((name, "low fps", detail))
                return None
            self.kept_low_fps.append((name, f"{detail}: kept at {meta.fps:g} fps"))
            return np.arange(meta.num_frames), meta.fps, f"{meta.fps:g} fps"
        return resample_indices(meta.num_frames, meta.fps, self.target_fps), float(self.target_fps), f"{self.target_fps:g} fps"

    def _build(self) -> None:
        """Probe every item; keep the decodable ones that fit a clip; cut each into clips; warn
        about (and name) the rest."""
        self.videos: list[tuple[int, VideoMeta, np.ndarray, float, Shape]] = []  # (item, meta, timeline, fps, shape)
        self.clips: list[tuple[int, int | None]] = []  # (position in videos, window start; None: a random one)
        for i, name in enumerate(self._names()):
            try:
                meta = self._probe(i)
            except Exception as exc:  # PyAV raises many types; any undecodable file is skipped
                self.skipped.append((name, f"{type(exc).__name__}: {exc}"))
                continue
            made = self._timeline(name, meta)
            if made is None:
                continue
            timeline, fps, rate = made
            shape = self._shape_for(len(timeline), meta)
            if shape is None:
                need = f"a clip of {self.num_frames} frames" if not self.buckets else f"the shortest bucket ({min(b[0] for b in self.buckets)} frames)"
                self.too_short.append((name, f"{len(timeline)} frame(s) at {rate} ({meta.num_frames} decodable), {need} needs more"))
                continue
            v = len(self.videos)
            self.videos.append((i, meta, timeline, fps, shape))
            if self.clip_stride is None and not self.random_clips:
                self.clips.append((v, None if self.random_crop else 0))
            else:
                if self.clip_stride is not None:
                    self.clips += [(v, s) for s in window_starts(len(timeline), shape[0], self.clip_stride)]
                self.clips += [(v, None)] * self.random_clips
        # Per item (clip): the video's dataset index, metadata and output shape.
        self.items: list[int] = [self.videos[v][0] for v, _ in self.clips]
        self.metas: list[VideoMeta] = [self.videos[v][1] for v, _ in self.clips]
        self.shapes: list[Shape] = [self.videos[v][4] for v, _ in self.clips]
        if self.fps_skipped:
            examples = "; ".join(f"{n} ({d})" for n, _, d in self.fps_skipped[:3])
            warnings.warn(f"{type(self).__name__}: {len(self.fps_skipped)} video(s) with an unknown or lower frame rate than "
                          f"target_fps={self.target_fps:g} were left out: {examples}", stacklevel=3)
        if self.kept_low_fps:
            examples = "; ".join(f"{n} ({d})" for n, d in self.kept_low_fps[:3])
            warnings.warn(f"{type(self).__name__}: {len(self.kept_low_fps)} video(s) below target_fps={self.target_fps:g} are used "
                          f"at their own rate (low_fps='keep'): {examples}", stacklevel=3)
        if self.skipped:
            examples = "; ".join(f"{n} ({e})" for n, e in self.skipped[:3])
            warnings.warn(f"{type(self).__name__}: skipped {len(self.skipped)} undecodable video(s): {examples}", stacklevel=3)
        if self.too_short:
            examples = "; ".join(f"{n} ({e})" for n, e in self.too_short[:3])
            warnings.warn(f"{type(self).__name__}: {len(self.too_short)} video(s) shorter than any clip were left out: {examples}", stacklevel=3)
        if self.missing_caption:
            warnings.warn(f"{type(self).__name__}: {len(self.missing_caption)} video file(s) without a caption in captions.jsonl were "
                          f"left out: {', '.join(self.missing_caption[:3])}", stacklevel=3)

    def _shape_for(self, available: int, meta: VideoMeta) -> Shape | None:
        if self.buckets:
            return assign_bucket(available, meta.height, meta.width, self.buckets)
        t = self.num_frames or available
        if t > available:
            return None
        h, w = self.size or (meta.height, meta.width)
        return (t, h, w)

    @property
    def num_skipped(self) -> int:
        """Undecodable videos left out (each also named in ``skipped``)."""
        return len(self.skipped)

    @property
    def num_too_short(self) -> int:
        """Videos shorter than any clip, left out (each also named in ``too_short``)."""
        return len(self.too_short)

    @property
    def dropped(self) -> list[dict[str, str]]:
        """Every file left out: ``{"file", "reason", "detail"}``, reason ``undecodable``,
        ``too short`` or ``missing caption``."""
        out = [{"file": n, "reason": "undecodable", "detail": e} for n, e in self.skipped]
        out += [{"file": n, "reason": "too short", "detail": e} for n, e in self.too_short]
        out += [{"file": n, "reason": "missing caption", "detail": "not listed in captions.jsonl"} for n in self.missing_caption]
        out += [{"file": n, "reason": reason, "detail": d} for n, reason, d in self.fps_skipped]
        return out

    def sample_shapes(self) -> list[Shape]:
        """Output (T, H, W) of every item, for BucketBatchSampler."""
        return list(self.shapes)

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        """Draw the random windows and crops of epoch ``epoch`` (a pure function of seed, epoch
        and item; the trainer calls this, or indexes with ``(item, epoch)``).

        Args:
            epoch: the epoch (>= 0).
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def clip_plan(self, k: int) -> tuple[np.ndarray, Shape]:
        """The source-frame indices and output (T, H, W) of item ``k`` in the current epoch,
        without decoding.

        Args:
            k: item index.
        """
        v, start = self.clips[k]
        _, _, timeline, _, shape = self.videos[v]
        if start is None:
            start = int(np.random.default_rng([self.seed, self.epoch, k, 0]).integers(0, len(timeline) - shape[0] + 1))
        return timeline[start : start + shape[0]], shape

    def _load(self, k: int) -> dict:
        v = self.clips[k][0]
        i, fps = self.videos[v][0], self.videos[v][3]
        indices, (t, h, w) = self.clip_plan(k)
        rng = np.random.default_rng([self.seed, self.epoch, k, 1]) if self.random_crop else None  # spatial crop
        video = to_model_video(self._read(i, indices))  # (C, T, H', W')
        video = resize_crop(video, h, w, rng)  # (C, T, H, W): covers the bucket, crops the remainder
        item = {
            "video": video,
            "caption": self._caption(i),
            "index": i,
            "fps": fps,
            "frame_indices": torch.from_numpy(indices.astype(np.int64)),
            "bucket": torch.tensor([t, h, w], dtype=torch.int64),
        }
        if self.text_cache is not None:
            emb = self.text_cache.lookup([item["caption"]])
            item.update(text_tokens=emb.tokens[0], text_mask=emb.mask[0], text_pooled=emb.pooled[0])
        return item

    def __getitem__(self, k: int | tuple[int, int]) -> dict:
        if isinstance(k, tuple):  # (item, epoch): what the trainer's DataLoader workers receive
            k, epoch = k
            self.set_epoch(epoch)
        if not 0 <= k < len(self.clips):
            raise IndexError(f"index {k} out of range for {len(self.clips)} items")
        try:
            return self._load(k)
        except Exception as exc:  # a file that probed fine but fails later: substitute, count, warn
            self.num_failed_reads += 1
            same = [j for j in range(len(self.clips)) if self.shapes[j] == self.shapes[k] and self.items[j] != self.items[k]]
            warnings.warn(f"{type(self).__name__}: item {k} failed to decode ({type(exc).__name__}: {exc}); using another of the same shape")
            if not same:
                raise
            return self._load(same[k % len(same)])


def read_captions_jsonl(path: str | os.PathLike) -> dict[str, str]:
    """``{"file": "clip.mp4", "caption": "..."}`` per line -> {file: caption}.

    ``video`` or ``path`` are accepted for ``file``, ``text`` for ``caption``.

    Args:
        path: the jsonl file.
    """
    out: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc})") from exc
        name = rec.get("file", rec.get("video", rec.get("path")))
        caption = rec.get("caption", rec.get("text"))
        if not isinstance(name, str) or not isinstance(caption, str):
            raise ValueError(f"{path}:{n}: need string fields 'file' and 'caption', got keys {sorted(rec)}")
        out[name] = caption
    return out


class VideoFolderDataset(ClipDataset):
    """Video files in a folder plus captions, decoded with PyAV.

    Args:
        root: the folder.
        captions: a jsonl file of ``{"file": ..., "caption": ...}`` (relative to ``root`` when
            not absolute; default ``root/captions.jsonl``). Without it every video file under
            ``root`` is used with an empty caption; with it, a video file under ``root`` that it
            does not list is left out and named in ``missing_caption`` (and ``dropped``).
        **kwargs: ClipDataset options (num_frames, size, buckets, frame_stride, ...).
    """

    def __init__(self, root: str | os.PathLike, captions: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root={str(root)!r} is not a directory")
        jsonl = Path(captions) if captions else self.root / "captions.jsonl"
        if captions and not jsonl.is_absolute() and not jsonl.exists():
            jsonl = self.root / jsonl
        if jsonl.exists():
            table = read_captions_jsonl(jsonl)
            self.files = [self.root / f for f in table]
            self.captions = list(table.values())
            listed = {(self.root / f).resolve() for f in table}
            self.missing_caption = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                                          if p.suffix.lower() in VIDEO_EXTENSIONS and p.resolve() not in listed)
        elif captions:
            raise ValueError(f"captions={str(captions)!r} does not exist")
        else:
            self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
            self.captions = [""] * len(self.files)
        self._build()

    def _names(self) -> list[str]:
        return [str(f.relative_to(self.root)) if f.is_relative_to(self.root) else str(f) for f in self.files]

    def _probe(self, i: int) -> VideoMeta:
        return probe_video(self.files[i])

    def _read(self, i: int, indices: np.ndarray) -> np.ndarray:
        return read_video(self.files[i], indices)

    def _caption(self, i: int) -> str:
        return self.captions[i]


def _guess(columns: Sequence[str], wanted: Sequence[str], what: str, given: str | None) -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(f"{what}={given!r} is not a column; columns: {list(columns)}")
        return given
    for name in wanted:
        if name in columns:
            return name
    raise ValueError(f"no {what} found among columns {list(columns)}; pass it explicitly (tried {list(wanted)})")


class HFVideoDataset(ClipDataset):
    """Any Hugging Face dataset with a video or frames column.

    A cell may hold: npz bytes written by this project; a video file's bytes or path (also as
    ``{"bytes", "path"}``, e.g. a ``datasets.Video`` column, read without torchcodec); or frames
    as an array / nested list (T, H, W, 3) or a list of PIL images. A ``video_shape`` column
    ([T, H, W, 3]) avoids decoding every row to learn its shape when the dataset is built.

    Args:
        dataset: a ``datasets.Dataset`` or the path of one saved with ``save_to_disk``.
        video_column: default: the first of video, frames, mp4, clip.
        caption_column: default: the first of caption, text, prompt (else empty captions).
        fps_column: default ``fps`` when present (else 10 for frame columns, the file's rate).
        **kwargs: ClipDataset options.
    """

    def __init__(self, dataset, video_column: str | None = None, caption_column: str | None = None, fps_column: str | None = "fps", **kwargs):
        super().__init__(**kwargs)
        if isinstance(dataset, (str, os.PathLike)):
            dataset = load_video_dataset(dataset)
        cols = dataset.column_names
        self.video_column = _guess(cols, ("video", "frames", "mp4", "clip"), "video_column", video_column)
        try:
            self.caption_column: str | None = _guess(cols, ("caption", "text", "prompt"), "caption_column", caption_column)
        except ValueError:
            if caption_column is not None:
                raise
            self.caption_column = None
        self.fps_column = fps_column if fps_column in cols else None
        feature = dataset.features[self.video_column]
        if isinstance(feature, getattr(hf, "Video", ())):
            dataset = dataset.cast_column(self.video_column, hf.Video(decode=False))  # {bytes, path}
        self.dataset = dataset
        # Whole columns read once: row access would decode every column of the row each time.
        self._videos = dataset.select_columns([self.video_column])
        self._captions = list(dataset[self.caption_column]) if self.caption_column else None
        self._fps_values = [float(x) for x in dataset[self.fps_column]] if self.fps_column else None
        self._stored_shapes = [list(x) for x in dataset["video_shape"]] if "video_shape" in cols else None
        self._build()

    def _names(self) -> list[str]:
        return [f"row {i}" for i in range(len(self.dataset))]

    def _cell(self, i: int):
        return self._videos[i][self.video_column]

    def _fps(self, i: int, default: float) -> float:
        return self._fps_values[i] if self._fps_values is not None else default

    def _frames(self, cell) -> np.ndarray | None:
        """Decode a frames-like cell to uint8 (T, H, W, 3); None when it is a video file."""
        if isinstance(cell, dict):
            cell = cell.get("bytes") or cell.get("path")
        if isinstance(cell, (bytes, bytearray)):
            return decode_video(bytes(cell)) if bytes(cell[:2]) == b"PK" else None
        if isinstance(cell, str):
            return None
        if isinstance(cell, list) and cell and hasattr(cell[0], "convert"):  # PIL images
            return np.stack([np.asarray(im.convert("RGB")) for im in cell])
        frames = np.asarray(cell)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (T, H, W, 3), got shape {frames.shape}")
        return frames.astype(np.uint8) if frames.dtype != np.uint8 else frames

    def _file(self, cell):
        if isinstance(cell, dict):
            return cell.get("bytes") or cell.get("path")
        return cell

    def _probe(self, i: int) -> VideoMeta:
        # Without an fps column, frames (and npz) rows state no rate: 10 fps is a placeholder
        # (fps_known=False), so asking for a frame rate names them instead of guessing.
        stated = self._fps_values is not None
        if self._stored_shapes is not None:
            t, h, w, _ = self._stored_shapes[i]
            return VideoMeta(int(t), int(h), int(w), self._fps(i, 10.0), fps_known=stated)
        cell = self._cell(i)
        frames = self._frames(cell)
        if frames is None:
            meta = probe_video(self._file(cell))
            return VideoMeta(meta.num_frames, meta.height, meta.width, self._fps(i, meta.fps), fps_known=stated or meta.fps_known)
        return VideoMeta(frames.shape[0], frames.shape[1], frames.shape[2], self._fps(i, 10.0), fps_known=stated)

    def _read(self, i: int, indices: np.ndarray) -> np.ndarray:
        cell = self._cell(i)
        frames = self._frames(cell)
        if frames is None:
            return read_video(self._file(cell), indices)
        return frames[indices]

    def _caption(self, i: int) -> str:
        return str(self._captions[i]) if self._captions is not None else ""


class PhysicsVideoDataset(HFVideoDataset):
    """A saved physics-world dataset (``sparse-dit data physics``) for training and evaluation.

    Items are ``dict(video=(C, T, H, W) in [-1, 1], caption, index, fps, frame_indices)``;
    ``states(index)`` returns that row's ground truth as numpy arrays (all frames; select the
    clip with ``item["frame_indices"]``), ``params(index)`` its simulation parameters.

    Args:
        dataset: a saved physics dataset directory or a ``datasets.Dataset``.
        num_frames: frames per clip (default: the whole video).
        random_crop: random temporal crops (default False: clips start at frame 0).
        **kwargs: ClipDataset options.
    """

    def __init__(self, dataset, num_frames: int | None = None, random_crop: bool = False, **kwargs):
        super().__init__(dataset, video_column="video", caption_column="caption", num_frames=num_frames, random_crop=random_crop, **kwargs)
        missing = {"states", "params", "scenario"} - set(self.dataset.column_names)
        if missing:
            where = f"{str(dataset)!r} " if isinstance(dataset, (str, os.PathLike)) else ""
            raise DatasetKindError(
                f"{where}is not a physics dataset (kind: {dataset_kind(self.dataset)}): missing columns {sorted(missing)}. Physics "
                "datasets come from `sparse-dit data physics`; train on other video datasets with data.source=hf")

    def states(self, index: int) -> dict[str, np.ndarray]:
        """Ground-truth states of dataset row ``index`` (position (T, K, 2), velocity (T, K, 2),
        radius (K,), color (K, 3) uint8, visible (T, K) bool).

        Args:
            index: the row index (``item["index"]``).
        """
        return decode_states(self.dataset[int(index)]["states"])

    def params(self, index: int) -> dict:
        """Simulation parameters of row ``index`` (decoded JSON).

        Args:
            index: the row index.
        """
        return json.loads(self.dataset[int(index)]["params"])

    def ground_truth(self, indices: Sequence[int] | None = None) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
        """Stored videos and their states, the input of ``sparse_dit.evals.physics.score``.

        Args:
            indices: row indices (default: every row); videos must share one shape.

        Returns:
            ``(videos uint8 (N, T, H, W, 3), [states of each row])``.
        """
        rows = range(len(self.dataset)) if indices is None else [int(i) for i in indices]
        return np.stack([self.raw_video(i) for i in rows]), [self.states(i) for i in rows]

    def raw_video(self, index: int) -> np.ndarray:
        """The stored uint8 (T, H, W, 3) video of row ``index``.

        Args:
            index: the row index.
        """
        return decode_video(self.dataset[int(index)]["video"])
