"""Dataclass configs, YAML loading, ``--set`` overrides and strict validation.

Every config is a plain dataclass. Range and choice constraints live in each field's
``metadata`` (``field(default=..., metadata=rule(ge=0))``) and are checked by :func:`validate`,
which ``__post_init__`` calls, so a config can never exist in an invalid state. Loading from a
dict (:func:`from_dict`) rejects unknown keys, naming the key and listing the allowed ones, and
rejects values of the wrong type, naming the field, the value and the expected type.

The top-level :class:`RecipeConfig` groups the sections a recipe YAML holds::

    model:     ModelConfig      (architecture; MoE options in model.moe)
    diffusion: DiffusionConfig  (flow matching: timestep sampling, sampler)
    train:     TrainConfig      (steps, batch, optimiser, EMA, checkpoints)
    data:      DataConfig       (source and shape of the training videos)
    parallel:  ParallelConfig   (DeepSpeed: ZeRO stage, expert parallelism, precision)
    output_dir: str
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

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
    "MoEConfig",
    "ModelConfig",
    "DiffusionConfig",
    "CONTEXT_TASKS",
    "ContextConfig",
    "TrainConfig",
    "DataConfig",
    "ParallelConfig",
    "RecipeConfig",
    "load_recipe",
]

T = TypeVar("T")

# Dotted section path of the config being built by from_dict, so errors raised while a nested
# dataclass validates itself name the full key ("train.max_steps", not "max_steps").
_PREFIX: contextvars.ContextVar[str] = contextvars.ContextVar("sparse_dit_config_prefix", default="")


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
            f"unknown key '{prefix}{unknown[0]}' in {cls.__name__}; allowed keys: {', '.join(sorted(names))}"
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
        raise ConfigError(f"override {text!r}: cannot parse value {raw!r} ({exc})") from exc
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of the nested mapping ``data`` with ``--set`` overrides applied.

    Missing intermediate sections are created; unknown keys are caught later by :func:`from_dict`.
    """
    import copy

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


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from ``path`` (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
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


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass
class MoEConfig(_Config):
    """Mixture-of-Experts options for the feed-forward slot. ``num_experts=0`` means dense."""

    num_experts: int = field(default=0, metadata=rule(ge=0, help="0 = dense FFN everywhere"))
    top_k: int = field(default=2, metadata=rule(ge=1))
    # Hidden width of one expert; None -> the dense FFN hidden width divided by `granularity`.
    expert_hidden_dim: Optional[int] = field(default=None, metadata=rule(ge=1))
    # Fine-grained experts (DeepSeekMoE): split each expert into `granularity` narrower ones.
    granularity: int = field(default=1, metadata=rule(ge=1))
    shared_experts: int = field(default=0, metadata=rule(ge=0))
    router: str = field(default="token_choice", metadata=rule(choices=("token_choice", "expert_choice")))
    score_func: str = field(default="softmax", metadata=rule(choices=("softmax", "sigmoid")))
    # Renormalise the top-k weights to sum to one (Mixtral/DeepSeek style).
    renormalize: bool = True
    # Condition the router on the diffusion timestep embedding as well as the token.
    timestep_routing: bool = False
    # None = dropless (default). A float turns on capacity-factor dropping.
    capacity_factor: Optional[float] = field(default=None, metadata=rule(gt=0))
    # Switch Transformer load-balancing loss coefficient (Fedus et al. 2021 use 1e-2).
    aux_loss_coef: float = field(default=1e-2, metadata=rule(ge=0))
    # ST-MoE router z-loss coefficient (Zoph et al. 2022 use 1e-3).
    z_loss_coef: float = field(default=1e-3, metadata=rule(ge=0))
    # DeepSeek-V3 auxiliary-loss-free balancing: per-expert bias update speed (0 = off).
    bias_update_rate: float = field(default=0.0, metadata=rule(ge=0))
    # Placement: MoE in every `every`-th block, starting after `first_dense` dense blocks.
    every: int = field(default=1, metadata=rule(ge=1))
    first_dense: int = field(default=0, metadata=rule(ge=0))
    # Expert compute backend: "auto" picks grouped_mm or a loop over experts by device/dtype.
    backend: str = field(default="auto", metadata=rule(choices=("auto", "grouped_mm", "loop", "megablocks")))
    # Under torch.autocast: "auto" runs the experts in the autocast dtype, "fp32" keeps them in
    # fp32 (the quickstart's setting, docs/training.md "Precision"). No effect without autocast.
    expert_precision: str = field(default="auto", metadata=rule(choices=("auto", "fp32")))
    # Number of timestep bins for the expert-load-per-timestep statistic.
    stat_timestep_bins: int = field(default=4, metadata=rule(ge=1))

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def _check(self) -> None:
        if self.enabled and self.router == "token_choice" and self.top_k > self.num_experts:
            raise ConfigError(
                f"model.moe.top_k={self.top_k} is out of range; allowed: 1..num_experts ({self.num_experts})"
            )


@dataclass
class ModelConfig(_Config):
    """Architecture of a :class:`sparse_dit.dit.SparseDiT`."""

    # Latent channels in (3 for pixel space, 4/16 for a VAE latent).
    in_channels: int = field(default=4, metadata=rule(ge=1))
    # Spacetime patch (pt, ph, pw); the latent's (T, H, W) must be divisible by it.
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = field(default=384, metadata=rule(ge=8))
    depth: int = field(default=12, metadata=rule(ge=1))
    num_heads: int = field(default=6, metadata=rule(ge=1))
    # FFN hidden width = mlp_ratio * hidden_size (DiT uses 4).
    mlp_ratio: float = field(default=4.0, metadata=rule(gt=0))
    # Explicit FFN hidden width; overrides mlp_ratio when set (SwiGLU presets use 2/3 of 4d).
    ffn_hidden_size: Optional[int] = field(default=None, metadata=rule(ge=1))
    activation: str = field(default="gelu_tanh", metadata=rule(choices=("gelu_tanh", "swiglu")))
    # Positions: 3D rotary ("rope") or fixed sin-cos added to tokens (DiT's "sincos").
    pos_embed: str = field(default="rope", metadata=rule(choices=("rope", "sincos")))
    rope_theta: float = field(default=10000.0, metadata=rule(gt=0))
    # RMS-normalise queries and keys per head (stabilises attention logits; SD3, Wan).
    qk_norm: bool = True
    qkv_bias: bool = True
    # Class-conditional: number of classes (a null class index = num_classes is added for CFG).
    num_classes: int = field(default=0, metadata=rule(ge=0))
    # Text conditioning: width of the text encoder's token embeddings (0 = no text).
    text_dim: int = field(default=0, metadata=rule(ge=0))
    # Cross-attention to text tokens in every block (needs text_dim > 0).
    cross_attention: bool = False
    # Predict a variance as DiT does (doubles output channels; the extra half is unused by flow matching).
    learn_sigma: bool = False
    # Frequency embedding size for the timestep MLP (DiT: 256).
    timestep_freq_dim: int = field(default=256, metadata=rule(ge=2))
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_hidden_size if self.ffn_hidden_size is not None else int(round(self.mlp_ratio * self.hidden_size))

    def _check(self) -> None:
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            raise ConfigError(f"model.patch_size={list(self.patch_size)!r} must be three positive ints (pt, ph, pw)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}"
            )
        if self.pos_embed == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.pos_embed='rope' needs an even head dim; got {self.head_dim}")
        if self.pos_embed == "sincos" and self.hidden_size % 2:
            raise ConfigError(f"model.pos_embed='sincos' needs an even hidden_size; got {self.hidden_size}")
        if self.cross_attention and self.text_dim == 0:
            raise ConfigError("model.cross_attention=True needs model.text_dim > 0 (the text encoder width)")
        if self.timestep_freq_dim % 2:
            raise ConfigError(f"model.timestep_freq_dim={self.timestep_freq_dim} must be even")


# --------------------------------------------------------------------------------------------
# Diffusion
# --------------------------------------------------------------------------------------------


@dataclass
class DiffusionConfig(_Config):
    """Rectified-flow / flow-matching objective and sampler."""

    # Timestep distribution for training: uniform, or logit-normal (SD3: mean 0, std 1).
    timestep_sampling: str = field(default="logit_normal", metadata=rule(choices=("uniform", "logit_normal")))
    logit_mean: float = 0.0
    logit_std: float = field(default=1.0, metadata=rule(gt=0))
    # Shift t -> s t / (1 + (s - 1) t). None = sqrt(num_tokens / shift_base_tokens) (SD3 / Open-Sora
    # resolution-dependent shift); a float fixes s; 1.0 = no shift.
    shift: Optional[float] = field(default=None, metadata=rule(gt=0))
    shift_base_tokens: int = field(default=256, metadata=rule(ge=1))
    # Sampler
    sampler: str = field(default="euler", metadata=rule(choices=("euler", "heun")))
    num_inference_steps: int = field(default=25, metadata=rule(ge=1))
    guidance_scale: float = field(default=1.0, metadata=rule(ge=0))
    # Probability of dropping the conditioning in training (classifier-free guidance).
    cond_dropout: float = field(default=0.1, metadata=rule(ge=0, le=1))


# --------------------------------------------------------------------------------------------
# Training, data, parallelism
# --------------------------------------------------------------------------------------------


# Tasks a random context-frame mask teaches (Open-Sora 1.2 style masking): predict the future
# from the first frames, extend backward in time, interpolate between clean start and end
# frames, and image-to-video from the first frame.
CONTEXT_TASKS = ("predict", "extend_backward", "interpolate", "image_to_video")


@dataclass
class ContextConfig(_Config):
    """Which frames of a training sample are given clean (the prompting tasks the model learns).

    ``mode: random`` (the default) teaches every prompting mode: with probability ``prob`` a
    sample gets the mask of one task drawn from ``tasks`` (relative weights), with a random
    number of given frames. ``mode: prefix`` gives every sample its first ``frames`` frames: one
    task, predicting the future, which is what a world model is asked (the quickstart; with
    random tasks the same budget did not beat copy-last-frame, docs/world_model.md, run J).
    ``mode: none`` is plain generation.
    """

    mode: str = field(default="random", metadata=rule(choices=("random", "prefix", "none")))
    # random: probability that a sample gets a context mask (the rest are plain generation).
    prob: float = field(default=0.5, metadata=rule(ge=0, le=1))
    # prefix: number of leading (latent) frames given clean; must leave at least one to generate.
    frames: int = field(default=1, metadata=rule(ge=1))
    # random: relative weight of each task in CONTEXT_TASKS (0 = never); missing tasks weigh 0.
    tasks: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in CONTEXT_TASKS})

    def _check(self) -> None:
        prefix = _PREFIX.get() or "train.context."
        for name, w in self.tasks.items():
            if name not in CONTEXT_TASKS:
                raise ConfigError(f"unknown key '{prefix}tasks.{name}'; allowed tasks: {', '.join(CONTEXT_TASKS)}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
                raise ConfigError(f"{prefix}tasks.{name}={w!r} is not allowed; a task weight is a finite number >= 0")
        if self.mode == "random" and self.prob > 0 and not sum(self.tasks.values()) > 0:
            raise ConfigError(f"{prefix}tasks={self.tasks!r} gives every task weight 0; give one task a weight > 0 or set mode: none")


@dataclass
class TrainConfig(_Config):
    """Optimisation and bookkeeping."""

    max_steps: int = field(default=1000, metadata=rule(ge=1))
    global_batch_size: int = field(default=16, metadata=rule(ge=1))
    # Micro-batch per rank; None = global_batch_size / world_size (no accumulation).
    micro_batch_size: Optional[int] = field(default=None, metadata=rule(ge=1))
    lr: float = field(default=1e-4, metadata=rule(gt=0))
    min_lr_ratio: float = field(default=0.1, metadata=rule(ge=0, le=1))
    warmup_steps: int = field(default=100, metadata=rule(ge=0))
    weight_decay: float = field(default=0.0, metadata=rule(ge=0))
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = field(default=1.0, metadata=rule(ge=0))
    ema_decay: float = field(default=0.999, metadata=rule(ge=0, le=1))
    seed: int = field(default=0, metadata=rule(ge=0))
    save_every: int = field(default=500, metadata=rule(ge=1))
    keep_last: int = field(default=2, metadata=rule(ge=1))
    log_every: int = field(default=1, metadata=rule(ge=1))
    sample_every: int = field(default=0, metadata=rule(ge=0, help="0 = never"))
    # Context frames (image/video prompts) of each training sample: random tasks or a fixed prefix.
    context: ContextConfig = field(default_factory=ContextConfig)
    activation_checkpointing: bool = False
    # Stop (with a checkpoint) after this many steps without changing the LR schedule, which
    # still spans max_steps: for time-limited jobs and the resume test. None = run to max_steps.
    stop_after: Optional[int] = field(default=None, metadata=rule(ge=1))


@dataclass
class DataConfig(_Config):
    """Where training videos come from and their shape."""

    # "synthetic" = procedurally generated moving squares (built in code); "physics" = a
    # dataset written by `sparse-dit data physics`; "folder"/"hf" = real video.
    source: str = field(default="synthetic", metadata=rule(choices=("synthetic", "physics", "folder", "hf")))
    path: Optional[str] = None
    num_frames: int = field(default=8, metadata=rule(ge=1))
    height: int = field(default=16, metadata=rule(ge=1))
    width: int = field(default=16, metadata=rule(ge=1))
    channels: int = field(default=3, metadata=rule(ge=1))
    num_videos: int = field(default=256, metadata=rule(ge=1))
    num_workers: int = field(default=0, metadata=rule(ge=0))
    # Caption encoder for text-conditioned models (model.text_dim > 0): "hash" (built in, tiny,
    # its width follows model.text_dim), "minilm" or a local HF model directory. Models with
    # model.num_classes > 0 and no text train on class labels instead (the trainer's switch).
    text_encoder: str = "hash"
    # Any-size training (sparse_dit.data.bucketing, used by the trainer): a token budget per
    # micro-batch turns on (T, H, W) buckets with aspect-ratio buckets built from these square-
    # equivalent sides and durations; None = every clip cropped to num_frames x height x width.
    token_budget: Optional[int] = field(default=None, metadata=rule(ge=1))
    bucket_resolutions: tuple[int, ...] = (32,)
    bucket_frame_counts: tuple[int, ...] = (8, 16)


@dataclass
class ParallelConfig(_Config):
    """DeepSpeed: ZeRO stage, expert parallelism and precision."""

    zero_stage: int = field(default=0, metadata=rule(choices=(0, 1, 2, 3)))
    ep_size: int = field(default=1, metadata=rule(ge=1))
    # "auto" = bf16 on GPU, fp32 on CPU. "bf16"/"fp16": DeepSpeed's mixed precision (weights and
    # activations in 16 bits, fp32 master weights in the optimizer). "bf16-autocast": fp32 weights,
    # the forward under torch.autocast(bf16) (DeepSpeed's `torch_autocast`), MoE experts in fp32;
    # the quickstart's setting (docs/training.md, "Precision").
    precision: str = field(default="auto", metadata=rule(choices=("auto", "fp32", "bf16", "fp16", "bf16-autocast")))
    # Optional user DeepSpeed JSON whose keys override the generated config.
    deepspeed_config: Optional[str] = None


@dataclass
class RecipeConfig(_Config):
    """A full training recipe: one YAML file with these sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output_dir: str = "runs/default"
    # Preset name the model section starts from (its keys override the preset's).
    preset: Optional[str] = None

    def _check(self) -> None:
        ctx = self.train.context
        if ctx.mode == "prefix" and self.data.token_budget is None and ctx.frames >= self.data.num_frames:
            raise ConfigError(
                f"train.context.frames={ctx.frames} leaves no frame to generate in data.num_frames={self.data.num_frames}; "
                f"allowed: 1..{self.data.num_frames - 1}"
            )


def load_recipe(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), data: dict | None = None) -> RecipeConfig:
    """Load a recipe YAML (or mapping), apply ``--set`` overrides, expand ``preset`` and validate.

    Args:
        path: the YAML file; ignored when ``data`` is given.
        overrides: ``["train.max_steps=10", ...]``.
        data: an already-loaded mapping.
    """
    raw = dict(data) if data is not None else load_yaml(path)  # type: ignore[arg-type]
    raw = apply_overrides(raw, list(overrides))
    preset = raw.get("preset")
    if preset is not None:
        from sparse_dit.dit import preset_config

        base = to_dict(preset_config(preset))
        model = raw.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError(f"model must be a mapping, got {type(model).__name__}")
        moe = {**base.pop("moe"), **(model.get("moe") or {})}
        raw["model"] = {**base, **{k: v for k, v in model.items() if k != "moe"}, "moe": moe}
    return from_dict(RecipeConfig, raw)
