"""PSNR and SSIM of predicted frames against ground truth, over generated frames only.

Both are computed per frame (one H x W x C image) and then averaged over frames and videos,
the usual convention in video prediction. Context frames are given to the model, so they are
excluded: scoring them would only inflate the numbers.

SSIM follows Wang, Bovik, Sheikh & Simoncelli (2004), "Image quality assessment: from error
visibility to structural similarity": an 11 x 11 Gaussian window with sigma 1.5, constants
C1 = (0.01 L)^2 and C2 = (0.03 L)^2 for data range L, statistics over the window positions that
lie wholly inside the image ('valid', as the authors' reference code), per channel, and the mean
of the SSIM map over positions and channels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from einops import rearrange

__all__ = ["PSNR_CAP_DB", "frame_metrics", "gaussian_window", "psnr", "ssim", "to_uint8_videos"]

# A frame's PSNR in frame_metrics' means: exact frames (MSE 0, inf dB) count as this many dB. 100 dB
# is an MSE of 6.5e-6 on uint8 frames: no rounded prediction that is not exact comes near it.
PSNR_CAP_DB = 100.0

# Images per SSIM/PSNR chunk in frame_metrics: bounds the float64 temporaries (~2 GB at 256x256).
_CHUNK_VALUES = 2**24


def to_uint8_videos(videos: Any) -> np.ndarray:
    """Model-convention videos (B, C=3, T, H, W) float in [-1, 1] -> uint8 (B, T, H, W, 3).

    Rounds to the nearest level (``(x + 1) * 127.5``) and clips out-of-range values.

    Args:
        videos: torch tensor or array of shape (B, 3, T, H, W).
    """
    if isinstance(videos, torch.Tensor):
        videos = videos.detach().float().cpu().numpy()
    x = np.asarray(videos, dtype=np.float64)
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"videos must be (B, 3, T, H, W) in [-1, 1]; got shape {x.shape}")
    x = np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rearrange(x, "b c t h w -> b t h w c"))


def _pair(pred: Any, target: Any, data_range: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape; got {p.shape} and {t.shape}")
    if p.ndim < 3:
        raise ValueError(f"images must be (..., H, W, C); got shape {p.shape}")
    if data_range is None:
        if p.dtype != np.uint8 or t.dtype != np.uint8:
            raise ValueError(f"data_range is required for non-uint8 images (got dtypes {p.dtype}, {t.dtype}); "
                             "use 2.0 for [-1, 1] and 1.0 for [0, 1]")
        data_range = 255.0
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0; got {data_range}")
    return p.astype(np.float64), t.astype(np.float64), float(data_range)


def psnr(pred: Any, target: Any, data_range: float | None = None) -> np.ndarray:
    """Peak signal-to-noise ratio per image, ``10 log10(L^2 / MSE)`` dB; inf where identical.

    Args:
        pred: images (..., H, W, C).
        target: images of the same shape.
        data_range: L, the value range; 255 for uint8 inputs, required otherwise.

    Returns:
        float64 array of shape ``pred.shape[:-3]``.
    """
    p, t, rng = _pair(pred, target, data_range)
    mse = ((p - t) ** 2).mean(axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(rng**2 / mse)


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    if size < 1 or size % 2 == 0 or sigma <= 0:
        raise ValueError(f"window size must be odd and >= 1 and sigma > 0; got size={size}, sigma={sigma}")
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 2-D Gaussian window (size, size), the outer product of a 1-D one.

    Args:
        size: odd window side, 11 in Wang et al. (2004).
        sigma: standard deviation in px, 1.5 in Wang et al. (2004).
    """
    g = _gaussian_1d(size, sigma)
    return np.outer(g, g)


def _band(n: int, g: np.ndarray) -> torch.Tensor:
    """(n - s + 1, n) matrix whose rows slide the 1-D window g: 'valid' filtering as a matmul."""
    s = g.shape[0]
    m = np.zeros((n - s + 1, n))
    for i in range(n - s + 1):
        m[i, i : i + s] = g
    return torch.from_numpy(m)


def ssim(
    pred: Any,
    target: Any,
    data_range: float | None = None,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """Structural similarity per image (Wang et al. 2004; details in the module docstring).

    Args:
        pred: images (..., H, W, C) with H, W >= ``window_size``.
        target: images of the same shape.
        data_range: L; 255 for uint8 inputs, required otherwise.
        window_size: Gaussian window side.
        sigma: Gaussian window std.
        k1: C1 = (k1 L)^2.
        k2: C2 = (k2 L)^2.

    Returns:
        float64 array of shape ``pred.shape[:-3]``; 1 where identical.
    """
    p, t, rng = _pair(pred, target, data_range)
    h, w, c = p.shape[-3:]
    if h < window_size or w < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size} (window_size); got {h}x{w}")
    lead = p.shape[:-3]
    x = rearrange(torch.from_numpy(p.reshape(-1, h, w, c)), "b h w c -> (b c) h w")
    y = rearrange(torch.from_numpy(t.reshape(-1, h, w, c)), "b h w c -> (b c) h w")
    g = _gaussian_1d(window_size, sigma)
    band_h, band_w = _band(h, g), _band(w, g)

    def blur(z: torch.Tensor) -> torch.Tensor:
        # The Gaussian window is separable: rows then columns, as two batched matmuls, which run
        # on BLAS; float64 conv2d has no fast CPU kernel and was the bottleneck here.
        return band_h @ z @ band_w.T  # (B, H - s + 1, W - s + 1)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * rng) ** 2, (k2 * rng) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    per_image = rearrange(smap, "(b c) h w -> b (c h w)", c=c).mean(dim=1)
    return per_image.numpy().reshape(lead)


def frame_metrics(
    pred_videos: Any,
    target_videos: Any,
    context_frames: int = 3,
    data_range: float | None = None,
) -> dict[str, Any]:
    """PSNR and SSIM of the generated frames of predicted videos vs ground truth.

    Args:
        pred_videos: (N, T, H, W, C) predicted videos whose first ``context_frames`` frames are
            the given ones (uint8, or float with ``data_range``).
        target_videos: ground truth of the same shape.
        context_frames: C; frames t = C .. T-1 are scored.
        data_range: value range; 255 for uint8, required otherwise.

    Returns:
        ``psnr`` (dB) and ``ssim``: means over all generated frames of all videos, a frame's
        PSNR capped at :data:`PSNR_CAP_DB` (an exact frame counts as 100 dB, not inf, so one
        exact frame does not hide the others); ``psnr_per_frame`` and ``ssim_per_frame``: means over
        videos for each generated frame; ``generated_frames``.
    """
    p, t = np.asarray(pred_videos), np.asarray(target_videos)
    if p.ndim != 5 or p.shape != t.shape:
        raise ValueError(f"pred and target videos must both be (N, T, H, W, C); got {p.shape} and {t.shape}")
    if not isinstance(context_frames, (int, np.integer)) or not 0 <= context_frames < p.shape[1]:
        raise ValueError(f"context_frames must be an int in [0, T={p.shape[1]}); got {context_frames!r}")
    p, t = p[:, context_frames:], t[:, context_frames:]
    step = max(1, _CHUNK_VALUES // max(1, int(np.prod(p.shape[1:]))))
    ps = np.concatenate([psnr(p[i : i + step], t[i : i + step], data_range) for i in range(0, p.shape[0], step)])
    ps = np.minimum(ps, PSNR_CAP_DB)  # an exact frame (inf dB) must not make the mean of the others infinite
    ss = np.concatenate([ssim(p[i : i + step], t[i : i + step], data_range) for i in range(0, p.shape[0], step)])
    return {
        "psnr": float(ps.mean()),
        "ssim": float(ss.mean()),
        "psnr_per_frame": ps.mean(axis=0).tolist(),
        "ssim_per_frame": ss.mean(axis=0).tolist(),
        "generated_frames": int(p.shape[1]),
    }
