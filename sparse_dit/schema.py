"""Config schema machinery: strict dataclass validation, YAML loading and ``--set`` overrides.

The config dataclasses themselves live in :mod:`sparse_dit.config`; this module is the generic
part they are built on. Range and choice constraints live in each field's ``metadata``
(``field(default=..., metadata=rule(ge=0))``) and are checked by :func:`validate`, which the
:class:`_Config` mixin's ``__post_init__`` calls, so a config can never exist in an invalid
state. :func:`from_dict` rejects unknown keys (naming the key and listing the allowed ones) and
values of the wrong type (naming the field, the value and the expected type).

Why this is ~250 lines of our own and not pydantic or OmegaConf: docs/architecture.md, "Why our
own config schema" (benchmarks/config_libraries.py feeds both the same bad inputs).
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "rule",
    "validate",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "parse_override",
    "load_yaml",
    "current_prefix",
]

T = TypeVar("T")

# Dotted section path of the config being built by from_dict, so errors raised while a nested
# dataclass validates itself name the full key ("train.max_steps", not "max_steps").
_PREFIX: contextvars.ContextVar[str] = contextvars.ContextVar("sparse_dit_config_prefix", default="")


def current_prefix() -> str:
    """Dotted section path (``"train.context."``) of the config :func:`from_dict` is building, or ``""``.

    For a config's cross-field ``_check`` to name its keys in full.
    """
    return _PREFIX.get()


class ConfigError(ValueError):
    """A config value or key is invalid. The message names the field, the value and what is allowed."""


def rule(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
    help: str = "",
) -> dict:
    """Field metadata for :func:`validate`: numeric bounds and/or an explicit set of choices."""
    return {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "help": help}


# --------------------------------------------------------------------------------------------
# Type checking and coercion
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: a list of exactly len(args)
            return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        inner = _type_name(args[0]) if args else "any"
        return f"{origin.__name__}[{inner}{', ...' if origin is tuple else ''}]"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_NO = object()
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` or ``_NO`` when it does not fit.

    Only lossless conversions are made: int -> float, list -> tuple, a mapping -> nested
    dataclass. Strings are never parsed into numbers here (overrides are YAML-parsed earlier),
    and bools are never accepted as numbers.
    """
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)} else _NO
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg, where)
            if out is not _NO:
                return out
        return _NO
    if tp is type(None):
        return None if value is None else _NO
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, prefix=where)
        return _NO
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _NO
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[float, float]: exactly that many
            if len(value) != len(args):
                return _NO
        inner = args[0] if args else Any
        items = []
        for i, item in enumerate(value):
            c = _coerce(item, inner, f"{where}[{i}]")
            if c is _NO:
                return _NO
            items.append(c)
        return tuple(items) if origin is tuple else items
    if origin is dict:
        return dict(value) if isinstance(value, dict) else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, where "3e-3" (no dot) is a string, not a float: accept it.
            return float(value)
        return float(value) if isinstance(value, (int, float)) else _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    return value if isinstance(value, tp) else _NO


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def validate(obj: Any, prefix: str = "") -> None:
    """Check every field of dataclass ``obj`` against its type hint and its :func:`rule` metadata.

    Raises:
        ConfigError: naming the dotted field, the value and what is allowed.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        name = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        tp = hints[f.name]
        coerced = _coerce(value, tp, name)
        if coerced is _NO:
            raise ConfigError(f"{name}={value!r} has type {type(value).__name__}; expected {_type_name(tp)}")
        if coerced is not value:
            object.__setattr__(obj, f.name, coerced)
            value = coerced
        items = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):  # .inf/.nan parse as YAML floats
            raise ConfigError(f"{name}={value!r} is not allowed; expected a finite number")
        meta = f.metadata
        if value is None or not meta:
            continue
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}={value!r} is not allowed; choose one of {list(choices)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for key, ok, word in (
                ("ge", lambda v, b: v >= b, ">="),
                ("gt", lambda v, b: v > b, ">"),
                ("le", lambda v, b: v <= b, "<="),
                ("lt", lambda v, b: v < b, "<"),
            ):
                bound = meta.get(key)
                if bound is not None and not ok(value, bound):
                    raise ConfigError(f"{name}={value!r} is out of range; allowed: {word} {bound}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    Args:
        cls: the dataclass type.
        data: a mapping of field names to values; nested dataclass fields take nested mappings.
        prefix: dotted path of this section, used in error messages (``"model."``).

    Raises:
        ConfigError: for an unknown key (the message lists the allowed keys) or a bad value.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__} must be a mapping, got {type(data).__name__}: {data!r}")
    if prefix and not prefix.endswith("."):
        prefix += "."
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix + str(unknown[0])!r} in {cls.__name__}; allowed keys: {', '.join(sorted(names))}"
        )
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        coerced = _coerce(value, hints[key], f"{prefix}{key}")
        if coerced is _NO:
            raise ConfigError(
                f"{prefix}{key}={value!r} has type {type(value).__name__}; expected {_type_name(hints[key])}"
            )
        kwargs[key] = coerced
    token = _PREFIX.set(prefix)
    try:
        obj = cls(**kwargs)  # __post_init__ validates, naming fields under `prefix`
    finally:
        _PREFIX.reset(token)
    return obj


def to_dict(obj: Any) -> dict:
    """A plain-python (YAML/JSON-serialisable) copy of a config dataclass."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"section.key=value"`` into (``["section", "key"]``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value {raw!r} ({yaml_error_line(exc)})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of the nested mapping ``data`` with ``--set`` overrides applied.

    Missing intermediate sections are created; unknown keys are caught later by :func:`from_dict`.
    """
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: i + 1])} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {seen[key]}); give each key once")
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (PyYAML's own message spans several)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"YAML syntax error{where}: {problem}"


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from ``path`` (an empty file is an empty mapping).

    Raises:
        ConfigError: a missing file, a file that is not UTF-8 text or not valid YAML, a key given
            twice, or a top level that is not a mapping; one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r}: {yaml_error_line(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


class _Config:
    """Mixin: validation on construction, ``from_dict``/``to_dict``/``replace`` helpers."""

    def __post_init__(self) -> None:
        validate(self, _PREFIX.get())
        check = getattr(self, "_check", None)
        if check is not None:
            check()

    @classmethod
    def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
        return from_dict(cls, data, prefix)

    def to_dict(self) -> dict:
        return to_dict(self)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)
