"""The benchmark scripts that cannot be rerun at will keep working: the GPU suite (GPU time is
lent for minutes, so its CPU smoke mode guards it) and the VAE's training-clip maker (its
clips must stay disjoint from the held-out codec set)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.timeout(240)
def test_gpu_suite_smoke_runs_on_cpu_and_writes_its_report(tmp_path):
    out = tmp_path / "gs"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(out), "--device", "cpu", "--smoke",
                           "--sections", "correctness", "train_step", "layer_speed"],
                          capture_output=True, text=True, timeout=220, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "gpu_suite.json").read_text())
    secs = res["sections"]
    assert {k: v["status"] for k, v in secs.items()} == {"meta": "ok", "correctness": "ok", "train_step": "ok", "layer_speed": "ok"}
    assert secs["correctness"]["all_pass"] and len(secs["correctness"]["items"]) == 12  # 3 CPU backends x 2 dtypes x 2 activations
    assert secs["train_step"]["pass"] and secs["train_step"]["first_loss_rel_spread"] == 0.0
    shapes = {i["shape"]: i for i in secs["layer_speed"]["items"]}
    assert set(shapes) == {"A", "C"} and all(i["ratio_to_dense"]["dense"] == 1.0 for i in shapes.values())
    md = (out / "gpu_suite.md").read_text()
    assert "## correctness: ok" in md and "| backend |" in md


def test_gpu_suite_refuses_cuda_without_a_gpu_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--device cpu --smoke" in proc.stderr


def test_vae_training_clips_are_disjoint_from_the_held_out_codec_set(tmp_path):
    import numpy as np

    import vae as vb
    from sparse_dit.data.video import read_video

    held = {s.partition("=")[0] for s in vb.CODEC_SOURCES}
    train = {s.partition("=")[0] for s in vb.TRAIN_CODEC_SOURCES}
    assert not ({"testsrc2", "mandelbrot"} & train)  # deterministic sources: any window would repeat held-out content
    assert not (set(vb.TRAIN_RULES) & {30, 90, 110, 150})  # the held-out automaton rules
    assert "zoneplate" in train - held
    paths = vb.make_train_clips(tmp_path, 5, 3, 16, seed=1)
    assert [p.name.split("_", 2)[2] for p in paths] == [f"{n}.mp4" for n in ("life", "cellauto", "gradients", "sierpinski", "zoneplate")]
    clip = read_video(paths[0])
    assert clip.shape == (3, 16, 16, 3) and clip.dtype == np.uint8
    # the seeds drawn for training start at 10000; the held-out set draws below 10000
    src = (REPO / "benchmarks" / "vae.py").read_text()
    assert re.search(r"rng\.integers\(1, 10_000\)", src) and re.search(r"rng\.integers\(10_000, 1_000_000\)", src)


@pytest.mark.timeout(180)
def test_moe_inference_across_processes_reports_each_and_their_median():
    """``--processes N``: N fresh processes per size, each process's ratio printed, then their
    median and range, recomputed here from the printed per-process ratios; with
    ``--compare-native`` and ``--compare-expert-threads`` the same for the sparse model on the
    Python path, with and without expert threads."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "moe_inference.py"), "--tiny", "--processes", "3",
                           "--sizes", "quickstart", "--threads", "1", "--compare-native", "--compare-expert-threads"],
                          capture_output=True, text=True, timeout=170, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for runner in ("sparse", "sparse-python", "sparse-intra"):
        each = [float(m) for m in re.findall(rf"quickstart process \d: {re.escape(runner)} / dense: ([0-9.]+)", proc.stdout)]
        assert len(each) == 3, proc.stdout
        summary = re.search(rf"quickstart: {re.escape(runner)} / dense[^\n]* over 3 processes: median ([0-9.]+), range "
                            rf"\[([0-9.]+), ([0-9.]+)\]", proc.stdout)
        assert summary, proc.stdout
        med, lo, hi = map(float, summary.groups())
        assert med == pytest.approx(sorted(each)[1], abs=1e-3)
        assert (lo, hi) == (pytest.approx(min(each), abs=1e-3), pytest.approx(max(each), abs=1e-3))


def test_vae_quality_reconstructs_through_refined_latents():
    """``benchmarks/vae.py quality --refine-steps N`` scores decode(encode(x, refine_steps=N)):
    its ``reconstruct`` equals that, computed here clip by clip; 0 steps is the plain encoding."""
    import torch

    import vae as vb
    from sparse_dit.vae import CausalVideoVAE, VAEConfig

    torch.manual_seed(0)
    model = CausalVideoVAE(VAEConfig(latent_channels=4, base_channels=8, channel_mult=(1, 2), temporal_down=1)).eval()
    x = torch.rand(3, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        plain = torch.cat([model.decode(model.encode(x[i:i + 1])).clamp(-1, 1) for i in range(3)])
        refined = torch.cat([model.decode(model.encode(x[i:i + 1], refine_steps=3)).clamp(-1, 1) for i in range(3)])
    torch.testing.assert_close(vb.reconstruct(model, x, batch=1), plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(vb.reconstruct(model, x, batch=1, refine_steps=3), refined, atol=1e-6, rtol=0)
    assert (refined - plain).abs().max() > 1e-4
