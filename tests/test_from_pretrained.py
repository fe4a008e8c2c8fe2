"""Issue 15: ``VideoPipeline.from_pretrained(RUN_OR_MODEL_DIR)`` loads the weights, the text
encoder and the sampler settings of a run, as diffusers users expect, and executes nothing.

The run folder is laid out by hand as ``sparse-dit train`` leaves it (recipe.yaml, final/, and a
checkpoint whose EMA weights are split over 2 expert-parallel ranks), with weights the test
chooses, so which weights were loaded is checked tensor by tensor.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from _launch import TINY_MOE

SAMPLING = ["diffusion.num_inference_steps=7", "diffusion.shift=2.5", "diffusion.guidance_scale=3.0", "diffusion.sampler=heun"]


def _model(seed: int):
    from sparse_dit.dit import SparseDiT
    from sparse_dit.presets import load_recipe

    recipe = load_recipe(TINY_MOE, SAMPLING)
    torch.manual_seed(seed)
    model = SparseDiT(recipe.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # every tensor distinct from a fresh initialisation
    return recipe, model


def _run_dir(tmp_path: Path, final: bool = True) -> tuple[Path, dict, dict]:
    """A run folder: recipe.yaml, final/ (seed 1 weights), a checkpoint with EP=2 EMA shards (seed 2)."""
    from sparse_dit.schema import to_dict

    recipe, final_model = _model(1)
    _, ema_model = _model(2)
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    if final:
        final_model.save_pretrained(run / "final")
    full = {k: v.clone() for k, v in ema_model.state_dict().items()}
    tag = run / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(tag.name)
    experts = [k for k in full if ".experts." in k]
    assert experts and all(full[k].shape[0] == 4 for k in experts)  # 4 experts, 2 per EP rank
    for rank in range(2):
        shard = {k: (v[2 * rank: 2 * rank + 2].clone() if k in experts else v.clone()) for k, v in full.items()}
        torch.save({"ema": {"decay": 0.99, "num_updates": 4, "shadow": shard}, "step": 4, "world_size": 2, "ep_size": 2, "rank": rank},
                   tag / f"trainer_rank{rank:05d}.pt")
    return run, final_model.state_dict(), full


def _same(model, state: dict) -> bool:
    own = model.state_dict()
    return set(own) == set(state) and all(torch.equal(own[k], state[k].to(own[k].dtype)) for k in own)


def test_a_run_folder_gives_its_final_weights_text_encoder_and_sampler_settings(tmp_path):
    from sparse_dit.data.text import HashTextEncoder
    from sparse_dit.pipeline import VideoPipeline

    run, final, _ = _run_dir(tmp_path)
    pipe = VideoPipeline.from_pretrained(run)
    assert _same(pipe.model, final) and not pipe.model.training and pipe.source == str(run / "final")
    assert (pipe.num_inference_steps, pipe.shift, pipe.guidance_scale, pipe.sampler) == (7, 2.5, 3.0, "heun")
    assert isinstance(pipe.text_encoder, HashTextEncoder) and pipe.text_encoder.dim == 32
    video = pipe("a red square moving left", num_frames=2, height=12, width=12, num_inference_steps=1,
                 generator=torch.Generator().manual_seed(0))
    assert video.shape == (1, 3, 2, 12, 12) and torch.isfinite(video).all()
    # final/ alone (a model folder inside a run) finds the run's recipe one level up
    alone = VideoPipeline.from_pretrained(run / "final", num_inference_steps=3)
    assert _same(alone.model, final) and (alone.num_inference_steps, alone.shift) == (3, 2.5)


def test_latest_gives_the_checkpoints_ema_weights_with_expert_shards_put_back_together(tmp_path):
    from sparse_dit.pipeline import VideoPipeline

    run, final, full = _run_dir(tmp_path)
    pipe = VideoPipeline.from_pretrained(run, weights="latest")
    assert _same(pipe.model, full) and not _same(pipe.model, final)
    assert pipe.source.endswith("step_00000004 (EMA)")
    unfinished, _, full2 = _run_dir(tmp_path / "b", final=False)  # no final/: auto falls back to the latest checkpoint
    assert _same(VideoPipeline.from_pretrained(unfinished).model, full2)
    with pytest.raises(FileNotFoundError, match="weights='latest'"):
        VideoPipeline.from_pretrained(unfinished, weights="final")


def test_a_bare_model_folder_uses_default_sampler_settings(tmp_path):
    from sparse_dit.config import DiffusionConfig
    from sparse_dit.pipeline import VideoPipeline

    _, model = _model(3)
    model.save_pretrained(tmp_path / "m")
    pipe = VideoPipeline.from_pretrained(tmp_path / "m")
    d = DiffusionConfig()
    assert _same(pipe.model, model.state_dict()) and (pipe.num_inference_steps, pipe.sampler) == (d.num_inference_steps, d.sampler)
    assert pipe.text_encoder is None  # no recipe names one; pass text_encoder=...
    with pytest.raises(FileNotFoundError, match="no such folder"):
        VideoPipeline.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="weights='best'"):
        VideoPipeline.from_pretrained(tmp_path / "m", weights="best")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    from sparse_dit.pipeline import VideoPipeline

    run, _, _ = _run_dir(tmp_path, final=False)
    marker = tmp_path / "pwned"
    target = run / "checkpoints" / "step_00000004" / "trainer_rank00000.pt"
    state = torch.load(target, weights_only=True)
    state["extra"] = _Payload(marker)
    torch.save(state, target)
    with pytest.raises(pickle.UnpicklingError):
        VideoPipeline.from_pretrained(run)
    assert not marker.exists()
