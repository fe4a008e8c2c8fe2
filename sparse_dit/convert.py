"""Official checkpoints -> ``from_pretrained`` folders (``sparse-dit convert``, issue 13).

    sparse-dit convert dit DiT-XL-2-256x256.pt --preset DiT-XL/2 --out models/dit-xl-2-256

facebookresearch/DiT releases plain state dicts (``torch.save(model.state_dict())``; training
checkpoints hold ``{"model", "ema", "opt", "args"}``, and its ``sample.py`` takes ``"ema"``).
Their keys are ours with DiT's Conv2d patch embedding (ours is a Conv3d with pt = 1) and a fixed
``pos_embed`` buffer, which we recompute (:func:`~sparse_dit.modules.embeddings.sincos_pos_embed`)
and check against the checkpoint's instead of storing it.

A converted model gives DiT's network outputs for DiT's inputs with ``t_ours = t_dit / 1000``
(our timestep embedder multiplies by 1000). DiT is a DDPM (epsilon + learned-sigma) model: its
outputs are not a flow-matching velocity, so our flow sampler does not sample it; the
conversion is for reusing and fine-tuning the weights and checking the architecture.

The files are read with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from sparse_dit.config import ConfigError, ModelConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.modules.embeddings import sincos_pos_embed
from sparse_dit.presets import list_presets, preset_config

__all__ = ["convert_dit", "load_checkpoint", "CONVERTERS", "ConversionError", "add_arguments", "run"]


class ConversionError(ValueError):
    """A checkpoint that does not fit the target architecture; one line naming the key."""


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A DiT checkpoint's state dict (the EMA weights of a training checkpoint), weights only."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or a pickle that wants code
        why = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ConversionError(f"checkpoint {path}: cannot be read as a weights-only torch file ({type(exc).__name__}: {why})") from None
    if isinstance(ckpt, dict) and "ema" in ckpt:  # DiT training checkpoint (sample.py uses the EMA)
        ckpt = ckpt["ema"]
    elif isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ConversionError(f"checkpoint {path}: not a state dict (a dict of tensors)")
    return ckpt


def convert_dit(state_dict: dict[str, torch.Tensor], config: ModelConfig | str) -> SparseDiT:
    """facebookresearch/DiT weights -> a :class:`~sparse_dit.dit.SparseDiT` with the same outputs.

    Args:
        state_dict: DiT's ``model.state_dict()`` (see :func:`load_checkpoint`).
        config: the matching architecture, a preset name (``"DiT-XL/2"``) or a ModelConfig
            (``pos_embed="sincos"``, ``qk_norm=False``, ``learn_sigma`` as trained).

    Raises:
        ConversionError: a missing or unexpected key, a shape mismatch, or a ``pos_embed`` that is
            not DiT's fixed layout.
    """
    if isinstance(config, str):
        config = preset_config(config)
    if config.pos_embed != "sincos" or config.qk_norm or config.cross_attention or config.moe.num_experts:
        raise ConversionError("a DiT checkpoint needs a dense config with pos_embed='sincos', qk_norm=False and no cross-attention")
    with torch.device("meta"):  # shapes first: a mismatched checkpoint never allocates the model
        ours = SparseDiT(config).state_dict()
    src = dict(state_dict)
    pos = src.pop("pos_embed", None)
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key not in ours:
            raise ConversionError(f"checkpoint key {key!r} {tuple(value.shape)} has no place in this config; allowed keys: DiT's for {config.depth} blocks")
        if key == "x_embedder.proj.weight" and value.ndim == 4:
            value = value[:, :, None]  # Conv2d (D, C, p, p) -> Conv3d (D, C, 1, p, p)
        if tuple(value.shape) != tuple(ours[key].shape):
            raise ConversionError(f"checkpoint key {key!r} has shape {tuple(value.shape)}; this config needs {tuple(ours[key].shape)}")
        out[key] = value.to(ours[key].dtype)  # (meta tensors carry the dtype)
    missing = sorted(set(ours) - set(out))
    if missing:
        raise ConversionError(f"checkpoint lacks {len(missing)} keys this config needs, e.g. {missing[:3]}")
    if pos is not None:  # DiT stores its fixed positions; they must be ours at t = 1
        n = pos.shape[-2]
        side = int(round(n ** 0.5))
        if side * side != n or pos.shape[-1] != config.hidden_size:
            raise ConversionError(f"pos_embed has shape {tuple(pos.shape)}; expected (1, side*side, {config.hidden_size})")
        expected = sincos_pos_embed((1, side, side), config.hidden_size)
        err = float((pos.reshape(n, -1).float() - expected).abs().max())
        if err > 1e-4:
            raise ConversionError(f"pos_embed differs from DiT's fixed sin-cos layout by {err:.3g}; not a DiT checkpoint?")
    model = SparseDiT(config).eval()
    model.load_state_dict(out)
    return model


# source name -> (convert(state_dict, config) -> SparseDiT, default preset)
CONVERTERS: dict[str, tuple[Callable[[dict[str, torch.Tensor], Any], SparseDiT], str]] = {
    "dit": (convert_dit, "DiT-XL/2"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparse-dit convert``."""
    parser.add_argument("source", choices=list(CONVERTERS), help="whose checkpoint: dit (facebookresearch/DiT)")
    parser.add_argument("checkpoint", help="the .pt file")
    parser.add_argument("--preset", default=None, help="architecture of the checkpoint (default: DiT-XL/2)")
    parser.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")


def run(args: argparse.Namespace) -> int:
    """``sparse-dit convert``: bad inputs are one line on stderr and exit status 2."""
    convert, default = CONVERTERS[args.source]
    preset = args.preset or default
    try:
        if preset not in list_presets():
            raise ConversionError(f"--preset={preset!r} is not a preset; DiT's are {', '.join(p for p in list_presets() if p.startswith('DiT-') and '-E' not in p)}")
        model = convert(load_checkpoint(args.checkpoint), preset)
        path = model.save_pretrained(args.out)
    except (ConversionError, ConfigError) as exc:
        print(f"sparse-dit convert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({model.num_params() / 1e6:.1f}M parameters, preset {preset})")
    return 0
