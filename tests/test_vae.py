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
