"""MoE layer semantics: dense equivalences, balancing losses, bias balancing, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from sparse_dit.config import ModelConfig, MoEConfig
from sparse_dit.modules.mlp import FeedForward
from sparse_dit.moe import (
    MoEAux,
    MoEFeedForward,
    load_dense_into_experts,
    summarize_aux,
    update_balance_biases,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("backend", ["fused_local", "loop", "grouped_mm"])
def test_one_expert_top1_equals_dense_ffn(activation: str, backend: str) -> None:
    torch.manual_seed(0)
    dense = FeedForward(16, 48, activation)
    if activation == "gelu_tanh":
        torch.nn.init.normal_(dense.fc1.bias)
        torch.nn.init.normal_(dense.fc2.bias)
    moe = MoEFeedForward(16, 48, 1, 1, activation=activation, backend=backend)
    load_dense_into_experts(moe.experts, dense)
    x = torch.randn(2, 9, 16, requires_grad=True)
    y, _ = moe(x)
    y_ref = dense(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_identical_experts_with_renormalised_topk_equal_dense(score_func: str, activation: str) -> None:
    torch.manual_seed(1)
    dense = FeedForward(16, 32, activation)
    moe = MoEFeedForward(16, 32, 8, 2, activation=activation, score_func=score_func, renormalize=True)
    with torch.no_grad():
        moe.router.gate.weight.normal_()  # routing must not matter
    load_dense_into_experts(moe.experts, dense)
    x = torch.randn(3, 7, 16)
    y, _ = moe(x)
    torch.testing.assert_close(y, dense(x), atol=1e-5, rtol=1e-5)


def test_without_renormalisation_identical_experts_scale_by_topk_mass() -> None:
    # Sanity check that the previous test can fail: raw softmax top-2 weights sum to < 1.
    torch.manual_seed(1)
    dense = FeedForward(16, 32)
    moe = MoEFeedForward(16, 32, 8, 2, renormalize=False)
    load_dense_into_experts(moe.experts, dense)
    x = torch.randn(1, 5, 16)
    y, _ = moe(x)
    mass = torch.softmax(moe.router.gate(x), -1).topk(2, -1).values.sum(-1, keepdim=True)
    torch.testing.assert_close(y, dense(x) * mass, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, dense(x), atol=1e-3)


def test_balance_loss_and_z_loss_match_hand_computed_values() -> None:
    # Router logits are the tokens themselves (identity gate): rows (0, ln3), (ln3, 0), (0, ln4),
    # (0, ln9) -> softmax probs (.25, .75), (.75, .25), (.2, .8), (.1, .9); top-1 experts 1, 0, 1, 1.
    # f = (1/4, 3/4), P = (1.3/4, 2.7/4); balance = 2 * (0.25 * 0.325 + 0.75 * 0.675) = 1.175.
    # z = mean(logsumexp^2) = ((ln4)^2 + (ln4)^2 + (ln5)^2 + (ln10)^2) / 4.
    moe = MoEFeedForward(2, 4, 2, 1, aux_loss_coef=0.01, z_loss_coef=0.001)
    with torch.no_grad():
        moe.router.gate.weight.copy_(torch.eye(2))
    x = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0], [0.0, math.log(4)], [0.0, math.log(9)]])[None]
    _, aux = moe(x)
    z_hand = (2 * math.log(4) ** 2 + math.log(5) ** 2 + math.log(10) ** 2) / 4
    assert aux.balance_loss.item() == pytest.approx(1.175, rel=1e-5)
    assert aux.z_loss.item() == pytest.approx(z_hand, rel=1e-5)
    assert aux.loss.item() == pytest.approx(0.01 * 1.175 + 0.001 * z_hand, rel=1e-5)
    assert aux.tokens_per_expert.tolist() == [1.0, 3.0]
    assert aux.max_violation.item() == pytest.approx(3 / 2 - 1)
    ent = -sum(p * math.log(p) for row in ((0.25, 0.75), (0.75, 0.25), (0.2, 0.8), (0.1, 0.9)) for p in row) / 4
    assert aux.router_entropy.item() == pytest.approx(ent, rel=1e-5)
    # The balance loss is differentiable in the router probabilities (P), not in f.
    assert aux.loss.requires_grad


def test_bias_balancing_lowers_max_violation_of_a_skewed_router() -> None:
    # DeepSeek-V3's setting: sigmoid scores, bias step 0.01 (their gamma is 0.001 over far more steps).
    torch.manual_seed(0)
    D, E = 8, 8
    moe = MoEFeedForward(D, 16, E, 2, score_func="sigmoid", bias_update_rate=0.01, aux_loss_coef=0.0)
    with torch.no_grad():
        moe.router.gate.weight.normal_(std=0.5)
        moe.router.gate.weight[0, 0] += 1.5  # feature 0 has mean 2 below: experts 0 and 1 are favoured
        moe.router.gate.weight[1, 0] += 1.0
    moe.train()

    def batch() -> torch.Tensor:
        x = torch.randn(4, 32, D)
        x[..., 0] += 2.0
        return x

    violations = []
    for step in range(60):
        with torch.no_grad():
            _, aux = moe(batch())
        violations.append(aux.max_violation.item())
        assert update_balance_biases(moe) == 1
        assert moe.router.balance_counts.sum().item() == 0  # counts reset after the update
    assert violations[0] > 2.0
    assert sum(violations[-10:]) / 10 < 0.5
    assert abs(moe.router.expert_bias.sum().item()) < 1e-5  # kept centred
    # The bias changes selection only: the combine weights are the unbiased scores of the
    # selected experts (renormalised), while the selection differs from the unbiased top-k.
    with torch.no_grad():
        xb = batch()
        r = moe.router(xb)
        scores = torch.sigmoid(moe.router.gate(xb).view(-1, E))
    picked = scores.gather(1, r.expert_idx)
    torch.testing.assert_close(r.weight, picked / picked.sum(-1, keepdim=True))
    assert not torch.equal(r.expert_idx.sort(-1).values, scores.topk(2, -1).indices.sort(-1).values)


def test_bias_update_sums_counts_with_one_reduce_call() -> None:
    a = MoEFeedForward(4, 8, 4, 1, bias_update_rate=0.1)
    b = MoEFeedForward(4, 8, 4, 1, bias_update_rate=0.1)
    model = torch.nn.ModuleList([a, b])
    a.router.balance_counts.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    b.router.balance_counts.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    calls = []

    def fake_all_reduce(t: torch.Tensor) -> None:  # another rank saw the mirror image
        calls.append(t.numel())
        t.add_(t.flip(0))

    update_balance_biases(model, reduce_fn=fake_all_reduce)
    assert calls == [8]
    # packed (4,0,0,0 | 0,0,0,1) + its flip -> a's counts (5, 0, 0, 0): sign(mean - c) =
    # (-1, 1, 1, 1), centred (-1.5, .5, .5, .5), times the rate 0.1.
    torch.testing.assert_close(a.router.expert_bias, torch.tensor([-0.15, 0.05, 0.05, 0.05]))
    torch.testing.assert_close(b.router.expert_bias, torch.tensor([0.05, 0.05, 0.05, -0.15]))


def test_timestep_bin_load_and_summary() -> None:
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 16, 4, 2, stat_timestep_bins=4)
    x = torch.randn(3, 10, 8)
    t = torch.tensor([0.1, 0.15, 0.9])
    _, aux = moe(x, timesteps=t)
    load = aux.load_per_timestep_bin
    assert load.shape == (4, 4)
    assert load.sum(-1).tolist() == [40.0, 0.0, 0.0, 20.0]  # N*K routes per sample, by bin
    scalars, hist = summarize_aux([aux, aux])
    assert scalars["moe/aux_loss"] == pytest.approx(2 * aux.loss.item(), rel=1e-6)
    assert scalars["moe/z_loss"] == pytest.approx(aux.z_loss.item(), rel=1e-6)
    assert scalars["moe/max_violation"] == pytest.approx(aux.max_violation.item(), rel=1e-6)
    assert scalars["moe/dropped_fraction"] == 0.0
    assert scalars["moe/timestep_bin1_max_violation"] == 0.0  # empty bin
    assert {"moe/router_entropy", "moe/balance_loss", "moe/max_violation_worst"} <= set(scalars)
    torch.testing.assert_close(hist, 2 * aux.tokens_per_expert)
    assert isinstance(aux, MoEAux) and summarize_aux([]) == ({}, None)


def test_from_config_and_shard_experts_keep_the_right_slice() -> None:
    cfg = ModelConfig(hidden_size=32, num_heads=4, moe=MoEConfig(num_experts=4, top_k=2, granularity=2, timestep_routing=True, shared_experts=1))
    moe = MoEFeedForward.from_config(cfg, 0)
    assert moe.hidden_dim == cfg.ffn_hidden // 2 and moe.router.cond_proj is not None and moe.shared is not None
    w1 = moe.experts.w1.detach().clone()

    class FakeEP:  # stands in for the all-to-all dispatcher of sparse_dit.parallel
        expert_offset = num_local_experts = None

    d = FakeEP()
    moe.shard_experts(1, 2, d)  # type: ignore[arg-type]
    torch.testing.assert_close(moe.experts.w1.detach(), w1[2:4])
    assert (d.expert_offset, d.num_local_experts) == (2, 2)
    with pytest.raises(ValueError, match="already sharded"):
        moe.shard_experts(0, 2, d)  # type: ignore[arg-type]


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="top_k=3"):
        MoEFeedForward(8, 16, 2, 3)
    with pytest.raises(ValueError, match="activation"):
        MoEFeedForward(8, 16, 2, 1, activation="relu")
    with pytest.raises(ValueError, match="backend"):
        MoEFeedForward(8, 16, 2, 1, backend="cuda")
    with pytest.raises(ValueError, match="expert choice"):
        MoEFeedForward(8, 16, 2, 1, router="expert_choice", bias_update_rate=0.1)
    moe = MoEFeedForward(8, 16, 2, 1, cond_dim=8)
    with pytest.raises(ValueError, match="cond"):
        moe(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="x must have shape"):
        moe(torch.randn(3, 8))
    with pytest.raises(ImportError, match="megablocks"):
        MoEFeedForward(8, 16, 2, 1, backend="megablocks")(torch.randn(1, 3, 8, dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", ["fused_local", "loop", "grouped_mm"])
def test_bf16_autocast_runs_experts_in_bf16_and_router_in_fp32(backend: str) -> None:
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 32, 4, 2, shared_experts=1, backend=backend)
    x = torch.randn(2, 6, 16)
    y32, _ = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)
    assert y.dtype == torch.bfloat16 and aux.z_loss.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)
    y.float().square().sum().backward()
    assert moe.experts.w1.grad is not None and moe.experts.w1.grad.dtype == torch.float32
    assert moe.router.gate.weight.grad is not None and moe.shared.fc1.weight.grad is not None
