"""The recipe's ``autoencoder``: the video compression network a DiT trains and samples through.

A recipe's top-level ``autoencoder`` is ``identity`` (pixel space, the default: the DiT sees the
videos themselves) or the folder of a trained VAE (``CausalVideoVAE.save_pretrained``, e.g. the
``final/`` of ``sparse-dit train-vae``). The trainer encodes its batches through it (frozen, in
eval mode, no gradients) or trains on latents cached by ``sparse-dit data encode``; sampling,
``sparse-dit generate`` and the evaluations decode through it (docs/vae.md, "The DiT in latent
space").

The identity of a VAE (:func:`autoencoder_id`) is a hash of its config and weights (latent
shift/scale included): cached latents record it, and a recipe whose autoencoder has another
identity is refused.

# C = channels, T = frames, H/W = height/width (pixels); c, t, h, w = the latent's
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from sparse_dit.schema import ConfigError, to_dict
from sparse_dit.vae import CausalVideoVAE, IdentityVAE

__all__ = ["IDENTITY", "check_autoencoder", "autoencoder_config", "load_autoencoder", "autoencoder_id", "latent_shape",
           "encode_videos", "check_fits"]

IDENTITY = "identity"


def autoencoder_config(spec: str, field: str = "autoencoder") -> Optional[dict]:
    """The VAE config (``config.json``) of ``spec``, None for ``identity``; one-line ConfigError
    for a missing folder or a folder that is not a VAE's.

    Args:
        spec: ``identity`` or a VAE folder.
        field: the name used in messages.
    """
    if spec == IDENTITY:
        return None
    path = Path(spec)
    allowed = "allowed: 'identity' or a VAE folder (config.json + model.safetensors from sparse-dit train-vae / save_pretrained)"
    if not path.is_dir():
        raise ConfigError(f"{field}={spec!r}: no such folder; {allowed}")
    cfg, weights = path / "config.json", path / "model.safetensors"
    if not cfg.is_file() or not weights.is_file():
        raise ConfigError(f"{field}={spec!r} has no {'config.json' if not cfg.is_file() else 'model.safetensors'}; {allowed}")
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}={spec!r}: config.json is unreadable ({exc}); {allowed}") from None
    kind = raw.get("kind") if isinstance(raw, dict) else None
    if kind != "causal_vae":
        raise ConfigError(f"{field}={spec!r} is not a VAE folder (config.json kind={kind!r}, a VAE's is 'causal_vae'); {allowed}")
    return raw


def check_autoencoder(spec: str, in_channels: int, num_frames: Optional[int], height: Optional[int], width: Optional[int]) -> None:
    """Recipe check: ``spec`` names a VAE whose latent fits the model and the clips (ConfigError).

    Args:
        spec: the recipe's ``autoencoder``.
        in_channels: ``model.in_channels``.
        num_frames, height, width: the training clips' pixel shape (None: not fixed, e.g. buckets).
    """
    raw = autoencoder_config(spec)
    if raw is None:
        return
    c = int(raw.get("latent_channels", 0))
    if c != in_channels:
        raise ConfigError(f"model.in_channels={in_channels} does not fit autoencoder={spec!r}, whose latents have latent_channels={c}; "
                          f"set model.in_channels={c}")
    ft = 2 ** int(raw.get("temporal_down", 0))
    fs = 2 ** (len(raw.get("channel_mult", [1])) - 1)
    if num_frames is not None and (num_frames - 1) % ft:
        raise ConfigError(f"data.num_frames={num_frames} does not fit autoencoder={spec!r} (temporal compression {ft}): "
                          f"allowed 1 + {ft}k frames, e.g. {1 + ft * max(1, (num_frames - 1) // ft)}")
    for name, size in (("data.height", height), ("data.width", width)):
        if size is not None and size % fs:
            raise ConfigError(f"{name}={size} does not fit autoencoder={spec!r} (spatial compression {fs}): allowed multiples of {fs}")


def load_autoencoder(spec: str, channels: int = 3, map_location: Any = "cpu") -> nn.Module:
    """The frozen autoencoder of ``spec`` in eval mode (parameters do not require gradients).

    Args:
        spec: ``identity`` or a VAE folder.
        channels: the identity's channels (``model.in_channels``).
        map_location: device.
    """
    if autoencoder_config(spec) is None:
        return IdentityVAE(channels)
    vae = CausalVideoVAE.from_pretrained(spec, map_location=map_location)
    vae.requires_grad_(False)
    return vae.eval()


def autoencoder_id(vae: nn.Module) -> str:
    """``identity``, or ``sha256:<hex>`` of a VAE's config and every weight and buffer (latent
    shift/scale included), in key order: the same VAE gives the same id on any machine."""
    if isinstance(vae, IdentityVAE):
        return IDENTITY
    h = hashlib.sha256(json.dumps({"kind": "causal_vae", **to_dict(vae.config)}, sort_keys=True).encode())
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def latent_shape(vae: nn.Module, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(c, t, h, w) of a (C, T, H, W) video under ``vae`` (ValueError names the sizes allowed)."""
    _, T, H, W = shape
    return tuple(vae.latent_shape(T, H, W))  # type: ignore[return-value]


@torch.no_grad()
def encode_videos(vae: nn.Module, videos: torch.Tensor, refine_steps: int = 0, refine_lr: Optional[float] = None) -> torch.Tensor:
    """Latents (B, c, t, h, w) of videos (B, C, T, H, W) in [-1, 1]: the posterior mean, fp32,
    without gradients to the (frozen) autoencoder; ``refine_steps`` > 0 refines them through its
    decoder (``CausalVideoVAE.refine``; ``refine_lr`` None = its default)."""
    if isinstance(vae, IdentityVAE):
        return videos
    dev = next(vae.parameters()).device
    if not refine_steps:
        return vae.encode(videos.to(dev, torch.float32))
    kw = {} if refine_lr is None else {"refine_lr": refine_lr}
    return vae.encode(videos.to(dev, torch.float32), refine_steps=refine_steps, **kw)


def check_fits(model_in_channels: int, latent: tuple[int, ...], what: str) -> None:
    """The DiT's ``in_channels`` must equal the latent's channels (ValueError naming both)."""
    if latent[0] != model_in_channels:
        raise ValueError(f"model.in_channels={model_in_channels} does not fit {what}, whose latents have {latent[0]} channels "
                         f"(latent shape {tuple(latent)})")
