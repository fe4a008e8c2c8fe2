"""Flow matching: the analytic Gaussian flow, schedulers, loss masking, CFG, EMA."""

import pytest
import torch
from torch import nn

from sparse_dit.config import DiffusionConfig
from sparse_dit.diffusion import (
    EMA,
    FlowMatchScheduler,
    FlowMatching,
    drop_conditioning,
    resolution_shift,
    sample,
    shift_timesteps,
)


class GaussianFlow(nn.Module):
    """The exact velocity E[eps - x0 | x_t] when x0 ~ N(mu, sigma^2) per element."""

    def __init__(self, mu: float, sigma: float) -> None:
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, context_mask=None, **kw):
        t = t.view(-1, 1, 1, 1, 1).double()
        x = x.double()
        var = (1 - t) ** 2 * self.sigma**2 + t**2
        mean = (1 - t) * self.mu
        return (-self.mu + (t - (1 - t) * self.sigma**2) * (x - mean) / var).float()


@pytest.mark.parametrize("sampler,steps,tol", [("euler", 100, 0.03), ("heun", 20, 0.02)])
def test_sampler_reaches_gaussian_target(sampler, steps, tol):
    mu, sigma = 1.5, 0.5
    g = torch.Generator().manual_seed(0)
    x = sample(GaussianFlow(mu, sigma), (4000, 1, 1, 2, 2), num_inference_steps=steps, sampler=sampler, generator=g)
    assert abs(x.mean().item() - mu) < tol
    assert abs(x.std().item() - sigma) < tol


def test_heun_is_more_accurate_than_euler_per_step():
    mu, sigma = 1.5, 0.5
    errs = {}
    for s in ("euler", "heun"):
        x = sample(GaussianFlow(mu, sigma), (4000, 1, 1, 2, 2), num_inference_steps=8, sampler=s,
                   generator=torch.Generator().manual_seed(0))
        errs[s] = abs(x.std().item() - sigma)
    assert errs["heun"] < errs["euler"]


def test_sampling_is_deterministic_for_a_generator():
    m = GaussianFlow(0.0, 2.0)
    a = sample(m, (2, 1, 2, 2, 2), num_inference_steps=5, generator=torch.Generator().manual_seed(3))
    b = sample(m, (2, 1, 2, 2, 2), num_inference_steps=5, generator=torch.Generator().manual_seed(3))
    c = sample(m, (2, 1, 2, 2, 2), num_inference_steps=5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_scheduler_api():
    s = FlowMatchScheduler("euler", shift=3.0)
    s.set_timesteps(4)
    assert s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0 and len(s.timesteps) == 4
    assert torch.all(s.sigmas[1:] < s.sigmas[:-1])
    # shift moves the grid toward noise
    assert s.sigmas[2] > 0.5
    x = torch.zeros(1)
    x = s.step(torch.ones(1), s.timesteps[0], x)
    assert torch.allclose(x, torch.tensor([float(s.sigmas[1] - s.sigmas[0])]))
    with pytest.raises(ValueError, match="expected"):
        s.step(torch.ones(1), 0.123, x)
    h = FlowMatchScheduler("heun")
    h.set_timesteps(3)
    assert h.num_model_calls == 5  # 2 per interval, no corrector into t = 0
    assert torch.allclose(shift_timesteps(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))
    assert resolution_shift(1024, 256) == 2.0


def test_context_frames_are_kept_during_sampling():
    m = GaussianFlow(0.0, 1.0)
    ctx = torch.full((1, 1, 3, 2, 2), 0.25)
    mask = torch.tensor([[True, False, True]])
    x = sample(m, (1, 1, 3, 2, 2), context=ctx, context_mask=mask, num_inference_steps=4,
               generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, :, 0], ctx[:, :, 0]) and torch.equal(x[:, :, 2], ctx[:, :, 2])
    assert not torch.equal(x[:, :, 1], ctx[:, :, 1])


class Recorder(nn.Module):
    """Returns a fixed output and records its inputs."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.calls = []

    def forward(self, x, t, context_mask=None, return_aux=False, **kw):
        self.calls.append((x.clone(), t.clone(), context_mask, kw))
        return self.out


def test_loss_value_and_masking():
    fm = FlowMatching(DiffusionConfig(shift=1.0))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 1, 4, 2, 2, generator=g)
    noise = torch.randn(2, 1, 4, 2, 2, generator=g)
    t = torch.tensor([0.3, 0.8])
    pred = torch.randn(2, 1, 4, 2, 2, generator=g)
    model = Recorder(pred)
    out = fm.training_losses(model, x0, t=t, noise=noise)
    torch.testing.assert_close(out["loss"], ((pred - (noise - x0)) ** 2).mean())
    x_t = model.calls[0][0]
    torch.testing.assert_close(x_t, (1 - t.view(2, 1, 1, 1, 1)) * x0 + t.view(2, 1, 1, 1, 1) * noise)

    ctx = torch.tensor([[True, False, False, False], [False, False, False, True]])
    pad = torch.tensor([[True, True, True, False], [True, True, True, True]])
    out = fm.training_losses(model, x0, context_mask=ctx, loss_mask=pad, t=t, noise=noise)
    keep = (~ctx & pad).view(2, 1, 4, 1, 1).expand_as(pred)
    torch.testing.assert_close(out["loss"], ((pred - (noise - x0)) ** 2)[keep].mean())
    x_t = model.calls[-1][0]
    assert torch.equal(x_t[0, :, 0], x0[0, :, 0]) and torch.equal(x_t[1, :, 3], x0[1, :, 3])  # clean context
    assert torch.equal(model.calls[-1][2], ctx)


def test_timestep_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    u = FlowMatching(DiffusionConfig(timestep_sampling="uniform", shift=1.0)).sample_timesteps(20000, 256, g)
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() <= 1
    ln = FlowMatching(DiffusionConfig(timestep_sampling="logit_normal", shift=1.0)).sample_timesteps(20000, 256, g)
    assert abs(ln.mean() - 0.5) < 0.01 and ln.std() < u.std()  # concentrated in the middle
    shifted = FlowMatching(DiffusionConfig(timestep_sampling="uniform", shift=None)).sample_timesteps(20000, 1024, g)
    assert shifted.mean() > 0.6  # sqrt(1024/256) = 2 shifts toward noise


def test_cfg_dropout_and_guidance():
    kw = {"text_emb": torch.randn(1000, 2, 4), "class_labels": torch.zeros(1000, dtype=torch.long)}
    out = drop_conditioning(kw, 0.25, torch.Generator().manual_seed(0), null_class=7)
    frac = out["text_drop"].float().mean()
    assert 0.2 < frac < 0.3
    assert torch.equal(out["class_labels"] == 7, out["text_drop"])

    class Lin(nn.Module):  # v = 1 when conditioned, 0 when dropped
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x, t, text_emb=None, text_drop=None, context_mask=None, **kw):
            on = (~text_drop).float() if text_drop is not None else torch.ones(x.shape[0])
            return on.view(-1, 1, 1, 1, 1).expand_as(x)

    x0 = torch.zeros(1, 1, 1, 1, 1)
    res = sample(Lin(), (1, 1, 1, 1, 1), {"text_emb": torch.zeros(1, 1, 1)}, guidance_scale=3.0,
                 num_inference_steps=4, latents=x0)
    # integrating v = 0 + 3 * (1 - 0) from t = 1 to 0 moves x by -3
    torch.testing.assert_close(res, torch.full_like(res, -3.0))


def test_ema():
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.fill_(0)
    ema = EMA(m, decay=0.5, warmup=False)
    with torch.no_grad():
        m.weight.fill_(1)
    ema.update(m)
    ema.update(m)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((2, 2), 0.75))
    copy = ema.averaged_model(m)
    torch.testing.assert_close(copy.weight, torch.full((2, 2), 0.75))
    assert m.weight[0, 0] == 1
    ema2 = EMA(m, decay=0.999)
    assert ema2.current_decay() == pytest.approx(0.1)  # warm-up ramp (1 + 0) / (10 + 0)
    ema2.load_state_dict(ema.state_dict())
    assert ema2.num_updates == 2


def test_ema_leaves_a_parameter_equal_to_its_average_bitwise_unchanged():
    # s*d + v*(1-d) rounds away from v even when s == v; a frozen part (train.noise_range) must stay put
    m = nn.Linear(3, 3)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.1, 1 / 3, 2 / 7], [1e-7, 12345.678, -0.3], [5.5, 0.7, 1 / 9]]))
    ema = EMA(m, decay=0.9, warmup=False)
    before = ema.shadow["weight"].clone()
    for _ in range(5):
        ema.update(m)
    assert torch.equal(ema.shadow["weight"], before)


def test_sdedit_schedule_starts_at_strength_and_keeps_a_clean_input():
    s = FlowMatchScheduler("euler", grid="uniform")  # 11 points 1.0, 0.9, ..., 0: half of it starts at 0.5
    s.set_timesteps(10, strength=0.5)
    assert float(s.sigmas[0]) == pytest.approx(0.5) and float(s.sigmas[-1]) == 0.0 and len(s.timesteps) == 5
    with pytest.raises(ValueError, match="strength"):
        s.set_timesteps(10, strength=0.0)
    # with the exact flow of N(mu, sigma^2) data, editing a sample that already lies on the data
    # distribution moves it less at small strength
    m = GaussianFlow(1.5, 0.5)
    x0 = 1.5 + 0.5 * torch.randn(2000, 1, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    moved = []
    for st in (0.2, 0.9):
        out = sample(m, tuple(x0.shape), init_latents=x0, strength=st, num_inference_steps=20,
                     generator=torch.Generator().manual_seed(1))
        assert abs(out.mean().item() - 1.5) < 0.05 and abs(out.std().item() - 0.5) < 0.05
        moved.append((out - x0).abs().mean().item())
    assert moved[0] < moved[1]
