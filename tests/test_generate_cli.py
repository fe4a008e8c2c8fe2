"""``sparse-dit generate`` (recipes/generate.py, issue 13): the sampler runs with the recipe's
settings, and every prompting mode runs from the command line on a tiny model built here."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import yaml

from sparse_dit.cli import main as cli_main
from sparse_dit.config import DiffusionConfig, ModelConfig, RecipeConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.recipes import generate as gen_cli
from sparse_dit.schema import to_dict

T, H, W = 4, 8, 8


def _tiny_run(root: Path, **diffusion) -> Path:
    """A run folder: final/ (random weights) + recipe.yaml (synthetic data, T x H x W)."""
    torch.manual_seed(0)
    model = SparseDiT(ModelConfig(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2, text_dim=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial velocity field
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(root / "final")
    recipe = RecipeConfig(model=model.config, diffusion=DiffusionConfig(**diffusion))
    d = to_dict(recipe)
    d["data"].update(source="synthetic", num_frames=T, height=H, width=W, num_videos=8)
    (root / "recipe.yaml").write_text(yaml.safe_dump(d))
    return root


def _record_timesteps(monkeypatch) -> list[float]:
    seen: list[float] = []
    forward = SparseDiT.forward

    def spy(self, x, t, *args, **kwargs):
        seen.append(float(t.flatten()[0]))
        return forward(self, x, t, *args, **kwargs)

    monkeypatch.setattr(SparseDiT, "forward", spy)
    return seen


def _shifted(t: np.ndarray, s: float) -> np.ndarray:
    return s * t / (1 + (s - 1) * t)  # SD3's shift, written out here


def _diffusers_timesteps(n: int, s: float) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n) model-call sigmas: evenly spaced
    from 1 to its shifted sigma_min = shift(1/1000), shifted again."""
    return _shifted(np.linspace(1.0, _shifted(np.float64(1e-3), s), n), s)


def test_generate_samples_at_the_recipes_shift_and_steps(tmp_path, monkeypatch):
    run = _tiny_run(tmp_path / "run", shift=6.0, num_inference_steps=3, sampler="euler")
    seen = _record_timesteps(monkeypatch)
    gen_cli.generate(run, tmp_path / "out.gif", num_samples=1)
    np.testing.assert_allclose(seen, _diffusers_timesteps(3, 6.0), atol=1e-6)
    # a flag overrides the recipe
    seen.clear()
    gen_cli.generate(run, tmp_path / "out2.gif", num_samples=1, shift=1.0, steps=2)
    np.testing.assert_allclose(seen, _diffusers_timesteps(2, 1.0), atol=1e-6)


def test_generate_without_a_fixed_shift_uses_trainings_resolution_shift(tmp_path, monkeypatch):
    run = _tiny_run(tmp_path / "run", shift=None, shift_base_tokens=4, num_inference_steps=2)
    seen = _record_timesteps(monkeypatch)
    gen_cli.generate(run, tmp_path / "out.gif", num_samples=1)
    s = np.sqrt((T * (H // 2) * (W // 2)) / 4)  # tokens of a 4x8x8 clip in 1x2x2 patches over the base
    np.testing.assert_allclose(seen, _diffusers_timesteps(2, s), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Every mode from the command line: a measurable property each
# ---------------------------------------------------------------------------------------------


def _interpolating_oracle(monkeypatch) -> list[int]:
    """Replace the model's velocity by an oracle whose clean estimate of every free frame is the
    linear interpolation in time of the nearest given frames (one side given: copy it). The
    sampler then ends on that estimate, so layouts (which frames are given where) are visible in
    the output. Returns the frame counts the model was called with."""
    calls: list[int] = []

    def oracle(self, x, t, context_mask=None, **kwargs):
        calls.append(x.shape[2])
        x0 = torch.zeros_like(x)
        if context_mask is not None:
            for b in range(x.shape[0]):
                given = torch.nonzero(context_mask[b]).flatten().tolist()
                for j in range(x.shape[2]):
                    left = [g for g in given if g <= j]
                    right = [g for g in given if g >= j]
                    if left and right and left[-1] != right[0]:
                        a, c = left[-1], right[0]
                        w = (j - a) / (c - a)
                        x0[b, :, j] = (1 - w) * x[b, :, a] + w * x[b, :, c]
                    elif left or right:
                        x0[b, :, j] = x[b, :, (left[-1] if left else right[0])]
        return (x - x0) / t.view(-1, 1, 1, 1, 1).clamp_min(1e-6)

    monkeypatch.setattr(SparseDiT, "forward", oracle)
    return calls


def _clip(path: Path, frames: int, seed: int) -> tuple[Path, torch.Tensor]:
    """A GIF whose frames use 8 colours (GIF keeps them exactly) and their [-1, 1] tensor."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, size=(8, 3), dtype=np.uint8)
    idx = rng.integers(0, 8, size=(frames, H, W))
    u8 = palette[idx]
    iio.imwrite(path, u8, extension=".gif", duration=250, loop=0)
    back = iio.imread(path, index=None)[..., :3]
    assert np.array_equal(back, u8)  # the fixture itself is lossless
    return path, torch.from_numpy(u8).float().permute(3, 0, 1, 2) / 127.5 - 1


@pytest.fixture()
def run(tmp_path):
    return _tiny_run(tmp_path / "run", shift=3.0, num_inference_steps=3)


def test_text_and_image_modes_write_mp4_gif_and_a_contact_sheet(run, tmp_path):
    paths = gen_cli.generate(run, tmp_path / "t2v.mp4", mode="text", num_samples=2)
    assert [p.suffix for p in paths] == [".mp4", ".gif", ".png"] and all(p.is_file() for p in paths)
    assert iio.imread(paths[1], index=None).shape[0] == T  # the recipe's frame count
    assert len(iio.improps(paths[0], plugin="pyav").shape) == 4 and iio.improps(paths[0], plugin="pyav").shape[0] == T
    res = gen_cli.generate_videos(run, mode="image", num_samples=3)
    assert tuple(res.videos.shape) == (3, 3, 1, H, W)
    res = gen_cli.generate_videos(run, mode="text", frames=6, num_samples=1)
    assert res.videos.shape[2] == 6


def test_image_to_video_keeps_the_given_first_and_last_frames(run, tmp_path, monkeypatch):
    _interpolating_oracle(monkeypatch)
    _, a = _clip(tmp_path / "a.gif", 1, 0)
    _, b = _clip(tmp_path / "b.gif", 1, 1)
    iio.imwrite(tmp_path / "a.png", ((a[:, 0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy())
    iio.imwrite(tmp_path / "b.png", ((b[:, 0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy())
    v = gen_cli.generate_videos(run, mode="image-to-video", image=str(tmp_path / "a.png"), num_samples=1).videos
    assert v.shape[2] == T
    torch.testing.assert_close(v[0, :, 0], a[:, 0], atol=1e-6, rtol=0)
    v = gen_cli.generate_videos(run, mode="image-to-video", image=str(tmp_path / "a.png"), last_image=str(tmp_path / "b.png"),
                                frames=5, num_samples=1).videos
    assert v.shape[2] == 5
    torch.testing.assert_close(v[0, :, 0], a[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(v[0, :, -1], b[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(v[0, :, 2], (a[:, 0] + b[:, 0]) / 2, atol=1e-4, rtol=0)  # the oracle's midpoint


def test_inputs_are_centre_cropped_and_resized_to_the_model(run, tmp_path):
    wide = np.zeros((2 * H, 4 * W, 3), dtype=np.uint8)
    wide[:, : W] = (255, 0, 0)  # the outer quarters are cropped away: only blue is left
    wide[:, W : 3 * W] = (0, 0, 255)
    wide[:, 3 * W :] = (255, 0, 0)
    iio.imwrite(tmp_path / "wide.png", wide)
    x = gen_cli.read_frames(tmp_path / "wide.png", "--image", H, W)
    assert tuple(x.shape) == (3, 1, H, W)
    blue = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1, 1)
    torch.testing.assert_close(x, blue.expand_as(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_extend_keeps_the_given_frames(run, tmp_path, monkeypatch, direction):
    p, clip = _clip(tmp_path / "c.gif", 3, 2)
    v = gen_cli.generate_videos(run, mode="extend", video=[str(p)], direction=direction, new_frames=2, num_samples=1).videos
    assert v.shape[2] == 5
    kept = v[0, :, :3] if direction == "forward" else v[0, :, 2:]
    torch.testing.assert_close(kept, clip, atol=1e-6, rtol=0)
    # default length: the recipe's T frames in all
    assert gen_cli.generate_videos(run, mode="extend", video=[str(p)], context_frames=1, num_samples=1).videos.shape[2] == T


def test_interpolate_matches_both_endpoints(run, tmp_path, monkeypatch):
    _interpolating_oracle(monkeypatch)
    pa, a = _clip(tmp_path / "a.gif", 2, 3)
    pb, b = _clip(tmp_path / "b.gif", 2, 4)
    v = gen_cli.generate_videos(run, mode="interpolate", video=[str(pa), str(pb)], new_frames=3, num_samples=1).videos
    assert v.shape[2] == 7
    torch.testing.assert_close(v[0, :, :2], a, atol=1e-6, rtol=0)
    torch.testing.assert_close(v[0, :, -2:], b, atol=1e-6, rtol=0)


def test_loop_seam_is_no_larger_than_a_typical_frame_step(run, tmp_path, monkeypatch):
    _interpolating_oracle(monkeypatch)
    # a smooth clip: a bright bar sliding right one pixel per frame
    frames = np.zeros((5, H, W, 3), dtype=np.uint8)
    for i in range(5):
        frames[i, :, i : i + 3] = 255
    iio.imwrite(tmp_path / "bar.gif", frames, extension=".gif", duration=250, loop=0)
    clip = torch.from_numpy(frames).float().permute(3, 0, 1, 2) / 127.5 - 1
    v = gen_cli.generate_videos(run, mode="loop", video=[str(tmp_path / "bar.gif")], new_frames=6, num_samples=1).videos[0]
    assert v.shape[1] == 5 + 6
    torch.testing.assert_close(v[:, :5], clip, atol=1e-6, rtol=0)  # the video, then the transition
    typical = (clip[:, 1:] - clip[:, :-1]).abs().mean().item()
    seam = (v[:, 0] - v[:, -1]).abs().mean().item()  # played on repeat: last frame -> first frame
    assert seam <= typical


def test_sdedit_strength_zero_returns_the_input_and_one_ignores_it(run, tmp_path):
    pa, a = _clip(tmp_path / "a.gif", T, 5)
    pb, _ = _clip(tmp_path / "b.gif", T, 6)
    v0 = gen_cli.generate_videos(run, mode="sdedit", video=[str(pa)], strength=0.0, num_samples=1).videos
    torch.testing.assert_close(v0[0], a, atol=1e-6, rtol=0)
    one = [gen_cli.generate_videos(run, mode="sdedit", video=[str(p)], strength=1.0, num_samples=1).videos for p in (pa, pb)]
    torch.testing.assert_close(one[0], one[1], atol=1e-6, rtol=0)
    half = [gen_cli.generate_videos(run, mode="sdedit", video=[str(p)], strength=0.5, num_samples=1).videos for p in (pa, pb)]
    assert (half[0] - half[1]).abs().max() > 0.1  # in between, the input matters


def test_rollout_length_and_flat_memory(run, tmp_path, monkeypatch):
    calls = _interpolating_oracle(monkeypatch)
    p, clip = _clip(tmp_path / "c.gif", 2, 7)
    v = gen_cli.generate_videos(run, mode="rollout", video=[str(p)], context_frames=2, frames=11, num_samples=1).videos
    assert v.shape[2] == 11  # exactly what was asked: 2 given + 9 made in windows of T (not floored to whole windows)
    torch.testing.assert_close(v[0, :, :2], clip, atol=1e-6, rtol=0)
    short = max(calls)
    calls.clear()
    gen_cli.generate_videos(run, mode="rollout", video=[str(p)], context_frames=2, frames=40, num_samples=1)
    assert max(calls) == short == T  # every model call sees one window, however long the rollout


BAD = [
    (["--mode", "extend", "--video", "missing.mp4"], "--video missing.mp4: no such file"),
    (["--mode", "extend", "--video", "notes.txt"], "unsupported file type '.txt'"),
    (["--mode", "extend", "--video", "broken.mp4"], "--video broken.mp4: cannot be read"),
    (["--mode", "text", "--frames", "0"], "--frames=0"),
    (["--mode", "text", "--height", "7"], "--height=7"),
    (["--mode", "extend", "--video", "c.gif", "--context-frames", "9"], "--context-frames=9"),
    (["--mode", "extend", "--video", "c.gif", "--new-frames", "0"], "--new-frames=0"),
    (["--mode", "sdedit", "--video", "c.gif", "--strength", "1.5"], "--strength=1.5"),
    (["--mode", "interpolate", "--video", "c.gif"], "--video was given 1 times"),
    (["--mode", "image-to-video"], "--image"),
    (["--mode", "rollout", "--video", "c.gif"], "--frames"),
    (["--mode", "loop", "--video", "c.gif", "--frames", "9"], "--frames is for"),
    (["--mode", "text", "--steps", "0"], "--steps=0"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_inputs_are_one_clear_line(run, tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    _clip(tmp_path / "c.gif", 3, 8)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    rc = cli_main(["generate", str(run), "--out", str(tmp_path / "o.mp4"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err


def test_without_video_held_out_clips_are_continued_and_shown_as_ground_truth(run):
    res = gen_cli.generate_videos(run, mode="extend", context_frames=2, num_samples=2)
    assert res.reference is not None and res.videos.shape == res.reference.shape and res.videos.shape[2] == T
    torch.testing.assert_close(res.videos[:, :, :2], res.reference[:, :, :2])  # the clips' first frames given
    res = gen_cli.generate_videos(run, mode="extend", direction="backward", context_frames=2, num_samples=1)
    torch.testing.assert_close(res.videos[:, :, -2:], res.reference[:, :, -2:])  # ... or their last
