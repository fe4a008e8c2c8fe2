"""The DiT trains with MoE FFNs, and the MoE auxiliary losses reach the training loss (issue 3)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sparse_dit.config import DiffusionConfig
from sparse_dit.diffusion import FlowMatching
from sparse_dit.dit import SparseDiT
from sparse_dit.moe import MoEFeedForward, is_moe_layer, moe_layers, summarize_aux, update_balance_biases
from sparse_dit.presets import preset_config


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**moe) -> SparseDiT:
    cfg = preset_config("debug-E4A2")
    cfg = dataclasses.replace(cfg, depth=3, moe=dataclasses.replace(cfg.moe, **moe))
    return SparseDiT(cfg)


def _batch(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(2, 3, 2, 8, 8, generator=gen)


def test_moe_placement_in_the_dit() -> None:
    torch.manual_seed(0)
    model = _tiny(every=2, first_dense=1)
    kinds = [isinstance(b.mlp, MoEFeedForward) for b in model.blocks]
    assert kinds == [False, True, False]
    assert kinds == [is_moe_layer(model.config.moe, i) for i in range(3)]


def test_aux_loss_reaches_the_training_loss_and_the_router() -> None:
    torch.manual_seed(0)
    fm = FlowMatching(DiffusionConfig(timestep_sampling="uniform", shift=1.0))
    grads = {}
    for coef in (0.0, 10.0):
        torch.manual_seed(0)
        model = _tiny(aux_loss_coef=coef, z_loss_coef=coef)
        # adaLN-Zero makes every block the identity at init, so the routers would see no task
        # gradient; open the gates so both paths are live.
        with torch.no_grad():
            for block in model.blocks:
                block.adaLN_modulation[-1].bias.normal_(std=0.5)
            model.final_layer.linear.weight.normal_(std=0.02)
        gen = torch.Generator().manual_seed(1)
        out = fm.training_losses(model, _batch(gen), generator=gen)
        _, aux = model(torch.randn(2, 3, 2, 8, 8), torch.rand(2), return_aux=True)
        assert len(aux.moe) == 3
        torch.testing.assert_close(out["loss"].detach(), out["mse"] + out["aux_loss"])
        if coef == 0.0:
            assert out["aux_loss"].item() == 0.0
        else:
            assert out["aux_loss"].item() > 0.0
        out["loss"].backward()
        grads[coef] = torch.cat([m.router.gate.weight.grad.flatten() for m in moe_layers(model)])
        assert grads[coef].abs().sum() > 0  # the router learns from the task loss
    # The aux losses change the router gradient: they are in the backward pass.
    assert not torch.allclose(grads[0.0], grads[10.0])


def test_dit_with_moe_trains() -> None:
    torch.manual_seed(0)
    model = _tiny(bias_update_rate=1e-3, score_func="sigmoid")
    fm = FlowMatching(DiffusionConfig(timestep_sampling="uniform", shift=1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    x0 = _batch(gen)  # one fixed batch: the loss must fall when we fit it
    losses = []
    for _ in range(12):
        out = fm.training_losses(model, x0, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        assert update_balance_biases(model) == 3
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    expert_grads = [m.experts.w1.grad for m in moe_layers(model)]
    assert all(g is not None and g.abs().sum() > 0 for g in expert_grads)
    assert any(m.router.expert_bias.abs().sum() > 0 for m in moe_layers(model))
    _, aux = model(x0, torch.rand(2), return_aux=True)
    scalars, hist = summarize_aux(aux.moe)
    assert set(scalars) >= {"moe/aux_loss", "moe/z_loss", "moe/max_violation", "moe/dropped_fraction", "moe/router_entropy"}
    assert hist is not None and hist.sum().item() == 3 * 2 * 32 * 2  # layers * B * tokens * k
