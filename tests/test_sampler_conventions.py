"""The sampler keeps diffusers' conventions (issue 13): the default timestep grid is
FlowMatchEulerDiscreteScheduler's, and SDEdit's ``strength`` is the fraction of the schedule run,
as in the SD3 img2img pipelines. The reference numbers are computed here from diffusers'
formulas (numpy, written out), never from our scheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_dit.config import ConfigError, DiffusionConfig
from sparse_dit.diffusion import FlowMatchScheduler, sample
from sparse_dit.schema import from_dict


def diffusers_sigmas(n: int, shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(n).sigmas, by its formulas."""
    N = num_train_timesteps
    # __init__: timesteps N..1, sigmas = t / N, shifted; sigma_min/max are its ends
    init = np.linspace(1, N, N, dtype=np.float32)[::-1].copy() / N
    init = shift * init / (1 + (shift - 1) * init)
    sigma_min, sigma_max = float(init[-1]), float(init[0])
    # set_timesteps: evenly spaced between the ends (in timestep units), shifted again, then 0
    ts = np.linspace(sigma_max * N, sigma_min * N, n)
    sig = ts / N
    sig = shift * sig / (1 + (shift - 1) * sig)
    return np.append(sig.astype(np.float32), np.float32(0.0))


def img2img_start(n: int, strength: float) -> int:
    """StableDiffusion3Img2ImgPipeline.get_timesteps: the first index of the schedule that runs."""
    init_timestep = min(n * strength, n)
    return int(max(n - init_timestep, 0))


@pytest.mark.parametrize("n", [1, 4, 20])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_default_grid_is_flow_match_euler_discrete(n, shift):
    s = FlowMatchScheduler("euler", shift=shift)
    s.set_timesteps(n)
    ref = diffusers_sigmas(n, shift)
    np.testing.assert_allclose(s.sigmas.numpy(), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(s.timesteps.numpy(), ref[:-1], rtol=0, atol=1e-6)
    assert float(s.sigmas[-2]) > 0  # the last model call is at the shifted sigma_min, not at 0


def test_uniform_grid_is_the_documented_option():
    s = FlowMatchScheduler("euler", shift=3.0, grid="uniform")
    s.set_timesteps(5)
    t = np.linspace(1.0, 0.0, 6)
    np.testing.assert_allclose(s.sigmas.numpy(), 3 * t / (1 + 2 * t), atol=1e-6)
    with pytest.raises(ValueError, match="grid='karras'.*diffusers, uniform"):
        FlowMatchScheduler("euler", grid="karras")
    with pytest.raises(ConfigError, match="timestep_grid"):
        from_dict(DiffusionConfig, {"timestep_grid": "karras"})


@pytest.mark.parametrize("strength", [0.05, 0.25, 0.3, 0.5, 0.75, 0.99, 1.0])
def test_strength_is_the_fraction_of_the_schedule_run(strength):
    n, shift = 10, 3.0
    s = FlowMatchScheduler("euler", shift=shift)
    s.set_timesteps(n, strength=strength)
    start = img2img_start(n, strength)
    ref = diffusers_sigmas(n, shift)[start:]
    np.testing.assert_allclose(s.sigmas.numpy(), ref, atol=1e-6)
    assert len(s.timesteps) == n - start
    if strength == 0.25:
        assert n - start == 3  # int() truncates: 10 - 2.5 = 7.5 skips 7 steps (rounding would skip 8)


def test_sdedit_sampling_follows_the_img2img_loop():
    """sample(init_latents, strength) == the SD3 img2img loop written out here: scale_noise to the
    first sigma left, then Euler steps sigma_i -> sigma_{i+1} with the model's velocity."""
    n, shift, strength = 8, 2.0, 0.6

    def model(x, t, context_mask=None):
        return 0.7 * x + t.view(-1, 1, 1, 1, 1) ** 2  # any smooth velocity field

    x0 = torch.rand(2, 1, 2, 3, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    out = sample(model, tuple(x0.shape), init_latents=x0, strength=strength, num_inference_steps=n, shift=shift,
                 latents=noise, device="cpu")
    sig = torch.from_numpy(diffusers_sigmas(n, shift))[img2img_start(n, strength):]
    x = sig[0] * noise + (1 - sig[0]) * x0  # FlowMatchEulerDiscreteScheduler.scale_noise
    for i in range(len(sig) - 1):
        x = x + (sig[i + 1] - sig[i]) * model(x, sig[i].expand(2))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
