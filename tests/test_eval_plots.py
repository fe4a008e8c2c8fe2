"""Report figures and tables a reader can trust (evals/plots.py, evals/report.py): axes read back from the figures."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from sparse_dit.evals.plots import quality_figures, steps_figure, write_sample_gifs
from sparse_dit.evals.report import markdown

FLOPS = {"dense": 3.0282e13, "sparse": 3.0342e13}  # 0.2 % apart: compute-matched


def _model(name: str, **extra) -> dict:
    vel, loss = (0.96, 0.114) if name == "dense" else (0.73, 0.099)
    split = {"velocity_error": vel, "position_error": 1.0, "detection_rate": 0.9, "psnr": 22.0, "ssim": 0.5,
             "trajectory_fd": 12.0, "velocity_error_per_frame": [vel], "ci95": {"velocity_error": [vel - 0.1, vel + 0.2]},
             "trajectory_fd_check": {"samples": 48, "feature_dim": 400, "reliable": False,
                                     "note": "unreliable: 48 samples <= feature dim 400 (singular covariance)"}}
    return {"total_params": 1000, "active_params": 500, "gmacs_per_sample": 0.3154 if name == "dense" else 0.3160,
            "gmacs_per_video": 6.309 if name == "dense" else 6.321, "train_flops": FLOPS[name], "val_loss": loss,
            "latency_ms": 520.0, "latency_runs_ms": [500.0, 520.0, 560.0], "val_loss_t": [0.5], "val_loss_per_t": [loss],
            "ci95": {"velocity_error": [vel - 0.1, vel + 0.2], "val_loss": [loss - 0.01, loss + 0.01]},
            "splits": {"id": split}, **{k: split[k] for k in ("velocity_error", "position_error", "detection_rate",
                                                              "psnr", "ssim", "trajectory_fd", "trajectory_fd_check")},
            **extra}


def _report(**extra) -> dict:
    base = {"copy_last_frame": {"velocity_error": 1.43, "position_error": 4.0, "detection_rate": 1.0, "gt_speed": 1.43},
            "constant_velocity": {"velocity_error": 0.05, "position_error": 0.1, "detection_rate": 1.0, "gt_speed": 1.43}}
    return {"models": {"dense": _model("dense", **extra), "sparse": _model("sparse", **extra)}, "baselines": base,
            "baselines_by_split": {"id": base}, "splits": {"id": {"num_videos": 48, "shape": [8, 24, 24]}},
            "headline_split": "id", "settings": {"context_frames": 3},
            "differences": [{"split": "id", "metric": "velocity_error", "resolved": True,
                             "sentence": "velocity error (id): sparse - dense = -0.23 [-0.4, -0.05] px/frame: resolved."}],
            "intervals": {"videos": "BCa", "min_videos": 10}}


def _points(ax) -> dict:
    """label -> (x, y, (y_low, y_high)) of each errorbar point on ``ax``."""
    out = {}
    for c in ax.containers:
        line, _, bars = c.lines
        x, y = line.get_xdata()[0], line.get_ydata()[0]
        seg = bars[0].get_segments()[0] if bars else None
        out[c.get_label()] = (x, y, (seg[0][1], seg[1][1]) if seg is not None else None)
    return out


def test_training_compute_axes_are_pflops_from_zero_and_say_matched():
    figs = quality_figures(_report())
    try:
        for ax, key in zip(figs["quality_vs_train_flops.png"].axes, ("velocity_error", "val_loss")):
            assert ax.get_xlabel() == "training PFLOPs"
            pts = _points(ax)
            for name in ("dense", "sparse"):
                assert pts[name][0] == pytest.approx(FLOPS[name] / 1e15, rel=1e-12)  # FLOPs / 1e15, both panels
            assert ax.get_xlim()[0] == 0.0 and ax.get_xlim()[1] >= max(FLOPS.values()) / 1e15
            assert any("matched within 0.2%" in t.get_text() for t in ax.texts)
        # error bars are the report's 95 % intervals
        pts = _points(figs["quality_vs_train_flops.png"].axes[0])
        assert pts["dense"][2] == pytest.approx((0.86, 1.16))
        inf = figs["quality_vs_inference.png"].axes[0]
        assert inf.get_xlabel() == "inference GMACs per video" and inf.get_xlim()[0] == 0.0
        assert any(t.get_text().startswith("matched within 0.19") for t in inf.texts)
    finally:
        for f in figs.values():
            plt.close(f)


def test_costs_far_apart_are_not_called_matched():
    r = _report()
    r["models"]["sparse"]["gmacs_per_video"] = 12.0
    figs = quality_figures(r)
    try:
        assert not any("matched" in t.get_text() for t in figs["quality_vs_inference.png"].axes[0].texts)
    finally:
        for f in figs.values():
            plt.close(f)


def test_steps_sweep_is_a_curve_over_steps():
    sweep = [{"steps": n, "velocity_error": 1.0 / n, "psnr": 20 + n, "ci95": {"velocity_error": [0.5 / n, 1.5 / n]}}
             for n in (2, 4, 8)]
    figs = quality_figures(_report(steps_sweep=sweep))
    try:
        ax = figs["quality_vs_steps.png"].axes[0]
        line = ax.containers[0].lines[0]
        assert list(line.get_xdata()) == [2, 4, 8] and list(line.get_ydata()) == pytest.approx([0.5, 0.25, 0.125])
        assert ax.get_xlabel().startswith("sampler steps")
        assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "8"]
    finally:
        for f in figs.values():
            plt.close(f)
    assert steps_figure(_report()) is None  # no sweep, no figure


def test_markdown_prints_intervals_flags_and_verdicts():
    md = markdown(_report())
    assert "0.960 [0.860, 1.160]" in md  # value [low, high]
    assert "unreliable: 48 samples <= feature dim 400" in md and "| 12.0" not in md  # no number for an unreliable FD
    assert "## Which differences are resolved" in md and "resolved." in md
    assert "GMACs per sample matched within 0.19 %" in md


def test_sample_gif_columns_are_labelled(tmp_path):
    rng = np.random.default_rng(0)
    vids = {"id": {"ground_truth": rng.integers(0, 255, (2, 4, 8, 8, 3), dtype=np.uint8),
                   "dense": rng.integers(0, 255, (2, 4, 8, 8, 3), dtype=np.uint8)}}
    (path,) = write_sample_gifs(vids, tmp_path, num_samples=2, context_frames=2, scale=4)
    im = Image.open(path)
    frame = np.asarray(im.convert("RGB"))
    grid_h = 2 * 8 * 4 + 8  # two rows of 32 px and a gap
    assert frame.shape[0] > grid_h + 20  # a header and a footer around the grid
    header = frame[:12]
    for col in range(2):  # dark text above each 32-px column
        assert (header[:, col * 40 : col * 40 + 32].min(axis=-1) < 100).any()
    assert "ground_truth, dense" in (tmp_path / "samples_id.txt").read_text()
