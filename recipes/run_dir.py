"""The files of a run folder: the recipe check on resume, ``metrics.jsonl``, atomic writes.

A run folder (``output_dir``) holds ``recipe.yaml``, ``ds_config.json``, ``metrics.jsonl``, ``summary.json``,
``checkpoints/`` and ``final/`` (docs/training.md, "Outputs"). Everything here is what the
trainer needs to write them crash-safely and to resume only under the recipe that wrote them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from sparse_dit.config import ConfigError, RecipeConfig
from sparse_dit.presets import load_recipe
from sparse_dit.schema import from_dict, to_dict

__all__ = ["RESUME_FREE", "RUN_FILES", "clear_run", "append_metrics", "truncate_metrics", "clean_tmp", "atomic_write", "flat_fields", "recipe_changes", "check_resume"]


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows a crashed run logged past the checkpoint being resumed, and a torn line (a kill
    mid-write) with a warning naming it; rewritten atomically."""
    if not path.is_file():
        return
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, TypeError, KeyError):
            print(f"warning: {path} line {i} is torn or not a metrics row (dropped): {line[:80]!r}", file=sys.stderr, flush=True)
            continue
        if step <= last_step:
            rows.append(line)
    atomic_write(path, "".join(r + "\n" for r in rows))


def clean_tmp(out_dir: Path) -> None:
    """Remove the ``.*.tmp`` files of writes a kill interrupted (ours are hidden, named after their target)."""
    for folder in [out_dir, out_dir / "checkpoints", *(out_dir / "checkpoints").glob("step_*")]:
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
            tmp.unlink(missing_ok=True)


# What the trainer writes into output_dir; `sparse-dit train --overwrite` removes exactly these
# (anything else a user put there stays).
RUN_FILES = ("checkpoints", "final", "exports", "tensorboard", "samples", "metrics.jsonl", "summary.json", "recipe.yaml",
             "recipe_changes.log", "ds_config.json")


def clear_run(out_dir: Path) -> list[str]:
    """``--overwrite``: delete the run files (:data:`RUN_FILES`) of ``out_dir`` so a run starts over;
    returns the names removed.

    Args:
        out_dir: the run's ``output_dir`` (need not exist).
    """
    removed = []
    for name in RUN_FILES:
        path = Path(out_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# Fields a resumed run may change without a flag: they extend or observe the run, they do not
# change what the next step computes (docs/training.md, "Resuming").
RESUME_FREE = ("train.max_steps", "train.stop_after", "train.save_every", "train.log_every", "train.keep_last", "train.sample_every",
               "train.export_steps", "output_dir", "data.num_workers", "parallel.timeout_s")


def flat_fields(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flat_fields(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def recipe_changes(before: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (saved value, new value) for every field that differs."""
    a, b = flat_fields(before), flat_fields(now)
    missing = object()
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)}


def _with_defaults(saved: dict, recipe_type: type = RecipeConfig) -> dict:
    """The saved recipe with the fields it lacks at today's defaults: a field added to the schema
    after the run was written is not a change (it had no other value then). A saved recipe the
    schema no longer accepts (a removed field) is compared as written. ``recipe_type``: the
    recipe's class (a DiT recipe goes through ``load_recipe``; another task's, such as the VAE's,
    is rebuilt from the saved, already expanded mapping)."""
    try:
        if recipe_type is RecipeConfig:
            return to_dict(load_recipe(data=saved))
        return to_dict(from_dict(recipe_type, saved))
    except (ConfigError, TypeError, ValueError):
        return saved


def _allowed(key: str, allow: Sequence[str]) -> bool:
    return any(a == "all" or key == a or key.startswith(a + ".") for a in allow)


def check_resume(recipe: RecipeConfig, out_dir: Path, allow_changed: Sequence[str] = ()) -> list[str]:
    """A checkpoint in ``output_dir`` resumes only under the recipe that wrote it: every changed
    field must be in :data:`RESUME_FREE` or in ``allow_changed`` (dotted fields, sections, or
    ``all``). Returns the accepted changes as ``field: old -> new`` lines."""
    saved = out_dir / "recipe.yaml"
    if not (out_dir / "checkpoints" / "latest").is_file():
        return []
    flag = "--allow-changed all"
    before: Any = None
    if not saved.is_file():
        state = "is missing"
    else:
        try:
            before = yaml.safe_load(saved.read_text(encoding="utf-8"))
            state = "is empty" if before is None else f"holds a {type(before).__name__}, not a recipe"
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            state = f"is not readable YAML ({str(exc).splitlines()[0]})"
    if not isinstance(before, dict) or not before:
        if _allowed("model", allow_changed):
            return [f"{saved} {state}: resuming under this recipe ({flag})"]
        raise ConfigError(f"{saved} {state}, so the recipe of the checkpoints in {out_dir / 'checkpoints'} is unknown; restore it, "
                          f"pass {flag} to resume them under this recipe, or start over with --overwrite")
    changes = recipe_changes(_with_defaults(before, type(recipe)), to_dict(recipe))
    refused = {k: v for k, v in changes.items() if not (k in RESUME_FREE or _allowed(k, allow_changed))}
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in refused.items()))
        model = " (a different model: use a new output_dir)" if any(k.startswith("model.") or k == "preset" for k in refused) else ""
        raise ConfigError(
            f"output_dir={str(out_dir)!r} holds checkpoints of another recipe{model}: {listed}. Resume with the recipe that wrote "
            f"it, accept the changes with --allow-changed {','.join(refused)}, or start over with --overwrite"
        )
    return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()]
