"""Video compression networks: shapes, causality in time, the objective."""

import pytest
import torch

from sparse_dit.data.synthetic import moving_squares
from sparse_dit.vae import CausalVideoVAE, IdentityVAE, VAEConfig, kl_divergence


def _tiny() -> CausalVideoVAE:
    return CausalVideoVAE(VAEConfig(base_channels=8, channel_mult=(1, 2, 2), temporal_down=1, latent_channels=4))


@pytest.mark.parametrize("T,H,W", [(1, 8, 8), (5, 8, 12), (9, 16, 8)])
def test_shapes_images_and_videos(T, H, W):
    vae = _tiny()
    x = torch.rand(2, 3, T, H, W) * 2 - 1
    z = vae.encode(x)
    assert tuple(z.shape[1:]) == vae.latent_shape(T, H, W) == (4, 1 + (T - 1) // 2, H // 4, W // 4)
    assert vae.decode(z).shape == x.shape
    with pytest.raises(ValueError, match="1 \\+ a multiple"):
        vae.latent_shape(4, 8, 8)
    with pytest.raises(ValueError, match="multiples of the spatial compression 4"):
        vae.latent_shape(5, 10, 8)


def test_encoder_and_decoder_are_causal_in_time():
    torch.manual_seed(0)
    vae = _tiny().eval()
    x = torch.randn(1, 3, 9, 8, 8)
    y = x.clone()
    y[:, :, 5:] += 1.0  # change frames 5..8 only
    zx, zy = vae.encode(x), vae.encode(y)
    # latent frame i sees video frames <= 2i: frames 0, 1, 2 (video <= 4) are unchanged
    torch.testing.assert_close(zx[:, :, :3], zy[:, :, :3])
    assert (zx[:, :, 3:] - zy[:, :, 3:]).abs().max() > 1e-4
    dz = zx.clone()
    dz[:, :, 4] += 1.0
    rx, rd = vae.decode(zx), vae.decode(dz)
    torch.testing.assert_close(rx[:, :, :7], rd[:, :, :7])  # latent 4 decodes to frames 7, 8
    assert (rx[:, :, 7:] - rd[:, :, 7:]).abs().max() > 1e-4


def test_objective_and_kl():
    assert kl_divergence(torch.zeros(3), torch.zeros(3)).item() == 0.0
    # KL(N(1, e^0) || N(0, 1)) = 0.5 per element
    assert kl_divergence(torch.ones(4), torch.zeros(4)).item() == pytest.approx(0.5)
    vae = _tiny()
    x = torch.rand(2, 3, 5, 8, 8) * 2 - 1
    out = vae.loss(x, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(p.grad is not None for p in vae.parameters())
    # a few steps of Adam learn to reconstruct (compressible) moving squares
    x = moving_squares(2, 5, 16, 16, generator=torch.Generator().manual_seed(0))[0]
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    first = vae.loss(x, generator=torch.Generator().manual_seed(0))["recon"].item()
    for _ in range(12):
        opt.zero_grad()
        loss = vae.loss(x, generator=torch.Generator().manual_seed(0))
        loss["loss"].backward()
        opt.step()
    assert loss["recon"].item() < 0.6 * first


def test_identity():
    vae = IdentityVAE()
    x = torch.randn(1, 3, 2, 4, 4)
    assert vae.encode(x) is x and vae.decode(x) is x and vae.latent_shape(2, 4, 4) == (3, 2, 4, 4)


# ------------------------------------------------------------------ a deeper decoder, grown


def _debug_config(**kw) -> VAEConfig:
    return VAEConfig(**{"latent_channels": 4, "base_channels": 8, "channel_mult": (1, 2), "temporal_down": 1, "num_res_blocks": 1, **kw})


def _trained_small(shortcut: bool = False) -> CausalVideoVAE:
    torch.manual_seed(0)
    small = CausalVideoVAE(_debug_config(shortcut=shortcut)).eval()
    with torch.no_grad():
        for p in small.parameters():
            p.normal_(0.0, 0.2)  # no weight left at zero by the initialisation
    return small


@pytest.mark.parametrize("shortcut", [False, True])
@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_grown_vae_starts_as_the_given_vae(part, shortcut):
    """decoder_res_blocks=3 (or num_res_blocks=3 with the decoder kept at 1) grown from a trained
    1-block VAE: every given weight keeps its value under the key of its module in the deeper
    net (the index map is written out here, not taken from the model), the added blocks are
    residual branches at zero, so encode and decode are exactly the given VAE's; the added
    blocks still get gradients, and the other net keeps its size."""
    small = _trained_small(shortcut)
    depth = {"decoder_res_blocks": 3} if part == "decoder" else {"num_res_blocks": 3, "decoder_res_blocks": 1}
    deep = CausalVideoVAE(_debug_config(shortcut=shortcut, **depth)).eval()
    state = deep.grown_state_dict(small.state_dict(), small.config)
    deep.load_state_dict(state)
    # decoder of (1, 2): [conv_in, res(stage 1), up, res(stage 0), norm, silu, conv_out]
    #            grown:  [conv_in, res, res+, res+, up, res, res+, res+, norm, silu, conv_out]
    # encoder of (1, 2): [conv_in, res(stage 0), down, res(stage 1), norm, silu, conv_out], grown alike
    moved = {"0": "0", "1": "1", "2": "4", "3": "5", "4": "8", "6": "10"}
    prefix = f"{part}.main." if shortcut else f"{part}."
    for k, v in small.state_dict().items():
        if k.startswith(prefix):
            i, rest = k[len(prefix):].split(".", 1)
            k = f"{prefix}{moved[i]}.{rest}"
        assert torch.equal(state[k], v), k
    for i in (2, 3, 6, 7):
        assert state[f"{prefix}{i}.conv2.conv.weight"].abs().max() == 0 and state[f"{prefix}{i}.conv2.conv.bias"].abs().max() == 0
        assert state[f"{prefix}{i}.conv1.conv.weight"].abs().max() > 0  # the branch's first conv keeps its initialisation
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        z = small.encode(x)
        assert torch.equal(deep.encode(x), z)
        assert torch.equal(deep.decode(z), small.decode(z))
    (deep.decode(z) if part == "decoder" else deep.encode_dist(x)[0]).square().mean().backward()
    net = getattr(deep, part).main if shortcut else getattr(deep, part)
    assert net[2].conv2.conv.weight.grad.abs().max() > 0 and net[7].conv2.conv.weight.grad.abs().max() > 0
    other = "encoder" if part == "decoder" else "decoder"
    size = lambda m, name: sum(p.numel() for p in getattr(m, name).parameters())  # noqa: E731
    assert size(deep, part) > size(small, part) and size(deep, other) == size(small, other)


def test_grown_decoder_refuses_other_shapes_and_shrinking():
    small = CausalVideoVAE(_debug_config())
    with pytest.raises(ValueError, match="cannot grow a VAE with latent_channels=4 into one with latent_channels=8"):
        CausalVideoVAE(VAEConfig(latent_channels=8, base_channels=8, channel_mult=(1, 2), temporal_down=1, decoder_res_blocks=2)
                       ).grown_state_dict(small.state_dict(), small.config)
    deep = CausalVideoVAE(_debug_config(decoder_res_blocks=3))
    with pytest.raises(ValueError, match="decoder_res_blocks may only grow"):
        small.grown_state_dict(deep.state_dict(), deep.config)
    bad = dict(small.state_dict())
    bad.pop("decoder.0.conv.weight")
    with pytest.raises(ValueError, match="missing \\['decoder.0.conv.weight'\\]"):
        deep.grown_state_dict(bad, small.config)


def test_grow_both_depths_and_refuse_a_shrinking_encoder():
    """num_res_blocks=2 with decoder_res_blocks unset grows both; the encoder never shrinks."""
    small = _trained_small()
    both = CausalVideoVAE(_debug_config(num_res_blocks=2)).eval()
    both.load_state_dict(both.grown_state_dict(small.state_dict(), small.config))
    assert len(both.encoder) == len(small.encoder) + 2 and len(both.decoder) == len(small.decoder) + 2
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(both.decode(both.encode(x)), small.decode(small.encode(x)))
    deep_enc = CausalVideoVAE(_debug_config(num_res_blocks=2, decoder_res_blocks=1))
    with pytest.raises(ValueError, match="2 encoder blocks per stage into one with 1: num_res_blocks may only grow"):
        small.grown_state_dict(deep_enc.state_dict(), deep_enc.config)


def test_decoder_res_blocks_unset_is_num_res_blocks_and_old_folders_load(tmp_path):
    """None (the default) builds the decoder of num_res_blocks, so VAE folders written before the
    field existed (no decoder_res_blocks in config.json) load unchanged."""
    import json

    a, b = CausalVideoVAE(_debug_config()), CausalVideoVAE(_debug_config(decoder_res_blocks=1))
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    deep = CausalVideoVAE(_debug_config(decoder_res_blocks=2))
    assert len(deep.decoder) == len(a.decoder) + 2 and len(deep.encoder) == len(a.encoder)
    a.save_pretrained(tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    assert cfg.pop("decoder_res_blocks") is None
    (tmp_path / "old" / "config.json").write_text(json.dumps(cfg))
    loaded = CausalVideoVAE.from_pretrained(tmp_path / "old")
    assert loaded.config.decoder_blocks == 1
    for k, v in a.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def _random_vae(seed: int = 0) -> CausalVideoVAE:
    torch.manual_seed(seed)
    vae = CausalVideoVAE(_debug_config(shortcut=True)).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.2)
    vae.set_latent_stats(torch.full((4,), 0.1), torch.full((4,), 2.0))
    return vae


def test_refine_moves_latents_toward_a_known_optimum_per_clip():
    """A video made by decoding known latents: refining a perturbed start lowers every clip's L1
    and brings the latents closer to the known ones; a clip refined in a batch equals it refined
    alone; the VAE's weights get no gradient and keep their values; 0 steps is the identity."""
    vae = _random_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    z_true = torch.randn(2, 4, 3, 8, 8, generator=g)
    with torch.no_grad():
        video = vae.decode(z_true)
    start = z_true + 0.3 * torch.randn(z_true.shape, generator=g)

    def l1(z):  # per clip, computed here from decode()
        with torch.no_grad():
            return (vae.decode(z) - video).abs().flatten(1).mean(1)

    out = vae.refine(video, start, steps=60, lr=1e-2)
    assert not out.requires_grad and out.shape == start.shape
    assert (l1(out) < 0.5 * l1(start)).all(), (l1(start), l1(out))
    dist = lambda z: (z - z_true).flatten(1).norm(dim=1)  # noqa: E731
    assert (dist(out) < 0.7 * dist(start)).all(), (dist(start), dist(out))
    # per clip: in float64 (the L1's sign makes float32 trajectories drift apart by rounding)
    vae64 = _random_vae().double()
    both = vae64.refine(video.double(), start.double(), steps=15, lr=1e-2)
    assert both.dtype == torch.float64
    torch.testing.assert_close(vae64.refine(video[1:].double(), start[1:].double(), steps=15, lr=1e-2), both[1:], atol=1e-9, rtol=0)
    assert all(p.grad is None for p in vae.parameters())
    for k, v in vae.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert vae.refine(video, start, steps=0) is start


def test_encode_refines_its_own_latents_and_refuses_bad_settings():
    vae = _random_vae(2)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x)
        refined = vae.encode(x, refine_steps=5, refine_lr=3e-2)
    assert torch.equal(refined, vae.refine(x, z, steps=5, lr=3e-2))
    assert not torch.equal(refined, z)
    for kw, msg in (({"refine_steps": -1}, "refine_steps=-1 must be an integer >= 0"),
                    ({"refine_steps": 2.5}, "refine_steps=2.5 must be an integer >= 0"),
                    ({"refine_steps": 3, "refine_lr": 0.0}, "refine_lr=0.0 must be > 0"),
                    ({"refine_steps": 3, "refine_lr": float("nan")}, "refine_lr=nan must be > 0")):
        with pytest.raises(ValueError, match=msg):
            vae.encode(x, **kw)
    with pytest.raises(ValueError, match=r"latents of shape \(2, 4, 3, 4, 4\) do not fit a video of shape \(2, 3, 5, 16, 16\)"):
        vae.refine(x, torch.zeros(2, 4, 3, 4, 4), steps=1)
