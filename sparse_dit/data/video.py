"""Video decoding (PyAV) and clip utilities: temporal crops, frame-rate subsampling, resizing.

These functions sit at the I/O edge: they read uint8 (T, H, W, 3) frames and hand the datasets
float (C, T, H, W) clips in [-1, 1] (the project's tensor convention).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = [
    "VIDEO_EXTENSIONS",
    "TruncatedVideoError",
    "VideoMeta",
    "probe_video",
    "read_video",
    "stride_for_fps",
    "resample_indices",
    "window_starts",
    "clip_indices",
    "to_model_video",
    "from_model_video",
    "resize_crop",
]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif", ".mpg", ".mpeg")


@dataclass(frozen=True)
class VideoMeta:
    """What a clip sampler needs to know about a video before decoding it."""

    num_frames: int
    height: int
    width: int
    fps: float
    # False when the file (or dataset row) states no frame rate: ``fps`` is then a placeholder
    # (25, what decoding maps timestamps with) and a clip at a stated rate cannot be made from it.
    fps_known: bool = True


def _open(source):
    import av  # deferred: PyAV loads the FFmpeg libraries, needed only to decode video files

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    return av.open(source if not isinstance(source, os.PathLike) else os.fspath(source))


def _fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


class TruncatedVideoError(ValueError):
    """A video holds fewer frames than its container declares (a cut download, a killed encoder)."""


def probe_video(source: str | os.PathLike | bytes) -> VideoMeta:
    """Read a video's frame count, size and frame rate; decode its first frame to be sure.

    The frame count is what the file holds: when the container declares a count, the packets are
    counted too (demuxed, not decoded), and a file holding fewer is refused, never padded.

    Raises whatever PyAV raises (``av.error.FFmpegError`` is a ValueError), ValueError when the
    file holds no decodable video stream, :class:`TruncatedVideoError` for a truncated file.

    Args:
        source: a path or the file's bytes.
    """
    with _open(source) as container:
        if not container.streams.video:
            raise ValueError(f"{source if not isinstance(source, bytes) else '<bytes>'}: no video stream")
        stream = container.streams.video[0]
        fps = _fps(stream)
        first = next(container.decode(stream), None)
        if first is None:
            raise ValueError("no decodable frame")
        declared = int(stream.frames or 0)
        count = declared
        if count <= 0 and stream.duration and fps:
            count = int(round(float(stream.duration * stream.time_base) * fps))
        elif count > 0 or not (stream.duration and fps):  # demux and count packets (no decoding)
            container.seek(0)
            count = sum(1 for packet in container.demux(stream) if packet.size)
            if declared and count < declared:  # PyAV decodes what is there without an error (PITFALLS)
                raise TruncatedVideoError(f"truncated: {count} of the {declared} frames it declares are in the file")
        return VideoMeta(num_frames=max(count, 1), height=first.height, width=first.width, fps=fps or 25.0, fps_known=bool(fps))


def read_video(source: str | os.PathLike | bytes, indices: Sequence[int] | None = None) -> np.ndarray:
    """Decode frames (by index, in presentation order) to uint8 (len(indices), H, W, 3).

    Seeks to the keyframe before the first wanted frame, so crops late in long files are cheap.
    Frame indices come from timestamps (``round(pts * time_base * fps)``); in variable-frame-
    rate files a missing index repeats the previous decoded frame; frames past the last decodable
    one raise :class:`TruncatedVideoError` (never padded).

    Args:
        source: a path or the file's bytes.
        indices: frame indices to return (default: all frames).
    """
    with _open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = _fps(stream) or 25.0
        start_pts = stream.start_time or 0
        wanted = sorted(set(int(i) for i in indices)) if indices is not None else None
        if wanted and wanted[0] > 0 and stream.time_base:
            container.seek(start_pts + int(wanted[0] / fps / stream.time_base), stream=stream, backward=True)
        frames: dict[int, np.ndarray] = {}
        counter = last_decoded = 0
        for frame in container.decode(stream):
            if frame.pts is not None and stream.time_base:
                idx = int(round(float((frame.pts - start_pts) * stream.time_base) * fps))
            else:
                idx = counter
            counter = idx + 1
            last_decoded = idx
            if wanted is not None and idx > wanted[-1]:
                break
            if wanted is None or idx in wanted:
                frames[idx] = frame.to_ndarray(format="rgb24")
    if not frames:
        raise ValueError("no frame decoded")
    if wanted is not None and wanted[-1] > last_decoded:  # never pad a cut file with its last frame
        raise TruncatedVideoError(f"truncated: frame {wanted[-1]} wanted, the last decodable one is {last_decoded}")
    if wanted is None:
        return np.stack([frames[k] for k in sorted(frames)])
    out, last = [], None
    for i in wanted:
        last = frames.get(i, last)
        if last is None:  # wanted frames before the first decoded one: take the first decoded
            last = frames[min(frames)]
        out.append(last)
    by_index = dict(zip(wanted, out))
    return np.stack([by_index[int(i)] for i in indices])


def stride_for_fps(source_fps: float, target_fps: float | None) -> int:
    """Frame stride that brings ``source_fps`` closest to ``target_fps`` (at least 1).

    Args:
        source_fps: the video's frame rate.
        target_fps: the wanted frame rate (None: keep every frame).
    """
    if target_fps is None:
        return 1
    if not target_fps > 0:
        raise ValueError(f"target_fps must be > 0, got {target_fps}")
    return max(1, int(round(source_fps / target_fps)))


def resample_indices(num_frames: int, source_fps: float, target_fps: float) -> np.ndarray:
    """Source-frame indices of a video resampled from ``source_fps`` to ``target_fps`` by frame
    selection: output frame j (at time j / target_fps) is the source frame on screen then,
    ``floor(j * source_fps / target_fps)``, for every j whose frame the video holds.

    Rates within 1% of each other count as equal (every frame kept, never a repeated one).

    Args:
        num_frames: frames in the source.
        source_fps: the source's frame rate.
        target_fps: the wanted rate, at most ``source_fps`` (x 1.01).

    Raises:
        ValueError: a rate <= 0, or a target clearly above the source's rate (frames would repeat).
    """
    if not (source_fps > 0 and target_fps > 0):
        raise ValueError(f"frame rates must be > 0, got source {source_fps}, target {target_fps}")
    if target_fps > source_fps * 1.01:
        raise ValueError(f"cannot resample {source_fps:g} fps up to {target_fps:g} fps by frame selection (frames would repeat)")
    ratio = max(1.0, source_fps / target_fps)
    count = int(np.floor((num_frames - 1) / ratio + 1e-6)) + 1 if num_frames > 0 else 0
    return np.floor(np.arange(count) * ratio + 1e-6).astype(np.int64)


def window_starts(length: int, num_frames: int, stride: int) -> list[int]:
    """Starts of the strided windows of ``num_frames`` frames over a timeline of ``length``
    frames: 0, stride, 2 * stride, ... while the window fits (none when it never fits).

    Args:
        length: frames in the timeline (after frame-rate resampling).
        num_frames: frames per window.
        stride: frames between consecutive starts (>= 1).
    """
    if stride < 1 or num_frames < 1:
        raise ValueError(f"stride and num_frames must be >= 1, got {stride} and {num_frames}")
    return list(range(0, length - num_frames + 1, stride))


def clip_indices(num_available: int, num_frames: int | None, stride: int, rng: np.random.Generator | None) -> np.ndarray:
    """Source-frame indices of a temporal crop: ``num_frames`` frames, ``stride`` apart.

    Args:
        num_available: frames in the source.
        num_frames: frames wanted (None: as many as fit).
        stride: step between frames (frame-rate subsampling).
        rng: picks a random start; None starts at frame 0.

    Raises:
        ValueError: the source is too short.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if num_frames is None:
        num_frames = (num_available - 1) // stride + 1
    span = (num_frames - 1) * stride + 1
    if num_frames < 1 or span > num_available:
        raise ValueError(f"a clip of {num_frames} frames at stride {stride} needs {span} frames, the video has {num_available}")
    start = int(rng.integers(0, num_available - span + 1)) if rng is not None else 0
    return start + stride * np.arange(num_frames)


def to_model_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (C, T, H, W) in [-1, 1].

    Args:
        frames: uint8 frames.
    """
    # NumPy, single-threaded: in DataLoader workers torch's intra-op threads would fight the
    # trainer for cores (measured 25x slower on a loaded 2-core machine).
    video = np.asarray(frames, dtype=np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(rearrange(video, "t h w c -> c t h w")))


def from_model_video(video: torch.Tensor) -> np.ndarray:
    """float (C, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3) (clamped, rounded).

    Args:
        video: one video tensor.
    """
    video = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return rearrange(video, "c t h w -> t h w c").cpu().numpy()


def resize_crop(video: torch.Tensor, height: int, width: int, rng: np.random.Generator | None = None) -> torch.Tensor:
    """Resize (antialiased bilinear) so the video covers (height, width), then crop to it.

    Args:
        video: float (C, T, H, W).
        height: target height.
        width: target width.
        rng: random crop offset; None crops the centre.
    """
    _, _, h, w = video.shape
    if (h, w) == (height, width):
        return video
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = rearrange(video, "c t h w -> t c h w")
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        video = rearrange(frames, "t c h w -> c t h w")
    top = int(rng.integers(0, new_h - height + 1)) if rng is not None else (new_h - height) // 2
    left = int(rng.integers(0, new_w - width + 1)) if rng is not None else (new_w - width) // 2
    return video[:, :, top : top + height, left : left + width].contiguous()
