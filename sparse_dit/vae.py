"""Video compression networks: (B, 3, T, H, W) videos <-> (B, C, t, h, w) spacetime latents.

Two implementations share one interface (``encode``, ``decode``, ``latent_shape``):

- :class:`IdentityVAE`: pixel space, for tiny videos (the CPU demo and the physics world).
- :class:`CausalVideoVAE`: a causal 3D-convolutional VAE in the manner of MAGVIT-v2 /
  CogVideoX / Open-Sora: convolutions pad time on the left only, so latent frame i depends on
  video frames <= its last input frame, and the first frame is compressed on its own. A video of
  ``1 + k * ft`` frames maps to ``1 + k`` latent frames, and an image (T = 1) to one latent
  frame, which is how Sora's report trains one model on images and videos.

# B = batch, C = channels, T = frames
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["IdentityVAE", "CausalVideoVAE", "VAEConfig", "CausalConv3d", "FrameGroupNorm", "kl_divergence"]


class IdentityVAE(nn.Module):
    """Pixel space: the latent is the video itself (C = 3, no compression)."""

    temporal_compression = 1
    spatial_compression = 1

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.latent_channels = channels

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return self.latent_channels, frames, height, width

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        return video

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


@dataclass
class VAEConfig:
    """Shape of a :class:`CausalVideoVAE`.

    Args:
        in_channels: video channels.
        latent_channels: C of the latent (SD: 4; CogVideoX/Wan: 16).
        base_channels: width of the first stage; stage i has ``base_channels * mult[i]``.
        channel_mult: one entry per stage; every stage but the last halves H and W.
        temporal_down: how many of the downsampling stages also halve time (from the first).
        num_res_blocks: residual blocks per stage.
    """

    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    temporal_down: int = 2
    num_res_blocks: int = 1

    def __post_init__(self) -> None:
        if not self.channel_mult:
            raise ValueError("channel_mult must have at least one stage")
        if not 0 <= self.temporal_down <= len(self.channel_mult) - 1:
            raise ValueError(
                f"temporal_down={self.temporal_down} must lie in [0, {len(self.channel_mult) - 1}] (the downsampling stages)"
            )
        for name in ("in_channels", "latent_channels", "base_channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over all elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


class CausalConv3d(nn.Module):
    """Conv3d that pads time on the left only (replicating the first frame) and space symmetrically.

    Args:
        in_channels, out_channels: channels.
        kernel: (kt, kh, kw), odd spatial sizes.
        time_stride: temporal stride (2 halves T' = 1 + (T - 1) // 2).
        space_stride: spatial stride.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (3, 3, 3), time_stride: int = 1, space_stride: int = 1) -> None:
        super().__init__()
        kt, kh, kw = kernel
        self.time_pad = kt - 1
        self.space_pad = (kw // 2, kw // 2, kh // 2, kh // 2)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=(time_stride, space_stride, space_stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        return self.conv(F.pad(x, self.space_pad))


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (C/G, H, W) of each frame separately: normalising across time would let
    later frames leak into earlier ones and break causality."""

    def __init__(self, channels: int) -> None:
        groups = 32 if channels % 32 == 0 else (8 if channels % 8 == 0 else 1)
        super().__init__(groups, channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[0], x.shape[2]
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=B, t=T)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = FrameGroupNorm(cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class _Upsample(nn.Module):
    """Nearest x2 in space (and in time, dropping the duplicated first frame: 1 + k -> 1 + 2k)."""

    def __init__(self, channels: int, time: bool) -> None:
        super().__init__()
        self.time = time
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time:
            x = torch.repeat_interleave(x, 2, dim=2)[:, :, 1:]
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x)


class CausalVideoVAE(nn.Module):
    """A causal 3D-conv VAE: 2^(stages-1) spatial and 2^temporal_down temporal compression.

    Args:
        config: a :class:`VAEConfig`.
    """

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or VAEConfig()
        widths = [c.base_channels * m for m in c.channel_mult]
        n_down = len(widths) - 1
        self.spatial_compression = 2**n_down
        self.temporal_compression = 2**c.temporal_down
        self.latent_channels = c.latent_channels

        enc: list[nn.Module] = [CausalConv3d(c.in_channels, widths[0])]
        cin = widths[0]
        for i, w in enumerate(widths):
            for _ in range(c.num_res_blocks):
                enc.append(_ResBlock(cin, w))
                cin = w
            if i < n_down:
                enc.append(CausalConv3d(w, w, time_stride=2 if i < c.temporal_down else 1, space_stride=2))
        enc += [FrameGroupNorm(cin), nn.SiLU(), CausalConv3d(cin, 2 * c.latent_channels)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [CausalConv3d(c.latent_channels, widths[-1])]
        cin = widths[-1]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(c.num_res_blocks):
                dec.append(_ResBlock(cin, w))
                cin = w
            if i > 0:
                dec.append(_Upsample(w, time=(i - 1) < c.temporal_down))
        dec += [FrameGroupNorm(cin), nn.SiLU(), CausalConv3d(cin, c.in_channels)]
        self.decoder = nn.Sequential(*dec)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, t, h, w) of the latent of a (T, H, W) video; raises for unsupported sizes."""
        ft, fs = self.temporal_compression, self.spatial_compression
        if (frames - 1) % ft:
            raise ValueError(f"frames={frames} must be 1 + a multiple of the temporal compression {ft} (e.g. {1 + 2 * ft})")
        if height % fs or width % fs:
            raise ValueError(f"height={height} and width={width} must be multiples of the spatial compression {fs}")
        return self.latent_channels, 1 + (frames - 1) // ft, height // fs, width // fs

    def encode_dist(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the posterior, each (B, C, t, h, w)."""
        self.latent_shape(*video.shape[2:])
        mean, logvar = self.encoder(video).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> latent; the posterior mean unless ``sample``."""
        mean, logvar = self.encode_dist(video)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + (0.5 * logvar).exp() * noise

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, t, h, w) -> video (B, 3, 1 + (t - 1) * ft, h * fs, w * fs)."""
        return self.decoder(latents)

    def loss(self, video: torch.Tensor, kl_weight: float = 1e-6, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruction (L1) + ``kl_weight`` x KL: the usual latent-diffusion VAE objective without GAN/LPIPS."""
        mean, logvar = self.encode_dist(video)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        recon = self.decode(z)
        rec = (recon - video).abs().mean()
        kl = kl_divergence(mean, logvar)
        return {"loss": rec + kl_weight * kl, "recon": rec.detach(), "kl": kl.detach()}
