"""Checkpoints: DeepSpeed engine state + per-rank trainer state, resume, keep-last-K, export.

Layout of ``output_dir/checkpoints/``::

    step_00000050/                  one tag per save (engine.save_checkpoint)
        mp_rank_00_model_states.pt  DeepSpeed: module, lr scheduler, step counters
        *_optim_states.pt           DeepSpeed: ZeRO/optimizer shards (expert shards included)
        trainer_rank00000.pt        ours, one per rank: EMA weights (this rank's expert shard
                                    under EP), step, world_size, ep_size
    latest                          the tag of the newest *complete* checkpoint

A save writes every rank's files first, then (after a barrier) rank 0 replaces ``latest``
atomically and deletes tags beyond the last ``keep_last``. A crash mid-save therefore leaves
``latest`` on the previous complete checkpoint, and a run that stops on a NaN loss never saves.

Exact continuation: everything random in a training step (batch order, timesteps, noise,
context masks, CFG dropout) is a pure function of (seed, step, rank), so restoring the step,
the weights, the optimizer, the schedule and the EMA restores the run; a resumed run's losses
equal an uninterrupted run's (tests/test_train_runs.py).

Export: :func:`export_final` gathers the EMA expert shards of every expert-parallel rank and
writes ``final/config.json`` + ``final/model.safetensors``, loadable with
``SparseDiT.from_pretrained`` in one process whatever EP size trained it.

Layout: a checkpoint resumes only on the number of ranks and the ``parallel.ep_size`` that
wrote it (ZeRO shards the optimizer per rank, expert parallelism shards the experts per EP
rank; neither is resharded). :func:`check_layout` reads both from rank 0's trainer file before
any engine exists and refuses another layout in one line that says what to pass.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from sparse_dit.dit import SparseDiT
from sparse_dit.moe import MoEFeedForward
from sparse_dit.parallel.comm import all_reduce_
from sparse_dit.parallel.expert_parallel import gather_expert_tensor

__all__ = [
    "CheckpointError", "SafeCheckpointEngine", "safe_load", "nonfinite_state", "latest_tag", "save_checkpoint", "load_checkpoint", "full_state_dict",
    "export_final", "checkpoint_layout", "check_layout",
]

_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing files, different world or EP size)."""


# The only classes DeepSpeed's ZeRO/bf16 optimizer files hold besides tensors and plain data
# (found with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-0..2, fp32/bf16 saves).
# Each is a plain record: unpickling it sets attributes, it runs no code (issue 17).
_DS_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's files are 0600 whatever the umask


def _mkstemp(path: Path) -> tuple[int, str]:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _FILE_MODE)
    return fd, tmp


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = _mkstemp(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = _mkstemp(path)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` that never runs code: tensors, plain data and DeepSpeed's few record classes only.

    Args:
        path: a ``.pt`` file of a checkpoint.
        map_location: as for ``torch.load``.

    Raises:
        CheckpointError: the file holds anything else (a planted pickle payload, say), naming the file.
    """
    try:
        with torch.serialization.safe_globals(_DS_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        why = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data ({why or 'not a weights-only pickle'}); "
            "refusing to load it: unpickling it could run code. Use checkpoints you wrote, or start a new output_dir"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with a weights-only :meth:`load` (DeepSpeed's own
    unpickles with ``weights_only=False``: a run folder's ``.pt`` files could run code)."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location)


def _local_tensors(engine: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """This rank's weights (ZeRO-3: its partitions) and its optimizer's tensors (master weights, moments)."""
    weights = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)  # ZeRO and bf16 wrappers hold the torch optimizer
    optim: list[torch.Tensor] = []
    if base is not None:
        for group in base.param_groups:
            optim += [p for p in group["params"] if isinstance(p, torch.Tensor)]
        for st in base.state.values():
            optim += [v for v in st.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return weights, optim


def nonfinite_state(engine: Any, grad_norm: Optional[float] = None) -> Optional[str]:
    """What is not finite on any rank (weights, optimizer state, the last gradient norm), or None;
    collective: every rank must call it and gets the same answer.

    Args:
        engine: the DeepSpeed engine.
        grad_norm: the last step's global gradient norm (None: not checked).
    """
    weights, optim = _local_tensors(engine)
    bad = torch.tensor([
        float(any(not bool(torch.isfinite(t).all()) for t in weights if t.numel())),
        float(any(not bool(torch.isfinite(t).all()) for t in optim if t.numel())),
        float(grad_norm is not None and not math.isfinite(grad_norm)),
    ])
    all_reduce_(bad, op=dist.ReduceOp.MAX)  # a CPU tensor: comm.all_reduce_ also works under NCCL
    names = [name for name, b in zip(("weights", "optimizer state", f"gradient norm ({grad_norm})"), bad.tolist()) if b]
    return " and ".join(names) + " not finite" if names else None


def latest_tag(root: str | os.PathLike) -> Optional[str]:
    """The tag of the newest complete checkpoint under ``root`` (``None`` if there is none).

    Args:
        root: ``output_dir/checkpoints``.
    """
    marker = Path(root) / "latest"
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    if not (Path(root) / tag).is_dir():
        raise CheckpointError(f"{marker} names {tag!r}, but {Path(root) / tag} does not exist")
    return tag


def _rank_file(root: Path, tag: str, rank: int) -> Path:
    return root / tag / f"trainer_rank{rank:05d}.pt"


LAYOUT_FILE = "layout.json"  # per tag: {"step", "world_size", "ep_size"}, readable without unpickling anything


def checkpoint_layout(root: str | os.PathLike, tag: Optional[str] = None) -> Optional[dict]:
    """How a checkpoint was written: ``{"tag", "world_size", "ep_size"}`` (``ep_size`` None when
    unknown), or None when ``root`` holds no checkpoint.

    Read from the tag's ``layout.json``; for checkpoints written before it existed, from rank 0's
    trainer file (world size, EP size) or the count of trainer files and the run's ``recipe.yaml``.

    Args:
        root: ``output_dir/checkpoints``.
        tag: a tag; default the ``latest`` one.
    """
    root = Path(root)
    tag = tag or (latest_tag(root) if root.is_dir() else None)
    if tag is None:
        return None
    world: Any = None
    ep: Any = None
    layout = root / tag / LAYOUT_FILE
    if layout.is_file():
        try:
            saved = json.loads(layout.read_text(encoding="utf-8"))
            world, ep = saved.get("world_size"), saved.get("ep_size")
        except (ValueError, AttributeError, OSError) as exc:
            raise CheckpointError(f"{layout} is not a readable layout record ({exc})") from None
    else:
        first = _rank_file(root, tag, 0)
        if first.is_file():
            state = safe_load(first)
            if isinstance(state, dict):
                world, ep = state.get("world_size"), state.get("ep_size")
        if ep is None and (root.parent / "recipe.yaml").is_file():
            try:
                ep = (yaml.safe_load((root.parent / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("parallel", {}).get("ep_size")
            except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
                ep = None
    if not isinstance(world, int):
        world = len(list((root / tag).glob("trainer_rank*.pt"))) or None
    return {"tag": tag, "world_size": world, "ep_size": ep if isinstance(ep, int) else None}


def check_layout(root: str | os.PathLike, world_size: int, ep_size: int, tag: Optional[str] = None) -> None:
    """Refuse to resume a checkpoint on another number of ranks or another ``parallel.ep_size``.

    Args:
        root: ``output_dir/checkpoints``.
        world_size: ranks of this run.
        ep_size: this run's ``parallel.ep_size``.
        tag: the tag to check; default the ``latest`` one (nothing to check when there is none).

    Raises:
        CheckpointError: one line naming what wrote the checkpoint and what to pass instead
            (``--num-procs N``, ``--set parallel.ep_size=E``) or ``--overwrite``.
    """
    layout = checkpoint_layout(root, tag)
    if layout is None:
        return
    world, ep = layout["world_size"], layout["ep_size"]
    if world in (None, world_size) and ep in (None, ep_size):
        return
    where = Path(root) / layout["tag"]
    if world not in (None, world_size):
        what = f"checkpoint {where} was written by {world} rank{'s' if world != 1 else ''}, this run has {world_size}"
        if ep is not None:
            what += f" (parallel.ep_size={ep} then, {ep_size} now)"
    else:
        what = f"checkpoint {where} was written with parallel.ep_size={ep}, this run has parallel.ep_size={ep_size}"
    flags = []
    if world is not None:
        flags.append(f"--num-procs {world}")
    if ep is not None and (ep != ep_size or ep > 1):
        flags.append(f"--set parallel.ep_size={ep}")
    raise CheckpointError(
        f"{what}: a checkpoint resumes only on the ranks and expert-parallel size that wrote it. Resume with "
        f"{' '.join(flags)}, or pass --overwrite to delete {Path(root).parent}'s checkpoints and start over (or use a new output_dir)"
    )


def save_checkpoint(engine: Any, root: str | os.PathLike, step: int, trainer_state: dict, keep_last: int, ep_size: Optional[int] = None) -> str:
    """Save engine + trainer state as tag ``step_{step:08d}``; every rank must call it.

    Args:
        engine: the DeepSpeed engine.
        root: ``output_dir/checkpoints``.
        step: completed optimizer steps.
        trainer_state: this rank's state (EMA, ...); ``step``, ``world_size``, ``ep_size`` are added.
        keep_last: how many complete checkpoints to keep.
        ep_size: the run's ``parallel.ep_size`` (stored: a resume under another one is refused; None: unknown).

    Returns:
        The tag.
    """
    root = Path(root)
    tag = f"step_{step:08d}"
    rank, world = dist.get_rank(), dist.get_world_size()
    (root / tag).mkdir(parents=True, exist_ok=True)
    state = dict(trainer_state, step=step, world_size=world, ep_size=ep_size, rank=rank)
    _atomic_torch_save(state, _rank_file(root, tag, rank))
    if rank == 0:  # before the barrier: part of every complete checkpoint
        _atomic_text(root / tag / LAYOUT_FILE, json.dumps({"step": step, "world_size": world, "ep_size": ep_size}))
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    dist.barrier()
    if rank == 0:
        _atomic_text(root / "latest", tag)
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name))
        for old in tags[: max(0, len(tags) - keep_last)]:
            if old != tag:
                shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return tag


def load_checkpoint(engine: Any, root: str | os.PathLike, tag: str, ep_size: Optional[int] = None) -> dict:
    """Restore engine state (weights, optimizer, schedule) and return this rank's trainer state.

    Args:
        engine: the DeepSpeed engine, built exactly as for the run that saved.
        root: ``output_dir/checkpoints``.
        tag: the checkpoint tag (see :func:`latest_tag`).
        ep_size: this run's ``parallel.ep_size``; checked against the stored one when given.

    Raises:
        CheckpointError: when the checkpoint was written by a different number of ranks or EP size.
    """
    root = Path(root)
    rank, world = dist.get_rank(), dist.get_world_size()
    if ep_size is not None:
        check_layout(root, world, ep_size, tag)
    path = _rank_file(root, tag, rank)
    if not path.is_file():
        saved = len(list((root / tag).glob("trainer_rank*.pt")))
        raise CheckpointError(
            f"{path} is missing: checkpoint {root / tag} was written by {saved} rank(s), this run has {world}. "
            "Resume with the same number of ranks and parallel.ep_size, or start a new output_dir"
        )
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("world_size") != world:
        saved = state.get("world_size") if isinstance(state, dict) else None
        raise CheckpointError(f"checkpoint {root / tag} was written by {saved} ranks, this run has {world}")
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:  # every DeepSpeed load goes through it
        engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    elif not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
        raise CheckpointError(f"checkpoint engine {type(engine.checkpoint_engine).__name__} is not supported: only the torch engine loads safely")
    load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {root / tag}")
    # DeepSpeed restores the module from the rank-0 model file, so under expert parallelism
    # every other EP rank would start with rank 0's experts; ZeRO-1/2 restore each rank's fp32
    # master partitions (experts included) from its own shard but do not write them back to the
    # module. Write them back: the module then holds exactly the weights it had at save time.
    if hasattr(engine.optimizer, "update_lp_params") and engine.zero_optimization_stage() in (1, 2):
        engine.optimizer.update_lp_params()
    return state


def _expert_keys(model: nn.Module) -> list[str]:
    """State-dict keys of routed-expert tensors (sharded along dim 0 under EP)."""
    keys = []
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            prefix = f"{name}.experts." if name else "experts."
            keys += [prefix + k for k, _ in module.experts.named_parameters()]
    return keys


def full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], ep_size: int) -> dict[str, torch.Tensor]:
    """``state`` (a sharded model's state dict, e.g. EMA weights) with every expert tensor
    gathered over the expert-parallel group; collective: every rank must call it.

    Args:
        model: the (sharded) model the state belongs to.
        state: its state dict.
        ep_size: expert-parallel size.
    """
    out = dict(state)
    if ep_size > 1:
        for key in _expert_keys(model):
            out[key] = gather_expert_tensor(state[key], ep_size)
    return out


def export_final(model: nn.Module, state: dict[str, torch.Tensor], ep_size: int, out_dir: str | os.PathLike) -> Optional[Path]:
    """Write ``out_dir/config.json`` + ``model.safetensors`` from a (sharded) state; collective.

    Rank 0 checks every key and shape against a freshly built model of the same config (on the
    meta device, so no memory is spent) before writing.

    Args:
        model: the trained :class:`~sparse_dit.dit.SparseDiT` (possibly expert-sharded).
        state: weights to export (the EMA weights), this rank's shard.
        ep_size: expert-parallel size.
        out_dir: ``output_dir/final``.

    Returns:
        The folder on rank 0, ``None`` elsewhere.
    """
    full = full_state_dict(model, state, ep_size)
    if dist.get_rank() != 0:
        dist.barrier()
        return None
    with torch.device("meta"):
        ref = SparseDiT(model.config).state_dict()
    missing, unexpected = sorted(set(ref) - set(full)), sorted(set(full) - set(ref))
    if missing or unexpected:
        dist.barrier()
        raise CheckpointError(f"export: state does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in ref.items():
        if tuple(full[k].shape) != tuple(v.shape):
            dist.barrier()
            raise CheckpointError(f"export: {k} has shape {tuple(full[k].shape)}, the config needs {tuple(v.shape)}")
    sd = {k: full[k].detach().to("cpu", torch.float32 if full[k].is_floating_point() else full[k].dtype) for k in ref}
    path = SparseDiT.save_pretrained(model, out_dir, state_dict=sd)
    dist.barrier()
    return path
