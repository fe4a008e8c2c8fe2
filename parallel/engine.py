"""The DeepSpeed engine for a recipe: distributed init, the generated ds_config, param groups.

One code path from a laptop to a cluster: a single process without a launcher gets a one-rank
gloo group (:func:`init_distributed` fills in the env that the ``deepspeed`` launcher would
set), so the same :class:`deepspeed.DeepSpeedEngine`, ZeRO optimizer and checkpoint format are
used for 1 CPU process, N CPU ranks (gloo) and N GPUs (nccl).

The DeepSpeed config is generated from recipe fields (:func:`build_ds_config`):

==========================================  ====================================================
recipe field                                ds_config
==========================================  ====================================================
train.global_batch_size / micro_batch_size  train_batch_size, train_micro_batch_size_per_gpu,
                                            gradient_accumulation_steps (= global / (micro x dp))
train.grad_clip                             gradient_clipping
parallel.zero_stage                         zero_optimization.stage (+ MoE-safe bucket options)
parallel.precision                          bf16.enabled / fp16.enabled ("auto": bf16 on GPU,
                                            fp32 on CPU); "bf16-autocast": torch_autocast
train.activation_checkpointing              activation_checkpointing (blocks are wrapped in
                                            ``torch.utils.checkpoint``, non-reentrant)
train.compile                               (none: each block is ``torch.compile``-d in place)
==========================================  ====================================================

A user JSON (``parallel.deepspeed_config``) is merged on top, key by key (nested mappings
merge, other values replace), so any DeepSpeed option can be set or overridden.

The optimizer is ``torch.optim.AdamW`` built here (DeepSpeed's own AdamW would try to JIT-build
its CPU Adam op), with two param groups: weight decay on matrices, none on vectors (biases, norm
scales, 1-D embedding params; nanoGPT's rule), each split again by DeepSpeed into expert and
non-expert groups. The learning rate follows linear warmup then cosine decay to
``lr * min_lr_ratio`` (:func:`lr_at`), a ``LambdaLR`` that the engine steps and checkpoints.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import set_z3_leaf_modules
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.cpp_extension import _get_build_directory

from sparse_dit.config import ConfigError, RecipeConfig
from sparse_dit.moe import MoEFeedForward
from sparse_dit.parallel.balance import connect_global_balance

__all__ = [
    "free_port",
    "init_distributed",
    "check_build_lock",
    "is_gpu",
    "resolve_precision",
    "batch_layout",
    "build_ds_config",
    "merge_config",
    "param_groups",
    "lr_at",
    "apply_activation_checkpointing",
    "compile_blocks",
    "build_engine",
]


def free_port() -> int:
    """A TCP port that is free right now on this host."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_gpu() -> bool:
    """Whether DeepSpeed's accelerator is a GPU (anything but its CPU accelerator)."""
    return get_accelerator().device_name() != "cpu"


# DeepSpeed builds its CPU collective op on the first start on a machine (about 27 s on 2 cores,
# PITFALLS); a kill during that build leaves torch's FileBaton lock, and every later start then
# waits on it forever with no output. No build takes this long: older locks are stale.
BUILD_LOCK_STALE_S = 600.0
_CPU_OP = "deepspeed_shm_comm"


def check_build_lock(stale_after_s: float = BUILD_LOCK_STALE_S) -> Optional[str]:
    """Report (and remove when stale) the build lock of DeepSpeed's CPU op; returns what was found.

    The lock holds no owner pid (torch's ``FileBaton``), so age is the only test: a lock older than
    ``stale_after_s`` is removed with a note; a younger one is reported (a build may be running).
    """
    try:
        lock = Path(_get_build_directory(_CPU_OP, verbose=False)) / "lock"
    except Exception:  # no cache folder: nothing can be locked
        return None
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    if age > stale_after_s:
        lock.unlink(missing_ok=True)
        return f"removed a stale DeepSpeed build lock {lock} ({age / 60:.0f} min old: a killed first start left it)"
    return f"DeepSpeed's CPU op build lock {lock} is {age:.0f} s old: waiting for another start's build; if none runs, delete it"


def init_distributed(timeout_s: Optional[float] = None) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size).

    Under a launcher (``deepspeed``, ``torchrun``) the env already holds RANK/WORLD_SIZE/
    MASTER_ADDR/MASTER_PORT. Without one this is a single process: a one-rank group on a free
    local port is created, so that the engine, ZeRO and checkpoints run exactly as with N ranks.
    The backend is DeepSpeed's choice for the accelerator (gloo on CPU, nccl on CUDA).

    Args:
        timeout_s: the process group's collective timeout (``parallel.timeout_s``): a frozen or
            dead rank makes the others fail after this long (DeepSpeed's default: 10 minutes).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = "gloo" if not is_gpu() else None
    if not is_gpu():
        note = check_build_lock()
        if note is not None:
            print(f"rank {os.environ['RANK']}: {note}", file=sys.stderr, flush=True)
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        # Groups made later (DeepSpeed's data- and expert-parallel groups, where ZeRO reduces)
        # take torch's module default (30 min), not the world group's: set that default too.
        c10d = dist.distributed_c10d
        c10d.default_pg_timeout = kwargs["timeout"]
        if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
            c10d.default_pg_nccl_timeout = kwargs["timeout"]
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **kwargs)
    if is_gpu():
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        release_shm_buffer()
    return dist.get_rank(), dist.get_world_size()


def shm_buffer_name(rank: int) -> str:
    """The POSIX shared-memory name of DeepSpeed's CPU all-reduce buffer for ``rank``.

    DeepSpeed's CPU comm op (``ops/csrc/cpu/comm/shm.cpp``) creates one 66 MiB segment per rank
    when every rank is on this machine (``LOCAL_SIZE == WORLD_SIZE``, set by its launcher), named
    from the user id, MASTER_ADDR and MASTER_PORT, and never unlinks it.
    """
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"


def release_shm_buffer() -> bool:
    """Unlink this rank's DeepSpeed CPU all-reduce segment once every rank has mapped it.

    Measured here: each launch of N CPU ranks left N x 66 MiB in ``/dev/shm`` for good (216
    segments, 14 GiB of a 24 GiB machine's RAM after a day of runs), because DeepSpeed maps its
    peers' segments at init and never calls ``shm_unlink``. The mappings stay valid after the name
    is unlinked (POSIX), so once every rank has passed init (a barrier) each rank unlinks its own
    name and the memory is returned when the last rank exits, however it exits.

    Returns:
        True if a segment was unlinked (False when DeepSpeed made none: one rank without its
        launcher, ranks on several machines, or its shm op unavailable).
    """
    if not dist.is_initialized() or os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return False
    dist.barrier()  # every rank has opened every peer's segment inside deepspeed.init_distributed
    try:
        import _posixshmem

        _posixshmem.shm_unlink("/" + shm_buffer_name(dist.get_rank()))
    except (ImportError, FileNotFoundError):
        return False
    return True


def resolve_precision(precision: str) -> str:
    """``"auto"`` -> ``"bf16"`` on GPU, ``"fp32"`` on CPU (fp32 matmuls are exact enough and
    the CPU has no loss-scaling-free fp16); explicit values pass through.

    Args:
        precision: ``parallel.precision``.
    """
    if precision == "auto":
        return "bf16" if is_gpu() else "fp32"
    return precision


def batch_layout(recipe: RecipeConfig, world_size: int) -> tuple[int, int, int]:
    """(micro batch per rank, gradient accumulation steps, global batch).

    Every rank is a data-parallel rank for the non-expert parameters (expert parallelism shards
    experts, not the batch), so ``global = micro x accumulation x world_size``.

    Raises:
        ConfigError: when the global batch does not split evenly.
    """
    tc = recipe.train
    G = tc.global_batch_size
    if G % world_size:
        raise ConfigError(f"train.global_batch_size={G} must be divisible by the number of ranks ({world_size})")
    per_rank = G // world_size
    micro = tc.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro} must divide global_batch_size / ranks = {per_rank} "
            f"(train.global_batch_size={G}, {world_size} ranks)"
        )
    return micro, per_rank // micro, G


def merge_config(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in: nested mappings merge, other values replace."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_config(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_ds_config(recipe: RecipeConfig, world_size: int) -> dict:
    """The DeepSpeed config dict for ``recipe`` on ``world_size`` ranks (see module docstring).

    Args:
        recipe: the training recipe.
        world_size: number of ranks.
    """
    micro, accum, G = batch_layout(recipe, world_size)
    precision = resolve_precision(recipe.parallel.precision)
    stage = recipe.parallel.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        # DeepSpeed asserts these for MoE param groups (stage_1_and_2._configure_moe_settings);
        # harmless without MoE. overlap_comm only pays with CUDA streams.
        zero.update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=is_gpu())
    if stage == 3:
        zero.update(overlap_comm=is_gpu(), stage3_gather_16bit_weights_on_model_save=True)
    cfg: dict[str, Any] = {
        "train_batch_size": G,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(recipe.train.grad_clip),
        "zero_optimization": zero,
        # The optimizer is torch.optim.AdamW (client optimizer), which ZeRO wraps happily.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # fp32 weights and optimizer; the engine runs the forward under torch.autocast(bf16).
        # No lower-precision-safe modules: DeepSpeed would otherwise all-reduce the gradients of
        # nn.Linear weights in bf16; ours stay fp32, so N ranks average what one rank would.
        "torch_autocast": {"enabled": precision == "bf16-autocast", "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if recipe.train.activation_checkpointing:
        cfg["activation_checkpointing"] = {
            "partition_activations": False,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
        }
    user = recipe.parallel.deepspeed_config
    if user:
        path = Path(user)
        if not path.is_file():
            raise ConfigError(f"parallel.deepspeed_config={user!r} does not exist; give a DeepSpeed JSON file")
        try:
            override = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"parallel.deepspeed_config={user!r} is not valid JSON: {exc}") from exc
        if not isinstance(override, dict):
            raise ConfigError(f"parallel.deepspeed_config={user!r} must hold a JSON object")
        cfg = merge_config(cfg, override)
        stage_after = cfg.get("zero_optimization", {}).get("stage", stage)
        if stage_after != stage:
            raise ConfigError(
                f"parallel.deepspeed_config sets zero_optimization.stage={stage_after} but parallel.zero_stage={stage}; "
                "set the stage with parallel.zero_stage so the expert-parallel checks see it"
            )
    return cfg


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW param groups: decay on matrices (ndim >= 2), none on vectors (biases, norms).

    Stacked expert biases ``[E, F]`` are 2-D but are biases: parameters whose name ends in a
    bias/norm/embedding-vector suffix never decay. Groups carry a ``name`` so that DeepSpeed can
    split expert parameters into their own groups.

    Args:
        model: the model.
        weight_decay: decay of the matrix group.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        vector_like = p.ndim < 2 or leaf in ("b1", "b2") or leaf.startswith("bias") or "norm" in name
        (no_decay if vector_like else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay}]
    groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def lr_at(step: int, max_steps: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warmup, then cosine to ``min_ratio``.

    Args:
        step: completed optimizer steps (0 before the first).
        max_steps: total steps of the schedule.
        warmup: warmup steps (the multiplier reaches 1 at ``step = warmup``).
        min_ratio: final multiplier.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each DiT block in backward (``torch.utils.checkpoint``, non-reentrant, which
    handles the blocks' tuple outputs and ZeRO-3's parameter hooks). Returns the block count."""
    blocks = getattr(model, "blocks", [])
    for block in blocks:
        if getattr(block, "_sd_checkpointed", False):
            continue
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args: Any, _inner=inner, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._sd_checkpointed = True
    return len(blocks)


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each DiT block in place (``nn.Module.compile``), after any activation
    checkpointing wrapper so the recomputation runs compiled too. Blocks of one shape share the
    compiled code (a compile per distinct block, not per layer). Returns the block count."""
    blocks = getattr(model, "blocks", [])
    for block in blocks:
        block.compile()
    return len(blocks)


def build_engine(model: nn.Module, recipe: RecipeConfig, world_size: int) -> tuple[Any, dict]:
    """Wrap ``model`` (already sharded by :func:`~sparse_dit.parallel.setup_expert_parallel`)
    in a DeepSpeed engine with AdamW and the warmup-cosine schedule.

    Under ZeRO-3 the MoE layers are made z3 leaf modules (``deepspeed.utils.set_z3_leaf_modules``):
    their parameters are gathered as one unit before the layer runs, so an expert that receives
    no token on one rank cannot leave that rank waiting in a gather the others skipped.

    Args:
        model: the model.
        recipe: the recipe.
        world_size: number of ranks.

    Returns:
        ``(engine, ds_config)``.
    """
    ds_config = build_ds_config(recipe, world_size)
    tc = recipe.train
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if tc.compile:
        compile_blocks(model)
    if recipe.parallel.zero_stage == 3 and recipe.model.moe.enabled:
        set_z3_leaf_modules(model, [MoEFeedForward])
    groups = param_groups(model, tc.weight_decay)
    if any(getattr(p, "allreduce", True) is False for g in groups for p in g["params"]):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    schedule = functools.partial(lr_at, max_steps=tc.max_steps, warmup=tc.warmup_steps, min_ratio=tc.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    connect_global_balance(engine.module)  # balance_scope=global: routing counts summed over all ranks
    return engine, ds_config
