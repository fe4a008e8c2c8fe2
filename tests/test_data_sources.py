"""Data sources are one table (sparse_dit/data/sources.py): every ``data.source`` choice is an
entry, and ``build_dataset`` reaches each one through it (issue 10)."""

from __future__ import annotations

import dataclasses
import json

import datasets
import numpy as np
import pytest
import torch

from sparse_dit.config import ConfigError, DataConfig, ModelConfig, RecipeConfig, TrainConfig
from sparse_dit.data import moving_squares, write_physics_dataset
from sparse_dit.data.sources import DATA_SOURCES, HELD_OUT_SEED_OFFSET
from sparse_dit.recipes.batches import bucket_shapes, build_dataset

av = pytest.importorskip("av")

T, H, W = 4, 16, 16


def _recipe(source: str, path=None, **data) -> RecipeConfig:
    return RecipeConfig(model=ModelConfig(in_channels=3, patch_size=(1, 4, 4), hidden_size=32, depth=1, num_heads=2, text_dim=0),
                        train=TrainConfig(seed=7),
                        data=DataConfig(source=source, path=None if path is None else str(path), num_frames=T, height=H, width=W, **data))


def _write_mp4(path, frames, fps=10):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "0"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _ramp(frames: int) -> np.ndarray:
    """Frame i is uniformly grey at level 16 * i: the decoded level tells the frame index."""
    levels = (16 * np.arange(frames)).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (frames, H, W, 3)).copy()


def _level(video: torch.Tensor) -> np.ndarray:
    return ((video[0, :, H // 2, W // 2] + 1) * 127.5).numpy()


def test_config_choices_are_the_table_keys() -> None:
    # config.py keeps its literal tuple (it must not import the data package); this keeps them equal.
    field = next(f for f in dataclasses.fields(DataConfig) if f.name == "source")
    assert tuple(field.metadata["choices"]) == tuple(DATA_SOURCES)
    for name, entry in DATA_SOURCES.items():
        assert entry.name == name and entry.description
        assert DataConfig(source=name).source == name
    with pytest.raises(ConfigError, match="source"):
        DataConfig(source="webvid")


def test_synthetic_through_the_table() -> None:
    r = _recipe("synthetic", num_videos=5)
    train, held = build_dataset(r), build_dataset(r, held_out=True)
    assert len(train) == 5 and len(held) == 4
    # independent reference: the generator function with the seeds the table documents
    ref, labels, captions = moving_squares(5, T, H, W, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(torch.stack([train[i]["video"] for i in range(5)]), ref, rtol=0, atol=0)
    assert [train[i]["caption"] for i in range(5)] == captions and train[0]["label"] == int(labels[0])
    ref_held, _, _ = moving_squares(4, T, H, W, generator=torch.Generator().manual_seed(7 + HELD_OUT_SEED_OFFSET))
    torch.testing.assert_close(held[0]["video"], ref_held[0], rtol=0, atol=0)
    # no files and no buckets: a token budget does not change the synthetic set
    assert len(build_dataset(_recipe("synthetic", num_videos=5, token_budget=10_000))) == 5


def test_physics_through_the_table(tmp_path) -> None:
    write_physics_dataset(tmp_path / "p", "uniform", "id", 2, frames=6, height=H, width=W, seed=0, fps=5.0, workers=1, progress=False)
    ds = build_dataset(_recipe("physics", tmp_path / "p"))
    assert len(ds) == 2
    stored = datasets.load_from_disk(str(tmp_path / "p"))
    item = ds[1]
    raw = ds.raw_video(1)  # the stored uint8 frames
    assert raw.shape == (6, H, W, 3) and stored[1]["caption"] == item["caption"]
    ref = torch.from_numpy(raw[:T]).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(item["video"], ref, rtol=0, atol=1e-6)
    # with a token budget the training set is bucketed by the recipe's buckets; held-out is not
    r = _recipe("physics", tmp_path / "p", token_budget=4096, bucket_resolutions=(16,), bucket_frame_counts=(4,))
    assert build_dataset(r).buckets == bucket_shapes(r)
    assert build_dataset(r, held_out=True).buckets is None


def test_folder_through_the_table(tmp_path) -> None:
    _write_mp4(tmp_path / "ramp.mp4", _ramp(10))
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "ramp.mp4", "caption": "a grey fade"}))
    train = build_dataset(_recipe("folder", tmp_path))
    assert train.random_crop and len(train) == 1
    held = build_dataset(_recipe("folder", tmp_path), held_out=True)
    item = held[0]  # held-out clips are deterministic: frames 0 .. T-1
    assert not held.random_crop and item["caption"] == "a grey fade" and item["video"].shape == (3, T, H, W)
    assert np.allclose(_level(item["video"]), 16 * np.arange(T), atol=3)


def test_hf_through_the_table(tmp_path) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (6, H, W, 3), dtype=np.uint8) for _ in range(2)]
    datasets.Dataset.from_dict({"frames": [f.tolist() for f in frames], "text": ["one", "two"]}).save_to_disk(str(tmp_path / "hf"))
    held = build_dataset(_recipe("hf", tmp_path / "hf"), held_out=True)
    assert len(held) == 2 and held[1]["caption"] == "two"
    ref = torch.from_numpy(frames[1][:T]).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(held[1]["video"], ref, rtol=0, atol=1e-6)
    assert build_dataset(_recipe("hf", tmp_path / "hf")).random_crop


@pytest.mark.parametrize("source", [n for n, s in DATA_SOURCES.items() if s.needs_path])
def test_sources_with_files_need_a_path(source: str) -> None:
    with pytest.raises(ConfigError, match=rf"data.source='{source}' needs data.path"):
        build_dataset(_recipe(source))
