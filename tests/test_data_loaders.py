"""Datasets on disk and loaders: round trip, corrupt files, crops/subsampling, HF columns, CLI."""

import json
import warnings

import datasets
import numpy as np
import pytest
import torch

from sparse_dit.cli import main as cli_main
from sparse_dit.data import (
    BucketBatchSampler,
    HFVideoDataset,
    PhysicsVideoDataset,
    VideoFolderDataset,
    collate_clips,
    decode_states,
    decode_video,
    generate_physics_videos,
    make_buckets,
    write_physics_dataset,
)

av = pytest.importorskip("av")


def write_mp4(path, frames, fps):
    """Encode uint8 (T, H, W, 3) frames with PyAV (H.264, near-lossless)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "0"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def ramp_video(num_frames, height, width):
    """Frame i is uniformly grey at level 8 * i: the decoded level tells the frame index."""
    levels = (8 * np.arange(num_frames)).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3)).copy()


def test_cli_dataset_round_trip(tmp_path, capsys):
    out = tmp_path / "phys"
    rc = cli_main(["data", "physics", "--scenario", "collision,occlusion", "--split", "ood", "--num-videos", "6", "--frames", "8",
                   "--resolution", "24x32", "--seed", "9", "--out", str(out), "--workers", "2", "--no-progress"])
    assert rc == 0
    assert "bytes per video" in capsys.readouterr().out
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == 6
    assert set(ds.column_names) >= {"video", "caption", "scenario", "states", "params", "fps"}
    rows = generate_physics_videos("collision,occlusion", "ood", 6, frames=8, height=24, width=32, seed=9, workers=1)
    for stored, row in zip(ds, rows):
        video = decode_video(stored["video"])
        assert video.dtype == np.uint8 and video.shape == (8, 24, 32, 3)
        assert np.array_equal(video, row["video"])  # lossless
        states = decode_states(stored["states"])
        for key, value in row["states"].items():
            assert states[key].dtype == value.dtype and np.array_equal(states[key], value)
        assert stored["caption"] == row["caption"] and stored["scenario"] == row["scenario"]
        assert json.loads(stored["params"]) == json.loads(row["params"])
        assert stored["fps"] == 10.0


def test_physics_torch_dataset(tmp_path):
    write_physics_dataset(tmp_path / "p", "parabola", "id", 3, frames=10, height=16, width=24, seed=0, workers=1, progress=False)
    ds = PhysicsVideoDataset(tmp_path / "p", num_frames=6, random_crop=True, seed=1)
    assert len(ds) == 3 and ds.sample_shapes() == [(6, 16, 24)] * 3
    item = ds[1]
    assert item["video"].shape == (3, 6, 16, 24) and item["video"].dtype == torch.float32
    raw = ds.raw_video(item["index"])[item["frame_indices"].numpy()]
    expected = torch.from_numpy(raw).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    assert torch.allclose(item["video"], expected, atol=1e-6)
    assert item["video"].min() >= -1.0 and item["video"].max() <= 1.0
    idx = item["frame_indices"].numpy()
    assert np.array_equal(np.diff(idx), np.ones(5)) and 0 <= idx[0] <= 4
    states = ds.states(item["index"])
    assert states["position"].shape == (10, 1, 2) and ds.params(item["index"])["scenario"] == "parabola"
    videos, all_states = ds.ground_truth()
    assert videos.shape == (3, 10, 16, 24, 3) and videos.dtype == np.uint8 and len(all_states) == 3
    assert np.array_equal(all_states[1]["position"], states["position"]) and np.array_equal(videos[1], ds.raw_video(1))
    assert isinstance(item["caption"], str) and "ball" in item["caption"]
    items = [ds[0], ds[2]]
    ours, reference = collate_clips(items), torch.utils.data.default_collate(items)
    assert ours.keys() == reference.keys() and ours["caption"] == reference["caption"]
    for key in ("video", "index", "fps", "frame_indices"):
        assert ours[key].dtype == reference[key].dtype and torch.equal(ours[key], reference[key])


def test_corrupt_video_is_skipped_and_counted(tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_mp4(folder / "good.mp4", ramp_video(12, 16, 24), fps=12)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    lines = [{"file": "good.mp4", "caption": "a grey fade"}, {"file": "broken.mp4", "caption": "never decodes"}]
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    with pytest.warns(UserWarning, match="skipped 1 undecodable"):
        ds = VideoFolderDataset(folder, num_frames=8, random_crop=False)
    assert len(ds) == 1 and ds.num_skipped == 1 and ds.skipped[0][0] == "broken.mp4"
    item = ds[0]
    assert item["caption"] == "a grey fade" and item["video"].shape == (3, 8, 16, 24)

    # The folder command reports the skip too, and writes only the good video.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = cli_main(["data", "folder", "--videos", str(folder), "--out", str(tmp_path / "ds"), "--workers", "1", "--no-progress"])
    assert rc == 0
    assert "skipped 1 undecodable" in capsys.readouterr().out
    out = datasets.load_from_disk(str(tmp_path / "ds"))
    assert len(out) == 1 and out[0]["source"] == "good.mp4" and out[0]["video_shape"] == [12, 16, 24, 3]


def test_temporal_crops_and_frame_rate_subsampling(tmp_path):
    write_mp4(tmp_path / "ramp.mp4", ramp_video(30, 16, 16), fps=20)
    ds = VideoFolderDataset(tmp_path, num_frames=5, target_fps=10, random_crop=True, seed=0)
    assert ds.metas[0].num_frames == 30 and ds.metas[0].fps == 20
    starts = set()
    for epoch in range(8):  # random windows: seeded per (seed, epoch, item), new each epoch
        ds.set_epoch(epoch)
        item = ds[0]
        assert torch.equal(ds[0]["frame_indices"], item["frame_indices"])  # reproducible within an epoch
        idx = item["frame_indices"].numpy()
        assert np.array_equal(np.diff(idx), [2, 2, 2, 2]) and idx[-1] <= 29
        assert item["fps"] == 10.0
        level = (item["video"][0, :, 8, 8].numpy() + 1.0) * 127.5  # decoded grey level per frame
        assert np.allclose(level, 8 * idx, atol=3)  # the decoded frames are the indexed ones
        starts.add(int(idx[0]))
    assert len(starts) > 1  # random temporal crops
    fixed = VideoFolderDataset(tmp_path, num_frames=5, frame_stride=3, random_crop=False)
    assert fixed[0]["frame_indices"].tolist() == [0, 3, 6, 9, 12]
    with pytest.warns(UserWarning, match="shorter than any clip"):
        assert len(VideoFolderDataset(tmp_path, num_frames=16, frame_stride=2, random_crop=False)) == 0


def test_hf_dataset_with_frames_or_file_column(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (n, 12, 20, 3), dtype=np.uint8) for n in (6, 9)]
    ds = datasets.Dataset.from_dict({"frames": [f.tolist() for f in frames], "text": ["one", "two"]})
    loader = HFVideoDataset(ds, num_frames=4, random_crop=False)
    assert loader.video_column == "frames" and loader.caption_column == "text"
    item = loader[1]
    assert item["caption"] == "two"
    assert torch.allclose(item["video"], torch.from_numpy(frames[1][:4]).permute(3, 0, 1, 2).float() / 127.5 - 1, atol=1e-6)

    write_mp4(tmp_path / "a.mp4", ramp_video(10, 16, 16), fps=10)
    files = datasets.Dataset.from_dict({"video": [(tmp_path / "a.mp4").read_bytes(), b"not a video"], "caption": ["ramp", "bad"]})
    with pytest.warns(UserWarning, match="skipped 1"):
        loader = HFVideoDataset(files, num_frames=4, frame_stride=2, random_crop=False)
    assert len(loader) == 1 and loader.num_skipped == 1
    level = (loader[0]["video"][0, :, 8, 8].numpy() + 1) * 127.5
    assert np.allclose(level, [0, 16, 32, 48], atol=3)

    # A datasets.Video column (paths) is read with PyAV, without torchcodec.
    typed = datasets.Dataset.from_dict({"video": [str(tmp_path / "a.mp4")], "caption": ["ramp"]}).cast_column("video", datasets.Video())
    level = (HFVideoDataset(typed, num_frames=3, frame_stride=3, random_crop=False)[0]["video"][0, :, 8, 8].numpy() + 1) * 127.5
    assert np.allclose(level, [0, 24, 48], atol=3)


def test_buckets_on_real_videos_give_uniform_batches(tmp_path):
    write_mp4(tmp_path / "wide.mp4", ramp_video(12, 18, 32), fps=10)
    write_mp4(tmp_path / "tall.mp4", ramp_video(12, 32, 18), fps=10)
    write_mp4(tmp_path / "square.mp4", ramp_video(6, 24, 24), fps=10)
    buckets = make_buckets(resolutions=(16,), frame_counts=(4, 8), multiple=4)
    ds = VideoFolderDataset(tmp_path, buckets=buckets, random_crop=True)
    shapes = dict(zip([f.name for f in ds.files], ds.sample_shapes()))
    assert shapes["wide.mp4"][1] < shapes["wide.mp4"][2] and shapes["tall.mp4"][1] > shapes["tall.mp4"][2]
    assert shapes["square.mp4"] == (4, 16, 16) and shapes["wide.mp4"][0] == 8
    sampler = BucketBatchSampler(ds.sample_shapes(), token_budget=8 * 12 * 12, patch_size=(1, 2, 2))
    seen = 0
    for batch in torch.utils.data.DataLoader(ds, batch_sampler=sampler):
        video = batch["video"]  # (B, C, T, H, W): one shape per batch
        for index in batch["index"].tolist():
            assert tuple(video.shape[2:]) == ds.sample_shapes()[ds.items.index(index)]
        seen += video.shape[0]
    assert seen == 3
