"""Batch-level routing and noise-level experts (issue 11), against references written here.

Every reference computes the routing from the gate weights directly (``x @ W^T``, softmax) and the
experts from their stacked weights (``gelu_tanh(x W1 + b1) W2 + b2``), never through the router.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sparse_dit.config import ConfigError, DiffusionConfig, ModelConfig, MoEConfig
from sparse_dit.diffusion import FlowMatching, FlowMatchScheduler, guidance_schedule, sample, shift_timesteps
from sparse_dit.dit import SparseDiT
from sparse_dit.flops import count, match_compute, moe_layer_counts
from sparse_dit.moe import MoEFeedForward, update_batch_thresholds
from sparse_dit.moe.dispatch import LocalDispatcher
from sparse_dit.moe.routers import noise_range_interval, noise_range_of
from sparse_dit.presets import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

D, H = 16, 24


def _expert_ref(moe: MoEFeedForward, x_TD: torch.Tensor, e: int) -> torch.Tensor:
    ex = moe.experts
    h = F.gelu(x_TD @ ex.w1[e] + ex.b1[e], approximate="tanh")
    return h @ ex.w2[e] + ex.b2[e]


def _scores(moe: MoEFeedForward, x_BND: torch.Tensor) -> torch.Tensor:
    """(T, E) softmax scores from the gate weight, computed here."""
    return torch.softmax(x_BND.reshape(-1, D).double() @ moe.router.gate.weight.detach().double().T, dim=-1).float()


def _combine_ref(moe: MoEFeedForward, x_BND: torch.Tensor, pairs: list[tuple[int, int]], S: torch.Tensor) -> torch.Tensor:
    x = x_BND.reshape(-1, D)
    y = torch.zeros_like(x)
    for t, e in pairs:
        y[t] += S[t, e] * _expert_ref(moe, x[t : t + 1], e)[0]
    return y.view_as(x_BND)


def _batch_layer(E: int = 4, k: int = 2) -> MoEFeedForward:
    torch.manual_seed(1)
    moe = MoEFeedForward(D, H, E, k, router="batch")
    torch.nn.init.normal_(moe.router.gate.weight, std=1.0)  # spread scores: the pool then differs from per-token top-k
    return moe


# --------------------------------------------------------------------------------------------
# Batch-level routing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "loop"])
def test_batch_routing_is_topk_of_the_flattened_score_matrix(backend: str) -> None:
    moe = _batch_layer()
    if backend == "loop":
        moe.dispatcher = type("Protocol", (LocalDispatcher,), {})()  # the dispatch/experts/combine path
    x = torch.randn(3, 5, D)
    y, aux = moe(x)
    S = _scores(moe, x)
    T, E = S.shape
    k = moe.top_k
    top = torch.topk(S.reshape(-1).double(), k * T).indices.tolist()  # reference pool
    pairs = [(i // E, i % E) for i in top]
    torch.testing.assert_close(y, _combine_ref(moe, x, pairs, S), rtol=1e-4, atol=1e-5)
    per_token = torch.bincount(torch.tensor([t for t, _ in pairs]), minlength=T)
    assert per_token.sum() == k * T  # average exactly k
    assert per_token.max() > k and per_token.min() < k  # hard tokens take more, easy ones fewer
    ref_counts = torch.bincount(torch.tensor([e for _, e in pairs]), minlength=E).float()
    assert torch.equal(aux.tokens_per_expert, ref_counts)
    assert aux.dropped_fraction.item() == pytest.approx(float((per_token == 0).sum()) / T)
    # the Switch balance loss over the pool's routes, hand-computed
    bal = E * sum(ref_counts[e] / (k * T) * S[:, e].mean() for e in range(E))
    assert aux.balance_loss.detach().item() == pytest.approx(float(bal), rel=1e-5)
    # gradients reach the gate through the combine weights
    y.sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_batch_threshold_ema_and_inference_rule() -> None:
    moe = _batch_layer()
    x1, x2 = torch.randn(2, 6, D), torch.randn(2, 6, D)
    cut = []
    for x in (x1, x2):
        moe(x)
        S = _scores(moe, x)
        cut.append(torch.topk(S.reshape(-1), moe.top_k * S.shape[0]).values[-1].item())
    # a second "rank" whose pool cut-off was 0.5: reduce_fn sums over ranks
    other = torch.tensor([0.5, 1.0])
    assert update_batch_thresholds(moe, reduce_fn=lambda t: t.add_(other)) == 1
    first = (cut[0] + cut[1] + 0.5) / 3
    assert moe.router.threshold.item() == pytest.approx(first, rel=1e-6)
    assert moe.router.cutoff_count.item() == 0
    moe(x1)
    update_batch_thresholds(moe)
    m = moe.router.threshold_momentum
    assert moe.router.threshold.item() == pytest.approx(m * first + (1 - m) * cut[0], rel=1e-6)
    assert moe.router.threshold_steps.item() == 2
    # inference: every pair whose score reaches the threshold, independent of the batch
    moe.eval()
    thr = moe.router.threshold.item()
    xb = torch.randn(3, 6, D)
    with torch.no_grad():
        y, _ = moe(xb)
        y1, _ = moe(xb[1:2])
    S = _scores(moe, xb)
    pairs = [(t, e) for t in range(S.shape[0]) for e in range(S.shape[1]) if S[t, e] >= thr]
    torch.testing.assert_close(y, _combine_ref(moe, xb, pairs, S), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y1, y[1:2], rtol=1e-5, atol=1e-6)


def test_batch_inference_falls_back_to_a_per_sample_pool() -> None:
    moe = _batch_layer()
    moe.eval()  # no threshold estimated yet (threshold_steps == 0)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        y, _ = moe(x)
    S = _scores(moe, x)
    E, k, N = S.shape[1], moe.top_k, x.shape[1]
    pairs = []
    for b in range(2):
        top = torch.topk(S[b * N : (b + 1) * N].reshape(-1), k * N).indices.tolist()
        pairs += [(b * N + i // E, i % E) for i in top]
    torch.testing.assert_close(y, _combine_ref(moe, x, pairs, S), rtol=1e-4, atol=1e-5)
    moe.router.inference_rule = "sample"  # the same rule on request, even with a threshold
    moe.router.threshold_steps.fill_(1.0)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], y)


# --------------------------------------------------------------------------------------------
# Noise-level experts
# --------------------------------------------------------------------------------------------


def _noise_dit(E: int = 4, k: int = 1, boundaries=(0.5,), unit: str = "t", **moe) -> SparseDiT:
    cfg = ModelConfig(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=4, num_classes=3,
                      moe=MoEConfig(num_experts=E, top_k=k, router="noise_level", noise_boundaries=tuple(boundaries),
                                    noise_boundary_unit=unit, **moe))
    torch.manual_seed(3)
    model = SparseDiT(cfg)
    with torch.no_grad():  # adaLN-Zero starts at the identity: give every part a say
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _perturb_range(model: SparseDiT, r: int) -> None:
    with torch.no_grad():
        for block in model.blocks:
            m = block.mlp
            Er = m.router.experts_per_range
            sl = slice(r * Er, (r + 1) * Er)
            for name in ("w1", "w2", "b1", "b2"):
                getattr(m.experts, name)[sl] += 1.0
            m.router.gate.weight[sl] += 5.0
            if m.router.cond_proj is not None:
                m.router.cond_proj.weight[sl] -= 5.0


@pytest.mark.parametrize("timestep_routing", [False, True])
def test_noise_level_output_depends_only_on_its_range(timestep_routing: bool) -> None:
    model = _noise_dit(timestep_routing=timestep_routing)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 4, 4, generator=g)
    t = torch.tensor([0.9, 0.2])  # range 0 (t >= 0.5) and range 1
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        y0 = model(x, t, class_labels=labels)
        for r, kept, changed in ((1, 0, 1), (0, 1, 0)):
            m = _noise_dit(timestep_routing=timestep_routing)
            _perturb_range(m, r)
            y = m(x, t, class_labels=labels)
            assert torch.equal(y[kept], y0[kept]), f"perturbing range {r} changed a range-{kept} sample"
            assert not torch.allclose(y[changed], y0[changed], atol=1e-3)


def test_noise_level_routes_topk_among_its_range_only() -> None:
    torch.manual_seed(2)
    moe = MoEFeedForward(D, H, 6, 2, router="noise_level", router_options={"boundaries": (0.7, 0.3)})
    torch.nn.init.normal_(moe.router.gate.weight, std=1.0)
    x = torch.randn(3, 4, D)
    t = torch.tensor([0.3, 0.95, 0.1])  # t == 0.3 is the noisier side: range 1
    y, aux = moe(x, timesteps=t)
    W = moe.router.gate.weight.detach()
    ref = torch.zeros_like(x)
    for b, r in enumerate([1, 0, 2]):
        cols = [2 * r, 2 * r + 1]
        p = torch.softmax(x[b] @ W[cols].T, dim=-1)  # softmax over the range's experts only
        w, i = torch.topk(p, 2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        for n in range(x.shape[1]):
            for j in range(2):
                ref[b, n] += w[n, j] * _expert_ref(moe, x[b, n : n + 1], cols[int(i[n, j])])[0]
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    assert aux.tokens_per_expert.tolist() == [4.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert aux.balance_loss.item() == pytest.approx(1.0, rel=1e-5)  # every range uses both of its experts fully
    with pytest.raises(ValueError, match="needs the timesteps"):
        moe(x)


def test_noise_boundary_as_snr_and_range_of() -> None:
    snr = 0.0204  # SNR = ((1 - t) / t)^2 of x_t = (1 - t) x0 + t eps
    cfg = MoEConfig(num_experts=2, top_k=1, router="noise_level", noise_boundaries=(snr,), noise_boundary_unit="snr")
    (tb,) = cfg.boundary_timesteps
    assert ((1 - tb) / tb) ** 2 == pytest.approx(snr)
    assert noise_range_of(torch.tensor([0.99, tb, 0.5]), (tb,)).tolist() == [0, 0, 1]
    assert noise_range_interval(0, (0.3, 0.7)) == (0.7, 1.0) and noise_range_interval(2, (0.3, 0.7)) == (0.0, 0.3)


@pytest.mark.parametrize("sampling,shift", [("uniform", 1.0), ("logit_normal", 3.0)])
def test_timesteps_drawn_within_range_from_the_conditional_distribution(sampling: str, shift: float) -> None:
    cfg = DiffusionConfig(timestep_sampling=sampling, shift=shift)
    for lo, hi in ((0.6, 1.0), (0.0, 0.6)):
        fm = FlowMatching(cfg, t_range=(lo, hi))
        t = fm.sample_timesteps(4000, 256, generator=torch.Generator().manual_seed(0))
        assert t.min() >= lo and t.max() < hi or (hi == 1.0 and t.max() <= 1.0)
        assert bool((noise_range_of(t, (0.6,)) == (0 if lo > 0 else 1)).all())
        # reference: rejection sampling from the unrestricted distribution, computed here
        g = torch.Generator().manual_seed(1)
        u = torch.rand(40000, generator=g) if sampling == "uniform" else torch.sigmoid(torch.randn(40000, generator=g))
        ref = shift_timesteps(u, shift)
        ref = ref[(ref >= lo) & (ref < hi)]
        qs = torch.tensor([0.1, 0.5, 0.9])
        torch.testing.assert_close(torch.quantile(t, qs), torch.quantile(ref, qs), atol=0.02, rtol=0)


def test_cfg_scale_switches_at_the_boundary() -> None:
    class Probe(torch.nn.Module):
        """Velocity 1 with the class, 0 for the null class: each Euler step moves by dt * w(t)."""

        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))
            self.y_embedder = type("Y", (), {"null_class": 9})()

        def forward(self, x, t, class_labels=None, context_mask=None):
            return torch.where(class_labels == 9, 0.0, 1.0).view(-1, 1, 1, 1, 1).expand_as(x).clone()

    b = 0.6
    steps = 12
    x = sample(Probe(), (1, 1, 1, 1, 1), {"class_labels": torch.tensor([0])}, guidance_scale=(5.0, 3.0),
               guidance_boundaries=(b,), num_inference_steps=steps, latents=torch.zeros(1, 1, 1, 1, 1), grid="uniform")
    sched = FlowMatchScheduler("euler", 1.0, "uniform")
    sched.set_timesteps(steps)
    s = sched.sigmas.double()
    ref = sum((s[i + 1] - s[i]) * (5.0 if s[i] >= b else 3.0) for i in range(steps))
    assert x.item() == pytest.approx(float(ref), rel=1e-5)
    assert {5.0, 3.0} == {guidance_schedule((5.0, 3.0), (b,))(float(v)) for v in sched.timesteps}
    w = guidance_schedule((5.0, 3.0), (b,))
    below = torch.nextafter(torch.tensor(b), torch.tensor(0.0)).item()  # the float32 just below (the router's dtype)
    assert w(b) == 5.0 and w(below) == 3.0
    # the boundaries come from the model's noise-level config when not given
    assert guidance_schedule((5.0, 3.0), model=_noise_dit(E=2, boundaries=(0.8,)))(0.7) == 3.0
    with pytest.raises(ValueError, match="one scale per range"):
        guidance_schedule((5.0, 3.0, 2.0), (b,))


# --------------------------------------------------------------------------------------------
# Compute, config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router,extra", [("batch", {}), ("noise_level", {"noise_boundaries": (0.5,)})])
def test_counts_equal_token_choice_and_the_executed_macs(router: str, extra: dict) -> None:
    base = ModelConfig(hidden_size=32, num_heads=4, depth=2, moe=MoEConfig(num_experts=4, top_k=2, backend="loop"))
    cfg = dataclasses.replace(base, moe=dataclasses.replace(base.moe, router=router, **extra))
    counts, tc = moe_layer_counts(cfg), moe_layer_counts(base)
    assert counts == tc  # same router gate, k experts per token on average, one range's experts active
    layer = MoEFeedForward.from_config(cfg, 0)
    layer.dispatcher = type("Protocol", (LocalDispatcher,), {})()
    B, N = 2, 12
    x, t = torch.randn(B, N, 32), torch.tensor([0.9, 0.1])
    with FlopCounterMode(display=False) as fc:
        layer(x, timesteps=t)
    by_op = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert (fc.get_total_flops() - by_op.get("aten.bmm", 0)) // 2 == B * N * counts["macs_per_token"]
    dense = ModelConfig(hidden_size=32, num_heads=4, depth=2)
    matched = match_compute(dense, 4, 2, router=router, **extra)
    assert count(matched, (4, 2, 8, 8))["macs"] == pytest.approx(count(dense, (4, 2, 8, 8))["macs"], rel=0.01)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.moe.router=noise_level"], r"noise_boundaries=\[\] is empty"),
        (["model.moe.router=noise_level", "model.moe.noise_boundaries=[1.5]"], r"noise_boundaries=\[1.5\] is out of range"),
        (["model.moe.router=noise_level", "model.moe.noise_boundaries=[0.5]", "model.moe.top_k=3"], r"top_k=3 is out of range; allowed: 1..2"),
        (["model.moe.noise_boundaries=[0.5]"], r"only used by router='noise_level'"),
        (["model.moe.router=batch", "model.moe.bias_update_rate=0.001"], r"bias_update_rate=0.001 is not available"),
        (["model.moe.router=noise_level", "model.moe.noise_boundaries=[0.5]", "train.noise_range=0", "train.weight_decay=0.1"],
         r"train.weight_decay=0.1 is not allowed with train.noise_range"),
    ],
)
def test_bad_routing_settings_are_one_line(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_recipe("recipes/tiny/moe.yaml", overrides)
    assert "\n" not in str(info.value)


def test_generate_takes_one_guidance_scale_per_noise_range(tmp_path) -> None:
    from sparse_dit.recipes.generate import GenerateError, _guidance_arg, generate_videos

    _noise_dit(E=2, boundaries=(0.6,)).save_pretrained(tmp_path)
    flags = dict(steps=2, frames=2, height=8, width=8, num_samples=1, class_label=1)
    got = generate_videos(tmp_path, guidance=_guidance_arg("5,3"), **flags)
    assert got.videos.shape == (1, 3, 2, 8, 8) and "guidance 5,3," in got.summary
    assert "guidance 4," in generate_videos(tmp_path, guidance=4.0, **flags).summary
    with pytest.raises(GenerateError, match=r"--guidance gives 3 scales; this model has 2 noise range\(s\): give 1 or 2") as info:
        generate_videos(tmp_path, guidance=_guidance_arg("5,3,1"), **flags)
    assert "\n" not in str(info.value)
    assert DiffusionConfig(guidance_scales=(5.0, 3.0)).guidance == (5.0, 3.0)
    assert FlowMatching(DiffusionConfig(guidance_scale=2.0)).sampling_kwargs((1, 3, 2, 8, 8), (1, 2, 2))["guidance_scale"] == 2.0
