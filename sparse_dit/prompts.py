"""Prompt expansion (issue 13): rewrite a short prompt into a caption like the training captions.

Sora and DALL-E 3 train on long, detailed captions and, at sampling time, have a language model
rewrite the user's short prompt into one of those ("Improving Image Generation with Better
Captions", Betker et al. 2023; Sora report, "language understanding"): a model conditioned on
detailed captions does worse on prompts that look nothing like them. Our physics world's
captions come from templates (:mod:`sparse_dit.data.captions`), so the default expander needs no
language model: it reads the short prompt's cues (colours, sizes, speeds, directions, what
happens) into a scene and captions that scene with the world's own ``caption_for``, so its
output is in the training captions' format by construction::

    "a red ball bouncing"  ->  "A medium red ball bounces off the walls of a box under gravity."
    "two balls collide"    ->  "A medium red ball and a medium green ball move towards each other
                                and collide. Both balls weigh about the same."

Unstated fields take the middle of the training ranges (a "medium" ball moving "steadily" to
the right). A prompt with no cue of the physics world (no colour, ball or motion it knows) is
returned unchanged: the template invents nothing.

The hook is pluggable: :func:`resolve_expander` accepts a callable ``str -> str``, a name in
:data:`PROMPT_EXPANDERS` (``"template"``, ``"none"``), or a dotted path ``module:function``
(``sparse-dit generate --expand mypkg.prompts:rewrite``); ``sparse-dit generate`` expands
``--prompt`` with it unless ``--no-expand``.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable, Optional

import numpy as np

from sparse_dit.data.captions import caption_for
from sparse_dit.data.physics import Ball, Scene
from sparse_dit.data.render import PALETTE_NAMES

__all__ = ["PromptExpander", "PROMPT_EXPANDERS", "template_expand", "no_expand", "resolve_expander", "expand_prompt"]

PromptExpander = Callable[[str], str]

# A representative radius (world units) per size word of the captions, and words users say.
_SIZES = {"tiny": 0.45, "small": 0.85, "little": 0.85, "medium": 1.1, "large": 1.4, "big": 1.4, "huge": 1.8, "giant": 1.8}
# A representative speed (units/s) per speed phrase; longest phrases first when matching.
_SPEEDS = {"very slowly": 0.5, "very slow": 0.5, "slowly": 1.5, "slow": 1.5, "steadily": 2.5, "very fast": 5.0,
           "very quickly": 5.0, "fast": 3.6, "quickly": 3.6, "quick": 3.6}
_DEFAULT_RADIUS, _DEFAULT_SPEED = _SIZES["medium"], _SPEEDS["steadily"]
# What happens -> scenario, checked in this order (a bouncing ball that falls is a bounce).
_SCENARIO_CUES = (
    ("occlusion", r"\b(behind|occlu\w*|hid(e|es|den|ing)|wall|bar|disappear\w*|reappear\w*)\b"),
    ("collision", r"\b(collid\w*|collision\w*|crash\w*|hit\w*|bump\w*)\b"),
    ("bounce", r"\b(bounc\w*|box)\b"),
    ("parabola", r"\b(throw\w*|thrown|threw|parabol\w*|arc\w*|launch\w*|toss\w*|fall\w*|drop\w*)\b"),
    ("uniform", r"\b(mov\w*|roll\w*|glid\w*|slid\w*|travel\w*|straight|constant)\b"),
)
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "1": 1, "2": 2, "3": 3, "4": 4}
_MAX_BALLS = {"uniform": 1, "parabola": 1, "collision": 2, "bounce": 4, "occlusion": 2}
_MIN_BALLS = {"uniform": 1, "parabola": 1, "collision": 2, "bounce": 1, "occlusion": 1}


def _direction(text: str, default: tuple[float, float]) -> tuple[float, float]:
    """A unit-ish velocity direction (pixel coordinates, y down) from left/right/up/down words."""
    x = (1.0 if re.search(r"\bright(wards?)?\b", text) else 0.0) - (1.0 if re.search(r"\bleft(wards?)?\b", text) else 0.0)
    y = (1.0 if re.search(r"\b(down|downwards?)\b", text) else 0.0) - (1.0 if re.search(r"\b(up|upwards?)\b", text) else 0.0)
    return (x, y) if (x, y) != (0.0, 0.0) else default


def _in_order(text: str, table: dict[str, float]) -> list[float]:
    """The values of the table's phrases in the order they appear in ``text`` (longest first)."""
    found, taken = [], [False] * len(text)
    for phrase in sorted(table, key=len, reverse=True):
        for m in re.finditer(rf"\b{re.escape(phrase)}\b", text):
            if not any(taken[m.start() : m.end()]):
                found.append((m.start(), table[phrase]))
                taken[m.start() : m.end()] = [True] * (m.end() - m.start())
    return [v for _, v in sorted(found)]


def template_expand(prompt: str) -> str:
    """Expand a short prompt into a physics-world caption (see the module docstring).

    Args:
        prompt: the user's prompt, e.g. ``"a red ball bouncing"``.

    Returns:
        A caption in the format of :func:`sparse_dit.data.captions.caption_for`, or ``prompt``
        unchanged when it has no cue of the physics world.
    """
    text = " ".join(str(prompt).lower().replace(",", " , ").split())
    colors = [m.group(1) for m in re.finditer(rf"\b({'|'.join(PALETTE_NAMES)})\b", text)]
    colors = list(dict.fromkeys(colors))  # first mention of each colour, in order
    scenario = next((name for name, cue in _SCENARIO_CUES if re.search(cue, text)), None)
    if not colors and scenario is None and not re.search(r"\b(ball|balls|sphere|spheres)\b", text):
        return prompt
    scenario = scenario or "uniform"
    count = max([len(colors)] + [_NUMBER_WORDS[w] for w in re.findall(r"\b(one|two|three|four|[1-4])\b", text)]
                + [2 if re.search(r"\b(balls|spheres|each other|both)\b", text) else 1])
    count = min(max(count, _MIN_BALLS[scenario]), _MAX_BALLS[scenario])
    colors = (colors + [c for c in PALETTE_NAMES if c not in colors])[:count]
    sizes, speeds = _in_order(text, _SIZES), _in_order(text, _SPEEDS)
    # one size / speed word describes every ball; several are given to the balls in order
    sizes = sizes + [sizes[-1] if sizes else _DEFAULT_RADIUS] * count
    speeds = speeds + [speeds[-1] if speeds else _DEFAULT_SPEED] * count
    heading = _direction(text, (1.0, 0.0))
    balls = []
    for k in range(count):
        d = heading
        if scenario == "collision" and k == 1:
            d = (-heading[0], -heading[1])  # the two balls approach each other
        elif scenario == "occlusion":
            d = (d[0] if d[0] else 1.0, 0.0)  # occlusion lanes are horizontal
        norm = float(np.hypot(*d))
        v = (speeds[k] * d[0] / norm, speeds[k] * d[1] / norm)
        balls.append(Ball(colors[k], sizes[k], speeds[k], sizes[k], (0.0, 0.0), v))
    scene = Scene(scenario, "id", 32, 32, balls=balls)
    return caption_for(scene, np.random.default_rng(0))


def no_expand(prompt: str) -> str:
    """The prompt unchanged (``--no-expand``).

    Args:
        prompt: the user's prompt.
    """
    return prompt


# Named expanders (``--expand NAME``); a dotted path ``module:function`` plugs in any other.
PROMPT_EXPANDERS: dict[str, PromptExpander] = {
    "template": template_expand,
    "none": no_expand,
}


def resolve_expander(spec: str | PromptExpander | None) -> PromptExpander:
    """The expander a spec names.

    Args:
        spec: a callable ``str -> str``; a name in :data:`PROMPT_EXPANDERS`; a dotted path
            ``package.module:function``; or None (no expansion).

    Raises:
        ValueError: one line naming the spec and what is allowed (an unknown name, a module
            that cannot be imported, a missing or non-callable attribute).
    """
    if spec is None:
        return no_expand
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"expand_prompt={spec!r} is not allowed; give a callable, one of {list(PROMPT_EXPANDERS)} or 'module:function'")
    if spec in PROMPT_EXPANDERS:
        return PROMPT_EXPANDERS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"prompt expander {spec!r} is not allowed; use one of {list(PROMPT_EXPANDERS)} or a dotted path 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure of a user's module is a bad input
        why = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"prompt expander {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {why})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"prompt expander {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"prompt expander {spec!r}: {module_name}.{attr} is a {type(fn).__name__}, not a function str -> str")
    return fn


def expand_prompt(prompt: str, expander: str | PromptExpander | None = "template") -> str:
    """Expand ``prompt`` with ``expander`` (see :func:`resolve_expander`) and check the result.

    Args:
        prompt: the user's prompt.
        expander: a callable, a name in :data:`PROMPT_EXPANDERS`, ``module:function`` or None.

    Raises:
        ValueError: a bad expander spec, or an expander that returned something other than a
            non-empty string.
    """
    fn = resolve_expander(expander)
    out: Optional[object] = fn(prompt)
    if not isinstance(out, str) or not out.strip():
        name = getattr(fn, "__qualname__", repr(fn))
        raise ValueError(f"prompt expander {name} returned {out!r} for {prompt!r}; it must return a non-empty str")
    return out
