"""Quality metrics as one table: ``METRICS``, the list :func:`~sparse_dit.evals.compare.evaluate_run` walks.

Each metric's computation lives in its own file (``loss.py``, ``physics.py``, ``rollout.py``,
``video_metrics.py``, ``frechet.py``, ``fvd.py``); an entry here says what it needs, how to call
it, which of its numbers head the report and whether lower is better. A new metric is a file
plus one entry::

    def _my_metric(x: MetricInput) -> dict[str, Any]:
        return {"my_error": my_error(x.generated, x.ground_truth, x.context_frames)}

    Metric("my_metric", needs=("generated", "ground_truth"), compute=_my_metric,
           lower_is_better={"my_error": True})

Two scopes (``per_split``):

- ``per_split=True``: scored on every split's generated videos; the result goes to
  ``report["models"][name]["splits"][split]`` and the ``lower_is_better`` keys of the headline
  (first) split are repeated at the model's top level.
- ``per_split=False``: scored once per run on the headline split, before any sampling (held-out
  loss needs the model and the real videos only); the result goes to the model's top level.

Entries run in table order. ``opt_in`` metrics run only when named (``evaluate_run(...,
metrics=[*DEFAULT_METRICS, "fvd"])``), and any metric whose ``unavailable`` returns a reason
is skipped with that reason in ``report["models"][name]["skipped_metrics"]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from sparse_dit.evals.frechet import trajectory_frechet_distance
from sparse_dit.evals.fvd import frechet_video_distance
from sparse_dit.evals.latent import encode_videos_batched, held_latent_frames, is_latent
from sparse_dit.evals.loss import heldout_loss
from sparse_dit.evals.physics import score
from sparse_dit.evals.rollout import evaluate_rollout, pipeline_predictor, simulate_rollout_split
from sparse_dit.evals.video_metrics import frame_metrics
from sparse_dit.pipeline import VideoPipeline

__all__ = ["NEEDS", "Split", "Metric", "MetricInput", "METRICS", "DEFAULT_METRICS", "FVD_NUM_FRAMES", "ROLLOUT_DEFAULTS",
           "select_metrics"]

# What a metric may ask for: generated videos, the real videos, the simulator's states, the model.
NEEDS = ("generated", "ground_truth", "states", "model")


class Split(Protocol):
    """A validation split as metrics see it (:class:`sparse_dit.evals.compare.EvalSplit` is one)."""

    name: str
    videos: np.ndarray  # real uint8 (N, T, H, W, 3)
    states: Optional[Sequence[Any]]  # the dataset's ``states`` rows, one per video; None for plain video

    def model_videos(self) -> torch.Tensor:
        """The real videos in the model convention: float (N, 3, T, H, W) in [-1, 1]."""


@dataclass(frozen=True)
class MetricInput:
    """Everything a metric may read for one (run, split).

    Args:
        split: the split: its real videos (``ground_truth``) and ``states``.
        context_frames: C given frames (the first C frames of ``generated`` are the real ones).
        generated: the run's uint8 predictions (N, T, H, W, 3); None for per-run metrics.
        model: the run's denoiser.
        seed: the evaluation seed shared by every run.
        batch_size: videos per forward pass.
        num_t: held-out loss timestep grid size.
        autocast_dtype: evaluate the model under autocast (None: fp32).
        options: per-metric settings (``fvd_detector``, ``fvd_num_frames``).
    """

    split: Split
    context_frames: int
    generated: Optional[np.ndarray] = None
    model: Optional[nn.Module] = None
    seed: int = 0
    batch_size: int = 16
    num_t: int = 10
    autocast_dtype: Optional[torch.dtype] = None
    options: Mapping[str, Any] = field(default_factory=dict)
    autoencoder: Optional[nn.Module] = None  # a latent-space run's VAE (evals/latent.py); None: pixel space

    @property
    def ground_truth(self) -> np.ndarray:
        """The real uint8 videos (N, T, H, W, 3)."""
        return self.split.videos

    @property
    def states(self) -> Sequence[Any]:
        """The simulator's ``states`` rows, one per video."""
        return self.split.states


@dataclass(frozen=True)
class Metric:
    """One entry of :data:`METRICS`.

    Args:
        name: the table key (and the name to opt in with).
        needs: which of :data:`NEEDS` ``compute`` reads.
        compute: ``compute(MetricInput) -> dict`` of JSON-friendly numbers (scalars and curves).
        lower_is_better: the headline scalar keys of the result, each True when lower is better.
        per_split: scored on every split's generated videos (True) or once per run (False).
        opt_in: left out of :data:`DEFAULT_METRICS`; runs only when named in ``metrics=``.
        unavailable: ``unavailable(MetricInput) -> reason or None``; a reason skips the metric.
        summary: ``summary(result) -> str`` for the progress log, or None.
    """

    name: str
    needs: tuple[str, ...]
    compute: Callable[[MetricInput], dict[str, Any]]
    lower_is_better: Mapping[str, bool]
    per_split: bool = True
    opt_in: bool = False
    unavailable: Optional[Callable[[MetricInput], Optional[str]]] = None
    summary: Optional[Callable[[dict[str, Any]], str]] = None

    def __post_init__(self) -> None:
        bad = [n for n in self.needs if n not in NEEDS]
        if bad:
            raise ValueError(f"metric {self.name!r}: needs={bad} unknown; allowed: {list(NEEDS)}")
        if ("generated" in self.needs) != self.per_split:
            raise ValueError(f"metric {self.name!r}: per_split={self.per_split} but needs={list(self.needs)}; "
                             "a metric is scored per split exactly when it needs generated videos")

    def skip_reason(self, x: MetricInput) -> Optional[str]:
        """Why this metric cannot run on ``x`` (None: it can).

        A metric that needs ``states`` is skipped on a split without them (a ``sparse-dit data
        folder`` / ``data hf`` dataset: real video has no simulator ground truth).
        """
        if "states" in self.needs and getattr(x.split, "states", None) is None:
            return (f"split {x.split.name!r} has no simulator states ({getattr(x.split, 'source', 'video')} data); "
                    "physics metrics need a `sparse-dit data physics` dataset or a simulated split")
        return self.unavailable(x) if self.unavailable is not None else None


# ------------------------------------------------------------------ entries (computations in their own files)


def _heldout_loss(x: MetricInput) -> dict[str, Any]:
    videos, context = x.split.model_videos(), x.context_frames
    if is_latent(x.autoencoder):  # on the latents; the latent frames the given pixel frames wholly cover are left out
        context = held_latent_frames(x.autoencoder, videos.shape[2], context)
        videos = encode_videos_batched(x.autoencoder, videos, x.batch_size)
    val = heldout_loss(x.model, videos, context_frames=context, num_t=x.num_t, seed=x.seed,
                       batch_size=x.batch_size, autocast_dtype=x.autocast_dtype)
    return {"val_loss": val["loss"], "val_loss_per_t": val["per_t"], "val_loss_t": val["t"],
            "val_loss_per_video": val["per_video"]}


def _physics(x: MetricInput) -> dict[str, Any]:
    return score(x.generated, x.states, x.context_frames)


def _frames(x: MetricInput) -> dict[str, Any]:
    f = frame_metrics(x.generated, x.ground_truth, x.context_frames)
    return {k: f[k] for k in ("psnr", "ssim", "psnr_per_frame", "ssim_per_frame")}


def _trajectory_fd(x: MetricInput) -> dict[str, Any]:
    try:
        tfd = trajectory_frechet_distance(x.generated, x.ground_truth, x.states, context_frames=x.context_frames)
    except ValueError:
        tfd = float("nan")  # fewer than 2 generated frames, or too few balls for a covariance
    return {"trajectory_fd": tfd}


# StyleGAN-V's FVD16: the first 16 frames of every video.
FVD_NUM_FRAMES = 16


def _fvd_unavailable(x: MetricInput) -> Optional[str]:
    det = x.options.get("fvd_detector")
    if det is None:
        return "no I3D detector: pass metric_options={'fvd_detector': PATH to i3d_torchscript.pt} (nothing is downloaded)"
    if not isinstance(det, nn.Module) and not os.path.isfile(os.fspath(det)):
        return f"I3D detector file {os.fspath(det)!r} not found (nothing is downloaded; see sparse_dit.evals.fvd)"
    frames = int(x.options.get("fvd_num_frames", FVD_NUM_FRAMES))
    if x.ground_truth.shape[1] < frames:
        return f"split {x.split.name!r} has {x.ground_truth.shape[1]}-frame videos; FVD uses {frames} (fvd_num_frames)"
    if x.ground_truth.shape[0] < 2:
        return f"split {x.split.name!r} has {x.ground_truth.shape[0]} video; FVD needs at least 2"
    return None


def _fvd(x: MetricInput) -> dict[str, Any]:
    frames = int(x.options.get("fvd_num_frames", FVD_NUM_FRAMES))
    return {"fvd": frechet_video_distance(x.generated, x.ground_truth, x.options["fvd_detector"], num_frames=frames,
                                          batch_size=x.batch_size)}


# Settings of the opt-in ``rollout`` metric; override any of them through ``metric_options``.
ROLLOUT_DEFAULTS: dict[str, Any] = {
    "rollout_frames": 32,  # N frames rolled out after the C given ones (buckets 1-8, 9-16, 17-32)
    "rollout_scenario": "uniform",
    "rollout_splits": ("id",),  # add "ood" for out-of-distribution scenes
    "rollout_num_videos": 8,
    "rollout_fps": 4.0,  # the training data's frame rate (the quickstart's: 4)
    "rollout_window": None,  # frames per model call; None = the headline split's clip length
    "rollout_data_seed": 1_000_003,
    "rollout_steps": 25,
    "rollout_shift": 1.0,  # the recipe's diffusion.shift when known
}


def _rollout(x: MetricInput) -> dict[str, Any]:
    o = {**ROLLOUT_DEFAULTS, **{k: v for k, v in x.options.items() if k in ROLLOUT_DEFAULTS}}
    T, H, W = x.split.videos.shape[1:4]
    window = int(o["rollout_window"] or T)
    pipe = VideoPipeline(x.model, vae=x.autoencoder, shift=o["rollout_shift"], num_inference_steps=int(o["rollout_steps"]))
    predict = pipeline_predictor(pipe, window, x.context_frames, seed=x.seed, batch_size=x.batch_size)
    out: dict[str, Any] = {"rollout": {}}
    for split in o["rollout_splits"]:
        videos, states = simulate_rollout_split(o["rollout_scenario"], split, int(o["rollout_num_videos"]), x.context_frames,
                                                int(o["rollout_frames"]), H, W, int(o["rollout_data_seed"]), float(o["rollout_fps"]))
        out["rollout"][split], _ = evaluate_rollout(predict, videos, states, x.context_frames)
    head = out["rollout"][o["rollout_splits"][0]]["model"]["overall"]
    out.update({f"rollout_{k}": head[k] for k in ("velocity_error", "position_error", "detection_rate")})
    return out


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("heldout_loss", needs=("model", "ground_truth"), compute=_heldout_loss, lower_is_better={"val_loss": True},
               per_split=False, summary=lambda r: f"held-out loss {r['val_loss']:.4f}"),
        Metric("physics", needs=("generated", "states"), compute=_physics,
               lower_is_better={"velocity_error": True, "position_error": True, "detection_rate": False},
               summary=lambda r: (f"velocity error {r['velocity_error']:.3f} px/frame, position error "
                                  f"{r['position_error']:.2f} px, detection {r['detection_rate']:.3f}")),
        Metric("frames", needs=("generated", "ground_truth"), compute=_frames, lower_is_better={"psnr": False, "ssim": False}),
        Metric("trajectory_fd", needs=("generated", "ground_truth", "states"), compute=_trajectory_fd,
               lower_is_better={"trajectory_fd": True}),
        Metric("fvd", needs=("generated", "ground_truth"), compute=_fvd, lower_is_better={"fvd": True}, opt_in=True,
               unavailable=_fvd_unavailable, summary=lambda r: f"FVD {r['fvd']:.2f}"),
        # slow (N / (window - C) model calls per video): opt-in; sparse-dit eval rollout runs it alone
        Metric("rollout", needs=("model",), compute=_rollout, per_split=False, opt_in=True,
               lower_is_better={"rollout_velocity_error": True, "rollout_position_error": True, "rollout_detection_rate": False},
               summary=lambda r: (f"rollout: velocity error {r['rollout_velocity_error']:.3f} px/frame, position error "
                                  f"{r['rollout_position_error']:.2f} px, detection {r['rollout_detection_rate']:.3f}")),
    )
}


# The metrics a comparison runs unless told otherwise: every entry that is not opt-in.
DEFAULT_METRICS: tuple[str, ...] = tuple(n for n, m in METRICS.items() if not m.opt_in)


def select_metrics(names: Sequence[str] | None = None) -> list[Metric]:
    """The metrics named, in table order (``None``: :data:`DEFAULT_METRICS`).

    Args:
        names: table keys, e.g. ``[*DEFAULT_METRICS, "fvd"]`` to add FVD.
    """
    names = DEFAULT_METRICS if names is None else tuple(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"metrics={unknown} unknown; allowed: {list(METRICS)}")
    return [m for n, m in METRICS.items() if n in names]
