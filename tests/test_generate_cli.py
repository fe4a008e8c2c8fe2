"""``sparse-dit generate`` (recipes/generate.py, issue 13): the sampler runs with the recipe's
settings, and every prompting mode runs from the command line on a tiny model built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sparse_dit.config import DiffusionConfig, ModelConfig, RecipeConfig
from sparse_dit.dit import SparseDiT
from sparse_dit.recipes import generate as gen_cli
from sparse_dit.schema import to_dict

T, H, W = 4, 8, 8


def _tiny_run(root: Path, **diffusion) -> Path:
    """A run folder: final/ (random weights) + recipe.yaml (synthetic data, T x H x W)."""
    torch.manual_seed(0)
    model = SparseDiT(ModelConfig(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=2, num_heads=2, text_dim=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-trivial velocity field
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(root / "final")
    recipe = RecipeConfig(model=model.config, diffusion=DiffusionConfig(**diffusion))
    d = to_dict(recipe)
    d["data"].update(source="synthetic", num_frames=T, height=H, width=W, num_videos=8)
    (root / "recipe.yaml").write_text(yaml.safe_dump(d))
    return root


def _record_timesteps(monkeypatch) -> list[float]:
    seen: list[float] = []
    forward = SparseDiT.forward

    def spy(self, x, t, *args, **kwargs):
        seen.append(float(t.flatten()[0]))
        return forward(self, x, t, *args, **kwargs)

    monkeypatch.setattr(SparseDiT, "forward", spy)
    return seen


def _shifted(t: np.ndarray, s: float) -> np.ndarray:
    return s * t / (1 + (s - 1) * t)  # SD3's shift, written out here


def _diffusers_timesteps(n: int, s: float) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(n) model-call sigmas: evenly spaced
    from 1 to its shifted sigma_min = shift(1/1000), shifted again."""
    return _shifted(np.linspace(1.0, _shifted(np.float64(1e-3), s), n), s)


def test_generate_samples_at_the_recipes_shift_and_steps(tmp_path, monkeypatch):
    run = _tiny_run(tmp_path / "run", shift=6.0, num_inference_steps=3, sampler="euler")
    seen = _record_timesteps(monkeypatch)
    gen_cli.generate(run, tmp_path / "out.gif", num_samples=1)
    np.testing.assert_allclose(seen, _diffusers_timesteps(3, 6.0), atol=1e-6)
    # a flag overrides the recipe
    seen.clear()
    gen_cli.generate(run, tmp_path / "out2.gif", num_samples=1, shift=1.0, steps=2)
    np.testing.assert_allclose(seen, _diffusers_timesteps(2, 1.0), atol=1e-6)


def test_generate_without_a_fixed_shift_uses_trainings_resolution_shift(tmp_path, monkeypatch):
    run = _tiny_run(tmp_path / "run", shift=None, shift_base_tokens=4, num_inference_steps=2)
    seen = _record_timesteps(monkeypatch)
    gen_cli.generate(run, tmp_path / "out.gif", num_samples=1)
    s = np.sqrt((T * (H // 2) * (W // 2)) / 4)  # tokens of a 4x8x8 clip in 1x2x2 patches over the base
    np.testing.assert_allclose(seen, _diffusers_timesteps(2, s), atol=1e-6)
