"""Evals on a user's own videos from the CLI (issue 15): `sparse-dit data folder` -> `eval loss` / `eval compare`.

Real-codec videos (H.264 mp4 through imageio-ffmpeg) go through `sparse-dit data folder`; a tiny
run trained on that data is evaluated end to end. Physics metrics are skipped with a named
reason, PSNR is checked against its definition computed here, and evaluating a run on data
unlike its training data prints one warning line (an error with --strict).
"""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import yaml

from sparse_dit.cli import main
from sparse_dit.config import DataConfig, DiffusionConfig, ModelConfig, RecipeConfig, TrainConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.evals.splits import load_split
from sparse_dit.schema import to_dict

T, H, W, FPS = 5, 16, 16, 8.0


def _videos(folder: Path, n: int = 4) -> None:
    """n mp4 files of a bright square sliding over a gradient (24x24, 10 frames at 8 fps)."""
    folder.mkdir()
    yy, xx = np.mgrid[0:24, 0:24]
    lines = []
    for i in range(n):
        frames = []
        for t in range(10):
            f = np.stack([xx * 8, yy * 8, np.full_like(xx, 40 * i)], axis=-1).astype(np.uint8)
            x0 = (2 + 2 * t + i) % 16
            f[8:14, x0:x0 + 6] = (250, 250, 250)
            frames.append(f)
        imageio.mimwrite(folder / f"clip{i}.mp4", frames, fps=FPS, codec="libx264", macro_block_size=1)
        lines.append(json.dumps({"file": f"clip{i}.mp4", "caption": f"square {i}"}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")


def _run(root: Path, name: str, source: str, path: str | None) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(in_channels=3, patch_size=(1, 4, 4), hidden_size=32, depth=1, num_heads=2, text_dim=0)
    model = SparseDiT(cfg)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    out = root / name
    model.save_pretrained(out / "final")
    recipe = RecipeConfig(model=cfg, diffusion=DiffusionConfig(num_inference_steps=2), train=TrainConfig(max_steps=1, global_batch_size=2),
                          data=DataConfig(source=source, path=path, num_frames=T, height=H, width=W), output_dir=str(out))
    (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe)))
    return out


class StandInI3D(torch.nn.Module):
    """The I3D's call signature; features = per-(channel, frame) means and per-channel stds."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0 if rescale else x.float()
        return torch.cat([x.mean(dim=(3, 4)).flatten(1), x.std(dim=(2, 3, 4))], dim=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("anydata")
    _videos(root / "videos")
    ds = root / "ds"
    assert main(["data", "folder", "--videos", str(root / "videos"), "--out", str(ds), "--frames", "8", "--resolution", f"{H}x{W}",
                 "--workers", "0", "--no-progress"]) == 0
    torch.jit.script(StandInI3D()).save(str(root / "i3d.pt"))
    return root, ds, _run(root, "folder_run", "folder", str(ds)), _run(root, "physics_run", "physics", None)


def test_eval_loss_on_a_folder_dataset(setup, capsys):
    root, ds, run, _ = setup
    assert main(["eval", "loss", str(run), "--data", f"id={ds}", "--num-t", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out.strip().splitlines()[-1])[str(run)]["id"]
    assert res["num_videos"] == 4 and np.isfinite(res["loss"]) and res["loss"] > 0
    assert "warning" not in err  # same source, size and frame rate as training


def test_eval_compare_on_a_folder_dataset(setup, capsys):
    root, ds, run, _ = setup
    out_dir = root / "report"
    rc = main(["eval", "compare", str(run), "--out", str(out_dir), "--data", f"id={ds}", "--latency-repeats", "0", "--samples", "2",
               "--fvd-detector", str(root / "i3d.pt"), "--fvd-frames", str(T), "--json"])
    assert rc == 0
    capsys.readouterr()
    report = json.loads((out_dir / "report.json").read_text())
    m = report["models"]["folder_run"]
    assert np.isfinite(m["val_loss"]) and np.isfinite(m["psnr"]) and -1 <= m["ssim"] <= 1
    assert m["fvd"] is not None and m["fvd"] >= 0  # a Frechet distance on plain video (stand-in detector)
    for name in ("physics", "trajectory_fd"):
        assert "no simulator states" in m["skipped_metrics"][name]
    assert report["splits"]["id"]["source"] == "folder" and not report["splits"]["id"]["has_states"]
    # copy-last-frame's PSNR by its definition, on the split's videos (read back with the loader)
    v = load_split("id", ds, frames=T, height=H, width=W).videos.astype(np.float64)
    copy = np.repeat(v[:, 2:3], T - 3, axis=1)
    mse = ((copy - v[:, 3:]) ** 2).mean(axis=(2, 3, 4))
    expected = float(np.mean(10 * np.log10(255.0**2 / mse)))
    assert report["baselines_by_split"]["id"]["copy_last_frame"]["psnr"] == pytest.approx(expected, rel=1e-9)
    md = (out_dir / "report.md").read_text()
    assert "Skipped metrics" in md and "no simulator states" in md


def test_wrong_data_warns_in_one_line_and_strict_refuses(setup, capsys):
    root, ds, folder_run, physics_run = setup
    assert main(["eval", "loss", str(physics_run), "--data", f"id={ds}", "--num-t", "1", "--json"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "source folder" in err[0] and "physics" in err[0], err
    assert main(["eval", "loss", str(physics_run), "--data", f"id={ds}", "--num-t", "1", "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--strict" in err[0] and "Traceback" not in err[0], err
    # simulated physics for a run trained on video: named, not silent (source; 4 fps vs the clips' 8)
    assert main(["eval", "loss", str(folder_run), "--num-videos", "2", "--fps", "4", "--num-t", "1", "--json"]) == 0
    err = capsys.readouterr().err
    assert "source physics" in err and "frame rate 4 fps vs training's 8 fps" in err, err
    assert main(["eval", "rollout", str(folder_run), "--frames", "2", "--num-videos", "1", "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "source physics" in err[0] and "--strict" in err[0], err
    # and physics metrics on plain video are one line
    assert main(["eval", "physics", "--data", f"id={ds}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no simulator states" in err[0], err


def test_ssim_psnr_agree_with_scikit_image():
    skm = pytest.importorskip("skimage.metrics")  # optional: docs/evals.md records the measured agreement
    from sparse_dit.evals.video_metrics import psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-50, 51, a.shape), 0, 255).astype(np.uint8)
    ref = [skm.structural_similarity(p, q, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
                                     channel_axis=-1) for p, q in zip(a, b)]
    assert np.allclose(ssim(a, b), ref, atol=1e-12)
    assert np.allclose(psnr(a, b), [skm.peak_signal_noise_ratio(p, q, data_range=255) for p, q in zip(a, b)], atol=1e-12)
