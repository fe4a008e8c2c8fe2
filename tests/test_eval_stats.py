"""Intervals and verdicts of eval reports (evals/stats.py, evals/stats_report.py): analytic references and simulations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from sparse_dit.config import DataConfig, DiffusionConfig, ModelConfig, RecipeConfig, TrainConfig
from sparse_dit.data import generate_physics_videos
from sparse_dit.dit import SparseDiT
from sparse_dit.evals.compare import EvalSplit, compare
from sparse_dit.evals.frechet import trajectory_frechet_from_features
from sparse_dit.evals.physics import baseline_videos, score
from sparse_dit.evals.stats import bootstrap_interval, frechet_reliability, resolved, t_interval, verdict, welch_interval
from sparse_dit.evals.stats_report import (VIDEO_STATS, _Features, batched_trajectory_fd, paired_difference,
                                           per_video_values)
from sparse_dit.evals.tracking import track_videos
from sparse_dit.evals.video_metrics import frame_metrics
from sparse_dit.schema import to_dict


def test_t_interval_matches_a_hand_computation():
    # x = 2, 4, 6, 8: mean 5, sample sd sqrt(20/3), se = sd / 2; t(0.975, 3 dof) = 3.182 (a t table)
    mean, low, high = t_interval([2.0, 4.0, 6.0, 8.0])
    half = 3.182446 * math.sqrt(20 / 3) / 2
    assert mean == 5.0
    assert low == pytest.approx(5 - half, rel=1e-5) and high == pytest.approx(5 + half, rel=1e-5)
    assert math.isnan(t_interval([3.0])[1])  # one seed: no interval


def test_welch_interval_matches_a_hand_computation():
    # a = 1, 2, 3; b = 4, 5, 6: difference 3, se^2 = 1/3 + 1/3, Welch dof = 4, t(0.975, 4) = 2.776
    d, low, high = welch_interval([1, 2, 3], [4, 5, 6])
    half = 2.776445 * math.sqrt(2 / 3)
    assert d == 3.0 and low == pytest.approx(3 - half, rel=1e-5) and high == pytest.approx(3 + half, rel=1e-5)


def test_bootstrap_covers_the_true_mean_95_percent_of_the_time():
    # Coverage on a skewed population (exponential, mean 1) with a fixed seed: 200 samples of 40.
    rng = np.random.default_rng(123)
    hits = 0
    trials = 200
    for k in range(trials):
        x = rng.exponential(1.0, 40)
        low, high = bootstrap_interval(lambda idx: x[idx].mean(axis=-1), 40, n_resamples=1000, seed=k)
        hits += low <= 1.0 <= high
    # binomial sd at p = 0.95, n = 200 is 0.015: [0.89, 0.99] is 4 sd
    assert 0.89 <= hits / trials <= 0.99, hits / trials


def test_bootstrap_of_a_normal_mean_agrees_with_the_t_interval():
    x = np.random.default_rng(7).normal(5.0, 2.0, 200)
    low, high = bootstrap_interval(lambda idx: x[idx].mean(axis=-1), 200, seed=0)
    _, tl, th = t_interval(x)
    assert low == pytest.approx(tl, abs=0.1 * (th - tl)) and high == pytest.approx(th, abs=0.1 * (th - tl))


def test_bootstrap_constant_statistic_and_too_few_videos():
    assert bootstrap_interval(lambda idx: np.ones(idx.shape).mean(axis=-1), 30) == (1.0, 1.0)
    low, high = bootstrap_interval(lambda idx: np.arange(5.0)[idx].mean(axis=-1), 5)  # 5 < MIN_SAMPLES
    assert math.isnan(low) and math.isnan(high)


def test_resolved_needs_an_interval_that_excludes_zero():
    assert resolved(0.1, 0.5) and resolved(-0.5, -0.1)
    assert not resolved(-0.1, 0.5) and not resolved(0.0, 0.5) and not resolved(float("nan"), 1.0)
    assert verdict(-0.2, 0.3) == "not resolved" and verdict(0.2, 0.3) == "resolved"


def _ratio_values(err_per_pair: np.ndarray, pairs: np.ndarray) -> dict[str, np.ndarray]:
    return {"velocity_error_sum": err_per_pair * pairs, "velocity_pairs": pairs.astype(float)}


def test_paired_difference_resolved_both_ways():
    rng = np.random.default_rng(0)
    n = 48
    hard = rng.gamma(2.0, 0.5, n)  # per-video difficulty shared by both models
    pairs = rng.integers(1, 6, n)
    a = _ratio_values(hard + 0.40, pairs)
    better = _ratio_values(hard + 0.30 + rng.normal(0, 0.02, n), pairs)  # 0.1 lower on every video
    d = paired_difference("velocity_error", a, better, split="id", a="dense", b="sparse")
    assert d["resolved"] and d["better"] == "sparse" and d["ci95"][1] < 0
    assert d["difference"] == pytest.approx(float((better["velocity_error_sum"].sum() - a["velocity_error_sum"].sum())
                                                  / pairs.sum()), rel=1e-12)
    assert "resolved, sparse is better" in d["sentence"]
    same = _ratio_values(hard + 0.40 + rng.normal(0, 0.3, n), pairs)  # the same on average, noisy per video
    d = paired_difference("velocity_error", a, same, split="id", a="dense", b="sparse")
    assert not d["resolved"] and d["ci95"][0] < 0 < d["ci95"][1] and d["sentence"].endswith("not resolved.")
    # higher is better for PSNR: the higher one is named
    p = paired_difference("psnr", {"psnr": hard + 20}, {"psnr": hard + 21}, split="id", a="dense", b="sparse")
    assert p["resolved"] and p["better"] == "sparse"


def test_frechet_reliability_flags_too_few_samples():
    r = frechet_reliability(48, 400)
    assert not r["reliable"] and r["note"].startswith("unreliable: 48 samples <= feature dim 400")
    assert frechet_reliability(48, 11)["reliable"] and frechet_reliability(48, 11)["note"] == ""
    assert "detected_fraction" in frechet_reliability(48, 11, ["detected_fraction"])["note"]


@pytest.fixture(scope="module")
def physics():
    rows = generate_physics_videos("bounce", "id", 12, 7, 16, 16, seed=3, fps=5.0, workers=1)
    videos = np.stack([r["video"] for r in rows])
    states = [r["states"] for r in rows]
    return videos, states, baseline_videos(videos, states, 3)


def test_per_video_values_reproduce_the_pooled_scores(physics):
    videos, states, base = physics
    keys = ["velocity_error", "position_error", "detection_rate", "psnr", "ssim"]
    for name in ("copy_last_frame", "constant_velocity"):
        pv = per_video_values(base[name], videos, states, 3, keys)
        pooled = {**score(base[name], states, 3), **frame_metrics(base[name], videos, 3)}
        for k in keys:
            assert float(VIDEO_STATS[k](pv, np.arange(len(videos)))) == pytest.approx(pooled[k], rel=1e-9), (name, k)


def test_batched_trajectory_fd_equals_the_one_set_function():
    rows = generate_physics_videos("uniform", "id", 12, 7, 16, 16, seed=4, fps=5.0, workers=1)  # one ball each
    videos, states = np.stack([r["video"] for r in rows]), [r["states"] for r in rows]
    gen = _Features(track_videos(baseline_videos(videos, states, 3)["copy_last_frame"], states, 3), states)
    ref = _Features(track_videos(videos, states, 3), states)
    assert gen.table is not None  # equal ball counts: the batched path
    idx = np.random.default_rng(0).integers(0, len(videos), (5, len(videos)))
    batched = batched_trajectory_fd(gen.take(idx), ref.take(idx))
    for b in range(5):
        assert batched[b] == pytest.approx(trajectory_frechet_from_features(gen.take(idx[b]), ref.take(idx[b])), rel=1e-7, abs=1e-9)


def test_compare_groups_seeds_and_sweeps_steps(tmp_path):
    """Two seeds of one recipe become one variant (t over seeds); steps_sweep scores each count with intervals."""
    T, H, W = 5, 16, 16
    cfg = ModelConfig(in_channels=3, patch_size=(1, 4, 4), hidden_size=16, depth=1, num_heads=2, text_dim=0)
    runs = {}
    for name, seed in (("dense_s0", 0), ("dense_s1", 1)):
        torch.manual_seed(seed)
        model = SparseDiT(cfg)
        torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
        out = tmp_path / name
        model.save_pretrained(out / "final")
        recipe = RecipeConfig(model=cfg, diffusion=DiffusionConfig(num_inference_steps=2),
                              train=TrainConfig(max_steps=10, global_batch_size=4, seed=seed),
                              data=DataConfig(source="physics", num_frames=T, height=H, width=W), output_dir=str(out))
        (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe)))
        (out / "summary.json").write_text(json.dumps({"steps": 10}))
        runs[name] = out
    rows = generate_physics_videos("uniform", "id", 10, T, H, W, seed=9, fps=5.0, workers=1)
    split = EvalSplit("id", np.stack([r["video"] for r in rows]), [r["states"] for r in rows])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report, _ = compare(runs, [split], latency_repeats=0, steps_sweep=[1], log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    groups = report["variants"]["groups"]
    assert list(groups) == ["dense_s"] and groups["dense_s"]["runs"] == ["dense_s0", "dense_s1"]
    psnr = groups["dense_s"]["splits"]["id"]["psnr"]
    per_seed = [report["models"][n]["splits"]["id"]["psnr"] for n in ("dense_s0", "dense_s1")]
    assert psnr["per_seed"] == pytest.approx(per_seed) and psnr["ci95_seeds"] == pytest.approx(list(t_interval(per_seed)[1:]))
    for m in report["models"].values():
        assert [p["steps"] for p in m["steps_sweep"]] == [1, 2]
        assert m["steps_sweep"][1]["psnr"] == m["splits"]["id"]["psnr"]  # the run's own steps reused
        assert set(m["steps_sweep"][0]["ci95"]) >= {"psnr", "ssim"}
        lo, hi = m["ci95"]["val_loss"]
        assert lo <= m["val_loss"] <= hi
