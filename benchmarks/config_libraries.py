"""Our config schema (sparse_dit.schema) vs pydantic v2 dataclasses and OmegaConf structured configs.

Feeds the same bad inputs to the three and prints each one's message, for docs/architecture.md
("Why our own config schema"). The schema compared is a slice of ours with the same field kinds:
a nested section, an int with a bound, a float in [0, 1], a choice, a bool, an optional float.

    .venv/bin/python -m pip install pydantic omegaconf   # not dependencies of the library
    .venv/bin/python benchmarks/config_libraries.py
"""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import field
from typing import Literal, Optional

import yaml
from sparse_dit.config import RecipeConfig
from sparse_dit.presets import load_recipe
from sparse_dit.schema import ConfigError, apply_overrides

import pydantic
from omegaconf import OmegaConf
from pydantic import Field, StrictBool, StrictInt, TypeAdapter
from pydantic.dataclasses import dataclass as pyd_dataclass

# -- pydantic v2 dataclasses: the same slice, constraints as Field(...) -------------------------
# strict=True on the whole model would refuse a dict for a nested dataclass (python input), so
# strictness is per field, as close to ours as pydantic allows: StrictInt/StrictBool, lax float.
_STRICT = pydantic.ConfigDict(extra="forbid")


@pyd_dataclass(config=_STRICT)
class PTrain:
    max_steps: StrictInt = Field(default=1000, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    activation_checkpointing: StrictBool = False


@pyd_dataclass(config=_STRICT)
class PDiffusion:
    sampler: Literal["euler", "heun"] = "euler"
    cond_dropout: float = Field(default=0.1, ge=0, le=1)
    shift: Optional[float] = Field(default=None, gt=0)


@pyd_dataclass(config=_STRICT)
class PModel:
    hidden_size: StrictInt = Field(default=384, ge=8)
    qk_norm: StrictBool = True


@pyd_dataclass(config=_STRICT)
class PRecipe:
    model: PModel = dataclasses.field(default_factory=PModel)
    diffusion: PDiffusion = dataclasses.field(default_factory=PDiffusion)
    train: PTrain = dataclasses.field(default_factory=PTrain)


# pydantic's default (lax) mode, for the messages it gives without strict=True
@pyd_dataclass(config=pydantic.ConfigDict(extra="forbid"))
class LTrain:
    max_steps: int = Field(default=1000, ge=1)
    lr: float = Field(default=1e-4, gt=0)


@pyd_dataclass(config=pydantic.ConfigDict(extra="forbid"))
class LModel:
    qk_norm: bool = True


@pyd_dataclass(config=pydantic.ConfigDict(extra="forbid"))
class LRecipe:
    model: LModel = dataclasses.field(default_factory=LModel)
    train: LTrain = dataclasses.field(default_factory=LTrain)


# -- OmegaConf structured configs: plain dataclasses; no ranges, no choices beyond Enum --------
@dataclasses.dataclass
class OTrain:
    max_steps: int = 1000
    lr: float = 1e-4
    activation_checkpointing: bool = False


@dataclasses.dataclass
class ODiffusion:
    sampler: str = "euler"  # OmegaConf has no Literal; an Enum would restrict it
    cond_dropout: float = 0.1
    shift: Optional[float] = None


@dataclasses.dataclass
class OModel:
    hidden_size: int = 384
    qk_norm: bool = True


@dataclasses.dataclass
class ORecipe:
    model: OModel = field(default_factory=OModel)
    diffusion: ODiffusion = field(default_factory=ODiffusion)
    train: OTrain = field(default_factory=OTrain)


# -- the bad inputs (as a recipe YAML would hold them) ------------------------------------------
CASES: list[tuple[str, str, list[str]]] = [
    ("unknown key", "model:\n  hidden_sise: 64\n", []),
    ("wrong type", "train:\n  max_steps: ten\n", []),
    ("out of range", "diffusion:\n  cond_dropout: 1.5\n", []),
    ("bad choice", "diffusion:\n  sampler: ddim\n", []),
    ("nested section not a mapping", "model: 64\n", []),
    ("int for a bool", "model:\n  qk_norm: 1\n", []),
    ("bool for an int", "train:\n  max_steps: true\n", []),
    ("YAML 1.1 '3e-3' (a string to PyYAML)", "train:\n  lr: 3e-3\n", []),
    ("--set override, typo in the key", "{}\n", ["train.max_step=3"]),
    ("--set override, bad value", "{}\n", ["train.lr=fast"]),
]


def ours(text: str, sets: list[str]) -> str:
    try:
        r = load_recipe(data=yaml.safe_load(text), overrides=sets)
    except ConfigError as e:
        return f"ConfigError: {e}"
    return f"accepted: {_pick(dataclasses.asdict(r), text, sets)}"


def _raw(text: str, sets: list[str]) -> dict:
    return apply_overrides(yaml.safe_load(text) or {}, sets)  # the same YAML + --set parsing for all


def _pick(d: dict, text: str, sets: list[str]) -> str:
    raw = _raw(text, sets)
    sec = next(iter(raw)) if raw else "train"
    key = next(iter(raw[sec])) if isinstance(raw.get(sec), dict) and raw[sec] else None
    val = d.get(sec, {}).get(key) if key and isinstance(d.get(sec), dict) else d.get(sec)
    return f"{sec}{'.' + key if key else ''}={val!r}"


def pyd(cls: type, text: str, sets: list[str]) -> str:
    try:
        r = TypeAdapter(cls).validate_python(_raw(text, sets))
    except pydantic.ValidationError as e:
        return f"ValidationError: {e}"
    return f"accepted: {_pick(dataclasses.asdict(r), text, sets)}"


def omega(text: str, sets: list[str]) -> str:
    try:
        base = OmegaConf.structured(ORecipe)
        cfg = OmegaConf.merge(base, OmegaConf.create(text))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(sets))  # OmegaConf's own --set parser
        obj = OmegaConf.to_object(cfg)
    except Exception as e:  # noqa: BLE001 - OmegaConf raises several error classes
        return f"{type(e).__name__}: {e}"
    return f"accepted: {_pick(dataclasses.asdict(obj), text, sets)}"


def main() -> None:
    print(f"pydantic {pydantic.VERSION}, omegaconf {__import__('omegaconf').__version__}")
    for name, text, sets in CASES:
        print(f"\n=== {name}: {text.strip()!r}" + (f" --set {' '.join(sets)}" if sets else ""))
        for who, out in (
            ("ours", ours(text, sets)),
            ("pydantic strict", pyd(PRecipe, text, sets)),
            ("pydantic lax", pyd(LRecipe, text, sets) if not text.startswith("diffusion") else "(not in the lax slice)"),
            ("omegaconf", omega(text, sets)),
        ):
            print(f"--- {who}:\n" + textwrap.indent(out.strip(), "    "))


if __name__ == "__main__":
    main()
