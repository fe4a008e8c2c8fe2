"""Frechet Video Distance (Unterthiner et al. 2018) with an I3D TorchScript file from a local path.

Nothing is downloaded. Get the detector once, by hand, where you have internet:
StyleGAN-V's ``i3d_torchscript.pt`` (Skorokhodov et al. 2022; the Kinetics-400 I3D of the
original TensorFlow FVD, converted to TorchScript, published at ``I3D_TORCHSCRIPT_URL``), and
pass its path.

Convention (StyleGAN-V ``src/metrics/frechet_video_distance.py`` and ``metric_utils.py``):

- Frames: the first ``num_frames`` consecutive frames of each video; StyleGAN-V's FVD16 uses
  16 (its FVD128 uses 128). ``num_frames=None`` takes all frames; the I3D has temporal
  striding, so very short clips give less meaningful features.
- Input to the detector: a (B, 3, T, H, W) uint8 tensor in [0, 255]. Float videos in the
  house convention ([-1, 1], (B, C, T, H, W)) are quantised as StyleGAN-V quantises its
  generator's output: ``(x * 127.5 + 128).clamp(0, 255).to(torch.uint8)``.
- ``preprocess="stylegan-v"`` (default) calls
  ``detector(x, rescale=True, resize=True, return_features=True)``: the TorchScript itself
  scales [0, 255] to [-1, 1] and resizes every frame to 224 x 224, as StyleGAN-V's
  ``compute_fvd`` does.
- ``preprocess="manual"`` does those two steps in PyTorch instead (bilinear resize of each
  frame to 224 x 224 with half-pixel centres, no antialiasing, then ``x / 127.5 - 1``) and calls
  ``detector(x, rescale=False, resize=False, return_features=True)``, the form used by
  ``fvd-comparison`` and its derivatives. It can differ slightly from the default because the
  interpolation kernels differ.
- Features: ``return_features=True`` gives the 400-d logits before the softmax. Statistics are
  mean and covariance with divisor N (StyleGAN-V's ``FeatureStats``), and the distance is
  :func:`sparse_dit.evals.frechet.frechet_distance_from_stats` (stable for singular
  covariances: FVD on fewer than 400 videos always has them).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from sparse_dit.evals.frechet import feature_statistics, frechet_distance_from_stats

__all__ = ["I3D_RESOLUTION", "I3D_TORCHSCRIPT_URL", "frechet_video_distance", "i3d_features", "load_i3d", "to_detector_input"]

# Where the detector is published (documentation only; this module never fetches it).
I3D_TORCHSCRIPT_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt"
# The TensorFlow FVD reference resizes frames to 224 x 224 before the I3D.
I3D_RESOLUTION = 224

_PREPROCESS = ("stylegan-v", "manual")


def load_i3d(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load the I3D TorchScript detector from a local file, in eval mode.

    Args:
        path: local path of ``i3d_torchscript.pt``.
        device: where to put it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"FVD detector not found at {path!r}. FVD needs StyleGAN-V's I3D TorchScript file "
            f"(i3d_torchscript.pt); nothing is downloaded at run time. Fetch it once from "
            f"{I3D_TORCHSCRIPT_URL} and pass its local path."
        )
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript, but the published I3D exists only in that format.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        return torch.jit.load(path, map_location=device).eval()


def to_detector_input(videos: Any, num_frames: int | None = 16) -> torch.Tensor:
    """Videos -> a uint8 (B, 3, T, H, W) tensor of the first ``num_frames`` frames.

    Args:
        videos: uint8 (N, T, H, W, 3) array or tensor (the I/O convention), or a float tensor
            (B, 3, T, H, W) in [-1, 1] (the model convention).
        num_frames: frames kept from the start; None keeps all.
    """
    if isinstance(videos, torch.Tensor) and videos.is_floating_point():
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"float videos must be (B, 3, T, H, W) in [-1, 1]; got shape {tuple(videos.shape)}")
        # StyleGAN-V's quantisation of generator output (metric_utils.compute_feature_stats_for_generator).
        x = (videos.detach() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    else:
        arr = torch.as_tensor(np.asarray(videos.detach().cpu() if isinstance(videos, torch.Tensor) else videos))
        if arr.dtype != torch.uint8 or arr.ndim != 5 or arr.shape[-1] != 3:
            raise ValueError(f"videos must be uint8 (N, T, H, W, 3) or float (B, 3, T, H, W) in [-1, 1]; "
                             f"got dtype {arr.dtype}, shape {tuple(arr.shape)}")
        x = rearrange(arr, "n t h w c -> n c t h w")
    if num_frames is not None:
        if num_frames < 1 or x.shape[2] < num_frames:
            raise ValueError(f"num_frames={num_frames} but the videos have {x.shape[2]} frames; "
                             "pass num_frames=None to use all frames")
        x = x[:, :, :num_frames]
    return x.contiguous()


@torch.no_grad()
def i3d_features(
    videos: Any,
    detector: torch.nn.Module,
    num_frames: int | None = 16,
    batch_size: int = 8,
    preprocess: str = "stylegan-v",
) -> np.ndarray:
    """I3D features (N, D) of videos, with the convention in the module docstring.

    Args:
        videos: see :func:`to_detector_input`.
        detector: the loaded TorchScript I3D (:func:`load_i3d`) or a stand-in with the same
            call signature ``detector(x, rescale=, resize=, return_features=)``.
        num_frames: frames from the start of each video; None for all.
        batch_size: videos per detector call.
        preprocess: ``"stylegan-v"`` (the detector rescales and resizes) or ``"manual"``.
    """
    if preprocess not in _PREPROCESS:
        raise ValueError(f"preprocess must be one of {_PREPROCESS}; got {preprocess!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    x = to_detector_input(videos, num_frames)
    try:
        device = next(detector.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    feats = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        if preprocess == "stylegan-v":
            out = detector(xb, rescale=True, resize=True, return_features=True)
        else:
            t = xb.shape[2]
            frames = rearrange(xb.float(), "b c t h w -> (b t) c h w")
            frames = F.interpolate(frames, size=(I3D_RESOLUTION, I3D_RESOLUTION), mode="bilinear",
                                   align_corners=False, antialias=False)
            xb = rearrange(frames / 127.5 - 1.0, "(b t) c h w -> b c t h w", t=t)
            out = detector(xb, rescale=False, resize=False, return_features=True)
        if out.ndim != 2 or out.shape[0] != xb.shape[0]:
            raise ValueError(f"detector must return (batch, features); got shape {tuple(out.shape)}")
        feats.append(out.detach().double().cpu().numpy())
    return np.concatenate(feats, axis=0)


def frechet_video_distance(
    videos: Any,
    reference_videos: Any,
    detector: str | os.PathLike | torch.nn.Module,
    num_frames: int | None = 16,
    batch_size: int = 8,
    preprocess: str = "stylegan-v",
    device: str | torch.device = "cpu",
) -> float:
    """Frechet Video Distance between generated and reference videos.

    Args:
        videos: generated videos (see :func:`to_detector_input`), at least 2.
        reference_videos: real videos, at least 2; may differ in count and resolution.
        detector: local path of ``i3d_torchscript.pt`` or an already loaded module.
        num_frames: frames from the start of each video (16 = StyleGAN-V's FVD16); None for all.
        batch_size: videos per detector call.
        preprocess: ``"stylegan-v"`` or ``"manual"`` (module docstring).
        device: where a detector loaded from a path runs.
    """
    if not isinstance(detector, torch.nn.Module):
        detector = load_i3d(detector, device)
    f_gen = i3d_features(videos, detector, num_frames, batch_size, preprocess)
    f_ref = i3d_features(reference_videos, detector, num_frames, batch_size, preprocess)
    return frechet_distance_from_stats(*feature_statistics(f_gen, ddof=0), *feature_statistics(f_ref, ddof=0))
