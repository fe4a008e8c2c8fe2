"""Analytic params/MACs against FlopCounterMode and against the DiT paper's table."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sparse_dit.config import ModelConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.flops import count
from sparse_dit.presets import preset_config

# DiT paper (Peebles & Xie 2023), Table 4: forward Gflops (multiply-accumulates) at 256x256
# (latent 4x32x32); params per model family (Table 1 / repository README).
DIT_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
DIT_PARAMS_M = {"S": 33.0, "B": 130.0, "L": 458.0, "XL": 675.0}


@pytest.mark.parametrize("name", list(DIT_GFLOPS))
def test_dit_paper_parity(name):
    out = count(preset_config(name), (4, 1, 32, 32))
    assert out["gmacs"] == pytest.approx(DIT_GFLOPS[name], rel=0.01)
    family = name.split("-")[1].split("/")[0]
    assert out["total_params"] / 1e6 == pytest.approx(DIT_PARAMS_M[family], rel=0.01)
    # ...and the analytic count equals the real module's parameter count
    with torch.device("meta"):
        model = SparseDiT(preset_config(name))
    assert out["total_params"] == model.num_params()


def _reference_sdpa(q, k, v, attn_mask=None, **kw):
    """Matmul attention, so FlopCounterMode sees the score and value products (its CPU SDPA
    kernel is not instrumented)."""
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize(
    "cfg,latent,text_len",
    [
        (preset_config("debug"), (3, 4, 8, 8), 7),
        (preset_config("debug").replace(activation="swiglu", patch_size=(2, 2, 2)), (3, 4, 8, 12), 3),
        (ModelConfig(in_channels=4, hidden_size=96, depth=2, num_heads=4, num_classes=10, learn_sigma=True,
                     pos_embed="sincos", qk_norm=False), (4, 1, 16, 16), 0),
    ],
)
def test_macs_match_flop_counter(cfg, latent, text_len, monkeypatch):
    model = SparseDiT(cfg)
    monkeypatch.setattr(F, "scaled_dot_product_attention", _reference_sdpa)
    x = torch.randn(1, *latent)
    kw = {"text_emb": torch.randn(1, text_len, cfg.text_dim)} if text_len else {}
    if cfg.num_classes:
        kw["class_labels"] = torch.tensor([1])
    with FlopCounterMode(display=False) as fc:
        model(x, torch.rand(1), **kw)
    measured = fc.get_total_flops() / 2
    analytic = count(cfg, latent, text_len=text_len)
    assert analytic["macs"] == pytest.approx(measured, rel=0.01)
    assert analytic["total_params"] == model.num_params()


def test_flops_cli_json_and_list():
    out = subprocess.run([sys.executable, "-m", "sparse_dit.cli", "flops", "DiT-XL/2", "--latent", "4,1,32,32", "--json"],
                         capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    for k in ("total_params", "active_params", "gmacs", "gflops"):
        assert k in d
    assert d["gflops"] == pytest.approx(2 * d["gmacs"]) and d["gmacs"] == pytest.approx(118.64, rel=0.01)
    names = subprocess.run([sys.executable, "-m", "sparse_dit.cli", "flops", "--list"], capture_output=True,
                           text=True, check=True).stdout.split()
    assert "DiT-S/2" in names and "debug" in names and "XL/2" in names


def test_flops_cli_reads_a_recipe_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: debug\nmodel:\n  depth: 3\n")
    out = subprocess.run([sys.executable, "-m", "sparse_dit.cli", "flops", str(recipe), "--latent", "3,4,8,8", "--json"],
                         capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    expected = count(preset_config("debug").replace(depth=3), (3, 4, 8, 8))
    assert d["total_params"] == expected["total_params"] and d["macs"] == expected["macs"]
    bad = subprocess.run([sys.executable, "-m", "sparse_dit.cli", "flops", "DiT-S/2", "--latent", "4,1,31,32"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "H=31 must be a positive multiple of the patch size 2" in bad.stderr
