"""Prompt expansion (sparse_dit/prompts.py, issue 13): short prompts become captions in the
physics world's training format; the hook is pluggable; ``--no-expand`` passes prompts through;
a bad hook is one line.

The format check does not trust the expander: it abstracts real training captions (simulated
here) into word patterns with a vocabulary written in this file, and requires every expansion
to have one of those patterns.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from sparse_dit.cli import main as cli_main
from sparse_dit.config import ModelConfig, RecipeConfig
from sparse_dit.data import generate_physics_videos
from sparse_dit.dit import SparseDiT
from sparse_dit.prompts import PROMPT_EXPANDERS, expand_prompt, resolve_expander, template_expand
from sparse_dit.recipes import generate as gen_cli
from sparse_dit.recipes.batches import Conditioner
from sparse_dit.schema import to_dict

# The captions' vocabulary (sparse_dit/data/captions.py's docstring and the palette), longest first.
_COLOURS = r"red|green|blue|yellow|magenta|cyan"
_SIZES = r"tiny|small|medium|large|huge"
_SPEEDS = r"very slowly|slowly|steadily|very fast|fast"
_DIRS = (r"up and to the right|up and to the left|down and to the left|down and to the right|"
         r"to the right|to the left|upwards|downwards")


def _pattern(caption: str) -> str:
    """A caption with its ball words replaced by placeholders: its sentence pattern."""
    s = caption.lower()
    s = re.sub(rf"\b({_COLOURS})\b", "COLOUR", s)
    s = re.sub(rf"\b({_SIZES})\b", "SIZE", s)
    s = re.sub(rf"\b({_DIRS})\b", "DIR", s)
    s = re.sub(rf"\b({_SPEEDS})\b", "SPEED", s)
    s = re.sub(r"\b(an|a)\b", "a", s)
    s = re.sub(r"^(two|three|four)\b", "N", s)
    return s


@pytest.fixture(scope="module")
def patterns() -> dict[str, set[str]]:
    out = {}
    for scenario in ("uniform", "collision", "parabola", "bounce", "occlusion"):
        rows = generate_physics_videos(scenario, "id", 40, 2, 16, 16, seed=11, fps=4.0, workers=1)
        out[scenario] = {_pattern(r["caption"]) for r in rows}
    return out


@pytest.mark.parametrize("prompt, scenario, words", [
    ("a red ball bouncing", "bounce", ["red ball", "bounce"]),
    ("a big green ball passes behind a wall", "occlusion", ["large green ball", "behind"]),
    ("a blue ball thrown to the left", "parabola", ["blue ball", "to the left"]),
    ("two balls collide", "collision", ["collide"]),
    ("a tiny yellow ball moving fast", "uniform", ["tiny yellow ball", "fast"]),
    ("a cyan ball", "uniform", ["cyan ball"]),
])
def test_short_prompts_become_captions_of_the_training_format(patterns, prompt, scenario, words):
    out = template_expand(prompt)
    assert _pattern(out) in patterns[scenario], (out, sorted(patterns[scenario]))
    for w in words:
        assert w in out.lower()
    assert len(out) > len(prompt)


def test_prompts_outside_the_world_are_kept():
    assert template_expand("a cat sleeping on a sofa") == "a cat sleeping on a sofa"


def test_hooks_resolve_by_callable_name_and_dotted_path():
    shout = lambda p: p.upper()
    assert resolve_expander(shout) is shout
    assert resolve_expander("template") is PROMPT_EXPANDERS["template"]
    assert resolve_expander("none")("a red ball") == "a red ball"
    assert resolve_expander("textwrap:dedent")("  x") == "x"  # any importable module:function
    with pytest.raises(ValueError, match="non-empty str"):
        expand_prompt("a red ball", lambda p: None)


@pytest.mark.parametrize("spec, words", [
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("textwrap:no_such_fn", "has no attribute 'no_such_fn'"),
    ("textwrap:_whitespace_only_re", "not a function"),
    ("bogus", "'module:function'"),
])
def test_bad_hooks_are_one_value_error(spec, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        resolve_expander(spec)


# ------------------------------------------------------------------ through sparse-dit generate


def _tiny_run(root: Path) -> Path:
    torch.manual_seed(0)
    model = SparseDiT(ModelConfig(in_channels=3, patch_size=(1, 2, 2), hidden_size=16, depth=1, num_heads=2, text_dim=0))
    model.save_pretrained(root / "final")
    d = to_dict(RecipeConfig(model=model.config))
    d["data"].update(source="synthetic", num_frames=2, height=4, width=4, num_videos=4)
    d["diffusion"]["num_inference_steps"] = 1
    (root / "recipe.yaml").write_text(yaml.safe_dump(d))
    return root


@pytest.fixture
def captions(monkeypatch) -> list[list[str]]:
    """Every caption batch the generate CLI conditions on."""
    seen: list[list[str]] = []
    call = Conditioner.__call__

    def spy(self, batch):
        seen.append(list(batch["caption"]))
        return call(self, batch)

    monkeypatch.setattr(Conditioner, "__call__", spy)
    return seen


def _generate(run: Path, tmp_path: Path, *flags: str) -> int:
    return cli_main(["generate", str(run), "--out", str(tmp_path / "o.gif"), "--num-samples", "1", *flags])


def test_generate_expands_prompts_by_default(tmp_path, captions, patterns):
    run = _tiny_run(tmp_path / "run")
    assert _generate(run, tmp_path, "--prompt", "a red ball bouncing") == 0
    assert _pattern(captions[-1][0]) in patterns["bounce"] and "red ball" in captions[-1][0]


def test_no_expand_passes_the_prompt_through(tmp_path, captions):
    run = _tiny_run(tmp_path / "run")
    assert _generate(run, tmp_path, "--prompt", "a red ball bouncing", "--no-expand") == 0
    assert captions[-1] == ["a red ball bouncing"]


def test_a_user_hook_is_called(tmp_path, captions, monkeypatch):
    (tmp_path / "my_expander_mod.py").write_text(
        "CALLS = []\n"
        "def rewrite(prompt):\n"
        "    CALLS.append(prompt)\n"
        "    return 'REWRITTEN: ' + prompt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _tiny_run(tmp_path / "run")
    assert _generate(run, tmp_path, "--prompt", "a red ball", "--expand", "my_expander_mod:rewrite") == 0
    assert captions[-1] == ["REWRITTEN: a red ball"]
    # and from Python, a callable
    got = []
    gen_cli.generate_videos(run, prompt="a blue ball", expand=lambda p: got.append(p) or "X " + p, num_samples=1)
    assert got == ["a blue ball"] and captions[-1] == ["X a blue ball"]


@pytest.mark.parametrize("spec", ["no_such_module_xyz:fn", "textwrap:nope", "bogus"])
def test_generate_bad_hook_is_one_line(tmp_path, capsys, spec):
    run = _tiny_run(tmp_path / "run")
    assert _generate(run, tmp_path, "--prompt", "a red ball", "--expand", spec) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("sparse-dit generate: --expand") and spec.split(":")[0] in err
