"""Quality metrics for generated videos (installed as ``sparse_dit.evals``).

- ``rollout``: long world rollouts scored by horizon bucket (1-8, 9-16, 17-32, ...) against the
  simulator and the calibration baselines (``sparse-dit eval rollout``; opt-in metric).
- ``physics``: PhyWorld-style physics fidelity (ball positions/velocities found by colour vs the
  simulator's ground truth), calibration baselines, per-split reports.
- ``frechet``: a numerically stable Frechet distance and one over physics-trajectory features.
- ``fvd``: Frechet Video Distance with StyleGAN-V's I3D TorchScript from a local path.
- ``metrics``: the metric table ``METRICS`` that ``compare`` walks (what each needs, its
  headline keys, lower or higher is better); FVD is opt-in there.
- ``video_metrics``: PSNR and SSIM over generated frames.
- ``tracking``: the ball finder (colour, then size, shape, colour and contrast checks, so that
  noise holds no ball) and disc renderer the physics metrics use.
- ``splits``: validation splits: physics (simulated or saved, with states) or any video
  dataset (``data folder`` / ``data hf``), and the wrong-data check against a run's recipe.
- ``loss``: held-out flow-matching loss on a fixed grid of t with fixed noise.
- ``cost``: inference cost (params, MACs per generated video, latency, peak memory, throughput).
- ``compare`` / ``report``: dense-vs-sparse comparison of finished runs (``sparse-dit eval compare``).
- ``stats`` / ``stats_report``: 95 % intervals over videos (BCa bootstrap) and seeds (t), paired
  differences resolved or not, Frechet-distance checks; ``plots``: the report's figures and
  labelled sample grids.
"""

from sparse_dit.evals.frechet import (
    TRAJECTORY_FEATURE_NAMES,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_stats,
    trajectory_features,
    trajectory_frechet_distance,
)
from sparse_dit.evals.fvd import frechet_video_distance, i3d_features, load_i3d
from sparse_dit.evals.physics import (
    BASELINES,
    baseline_videos,
    constant_velocity_videos,
    copy_last_frame_videos,
    ground_truth_videos,
    score,
    score_baselines,
    score_splits,
)
from sparse_dit.evals.video_metrics import frame_metrics, psnr, ssim, to_uint8_videos
from sparse_dit.evals.rollout import evaluate_rollout, horizon_buckets, score_by_horizon, simulate_rollout_split
from sparse_dit.evals.loss import heldout_loss
from sparse_dit.evals.cost import cost_report, generation_macs, measure_generation
from sparse_dit.evals.metrics import DEFAULT_METRICS, METRICS, Metric, MetricInput
from sparse_dit.evals.compare import compare, evaluate_run, load_run

__all__ = [
    "heldout_loss",
    "evaluate_rollout",
    "horizon_buckets",
    "score_by_horizon",
    "simulate_rollout_split",
    "cost_report",
    "generation_macs",
    "measure_generation",
    "compare",
    "evaluate_run",
    "load_run",
    "DEFAULT_METRICS",
    "METRICS",
    "Metric",
    "MetricInput",
    "BASELINES",
    "TRAJECTORY_FEATURE_NAMES",
    "baseline_videos",
    "constant_velocity_videos",
    "copy_last_frame_videos",
    "feature_statistics",
    "frame_metrics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "frechet_video_distance",
    "ground_truth_videos",
    "i3d_features",
    "load_i3d",
    "psnr",
    "score",
    "score_baselines",
    "score_splits",
    "ssim",
    "to_uint8_videos",
    "trajectory_features",
    "trajectory_frechet_distance",
]
