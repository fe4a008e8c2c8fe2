"""Official DiT checkpoints convert exactly (issue 13). The reference is facebookresearch/DiT's
model written out here from its published formulas (models.py: 2D sin-cos positions from
``np.meshgrid(grid_w, grid_h)``, adaLN-Zero blocks, ``nhwpqc->nchpwq`` unpatchify), with random
weights saved in DiT's key layout; the converted model must give its outputs (fp32, 1e-4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_dit.cli import main as cli_main
from sparse_dit.config import ModelConfig
from sparse_dit.convert import ConversionError, convert_dit, load_checkpoint
from sparse_dit.dit import SparseDiT
from sparse_dit.modules.embeddings import sincos_pos_embed

D, DEPTH, HEADS, P, SIZE, C, CLASSES = 64, 2, 4, 2, 8, 4, 10


# --- DiT's reference, as published ------------------------------------------------------------
def dit_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def dit_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    gh = np.arange(grid_h, dtype=np.float32)
    gw = np.arange(grid_w, dtype=np.float32)
    grid = np.meshgrid(gw, gh)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    emb_h = dit_1d(embed_dim // 2, grid[0])  # DiT calls it emb_h; it encodes the column
    emb_w = dit_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RefBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def attention(self, x):  # timm Attention
        B, N, _ = x.shape
        qkv = self.attn.qkv(x).reshape(B, N, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5
        x = (a.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, D)
        return self.attn.proj(x)

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attention(modulate(self.norm1(x), shift_msa, scale_msa))
        h = self.mlp.fc2(F.gelu(self.mlp.fc1(modulate(self.norm2(x), shift_mlp, scale_mlp)), approximate="tanh"))
        return x + gate_mlp.unsqueeze(1) * h


class RefDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.out_channels = 2 * C  # learn_sigma
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(C, D, P, P)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(CLASSES + 1, D)
        n = (SIZE // P) ** 2
        self.pos_embed = nn.Parameter(torch.from_numpy(dit_2d(D, SIZE // P, SIZE // P)).float().unsqueeze(0), requires_grad=False)
        assert self.pos_embed.shape == (1, n, D)
        self.blocks = nn.ModuleList(RefBlock() for _ in range(DEPTH))
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(D, P * P * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, x, t, y):
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.t_embedder.mlp(self.timestep_embedding(t, 256)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(self.final_layer.norm_final(x), shift, scale))
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, P, P, self.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], self.out_channels, h * P, h * P)


def _config() -> ModelConfig:
    return ModelConfig(in_channels=C, patch_size=(1, P, P), hidden_size=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=4.0,
                       activation="gelu_tanh", pos_embed="sincos", qk_norm=False, qkv_bias=True, num_classes=CLASSES,
                       text_dim=0, cross_attention=False, learn_sigma=True)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = RefDiT().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights everywhere (adaLN too, so every path matters)
        for name, p in ref.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return ref


# --- tests ----------------------------------------------------------------------------------------
def test_positions_are_dits_width_first_layout_with_no_temporal_term_at_one_frame():
    for h, w in ((4, 4), (3, 5)):
        ref = torch.from_numpy(dit_2d(D, h, w)).float()
        torch.testing.assert_close(sincos_pos_embed((1, h, w), D), ref, atol=1e-6, rtol=0)
    video = sincos_pos_embed((3, 3, 5), D).view(3, 15, D)
    torch.testing.assert_close(video[0], torch.from_numpy(dit_2d(D, 3, 5)).float(), atol=1e-6, rtol=0)  # frame 0 = the image
    assert (video[1] - video[0]).abs().max() > 0.1  # later frames are told apart


def test_converted_dit_gives_the_reference_outputs(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "DiT-tiny.pt")
    assert "pos_embed" in torch.load(tmp_path / "DiT-tiny.pt", weights_only=True)  # DiT's layout, buffer included
    model = convert_dit(load_checkpoint(tmp_path / "DiT-tiny.pt"), _config())
    model.save_pretrained(tmp_path / "out")
    model = SparseDiT.from_pretrained(tmp_path / "out").eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, C, SIZE, SIZE, generator=g)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([1, 7, CLASSES])  # the null class too
    with torch.no_grad():
        want = reference(x, t, y)
        got = model(x[:, :, None], t.float() / 1000, class_labels=y)[:, :, 0]
    assert got.shape == want.shape == (3, 2 * C, SIZE, SIZE)
    assert want.abs().max() > 0.1
    assert (got - want).abs().max().item() <= 1e-4


def test_training_checkpoints_give_their_ema_and_bad_ones_one_line(reference, tmp_path, capsys):
    sd = reference.state_dict()
    torch.save({"model": {k: v * 0 for k, v in sd.items()}, "ema": sd}, tmp_path / "train.pt")
    assert torch.equal(load_checkpoint(tmp_path / "train.pt")["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    bad = dict(sd)
    bad["pos_embed"] = bad["pos_embed"].view(1, 4, 4, D).transpose(1, 2).reshape(1, 16, D)  # height-first
    with pytest.raises(ConversionError, match="pos_embed differs"):
        convert_dit(bad, _config())
    with pytest.raises(ConversionError, match="x_embedder.proj.weight.*has shape"):
        convert_dit(sd, _config().replace(hidden_size=128, num_heads=4))
    torch.save(sd, tmp_path / "tiny.pt")
    rc = cli_main(["convert", "dit", str(tmp_path / "tiny.pt"), "--preset", "DiT-XL/2", "--out", str(tmp_path / "xl")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "has shape" in err and len(err.splitlines()) == 1
    rc = cli_main(["convert", "dit", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
