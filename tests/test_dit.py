"""The DiT: shapes at any size, adaLN-Zero, rotary positions, conditioning, save/load, presets.

Import hygiene (no deepspeed / torch.distributed in the model code, no cycles) is tests/test_imports.py.
"""

import pytest
import torch

from sparse_dit.config import ModelConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.modules.attention import RotaryEmbedding3D, apply_rotary, rope_axis_dims
from sparse_dit.presets import list_presets, preset_config


def _perturb(model: SparseDiT) -> SparseDiT:
    """Random weights everywhere, so tests see a non-trivial function (init outputs zero)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize(
    "shape",
    [(1, 2, 2), (1, 6, 10), (4, 8, 8), (3, 4, 12), (8, 2, 6), (2, 10, 4)],
)
def test_output_shape_any_size(shape):
    cfg = preset_config("debug")
    model = _perturb(SparseDiT(cfg))
    for B in (1, 3):
        x = torch.randn(B, cfg.in_channels, *shape)
        out = model(x, torch.rand(B), text_emb=torch.randn(B, 5, cfg.text_dim))
        assert out.shape == x.shape
        assert torch.isfinite(out).all()


def test_spacetime_patches_and_learned_sigma():
    cfg = ModelConfig(in_channels=4, patch_size=(2, 2, 4), hidden_size=48, depth=1, num_heads=4, learn_sigma=True,
                      num_classes=10, pos_embed="sincos", qk_norm=False)
    model = _perturb(SparseDiT(cfg))
    out = model(torch.randn(2, 4, 4, 6, 8), torch.rand(2), class_labels=torch.tensor([3, 10]))
    assert out.shape == (2, 8, 4, 6, 8)
    with pytest.raises(ValueError, match="T=5 is not divisible by the patch size 2"):
        model(torch.randn(1, 4, 5, 6, 8), torch.rand(1))
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 10\]"):
        model(torch.randn(1, 4, 4, 6, 8), torch.rand(1), class_labels=torch.tensor([11]))


def test_zero_output_at_init():
    cfg = preset_config("debug")
    model = SparseDiT(cfg)
    out = model(torch.randn(2, 3, 4, 8, 8), torch.rand(2), text_emb=torch.randn(2, 3, cfg.text_dim),
                context_mask=torch.tensor([[True, False, False, False]] * 2))
    assert torch.equal(out, torch.zeros_like(out))
    # ... but gradients reach the output layer, so training can start
    out = model(torch.randn(2, 3, 4, 8, 8), torch.rand(2))
    (out - 1).pow(2).mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_rope_scores_invariant_to_shifting_all_positions():
    head_dim = 24
    rope = RotaryEmbedding3D(head_dim)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 10, head_dim, generator=g)
    k = torch.randn(1, 2, 10, head_dim, generator=g)
    pos = torch.randint(0, 8, (10, 3), generator=g).float()

    def scores(p):
        cos, sin = rope.frequencies(p)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).transpose(-1, -2)

    base = scores(pos)
    shifted = scores(pos + torch.tensor([5.0, -3.0, 11.0]))
    torch.testing.assert_close(base, shifted, atol=1e-4, rtol=1e-4)
    # ...while moving one token along one axis does change its scores
    moved = pos.clone()
    moved[0, 0] += 1
    assert (scores(moved) - base).abs().max() > 1e-2
    # rotation preserves norms
    cos, sin = rope.frequencies(pos)
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert sum(rope_axis_dims(64)) == 64 and all(d % 2 == 0 for d in rope_axis_dims(64))


def test_rope_model_is_translation_equivariant_in_time():
    """With rotary positions and no absolute embedding, the model's output on a clip does not
    depend on where the clip sits in an absolute grid: cropping frames changes nothing but the
    attention context. Check the weaker exact property: a single-frame video gives the same
    output whatever its (only) position, i.e. no absolute position leaks in."""
    cfg = preset_config("debug").replace(text_dim=0, cross_attention=False)
    model = _perturb(SparseDiT(cfg))
    x = torch.randn(1, 3, 1, 4, 4)
    t = torch.tensor([0.3])
    a = model(x, t)
    grid_shift = model.rope.grid_positions
    model.rope.grid_positions = lambda grid, device=None: grid_shift(grid, device) + torch.tensor([7, 3, 2])
    b = model(x, t)
    model.rope.grid_positions = grid_shift
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_conditioning_changes_output_and_text_drop_uses_null():
    cfg = preset_config("debug")
    model = _perturb(SparseDiT(cfg))
    x, t = torch.randn(2, 3, 2, 4, 4), torch.rand(2)
    e1, e2 = torch.randn(2, 4, cfg.text_dim), torch.randn(2, 4, cfg.text_dim)
    o1 = model(x, t, text_emb=e1)
    assert (o1 - model(x, t, text_emb=e2)).abs().max() > 1e-4
    d1 = model(x, t, text_emb=e1, text_drop=torch.tensor([True, True]))
    d2 = model(x, t, text_emb=e2, text_drop=torch.tensor([True, True]))
    torch.testing.assert_close(d1, d2)  # a dropped caption is replaced by the null embedding
    # masked-out tokens do not matter
    e3 = e1.clone()
    e3[:, 2:] = 100.0
    mask = torch.tensor([[True, True, False, False]] * 2)
    torch.testing.assert_close(model(x, t, text_emb=e1, text_mask=mask), model(x, t, text_emb=e3, text_mask=mask))


def test_context_frames_use_clean_timestep_embedding():
    cfg = preset_config("debug").replace(text_dim=0, cross_attention=False)
    model = _perturb(SparseDiT(cfg))
    x = torch.randn(1, 3, 4, 4, 4)
    ctx = torch.tensor([[True, True, False, False]])
    out_ctx = model(x, torch.tensor([0.7]), context_mask=ctx)
    # all-context at t=0.7 equals plain t=0: context tokens see the t=0 embedding
    torch.testing.assert_close(model(x, torch.tensor([0.7]), context_mask=torch.ones(1, 4, dtype=torch.bool)),
                               model(x, torch.tensor([0.0])))
    assert (out_ctx - model(x, torch.tensor([0.7]))).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"context_mask must have shape \(B, T=4\)"):
        model(x, torch.tensor([0.7]), context_mask=torch.ones(1, 3, dtype=torch.bool))


def test_save_and_load_roundtrip(tmp_path):
    cfg = preset_config("debug")
    model = _perturb(SparseDiT(cfg))
    model.save_pretrained(tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.tmp"))
    loaded = SparseDiT.from_pretrained(tmp_path / "m")
    assert loaded.config == cfg
    x, t = torch.randn(1, 3, 2, 4, 4), torch.rand(1)
    torch.testing.assert_close(loaded(x, t), model(x, t))
    other = SparseDiT(cfg.replace(hidden_size=32))
    other.save_pretrained(tmp_path / "o")
    (tmp_path / "o" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(ValueError, match="has shape"):
        SparseDiT.from_pretrained(tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="config.json"):
        SparseDiT.from_pretrained(tmp_path / "nothing")


def test_presets_listed():
    names = list_presets()
    for n in ["debug", "DiT-S/2", "DiT-XL/8", "S/2", "B/4", "L/2", "XL/8"]:
        assert n in names
    assert preset_config("DiT-XL/2").learn_sigma and preset_config("DiT-XL/2").num_classes == 1000
    assert preset_config("S/2").cross_attention and preset_config("S/2").pos_embed == "rope"

