"""What ``VideoPipeline.from_pretrained(PATH)`` loads: model weights, text encoder and sampler
settings from a run folder or a model folder, without executing anything from it.

``PATH`` may be:

The recipe's ``autoencoder`` (identity, or a VAE folder: latent-space models) is loaded with it.

* a **run folder** (``output_dir`` of ``sparse-dit train``): the weights are ``final/`` (the
  EMA weights exported when the schedule completed) when it exists, else the EMA weights of the
  newest complete checkpoint (``checkpoints/latest``; expert shards of every expert-parallel
  rank are put back together); ``weights="final"`` or ``"latest"`` picks one explicitly. The
  sampler settings (steps, sampler, guidance, shift, timestep grid) and the text encoder are the
  run's ``recipe.yaml``'s.
* a **model folder** (``config.json`` + ``model.safetensors``, from ``save_pretrained``,
  ``final/``, ``sparse-dit convert``, an ``exports/step_*`` folder): the sampler settings come
  from a ``recipe.yaml`` in the folder or its parent (a run's ``final/``), else the defaults of
  :class:`~sparse_dit.config.DiffusionConfig`.

Only plain data is read: JSON, YAML (``safe_load``), safetensors, and checkpoint files through
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from sparse_dit.autoencoder import IDENTITY, load_autoencoder
from sparse_dit.config import DiffusionConfig, ModelConfig, RecipeConfig
from sparse_dit.data.text import load_text_encoder
from sparse_dit.dit import SparseDiT
from sparse_dit.schema import from_dict, load_yaml

__all__ = ["Pretrained", "load_pretrained", "WEIGHTS"]

WEIGHTS = ("auto", "final", "latest")


@dataclass
class Pretrained:
    """What :func:`load_pretrained` found.

    Args:
        model: the denoiser in eval mode (float32, CPU unless ``map_location`` said otherwise).
        diffusion: the sampler settings (the run's ``diffusion`` section, or the defaults).
        text_encoder: the recipe's text encoder for text-conditioned models, else None.
        weights: where the weights came from (a folder, or a checkpoint tag's EMA).
        recipe: the recipe found (None for a bare model folder).
        autoencoder: the recipe's frozen compression network (``autoencoder``: identity or a VAE
            folder; identity without a recipe).
    """

    model: SparseDiT
    diffusion: DiffusionConfig
    text_encoder: Any
    weights: str
    recipe: Optional[RecipeConfig]
    autoencoder: Any = None


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _recipe(path: Path) -> Optional[RecipeConfig]:
    for folder in (path, path.parent):
        if (folder / "recipe.yaml").is_file():
            return from_dict(RecipeConfig, load_yaml(folder / "recipe.yaml"))
    return None


def _latest_ema(run: Path, config: ModelConfig, map_location: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The EMA weights of ``run/checkpoints/latest``, expert shards concatenated over the EP ranks."""
    root = run / "checkpoints"
    marker = root / "latest"
    if not marker.is_file():
        raise FileNotFoundError(f"{run} has neither final/ nor checkpoints/latest: no weights to load (has the run saved yet?)")
    tag = marker.read_text().strip()
    files = sorted((root / tag).glob("trainer_rank*.pt"))
    if not files:
        raise FileNotFoundError(f"{root / tag} holds no trainer_rank*.pt (EMA weights)")
    shards: list[dict[str, torch.Tensor]] = []

    def shard(r: int) -> dict[str, torch.Tensor]:  # rank r's EMA weights, read on first use
        while len(shards) <= r:
            shards.append(torch.load(files[len(shards)], map_location=map_location, weights_only=True)["ema"]["shadow"])
        return shards[r]

    with torch.device("meta"):
        ref = SparseDiT(config).state_dict()
    state = {}
    for k, full in ref.items():
        local = shard(0)[k]
        if local.shape != full.shape and local.ndim and full.shape[0] % local.shape[0] == 0 and full.shape[0] // local.shape[0] <= len(files):
            # an expert tensor sharded over the EP group: EP ranks 0..ep-1 hold consecutive experts
            local = torch.cat([shard(r)[k] for r in range(full.shape[0] // local.shape[0])], 0)
        state[k] = local
    return state, f"{root / tag} (EMA)"


def load_pretrained(path: str | os.PathLike, weights: str = "auto", map_location: Any = "cpu", text_encoder: Any = None) -> Pretrained:
    """Load a model, its sampler settings and its text encoder from a run or model folder.

    Args:
        path: a run folder or a model folder (see the module docstring).
        weights: for a run folder: ``"auto"`` (``final/`` if present, else the latest
            checkpoint's EMA weights), ``"final"`` or ``"latest"``.
        map_location: device of the loaded weights.
        text_encoder: use this encoder instead of the recipe's (e.g. one already loaded).

    Raises:
        FileNotFoundError: ``path`` is neither a run folder nor a model folder, or lacks the weights asked for.
        ValueError: ``weights`` is not one of :data:`WEIGHTS`, or the weights do not fit the config.
    """
    path = Path(path)
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not allowed; choose one of {list(WEIGHTS)}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder; give a run folder (output_dir of sparse-dit train) or a model folder (config.json + model.safetensors)")
    recipe = _recipe(path)
    if _is_model_dir(path):
        model, source = SparseDiT.from_pretrained(path, map_location=map_location), str(path)
    elif (path / "recipe.yaml").is_file() or (path / "checkpoints").is_dir() or (path / "final").is_dir():
        if weights != "latest" and _is_model_dir(path / "final"):
            model, source = SparseDiT.from_pretrained(path / "final", map_location=map_location), str(path / "final")
        elif weights == "final":
            raise FileNotFoundError(f"{path / 'final'} is missing: the run has not finished its schedule; pass weights='latest' for its latest checkpoint")
        else:
            if recipe is None:
                raise FileNotFoundError(f"{path / 'recipe.yaml'} is missing: the model of the checkpoints is unknown")
            state, source = _latest_ema(path, recipe.model, map_location)
            model = SparseDiT(recipe.model)
            model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()})
    else:
        raise FileNotFoundError(f"{path} is neither a run folder (recipe.yaml, final/ or checkpoints/) nor a model folder (config.json + model.safetensors)")
    model = model.eval()
    if recipe is not None and recipe.model != model.config:
        recipe = recipe.replace(model=model.config)  # the weights' own config wins (e.g. a converted model beside a recipe)
    if text_encoder is None and model.config.text_dim > 0 and recipe is not None:
        name = recipe.data.text_encoder
        text_encoder = load_text_encoder(name, dim=model.config.text_dim) if name in ("hash", "tiny") else load_text_encoder(name)
    diffusion = recipe.diffusion if recipe is not None else DiffusionConfig()
    spec = recipe.autoencoder if recipe is not None else IDENTITY
    autoencoder = load_autoencoder(spec, channels=model.config.in_channels, map_location=map_location)
    return Pretrained(model=model, diffusion=diffusion, text_encoder=text_encoder, weights=source, recipe=recipe, autoencoder=autoencoder)
