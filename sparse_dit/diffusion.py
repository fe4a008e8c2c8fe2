"""Rectified flow / flow matching: noising, timestep sampling, the training loss, samplers, EMA.

Conventions (Liu et al. 2022; Lipman et al. 2023; Esser et al. 2024, "SD3"):

    x_t = (1 - t) x0 + t eps,    t in [0, 1], t = 0 clean data, t = 1 pure noise
    v   = d x_t / d t = eps - x0  (the model's target)

Sampling integrates dx/dt = v from t = 1 down to t = 0. The model never imports this module:
the training step calls ``FlowMatching.training_losses(model, x0, model_kwargs)``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from sparse_dit.config import TIMESTEP_GRIDS, DiffusionConfig

__all__ = [
    "FlowMatching",
    "FlowMatchScheduler",
    "EMA",
    "shift_timesteps",
    "resolution_shift",
    "sample",
    "guidance_schedule",
    "drop_conditioning",
    "count_tokens",
    "TIMESTEP_GRIDS",
]


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift: t' = s t / (1 + (s - 1) t). s > 1 spends more time at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int = 256) -> float:
    """Resolution-dependent shift s = sqrt(N / N_base) (SD3 sec. 5.3.2; Open-Sora 1.2 for video).

    More tokens carry the same signal with more redundancy, so a given t destroys less of it;
    shifting toward noise keeps the signal-to-noise ratio comparable across sizes.
    """
    return math.sqrt(max(num_tokens, 1) / base_tokens)


def count_tokens(shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> int:
    """Tokens of one (B, C, T, H, W) latent video cut into (pt, ph, pw) patches (>= 1)."""
    T, H, W = shape[-3:]
    pt, ph, pw = patch_size
    return max(1, (T // pt) * (H // ph) * (W // pw))


def drop_conditioning(
    model_kwargs: dict[str, Any],
    prob: float,
    generator: torch.Generator | None = None,
    null_class: int | None = None,
) -> dict[str, Any]:
    """Classifier-free-guidance dropout: with probability ``prob`` per sample, drop the caption
    (``text_drop``) and replace the class label by the null class.

    Args:
        model_kwargs: forward kwargs of the model (``text_emb``, ``class_labels``, ...).
        prob: drop probability.
        generator: for reproducible drops.
        null_class: index of the null class (``model.y_embedder.null_class``).
    """
    out = dict(model_kwargs)
    ref = out.get("text_emb") if out.get("text_emb") is not None else out.get("class_labels")
    if ref is None or prob <= 0:
        return out
    B = ref.shape[0]
    drop = torch.rand(B, generator=generator, device="cpu" if generator is None else generator.device) < prob
    drop = drop.to(ref.device)
    if out.get("text_emb") is not None:
        prev = out.get("text_drop")
        out["text_drop"] = drop if prev is None else (drop | prev.bool())
    if out.get("class_labels") is not None:
        if null_class is None:
            raise ValueError("drop_conditioning: class_labels are present, so null_class must be given")
        out["class_labels"] = torch.where(drop, torch.full_like(out["class_labels"], null_class), out["class_labels"])
    return out


def _prediction(output: Any, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a model output into (velocity, aux loss). DiT's learned-sigma channels (the second
    half of the output channels) are not used by flow matching."""
    aux_loss = None
    if isinstance(output, tuple):
        output, aux = output
        aux_loss = aux.loss
    velocity = output[:, :channels] if output.shape[1] != channels else output
    return velocity, aux_loss


def draw_noise(x0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise like ``x0``, reproducible from ``generator``.

    With a CPU generator (the trainer's per-step generator) and a CUDA ``x0``, the noise is drawn
    on the GPU from a seed the generator draws: a video-sized CPU draw cost 88 ms of a 586 ms
    B/2 training step on the H200, with the GPU waiting (BENCHMARKS.md, issue 16). The draws are
    then reproducible per device type, as every GPU kernel's rounding is. Everywhere else the
    noise comes from the generator itself, on its device.
    """
    if generator is not None and x0.is_cuda and generator.device.type == "cpu":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return torch.randn(x0.shape, generator=torch.Generator(x0.device).manual_seed(seed), device=x0.device, dtype=x0.dtype)
    gdev = generator.device if generator is not None else x0.device
    return torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(x0.device)


class FlowMatching:
    """The flow-matching objective.

    Args:
        config: timestep sampling and shift (a :class:`~sparse_dit.config.DiffusionConfig`).
        t_range: ``(lo, hi)``: draw training timesteps from the configured distribution
            conditioned on ``lo <= t < hi`` (``hi = 1`` includes 1): training one noise range of
            ``router="noise_level"`` alone (``train.noise_range``). None = all of [0, 1].
    """

    def __init__(self, config: DiffusionConfig | None = None, t_range: tuple[float, float] | None = None) -> None:
        self.config = config or DiffusionConfig()
        if t_range is not None and not 0.0 <= t_range[0] < t_range[1] <= 1.0:
            raise ValueError(f"t_range={t_range!r} is not allowed; give (lo, hi) with 0 <= lo < hi <= 1")
        self.t_range = t_range

    # -- noising --------------------------------------------------------------------------------
    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps, with t (B,) broadcast over the other dims."""
        tb = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - tb) * x0 + tb * noise

    def shift_for(self, num_tokens: int) -> float:
        c = self.config
        return c.shift if c.shift is not None else resolution_shift(num_tokens, c.shift_base_tokens)

    def sampling_kwargs(self, shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> dict[str, Any]:
        """The recipe's sampler settings for latents of ``shape``, as keyword arguments of
        :func:`sample`: steps, sampler, guidance and the shift training used for this many tokens
        (sampling on another shift's grid spends its steps where the model was not trained to)."""
        c = self.config
        return {"num_inference_steps": c.num_inference_steps, "sampler": c.sampler,
                "guidance_scale": c.guidance, "shift": self.shift_for(count_tokens(shape, patch_size)),
                "grid": c.timestep_grid}

    def sample_timesteps(self, batch: int, num_tokens: int, generator: torch.Generator | None = None, device: Any = None) -> torch.Tensor:
        """Training timesteps (B,): uniform or logit-normal, then the (resolution) shift; with
        ``t_range``, the same distribution conditioned on the range (inverse CDF, no rejection)."""
        c = self.config
        gdev = generator.device if generator is not None else "cpu"
        s = self.shift_for(num_tokens)
        if self.t_range is not None:
            return self._sample_in_range(batch, s, generator, gdev).to(device or gdev)
        if c.timestep_sampling == "uniform":
            t = torch.rand(batch, generator=generator, device=gdev)
        else:  # logit-normal (SD3): sigmoid of a normal puts more weight on the middle of [0, 1]
            t = torch.sigmoid(c.logit_mean + c.logit_std * torch.randn(batch, generator=generator, device=gdev))
        return shift_timesteps(t, s).to(device or gdev)

    def _sample_in_range(self, batch: int, shift: float, generator: torch.Generator | None, gdev: Any) -> torch.Tensor:
        """t ~ the training distribution given lo <= t < hi: map the range back through the shift
        (u = t / (s - (s - 1) t)) and the logit-normal CDF, draw uniformly between, map forward."""
        c = self.config
        lo, hi = (torch.tensor(v, dtype=torch.float64) for v in self.t_range)
        u_lo, u_hi = (x / (shift - (shift - 1) * x) for x in (lo, hi))  # unshifted bounds
        if c.timestep_sampling == "logit_normal":
            u_lo, u_hi = (torch.special.ndtr((torch.logit(u) - c.logit_mean) / c.logit_std) for u in (u_lo, u_hi))
        p = u_lo + (u_hi - u_lo) * torch.rand(batch, generator=generator, device=gdev).double()
        if c.timestep_sampling == "logit_normal":
            p = torch.sigmoid(c.logit_mean + c.logit_std * torch.special.ndtri(p))
        t = shift_timesteps(p, shift)
        # float rounding must not carry t over a boundary into another range
        top = hi if float(hi) >= 1.0 else torch.nextafter(hi, torch.tensor(0.0, dtype=torch.float64))
        t = torch.minimum(torch.maximum(t, lo), top).float()
        t = torch.where(t >= float(hi), torch.nextafter(t, torch.zeros_like(t)), t) if float(hi) < 1.0 else t
        return torch.maximum(t, lo.float())

    # -- loss -----------------------------------------------------------------------------------
    def training_losses(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        model_kwargs: dict[str, Any] | None = None,
        context_mask: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_tokens: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Flow-matching loss for a batch of clean latents.

        Args:
            model: called as ``model(x_t, t, context_mask=..., return_aux=True, **model_kwargs)``.
            x0: (B, C, T, H, W) clean latents.
            model_kwargs: conditioning (``text_emb``, ``text_mask``, ``text_drop``, ``class_labels``).
            context_mask: (B, T) bool: frames given clean to the model and left out of the loss.
            loss_mask: (B, T) bool or (B, 1|C, T, H, W): elements that count (False = padding).
            t, noise: fixed timesteps (B,) / noise (like x0); sampled when None.
            generator: for t and noise.
            num_tokens: tokens per sample, for the resolution shift (default: from the model's patch).

        Returns:
            ``{"loss": scalar total (MSE + aux), "mse": scalar, "aux_loss": scalar,
            "mse_per_sample": (B,), "t": (B,)}``.
        """
        B, C, T = x0.shape[:3]
        model_kwargs = dict(model_kwargs or {})
        if num_tokens is None:
            num_tokens = count_tokens(tuple(x0.shape), getattr(getattr(model, "config", None), "patch_size", (1, 1, 1)))
        if t is None:
            t = self.sample_timesteps(B, num_tokens, generator=generator, device=x0.device)
        if noise is None:
            noise = draw_noise(x0, generator)
        x_t = self.add_noise(x0, noise, t)
        weight = torch.ones(B, 1, T, 1, 1, device=x0.device, dtype=x0.dtype)
        if context_mask is not None:
            ctx = context_mask.bool().view(B, 1, T, 1, 1)
            x_t = torch.where(ctx, x0, x_t)  # context frames are given clean
            weight = weight * (~ctx).to(x0.dtype)
        if loss_mask is not None:
            lm = loss_mask.view(B, 1, T, 1, 1) if loss_mask.ndim == 2 else loss_mask
            weight = weight * lm.to(x0.dtype)
        out = model(x_t, t, context_mask=context_mask, return_aux=True, **model_kwargs)
        v_pred, aux_loss = _prediction(out, C)
        target = noise - x0
        err = (v_pred.float() - target.float()) ** 2 * weight
        denom = (weight.expand_as(err)).sum(dim=(1, 2, 3, 4))
        per_sample = err.sum(dim=(1, 2, 3, 4)) / denom.clamp_min(1)
        # mean over elements that count, across the batch (samples with no counted frame add 0)
        mse = err.sum() / weight.expand_as(err).sum().clamp_min(1)
        aux_loss = aux_loss if aux_loss is not None else mse.new_zeros(())
        return {"loss": mse + aux_loss, "mse": mse.detach(), "aux_loss": aux_loss.detach(), "mse_per_sample": per_sample.detach(), "t": t}


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


# Timestep grids of the sampler (TIMESTEP_GRIDS, from config). "diffusers" is
# FlowMatchEulerDiscreteScheduler's default (num_train_timesteps=1000, static shift): n points
# evenly spaced from 1 down to its shifted sigma_min = shift(1/1000), shifted again, then 0
# appended; its last step jumps from sigma_min to 0. "uniform" is n + 1 points evenly spaced from
# 1 to 0, then shifted (sparse-dit before issue 13).


class FlowMatchScheduler:
    """Euler / Heun integration of the flow ODE from t = 1 to t = 0, in diffusers' shape.

    ``set_timesteps(n)`` makes ``timesteps`` (the n times the model is called at, from 1 down,
    shifted) and ``sigmas`` (n + 1 values ending at 0); ``step(model_output, timestep, sample)``
    advances one step. The default grid equals diffusers' ``FlowMatchEulerDiscreteScheduler``
    (see :data:`TIMESTEP_GRIDS`). For Heun, ``step`` is called twice per interval (predictor,
    then corrector), as in diffusers' ``HeunDiscreteScheduler``: ``timesteps`` then lists each
    interior time twice.

    Args:
        sampler: ``"euler"`` or ``"heun"``.
        shift: timestep shift (1.0 = none); see :func:`shift_timesteps`.
        grid: ``"diffusers"`` (default) or ``"uniform"``; see :data:`TIMESTEP_GRIDS`.
        num_train_timesteps: diffusers' ``num_train_timesteps`` (sets sigma_min of that grid).
    """

    def __init__(self, sampler: str = "euler", shift: float = 1.0, grid: str = "diffusers", num_train_timesteps: int = 1000) -> None:
        if sampler not in ("euler", "heun"):
            raise ValueError(f"sampler={sampler!r} is not supported; choose 'euler' or 'heun'")
        if not shift > 0:
            raise ValueError(f"shift={shift} must be > 0")
        if grid not in TIMESTEP_GRIDS:
            raise ValueError(f"grid={grid!r} is not supported; choose one of {', '.join(TIMESTEP_GRIDS)}")
        self.sampler, self.shift, self.grid, self.num_train_timesteps = sampler, shift, grid, num_train_timesteps
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)
        self._index = 0
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None

    def _grid(self, n: int) -> torch.Tensor:
        if self.grid == "uniform":
            return shift_timesteps(torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64), self.shift)
        sigma_min = float(shift_timesteps(torch.tensor(1.0 / self.num_train_timesteps, dtype=torch.float64), self.shift))
        sig = shift_timesteps(torch.linspace(1.0, sigma_min, n, dtype=torch.float64), self.shift)
        return torch.cat([sig, sig.new_zeros(1)])

    def set_timesteps(self, num_inference_steps: int, device: Any = None, strength: float = 1.0) -> None:
        """Schedule ``num_inference_steps`` model calls from t = 1 to 0 on the shifted grid.

        Args:
            num_inference_steps: steps of the full grid.
            device: where ``sigmas``/``timesteps`` live.
            strength: the fraction of the schedule that is run, as diffusers' img2img pipelines
                read it (SDEdit): the first ``int(n - n * strength)`` steps are skipped, and
                ``sigmas[0]`` is the noise level the input is noised to.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength} must lie in (0, 1]")
        sig = self._grid(num_inference_steps)
        # diffusers' StableDiffusion3Img2ImgPipeline.get_timesteps, kept to the letter
        t_start = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
        sig = sig[t_start:]
        if len(sig) < 2:
            raise ValueError(f"strength={strength} runs no step of {num_inference_steps}; use strength >= {1 / num_inference_steps:g} or 0")
        num_inference_steps = len(sig) - 1
        self.sigmas = sig.float().to(device)
        if self.sampler == "euler":
            self.timesteps = self.sigmas[:-1]
        else:  # predictor at sigma_i, corrector at sigma_{i+1} (skip the corrector into t = 0)
            ts = []
            for i in range(num_inference_steps):
                ts.append(self.sigmas[i])
                if float(self.sigmas[i + 1]) > 0:
                    ts.append(self.sigmas[i + 1])
            self.timesteps = torch.stack(ts)
        self._index, self._prev = 0, None

    @property
    def num_model_calls(self) -> int:
        return len(self.timesteps)

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor | float, sample: torch.Tensor) -> torch.Tensor:
        """One update; returns the next sample. ``timestep`` must be ``self.timesteps[i]`` in order."""
        if self._index >= len(self.timesteps):
            raise RuntimeError("step() called more times than set_timesteps() scheduled")
        expected = float(self.timesteps[self._index])
        if abs(float(timestep) - expected) > 1e-6:
            raise ValueError(f"step() got timestep {float(timestep):.6f}, expected {expected:.6f} (call in order)")
        self._index += 1
        if self.sampler == "euler":
            i = self._index - 1
            dt = self.sigmas[i + 1] - self.sigmas[i]
            return sample + dt.to(sample.dtype) * model_output
        # Heun
        if self._prev is None:  # predictor
            i = self._sigma_index(expected)
            dt = self.sigmas[i + 1] - self.sigmas[i]
            nxt = sample + dt.to(sample.dtype) * model_output
            if float(self.sigmas[i + 1]) > 0:
                self._prev = (sample, model_output)
            return nxt
        x_prev, v_prev = self._prev  # corrector: average the slopes at both ends
        self._prev = None
        i = self._sigma_index(expected) - 1
        dt = self.sigmas[i + 1] - self.sigmas[i]
        return x_prev + dt.to(sample.dtype) * 0.5 * (v_prev + model_output)

    def _sigma_index(self, value: float) -> int:
        return int(torch.argmin((self.sigmas - value).abs()))


def guidance_schedule(guidance_scale: float | Sequence[float], boundaries: Sequence[float] | None = None,
                      model: Any = None) -> Callable[[float], float]:
    """The CFG scale as a function of t: one number, or one per noise range (highest noise first).

    Args:
        guidance_scale: a scale, or ``len(boundaries) + 1`` scales.
        boundaries: timesteps between the ranges; None = ``model.config.moe.boundary_timesteps``.
        model: where to read the boundaries from when not given.

    Raises:
        ValueError: a sequence whose length does not match the ranges, or a negative scale.
    """
    if isinstance(guidance_scale, (int, float)):
        w = float(guidance_scale)
        return lambda t: w
    scales = [float(w) for w in guidance_scale]
    if any(not w >= 0 for w in scales):
        raise ValueError(f"guidance_scale={scales!r} is not allowed; every scale must be >= 0")
    if boundaries is None:
        moe = getattr(getattr(model, "config", None), "moe", None)
        boundaries = moe.boundary_timesteps if moe is not None and moe.router == "noise_level" else ()
    # compared in float32, as the router compares (sparse_dit.moe.routers.noise_level.noise_range_of)
    b = sorted((float(torch.tensor(float(x), dtype=torch.float32)) for x in boundaries), reverse=True)
    if len(scales) == 1:
        return lambda t: scales[0]
    if len(scales) != len(b) + 1:
        raise ValueError(f"guidance_scale has {len(scales)} values but there are {len(b) + 1} noise ranges "
                         f"(boundaries {b}); give one scale per range, highest noise first, or a single scale")
    return lambda t: scales[sum(float(torch.tensor(t, dtype=torch.float32)) < x for x in b)]


@torch.no_grad()
def sample(
    model: Callable[..., Any],
    shape: tuple[int, ...],
    model_kwargs: dict[str, Any] | None = None,
    uncond_kwargs: dict[str, Any] | None = None,
    guidance_scale: float | Sequence[float] = 1.0,
    num_inference_steps: int = 25,
    sampler: str = "euler",
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    grid: str = "diffusers",
    guidance_boundaries: Sequence[float] | None = None,
) -> torch.Tensor:
    """Generate latents by integrating the learned flow from noise (t = 1) to data (t = 0).

    Args:
        model: a :class:`~sparse_dit.dit.SparseDiT` (or any callable with its signature).
        shape: (B, C, T, H, W).
        model_kwargs: conditional inputs (``text_emb``, ``text_mask``, ``class_labels``).
        uncond_kwargs: unconditional inputs for CFG; default: ``model_kwargs`` with the caption
            dropped (``text_drop`` all True) and class labels set to the null class.
        guidance_scale: CFG scale w; v = v_u + w (v_c - v_u). 1.0 = no guidance (one call per step).
            A sequence gives one scale per noise range, highest noise first (Wan2.2's per-expert
            guidance): the scale of a step is that of the range its t falls in (``t >= b`` is
            the noisier side); steps whose scale is 1.0 make one model call.
        guidance_boundaries: the timesteps between the ranges of a per-range ``guidance_scale``;
            None = the model's ``config.moe.boundary_timesteps`` (its noise-level experts).
        num_inference_steps: integration intervals.
        sampler: ``"euler"`` or ``"heun"``.
        shift: timestep shift of the sampling grid.
        generator: makes the initial noise reproducible.
        latents: initial noise (overrides ``generator``).
        context: (B, C, T, H, W) clean latents for the frames in ``context_mask``.
        context_mask: (B, T) bool: frames held at ``context`` throughout (prompts, kept frames).
        init_latents: clean latents to edit (SDEdit): noised to the first sigma of the last
            ``strength`` of the schedule and denoised from there.
        strength: the fraction of the schedule run on ``init_latents``, in (0, 1], as diffusers'
            img2img pipelines read it (1 = start from pure noise; the first
            ``int(n - n * strength)`` steps are skipped).
        grid: timestep grid, ``"diffusers"`` or ``"uniform"`` (:data:`TIMESTEP_GRIDS`).

    Returns:
        (B, C, T, H, W) generated latents (context frames equal ``context``).
    """
    model_kwargs = dict(model_kwargs or {})
    if device is None:
        device = next(model.parameters()).device if isinstance(model, nn.Module) else "cpu"
    if latents is None:
        gdev = generator.device if generator is not None else "cpu"
        latents = torch.randn(shape, generator=generator, device=gdev, dtype=torch.float32)
    x = latents.to(device=device, dtype=dtype)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"latents have shape {tuple(x.shape)}, expected {tuple(shape)}")
    sched = FlowMatchScheduler(sampler, shift, grid)
    sched.set_timesteps(num_inference_steps, device=device, strength=strength if init_latents is not None else 1.0)
    if init_latents is not None:
        if tuple(init_latents.shape) != tuple(shape):
            raise ValueError(f"init_latents have shape {tuple(init_latents.shape)}, expected {tuple(shape)}")
        x = FlowMatching.add_noise(init_latents.to(device=device, dtype=dtype), x, sched.sigmas[:1].expand(shape[0]))
    ctx = None
    if context_mask is not None:
        if context is None:
            raise ValueError("context_mask was given without context latents")
        ctx = context_mask.bool().to(device).view(shape[0], 1, shape[2], 1, 1)
        context = context.to(device=device, dtype=dtype)
        x = torch.where(ctx, context, x)
    scale_at = guidance_schedule(guidance_scale, guidance_boundaries, model)
    use_cfg = any(scale_at(float(t)) != 1.0 for t in sched.timesteps)
    if use_cfg and uncond_kwargs is None:
        uncond_kwargs = dict(model_kwargs)
        if uncond_kwargs.get("text_emb") is not None:
            uncond_kwargs["text_drop"] = torch.ones(shape[0], dtype=torch.bool, device=device)
        if uncond_kwargs.get("class_labels") is not None:
            null = model.y_embedder.null_class  # type: ignore[union-attr]
            uncond_kwargs["class_labels"] = torch.full_like(uncond_kwargs["class_labels"], null)
    steps: Iterable = sched.timesteps
    if progress:
        steps = tqdm(steps, desc="sampling", leave=False)
    C = shape[1]
    for t in steps:
        tb = t.expand(shape[0]).to(device)
        v, _ = _prediction(model(x, tb, context_mask=context_mask, **model_kwargs), C)
        w = scale_at(float(t))
        if w != 1.0:
            vu, _ = _prediction(model(x, tb, context_mask=context_mask, **uncond_kwargs), C)
            v = vu + w * (v - vu)
        x = sched.step(v.to(x.dtype), t, x)
        if ctx is not None:
            x = torch.where(ctx, context, x)
    return x


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's parameters (and a copy of its buffers).

    ``decay`` is warmed up as min(decay, (1 + n) / (10 + n)) over the first updates so early
    averages are not dominated by the random initialisation. Buffers (the router's balancing
    bias ``expert_bias``, normalisation statistics, ...) are state, not weights: they are
    copied at every update, never averaged (an averaged bias would route the EMA model
    differently from the model whose weights it averages; issue 11).

    Args:
        model: the model to track (its current weights seed the average).
        decay: target decay (DiT: 0.9999 for 400K steps; short runs want less).
        warmup: use the (1 + n) / (10 + n) ramp.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0 <= decay <= 1:
            raise ValueError(f"decay={decay} must lie in [0, 1]")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step: floating-point parameters move towards ``model``'s by ``1 - decay``;
        buffers and integer tensors are copied."""
        d = self.current_decay()
        self.num_updates += 1
        buffers = {name for name, _ in model.named_buffers()}
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point and k not in buffers:
                s.lerp_(v.detach().float(), 1 - d)  # exactly s where v == s (a frozen parameter stays bitwise put)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()})

    def averaged_model(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` holding the averaged weights."""
        m = copy.deepcopy(model)
        self.copy_to(m)
        return m
