"""Every named model preset, dense and MoE, and :func:`load_recipe`, which expands a recipe's ``preset:``.

Dense presets (:data:`PRESETS`, a dict of named factories as in DiT's ``models.py``):

* ``DiT-{S,B,L,XL}/{2,4,8}``: the DiT paper's class-conditional image models (Peebles & Xie 2023);
* ``{S,B,L,XL}/{2,4,8}``: text-to-video DiTs of the same widths (3D RoPE, QK-norm, cross-attention);
* ``debug``: a ~0.2M-parameter text-conditioned video DiT for tests and CPU demos.

MoE presets are named ``<dense preset>-E<experts>A<active>[S<shared>][-fullwidth]``:

* ``S/2-E8A2``: the dense ``S/2`` with every FFN replaced by 8 experts, 2 active per token,
  each expert's width chosen by :func:`sparse_dit.flops.match_compute` so that forward
  MACs per sample equal the dense model's (within 1 %, router included).
* ``S/2-E64A8``: fine-grained experts (DeepSeekMoE): 64 experts of 1/8 the dense width, 8 active.
* ``S/2-E16A2S1``: 16 routed experts, 2 active, plus 1 shared expert (all of one width), still
  compute-matched.
* ``S/2-E8A2-fullwidth``: NOT compute-matched. Experts keep the dense FFN width, as DiT-MoE
  (Fei et al. 2024) builds them, so each token runs ``A`` (+ ``S``) full FFNs: ``A + S`` times
  the FFN compute of the dense model. The name says so; :func:`fullwidth_compute_ratio` gives
  the whole-model ratio for a latent shape. ``E8A2S1-fullwidth`` is DiT-MoE's layout (top-2
  plus a shared expert): 3 dense FFNs per token, about 2.2x the dense model's forward MACs on
  256-token image latents (DiT-S/2 2.20x, DiT-XL/2 2.28x) and 1.6-2.0x on 2048-token video
  latents; ``E8A2-fullwidth`` 1.5-1.6x and 1.3-1.5x (docs/moe.md).

Any dense preset may be an MoE base (``DiT-XL/2-E8A2`` works too); the curated MoE names that
:func:`list_presets` shows are :data:`MOE_PRESET_NAMES`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable

from sparse_dit.config import ModelConfig, RecipeConfig
from sparse_dit.flops import count, match_compute
from sparse_dit.schema import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from sparse_dit.vae import VAEConfig

__all__ = [
    "PRESETS",
    "preset_config",
    "list_presets",
    "MOE_PRESET_NAMES",
    "moe_preset_config",
    "parse_moe_preset",
    "fullwidth_compute_ratio",
    "load_recipe",
    "VAE_PRESETS",
    "vae_preset_config",
]

# --------------------------------------------------------------------------------------------
# Dense presets
# --------------------------------------------------------------------------------------------

# (hidden size, depth, heads) of DiT's model family (Peebles & Xie 2023, Table 1).
_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}


def _dit_paper(size: str, patch: int) -> Callable[[], ModelConfig]:
    d, depth, heads = _SIZES[size]

    def make() -> ModelConfig:
        """DiT paper architecture: class-conditional ImageNet (1000 classes), 4-channel SD-VAE latents,
        fixed sin-cos positions, learned sigma, GELU-tanh MLP, no cross-attention."""
        return ModelConfig(
            in_channels=4, patch_size=(1, patch, patch), hidden_size=d, depth=depth, num_heads=heads,
            mlp_ratio=4.0, activation="gelu_tanh", pos_embed="sincos", qk_norm=False, qkv_bias=True,
            num_classes=1000, text_dim=0, cross_attention=False, learn_sigma=True,
        )

    return make


def _video(size: str, patch: int) -> Callable[[], ModelConfig]:
    d, depth, heads = _SIZES[size]

    def make() -> ModelConfig:
        """Text-to-video DiT of DiT's widths: 3D RoPE, QK-norm, cross-attention to 384-wide text
        tokens (all-MiniLM-L6-v2), 4-channel latents, spatial patch p, temporal patch 1."""
        return ModelConfig(
            in_channels=4, patch_size=(1, patch, patch), hidden_size=d, depth=depth, num_heads=heads,
            mlp_ratio=4.0, activation="gelu_tanh", pos_embed="rope", qk_norm=True, qkv_bias=True,
            num_classes=0, text_dim=384, cross_attention=True, learn_sigma=False,
        )

    return make


def _debug() -> ModelConfig:
    """A ~0.2M-parameter text-conditioned video DiT (d=64, 2 blocks) for tests and CPU demos."""
    return ModelConfig(
        in_channels=3, patch_size=(1, 2, 2), hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
        activation="gelu_tanh", pos_embed="rope", qk_norm=True, num_classes=0, text_dim=32,
        cross_attention=True, learn_sigma=False,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {"debug": _debug}
for _size in _SIZES:
    for _p in (2, 4, 8):
        PRESETS[f"DiT-{_size}/{_p}"] = _dit_paper(_size, _p)
for _size in _SIZES:
    for _p in (2, 4, 8):
        PRESETS[f"{_size}/{_p}"] = _video(_size, _p)

# --------------------------------------------------------------------------------------------
# MoE presets
# --------------------------------------------------------------------------------------------

_MOE_SUFFIX = re.compile(r"-E\d+A\d+")
_MOE_NAME = re.compile(r"^(?P<base>.+?)-E(?P<E>\d+)A(?P<A>\d+)(?:S(?P<S>\d+))?(?P<full>-fullwidth)?$")


def _curated() -> list[str]:
    names = ["debug-E4A2"]
    for size in ("S", "B", "L", "XL"):
        for p in (2, 4, 8):
            names.append(f"{size}/{p}-E8A2")
    for size in ("S", "B", "L", "XL"):
        names += [f"{size}/2-E16A4", f"{size}/2-E64A8", f"{size}/2-E16A2S1"]
    names += ["S/2-E8A2-fullwidth", "B/2-E8A2-fullwidth", "XL/2-E8A2-fullwidth"]
    # DiT-MoE's layout (top-2 + 1 shared expert, all dense-width): ~2.2x dense compute.
    names += ["S/2-E8A2S1-fullwidth", "XL/2-E8A2S1-fullwidth", "DiT-S/2-E8A2S1-fullwidth", "DiT-XL/2-E8A2S1-fullwidth"]
    return names


#: The curated MoE presets that :func:`list_presets` appends.
MOE_PRESET_NAMES: list[str] = _curated()


def parse_moe_preset(name: str) -> tuple[str, int, int, int, bool]:
    """Split an MoE preset name into (dense base, experts, active, shared, fullwidth).

    Raises:
        ConfigError: when the name does not follow ``<dense>-E<experts>A<active>[S<shared>][-fullwidth]``.
    """
    m = _MOE_NAME.match(name)
    if m is None:
        raise ConfigError(
            f"MoE preset {name!r} must look like '<dense preset>-E<experts>A<active>[S<shared>][-fullwidth]', "
            f"e.g. 'S/2-E8A2'; curated names: {', '.join(MOE_PRESET_NAMES)}"
        )
    E, A, S = int(m["E"]), int(m["A"]), int(m["S"] or 0)
    if E < 1 or A < 1 or A > E:
        raise ConfigError(f"MoE preset {name!r}: need 1 <= active ({A}) <= experts ({E})")
    return m["base"], E, A, S, bool(m["full"])


def moe_preset_config(name: str) -> ModelConfig:
    """The :class:`~sparse_dit.config.ModelConfig` of an MoE preset name (see the module docstring).

    Args:
        name: ``<dense preset>-E<experts>A<active>[S<shared>][-fullwidth]``.
    """
    base, E, A, S, full = parse_moe_preset(name)
    dense = preset_config(base)
    if dense.moe.enabled:
        raise ConfigError(f"MoE preset {name!r}: base {base!r} is already an MoE preset")
    if full:
        # DiT-MoE's layout: every expert as wide as the dense FFN (not compute-matched).
        moe = dataclasses.replace(dense.moe, num_experts=E, top_k=A, shared_experts=S, expert_hidden_dim=dense.ffn_hidden)
        return dataclasses.replace(dense, moe=moe)
    return match_compute(dense, num_experts=E, top_k=A, shared_experts=S)


def fullwidth_compute_ratio(name: str, latent_shape: tuple[int, int, int, int], text_len: int = 0) -> float:
    """Forward MACs per sample of a preset divided by its dense base's (uses :func:`sparse_dit.flops.count`)."""
    base = parse_moe_preset(name)[0]
    return count(moe_preset_config(name), latent_shape, text_len)["macs"] / count(preset_config(base), latent_shape, text_len)["macs"]


# --------------------------------------------------------------------------------------------
# Lookup
# --------------------------------------------------------------------------------------------


def preset_config(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a named preset (dense, or an MoE name like ``S/2-E8A2``)."""
    if name in PRESETS:
        return PRESETS[name]()
    if _MOE_SUFFIX.search(name):
        return moe_preset_config(name)
    raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")


def list_presets() -> list[str]:
    """Every preset name, dense first, then the curated MoE presets."""
    return list(PRESETS) + [n for n in MOE_PRESET_NAMES if n not in PRESETS]


# --------------------------------------------------------------------------------------------
# VAE presets (sparse_dit.vae.CausalVideoVAE; named <t>x<s>x<s>-c<latent channels>)
# --------------------------------------------------------------------------------------------

VAE_PRESETS: dict[str, Callable[[], VAEConfig]] = {
    # The standard of open video models (CogVideoX, HunyuanVideo, Wan): 4x temporal, 8x8
    # spatial, 16 channels; 155M parameters (GPU scale).
    "vae-4x8x8-c16": lambda: VAEConfig(latent_channels=16, base_channels=128, channel_mult=(1, 2, 4, 4), temporal_down=2, num_res_blocks=2),
    # Light enough to train on 2 CPU cores in ~20 minutes (docs/vae.md): 2x temporal, 4x4
    # spatial, 8 channels (12x fewer floats than the video); 0.75M parameters.
    "vae-2x4x4-c8": lambda: VAEConfig(latent_channels=8, base_channels=16, channel_mult=(1, 2, 4), temporal_down=1, num_res_blocks=1),
    # The light preset's width at the standard's 4x temporal compression (24x fewer floats).
    "vae-4x4x4-c8": lambda: VAEConfig(latent_channels=8, base_channels=16, channel_mult=(1, 2, 4), temporal_down=2, num_res_blocks=1),
    # Tests: 2x2x2, 4 channels, a few thousand parameters.
    "vae-debug": lambda: VAEConfig(latent_channels=4, base_channels=8, channel_mult=(1, 2), temporal_down=1, num_res_blocks=1),
}


def vae_preset_config(name: str) -> VAEConfig:
    """The :class:`~sparse_dit.vae.VAEConfig` of a named VAE preset."""
    if name not in VAE_PRESETS:
        raise ConfigError(f"preset={name!r} is not a VAE preset; allowed: {', '.join(VAE_PRESETS)}")
    return VAE_PRESETS[name]()


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), data: dict | None = None) -> RecipeConfig:
    """Load a recipe YAML (or mapping), apply ``--set`` overrides, expand ``preset`` and validate.

    It lives here, not in :mod:`sparse_dit.config`, because it reads the preset table, which
    builds config dataclasses (config -> presets -> config would be an import cycle).

    Args:
        path: the YAML file; ignored when ``data`` is given.
        overrides: ``["train.max_steps=10", ...]``.
        data: an already-loaded mapping.
    """
    raw = dict(data) if data is not None else load_yaml(path)  # type: ignore[arg-type]
    raw = apply_overrides(raw, list(overrides))
    preset = raw.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"preset={preset!r} has type {type(preset).__name__}; expected a preset name (str), e.g. debug-E4A2")
        base = to_dict(preset_config(preset))
        model = raw.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError(f"model must be a mapping, got {type(model).__name__}")
        moe_over = model.get("moe") or {}
        if not isinstance(moe_over, dict):
            raise ConfigError(f"model.moe={moe_over!r} has type {type(moe_over).__name__}; expected a mapping of MoEConfig fields")
        moe = {**base.pop("moe"), **moe_over}
        raw["model"] = {**base, **{k: v for k, v in model.items() if k != "moe"}, "moe": moe}
    return from_dict(RecipeConfig, raw)
