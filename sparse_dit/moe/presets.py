"""MoE presets: ``<dense preset>-E<experts>A<active>[S<shared>][-fullwidth]``.

* ``S/2-E8A2``: the dense ``S/2`` with every FFN replaced by 8 experts, 2 active per token,
  each expert's width chosen by :func:`sparse_dit.moe.flops.match_compute` so that forward
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

The dense base comes from :func:`sparse_dit.dit.preset_config` (imported lazily: the DiT imports
this module for MoE names).
"""

from __future__ import annotations

import dataclasses
import re

from sparse_dit.config import ConfigError, ModelConfig
from sparse_dit.moe.flops import match_compute

__all__ = ["moe_preset_config", "parse_moe_preset", "MOE_PRESET_NAMES", "fullwidth_compute_ratio"]

_NAME = re.compile(r"^(?P<base>.+?)-E(?P<E>\d+)A(?P<A>\d+)(?:S(?P<S>\d+))?(?P<full>-fullwidth)?$")


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


#: The curated MoE presets that ``sparse_dit.dit.list_presets()`` appends.
MOE_PRESET_NAMES: list[str] = _curated()


def parse_moe_preset(name: str) -> tuple[str, int, int, int, bool]:
    """Split an MoE preset name into (dense base, experts, active, shared, fullwidth).

    Raises:
        ConfigError: when the name does not follow ``<dense>-E<experts>A<active>[S<shared>][-fullwidth]``.
    """
    m = _NAME.match(name)
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

    Any dense preset may be the base (``DiT-XL/2-E8A2`` works too); the curated list is
    :data:`MOE_PRESET_NAMES`.

    Args:
        name: ``<dense preset>-E<experts>A<active>[S<shared>][-fullwidth]``.
    """
    from sparse_dit.dit import preset_config

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
    from sparse_dit.dit import preset_config
    from sparse_dit.flops import count

    base = parse_moe_preset(name)[0]
    return count(moe_preset_config(name), latent_shape, text_len)["macs"] / count(preset_config(base), latent_shape, text_len)["macs"]
