"""Train a video VAE on the library trainer: ``sparse-dit train-vae RECIPE`` (recipes/vae/).

The same trainer, DeepSpeed engine, checkpoints, resume, metrics.jsonl, TensorBoard and
summary.json as ``sparse-dit train``: this module only supplies the VAE *task*
(:class:`VAETask`, the interface of :class:`sparse_dit.recipes.train.DiffusionTask`) and the
VAE recipe schema. Launch commands::

    sparse-dit train-vae recipes/vae/light.yaml
    sparse-dit train-vae recipes/vae/light.yaml --num-procs 2 --set train.max_steps=100
    deepspeed --num_gpus 8 --module sparse_dit.recipes.train_vae recipes/vae/standard.yaml

At the end ``output_dir/final`` holds the EMA weights with the latent shift and scale measured
on ``loss.stats_videos`` training clips: ``CausalVideoVAE.from_pretrained(output_dir/final)``.

A VAE recipe::

    preset: vae-2x4x4-c8          # sparse_dit.presets.VAE_PRESETS; vae: keys override it
    vae: {latent_channels: 8}
    loss: {kl_weight: 1.0e-6, perceptual_weight: 0.0, adversarial_weight: 0.0, adversarial_start: 0}
    train: {...}                  # TrainConfig, as for the DiT
    data: {...}                   # DataConfig: num_frames = 1 + k * temporal compression
    parallel: {...}               # ZeRO stage, precision (no expert parallelism)
    output_dir: runs/vae-light
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from sparse_dit.config import DataConfig, ParallelConfig, TrainConfig
from sparse_dit.parallel import CheckpointError
from sparse_dit.parallel.comm import all_reduce_
from sparse_dit.presets import VAE_PRESETS, vae_preset_config
from sparse_dit.recipes.batches import build_dataset, collate
from sparse_dit.recipes.init_from import load_init_weights, resolve_weights_dir
from sparse_dit.recipes.train import DiffusionTask, TrainRun, add_arguments, run as train_run
from sparse_dit.schema import ConfigError, _Config, apply_overrides, from_dict, load_yaml, to_dict
from sparse_dit.vae import CausalVideoVAE, VAEConfig, latent_statistics, vae_macs
from sparse_dit.vae_losses import VAE_TERMS, VAELossConfig, VAEObjective

__all__ = ["VAERecipeConfig", "load_vae_recipe", "VAETask", "VAE_TASK", "export_vae", "add_arguments", "run", "main"]


@dataclass
class VAERecipeConfig(_Config):
    """A VAE training recipe: the VAE's shape, its loss terms, and the trainer's sections."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(num_frames=9))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output_dir: str = "runs/vae"
    # VAE preset the vae section starts from (sparse_dit.presets.VAE_PRESETS).
    preset: Optional[str] = None

    def _check(self) -> None:
        v, d, t = self.vae, self.data, self.train
        ft, fs = v.temporal_compression, v.spatial_compression
        if (d.num_frames - 1) % ft:
            raise ConfigError(f"data.num_frames={d.num_frames} must be 1 + a multiple of the VAE's temporal compression {ft} (e.g. {1 + 4 * ft})")
        if d.height % fs or d.width % fs:
            raise ConfigError(f"data.height={d.height}, data.width={d.width} must be multiples of the VAE's spatial compression {fs}")
        if d.channels != v.in_channels:
            raise ConfigError(f"data.channels={d.channels} must equal vae.in_channels={v.in_channels}")
        refused = {"data.token_budget": d.token_budget, "train.sample_every": t.sample_every or None,
                   "train.export_steps": tuple(getattr(t, "export_steps", ())) or None,
                   "train.noise_range": getattr(t, "noise_range", None), "train.compile": getattr(t, "compile", False) or None}
        for key, value in refused.items():
            if value is not None:
                raise ConfigError(f"{key}={value!r} is a DiT training option; a VAE recipe leaves it unset")
        if self.parallel.ep_size != 1:
            raise ConfigError(f"parallel.ep_size={self.parallel.ep_size} needs an MoE model; a VAE trains with parallel.ep_size=1")
        if self.loss.adversarial_weight > 0 and self.parallel.zero_stage == 3:
            raise ConfigError("loss.adversarial_weight > 0 with parallel.zero_stage=3: the discriminator's frozen copy needs whole "
                              "parameters; use zero_stage 0-2")


def load_vae_recipe(path: str | Path | None = None, overrides: Sequence[str] = (), data: Optional[dict] = None) -> VAERecipeConfig:
    """Load a VAE recipe YAML (or mapping), apply ``--set`` overrides, expand ``preset`` and validate.

    Args:
        path: the YAML file; ignored when ``data`` is given.
        overrides: ``["train.max_steps=10", ...]``.
        data: an already-loaded mapping.

    Raises:
        ConfigError: one line naming the field, the value and what is allowed.
    """
    raw = dict(data) if data is not None else load_yaml(path)  # type: ignore[arg-type]
    raw = apply_overrides(raw, list(overrides))
    if "model" in raw or "diffusion" in raw:
        raise ConfigError(f"a VAE recipe has no {'model' if 'model' in raw else 'diffusion'} section (that is a DiT recipe: sparse-dit train); "
                          "allowed sections: vae, loss, train, data, parallel, output_dir, preset")
    preset = raw.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"preset={preset!r} has type {type(preset).__name__}; expected a VAE preset name: {', '.join(VAE_PRESETS)}")
        over = raw.get("vae") or {}
        if not isinstance(over, dict):
            raise ConfigError(f"vae={over!r} has type {type(over).__name__}; expected a mapping of VAEConfig fields")
        raw["vae"] = {**to_dict(vae_preset_config(preset)), **over}
    return from_dict(VAERecipeConfig, raw)


class _NoConditioning:
    """A VAE has no conditioning: every batch gives no model kwargs."""

    encoder = None

    def __call__(self, batch: dict) -> dict:
        return {}


class _Reconstruction:
    """The VAE's objective in the trainer's ``training_losses`` shape: runs the engine on the
    clean videos (the :class:`VAEObjective` forward) and keeps the extra terms for :meth:`VAETask.terms`."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(VAE_TERMS) - 2, dtype=torch.float64)
        self.count = 0

    def training_losses(self, model: Any, x0: torch.Tensor, model_kwargs: dict, context_mask: Any = None,
                        generator: Optional[torch.Generator] = None, num_tokens: Optional[int] = None) -> dict[str, torch.Tensor]:
        step = int(getattr(getattr(model, "engine", model), "global_steps", 0))  # optimizer steps taken (restored on resume)
        out = model(x0, step, generator)
        self.sums += torch.tensor([float(out[k]) for k in VAE_TERMS[2:]], dtype=torch.float64)
        self.count += 1
        return {"loss": out["loss"], "mse": out["mse"]}


class VAETask(DiffusionTask):
    """The VAE as a trainer task: model = :class:`VAEObjective` (VAE + optional discriminator),
    loss = L1 + KL (+ perceptual, + hinge GAN), export = the EMA VAE with its latent statistics."""

    name = "vae"
    module = "sparse_dit.recipes.train_vae"
    logged = VAE_TERMS[2:]

    def load_recipe(self, path: str | Path, overrides: Sequence[str] = ()) -> VAERecipeConfig:
        return load_vae_recipe(path, overrides)

    def check(self, recipe: Any, world: int) -> None:
        if not isinstance(recipe, VAERecipeConfig):
            raise ConfigError(f"the VAE task needs a VAE recipe (vae:, loss: sections), got {type(recipe).__name__}")

    def build_model(self, recipe: VAERecipeConfig) -> torch.nn.Module:
        return VAEObjective(recipe.vae, recipe.loss, seed=recipe.train.seed)

    def init_weights(self, model: torch.nn.Module, path: str) -> Path:
        """``train.init_from`` in a VAE recipe: a trained VAE's folder (``CausalVideoVAE.save_pretrained``,
        or a finished ``train-vae`` run) starts the run, e.g. to fine-tune on other videos. Its
        weights must fit the recipe's VAE key by key and shape by shape; its latent statistics are
        measured again at export."""
        folder = resolve_weights_dir(path)
        try:
            raw = json.loads((folder / "config.json").read_text())
            kind = raw.pop("kind", None)
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind != "causal_vae":
            raise ConfigError(f"train.init_from={str(path)!r}: {folder} does not hold a VAE (config.json kind={kind!r}, a VAE recipe needs "
                              "'causal_vae': a folder written by CausalVideoVAE.save_pretrained or a finished train-vae run)")
        try:
            given = from_dict(VAEConfig, raw)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"train.init_from={str(path)!r}: {folder / 'config.json'}: {exc}") from None
        mine = model.vae.config
        grown = [f"the {part} from {a} to {b}" for part, a, b in (("encoder", given.num_res_blocks, mine.num_res_blocks),
                                                                 ("decoder", given.decoder_blocks, mine.decoder_blocks)) if a < b]
        if grown:
            # A deeper encoder or decoder (vae.num_res_blocks / vae.decoder_res_blocks) grown from a
            # trained VAE: the new blocks start as identities.
            try:
                state = model.vae.grown_state_dict(load_file(str(folder / "model.safetensors"), device="cpu"), given)
            except ValueError as exc:
                raise ConfigError(f"train.init_from={str(path)!r}: {exc}") from None
            model.vae.load_state_dict(state)
            print(f"train.init_from: grew {' and '.join(grown)} residual blocks per stage, from {folder} "
                  "(the new blocks start as identities)", flush=True)
            return folder
        return load_init_weights(model.vae, folder)

    def conditioner(self, recipe: Any, device: Any, dtype: torch.dtype) -> Any:
        return _NoConditioning()

    def model_kwargs(self, run: TrainRun, batch: dict, generator: torch.Generator, null_class: Optional[int]) -> dict:
        return {}

    def objective(self, recipe: Any, t_range: Any) -> _Reconstruction:
        return _Reconstruction()

    def count(self, recipe: VAERecipeConfig, shape: tuple[int, int, int, int], cond: Any) -> dict:
        m = vae_macs(recipe.vae, *shape[1:])
        return {"total_params": m["params"], "active_params": m["params"], "macs": m["encode"] + m["decode"]}

    def tokens(self, recipe: VAERecipeConfig, shape: Sequence[int]) -> int:
        _, t, h, w = CausalVideoVAE.latent_shape_of(recipe.vae, *shape)
        return t * h * w  # latent positions per clip

    def terms(self, run: TrainRun) -> dict[str, float]:
        obj: _Reconstruction = run.fm
        vals = obj.sums / max(1, obj.count)
        all_reduce_(vals)  # a host tensor: NCCL-safe (parallel/comm.py)
        vals /= run.world
        obj.sums.zero_()
        obj.count = 0
        return dict(zip(VAE_TERMS[2:], vals.tolist()))

    def export(self, run: TrainRun, out_dir: Path) -> None:
        if run.rank == 0:
            export_vae(run.recipe, {k[len("vae."):]: v for k, v in run.ema.shadow.items() if k.startswith("vae.")}, out_dir)
        dist.barrier()


VAE_TASK = VAETask()


def export_vae(recipe: VAERecipeConfig, state: dict[str, torch.Tensor], out_dir: str | Path, batch_size: int = 8) -> Path:
    """Build the VAE from ``state``, measure its latent shift/scale on the first
    ``loss.stats_videos`` training clips and ``save_pretrained`` it to ``out_dir``.

    Args:
        recipe: the VAE recipe (its data section gives the clips).
        state: the VAE's weights (e.g. the EMA's, without the ``vae.`` prefix).
        out_dir: target folder.
        batch_size: clips per encoder call.
    """
    vae = CausalVideoVAE(recipe.vae)
    missing, unexpected = vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if k not in ("latent_shift", "latent_scale")]:
        raise CheckpointError(f"export: the VAE state does not fit vae={to_dict(recipe.vae)}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    vae.eval()
    dataset = build_dataset(recipe)
    n = min(len(dataset), recipe.loss.stats_videos)
    batches = (collate([dataset[i] for i in range(s, min(n, s + batch_size))])["video"].float() for s in range(0, n, batch_size))
    mean, std = latent_statistics(vae, batches)
    vae.set_latent_stats(mean, 1.0 / std)
    print(f"latent statistics over {n} training clips: shift (mean) {[round(x, 3) for x in mean.tolist()]}, "
          f"std {[round(x, 3) for x in std.tolist()]}", flush=True)
    return vae.save_pretrained(out_dir)


def run(args: argparse.Namespace) -> int:
    """``sparse-dit train-vae``: the trainer's CLI with the VAE task."""
    return train_run(args, VAE_TASK)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m sparse_dit.recipes.train_vae RECIPE [--set ...]`` (what the launchers run)."""
    parser = argparse.ArgumentParser(prog="sparse_dit.recipes.train_vae", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
