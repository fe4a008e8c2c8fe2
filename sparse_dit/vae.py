"""Video compression networks: (B, 3, T, H, W) videos <-> (B, C, t, h, w) spacetime latents.

Two implementations share one interface (``encode``, ``decode``, ``latent_shape``):

- :class:`IdentityVAE`: pixel space, for tiny videos (the CPU demo and the physics world).
- :class:`CausalVideoVAE`: a causal 3D-convolutional VAE in the manner of MAGVIT-v2 /
  CogVideoX / Open-Sora: convolutions pad time on the left only, so latent frame i depends on
  video frames <= its last input frame, and the first frame is compressed on its own. A video of
  ``1 + k * ft`` frames maps to ``1 + k`` latent frames, and an image (T = 1) to one latent
  frame, which is how Sora's report trains one model on images and videos.

``encode`` returns *normalised* latents ``(mean - latent_shift) * latent_scale`` (per channel;
the statistics are measured on training data after training, :func:`latent_statistics`) and
``decode`` undoes that first, so a diffusion model sees roughly unit-variance latents. Both take
``chunk_frames`` (temporal chunks through the causal cache: the result equals the one-shot
result) and ``tile`` / ``tile_overlap`` (spatial tiles blended linearly in the overlap) to keep
peak memory flat in the video's length and size. ``save_pretrained`` / ``from_pretrained``
write and read ``config.json`` + ``model.safetensors`` (nothing executes code on load).

# B = batch, C = channels, T = frames, H/W = height/width
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

from sparse_dit.schema import ConfigError, _Config, from_dict, rule, to_dict
from sparse_dit.weights import atomic_write, state_mismatch

__all__ = [
    "IdentityVAE", "CausalVideoVAE", "VAEConfig", "CausalConv3d", "FrameGroupNorm", "PixelNorm", "kl_divergence", "latent_statistics",
    "temporal_chunks", "tile_starts", "vae_macs",
]


class IdentityVAE(nn.Module):
    """Pixel space: the latent is the video itself (C = 3, no compression)."""

    temporal_compression = 1
    spatial_compression = 1

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.latent_channels = channels

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return self.latent_channels, frames, height, width

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
        return video

    def decode(self, latents: torch.Tensor, **_: Any) -> torch.Tensor:
        return latents


@dataclass
class VAEConfig(_Config):
    """Shape of a :class:`CausalVideoVAE` (named shapes: ``sparse_dit.presets.VAE_PRESETS``).

    Args:
        in_channels: video channels.
        latent_channels: C of the latent (SD: 4; CogVideoX/Wan: 16).
        base_channels: width of the first stage; stage i has ``base_channels * mult[i]``.
        channel_mult: one entry per stage; every stage but the last halves H and W.
        temporal_down: how many of the downsampling stages also halve time (from the first).
        num_res_blocks: residual blocks per encoder stage (and per decoder stage, unless
            ``decoder_res_blocks`` is set).
        decoder_res_blocks: residual blocks per decoder stage (None: ``num_res_blocks``). A
            deeper decoder than encoder is SD's layout (one more per stage). A trained VAE can
            grow either depth (:meth:`CausalVideoVAE.grown_state_dict`: the new blocks start as
            identities, so the grown VAE starts as the trained one).
        norm: ``"pixel"`` normalises the channels of each position (DC-AE / LTX-Video style): the
            network is then local, so spatial tiles with enough overlap match the whole frame
            (docs/vae.md); ``"group"`` is GroupNorm over each frame (SD / MAGVIT-v2), whose
            statistics differ between a tile and the whole frame.
    """

    in_channels: int = field(default=3, metadata=rule(ge=1))
    latent_channels: int = field(default=4, metadata=rule(ge=1))
    base_channels: int = field(default=64, metadata=rule(ge=1))
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    temporal_down: int = field(default=2, metadata=rule(ge=0))
    num_res_blocks: int = field(default=1, metadata=rule(ge=1))
    decoder_res_blocks: Optional[int] = field(default=None, metadata=rule(ge=1))
    norm: str = field(default="pixel", metadata=rule(choices=("pixel", "group")))
    # Resampling shortcuts around the whole encoder and decoder (in the spirit of DC-AE's residual
    # autoencoding): a causal average pool to the latent grid + 1x1 conv is added to the encoder's
    # output, and a 1x1 conv + causal nearest upsampling of the latent to the decoder's; the
    # model starts as that resampling autoencoder (identity projections, main paths' last convs
    # at zero: CausalVideoVAE._start_at_resampling) instead of near the mean frame.
    shortcut: bool = False

    def _check(self) -> None:
        if not self.channel_mult or any(int(m) < 1 for m in self.channel_mult):
            raise ConfigError(f"vae.channel_mult={list(self.channel_mult)!r} must be one or more positive ints (one per stage)")
        if not 0 <= self.temporal_down <= len(self.channel_mult) - 1:
            raise ConfigError(
                f"vae.temporal_down={self.temporal_down} is out of range; allowed: 0..{len(self.channel_mult) - 1} (the downsampling stages)"
            )

    @property
    def decoder_blocks(self) -> int:
        """Residual blocks per decoder stage (``decoder_res_blocks``, else ``num_res_blocks``)."""
        return self.num_res_blocks if self.decoder_res_blocks is None else self.decoder_res_blocks

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2**self.temporal_down


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over all elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


# --------------------------------------------------------------------------------------------
# Layers (with a streaming mode: the causal cache for temporal chunks)
# --------------------------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """Conv3d that pads time on the left only (replicating the first frame) and space symmetrically.

    In streaming mode (``self.stream`` is a dict, set by :meth:`CausalVideoVAE.streaming`) the
    module is fed consecutive temporal chunks: the first is padded like a whole video, later
    ones are prefixed with the cached tail of the previous input (the frames the next output
    window still needs, aligned to the stride), so the outputs concatenate to the one-shot output.

    Args:
        in_channels, out_channels: channels.
        kernel: (kt, kh, kw), odd spatial sizes.
        time_stride: temporal stride (2 halves T' = 1 + (T - 1) // 2).
        space_stride: spatial stride.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (3, 3, 3), time_stride: int = 1, space_stride: int = 1) -> None:
        super().__init__()
        kt, kh, kw = kernel
        self.kt, self.time_stride = kt, time_stride
        self.time_pad = kt - 1
        self.space_pad = (kw // 2, kw // 2, kh // 2, kh // 2)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride=(time_stride, space_stride, space_stride))
        self.stream: Optional[dict] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.stream.get("cache") if self.stream is not None else None
        if cache is not None:
            x = torch.cat([cache, x], dim=2)  # the previous chunk's tail
        elif self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        if self.stream is not None:
            n = max(0, (x.shape[2] - self.kt) // self.time_stride + 1)  # output windows in this chunk
            self.stream["cache"] = x[:, :, n * self.time_stride:].clone()  # where the next window starts
            x = x[:, :, : max(0, (n - 1) * self.time_stride + self.kt)]
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


class PixelNorm(nn.Module):
    """LayerNorm over the channels of each (frame, position), with a per-channel affine: no
    statistic spans time (causal) or space (tiles see what the whole frame sees)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)


_NORMS: dict[str, Callable[[int], nn.Module]] = {"pixel": PixelNorm, "group": FrameGroupNorm}


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str = "pixel") -> None:
        super().__init__()
        self.norm1 = _NORMS[norm](cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = _NORMS[norm](cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class _Upsample(nn.Module):
    """Nearest x2 in space (and in time, dropping the duplicated first frame: 1 + k -> 1 + 2k;
    in streaming mode only the first chunk holds the first frame)."""

    def __init__(self, channels: int, time: bool) -> None:
        super().__init__()
        self.time = time
        self.conv = CausalConv3d(channels, channels)
        self.stream: Optional[dict] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time:
            first = self.stream is None or not self.stream.get("seen")
            x = torch.repeat_interleave(x, 2, dim=2)[:, :, 1 if first else 0:]
            if self.stream is not None:
                self.stream["seen"] = True
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x)


class _PoolShortcut(nn.Module):
    """Causal average pool over (ft, fs, fs) (the first frame alone, as the encoder treats it)
    then a 1x1x1 conv; streaming: only the first chunk holds the first frame."""

    def __init__(self, cin: int, cout: int, ft: int, fs: int) -> None:
        super().__init__()
        self.ft, self.fs = ft, fs
        self.proj = nn.Conv3d(cin, cout, 1)
        self.stream: Optional[dict] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.stream is None or not self.stream.get("seen")
        if self.stream is not None:
            self.stream["seen"] = True
        if first and self.ft > 1:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.ft - 1, -1, -1), x], dim=2)
        return self.proj(F.avg_pool3d(x, (self.ft, self.fs, self.fs)))


class _UpShortcut(nn.Module):
    """1x1x1 conv then causal nearest upsampling by (ft, fs, fs) (1 + k latent frames -> 1 + k ft)."""

    def __init__(self, cin: int, cout: int, ft: int, fs: int) -> None:
        super().__init__()
        self.ft, self.fs = ft, fs
        self.proj = nn.Conv3d(cin, cout, 1)
        self.stream: Optional[dict] = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        first = self.stream is None or not self.stream.get("seen")
        if self.stream is not None:
            self.stream["seen"] = True
        y = torch.repeat_interleave(self.proj(z), self.ft, dim=2)
        if first:
            y = y[:, :, self.ft - 1:]
        return F.interpolate(y, scale_factor=(1, self.fs, self.fs), mode="nearest")


class _WithShortcut(nn.Module):
    """``main(x) + side(x)``."""

    def __init__(self, main: nn.Module, side: nn.Module) -> None:
        super().__init__()
        self.main, self.side = main, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.side(x)


# --------------------------------------------------------------------------------------------
# Chunks and tiles
# --------------------------------------------------------------------------------------------


def temporal_chunks(frames: int, chunk: Optional[int], first_extra: int = 1) -> list[tuple[int, int]]:
    """[(start, stop)] covering ``frames``: the first chunk holds ``first_extra + chunk`` frames
    (the causal first frame(s) plus a chunk), the rest ``chunk`` each (the last may be shorter).

    Args:
        frames: T.
        chunk: frames per chunk; None or >= T = one chunk.
        first_extra: extra frames of the first chunk (1 for a video: its lone first frame).
    """
    if chunk is None or first_extra + chunk >= frames:
        return [(0, frames)]
    bounds, start = [(0, first_extra + chunk)], first_extra + chunk
    while start < frames:
        bounds.append((start, min(frames, start + chunk)))
        start += chunk
    return bounds


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` overlapping by ``overlap`` that cover ``size``
    (the last tile is moved back to end at the edge)."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(n: int, left: int, right: int) -> torch.Tensor:
    """(n,) blending weights of a tile whose left/right edges overlap a neighbour by ``left`` /
    ``right`` samples (0 at an image border). The weight is 0 over the outer quarter of an
    overlap (where zero padding at the tile's edge has corrupted the output), rises linearly
    over its middle half and is 1 beyond: a neighbour with the same overlap covers the zeros."""
    d = torch.arange(n, dtype=torch.float64)
    w = torch.ones(n, dtype=torch.float64)
    for o, dist in ((left, d + 0.5), (right, n - d - 0.5)):
        if o:
            w = w * ((dist - o / 4) / (o / 2)).clamp(0, 1)
    return w.float()


# --------------------------------------------------------------------------------------------
# The causal VAE
# --------------------------------------------------------------------------------------------


# Adam's learning rate for CausalVideoVAE.refine, in normalised-latent units (latents of unit
# std): on the light preset's 64x64 physics clips the velocity error stops falling after about
# 25 steps at this rate (docs/vae.md).
REFINE_LR = 1e-2


def check_refine(steps: int, lr: float) -> None:
    """``refine_steps`` >= 0 (an int) and ``refine_lr`` > 0 (ValueError naming the field)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"refine_steps={steps!r} must be an integer >= 0 (0: the encoder's latents as they are)")
    if not lr > 0:
        raise ValueError(f"refine_lr={lr!r} must be > 0")


# Posterior log-variance of a shortcut VAE at initialisation: a std of 0.018 on latents in
# [-1, 1], small enough that the resampling start is not drowned in sampling noise.
LOGVAR_START = -8.0


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
        self.spatial_compression = c.spatial_compression
        self.temporal_compression = c.temporal_compression
        self.latent_channels = c.latent_channels

        enc: list[nn.Module] = [CausalConv3d(c.in_channels, widths[0])]
        cin = widths[0]
        for i, w in enumerate(widths):
            for _ in range(c.num_res_blocks):
                enc.append(_ResBlock(cin, w, c.norm))
                cin = w
            if i < n_down:
                enc.append(CausalConv3d(w, w, time_stride=2 if i < c.temporal_down else 1, space_stride=2))
        enc += [_NORMS[c.norm](cin), nn.SiLU(), CausalConv3d(cin, 2 * c.latent_channels)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [CausalConv3d(c.latent_channels, widths[-1])]
        cin = widths[-1]
        for i, w in reversed(list(enumerate(widths))):
            for _ in range(c.decoder_blocks):
                dec.append(_ResBlock(cin, w, c.norm))
                cin = w
            if i > 0:
                dec.append(_Upsample(w, time=(i - 1) < c.temporal_down))
        dec += [_NORMS[c.norm](cin), nn.SiLU(), CausalConv3d(cin, c.in_channels)]
        self.decoder = nn.Sequential(*dec)
        if c.shortcut:
            ft, fs = self.temporal_compression, self.spatial_compression
            self.encoder = _WithShortcut(self.encoder, _PoolShortcut(c.in_channels, 2 * c.latent_channels, ft, fs))
            self.decoder = _WithShortcut(self.decoder, _UpShortcut(c.latent_channels, c.in_channels, ft, fs))
            self._start_at_resampling()
        # Latent normalisation, per channel: encode returns (mean - shift) * scale. Identity
        # until measured on data (latent_statistics); saved with the weights.
        self.register_buffer("latent_shift", torch.zeros(c.latent_channels))
        self.register_buffer("latent_scale", torch.ones(c.latent_channels))

    @torch.no_grad()
    def _start_at_resampling(self) -> None:
        """With shortcuts: start training at a resampling autoencoder.

        The last convolutions of the encoder's and the decoder's main paths start at zero (their
        residuals grow from nothing, as in zero-initialised residual branches); the shortcut
        projections start as identities on the first ``min(in_channels, latent_channels)``
        channels (the other latent channels start unused) and the posterior log-variance at
        ``LOGVAR_START``. So at initialisation ``decode(encode_dist(x).mean)`` is the causal
        average pool of ``x`` to the latent grid, upsampled again by repetition: the ball is in
        the latent from step 0. With random projections the network started near the mean frame
        and needed hundreds of CPU steps to leave it (docs/vae.md).
        """
        c = self.config
        for main in (self.encoder.main, self.decoder.main):
            last = main[-1].conv
            last.weight.zero_()
            last.bias.zero_()
        n = min(c.in_channels, c.latent_channels)
        for proj in (self.encoder.side.proj, self.decoder.side.proj):
            proj.weight.zero_()
            proj.bias.zero_()
            proj.weight[:n, :n, 0, 0, 0] = torch.eye(n)
        self.encoder.side.proj.bias[c.latent_channels:] = LOGVAR_START

    @staticmethod
    def encoder_layout(config: VAEConfig) -> list[tuple]:
        """One tag per module of the encoder's main ``nn.Sequential``, in order: ``("in",)``,
        ``("res", stage, j)``, ``("down", stage)``, then ``("norm",)``, ``("act",)``, ``("out",)``."""
        tags: list[tuple] = [("in",)]
        for i in range(len(config.channel_mult)):
            tags += [("res", i, j) for j in range(config.num_res_blocks)]
            if i < len(config.channel_mult) - 1:
                tags.append(("down", i))
        return tags + [("norm",), ("act",), ("out",)]

    @staticmethod
    def decoder_layout(config: VAEConfig) -> list[tuple]:
        """One tag per module of the decoder's main ``nn.Sequential``, in order: ``("in",)``,
        ``("res", stage, j)``, ``("up", stage)``, then ``("norm",)``, ``("act",)``, ``("out",)``."""
        tags: list[tuple] = [("in",)]
        for i in reversed(range(len(config.channel_mult))):
            tags += [("res", i, j) for j in range(config.decoder_blocks)]
            if i > 0:
                tags.append(("up", i))
        return tags + [("norm",), ("act",), ("out",)]

    @torch.no_grad()
    def grown_state_dict(self, state: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
        """The weights ``state`` of a VAE of ``config``, laid out for this VAE, whose encoder
        (``num_res_blocks``) and decoder (``decoder_res_blocks``) have at least as many residual
        blocks per stage and which is otherwise the same shape.

        Every weight of ``state`` keeps its value. The blocks this VAE adds (after a stage's
        given blocks, in the encoder or the decoder) keep this model's initialisation with their
        last convolution at zero: ``x + 0``, so the grown VAE encodes and decodes exactly as the
        given one, and the new blocks learn a residual from there (zero-initialised residual
        branches, as in ``_start_at_resampling``). The latent statistics are copied, so at the
        start latents cached with the given VAE are the grown VAE's too (training the grown VAE
        then moves its encoder like any other fine-tuning).

        Raises:
            ValueError: the shapes differ in anything but the depths, a depth would shrink, or
                ``state`` does not fit ``config``.
        """
        depths = ("num_res_blocks", "decoder_res_blocks")
        mine, theirs = to_dict(self.config), to_dict(config)
        other = sorted(k for k in set(mine) | set(theirs) if k not in depths and mine.get(k) != theirs.get(k))
        if other:
            k = other[0]
            raise ValueError(f"cannot grow a VAE with {k}={theirs.get(k)!r} into one with {k}={mine.get(k)!r}: only "
                             "num_res_blocks (the encoder's depth) and decoder_res_blocks may differ")
        for name, given, wanted in (("num_res_blocks", config.num_res_blocks, self.config.num_res_blocks),
                                    ("decoder_res_blocks", config.decoder_blocks, self.config.decoder_blocks)):
            if given > wanted:
                part = "encoder" if name == "num_res_blocks" else "decoder"
                raise ValueError(f"cannot grow a VAE with {given} {part} blocks per stage into one with {wanted}: "
                                 f"{name} may only grow")
        with torch.device("meta"):  # shapes only: nothing allocated
            reference = CausalVideoVAE(config).state_dict()
        bad = state_mismatch(reference, state, "its config.json needs")
        if bad is not None:
            raise ValueError(f"the given VAE's weights {bad}")
        main = ".main." if self.config.shortcut else "."
        nets = []
        for net, layout, given in (("encoder", self.encoder_layout, config.num_res_blocks),
                                   ("decoder", self.decoder_layout, config.decoder_blocks)):
            index = {tag: i for i, tag in enumerate(layout(self.config))}
            nets.append((f"{net}{main}", index, layout(config), given))
        out = {k: v.detach().clone() for k, v in self.state_dict().items()}
        for k, v in state.items():
            for prefix, index, old_tags, _ in nets:
                if k.startswith(prefix):
                    i, rest = k[len(prefix):].split(".", 1)
                    k = f"{prefix}{index[old_tags[int(i)]]}.{rest}"
                    break
            out[k] = v.detach().clone().to(out[k].dtype)
        for prefix, index, _, given in nets:
            for tag, i in index.items():
                if tag[0] == "res" and tag[2] >= given:
                    out[f"{prefix}{i}.conv2.conv.weight"].zero_()
                    out[f"{prefix}{i}.conv2.conv.bias"].zero_()
        return out

    # ---------------------------------------------------------------- shapes and normalisation

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, t, h, w) of the latent of a (T, H, W) video; raises for unsupported sizes."""
        return self.latent_shape_of(self.config, frames, height, width)

    @staticmethod
    def latent_shape_of(config: VAEConfig, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, t, h, w) of a (T, H, W) video under ``config``, without building the model."""
        ft, fs = config.temporal_compression, config.spatial_compression
        if frames < 1 or (frames - 1) % ft:
            raise ValueError(f"frames={frames} must be 1 + a multiple of the temporal compression {ft} (e.g. {1 + 2 * ft})")
        if height % fs or width % fs:
            raise ValueError(f"height={height} and width={width} must be multiples of the spatial compression {fs}")
        return config.latent_channels, 1 + (frames - 1) // ft, height // fs, width // fs

    def _view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.dtype).view(1, -1, 1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latents -> the normalised latents :meth:`encode` returns."""
        return (z - self._view(self.latent_shift, z)) * self._view(self.latent_scale, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> raw latents (the decoder's input)."""
        return z / self._view(self.latent_scale, z) + self._view(self.latent_shift, z)

    def set_latent_stats(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        """Store the per-channel normalisation (shift = mean, scale = 1 / std of raw latents)."""
        self.latent_shift.copy_(torch.as_tensor(shift, dtype=self.latent_shift.dtype).reshape(-1))
        self.latent_scale.copy_(torch.as_tensor(scale, dtype=self.latent_scale.dtype).reshape(-1))

    # ---------------------------------------------------------------- streaming (chunks x tiles)

    def _stream_modules(self, net: nn.Module) -> list[nn.Module]:
        return [m for m in net.modules() if isinstance(m, (CausalConv3d, _Upsample, _PoolShortcut, _UpShortcut))]

    @contextlib.contextmanager
    def streaming(self, net: nn.Module) -> Iterator[Callable[[list[dict]], None]]:
        """Put ``net`` (the encoder or decoder) in streaming mode; yields ``use(states)``, which
        points every layer at one list of cache dicts (one list per spatial tile)."""
        mods = self._stream_modules(net)

        def use(states: list[dict]) -> None:
            for m, st in zip(mods, states):
                m.stream = st

        try:
            yield use
        finally:
            for m in mods:
                m.stream = None

    def _run(self, net: nn.Module, x: torch.Tensor, bounds: list[tuple[int, int]], scale: float,
             tile: Optional[int], overlap: int) -> Iterator[torch.Tensor]:
        """Run ``net`` over temporal chunks ``bounds`` of ``x`` and spatial tiles of side
        ``tile`` (input pixels) overlapping by ``overlap``; yields each chunk's output, tiles
        blended with linear ramps over the overlap. ``scale`` = output/input spatial size."""
        H, W = x.shape[-2:]
        tile_h = min(tile, H) if tile else H
        tile_w = min(tile, W) if tile else W
        ys, xs = tile_starts(H, tile_h, overlap), tile_starts(W, tile_w, overlap)
        tiles = [(y, x0) for y in ys for x0 in xs]
        if len(bounds) == 1 and len(tiles) == 1:
            yield net(x)
            return
        n_mods = len(self._stream_modules(net))
        states = {t: [{} for _ in range(n_mods)] for t in tiles}
        oh, ow = round(tile_h * scale), round(tile_w * scale)
        ov = round(overlap * scale)
        with self.streaming(net) as use:
            for t0, t1 in bounds:
                acc = weight = None
                for (y, x0) in tiles:
                    use(states[(y, x0)])
                    out = net(x[:, :, t0:t1, y:y + tile_h, x0:x0 + tile_w])
                    if len(tiles) == 1:
                        acc = out
                        break
                    if acc is None:
                        acc = out.new_zeros(*out.shape[:3], round(H * scale), round(W * scale))
                        weight = out.new_zeros(1, 1, 1, *acc.shape[-2:])
                    oy, ox = round(y * scale), round(x0 * scale)
                    wy = _ramp(oh, ov if y > 0 else 0, ov if y + tile_h < H else 0)
                    wx = _ramp(ow, ov if x0 > 0 else 0, ov if x0 + tile_w < W else 0)
                    w2 = (wy[:, None] * wx[None, :]).to(out)
                    acc[..., oy:oy + oh, ox:ox + ow] += out * w2
                    weight[..., oy:oy + oh, ox:ox + ow] += w2
                yield acc if weight is None else acc / weight

    def _check_tiling(self, tile: Optional[int], overlap: int, chunk: Optional[int], unit: int, what: str) -> None:
        fs = self.spatial_compression
        if chunk is not None and (chunk < 1 or chunk % unit):
            raise ValueError(f"chunk_frames={chunk} must be a positive multiple of {unit} ({what})")
        if tile is not None:
            if tile < 1 or tile % fs or overlap % fs or not 0 <= overlap < tile:
                raise ValueError(f"tile={tile}, tile_overlap={overlap} must be multiples of the spatial compression {fs} with 0 <= overlap < tile")

    # ---------------------------------------------------------------- encode / decode

    def encode_dist(self, video: torch.Tensor, chunk_frames: Optional[int] = None, tile: Optional[int] = None,
                    tile_overlap: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (mean, logvar) of the posterior, each (B, C, t, h, w) (not normalised).

        Args:
            video: (B, 3, T, H, W) in [-1, 1], T = 1 + k * ft.
            chunk_frames: encode T in chunks of this many frames (a multiple of ft) through the
                causal cache; the result equals the one-shot one. None = one pass.
            tile: encode in spatial tiles of this side (pixels, a multiple of fs); None = whole frames.
            tile_overlap: overlap of neighbouring tiles in pixels (a multiple of fs); latents are
                blended linearly over it.
        """
        self.latent_shape(*video.shape[2:])
        ft = self.temporal_compression
        self._check_tiling(tile, tile_overlap, chunk_frames, ft, "the temporal compression")
        bounds = temporal_chunks(video.shape[2], chunk_frames)
        h = torch.cat(list(self._run(self.encoder, video, bounds, 1 / self.spatial_compression, tile, tile_overlap)), dim=2)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
               chunk_frames: Optional[int] = None, tile: Optional[int] = None, tile_overlap: int = 0,
               refine_steps: int = 0, refine_lr: float = REFINE_LR) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> normalised latent (B, C, t, h, w); the posterior
        mean unless ``sample``. Chunk and tile options as :meth:`encode_dist`; ``refine_steps`` > 0
        then refines the latents against the video (:meth:`refine`)."""
        check_refine(refine_steps, refine_lr)
        mean, logvar = self.encode_dist(video, chunk_frames, tile, tile_overlap)
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + (0.5 * logvar).exp() * noise
        z = self.normalize(mean)
        return self.refine(video, z, refine_steps, refine_lr) if refine_steps else z

    def refine(self, video: torch.Tensor, latents: torch.Tensor, steps: int = 25, lr: float = REFINE_LR) -> torch.Tensor:
        """Semi-amortised encoding: improve the encoder's latents of ``video`` by gradient descent
        through the frozen decoder.

        Takes ``steps`` Adam steps (learning rate ``lr``, in normalised-latent units) on
        ``latents``, minimising each clip's mean absolute error between ``decode(latents)`` and
        ``video`` (the training loss's L1). Each clip's latents see only their own clip's loss, so
        the result does not depend on the batch. The VAE's weights get no gradient. Each step
        decodes the whole clip with gradients (no chunks or tiles), so memory is a training
        step's decoder half. Encoders leave an amortisation gap (Cremer et al. 2018, "Inference
        Suboptimality in Variational Autoencoders"); docs/vae.md measures what closing part of it
        does to the physics score.

        Args:
            video: (B, 3, T, H, W) in [-1, 1].
            latents: (B, C, t, h, w) normalised latents of ``video`` (as :meth:`encode` returns).
            steps: Adam steps (0 returns ``latents`` unchanged).
            lr: Adam's learning rate.

        Returns:
            The refined normalised latents, detached, in ``latents``' dtype (the steps run in at
            least float32).
        """
        check_refine(steps, lr)
        if steps == 0:
            return latents
        want = (video.shape[0], *self.latent_shape(*video.shape[2:]))
        if tuple(latents.shape) != want:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not fit a video of shape {tuple(video.shape)} (expected {want})")
        net_dtype = next(self.decoder.parameters()).dtype
        dtype = torch.promote_types(torch.promote_types(latents.dtype, net_dtype), torch.float32)  # Adam never in half precision
        target = video.detach().to(dtype)
        z = latents.detach().to(dtype).clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                err = (self.decoder(self.denormalize(z).to(net_dtype)).to(dtype) - target).abs().flatten(1).mean(1).sum()
                (z.grad,) = torch.autograd.grad(err, [z])
                opt.step()
        return z.detach().to(latents.dtype)

    def decode_chunks(self, latents: torch.Tensor, chunk_frames: Optional[int] = None, tile: Optional[int] = None,
                      tile_overlap: int = 0) -> Iterator[torch.Tensor]:
        """Decode normalised latents chunk by chunk; yields consecutive video pieces (the first
        1 + (c - 1) * ft frames, then c * ft each) so a long video can be written as it comes.

        Args:
            latents: (B, C, t, h, w), normalised as :meth:`encode` returns them.
            chunk_frames: latent frames per chunk (None = one pass).
            tile: tile side in latent pixels (output tiles are fs times larger); None = whole frames.
            tile_overlap: latent-pixel overlap of neighbouring tiles.
        """
        if chunk_frames is not None and chunk_frames < 1:
            raise ValueError(f"chunk_frames={chunk_frames} must be >= 1 (latent frames)")
        if tile is not None and not 0 <= tile_overlap < tile:
            raise ValueError(f"tile={tile}, tile_overlap={tile_overlap}: need 0 <= overlap < tile (latent pixels)")
        z = self.denormalize(latents)
        t, c = z.shape[2], chunk_frames or z.shape[2]
        bounds = [(s, min(s + c, t)) for s in range(0, t, c)]
        yield from self._run(self.decoder, z, bounds, float(self.spatial_compression), tile, tile_overlap)

    def decode(self, latents: torch.Tensor, chunk_frames: Optional[int] = None, tile: Optional[int] = None,
               tile_overlap: int = 0) -> torch.Tensor:
        """Normalised latent (B, C, t, h, w) -> video (B, 3, 1 + (t - 1) * ft, h * fs, w * fs);
        options as :meth:`decode_chunks` (tiles in latent pixels)."""
        return torch.cat(list(self.decode_chunks(latents, chunk_frames, tile, tile_overlap)), dim=2)

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction of a posterior sample, mean, logvar), raw latents."""
        mean, logvar = self.encode_dist(video)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decoder(z), mean, logvar

    def loss(self, video: torch.Tensor, kl_weight: float = 1e-6, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Reconstruction (L1) + ``kl_weight`` x KL (the trainer's objective adds the optional
        perceptual and adversarial terms: ``sparse_dit.vae_losses.VAEObjective``)."""
        recon, mean, logvar = self(video, generator)
        rec = (recon - video).abs().mean()
        kl = kl_divergence(mean, logvar)
        return {"loss": rec + kl_weight * kl, "recon": rec.detach(), "kl": kl.detach()}

    # ---------------------------------------------------------------- save / load

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``config.json`` (``{"kind": "causal_vae", ...VAEConfig}``) and ``model.safetensors``
        (weights + latent_shift/latent_scale) atomically into ``directory``.

        Args:
            directory: target folder (created).
            state_dict: weights to write instead of this model's own (e.g. EMA weights).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        sd = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous() for k, v in sd.items()}
        cfg = {"kind": "causal_vae", **to_dict(self.config)}
        atomic_write(directory / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))
        atomic_write(directory / "model.safetensors", lambda p: save_file(sd, p, metadata={"format": "pt"}))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "CausalVideoVAE":
        """Load a VAE written by :meth:`save_pretrained` (JSON + safetensors only); every key's
        shape is checked.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: the folder holds another kind of model or weights that do not fit.
        """
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing; expected a folder written by CausalVideoVAE.save_pretrained")
        raw = json.loads((directory / "config.json").read_text())
        kind = raw.pop("kind", None) if isinstance(raw, dict) else None
        if kind != "causal_vae":
            raise ValueError(f"{directory / 'config.json'} has kind={kind!r}; expected 'causal_vae' (a VAE folder, not a DiT's)")
        model = cls(from_dict(VAEConfig, raw, "vae."))
        sd = load_file(str(directory / "model.safetensors"), device=str(map_location))
        own = model.state_dict()
        bad = state_mismatch(own, sd, "the config needs")
        if bad is not None:
            raise ValueError(f"checkpoint {directory}: {bad}")
        model.load_state_dict(sd)
        return model.to(map_location).eval()


@torch.no_grad()
def latent_statistics(vae: CausalVideoVAE, videos: Iterable[torch.Tensor], eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) of the raw posterior means over ``videos`` (batches (B, 3, T, H, W)).

    ``vae.set_latent_stats(mean, 1 / std)`` then makes :meth:`CausalVideoVAE.encode` return
    latents of zero mean and unit variance per channel on that data (SD3 / Wan style shift and
    scale, measured after training).
    """
    n, s1, s2 = 0, None, None
    for video in videos:
        mean, _ = vae.encode_dist(video)
        m = rearrange(mean.double(), "b c t h w -> c (b t h w)")
        s1 = m.sum(1) if s1 is None else s1 + m.sum(1)
        s2 = (m * m).sum(1) if s2 is None else s2 + (m * m).sum(1)
        n += m.shape[1]
    if not n:
        raise ValueError("latent_statistics needs at least one video")
    mu = s1 / n
    std = (s2 / n - mu * mu).clamp_min(0).sqrt().clamp_min(eps)
    return mu.float(), std.float()



def vae_macs(config: VAEConfig, frames: int, height: int, width: int) -> dict[str, int]:
    """Multiply-accumulates of one (3, T, H, W) video through the encoder and of its latent
    through the decoder (convolutions only; norms and activations are a few % more), counted on
    the meta device (no memory, no compute).

    Returns:
        ``{"encode": MACs, "decode": MACs, "params": parameters}``.
    """
    with torch.device("meta"):
        vae = CausalVideoVAE(config)
    out: dict[str, int] = {}
    for name, net, shape in (("encode", vae.encoder, (1, config.in_channels, frames, height, width)),
                             ("decode", vae.decoder, (1, *vae.latent_shape(frames, height, width)))):
        total = [0]

        def hook(mod: nn.Module, inp: Any, res: torch.Tensor) -> None:
            total[0] += res.numel() * (mod.in_channels // mod.groups) * int(torch.tensor(mod.kernel_size).prod())

        handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv3d)]
        with torch.no_grad():
            net(torch.empty(shape, device="meta"))
        for h in handles:
            h.remove()
        out[name] = total[0]
    out["params"] = sum(p.numel() for p in vae.parameters())
    return out
