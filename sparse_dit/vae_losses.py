"""The VAE's training objective: L1 + KL, optional perceptual and adversarial terms.

:class:`VAEObjective` is the module the trainer wraps in its DeepSpeed engine when it trains a
VAE (``sparse-dit train-vae``): the VAE, and the discriminator when the adversarial term is on,
are its parameters, so one engine, one AdamW and one checkpoint hold both. Its forward returns
the loss to back-propagate and the terms to log.

- Reconstruction: mean |x - x_hat| (L1), as SD's and CogVideoX's VAEs use.
- KL to N(0, 1), weight ``kl_weight`` (SD: 1e-6): keeps the latents bounded, not a prior.
- Edge-weighted L1 (``edge_weight > 0``): mean ``|x - x_hat| * e(x)``, where ``e`` is the
  target frame's spatial gradient magnitude, max-pooled over 3x3 pixels (:func:`edge_map`).
  Plain L1 weighs every pixel alike, so a small object on a flat background (a ball: 0.7 % of a
  64x64 frame) gets 0.7 % of the loss, and the sub-pixel shape of its edge, which decides where
  a tracker puts its centroid, little of the capacity. This term puts weight where the target
  changes, whatever the content; on a flat frame it is zero. (Gradient-based reconstruction
  terms are common in video prediction, e.g. Mathieu et al. 2016's gradient difference loss.)
- Local-moment term (``moment_weight > 0``): mean ``|m0| + |mx| + |my|`` of the error
  ``e = x_hat - x`` over a ``moment_window`` square around every pixel of every frame and channel
  (:func:`moment_error`): its mean (m0) and its first moments about the square's centre (mx, my).
  A tracker puts an object's centroid at the first moment of its mask, so an error that is
  positive on one side of an object and negative on the other (the object drawn a fraction of a
  pixel off) moves the centroid while costing little L1. This term weighs the error's local mean
  and first moments, the low-frequency, one-sided part that moves centroids and the brightness of
  small objects; error that averages out within every square costs it nothing. (Matching local
  moments; no tracker or object is named.)
- Perceptual (``perceptual_weight > 0``): :class:`FeatureDistance`, an LPIPS-shaped distance
  (unit-normalised channels of a few conv stages, squared differences averaged per stage) on a
  *fixed, seeded random* conv net built in code: no pretrained weights can be downloaded here.
  Random conv features still respond to edges and texture that L1 averages away; a user with a
  pretrained net can load its weights into the same module (``feature_weights``).
- Adversarial (``adversarial_weight > 0``): :class:`PatchDiscriminator3D`, a small 3D conv
  patch discriminator with hinge loss (as VQGAN / MAGVIT-v2), from step ``adversarial_start``.
  Generator and discriminator train in the same backward: the generator's term runs the
  discriminator with *detached* parameters (no gradient into D), and the discriminator's terms
  see detached reconstructions (no gradient into the VAE).

# B = batch, C = channels, T = frames, H/W = height/width
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

from sparse_dit.schema import ConfigError, _Config, rule
from sparse_dit.vae import CausalVideoVAE, VAEConfig, kl_divergence

__all__ = ["VAELossConfig", "edge_map", "moment_error", "FeatureDistance", "PatchDiscriminator3D", "hinge_d_loss", "VAEObjective", "VAE_TERMS"]

# The terms VAEObjective reports, in this order (the trainer's reduced metrics).
VAE_TERMS = ("loss", "mse", "l1", "kl", "perceptual", "g_adv", "d_loss", "edge", "moment")


@dataclass
class VAELossConfig(_Config):
    """Loss terms of VAE training (the ``loss:`` section of a VAE recipe)."""

    # KL(q(z|x) || N(0, I)) weight (SD's VAE: 1e-6; larger smooths the latent, costs detail).
    kl_weight: float = field(default=1e-6, metadata=rule(ge=0))
    # Feature-distance term on a seeded random conv net (0 = off); LPIPS-style weights are ~0.1-1.
    perceptual_weight: float = field(default=0.0, metadata=rule(ge=0))
    # Optional safetensors of pretrained weights for the feature net (same shapes); None = seeded random.
    feature_weights: Optional[str] = None
    # Hinge-GAN generator weight (0 = off) and the step from which it (and D's training) starts.
    adversarial_weight: float = field(default=0.0, metadata=rule(ge=0))
    adversarial_start: int = field(default=0, metadata=rule(ge=0))
    # Width of the discriminator's first conv (doubles per stage, 3 stages).
    disc_channels: int = field(default=16, metadata=rule(ge=1))
    # Edge-weighted L1 (edge_map of the target; 0 = off). 20 on the 64x64 physics clips made the
    # weighted term about 5x the L1 and lowered the balls' velocity error (docs/vae.md).
    edge_weight: float = field(default=0.0, metadata=rule(ge=0))
    # Local-moment term (moment_error; 0 = off) and its square's side (odd, pixels: about an object's size).
    # 40 (window 9) on the 64x64 physics clips: +0.6 dB PSNR, velocity error 0.047 vs 0.051, not significant (docs/vae.md).
    moment_weight: float = field(default=0.0, metadata=rule(ge=0))
    moment_window: int = field(default=9, metadata=rule(ge=3))
    # Raw latents of this many training clips give the latent shift/scale after training.
    stats_videos: int = field(default=64, metadata=rule(ge=1))

    def _check(self) -> None:
        if self.moment_window % 2 == 0:
            raise ConfigError(f"loss.moment_window={self.moment_window} must be odd (a square centred on its pixel)")


class FeatureDistance(nn.Module):
    """LPIPS-shaped distance on a frozen conv net: per frame, each of ``stages`` conv stages
    (3x3 convs, ReLU, stride 2) is normalised to unit length over channels and the squared
    difference is averaged over positions; stages are summed.

    Args:
        channels: width of the first stage (doubles per stage).
        stages: number of stages.
        seed: initialisation seed (the same net on every rank and every run).
        weights: optional safetensors path with pretrained weights of this net.
    """

    def __init__(self, channels: int = 16, stages: int = 3, seed: int = 0, weights: Optional[str] = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        layers, cin = [], 3
        for i in range(stages):
            cout = channels * 2**i
            w = torch.randn(cout, cin, 3, 3, generator=gen) * (2.0 / (cin * 9)) ** 0.5  # He init
            layers.append(w)
            cin = cout
        # Buffers, not parameters: the net is frozen, never optimised or exported with the VAE.
        for i, w in enumerate(layers):
            self.register_buffer(f"w{i}", w, persistent=False)
        self.stages = stages
        if weights is not None:
            sd = load_file(weights)
            for i in range(stages):
                key = f"w{i}"
                if key not in sd or sd[key].shape != layers[i].shape:
                    raise ConfigError(f"loss.feature_weights={weights!r}: {key} missing or not of shape {tuple(layers[i].shape)}")
                getattr(self, key).copy_(sd[key])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised features of frames (N, 3, H, W) at every stage."""
        feats = []
        for i in range(self.stages):
            x = F.relu(F.conv2d(x, getattr(self, f"w{i}").to(x.dtype), stride=2 if i else 1, padding=1))
            feats.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-8))
        return feats

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean distance between videos (B, 3, T, H, W) ``a`` and ``b`` (a scalar)."""
        fa = self.features(rearrange(a, "b c t h w -> (b t) c h w"))
        fb = self.features(rearrange(b, "b c t h w -> (b t) c h w"))
        return sum((x - y).pow(2).sum(1).mean() for x, y in zip(fa, fb))


class PatchDiscriminator3D(nn.Module):
    """A small 3D conv patch discriminator: 3 strided stages, a logit per spacetime patch.

    Args:
        channels: width of the first stage (doubles per stage).
        in_channels: video channels.
    """

    def __init__(self, channels: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, c, 3, stride=(1, 2, 2), padding=1), nn.LeakyReLU(0.2),
            nn.Conv3d(c, 2 * c, 3, stride=(2, 2, 2), padding=1), nn.GroupNorm(1, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv3d(2 * c, 4 * c, 3, stride=(1, 2, 2), padding=1), nn.GroupNorm(1, 4 * c), nn.LeakyReLU(0.2),
            nn.Conv3d(4 * c, 1, 3, padding=1),
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, t, h, w), one per patch."""
        return self.net(video)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))), halved."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def edge_map(video: torch.Tensor) -> torch.Tensor:
    """Per-pixel edge strength (B, 1, T, H, W) of a video (B, C, T, H, W) in [-1, 1], in [0, 1].

    The spatial gradient magnitude of each frame, ``sqrt(dx^2 + dy^2)`` of forward differences
    averaged over channels (each difference is at most 2, so ``/ 2`` maps it into [0, 1]), then
    max-pooled over 3x3 pixels so that both sides of an edge are covered. Computed from the
    target only; no gradient flows through it.
    """
    with torch.no_grad():
        v = video.float()
        dx = F.pad(v[..., :, 1:] - v[..., :, :-1], (0, 1))
        dy = F.pad(v[..., 1:, :] - v[..., :-1, :], (0, 0, 0, 1))
        g = ((dx * dx + dy * dy).mean(dim=1, keepdim=True)).sqrt() / 2  # (B, 1, T, H, W)
        b, _, t, h, w = g.shape
        g = F.max_pool2d(rearrange(g, "b c t h w -> (b t) c h w"), 3, stride=1, padding=1)
        return rearrange(g, "(b t) c h w -> b c t h w", b=b, t=t).clamp(max=1.0).to(video.dtype)


def moment_error(recon: torch.Tensor, target: torch.Tensor, window: int) -> torch.Tensor:
    """Mean ``|m0| + |mx| + |my|`` of the error ``e = recon - target`` (videos (B, C, T, H, W)) over a
    ``window`` x ``window`` square around every pixel, per frame and channel (a scalar).

    ``m0`` is the mean of ``e`` over the square, ``mx`` the mean of ``e * (u - u0) / r`` with ``u``
    the column, ``u0`` the square's centre and ``r = (window - 1) / 2`` (so in [-1, 1] across it),
    ``my`` the same over rows; squares reaching past the frame count the outside as zero error.
    Computed with box filters: ``mean(e * u) - u0 * mean(e)``.
    """
    if window % 2 == 0 or window < 3:
        raise ValueError(f"window={window} must be odd and >= 3")
    e = rearrange(recon - target, "b c t h w -> (b c t) 1 h w")
    H, W = e.shape[-2:]
    u = torch.arange(W, dtype=e.dtype, device=e.device).view(1, 1, 1, W)
    v = torch.arange(H, dtype=e.dtype, device=e.device).view(1, 1, H, 1)
    r = (window - 1) / 2

    def box(z: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(z, window, stride=1, padding=window // 2, count_include_pad=True)

    m0 = box(e)
    mx = (box(e * u) - u * m0) / r
    my = (box(e * v) - v * m0) / r
    return m0.abs().mean() + mx.abs().mean() + my.abs().mean()


class VAEObjective(nn.Module):
    """The VAE plus what trains it; ``forward(video, step, generator)`` -> dict of :data:`VAE_TERMS`.

    Args:
        vae: the VAE config.
        loss: the loss config.
        seed: seed of the frozen feature net.
    """

    def __init__(self, vae: VAEConfig, loss: VAELossConfig, seed: int = 0) -> None:
        super().__init__()
        self.loss_config = loss
        self.vae = CausalVideoVAE(vae)
        self.perceptual = FeatureDistance(seed=seed, weights=loss.feature_weights) if loss.perceptual_weight > 0 else None
        self.disc = PatchDiscriminator3D(loss.disc_channels, vae.in_channels) if loss.adversarial_weight > 0 else None

    def forward(self, video: torch.Tensor, step: int = 0, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Loss of one batch (B, 3, T, H, W) in [-1, 1] at optimizer step ``step`` (0-based)."""
        lc = self.loss_config
        recon, mean, logvar = self.vae(video, generator)
        l1 = (recon - video).abs().mean()
        kl = kl_divergence(mean, logvar)
        loss = l1 + lc.kl_weight * kl
        zero = loss.new_zeros(())
        perc = g_adv = d_loss = edge = moment = zero
        if lc.edge_weight > 0:
            edge = ((recon - video).abs() * edge_map(video)).mean()
            loss = loss + lc.edge_weight * edge
        if lc.moment_weight > 0:
            moment = moment_error(recon, video, lc.moment_window)
            loss = loss + lc.moment_weight * moment
        if self.perceptual is not None:
            perc = self.perceptual(recon, video)
            loss = loss + lc.perceptual_weight * perc
        if self.disc is not None:
            on = float(step >= lc.adversarial_start)  # before the start D's loss is kept at 0 weight (gradients exist, all zero)
            frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
            g_adv = -functional_call(self.disc, frozen, (recon,)).mean()  # no gradient into D
            d_loss = hinge_d_loss(self.disc(video), self.disc(recon.detach()))  # no gradient into the VAE
            loss = loss + on * (lc.adversarial_weight * g_adv + d_loss)
        mse = (recon.detach() - video).pow(2).mean()
        return {"loss": loss, "mse": mse, "l1": l1.detach(), "kl": kl.detach(), "perceptual": perc.detach(),
                "g_adv": g_adv.detach(), "d_loss": d_loss.detach(), "edge": edge.detach(), "moment": moment.detach()}
