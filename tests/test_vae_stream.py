"""The causal VAE's memory paths and its saved form: temporal chunks through the causal cache
equal the one-shot result, spatial tiles with overlap are close to it, the latent shift/scale
normalise and round-trip, save/load is exact and loads no code, conv MACs match torch's counter,
and VAE recipe errors are one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from sparse_dit.presets import VAE_PRESETS
from sparse_dit.recipes.train_vae import load_vae_recipe
from sparse_dit.schema import ConfigError
from sparse_dit.vae import CausalVideoVAE, VAEConfig, latent_statistics, temporal_chunks, vae_macs

pytestmark = pytest.mark.usefixtures("one_thread")


def _vae(temporal_down: int = 2, **kw) -> CausalVideoVAE:
    torch.manual_seed(0)
    return CausalVideoVAE(VAEConfig(base_channels=8, channel_mult=(1, 2, 2), temporal_down=temporal_down, latent_channels=4, **kw)).eval()


def _smooth_video(T: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency random video in [-1, 1] (natural-image-like spectra make tile seams visible but bounded)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, T, H // 8, W // 8, generator=g)
    return torch.nn.functional.interpolate(x, size=(T, H, W), mode="trilinear").tanh()


@pytest.mark.parametrize("shortcut", [False, True])
@torch.no_grad()
def test_temporal_chunks_equal_one_shot(shortcut):
    vae = _vae(temporal_down=2, shortcut=shortcut)  # ft = 4
    if shortcut:  # leave the resampling start (main paths at zero): every layer takes part
        for q in vae.parameters():
            q.add_(torch.randn_like(q) * 0.1)
    x = _smooth_video(13, 16, 16)
    z = vae.encode(x)
    for chunk in (4, 8):
        torch.testing.assert_close(vae.encode(x, chunk_frames=chunk), z, atol=1e-5, rtol=1e-5)
    v = vae.decode(z)
    assert v.shape == x.shape
    for chunk in (1, 2):
        pieces = list(vae.decode_chunks(z, chunk_frames=chunk))
        assert len(pieces) == -(-z.shape[2] // chunk)  # one piece per latent chunk: streamable
        assert pieces[0].shape[2] == 1 + (chunk - 1) * 4  # the first holds the causal first frame
        torch.testing.assert_close(torch.cat(pieces, 2), v, atol=1e-5, rtol=1e-5)
    # causal with the resampling shortcut too: frames >= 9 change only latents >= 3 (frame 4i is latent i's last)
    y = x.clone()
    y[:, :, 9:] += 1.0
    zy = vae.encode(y)
    torch.testing.assert_close(zy[:, :, :3], z[:, :, :3])
    assert (zy[:, :, 3:] - z[:, :, 3:]).abs().max() > 1e-4
    # the chunk split itself: first 1 + c frames, then c each, covering T exactly
    assert temporal_chunks(21, 8) == [(0, 9), (9, 17), (17, 21)]
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(x, chunk_frames=6)


@torch.no_grad()
def test_shortcut_vae_starts_as_pool_then_repeat():
    # reference: the causal average pool (first frame alone, then groups of ft frames; fs x fs
    # blocks) and its nearest upsampling, written with reshapes
    ft, fs, C = 2, 4, 8
    torch.manual_seed(0)
    vae = CausalVideoVAE(VAEConfig(base_channels=8, channel_mult=(1, 2, 2), temporal_down=1, latent_channels=C, shortcut=True))
    x = torch.rand(2, 3, 9, 16, 12) * 2 - 1
    B, _, T, H, W = x.shape
    blocks = lambda v, t: v.reshape(B, 3, -1, t, H // fs, fs, W // fs, fs).mean((3, 5, 7))  # noqa: E731
    lat = torch.cat([blocks(x[:, :, :1], 1), blocks(x[:, :, 1:], ft)], 2)  # (B, 3, 5, 4, 3)
    up = lat.repeat_interleave(fs, 3).repeat_interleave(fs, 4)
    want = torch.cat([up[:, :, :1], up[:, :, 1:].repeat_interleave(ft, 2)], 2)
    mean, logvar = vae.encode_dist(x)
    torch.testing.assert_close(mean[:, :3], lat, atol=1e-6, rtol=0)
    assert mean[:, 3:].abs().max() == 0 and torch.all(logvar == -8.0)  # the other channels start unused
    torch.testing.assert_close(vae.decoder(mean), want, atol=1e-6, rtol=0)
    # without shortcuts the network starts elsewhere (random)
    plain = CausalVideoVAE(VAEConfig(base_channels=8, channel_mult=(1, 2, 2), temporal_down=1, latent_channels=C))
    assert (plain.decoder(plain.encode_dist(x)[0]) - want).abs().max() > 0.1


@torch.no_grad()
def test_spatial_tiles_are_close_to_one_shot_and_overlap_helps():
    vae = _vae(temporal_down=1)  # fs = 4
    x = _smooth_video(5, 96, 64, seed=1)
    z = vae.encode(x)
    v = vae.decode(z)
    err = {}
    for overlap in (0, 32):
        zt = vae.encode(x, tile=64, tile_overlap=overlap, chunk_frames=2)
        vt = vae.decode(z, tile=16, tile_overlap=overlap // 4, chunk_frames=2)
        assert torch.isfinite(zt).all() and torch.isfinite(vt).all() and zt.shape == z.shape and vt.shape == v.shape
        err[overlap] = ((zt - z).abs().mean() / z.abs().mean()).item(), ((vt - v).abs().mean() / v.abs().mean()).item()
    assert err[32][0] < 0.03 and err[32][1] < 0.03, err  # relative mean error with half-tile overlap (0.8 %, 0.9 % measured)
    assert err[0][0] > 3 * err[32][0] and err[0][1] > 3 * err[32][1], err  # seams without overlap (9 %, 9 %)
    with pytest.raises(ValueError, match="multiples of the spatial compression 4"):
        vae.encode(x, tile=30, tile_overlap=8)


@torch.no_grad()
def test_latent_shift_and_scale_normalise_and_round_trip():
    vae = _vae(temporal_down=1)
    videos = [_smooth_video(5, 16, 16, seed=s) for s in range(4)]
    raw = torch.cat([vae.encode_dist(x)[0] for x in videos])  # identity normalisation so far
    torch.testing.assert_close(torch.cat([vae.encode(x) for x in videos]), raw)
    mean, std = latent_statistics(vae, videos)
    # reference computed here: per-channel moments over (batch, t, h, w)
    torch.testing.assert_close(mean, raw.mean(dim=(0, 2, 3, 4)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, raw.std(dim=(0, 2, 3, 4), unbiased=False), atol=1e-5, rtol=1e-5)
    vae.set_latent_stats(mean, 1 / std)
    z = torch.cat([vae.encode(x) for x in videos])
    torch.testing.assert_close(z.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3, 4), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    # decode undoes the normalisation: decode(encode(x)) is the decoder of the raw mean
    torch.testing.assert_close(vae.decode(vae.encode(videos[0])), vae.decoder(vae.encode_dist(videos[0])[0]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_save_and_load_are_exact_and_safe(tmp_path):
    vae = _vae(temporal_down=1)
    vae.set_latent_stats(torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([2.0, 0.5, 1.0, 3.0]))
    out = vae.save_pretrained(tmp_path / "vae")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "causal_vae" and cfg["latent_channels"] == 4
    loaded = CausalVideoVAE.from_pretrained(out)
    for k, v in vae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = _smooth_video(5, 16, 16)
    assert torch.equal(vae.encode(x), loaded.encode(x)) and torch.equal(vae.decode(vae.encode(x)), loaded.decode(loaded.encode(x)))
    # a DiT folder, a missing file, a tampered tensor: one clear error each
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text(json.dumps({"hidden_size": 64}))
    save_file({}, str(tmp_path / "dit" / "model.safetensors"))
    with pytest.raises(ValueError, match="kind=None; expected 'causal_vae'"):
        CausalVideoVAE.from_pretrained(tmp_path / "dit")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text((out / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        CausalVideoVAE.from_pretrained(tmp_path / "half")
    sd = load_file(str(out / "model.safetensors"))
    sd["latent_scale"] = torch.ones(5)
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="latent_scale has shape \\(5,\\)"):
        CausalVideoVAE.from_pretrained(out)


def test_conv_macs_match_torch_flop_counter():
    cfg = VAE_PRESETS["vae-debug"]()
    macs = vae_macs(cfg, 5, 8, 8)
    vae = CausalVideoVAE(cfg)
    x = torch.zeros(1, 3, 5, 8, 8)
    with FlopCounterMode(display=False) as enc:
        z = vae.encoder(x)
    with FlopCounterMode(display=False) as dec:
        vae.decoder(z[:, :4])
    assert enc.get_total_flops() == 2 * macs["encode"] and dec.get_total_flops() == 2 * macs["decode"]
    assert macs["params"] == sum(p.numel() for p in vae.parameters())


@pytest.mark.parametrize("overrides,message", [
    (["preset=vae-huge"], "preset='vae-huge' is not a VAE preset; allowed: vae-4x8x8-c16"),
    (["data.num_frames=8"], "data.num_frames=8 must be 1 + a multiple of the VAE's temporal compression 2"),
    (["data.height=31"], "data.height=31, data.width=16 must be multiples of the VAE's spatial compression 2"),
    (["vae.temporal_down=3"], "vae.temporal_down=3 is out of range; allowed: 0..1"),
    (["vae.norm=batch"], "vae.norm='batch' is not allowed; choose one of ['pixel', 'group']"),
    (["loss.kl_weight=-1"], "loss.kl_weight=-1.0 is out of range; allowed: >= 0"),
    (["data.token_budget=64"], "data.token_budget=64 is a DiT training option"),
    (["train.compile=true"], "train.compile=True is a DiT training option"),  # compile_blocks compiles DiT blocks: a VAE would silently get none
    (["parallel.ep_size=2"], "parallel.ep_size=2 needs an MoE model"),
    (["model.hidden_size=8"], "a VAE recipe has no model section"),
])
def test_vae_recipe_errors_are_one_line(overrides, message):
    from _launch import REPO

    with pytest.raises(ConfigError) as info:
        load_vae_recipe(REPO / "recipes" / "vae" / "debug.yaml", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_shipped_vae_recipes_load():
    from _launch import REPO

    import yaml

    from sparse_dit.schema import to_dict

    for path in sorted((REPO / "recipes" / "vae").glob("*.yaml")):
        r, raw = load_vae_recipe(path), yaml.safe_load(path.read_text())
        assert to_dict(r.vae) == {**to_dict(VAE_PRESETS[raw["preset"]]()), **(raw.get("vae") or {})}, path
