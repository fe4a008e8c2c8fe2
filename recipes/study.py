"""``sparse-dit study SPEC.yaml --out DIR``: the dense-vs-sparse grid at matched training compute.

A study spec names a base (dense) recipe, model sizes, dense and sparse variants, seeds, physics
scenarios and a training budget. Every cell (scenario x size x variant x seed) is an ordinary
run of the library trainer (:func:`sparse_dit.recipes.train.train`) in its own folder::

    DIR/plan.json                              the resolved grid (spec, steps, FLOPs per cell)
    DIR/data/<scenario>/{train,val_id,val_ood} the simulated physics datasets (PhyWorld's split)
    DIR/cells/<scenario>/<size>/<variant>/seed<k>/
        recipe.yaml, checkpoints/, metrics.jsonl, summary.json, final/   (the trainer's run folder)
        exports/step_<N>/                      EMA weights at the curve's FLOP checkpoints
        eval.json                              the cell's evaluation (written last: the done mark)
    DIR/report.md, report.json, *.png          the study's report (:mod:`sparse_dit.evals.study_report`)

``sparse-dit train DIR/cells/.../recipe.yaml`` reruns or resumes any cell alone, on one process
or under the DeepSpeed launcher. Rerunning the study command skips finished cells (their
``eval.json`` exists) and resumes an interrupted one from its checkpoint; training resumes
exactly and evaluation is deterministic, so the result equals an uninterrupted run's.

Matched compute is computed, not eyeballed: with ``budget.match: flops`` every cell gets the same
training FLOPs (``6 x active forward MACs x batch`` per step, :func:`sparse_dit.flops.count`),
its step count follows from it, and sparse variants are built by
:func:`sparse_dit.flops.match_compute` (the same active MACs as the dense FFN), so dense and
sparse also train the same number of steps. ``match: params`` gives sparse variants the dense
model's total parameters (:func:`sparse_dit.flops.match_params`) and every cell the same steps;
``match: wall_time`` gives every cell the same seconds, converted to steps by a short probe run
of the trainer per variant. The report says which was matched.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from sparse_dit.config import ConfigError, ModelConfig, RecipeConfig
from sparse_dit.data import SCENARIOS, write_physics_dataset
from sparse_dit.evals.study_report import (against_baseline, aggregate, baseline_scores, evaluate_cell, load_eval_splits, measure_cost,
                                           pareto_front, verdicts, write_study_report)
from sparse_dit.flops import count, match_compute, match_params
from sparse_dit.presets import load_recipe
from sparse_dit.recipes.run_dir import atomic_write
from sparse_dit.recipes.train import train
from sparse_dit.schema import _Config, apply_overrides, from_dict, load_yaml, rule, to_dict
from sparse_dit.upcycle import UpcycleError, upcycle, upcycle_config

__all__ = [
    "SizeSpec", "VariantSpec", "StudyData", "StudyBudget", "StudyEval", "StudySpec", "Cell",
    "load_spec", "plan_study", "train_flops_per_step", "run_study", "add_arguments", "run", "main", "MATCH_MODES",
]

MATCH_MODES = ("flops", "params", "wall_time")
# MoE fields a variant's `moe:` may set; the rest of MoEConfig through `set:`.
_MOE_SHAPE = ("num_experts", "top_k", "shared_experts", "granularity")


@dataclass
class SizeSpec(_Config):
    """One model size: a name and recipe overrides (``{"model.hidden_size": 96, ...}``)."""

    name: str = ""
    set: dict[str, Any] = field(default_factory=dict)

    def _check(self) -> None:
        _check_name("sizes[].name", self.name)


@dataclass
class VariantSpec(_Config):
    """One model variant. ``moe: null`` is a dense model; otherwise ``moe`` holds ``num_experts``,
    ``top_k`` (and optionally ``shared_experts``, ``granularity`` and any other MoE field such as
    ``router``), and the variant is matched to the dense model of its size as ``budget.match``
    says. ``set`` holds further recipe overrides."""

    name: str = ""
    moe: Optional[dict[str, Any]] = None
    set: dict[str, Any] = field(default_factory=dict)
    # Sparse upcycling (sparse_dit.upcycle): {from: <dense variant>, at: fraction of its steps
    # (default 0.5), granularity: 1}. The cell starts from the dense cell's weights (same size
    # and seed) at that point and spends the rest of the budget as this MoE.
    upcycle: Optional[dict[str, Any]] = None

    def _check(self) -> None:
        _check_name("variants[].name", self.name)
        if self.upcycle is not None:
            if self.moe is None:
                raise ConfigError(f"variant {self.name!r}: upcycle needs moe (num_experts, top_k) to upcycle into")
            bad = sorted(set(self.upcycle) - {"from", "at", "granularity"})
            if bad or "from" not in self.upcycle:
                raise ConfigError(f"variant {self.name!r}: upcycle={self.upcycle!r}; allowed keys: from (a dense variant, required), "
                                  "at (fraction of its steps in (0, 1), default 0.5), granularity (default 1)")
            at = self.upcycle.get("at", 0.5)
            if isinstance(at, bool) or not isinstance(at, (int, float)) or not 0 < at < 1:
                raise ConfigError(f"variant {self.name!r}: upcycle.at={at!r} is out of range; allowed: a fraction in (0, 1)")
        if self.moe is not None:
            for k in ("num_experts", "top_k"):
                if k not in self.moe:
                    raise ConfigError(f"variant {self.name!r}: moe.{k} is missing; a sparse variant needs num_experts and top_k")

    @property
    def dense(self) -> bool:
        return self.moe is None


@dataclass
class StudyData(_Config):
    """The simulated physics data (PhyWorld: train and in-distribution validation from one
    split, out-of-distribution validation from the other). Clip shape: the base recipe's."""

    scenarios: tuple[str, ...] = ("uniform",)
    train_videos: int = field(default=1024, metadata=rule(ge=1))
    val_videos: int = field(default=32, metadata=rule(ge=2))
    fps: float = field(default=4.0, metadata=rule(gt=0))
    seed: int = field(default=0, metadata=rule(ge=0))

    def _check(self) -> None:
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad or not self.scenarios:
            raise ConfigError(f"data.scenarios={list(self.scenarios)!r}: {bad[0] if bad else 'empty'} is not allowed; "
                              f"allowed: {', '.join(SCENARIOS)}")


@dataclass
class StudyBudget(_Config):
    """What every cell gets. ``flops``: ``train_flops`` per cell. ``params``: ``steps`` per cell.
    ``wall_time``: ``seconds`` per cell. ``curve_points``: evaluations along training (at equal
    fractions of the budget; the last is the end)."""

    match: str = field(default="flops", metadata=rule(choices=MATCH_MODES))
    train_flops: Optional[float] = field(default=None, metadata=rule(gt=0))
    steps: Optional[int] = field(default=None, metadata=rule(ge=1))
    seconds: Optional[float] = field(default=None, metadata=rule(gt=0))
    curve_points: int = field(default=4, metadata=rule(ge=1))
    probe_steps: int = field(default=6, metadata=rule(ge=3, help="wall_time: trainer steps timed per variant"))

    def _check(self) -> None:
        need = {"flops": "train_flops", "params": "steps", "wall_time": "seconds"}[self.match]
        if getattr(self, need) is None:
            raise ConfigError(f"budget.match={self.match!r} needs budget.{need}")


@dataclass
class StudyEval(_Config):
    """Evaluation settings (:func:`sparse_dit.evals.compare.evaluate_run`)."""

    num_inference_steps: Optional[int] = field(default=None, metadata=rule(ge=1, help="default: the recipe's"))
    context_frames: Optional[int] = field(default=None, metadata=rule(ge=1, help="default: the recipe's train.context.frames"))
    batch_size: int = field(default=16, metadata=rule(ge=1))
    num_t: int = field(default=10, metadata=rule(ge=1))
    latency_repeats: int = field(default=5, metadata=rule(ge=0))


@dataclass
class StudySpec(_Config):
    """A study: see the module docstring and docs/study.md."""

    name: str = "study"
    base: str = ""
    sizes: tuple[SizeSpec, ...] = ()
    variants: tuple[VariantSpec, ...] = ()
    seeds: tuple[int, ...] = (0,)
    data: StudyData = field(default_factory=StudyData)
    budget: StudyBudget = field(default_factory=StudyBudget)
    eval: StudyEval = field(default_factory=StudyEval)

    def _check(self) -> None:
        if not self.base:
            raise ConfigError("base is missing: the path of the dense base recipe (relative to the spec file)")
        for what, items in (("sizes", self.sizes), ("variants", self.variants)):
            if not items:
                raise ConfigError(f"{what} is empty; give at least one")
            names = [i.name for i in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"{what}: name {dup[0]!r} appears twice; names must be unique")
        for i, v in enumerate(self.variants):
            if v.upcycle is not None:
                src = [u for u in self.variants[:i] if u.name == v.upcycle["from"]]
                if not src or not src[0].dense:
                    raise ConfigError(f"variant {v.name!r}: upcycle.from={v.upcycle['from']!r} must name a dense variant listed before it")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"seeds={list(self.seeds)!r}: give distinct seeds >= 0")


def _check_name(where: str, name: str) -> None:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ConfigError(f"{where}={name!r}: use letters, digits, '-', '_' and '.' (it names a folder)")


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec YAML (unknown keys and bad values are one-line errors)."""
    return from_dict(StudySpec, load_yaml(path))


# --------------------------------------------------------------------------------------------
# The plan: one recipe per cell
# --------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One run of the grid."""

    scenario: str
    size: str
    variant: str
    seed: int
    dir: Path
    recipe: RecipeConfig
    flops_per_step: float
    export_steps: tuple[int, ...]
    flops_offset: float = 0.0  # training FLOPs spent before this cell's first step (the dense part of an upcycled run)
    upcycle_from: Optional[Path] = None  # the dense export an upcycled cell starts from
    upcycle_args: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.scenario}/{self.size}/{self.variant}/seed{self.seed}"

    @property
    def recipe_file(self) -> Path:
        return self.dir / "recipe.yaml"

    @property
    def eval_file(self) -> Path:
        return self.dir / "eval.json"

    @property
    def done(self) -> bool:
        return self.eval_file.is_file()


def _sets(d: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


def train_flops_per_step(recipe: RecipeConfig) -> float:
    """Training FLOPs of one optimizer step: 3 forward passes' worth (forward + backward) x 2
    FLOPs per MAC x active MACs per sample x global batch (Kaplan et al. 2020)."""
    d = recipe.data
    return 6.0 * count(recipe.model, (recipe.model.in_channels, d.num_frames, d.height, d.width))["macs"] * recipe.train.global_batch_size


def _upcycle_args(v: VariantSpec) -> dict[str, Any]:
    """:func:`sparse_dit.upcycle.upcycle` arguments of an upcycled variant."""
    moe = dict(v.moe or {})
    E, K, S = moe.pop("num_experts"), moe.pop("top_k"), moe.pop("shared_experts", 0)
    g = int((v.upcycle or {}).get("granularity", moe.pop("granularity", 1)))
    moe.pop("granularity", None)
    return {"preset": f"E{E}A{K}" + (f"S{S}" if S else ""), "granularity": g,
            "overrides": [f"moe.{k}={json.dumps(val)}" for k, val in moe.items()]}


def _variant_model(dense: ModelConfig, v: VariantSpec, match: str) -> ModelConfig:
    if v.dense:
        return dense
    if v.upcycle is not None:
        a = _upcycle_args(v)
        try:
            return upcycle_config(dense, a["preset"], a["granularity"], a["overrides"])
        except UpcycleError as exc:
            raise ConfigError(f"variant {v.name!r}: {exc}") from None
    moe = dict(v.moe or {})
    shape = {k: moe.pop(k) for k in _MOE_SHAPE if k in moe}
    fn = match_params if match == "params" else match_compute
    try:
        return fn(dense, **shape, **moe)
    except TypeError as exc:  # an unknown MoE field
        raise ConfigError(f"variant {v.name!r}: moe: {exc}") from None


def _base_recipe(spec: StudySpec, spec_dir: Path, size: SizeSpec, v: VariantSpec, seed: int, data_dir: Path, out: Path) -> RecipeConfig:
    base = spec_dir / spec.base
    if not base.is_file():
        raise ConfigError(f"base={spec.base!r}: {base} does not exist")
    raw = apply_overrides(load_yaml(base), _sets(size.set) + _sets(v.set))
    raw = apply_overrides(raw, [f"train.seed={seed}", "data.source=physics", f"data.path={data_dir / 'train'}",
                                f"data.num_videos={spec.data.train_videos}", f"output_dir={out}"])
    recipe = load_recipe(data=raw)
    if recipe.model.moe.enabled:
        raise ConfigError(f"base={spec.base!r} with size {size.name!r} is a sparse model (model.moe.num_experts="
                          f"{recipe.model.moe.num_experts}); the base must be dense: variants add the experts")
    model = _variant_model(recipe.model, v, spec.budget.match)
    if v.set:  # the variant's own overrides win over the matcher (e.g. model.moe.expert_precision)
        model = load_recipe(data=apply_overrides({**to_dict(recipe), "model": to_dict(model)}, _sets(v.set))).model
    return dataclasses.replace(recipe, model=model)


def _steps_for(spec: StudySpec, recipe: RecipeConfig, probe_s_per_step: Optional[float]) -> int:
    b = spec.budget
    if b.match == "flops":
        return int(b.train_flops // train_flops_per_step(recipe))  # type: ignore[operator]
    if b.match == "params":
        return int(b.steps)  # type: ignore[arg-type]
    return int(b.seconds // probe_s_per_step) if probe_s_per_step else 0  # type: ignore[operator]


def _export_steps(steps: int, points: int) -> tuple[int, ...]:
    """``points`` steps at equal fractions of the run, the last one = ``steps``."""
    return tuple(sorted({max(1, round(steps * (i + 1) / points)) for i in range(points)}))


def plan_study(spec: StudySpec, spec_dir: Path, out: Path, probe: Optional[Callable[[RecipeConfig], float]] = None) -> list[Cell]:
    """Resolve the grid into cells (one recipe each), in the order they run: seeds of one size
    interleaved across variants, so a partial study holds comparable cells.

    Args:
        spec: the validated spec.
        spec_dir: folder the spec's relative paths start from.
        out: the study folder.
        probe: ``match: wall_time`` only: recipe -> measured seconds per step.

    Raises:
        ConfigError: a budget too small for ``curve_points`` steps, a bad base or variant.
    """
    cells = []
    probed: dict[tuple[str, str], float] = {}
    for scenario in spec.data.scenarios:
        data_dir = out / "data" / scenario
        for size in spec.sizes:
            for seed in spec.seeds:
                for v in spec.variants:
                    cdir = out / "cells" / scenario / size.name / v.name / f"seed{seed}"
                    recipe = _base_recipe(spec, spec_dir, size, v, seed, data_dir, cdir)
                    s_per_step = None
                    if spec.budget.match == "wall_time":
                        if (size.name, v.name) not in probed:
                            if probe is None:
                                raise ConfigError("budget.match='wall_time' needs a probe run per variant")
                            probed[(size.name, v.name)] = probe(recipe)
                        s_per_step = probed[(size.name, v.name)]
                    steps = _steps_for(spec, recipe, s_per_step)
                    if steps < spec.budget.curve_points:
                        raise ConfigError(
                            f"budget gives {size.name}/{v.name} {steps} steps, fewer than budget.curve_points="
                            f"{spec.budget.curve_points}; raise the budget (one step costs {train_flops_per_step(recipe):.3g} FLOPs)")
                    offset, source_export, up_args = 0.0, None, {}
                    if v.upcycle is not None:  # the dense part is the source cell's first s_up steps
                        src = next(c for c in cells if (c.scenario, c.size, c.seed, c.variant) == (scenario, size.name, seed, v.upcycle["from"]))
                        s_up = max(1, min(src.recipe.train.max_steps - 1, round(v.upcycle.get("at", 0.5) * src.recipe.train.max_steps)))
                        offset = s_up * src.flops_per_step
                        if spec.budget.match == "flops":
                            steps = int((spec.budget.train_flops - offset) // train_flops_per_step(recipe))  # type: ignore[operator]
                        else:
                            steps = round(steps * (1 - s_up / src.recipe.train.max_steps))
                        src.export_steps = tuple(sorted({*src.export_steps, s_up}))
                        src.recipe = dataclasses.replace(src.recipe, train=dataclasses.replace(src.recipe.train, export_steps=src.export_steps))
                        source_export = src.dir / "exports" / f"step_{s_up:08d}"
                        up_args = _upcycle_args(v)
                        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, init_from=str(cdir / "init")))
                        if steps < spec.budget.curve_points:
                            raise ConfigError(f"variant {v.name!r}: the budget left after the dense part ({s_up} steps) gives "
                                              f"{steps} steps, fewer than budget.curve_points={spec.budget.curve_points}")
                    tc = recipe.train
                    exports = _export_steps(steps, spec.budget.curve_points)
                    train_cfg = dataclasses.replace(
                        tc, max_steps=steps, warmup_steps=min(tc.warmup_steps, max(1, steps // 4)),
                        save_every=min(tc.save_every, steps), export_steps=exports)
                    recipe = dataclasses.replace(recipe, train=train_cfg)
                    cells.append(Cell(scenario, size.name, v.name, seed, cdir, recipe, train_flops_per_step(recipe), exports,
                                      offset, source_export, up_args))
    return cells


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_data(spec: StudySpec, shape: tuple[int, int, int], out: Path, log: Callable[[str], None]) -> None:
    """Simulate each scenario's datasets once (disjoint seeds: validation scenes are never trained on)."""
    T, H, W = shape
    d = spec.data
    for scenario in d.scenarios:
        root = out / "data" / scenario
        plan = {"train": ("id", d.train_videos, d.seed), "val_id": ("id", d.val_videos, d.seed + 1_000_001),
                "val_ood": ("ood", d.val_videos, d.seed + 2_000_003)}
        want = {k: [*v, T, H, W, d.fps] for k, v in plan.items()}
        marker = root / "plan.json"
        old = json.loads(marker.read_text()) if marker.is_file() else {}
        for name, (split, n, seed) in plan.items():
            if old.get(name) == want[name] and (root / name / "dataset_info.json").is_file():
                continue
            log(f"simulating {scenario}/{name}: {n} videos of {T} frames at {H}x{W}, {d.fps:g} fps")
            write_physics_dataset(root / name, scenario, split, n, T, H, W, seed=seed, fps=d.fps,
                                  workers=None if n >= 256 else 1, progress=n >= 256, overwrite=True)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, json.dumps(want))


def _cell_env(jobs: int, num_procs: int, environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment of a cell's ``sparse-dit train`` subprocess.

    Never the parent's process-group variables (each cell has its own rendezvous). Unless the user
    set ``OMP_NUM_THREADS``, each rank gets ``cores // (jobs x num_procs)`` threads (at least 1):
    two cells side by side with torch's default of one thread per core each oversubscribe the
    machine (measured on 2 cores, docs/study.md: 79 ms per xs step with 2 x 2 threads, 60 ms with
    2 x 1).
    """
    environ = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (jobs * num_procs)))
    return env


def _train_cell(cell: Cell, num_procs: int, in_process: bool, jobs: int = 1) -> None:
    """Train (or resume) one cell with the library trainer."""
    atomic_write(cell.recipe_file, yaml.safe_dump(to_dict(cell.recipe), sort_keys=False))
    summary = cell.dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("steps") == cell.recipe.train.max_steps \
            and (cell.dir / "final" / "model.safetensors").is_file():
        return  # trained; killed during its evaluation
    if cell.upcycle_from is not None and not (cell.dir / "init" / "model.safetensors").is_file():
        if not (cell.upcycle_from / "model.safetensors").is_file():
            raise RuntimeError(f"cell {cell.key}: its dense start {cell.upcycle_from} is missing (train its source cell first)")
        upcycle(cell.upcycle_from, cell.upcycle_args["preset"], cell.dir / "init", cell.upcycle_args["granularity"],
                cell.upcycle_args["overrides"], seed=cell.seed)
    if in_process and num_procs == 1:
        train(cell.recipe)
        return
    cmd = [sys.executable, "-m", "sparse_dit.cli", "train", str(cell.recipe_file), "--num-procs", str(num_procs)]
    log_file = cell.dir / "train.log"
    env = _cell_env(jobs, num_procs)
    with open(log_file, "a", encoding="utf-8") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"cell {cell.key} failed (exit {code}): {tail[0]} (log: {log_file})")


def _probe(out: Path, steps: int) -> Callable[[RecipeConfig], float]:
    """``match: wall_time``: seconds per step of a recipe, from a short run of the trainer
    (mean over its steps after the first); cached in ``out/probes.json`` so a rerun plans the same."""
    cache_file = out / "probes.json"

    def probe(recipe: RecipeConfig) -> float:
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        key = _digest(to_dict(recipe.model))
        if key not in cache:
            n = steps
            pdir = out / "probes" / key
            # fresh weights (an upcycled variant's start does not exist yet): the time per step is the same
            r = dataclasses.replace(recipe, output_dir=str(pdir), train=dataclasses.replace(
                recipe.train, max_steps=n, save_every=n, export_steps=(), warmup_steps=1, seed=0, init_from=None))
            summary = train(r)
            cache[key] = r.train.global_batch_size / summary["samples_per_s"]
            atomic_write(cache_file, json.dumps(cache, indent=2))
        return float(cache[key])

    return probe


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown CPU"


def _plan_record(spec: StudySpec, cells: list[Cell]) -> dict[str, Any]:
    return {"spec": to_dict(spec), "digest": _digest(to_dict(spec)),
            "cells": [{"key": c.key, "steps": c.recipe.train.max_steps, "flops_per_step": c.flops_per_step,
                       "train_flops": c.flops_offset + c.flops_per_step * c.recipe.train.max_steps, "export_steps": list(c.export_steps),
                       "dir": str(c.dir)} for c in cells]}


def _splits(splits_cache: dict, out: Path, scenario: str) -> Any:
    """A scenario's validation splits, loaded once per invocation."""
    if scenario not in splits_cache:
        splits_cache[scenario] = load_eval_splits(out / "data" / scenario)
    return splits_cache[scenario]


def _context(spec: StudySpec, cell: Cell) -> int:
    """Given frames at evaluation: the spec's, else the cell's training context."""
    return spec.eval.context_frames or cell.recipe.train.context.frames


def _evaluate(cell: Cell, spec: StudySpec, out: Path, splits_cache: dict, log: Callable[[str], None]) -> dict[str, Any]:
    ctx = _context(spec, cell)
    result = evaluate_cell(cell.dir, cell.recipe, cell.export_steps, cell.flops_per_step, _splits(splits_cache, out, cell.scenario),
                           context_frames=ctx, num_inference_steps=spec.eval.num_inference_steps, batch_size=spec.eval.batch_size,
                           num_t=spec.eval.num_t, seed=0, log=log, flops_offset=cell.flops_offset)
    record = {"scenario": cell.scenario, "size": cell.size, "variant": cell.variant, "seed": cell.seed,
              "dense": not cell.recipe.model.moe.enabled, "eval": result}
    atomic_write(cell.eval_file, json.dumps(record, indent=2))
    return record


def run_study(spec_path: str | Path, out: str | Path, *, jobs: int = 1, num_procs: int = 1, dry_run: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Run (or resume) a study; returns its report (also written to ``out/report.{md,json}``).

    Args:
        spec_path: the spec YAML.
        out: the study folder.
        jobs: cells trained side by side (each a ``sparse-dit train`` subprocess); 1 trains in
            this process. Evaluations run in this process, one at a time.
        num_procs: ranks per cell (the deepspeed launcher when > 1).
        dry_run: print the plan (cells, steps, FLOPs) and stop before simulating or training.
        log: progress printer.

    Raises:
        ConfigError: a bad spec, a budget that cannot work, or ``out`` holding another spec's study.
    """
    if jobs < 1 or num_procs < 1:
        raise ConfigError(f"--jobs={jobs} and --num-procs={num_procs} must be >= 1")
    t0 = time.monotonic()
    spec_path, out = Path(spec_path), Path(out)
    if not spec_path.is_file():
        raise ConfigError(f"study spec {str(spec_path)!r} does not exist")
    spec = load_spec(spec_path)
    plan_file = out / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old.get("digest") != _digest(to_dict(spec)):
            raise ConfigError(f"{out} holds a study of another spec ({old.get('spec', {}).get('name')!r}); "
                              "use a new --out, or delete it to start over")
    probe = _probe(out, spec.budget.probe_steps) if spec.budget.match == "wall_time" and not dry_run else None
    if spec.budget.match == "wall_time" and dry_run:
        log("budget.match=wall_time: steps are known only after the probe runs; the dry run assumes 1 s per step")
        probe = lambda r: 1.0  # noqa: E731
    first = _base_recipe(spec, spec_path.parent, spec.sizes[0], spec.variants[0], spec.seeds[0], out / "data" / "x", out / "x")
    shape = (first.data.num_frames, first.data.height, first.data.width)
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
        _write_data(spec, shape, out, log)
    cells = plan_study(spec, spec_path.parent, out, probe)
    shapes = {(c.recipe.data.num_frames, c.recipe.data.height, c.recipe.data.width) for c in cells}
    if len(shapes) > 1:
        raise ConfigError(f"sizes/variants change the clip shape ({sorted(shapes)}); the study's data has one shape: set data.* in base only")
    done = sum(c.done for c in cells)
    log(f"study {spec.name!r}: {len(cells)} cells ({done} done), matched {spec.budget.match}, {len(spec.seeds)} seed(s), "
        f"data {spec.data.scenarios} at {shape[0]}x{shape[1]}x{shape[2]}")
    for c in cells:
        log(f"  {c.key:<48} {c.recipe.train.max_steps:>6} steps  {c.flops_offset + c.flops_per_step * c.recipe.train.max_steps:10.3e} FLOPs"
            f"  curve at {list(c.export_steps)}{'  (done)' if c.done else ''}")
    if dry_run:
        return {"cells": _plan_record(spec, cells)["cells"]}
    atomic_write(plan_file, json.dumps(_plan_record(spec, cells), indent=2))

    records: dict[str, dict] = {c.key: json.loads(c.eval_file.read_text()) for c in cells if c.done}
    pending = [c for c in cells if not c.done]
    splits_cache: dict[str, Any] = {}
    if jobs == 1:
        for i, c in enumerate(pending):
            log(f"[{done + i + 1}/{len(cells)}] {c.key}: training {c.recipe.train.max_steps} steps ({time.monotonic() - t0:.0f}s elapsed)")
            c.dir.mkdir(parents=True, exist_ok=True)
            _train_cell(c, num_procs, in_process=True)
            log(f"[{done + i + 1}/{len(cells)}] {c.key}: evaluating")
            records[c.key] = _evaluate(c, spec, out, splits_cache, log)
    else:
        # Upcycled cells start from their dense cells' exports: a second wave after the first.
        for wave in ([c for c in pending if c.upcycle_from is None], [c for c in pending if c.upcycle_from is not None]):
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = {}
                for c in wave:
                    c.dir.mkdir(parents=True, exist_ok=True)
                    futures[pool.submit(_train_cell, c, num_procs, False, jobs)] = c
                for fut in as_completed(futures):
                    c = futures[fut]
                    fut.result()
                    log(f"{c.key}: trained; evaluating ({time.monotonic() - t0:.0f}s elapsed)")
                    records[c.key] = _evaluate(c, spec, out, splits_cache, log)

    # Inference cost: one trained model per variant, measured one after another (nothing else running).
    cost_file = out / "costs.json"
    costs = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
    for c in cells:
        gkey = f"{c.scenario}/{c.size}/{c.variant}"
        if gkey in costs or c.seed != spec.seeds[0]:
            continue
        costs[gkey] = measure_cost(c.dir / "final", shape, num_inference_steps=spec.eval.num_inference_steps or c.recipe.diffusion.num_inference_steps,
                                   context_frames=_context(spec, c),
                                   repeats=spec.eval.latency_repeats)
        atomic_write(cost_file, json.dumps(costs, indent=2))

    # Model-free references on the same validation videos (the floor, copy-last-frame, constant velocity).
    contexts = sorted({_context(spec, c) for c in cells})
    if len(contexts) > 1:
        log(f"cells are evaluated from {contexts} context frames; the references use {contexts[0]} (set eval.context_frames to align them)")
    baselines = {scenario: baseline_scores(_splits(splits_cache, out, scenario), contexts[0]) for scenario in spec.data.scenarios}

    agg = aggregate([records[c.key] for c in cells])
    pareto = {}
    for scenario, sizes in agg.items():
        pts_g, pts_l = [], []
        for size, variants in sizes.items():
            for v, g in variants.items():
                q, cost = g["metrics"]["id/velocity_error"]["mean"], costs.get(f"{scenario}/{size}/{v}", {})
                if q is None:
                    continue
                pts_g.append((f"{size}/{v}", cost.get("gmacs_per_video", math.inf), q))
                if cost.get("latency_ms") is not None:
                    pts_l.append((f"{size}/{v}", cost["latency_ms"], q))
        pareto[scenario] = {"gmacs": pareto_front(pts_g), "latency": pareto_front(pts_l)}
    matched = {"flops": "training FLOPs", "params": "total parameters (equal steps)", "wall_time": "training wall time"}[spec.budget.match]
    report = {
        "spec": to_dict(spec), "matched": matched, "aggregate": agg, "costs": costs, "pareto": pareto,
        "verdicts": verdicts(agg), "baselines": baselines, "against_baseline": against_baseline(agg, baselines),
        "cells": [records[c.key] for c in cells],
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count()},
        "wall_seconds_this_invocation": round(time.monotonic() - t0, 1),
        "description": (f"{len(cells)} cells: {len(spec.sizes)} size(s) x {len(spec.variants)} variant(s) x {len(spec.seeds)} seed(s) x "
                        f"{len(spec.data.scenarios)} scenario(s); every cell a run of sparse_dit.recipes.train; matched {matched}. "
                        f"Machine: {_cpu_model()}, {os.cpu_count()} cores."),
    }
    write_study_report(report, out)
    log(f"report: {(out / 'report.md').resolve()} ({time.monotonic() - t0:.0f}s)")
    for v in report["verdicts"]:
        if v["resolved"]:
            log(f"  {v['scenario']}/{v['size']}: {v['text']}")
    if not any(v["resolved"] for v in report["verdicts"]):
        log("  no dense-vs-sparse difference is resolved at this budget and number of seeds")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``sparse-dit study``."""
    parser.add_argument("spec", help="study spec YAML (e.g. recipes/study/tiny.yaml)")
    parser.add_argument("--out", required=True, help="study folder (rerun the same command to resume)")
    parser.add_argument("--jobs", type=int, default=1, help="cells trained side by side as subprocesses (default 1: in this process)")
    parser.add_argument("--num-procs", type=int, default=1, help="ranks per cell; > 1 runs the deepspeed launcher (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the cells, their steps and FLOPs, and stop")


def run(args: argparse.Namespace) -> int:
    """``sparse-dit study``."""
    try:
        # flushed lines: a study runs for hours and its log is usually redirected to a file
        run_study(args.spec, args.out, jobs=args.jobs, num_procs=args.num_procs, dry_run=args.dry_run,
                  log=lambda line: print(line, flush=True))
    except (ConfigError, FileNotFoundError, RuntimeError) as exc:
        print(f"sparse-dit study: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse_dit.recipes.study", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
