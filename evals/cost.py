"""Inference cost of a video DiT: params, analytic MACs per generated video, latency, memory.

- **Params**: total and active (what one token uses; for MoE, the router and the k routed and
  shared experts), from :func:`sparse_dit.flops.count`.
- **MACs per generated video** = forward MACs x model calls of the sampler x (2 with CFG):
  Euler makes one call per step, Heun two per interval except the last (see
  :class:`sparse_dit.diffusion.FlowMatchScheduler`), and classifier-free guidance doubles every
  call. The forward MACs are exactly ``sparse_dit.flops.count(...)["macs"]``.
- **Latency**: the median wall time of ``repeats`` (>= 5) full generations after ``warmup``
  untimed ones (the first call pays allocator growth and kernel selection).
- **Peak memory**: on CUDA, ``torch.cuda.max_memory_allocated`` after a reset; on CPU the
  process's peak resident set size (Linux ``VmHWM``), reset through ``/proc/self/clear_refs``
  before the runs so that it measures this generation, not the whole process history. Where
  the reset is impossible, ``ru_maxrss`` (the lifetime peak) is reported and
  ``peak_memory_kind`` says so.
- **Throughput**: videos per second at the measured batch size.

Everything is reported at several video sizes: attention's share of the MACs grows with the
token count (quadratic) while the FFN's grows linearly, so the saving of an MoE model over a
dense one of equal total params shifts with the size.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from typing import Any, Sequence

import torch
from torch import nn

from sparse_dit.config import ModelConfig
from sparse_dit.diffusion import FlowMatchScheduler, sample
from sparse_dit.flops import count

__all__ = [
    "sampler_calls",
    "generation_macs",
    "peak_memory",
    "measure_generation",
    "cost_report",
]


def sampler_calls(num_inference_steps: int, sampler: str = "euler", guidance_scale: float = 1.0) -> int:
    """Model forward passes one generated video costs.

    Args:
        num_inference_steps: sampler intervals.
        sampler: ``"euler"`` or ``"heun"``.
        guidance_scale: CFG scale; any value other than 1.0 doubles the calls.
    """
    sched = FlowMatchScheduler(sampler)
    sched.set_timesteps(num_inference_steps)
    return sched.num_model_calls * (2 if guidance_scale != 1.0 else 1)


def generation_macs(
    config: ModelConfig,
    latent_shape: tuple[int, int, int, int],
    num_inference_steps: int = 25,
    sampler: str = "euler",
    guidance_scale: float = 1.0,
    text_len: int = 0,
) -> dict[str, Any]:
    """Analytic params and MACs of generating one video.

    Args:
        config: the model.
        latent_shape: (C, T, H, W) of one latent video.
        num_inference_steps: sampler intervals.
        sampler: ``"euler"`` or ``"heun"``.
        guidance_scale: CFG scale (!= 1 doubles the model calls).
        text_len: caption tokens for cross-attention.

    Returns:
        ``total_params``, ``active_params``, ``tokens``, ``forward_macs`` (one call,
        = ``sparse_dit.flops.count``), ``model_calls``, ``macs`` (per generated video),
        ``gmacs_per_sample`` (one forward, in G), ``gmacs_per_video``.
    """
    c = count(config, latent_shape, text_len=text_len)
    calls = sampler_calls(num_inference_steps, sampler, guidance_scale)
    return {
        "total_params": c["total_params"],
        "active_params": c["active_params"],
        "tokens": c["tokens"],
        "forward_macs": c["macs"],
        "model_calls": calls,
        "macs": c["macs"] * calls,
        "gmacs_per_sample": c["gmacs"],
        "gmacs_per_video": c["macs"] * calls / 1e9,
    }


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset Linux's per-process peak RSS (VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory(device: torch.device | str = "cpu"):
    """Context manager that measures peak memory of the code inside it.

    Yields a dict filled on exit with ``peak_memory_bytes`` and ``peak_memory_kind``
    (``"cuda_max_allocated"``, ``"cpu_peak_rss"`` or ``"cpu_lifetime_max_rss"``) and, on CPU,
    ``rss_before_bytes``.

    Args:
        device: where the work runs.
    """
    device = torch.device(device)
    result: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        result["peak_memory_kind"] = "cuda_max_allocated"
        return
    before = _read_status_kb("VmRSS")
    reset = _reset_peak_rss()
    yield result
    hwm = _read_status_kb("VmHWM") if reset else None
    if hwm is not None:
        result["peak_memory_bytes"] = hwm * 1024
        result["peak_memory_kind"] = "cpu_peak_rss"
    else:  # ru_maxrss is KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        result["peak_memory_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
        result["peak_memory_kind"] = "cpu_lifetime_max_rss"
    if before is not None:
        result["rss_before_bytes"] = before * 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_generation(
    model: nn.Module,
    video_shape: tuple[int, int, int],
    *,
    batch_size: int = 1,
    num_inference_steps: int = 25,
    sampler: str = "euler",
    guidance_scale: float = 1.0,
    context_frames: int = 0,
    model_kwargs: dict[str, Any] | None = None,
    warmup: int = 1,
    repeats: int = 5,
    autocast_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time and measure the memory of generating ``batch_size`` videos with ``model``.

    Args:
        model: the model (its device is used).
        video_shape: (T, H, W) of the latent video.
        batch_size: videos generated together.
        num_inference_steps: sampler intervals.
        sampler: ``"euler"`` or ``"heun"``.
        guidance_scale: CFG scale (needs conditioning in ``model_kwargs`` when != 1).
        context_frames: first frames given clean (world-model prediction); 0 = generation.
        model_kwargs: conditioning passed to every call.
        warmup: untimed runs first (>= 0).
        repeats: timed runs (>= 5: the issue asks for a median of at least five).
        autocast_dtype: run under ``torch.autocast`` with this dtype.
        seed: seeds the noise.

    Returns:
        ``latency_ms`` (median per batch), ``latency_ms_per_video``, ``latency_runs_ms``,
        ``throughput_videos_per_s``, ``peak_memory_bytes``, ``peak_memory_kind``,
        ``batch_size``, ``repeats``, ``warmup``, ``device``.
    """
    if repeats < 5:
        raise ValueError(f"repeats={repeats} must be >= 5 (the latency is a median of at least five runs)")
    if warmup < 0 or batch_size < 1:
        raise ValueError(f"warmup={warmup} must be >= 0 and batch_size={batch_size} >= 1")
    T, H, W = video_shape
    if not 0 <= context_frames < T:
        raise ValueError(f"context_frames={context_frames} must lie in [0, T={T})")
    device = next(model.parameters()).device
    C = model.config.in_channels  # type: ignore[union-attr]
    shape = (batch_size, C, T, H, W)
    g = torch.Generator().manual_seed(seed)
    context = torch.rand(shape, generator=g).mul(2).sub(1).to(device)
    mask = None
    if context_frames:
        mask = torch.zeros(batch_size, T, dtype=torch.bool, device=device)
        mask[:, :context_frames] = True
    was_training = model.training
    model.eval()

    def run_once() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            sample(model, shape, model_kwargs, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                   sampler=sampler, generator=torch.Generator().manual_seed(seed),
                   context=context if mask is not None else None, context_mask=mask, device=device)
        _sync(device)

    try:
        for _ in range(warmup):
            run_once()
        runs = []
        with peak_memory(device) as mem:
            for _ in range(repeats):
                start = time.perf_counter()
                run_once()
                runs.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    median = statistics.median(runs)
    return {
        "latency_ms": median,
        "latency_ms_per_video": median / batch_size,
        "latency_runs_ms": runs,
        "throughput_videos_per_s": batch_size / (median / 1e3),
        "batch_size": batch_size,
        "repeats": repeats,
        "warmup": warmup,
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        **mem,
    }


def cost_report(
    model: nn.Module,
    sizes: Sequence[tuple[int, int, int]],
    *,
    num_inference_steps: int = 25,
    sampler: str = "euler",
    guidance_scale: float = 1.0,
    text_len: int = 0,
    measure: bool = True,
    **measure_kwargs: Any,
) -> list[dict[str, Any]]:
    """Analytic cost and (optionally) measured latency/memory at several video sizes.

    Args:
        model: a :class:`~sparse_dit.dit.SparseDiT`.
        sizes: (T, H, W) latent sizes, each divisible by the patch size.
        num_inference_steps: sampler intervals.
        sampler: ``"euler"`` or ``"heun"``.
        guidance_scale: CFG scale.
        text_len: caption tokens (for the analytic count; pass matching ``model_kwargs`` to measure).
        measure: also run :func:`measure_generation` (False = analytic only, instant).
        **measure_kwargs: passed to :func:`measure_generation`.

    Returns:
        One dict per size: ``size`` [T, H, W] and :func:`generation_macs`'s keys, plus
        :func:`measure_generation`'s keys when ``measure``.
    """
    cfg: ModelConfig = model.config  # type: ignore[assignment]
    rows = []
    for size in sizes:
        T, H, W = (int(v) for v in size)
        row: dict[str, Any] = {"size": [T, H, W]}
        row.update(generation_macs(cfg, (cfg.in_channels, T, H, W), num_inference_steps, sampler, guidance_scale, text_len))
        if measure:
            row.update(measure_generation(model, (T, H, W), num_inference_steps=num_inference_steps, sampler=sampler,
                                          guidance_scale=guidance_scale, **measure_kwargs))
        rows.append(row)
    return rows

