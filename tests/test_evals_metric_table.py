"""Quality metrics are one table (evals/metrics.py): every entry runs through it, and
``evaluate_run`` walks the table instead of calling metrics by hand (issue 10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_dit.config import ModelConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.evals import metrics as metric_table
from sparse_dit.evals.compare import Run, evaluate_run, physics_split
from sparse_dit.evals.frechet import trajectory_frechet_distance
from sparse_dit.evals.fvd import frechet_video_distance
from sparse_dit.evals.loss import heldout_loss
from sparse_dit.evals.metrics import DEFAULT_METRICS, METRICS, NEEDS, Metric, MetricInput, select_metrics
from sparse_dit.evals.physics import copy_last_frame_videos

C, T, H, W = 3, 5, 16, 16  # 3 context frames + 2 generated (trajectory features need 2)


class StandInI3D(torch.nn.Module):
    """The I3D's call signature; features = per-(channel, frame) means and per-channel stds."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0 if rescale else x.float()
        return torch.cat([x.mean(dim=(3, 4)).flatten(1), x.std(dim=(2, 3, 4))], dim=1)


@pytest.fixture(scope="module")
def split():
    return physics_split("id", "uniform", "id", 4, T, H, W, seed=5, fps=5.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = SparseDiT(ModelConfig(in_channels=3, patch_size=(1, 4, 4), hidden_size=32, depth=1, num_heads=2, text_dim=0)).eval()
    torch.nn.init.normal_(m.final_layer.linear.weight, std=0.02)  # not the all-zero init
    return m


def test_table_entries_are_well_formed() -> None:
    assert list(METRICS) == ["heldout_loss", "physics", "frames", "trajectory_fd", "fvd", "rollout"]
    assert DEFAULT_METRICS == ("heldout_loss", "physics", "frames", "trajectory_fd")  # FVD is opt-in (no weights here)
    for name, m in METRICS.items():
        assert m.name == name and set(m.needs) <= set(NEEDS) and m.lower_is_better
        assert m.per_split == ("generated" in m.needs)
    assert [m.name for m in select_metrics(["fvd", "physics"])] == ["physics", "fvd"]  # table order
    with pytest.raises(ValueError, match="unknown"):
        select_metrics(["fid"])
    with pytest.raises(ValueError, match="needs"):
        Metric("x", needs=("pixels",), compute=lambda x: {}, lower_is_better={"x": True})


def test_every_entry_through_the_table(split, model) -> None:
    copy = copy_last_frame_videos(split.videos, split.states, 3)  # a prediction with a known error
    x = MetricInput(split, 3, generated=copy, model=model, seed=1, batch_size=2, num_t=3,
                    options={"fvd_detector": StandInI3D(), "fvd_num_frames": T})
    out = {name: m.compute(x) for name, m in METRICS.items()}

    # held-out loss: the loss module on the same videos, seed and grid
    ref = heldout_loss(model, split.model_videos(), context_frames=3, num_t=3, seed=1, batch_size=4)
    assert out["heldout_loss"] == {"val_loss": ref["loss"], "val_loss_per_t": ref["per_t"], "val_loss_t": ref["t"],
                                   "val_loss_per_video": ref["per_video"]}
    assert sum(ref["per_video"]) / len(ref["per_video"]) == pytest.approx(ref["loss"], rel=1e-12)  # what intervals resample
    # physics: a frozen ball's velocity error is the ground-truth speed
    phys = out["physics"]
    assert phys["velocity_error"] == pytest.approx(phys["gt_speed"], rel=1e-6) and phys["detection_rate"] == 1.0
    # frames: PSNR by its definition over generated frames only
    mse = ((copy[:, 3:].astype(np.float64) - split.videos[:, 3:]) ** 2).mean(axis=(2, 3, 4))
    assert out["frames"]["psnr"] == pytest.approx(float(np.mean(10 * np.log10(255.0**2 / mse))), rel=1e-12)
    assert set(out["frames"]) == {"psnr", "ssim", "psnr_per_frame", "ssim_per_frame"}
    # trajectory FD: the frechet module's number, and 0 for the ground truth itself
    assert out["trajectory_fd"]["trajectory_fd"] == trajectory_frechet_distance(copy, split.videos, split.states, context_frames=3)
    gt = MetricInput(split, 3, generated=split.videos)
    assert METRICS["trajectory_fd"].compute(gt)["trajectory_fd"] == pytest.approx(0.0, abs=1e-9)
    # FVD with a stand-in detector: the fvd module's number; 0 for identical sets
    assert out["fvd"]["fvd"] == frechet_video_distance(copy, split.videos, StandInI3D(), num_frames=T)
    assert out["fvd"]["fvd"] > 0
    same = MetricInput(split, 3, generated=split.videos, options={"fvd_detector": StandInI3D(), "fvd_num_frames": T})
    assert METRICS["fvd"].compute(same)["fvd"] == pytest.approx(0.0, abs=1e-9)
    # the headline keys are in every result
    for name, m in METRICS.items():
        assert set(m.lower_is_better) <= set(out[name]), name


def test_fvd_is_skipped_with_a_named_reason(split, tmp_path: Path) -> None:
    fvd = METRICS["fvd"]
    assert "I3D" in fvd.skip_reason(MetricInput(split, 3))
    missing = tmp_path / "i3d_torchscript.pt"
    assert str(missing) in fvd.skip_reason(MetricInput(split, 3, options={"fvd_detector": missing}))
    assert "16" in fvd.skip_reason(MetricInput(split, 3, options={"fvd_detector": StandInI3D()}))  # FVD16 on 5 frames
    assert fvd.skip_reason(MetricInput(split, 3, options={"fvd_detector": StandInI3D(), "fvd_num_frames": T})) is None
    assert all(METRICS[n].skip_reason(MetricInput(split, 3)) is None for n in DEFAULT_METRICS)


def test_evaluate_run_walks_the_table(split, model, monkeypatch) -> None:
    run = Run("tiny", Path("tiny"), model)
    kw = dict(context_frames=3, num_inference_steps=1, seed=0, batch_size=4, num_t=2, latency_repeats=0, log=lambda s: None)
    m, videos = evaluate_run(run, [split], metrics=[*DEFAULT_METRICS, "fvd"], **kw)
    assert "fvd" not in m and "I3D" in m["skipped_metrics"]["fvd"]
    for name in DEFAULT_METRICS:  # each default metric's headline numbers head the entry
        for k in METRICS[name].lower_is_better:
            assert k in m, k
    assert m["detection_rate"] == m["splits"]["id"]["detection_rate"]  # (an untrained model draws no ball: errors NaN)

    # A new metric is one entry: evaluate_run picks it up with no other change.
    seen = []
    extra = Metric("mean_level", needs=("generated",), lower_is_better={"mean_level": True},
                   compute=lambda x: seen.append(x.split.name) or {"mean_level": float(x.generated[:, 3:].mean())})
    monkeypatch.setitem(metric_table.METRICS, "mean_level", extra)
    m2, videos2 = evaluate_run(run, [split], metrics=["mean_level", "fvd"],
                               metric_options={"fvd_detector": StandInI3D(), "fvd_num_frames": T}, **kw)
    assert seen == ["id"] and m2["mean_level"] == float(videos2["id"][:, 3:].mean())
    assert m2["fvd"] == m2["splits"]["id"]["fvd"] and "skipped_metrics" not in m2
    assert "val_loss" not in m2 and "velocity_error" not in m2  # only the metrics asked for ran
    np.testing.assert_array_equal(videos2["id"], videos["id"])  # same noise, same predictions
