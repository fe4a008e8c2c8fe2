"""Sparse upcycling (sparse_dit/upcycle.py): the upcycled MoE model gives the dense model's output
(the reference is the dense model itself), in copy and split modes, for every router that allows
it; everything else is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sparse_dit.cli import main as cli_main
from sparse_dit.config import ModelConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.presets import load_recipe
from sparse_dit.recipes.init_from import load_init_weights
from sparse_dit.schema import to_dict
from sparse_dit.upcycle import UpcycleError, upcycle_config, upcycle_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _dense(activation: str = "gelu_tanh", text: bool = False) -> SparseDiT:
    cfg = ModelConfig(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=3, num_heads=2, activation=activation,
                      pos_embed="rope", num_classes=0, text_dim=8 if text else 0, cross_attention=text)
    model = SparseDiT(cfg)
    with torch.no_grad():  # a "trained" model: nothing zero (adaLN-Zero would hide the FFNs)
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def _inputs(model: SparseDiT, seed: int = 3) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 2, 8, 8, generator=g)
    t = torch.tensor([0.95, 0.5, 0.05])
    mask = torch.tensor([[True, False], [False, False], [False, True]])
    kw = {"context_mask": mask}
    if model.config.text_dim:
        kw.update(text_emb=torch.randn(3, 4, 8, generator=g), text_mask=torch.ones(3, 4, dtype=torch.bool))
    return (x, t), kw


def _assert_same_output(dense: SparseDiT, moe: SparseDiT) -> None:
    args, kw = _inputs(dense)
    with torch.no_grad():
        ref = dense(*args, **kw)
        out_inference = moe(*args, **kw)
    out_training = moe.train()(*args, **kw).detach()  # the autograd path, training mode
    scale = float(ref.abs().max())
    assert scale > 1.0  # the FFNs matter
    torch.testing.assert_close(out_inference, ref, rtol=0, atol=2e-6 * scale)
    torch.testing.assert_close(out_training, ref, rtol=0, atol=2e-6 * scale)


CASES = {
    # name: (preset, granularity, overrides, activation)
    "copy_top1_softmax": ("E4A1", 1, [], "gelu_tanh"),
    "copy_top2_renormalised": ("E4A2", 1, [], "gelu_tanh"),
    "copy_top1_sigmoid": ("E4A1", 1, ["moe.score_func=sigmoid"], "swiglu"),
    "copy_top2_not_renormalised": ("E8A2", 1, ["moe.renormalize=false"], "gelu_tanh"),
    "copy_shared": ("E4A2S1", 1, [], "gelu_tanh"),
    "copy_shared_swiglu": ("E4A1S2", 1, [], "swiglu"),
    "copy_timestep_routing_bias_balancing": ("E4A2", 1, ["moe.timestep_routing=true", "moe.bias_update_rate=0.01"], "gelu_tanh"),
    "copy_expert_choice": ("E4A2", 1, ["moe.router=expert_choice", "moe.capacity_factor=2.0"], "gelu_tanh"),
    "copy_noise_level": ("E4A1", 1, ["moe.router=noise_level", "moe.noise_boundaries=[0.5]"], "gelu_tanh"),
    "split_fine_grained": ("E4A4", 4, [], "gelu_tanh"),
    "split_fine_grained_swiglu": ("E8A8", 8, [], "swiglu"),
    "split_two_copies_per_slice": ("E8A8", 4, [], "gelu_tanh"),
    "split_shared": ("E3A3S1", 4, [], "gelu_tanh"),
    "split_noise_level": ("E4A2", 2, ["moe.router=noise_level", "moe.noise_boundaries=[0.5]"], "swiglu"),
    "split_expert_choice": ("E4A1", 4, ["moe.router=expert_choice", "moe.capacity_factor=4.0"], "gelu_tanh"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_upcycled_model_gives_the_dense_output(name: str) -> None:
    preset, g, overrides, act = CASES[name]
    dense = _dense(act, text=name == "copy_top1_softmax")
    cfg = upcycle_config(dense.config, preset, g, overrides)
    moe = upcycle_model(dense, cfg, check=False)  # the test checks, not the built-in probe
    assert sum(b.is_moe for b in moe.blocks) == 3
    assert cfg.moe.expert_hidden_dim == dense.config.ffn_hidden // g
    _assert_same_output(dense, moe)


def test_everything_but_the_ffn_is_copied_and_placement_is_kept() -> None:
    dense = _dense()
    cfg = upcycle_config(dense.config, "E4A1", 1, ["moe.every=2"])  # blocks 0 and 2 MoE, block 1 dense
    moe = upcycle_model(dense, cfg)
    src = dense.state_dict()
    for k, v in moe.state_dict().items():
        if k.startswith(("blocks.0.mlp.", "blocks.2.mlp.")):
            continue
        assert torch.equal(v, src[k]), k
    assert not moe.blocks[1].is_moe
    _assert_same_output(dense, moe)


def test_copy_mode_scales_the_output_layer_by_the_inverse_gate() -> None:
    """Top-1 softmax over 4 experts: each weight is 1/4 at a zero gate, so each expert's W2 and b2
    are the dense ones times 4 (what makes the output exact) and the gate is zero."""
    dense = _dense()
    moe = upcycle_model(dense, upcycle_config(dense.config, "E4A1"))
    layer, ffn = moe.blocks[0].mlp, dense.blocks[0].mlp
    torch.testing.assert_close(layer.experts.w2[2], 4 * ffn.fc2.weight.t())
    torch.testing.assert_close(layer.experts.b2[1], 4 * ffn.fc2.bias)
    torch.testing.assert_close(layer.experts.w1[3], ffn.fc1.weight.t())
    assert torch.equal(layer.router.gate.weight, torch.zeros_like(layer.router.gate.weight))
    # renormalised top-2: the weights sum to one, no scaling, the router keeps its random init
    moe2 = upcycle_model(dense, upcycle_config(dense.config, "E4A2"))
    torch.testing.assert_close(moe2.blocks[0].mlp.experts.w2[0], ffn.fc2.weight.t())
    assert moe2.blocks[0].mlp.router.gate.weight.abs().sum() > 0


BAD = {
    "batch_router": (("E4A2", 1, ["moe.router=batch"]), "router='batch' cannot be upcycled"),
    "expert_choice_partial": (("E4A2", 1, ["moe.router=expert_choice"]), "top_k * capacity_factor >= 4"),
    "capacity_dropping": (("E4A1", 1, ["moe.capacity_factor=1.25"]), "capacity_factor=1.25 can drop routes"),
    "split_not_every_expert": (("E8A2", 4, []), "need top_k = 8"),
    "granularity_not_divisor": (("E4A1", 3, []), "--granularity=3 does not divide the dense FFN width 128"),
    "too_many_shared": (("E4A2S2", 2, []), "2 shared experts"),
    "bad_preset": (("E4B1", 1, []), "--preset='E4B1'"),
    "preset_of_another_base": (("S/2-E8A2-fullwidth", 1, []), "differs from the dense model in in_channels (4 vs 3)"),
    "width_override": (("E4A1", 1, ["moe.expert_hidden_dim=64"]), "--set moe.expert_hidden_dim"),
    "non_moe_override": (("E4A1", 1, ["hidden_size=64"]), "only model.moe settings can change"),
    "bad_override_value": (("E4A1", 1, ["moe.router=nope"]), "model.moe.router"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_what_cannot_be_upcycled_exactly_is_one_line(name: str) -> None:
    (preset, g, overrides), msg = BAD[name]
    dense = _dense()
    with pytest.raises(UpcycleError) as exc:
        upcycle_model(dense, upcycle_config(dense.config, preset, g, overrides))
    assert msg in str(exc.value) and "\n" not in str(exc.value)


def test_an_moe_model_is_not_upcycled() -> None:
    dense = _dense()
    moe = upcycle_model(dense, upcycle_config(dense.config, "E4A2"))
    with pytest.raises(UpcycleError, match="already an MoE"):
        upcycle_config(moe.config, "E8A2")


def _run_dir(tmp_path: Path, dense: SparseDiT) -> Path:
    """A finished run folder as the trainer leaves it: recipe.yaml + final/."""
    run = tmp_path / "dense-run"
    dense.save_pretrained(run / "final")
    recipe = load_recipe(data={"model": to_dict(dense.config), "output_dir": str(run),
                               "data": {"source": "physics", "num_frames": 2, "height": 8, "width": 8}})
    (run / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    return run


def test_cli_writes_a_model_folder_and_a_recipe_that_trains_from_it(tmp_path: Path, capsys) -> None:
    dense = _dense()
    run = _run_dir(tmp_path, dense)
    out = tmp_path / "moe"
    assert cli_main(["upcycle", str(run), "--preset", "E4A4", "--granularity", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sparse-dit train" in printed and str(out / "recipe.yaml") in printed
    moe = SparseDiT.from_pretrained(out)
    assert moe.config.moe.num_experts == 4 and moe.config.moe.expert_hidden_dim == 32
    _assert_same_output(dense.eval(), moe)
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.model == moe.config and recipe.train.init_from == str(out) and recipe.output_dir == str(out / "run")
    fresh = SparseDiT(recipe.model)  # what `sparse-dit train OUT/recipe.yaml` builds, then init_from loads
    load_init_weights(fresh, recipe.train.init_from)
    for k, v in moe.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_cli_bad_inputs_are_one_line(tmp_path: Path, capsys) -> None:
    dense = _dense()
    model_dir = dense.save_pretrained(tmp_path / "dense")
    cases = [
        ([str(tmp_path / "missing"), "--preset", "E4A1"], "no such folder"),
        ([str(model_dir), "--preset", "E4A1", "--set", "moe.router=batch"], "router='batch'"),
        ([str(model_dir), "--preset", "E4A2", "--granularity", "0"], "--granularity=0 must be >= 1"),
        ([str(model_dir), "--preset", "E4A1", "--out", str(model_dir / "inside")], "lies inside DENSE_DIR"),
    ]
    for args, msg in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "out")]
        assert cli_main(["upcycle", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    # a model folder without a recipe: the model folder alone, and the command to train it
    assert cli_main(["upcycle", str(model_dir), "--preset", "E4A1", "--out", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "recipe.yaml").exists() and "train.init_from=" in capsys.readouterr().out
