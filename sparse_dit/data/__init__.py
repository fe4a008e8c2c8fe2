"""Data: a simulated physics world, video datasets, any-size batching and text encoders.

Physics world (ground truth from pymunk; see ``physics.py`` and docs/data.md)::

    from sparse_dit.data import generate_physics_videos, write_physics_dataset, PhysicsVideoDataset

    rows = generate_physics_videos("collision", "id", num_videos=8, frames=16, height=32, width=32, seed=0)
    rows[0]["video"]            # uint8 (T, H, W, 3)
    rows[0]["states"]           # position (T, K, 2) px, velocity (T, K, 2) px/frame, radius (K,),
                                # color (K, 3) uint8, visible (T, K) bool
    write_physics_dataset("data/phys", "all", "id", 1000, frames=16, height=32, width=32, seed=0)
    ds = PhysicsVideoDataset("data/phys")   # items: video (C, T, H, W) in [-1, 1], caption, index
    ds.states(ds[0]["index"])   # ground truth for evaluation

Colours for detection: ``PALETTE`` (name -> RGB; each ball has its own), ``BACKGROUND`` and
``OCCLUDER_COLOR``; ``ball_masks``/``ball_centroids`` find balls by colour.

Real video: :class:`VideoFolderDataset` (files + captions.jsonl, PyAV) and
:class:`HFVideoDataset` (any HF dataset with a video/frames column). Any-size batching:
:func:`make_buckets` + ``buckets=`` on a dataset + :class:`BucketBatchSampler` (token budget,
rank/world_size/seed/set_epoch sharding). Text: :func:`load_text_encoder` (``"hash"``,
``"minilm"``, or a local HF model directory), :func:`cache_caption_embeddings`,
:class:`CaptionEmbeddingCache`.

Procedural moving squares (no files) live in ``synthetic.py``.
"""

import importlib
from typing import Any

# Public names -> defining submodule. Imported lazily (PEP 562) so that ``import
# sparse_dit.data.synthetic`` or ``sparse_dit.data.physics`` does not pay for HF datasets/PyAV.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["DEFAULT_ASPECT_RATIOS", "BucketBatchSampler", "assign_bucket", "make_buckets", "tokens_per_sample"], "bucketing"),
    **dict.fromkeys(["VIDEO_ENCODING", "decode_states", "decode_video", "encode_video", "load_video_dataset", "write_dataset", "write_physics_dataset"], "hf"),
    **dict.fromkeys(["ClipDataset", "HFVideoDataset", "PhysicsVideoDataset", "VideoFolderDataset", "collate_clips", "read_captions_jsonl"], "loaders"),
    **dict.fromkeys(["GRAVITY", "ID_RANGES", "OOD_RANGES", "SCENARIOS", "SPLITS", "generate_physics_videos", "generate_video", "iter_physics_videos", "simulate"], "physics"),
    **dict.fromkeys(["BACKGROUND", "OCCLUDER_COLOR", "PALETTE", "PALETTE_NAMES", "ball_centroids", "ball_masks", "render_balls"], "render"),
    **dict.fromkeys(["DIRECTIONS", "MovingSquares", "moving_squares"], "synthetic"),
    **dict.fromkeys(["CaptionEmbeddingCache", "HashTextEncoder", "HFTextEncoder", "TextEmbeddings", "TextEncoder", "cache_caption_embeddings", "load_text_encoder", "minilm_path"], "text"),
    **dict.fromkeys(["TruncatedVideoError", "VideoMeta", "clip_indices", "from_model_video", "probe_video", "read_video", "resample_indices", "resize_crop", "stride_for_fps", "to_model_video", "window_starts"], "video"),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparse_dit.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sparse_dit.data.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    # physics world
    "SCENARIOS",
    "SPLITS",
    "ID_RANGES",
    "OOD_RANGES",
    "GRAVITY",
    "generate_video",
    "generate_physics_videos",
    "iter_physics_videos",
    "simulate",
    "write_physics_dataset",
    # rendering and colours
    "PALETTE",
    "PALETTE_NAMES",
    "BACKGROUND",
    "OCCLUDER_COLOR",
    "render_balls",
    "ball_masks",
    "ball_centroids",
    # storage
    "VIDEO_ENCODING",
    "encode_video",
    "decode_video",
    "decode_states",
    "write_dataset",
    "load_video_dataset",
    # torch datasets
    "ClipDataset",
    "PhysicsVideoDataset",
    "VideoFolderDataset",
    "HFVideoDataset",
    "read_captions_jsonl",
    "collate_clips",
    # video utilities
    "VideoMeta",
    "probe_video",
    "TruncatedVideoError",
    "read_video",
    "clip_indices",
    "stride_for_fps",
    "resample_indices",
    "window_starts",
    "resize_crop",
    "to_model_video",
    "from_model_video",
    # bucketing
    "DEFAULT_ASPECT_RATIOS",
    "make_buckets",
    "assign_bucket",
    "tokens_per_sample",
    "BucketBatchSampler",
    # text
    "TextEmbeddings",
    "TextEncoder",
    "HashTextEncoder",
    "HFTextEncoder",
    "minilm_path",
    "load_text_encoder",
    "cache_caption_embeddings",
    "CaptionEmbeddingCache",
    # procedural moving squares (synthetic.py)
    "DIRECTIONS",
    "MovingSquares",
    "moving_squares",
]
