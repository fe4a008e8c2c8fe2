"""Inference cost (evals/cost.py) and the held-out loss (evals/loss.py)."""

from __future__ import annotations

import statistics

import pytest
import torch

from sparse_dit.config import ModelConfig
from sparse_dit.diffusion import FlowMatching
from sparse_dit.dit import DiTAux, SparseDiT
from sparse_dit.evals.cost import cost_report, generation_macs, measure_generation, sampler_calls
from sparse_dit.evals.loss import fixed_noise, heldout_loss, timestep_grid
from sparse_dit.flops import count, match_compute


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(in_channels=3, patch_size=(1, 4, 4), hidden_size=32, depth=2, num_heads=2, text_dim=0, **kw)


class _Counting(torch.nn.Module):
    """Wraps a model and counts forward calls (the reference for sampler_calls)."""

    def __init__(self, model: SparseDiT) -> None:
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0
        self.y_embedder = model.y_embedder

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("sampler,steps", [("euler", 3), ("heun", 3)])
def test_sampler_calls_equal_the_calls_sample_makes(sampler, steps):
    from sparse_dit.diffusion import sample

    torch.manual_seed(0)
    m = _Counting(SparseDiT(_tiny(num_classes=3)))
    kw = {"class_labels": torch.tensor([1])}
    sample(m, (1, 3, 1, 8, 8), kw, num_inference_steps=steps, sampler=sampler, device="cpu")
    assert m.calls == sampler_calls(steps, sampler)
    m.calls = 0
    sample(m, (1, 3, 1, 8, 8), kw, num_inference_steps=steps, sampler=sampler, guidance_scale=3.0, device="cpu")
    assert m.calls == sampler_calls(steps, sampler, guidance_scale=3.0) == 2 * sampler_calls(steps, sampler)


@pytest.mark.parametrize("moe", [False, True])
def test_generation_macs_equal_flops_count_times_calls(moe):
    cfg = _tiny()
    if moe:
        cfg = match_compute(cfg, num_experts=4, top_k=1)
    latent = (3, 8, 32, 32)
    ref = count(cfg, latent)
    g = generation_macs(cfg, latent, num_inference_steps=10, sampler="heun", guidance_scale=2.0)
    assert g["forward_macs"] == ref["macs"]
    assert g["model_calls"] == 2 * 19  # heun: 2 calls per interval but the last; CFG doubles
    assert g["macs"] == ref["macs"] * 38
    assert g["total_params"] == ref["total_params"] and g["active_params"] == ref["active_params"]
    assert g["gmacs_per_sample"] == pytest.approx(ref["macs"] / 1e9)


def test_cost_report_sizes_and_measurement():
    torch.manual_seed(0)
    model = SparseDiT(_tiny())
    rows = cost_report(model, [(2, 8, 8), (4, 16, 16)], num_inference_steps=2, repeats=5, warmup=1)
    assert [r["size"] for r in rows] == [[2, 8, 8], [4, 16, 16]]
    for r in rows:
        assert r["forward_macs"] == count(model.config, (3, *r["size"]))["macs"]
        assert len(r["latency_runs_ms"]) == 5
        assert r["latency_ms"] == statistics.median(r["latency_runs_ms"])
        assert r["throughput_videos_per_s"] == pytest.approx(1e3 / r["latency_ms"])
        assert r["peak_memory_bytes"] > 0
    # the larger video has 8x the tokens: more than 8x the MACs (attention grows quadratically)
    assert rows[1]["tokens"] == 8 * rows[0]["tokens"]
    assert rows[1]["macs"] > 8 * rows[0]["macs"]
    with pytest.raises(ValueError, match="repeats"):
        measure_generation(model, (2, 8, 8), repeats=3)


def test_timestep_grid_and_fixed_noise():
    assert timestep_grid(4).tolist() == pytest.approx([0.125, 0.375, 0.625, 0.875])
    a, b = fixed_noise((3, 2, 4, 4), 0, 1, 5), fixed_noise((3, 2, 4, 4), 0, 1, 5)
    assert torch.equal(a, b)
    assert not torch.equal(a, fixed_noise((3, 2, 4, 4), 0, 1, 6))
    assert not torch.equal(a, fixed_noise((3, 2, 4, 4), 0, 2, 5))
    with pytest.raises(ValueError, match="num_t"):
        timestep_grid(0)


class _Zero(torch.nn.Module):
    """Predicts velocity 0: its loss is E|noise - x0|^2 over the predicted frames."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, context_mask=None, return_aux=False, **kw):
        out = x * self.w
        return (out, DiTAux(loss=out.new_zeros(()))) if return_aux else out


def test_heldout_loss_matches_hand_computation_and_is_batch_invariant():
    torch.manual_seed(0)
    videos = torch.rand(5, 3, 4, 8, 8) * 2 - 1
    r = heldout_loss(_Zero(), videos, context_frames=1, num_t=3, seed=7, batch_size=2)
    ref = []
    for j in range(3):
        per = [((fixed_noise((3, 4, 8, 8), 7, j, i) - videos[i])[:, 1:] ** 2).mean() for i in range(5)]
        ref.append(float(torch.stack(per).mean()))
    assert r["per_t"] == pytest.approx(ref, rel=1e-5)
    assert r["loss"] == pytest.approx(sum(ref) / 3, rel=1e-5)
    # a real model: same problems for any batch size, other problems for another seed
    model = SparseDiT(_tiny())
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    a = heldout_loss(model, videos, context_frames=1, num_t=3, seed=7, batch_size=5, objective=FlowMatching())
    b = heldout_loss(model, videos, context_frames=1, num_t=3, seed=7, batch_size=2)
    c = heldout_loss(model, videos, context_frames=1, num_t=3, seed=8, batch_size=2)
    assert a["per_t"] == pytest.approx(b["per_t"], rel=1e-5)
    assert a["loss"] != pytest.approx(c["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="context_frames"):
        heldout_loss(model, videos, context_frames=4)
