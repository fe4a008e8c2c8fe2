"""``train.init_from``: start a new run from saved weights, and ``train.noise_range``: train one range alone.

``init_from`` names a folder written by :meth:`sparse_dit.dit.SparseDiT.save_pretrained`
(``config.json`` + ``model.safetensors``) or a run folder holding ``final/``. The weights are
read with safetensors (no code runs) and must fit the recipe's model key by key and shape by
shape; the recipe's own model settings (routing options such as noise boundaries) stay in force.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from sparse_dit.config import ConfigError, RecipeConfig
from sparse_dit.moe.routers import freeze_outside_noise_range, noise_range_interval
from sparse_dit.weights import state_mismatch

__all__ = ["resolve_weights_dir", "load_init_weights", "noise_range_setup"]


def resolve_weights_dir(path: str | Path) -> Path:
    """The folder holding ``model.safetensors``: ``path`` itself or ``path/final``.

    Raises:
        ConfigError: no such folder, or no weights in it.
    """
    p = Path(path)
    for cand in (p, p / "final"):
        if (cand / "model.safetensors").is_file():
            return cand
    raise ConfigError(f"train.init_from={str(path)!r}: no model.safetensors in it or in its final/; give a folder written by "
                      "save_pretrained (or sparse-dit upcycle) or a finished run folder")


@torch.no_grad()
def load_init_weights(model: nn.Module, path: str | Path) -> Path:
    """Copy the weights in ``path`` into ``model`` (before expert sharding); returns the folder read.

    Raises:
        ConfigError: a key missing or extra, or a shape that differs from the recipe's model.
    """
    folder = resolve_weights_dir(path)
    sd = load_file(str(folder / "model.safetensors"), device="cpu")
    own = model.state_dict()
    bad = state_mismatch(own, sd, "the recipe's model expects", listed=3)
    if bad is not None:
        raise ConfigError(f"train.init_from={str(path)!r}: {bad}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
    return folder


def noise_range_setup(model: nn.Module, recipe: RecipeConfig) -> tuple[float, float] | None:
    """For ``train.noise_range``: freeze what the other ranges share (unless
    ``train.noise_range_shared``) and return the range's ``(lo, hi)`` timesteps for
    :class:`~sparse_dit.diffusion.FlowMatching`; None without ``noise_range``."""
    r = recipe.train.noise_range
    if r is None:
        return None
    freeze_outside_noise_range(model, train_shared=recipe.train.noise_range_shared)
    return noise_range_interval(r, recipe.model.moe.boundary_timesteps)
