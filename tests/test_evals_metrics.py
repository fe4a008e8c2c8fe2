"""Tests for sparse_dit.evals: Frechet distances, FVD plumbing, physics scoring, PSNR/SSIM.

Every test compares against an analytic value or a hand-written reference. Synthetic physics
videos are rendered here with an independent 8x8-supersampled disc renderer (exact area coverage
up to sampling), not with the renderer under test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from sparse_dit.evals import frechet, fvd, physics, video_metrics
from sparse_dit.evals.tracking import render_balls as eval_render_balls

BG = np.array([12.0, 12.0, 12.0])
COLORS = np.array([[230, 30, 30], [40, 210, 60], [40, 60, 255]], dtype=np.float64)

# ----------------------------------------------------------------------------- Frechet


def test_frechet_closed_form_matches_2x2_formula():
    # For 2x2 PSD M with eigenvalues l1, l2: tr(sqrt(M)) = sqrt(l1) + sqrt(l2) = sqrt(tr M + 2 sqrt(det M)),
    # and S1^1/2 S2 S1^1/2 has the eigenvalues of S1 S2: an analytic reference with no sqrtm.
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 3.0])
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.2], [-0.2, 3.0]])
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    assert frechet.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet.frechet_distance_from_stats(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_singular_covariances():
    # Commuting diagonal covariances: d^2 = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, zeros allowed.
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 2.0])
    s1, s2 = np.diag([1.0, 0.0, 0.0]), np.diag([4.0, 9.0, 0.0])
    assert frechet.frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(5.0 + 1.0 + 9.0, rel=1e-10)


def test_frechet_sampled_gaussians_match_analytic():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    b = rng.normal(size=(3, 3))
    s1, s2 = a @ a.T + 0.1 * np.eye(3), b @ b.T + 0.1 * np.eye(3)
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    x1 = rng.multivariate_normal(mu1, s1, size=200_000)
    x2 = rng.multivariate_normal(mu2, s2, size=200_000)
    expected = frechet.frechet_distance_from_stats(mu1, s1, mu2, s2)
    assert frechet.frechet_distance(x1, x2, ddof=1) == pytest.approx(expected, rel=0.02)


def test_frechet_fewer_samples_than_dims_is_stable():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 50))
    assert frechet.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    d = frechet.frechet_distance(x, x + 1.0)  # a pure shift: covariance terms cancel
    assert d == pytest.approx(50.0, rel=1e-6)


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="feature dimensions"):
        frechet.frechet_distance(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="symmetric"):
        frechet.frechet_distance_from_stats(np.zeros(2), np.array([[1.0, 1.0], [0.0, 1.0]]), np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------- synthetic physics videos


def supersampled_render(positions, radii, colors, h, w, ss=8):
    """Reference renderer: coverage = fraction of ss x ss sub-pixel samples inside the disc."""
    t_total, k_total = positions.shape[:2]
    sub = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(w)[:, None] + sub[None, :]).reshape(-1)
    ys = (np.arange(h)[:, None] + sub[None, :]).reshape(-1)
    frames = np.empty((t_total, h, w, 3))
    frames[:] = BG
    for t in range(t_total):
        for k in range(k_total):
            inside = ((xs[None, :] - positions[t, k, 0]) ** 2 + (ys[:, None] - positions[t, k, 1]) ** 2) <= radii[k] ** 2
            cov = inside.reshape(h, ss, w, ss).mean(axis=(1, 3))[..., None]
            frames[t] = frames[t] * (1 - cov) + colors[k] * cov
    return np.rint(frames).astype(np.uint8)


def make_scenes(n=3, t_total=8, h=32, w=32, gravity=0.0, seed=0):
    """n videos of 2 balls in free flight (no walls) with optional gravity; positions exact."""
    rng = np.random.default_rng(seed)
    videos, states = [], []
    ts = np.arange(t_total, dtype=np.float64)
    for i in range(n):
        p0 = np.array([[8.0, 10.0], [22.0, 20.0]]) + rng.uniform(-1, 1, size=(2, 2))
        v0 = rng.uniform(-1.2, 1.2, size=(2, 2))
        pos = p0[None] + ts[:, None, None] * v0[None]
        pos[:, :, 1] += 0.5 * gravity * ts[:, None] ** 2
        vel = v0[None] + np.zeros_like(pos)
        vel[:, :, 1] += gravity * ts[:, None]
        radii = np.array([3.0, 2.5])
        colors = COLORS[[i % 3, (i + 1) % 3]]
        videos.append(supersampled_render(pos, radii, colors, h, w))
        states.append({"position": pos.tolist(), "velocity": vel.tolist(), "radius": radii.tolist(),
                       "color": colors.astype(np.uint8).tolist(), "visible": np.ones((t_total, 2), bool).tolist()})
    return np.stack(videos), states


def test_detection_accuracy_on_supersampled_renders():
    videos, states = make_scenes(n=2, t_total=5)
    from sparse_dit.evals.tracking import track_videos

    for tr in track_videos(videos, states, context_frames=3):
        assert tr.found.all()
        assert np.abs(tr.positions - tr.gt_positions).max() < 0.1


def test_score_ground_truth_is_near_zero_with_full_detection():
    videos, states = make_scenes(n=3, gravity=0.3)
    out = physics.score(videos, states, context_frames=3)
    assert out["detection_rate"] == 1.0
    assert out["velocity_error"] < 0.1
    assert out["position_error"] < 0.1
    assert out["num_visible"] == 3 * 2 * 5 and out["num_velocity_pairs"] == 30
    assert len(out["velocity_error_per_frame"]) == out["generated_frames"] == 5


def test_score_frozen_video_error_equals_ground_truth_speed():
    videos, states = make_scenes(n=3, gravity=0.3)
    frozen = physics.copy_last_frame_videos(videos, states, context_frames=3)
    out = physics.score(frozen, states, context_frames=3)
    # Hand reference: v_hat = 0, so the error is the mean |p[t] - p[t-1]| over generated frames.
    speeds = [np.linalg.norm(np.diff(np.asarray(s["position"]), axis=0)[2:], axis=-1) for s in states]
    expected = float(np.concatenate([sp.reshape(-1) for sp in speeds]).mean())
    assert out["velocity_error"] == pytest.approx(expected, abs=1e-9)
    assert out["gt_speed"] == pytest.approx(expected, abs=1e-9)
    assert out["detection_rate"] == 1.0


def test_detection_rate_and_visibility_counts():
    videos, states = make_scenes(n=2)
    videos = videos.copy()
    videos[0, 4] = BG.astype(np.uint8)  # both balls vanish in video 0, generated frame t=4
    videos[1, 6] = BG.astype(np.uint8)  # and in video 1, t=6
    states[1]["visible"][6] = [False, False]  # ... where ground truth says they are hidden anyway
    out = physics.score(videos, states, context_frames=3)
    assert out["num_visible"] == 2 * 2 * 5 - 2
    assert out["detection_rate"] == pytest.approx((18 - 2) / 18)
    assert out["detection_rate_per_frame"][1] == pytest.approx(0.5)
    # A velocity pair (t-1, t) needs the ball visible and found at both: video 0 loses t=4 and
    # t=5, video 1 loses t=6 and t=7, per ball.
    assert out["num_velocity_pairs"] == 2 * 2 * 5 - 4 * 2


def test_constant_velocity_baseline_is_exact_for_free_flight_only():
    videos, states = make_scenes(n=2)
    cv = physics.constant_velocity_videos(videos, states, context_frames=3)
    assert np.array_equal(cv[:, :3], videos[:, :3])
    out = physics.score(cv, states, context_frames=3)
    assert out["detection_rate"] == 1.0
    # The velocity comes from two detections (each within ~0.05 px), so positions drift by up
    # to ~0.1 px per generated frame.
    assert out["velocity_error"] < 0.1 and out["position_error"] < 0.3
    videos_g, states_g = make_scenes(n=2, gravity=0.5)
    out_g = physics.score(physics.constant_velocity_videos(videos_g, states_g, 3), states_g, 3)
    # Under gravity g the velocity error at generated frame t (from frame C-1) is g * (t - C + 1).
    assert out_g["velocity_error"] == pytest.approx(0.5 * np.mean([1, 2, 3, 4, 5]), abs=0.1)


def test_baselines_and_splits_report_separately():
    videos, states = make_scenes(n=2)
    base = physics.score_baselines(videos, states, context_frames=3)
    assert set(base) == {"ground_truth", "copy_last_frame", "constant_velocity", "uniform_noise", "gaussian_noise", "blank"}
    assert base["ground_truth"]["velocity_error"] < base["copy_last_frame"]["velocity_error"]
    videos_o, states_o = make_scenes(n=1, seed=5)
    split = physics.score_splits({"id": videos, "ood": videos_o}, {"id": states, "ood": states_o}, context_frames=3)
    assert split["id"]["num_videos"] == 2 and split["ood"]["num_videos"] == 1


def test_score_rejects_bad_input():
    videos, states = make_scenes(n=1)
    with pytest.raises(ValueError, match="uint8"):
        physics.score(videos.astype(np.float32), states)
    with pytest.raises(ValueError, match="no generated frame"):
        physics.score(videos, states, context_frames=8)
    with pytest.raises(ValueError, match="pair one to one"):
        physics.score(videos, states * 2)


def test_eval_renderer_matches_supersampled_reference():
    pos = np.array([[10.3, 12.7], [20.1, 18.4]])
    ref = supersampled_render(pos[None], np.array([3.0, 2.5]), COLORS[:2], 32, 32)[0]
    plate = np.broadcast_to(BG, (32, 32, 3))
    got = eval_render_balls(plate, pos, np.array([3.0, 2.5]), COLORS[:2])
    # The linear-ramp rim approximates exact coverage to about 0.1 of the colour step.
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 0.12 * 255


def test_trajectory_frechet():
    videos, states = make_scenes(n=4, gravity=0.3)
    feats = frechet.trajectory_features(videos, states, context_frames=3)
    assert feats.shape == (8, len(frechet.TRAJECTORY_FEATURE_NAMES))
    # mean_vy of ball 0 in video 0: mean over t=3..7 of (v0 + g (t - 0.5)) -- the backward difference.
    s = states[0]
    v0y = s["velocity"][0][0][1]
    assert feats[0, 1] == pytest.approx(v0y + 0.3 * np.mean(np.arange(3, 8) - 0.5), abs=0.05)
    assert feats[:, -1].min() == 1.0
    assert frechet.trajectory_frechet_distance(videos, videos, states) == pytest.approx(0.0, abs=1e-8)
    frozen = physics.copy_last_frame_videos(videos, states, 3)
    assert frechet.trajectory_frechet_distance(frozen, videos, states) > 1.0


def test_score_on_physics_world_ground_truth():
    phys = pytest.importorskip("sparse_dit.data.physics")
    rows = [phys.generate_video(sc, "id", i, frames=8, height=32, width=32, seed=0)
            for sc in ("collision", "parabola", "occlusion") for i in range(2)]
    videos = np.stack([r["video"] for r in rows])
    states = [r["states"] for r in rows]
    out = physics.score(videos, states, context_frames=3)
    assert out["detection_rate"] == 1.0
    assert out["position_error"] < 0.2 and out["velocity_error"] < 0.2
    frozen = physics.score(physics.copy_last_frame_videos(videos, states, 3), states, 3)
    assert frozen["velocity_error"] > out["velocity_error"]


# ----------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_analytic():
    rng = np.random.default_rng(0)
    a = rng.integers(10, 240, size=(2, 4, 16, 16, 3), dtype=np.uint8)
    assert np.isinf(video_metrics.psnr(a, a)).all()
    b = a + np.uint8(5)  # MSE = 25 everywhere
    assert video_metrics.psnr(b, a) == pytest.approx(np.full((2, 4), 10 * math.log10(255**2 / 25)))
    m = video_metrics.frame_metrics(b, a, context_frames=1)
    assert m["psnr"] == pytest.approx(10 * math.log10(255**2 / 25)) and m["generated_frames"] == 3


def ssim_reference(x, y, data_range, size=11, sigma=1.5):
    """Loop-by-window SSIM per Wang et al. (2004), valid positions, mean over channels."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    win = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for c in range(x.shape[-1]):
        for i in range(x.shape[0] - size + 1):
            for j in range(x.shape[1] - size + 1):
                px, py = x[i : i + size, j : j + size, c], y[i : i + size, j : j + size, c]
                mx, my = (win * px).sum(), (win * py).sum()
                vx, vy = (win * (px - mx) ** 2).sum(), (win * (py - my) ** 2).sum()
                cxy = (win * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_against_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(13, 14, 2)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, size=x.shape), 0, 255).astype(np.uint8)
    assert video_metrics.ssim(x, y) == pytest.approx(ssim_reference(x.astype(float), y.astype(float), 255.0), rel=1e-9)
    assert video_metrics.ssim(x, x) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="data_range"):
        video_metrics.ssim(x.astype(float), y.astype(float))


def test_frame_metrics_ignore_context_frames():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(2, 5, 12, 12, 3), dtype=np.uint8)
    b = a.copy()
    b[:, :3] = 0  # context frames differ, generated frames are exact
    m = video_metrics.frame_metrics(b, a, context_frames=3)
    assert m["psnr"] == video_metrics.PSNR_CAP_DB and m["ssim"] == pytest.approx(1.0) and len(m["ssim_per_frame"]) == 2


def test_one_exact_frame_does_not_make_the_mean_psnr_infinite():
    a = np.full((1, 4, 12, 12, 3), 100, dtype=np.uint8)
    b = a.copy()
    b[0, 3] += 5  # frame 3 off by 5 everywhere: MSE 25, PSNR 10 log10(255^2 / 25) by hand; frames 1-2 exact
    m = video_metrics.frame_metrics(b, a, context_frames=1)
    by_hand = (100.0 + 100.0 + 10 * math.log10(255**2 / 25)) / 3
    assert m["psnr"] == pytest.approx(by_hand) and math.isfinite(m["psnr"])


def test_frame_metrics_chunking_and_uint8_conversion(monkeypatch):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(5, 4, 12, 12, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, size=a.shape), 0, 255).astype(np.uint8)
    whole = video_metrics.frame_metrics(b, a, context_frames=1)
    monkeypatch.setattr(video_metrics, "_CHUNK_VALUES", 2 * 12 * 12 * 3)  # a few frames per chunk
    chunked = video_metrics.frame_metrics(b, a, context_frames=1)
    assert chunked["psnr"] == pytest.approx(whole["psnr"]) and chunked["ssim"] == pytest.approx(whole["ssim"])
    x = torch.from_numpy(a).permute(0, 4, 1, 2, 3).double() / 127.5 - 1.0  # (B, C, T, H, W) in [-1, 1]
    assert np.array_equal(video_metrics.to_uint8_videos(x), a)


# ----------------------------------------------------------------------------- FVD plumbing


class FakeI3D(torch.nn.Module):
    """Stand-in with the real detector's call signature; features are resize-invariant statistics."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False) -> torch.Tensor:
        x = x.float()
        if rescale:
            x = x / 127.5 - 1.0
        if resize:
            b, c, t, h, w = x.shape
            x = torch.nn.functional.interpolate(x.reshape(b, c * t, h, w), size=(224, 224), mode="bilinear",
                                                align_corners=False).reshape(b, c, t, 224, 224)
        mean = x.mean(dim=(3, 4))  # (B, C, T)
        return torch.cat([mean.flatten(1), x.std(dim=(2, 3, 4))], dim=1)


@pytest.fixture(scope="module")
def fake_i3d_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13; the real I3D is one
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(FakeI3D()).save(str(path))
    return path


def test_fvd_plumbing(fake_i3d_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(6, 4, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + 40, 0, 255).astype(np.uint8)
    assert fvd.frechet_video_distance(a, a, fake_i3d_path, num_frames=4) == pytest.approx(0.0, abs=1e-8)
    assert fvd.frechet_video_distance(a, b, fake_i3d_path, num_frames=4) > 0.01
    det = fvd.load_i3d(fake_i3d_path)
    f_sg = fvd.i3d_features(a, det, num_frames=4, batch_size=4)
    f_man = fvd.i3d_features(a, det, num_frames=4, batch_size=4, preprocess="manual")
    assert f_sg.shape == (6, 3 * 4 + 3)
    # Both conventions hand the I3D 224x224 frames in [-1, 1]; the means survive bilinear resizing.
    np.testing.assert_allclose(f_sg[:, :12], f_man[:, :12], atol=1e-5)
    # House-convention float input [-1, 1] (B, C, T, H, W) is quantised back to the same uint8.
    xf = torch.from_numpy(a).permute(0, 4, 1, 2, 3).double() / 127.5 - 1.0
    np.testing.assert_allclose(fvd.i3d_features(xf, det, num_frames=4), f_sg, atol=1e-6)
    # num_frames keeps the first frames.
    first_two = fvd.i3d_features(a[:, :2], det, num_frames=None)[:, :6].reshape(6, 3, 2)
    np.testing.assert_allclose(first_two, f_sg[:, :12].reshape(6, 3, 4)[:, :, :2], atol=1e-6)


def test_fvd_errors(tmp_path, fake_i3d_path):
    with pytest.raises(FileNotFoundError, match="i3d_torchscript.pt"):
        fvd.load_i3d(tmp_path / "missing.pt")
    a = np.zeros((2, 4, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="num_frames=16"):
        fvd.frechet_video_distance(a, a, fake_i3d_path)
    with pytest.raises(ValueError, match="preprocess"):
        fvd.i3d_features(a, fvd.load_i3d(fake_i3d_path), num_frames=4, preprocess="tf")
