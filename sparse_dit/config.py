"""The config dataclasses: model, MoE, diffusion, training, data, parallelism, recipe.

Every config is a plain dataclass built on :mod:`sparse_dit.schema`: range and choice
constraints live in each field's ``metadata`` (``field(default=..., metadata=rule(ge=0))``) and
are checked on construction, so a config can never exist in an invalid state; unknown keys and
wrong types are rejected by :func:`~sparse_dit.schema.from_dict`. :class:`ConfigError` is
re-exported from there. A recipe YAML is read by :func:`sparse_dit.presets.load_recipe` (it
expands a ``preset:`` key, and the preset table builds these dataclasses, so it cannot live here
without an import cycle).

The top-level :class:`RecipeConfig` groups the sections a recipe YAML holds::

    model:     ModelConfig      (architecture; MoE options in model.moe)
    diffusion: DiffusionConfig  (flow matching: timestep sampling, sampler)
    train:     TrainConfig      (steps, batch, optimiser, EMA, checkpoints)
    data:      DataConfig       (source and shape of the training videos)
    parallel:  ParallelConfig   (DeepSpeed: ZeRO stage, expert parallelism, precision)
    output_dir: str
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from sparse_dit.autoencoder import autoencoder_config, check_autoencoder
from sparse_dit.schema import ConfigError, _Config, current_prefix, rule

__all__ = [
    "ConfigError",
    "MoEConfig",
    "ModelConfig",
    "DiffusionConfig",
    "CONTEXT_TASKS",
    "ContextConfig",
    "TrainConfig",
    "DataConfig",
    "ParallelConfig",
    "RecipeConfig",
]

# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


# Routers whose balance loss is Switch's (RouterBase.switch_balance_loss; a test keeps the two in step).
GLOBAL_BALANCE_ROUTERS = ("token_choice", "batch")


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
    # Routing rule (sparse_dit.moe.routers.ROUTERS; docs/moe.md "Routing"): "batch" = top-(k*T) over all
    # token-expert scores of the micro-batch; "noise_level" = one expert set per timestep range (Wan2.2).
    router: str = field(default="token_choice", metadata=rule(choices=("token_choice", "expert_choice", "batch", "noise_level")))
    # noise_level: boundaries between timestep ranges (one boundary = two ranges, Wan2.2). Range 0 is
    # the highest noise (t >= the largest boundary); each range owns num_experts / ranges experts.
    noise_boundaries: tuple[float, ...] = ()
    # Unit of noise_boundaries: "t" (a timestep in (0, 1), the shifted t the model sees) or "snr"
    # (signal-to-noise ratio ((1 - t) / t)^2 of x_t, > 0; t = 1 / (1 + sqrt(snr))).
    noise_boundary_unit: str = field(default="t", metadata=rule(choices=("t", "snr")))
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
    # Where the Switch balance loss counts routes (docs/moe.md "Balancing"): "micro_batch" = this
    # rank's micro-batch (the Switch/GShard default); "global" = all micro-batches of the step on
    # all ranks (Qiu et al. 2025), one all-reduce per training forward. Token choice only.
    balance_scope: str = field(default="micro_batch", metadata=rule(choices=("micro_batch", "global")))
    # DeepSeek-V3 auxiliary-loss-free balancing: per-expert bias update speed (0 = off).
    bias_update_rate: float = field(default=0.0, metadata=rule(ge=0))
    # Placement: MoE in every `every`-th block, starting after `first_dense` dense blocks.
    every: int = field(default=1, metadata=rule(ge=1))
    first_dense: int = field(default=0, metadata=rule(ge=0))
    # Expert compute backend (sparse_dit.moe.ops.EXPERT_BACKENDS): "auto" picks grouped_mm on
    # CUDA for aligned shapes, else the fused single-process op, else the loop over experts.
    backend: str = field(default="auto", metadata=rule(choices=("auto", "grouped_mm", "fused_local", "loop", "megablocks")))
    # Under torch.autocast: "auto" runs the experts in the autocast dtype, "fp32" keeps them in
    # fp32 (the quickstart's setting, docs/training.md "Precision"). No effect without autocast.
    expert_precision: str = field(default="auto", metadata=rule(choices=("auto", "fp32")))
    # Number of timestep bins for the expert-load-per-timestep statistic.
    stat_timestep_bins: int = field(default=4, metadata=rule(ge=1))

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    @property
    def boundary_timesteps(self) -> tuple[float, ...]:
        """``noise_boundaries`` as timesteps t, largest (highest noise) first."""
        if self.noise_boundary_unit == "snr":
            return tuple(sorted((1.0 / (1.0 + b ** 0.5) for b in self.noise_boundaries), reverse=True))
        return tuple(sorted(self.noise_boundaries, reverse=True))

    @property
    def num_noise_ranges(self) -> int:
        """Timestep ranges of ``router="noise_level"`` (1 for every other rule)."""
        return len(self.noise_boundaries) + 1 if self.router == "noise_level" else 1

    def router_options(self) -> dict:
        """Rule-specific constructor arguments of the router (``noise_level``: its boundaries as t)."""
        return {"boundaries": self.boundary_timesteps} if self.router == "noise_level" else {}

    def _check(self) -> None:
        p = current_prefix() or "model.moe."
        if self.enabled and self.balance_scope == "global" and self.router not in GLOBAL_BALANCE_ROUTERS:
            raise ConfigError(f"{p}balance_scope='global' has no effect with router={self.router!r} (it has no Switch "
                              f"balance loss); allowed with router in {list(GLOBAL_BALANCE_ROUTERS)}, else use 'micro_batch'")
        if self.enabled and self.router in ("token_choice", "batch") and self.top_k > self.num_experts:
            raise ConfigError(
                f"{p}top_k={self.top_k} is out of range; allowed: 1..num_experts ({self.num_experts})"
            )
        if self.noise_boundaries and self.router != "noise_level":
            raise ConfigError(f"{p}noise_boundaries={list(self.noise_boundaries)!r} is only used by router='noise_level'; "
                              f"got router={self.router!r}")
        if self.enabled and self.router == "batch" and self.capacity_factor is not None:
            raise ConfigError(f"{p}capacity_factor={self.capacity_factor} is not used by router='batch' (its pool holds "
                              "exactly top_k routes per token on average); set it to null")
        if self.enabled and self.router in ("batch", "noise_level") and self.bias_update_rate > 0:
            raise ConfigError(f"{p}bias_update_rate={self.bias_update_rate} is not available with router={self.router!r}; "
                              "use the balance loss (aux_loss_coef) and set bias_update_rate=0")
        if self.router == "noise_level" and self.enabled:
            b = self.noise_boundaries
            if not b:
                raise ConfigError(f"{p}noise_boundaries=[] is empty; router='noise_level' needs at least one boundary "
                                  "(e.g. [0.875] with noise_boundary_unit='t')")
            if self.noise_boundary_unit == "t" and not all(0 < x < 1 for x in b):
                raise ConfigError(f"{p}noise_boundaries={list(b)!r} is out of range; allowed: timesteps in (0, 1)")
            if self.noise_boundary_unit == "snr" and not all(x > 0 for x in b):
                raise ConfigError(f"{p}noise_boundaries={list(b)!r} is out of range; allowed: SNR values > 0")
            if len(set(b)) != len(b):
                raise ConfigError(f"{p}noise_boundaries={list(b)!r} has a repeated boundary; give distinct values")
            R = len(b) + 1
            if self.num_experts % R:
                raise ConfigError(f"{p}num_experts={self.num_experts} is not divisible by the {R} noise ranges of "
                                  f"noise_boundaries={list(b)!r}; each range owns num_experts / {R} experts")
            if self.top_k > self.num_experts // R:
                raise ConfigError(f"{p}top_k={self.top_k} is out of range; allowed: 1..{self.num_experts // R} "
                                  f"(the experts of one noise range)")
            if self.capacity_factor is not None:
                raise ConfigError(f"{p}capacity_factor={self.capacity_factor} is not available with router='noise_level'; set it to null")


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


# Sampling timestep grids (sparse_dit.diffusion.FlowMatchScheduler): diffusers' default first.
TIMESTEP_GRIDS = ("diffusers", "uniform")


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
    # Sampling timestep grid: "diffusers" = FlowMatchEulerDiscreteScheduler's (its last model call
    # at the shifted sigma_min = shift(1/1000), then a step to 0); "uniform" = n + 1 evenly spaced
    # points from 1 to 0, shifted (TIMESTEP_GRIDS above).
    timestep_grid: str = field(default="diffusers", metadata=rule(choices=TIMESTEP_GRIDS))
    num_inference_steps: int = field(default=25, metadata=rule(ge=1))
    guidance_scale: float = field(default=1.0, metadata=rule(ge=0))
    # One CFG scale per noise range of model.moe.router: noise_level, highest noise first (Wan2.2
    # guides its two experts differently); overrides guidance_scale when set. () = guidance_scale.
    guidance_scales: tuple[float, ...] = ()
    # Probability of dropping the conditioning in training (classifier-free guidance).
    cond_dropout: float = field(default=0.1, metadata=rule(ge=0, le=1))

    @property
    def guidance(self) -> float | tuple[float, ...]:
        """The sampler's ``guidance_scale``: ``guidance_scales`` when set, else ``guidance_scale``."""
        return self.guidance_scales or self.guidance_scale

    def _check(self) -> None:
        if any(not w >= 0 for w in self.guidance_scales):
            raise ConfigError(f"{current_prefix() or 'diffusion.'}guidance_scales={list(self.guidance_scales)!r} is out of range; "
                              "allowed: numbers >= 0, one per noise range")


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
        prefix = current_prefix() or "train.context."
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
    # torch.compile each DiT block (regional compilation: blocks of one shape share the compiled
    # code, so compile time does not grow with depth). Fuses the norms, modulations, RoPE and
    # activations that leave an eager GPU step memory-bound (BENCHMARKS.md, issue 16).
    compile: bool = False
    # Stop (with a checkpoint) after this many steps without changing the LR schedule, which
    # still spans max_steps: for time-limited jobs and the resume test. None = run to max_steps.
    stop_after: Optional[int] = field(default=None, metadata=rule(ge=1))
    # Start a new run from these weights: a folder written by save_pretrained (config.json +
    # model.safetensors) or a run folder with final/; every key's shape must fit model. Ignored
    # when output_dir already holds a checkpoint (the run resumes). None = fresh initialisation.
    init_from: Optional[str] = None
    # model.moe.router: noise_level: train only this noise range (0 = highest noise): timesteps are
    # drawn from diffusion's distribution restricted to the range, and only the noise-level MoE
    # layers' routers and experts train (all of the model with noise_range_shared: true); the other
    # ranges' experts get zero gradients and stay as they were (needs weight_decay 0).
    noise_range: Optional[int] = field(default=None, metadata=rule(ge=0))
    noise_range_shared: bool = False
    # Also export the EMA weights to output_dir/exports/step_<N> after these optimizer steps
    # (a from_pretrained folder each): quality-vs-training-compute curves (`sparse-dit study`).
    export_steps: tuple[int, ...] = ()

    def _check(self) -> None:
        bad = [s for s in self.export_steps if not 1 <= s <= self.max_steps]
        if bad:
            raise ConfigError(f"{current_prefix() or 'train.'}export_steps={list(self.export_steps)!r}: {bad[0]} is out of range; "
                              f"allowed: steps in [1, max_steps={self.max_steps}]")
        if not all(0 <= b < 1 for b in self.betas):  # Adam's moment decays: b = 1 never forgets, b >= 1 diverges
            raise ConfigError(f"{current_prefix() or 'train.'}betas={list(self.betas)!r} is out of range; allowed: two numbers in [0, 1)")


@dataclass
class DataConfig(_Config):
    """Where training videos come from and their shape."""

    # "synthetic" = procedurally generated moving squares (built in code); "physics" = a
    # dataset written by `sparse-dit data physics`; "folder"/"hf" = real video.
    source: str = field(default="synthetic", metadata=rule(choices=("synthetic", "physics", "folder", "hf", "latents")))
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
    # Real video (folder / hf; docs/data.md "Clips from real video"): the clips' frame rate
    # (each video resampled to it by frame selection; None = native), what to do with a video
    # whose rate is below it or unknown ("skip": left out and named; "keep": used at its own
    # rate, named), strided windows (a clip every clip_stride frames; None = none) and random
    # windows per video (seeded per epoch). Neither: one window per video.
    fps: Optional[float] = field(default=None, metadata=rule(gt=0))
    low_fps: str = field(default="skip", metadata=rule(choices=("skip", "keep")))
    clip_stride: Optional[int] = field(default=None, metadata=rule(ge=1))
    random_clips: int = field(default=0, metadata=rule(ge=0))


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
    # Collective timeout of the process group: a frozen or dead rank makes the others stop with a
    # message after this long instead of DeepSpeed's silent 10-minute default (issue 17).
    timeout_s: float = field(default=300.0, metadata=rule(gt=0))


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
    # The video compression network the DiT trains and samples through: "identity" (pixel
    # space) or a VAE folder (sparse-dit train-vae's final/); docs/vae.md "The DiT in latent space".
    autoencoder: str = "identity"

    def _check(self) -> None:
        tr, moe = self.train, self.model.moe
        d = self.data
        fixed = d.token_budget is None and d.source != "latents"  # cached latents carry their own shape
        if d.token_budget is not None and self.autoencoder != "identity":
            raise ConfigError(f"data.token_budget={d.token_budget} with autoencoder={self.autoencoder!r} is not supported (bucket shapes "
                              "are not checked against the VAE's compression); train on fixed-size clips, or set data.token_budget: null")
        check_autoencoder(self.autoencoder, self.model.in_channels, d.num_frames if fixed else None,
                          d.height if fixed else None, d.width if fixed else None)
        if tr.noise_range is not None:
            if not (moe.enabled and moe.router == "noise_level"):
                raise ConfigError(f"train.noise_range={tr.noise_range} needs model.moe.router='noise_level' with experts; "
                                  f"got router={moe.router!r}, num_experts={moe.num_experts}")
            if tr.noise_range >= moe.num_noise_ranges:
                raise ConfigError(f"train.noise_range={tr.noise_range} is out of range; allowed: 0..{moe.num_noise_ranges - 1} "
                                  f"(model.moe.noise_boundaries={list(moe.noise_boundaries)!r}, 0 = highest noise)")
            if tr.weight_decay > 0:
                raise ConfigError(f"train.weight_decay={tr.weight_decay} is not allowed with train.noise_range: it would shrink the "
                                  "other ranges' experts, which share the stacked expert tensors; set train.weight_decay=0")
        if tr.compile and self.parallel.zero_stage == 3:
            raise ConfigError("train.compile=true with parallel.zero_stage=3 is not supported: ZeRO-3 gathers each block's "
                              "parameters in module hooks, untested under compiled blocks; use parallel.zero_stage 0-2 or train.compile=false")
        ctx = self.train.context
        frames = self.data.num_frames  # the DiT's (latent) frames of a clip
        vae = autoencoder_config(self.autoencoder)
        if vae is not None:
            frames = 1 + (frames - 1) // 2 ** int(vae.get("temporal_down", 0))
        if ctx.mode == "prefix" and fixed and ctx.frames >= frames:
            raise ConfigError(
                f"train.context.frames={ctx.frames} leaves no frame to generate in data.num_frames={self.data.num_frames} "
                f"({frames} latent frames); allowed: 1..{frames - 1}"
            )
