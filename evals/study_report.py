"""Evaluation and report of a dense-vs-sparse study (``sparse-dit study``, :mod:`sparse_dit.recipes.study`).

Per cell (one trained run): held-out loss and the physics score on the in-distribution and
out-of-distribution validation splits at every exported FLOP checkpoint, through
:func:`sparse_dit.evals.compare.evaluate_run` (the evaluation ``sparse-dit eval compare`` runs).
Per variant: inference latency and memory of one trained model, measured one after another
when training is over (never while cells train side by side). Across seeds: the mean and a 95 %
Student-t interval per metric; a difference between two variants is called resolved only where
their intervals do not overlap (a conservative rule: non-overlap of two 95 % intervals implies a
difference at well below the 5 % level).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from sparse_dit.dit import SparseDiT
from sparse_dit.evals.compare import EvalSplit, Run, evaluate_run, load_split
from sparse_dit.evals.cost import generation_macs, measure_generation
from sparse_dit.evals.physics import BASELINES, score
from sparse_dit.evals.report import write_json
from sparse_dit.evals.routing import plot_routing, routing_markdown
from sparse_dit.evals.stats import LEVEL, t_interval

__all__ = [
    "STUDY_METRICS", "mean_interval", "evaluate_cell", "measure_cost", "aggregate", "pareto_front", "verdicts",
    "markdown", "plot_study", "write_study_report", "load_eval_splits", "STUDY_BASELINES", "baseline_scores", "against_baseline",
]

# (split, key, lower is better): the per-cell scalars the study aggregates.
STUDY_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("id", "val_loss", True),
    ("id", "velocity_error", True), ("id", "position_error", True), ("id", "detection_rate", False),
    ("ood", "velocity_error", True), ("ood", "position_error", True), ("ood", "detection_rate", False),
)
_EVAL_METRICS = ("heldout_loss", "physics")


def mean_interval(values: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean and the two-sided Student-t interval (:func:`sparse_dit.evals.stats.t_interval`) over
    independent values (seeds); undefined values (None, NaN: e.g. no ball detected) are left out.

    With one value the interval is unknown (``lo``/``hi`` None): one seed resolves nothing.
    """
    x = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not x:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "std": None}
    mean, lo, hi = t_interval(x, level)
    if len(x) == 1:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "std": None}
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(x), "std": float(np.std(x, ddof=1))}


def _split_metrics(m: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for split, key, _ in STUDY_METRICS:
        src = m if key == "val_loss" else m.get("splits", {}).get(split, {})
        if key in src and src[key] is not None:
            out.setdefault(split, {})[key] = float(src[key])
    return out


def evaluate_cell(cell_dir: Path, recipe: Any, export_steps: Sequence[int], flops_per_step: float,
                  splits: Sequence[EvalSplit], *, context_frames: int, num_inference_steps: Optional[int], batch_size: int,
                  num_t: int, seed: int = 0, log: Callable[[str], None] = print, flops_offset: float = 0.0) -> dict[str, Any]:
    """Evaluate one trained cell at every exported checkpoint (the last = the end of training).

    ``flops_offset``: training FLOPs spent before the cell's first step (an upcycled cell's dense part).

    Returns ``{"curve": [{"step", "train_flops", "id": {...}, "ood": {...}}, ...], "final": {...}}``.
    """
    summary_file = cell_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    curve: list[dict[str, Any]] = []
    routing = None
    for step in export_steps:
        folder = cell_dir / "exports" / f"step_{step:08d}"
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder} is missing: the cell's export at step {step} was not written")
        run = Run(f"{cell_dir.name}@{step}", folder, SparseDiT.from_pretrained(folder).eval(), recipe, {"steps": step})
        m, _ = evaluate_run(run, splits, context_frames=context_frames, num_inference_steps=num_inference_steps, seed=seed,
                            batch_size=batch_size, num_t=num_t, latency_repeats=0, metrics=_EVAL_METRICS, log=lambda s: None)
        curve.append({"step": int(step), "train_flops": float(flops_offset + step * flops_per_step), **_split_metrics(m)})
        routing = m.get("routing")
        log(f"    step {step}: " + ", ".join(f"{s}/{k} {v:.4g}" for s, d in _split_metrics(m).items() for k, v in d.items()))
    return {"curve": curve, "final": curve[-1], "train_seconds": summary.get("train_seconds"), "steps": summary.get("steps"),
            "routing": routing}  # the last export's routing while sampling (MoE only; evals/routing.py)


# The model-free references of the report's physics columns (evals/physics.py BASELINES): the
# detector's floor on the true future, and two predictors that know no physics beyond the context.
STUDY_BASELINES: tuple[tuple[str, str], ...] = (
    ("ground_truth", "ground truth (the detector's floor)"),
    ("copy_last_frame", "copy-last-frame"),
    ("constant_velocity", "constant velocity (from the context)"),
)
_PHYSICS_KEYS = ("velocity_error", "position_error", "detection_rate")


def baseline_scores(splits: Sequence[EvalSplit], context_frames: int) -> dict[str, dict[str, dict[str, Optional[float]]]]:
    """``{split: {baseline: {velocity_error, position_error, detection_rate}}}`` of
    :data:`STUDY_BASELINES` on the study's validation videos (deterministic: no seeds); splits
    without physics states are left out."""
    out: dict[str, dict[str, dict[str, Optional[float]]]] = {}
    for split in splits:
        if split.states is None:
            continue
        out[split.name] = {}
        for name, _ in STUDY_BASELINES:  # only these three (BASELINES also holds the ball-free ones)
            sc = score(BASELINES[name](split.videos, split.states, context_frames), split.states, context_frames)
            out[split.name][name] = {k: (None if not math.isfinite(sc[k]) else float(sc[k])) for k in _PHYSICS_KEYS}
    return out


def against_baseline(agg: Mapping[str, Any], baselines: Mapping[str, Any], split: str = "id", key: str = "velocity_error",
                     baseline: str = "copy_last_frame") -> list[dict[str, Any]]:
    """Every variant's ``split/key`` interval against a model-free baseline's value on the same
    videos: ``"beats"`` where the whole interval is below it, ``"worse"`` where it is above,
    else ``"not resolved"`` (also with one seed)."""
    out = []
    for scenario, sizes in agg.items():
        ref = baselines.get(scenario, {}).get(split, {}).get(baseline, {}).get(key)
        if ref is None:
            continue
        for size, variants in sizes.items():
            for v, g in variants.items():
                m = g["metrics"][f"{split}/{key}"]
                if m["lo"] is None:
                    verdict = "not resolved"
                else:
                    verdict = "beats" if m["hi"] < ref else ("worse" if m["lo"] > ref else "not resolved")
                out.append({"scenario": scenario, "size": size, "variant": v, "metric": f"{split}/{key}", "baseline": baseline,
                            "baseline_value": ref, "verdict": verdict,
                            "text": f"{size}/{v}: {_fmt_ci(m)} vs {baseline.replace('_', '-')} {ref:.3f}: {verdict}"})
    return out


def measure_cost(model_dir: Path, shape: tuple[int, int, int], *, num_inference_steps: int, context_frames: int,
                 repeats: int) -> dict[str, Any]:
    """Inference cost of one trained model: params, MACs per video, measured latency and memory."""
    model = SparseDiT.from_pretrained(model_dir).eval()
    cfg = model.config
    gen = generation_macs(cfg, (cfg.in_channels, *shape), num_inference_steps, "euler")
    out = {"total_params": gen["total_params"], "active_params": gen["active_params"], "gmacs_per_video": gen["gmacs_per_video"]}
    if repeats:
        lat = measure_generation(model, shape, batch_size=1, num_inference_steps=num_inference_steps, sampler="euler",
                                 context_frames=context_frames, repeats=repeats)
        out.update(latency_ms=lat["latency_ms"], peak_memory_bytes=lat["peak_memory_bytes"], peak_memory_kind=lat["peak_memory_kind"])
    return out


def aggregate(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Group cell results by (scenario, size, variant): mean and 95 % interval over seeds of every
    study metric at the end of training and at every curve point.

    Args:
        cells: ``{"scenario", "size", "variant", "seed", "dense", "eval": evaluate_cell(...)}`` each.
    """
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["scenario"], c["size"], c["variant"]), []).append(c)
    out: dict[str, Any] = {}
    for (scenario, size, variant), members in groups.items():
        metrics = {}
        for split, key, lower in STUDY_METRICS:
            vals = [m["eval"]["final"].get(split, {}).get(key) for m in members]
            metrics[f"{split}/{key}"] = {**mean_interval([v for v in vals if v is not None]), "lower_is_better": lower}
        n_points = min(len(m["eval"]["curve"]) for m in members)
        curve = []
        for i in range(n_points):
            pts = [m["eval"]["curve"][i] for m in members]
            curve.append({"train_flops": float(np.mean([p["train_flops"] for p in pts])),
                          **{f"{s}/{k}": mean_interval([p.get(s, {}).get(k) for p in pts if p.get(s, {}).get(k) is not None])
                             for s, k, _ in STUDY_METRICS}})
        out.setdefault(scenario, {}).setdefault(size, {})[variant] = {
            "dense": bool(members[0]["dense"]), "seeds": sorted(int(m["seed"]) for m in members), "metrics": metrics, "curve": curve,
            "train_flops": float(np.mean([m["eval"]["final"]["train_flops"] for m in members])),
            "steps": int(members[0]["eval"]["final"]["step"]),
        }
    return out


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes (lower is better on both)."""
    front = []
    for name, x, y in points:
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for n2, x2, y2 in points if n2 != name):
            front.append(name)
    return front


def _fmt_ci(m: Mapping[str, Any], digits: int = 3) -> str:
    if m.get("mean") is None:
        return "-"
    if m.get("lo") is None:
        return f"{m['mean']:.{digits}f} (1 seed)"
    return f"{m['mean']:.{digits}f} [{m['lo']:.{digits}f}, {m['hi']:.{digits}f}]"


def verdicts(agg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every sparse variant against every dense variant of the same scenario and size, per metric:
    resolved only where the two 95 % intervals do not overlap."""
    out = []
    for scenario, sizes in agg.items():
        for size, variants in sizes.items():
            dense = [v for v, g in variants.items() if g["dense"]]
            for sv, sg in variants.items():
                if sg["dense"]:
                    continue
                for dv in dense:
                    dg = variants[dv]
                    for split, key, lower in STUDY_METRICS:
                        a, b = sg["metrics"][f"{split}/{key}"], dg["metrics"][f"{split}/{key}"]
                        if a["lo"] is None or b["lo"] is None:
                            resolved, winner = False, None
                        else:
                            resolved = a["lo"] > b["hi"] or b["lo"] > a["hi"]
                            better_sparse = (a["mean"] < b["mean"]) == lower
                            winner = (sv if better_sparse else dv) if resolved else None
                        if winner is not None:
                            loser = dv if winner == sv else sv
                            text = f"{winner} beats {loser} on {split} {key} ({_fmt_ci(a if winner == sv else b)} vs {_fmt_ci(b if winner == sv else a)})"
                        elif a["lo"] is None or b["lo"] is None:
                            text = f"{sv} vs {dv} on {split} {key}: not resolved (one seed has no interval)"
                        else:
                            text = f"{sv} vs {dv} on {split} {key}: not resolved (intervals overlap: {_fmt_ci(a)} vs {_fmt_ci(b)})"
                        out.append({"scenario": scenario, "size": size, "sparse": sv, "dense": dv, "metric": f"{split}/{key}",
                                    "resolved": resolved, "winner": winner, "text": text})
    return out


def markdown(report: Mapping[str, Any]) -> str:
    """report.md of a study."""
    spec, agg = report["spec"], report["aggregate"]
    lines = [f"# Study `{spec['name']}`: dense vs sparse at matched {report['matched']}", ""]
    lines += [report.get("description", ""), ""]
    lines += ["Mean over seeds with a 95 % Student-t interval in brackets. Lower is better except detection. "
              "A difference is called resolved only where the two intervals do not overlap.", ""]
    for scenario, sizes in agg.items():
        for size, variants in sizes.items():
            lines += [f"## {scenario}, size {size}", ""]
            head = ["variant", "seeds", "steps", "train FLOPs", *[f"{s} {k}" for s, k, _ in STUDY_METRICS],
                    "active params (M)", "GMACs/video", "latency (ms)", "peak memory (MiB)"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for v, g in variants.items():
                cost = report["costs"].get(f"{scenario}/{size}/{v}", {})
                row = [v, str(len(g["seeds"])), str(g["steps"]), f"{g['train_flops']:.3e}",
                       *[_fmt_ci(g["metrics"][f"{s}/{k}"]) for s, k, _ in STUDY_METRICS],
                       f"{cost.get('active_params', float('nan')) / 1e6:.3f}", f"{cost.get('gmacs_per_video', float('nan')):.4g}",
                       f"{cost['latency_ms']:.0f}" if cost.get("latency_ms") is not None else "-",
                       f"{cost['peak_memory_bytes'] / 2**20:.0f}" if cost.get("peak_memory_bytes") else "-"]
                lines.append("| " + " | ".join(row) + " |")
            base = report.get("baselines", {}).get(scenario, {})
            for name, label in STUDY_BASELINES:
                vals = [base.get(s, {}).get(name, {}).get(k) if k in _PHYSICS_KEYS else None for s, k, _ in STUDY_METRICS]
                if all(x is None for x in vals):
                    continue
                row = [f"*{label}*", "-", "-", "-", *[f"{x:.3f}" if x is not None else "-" for x in vals], "-", "-", "-", "-"]
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    resolved = [v for v in report["verdicts"] if v["resolved"]]
    lines += ["## What the numbers support", ""]
    if not report["verdicts"]:
        lines.append("No sparse variant had a dense variant of the same size to compare with.")
    elif not resolved:
        lines.append(f"No difference between a sparse and a dense variant is resolved ({len(report['verdicts'])} comparisons): "
                     "at this budget and number of seeds the study cannot say that either wins.")
    else:
        lines += [f"- {v['scenario']}/{v['size']}: {v['text']}" for v in resolved]
        lines.append(f"\n{len(report['verdicts']) - len(resolved)} other comparisons are not resolved. Two non-overlapping "
                     "95 % intervals are a stricter test than a 5 % one, but with this many comparisons an isolated "
                     "resolved difference, on a metric where the others are not, can still be chance.")
    vs_base = report.get("against_baseline", [])
    if vs_base:
        counts = {k: sum(b["verdict"] == k for b in vs_base) for k in ("beats", "worse", "not resolved")}
        lines += ["", f"Against copy-last-frame on in-distribution velocity error (a model that learnt the motion beats it): "
                  f"{counts['beats']} variant(s) beat it, {counts['worse']} are worse, {counts['not resolved']} not resolved.", ""]
        lines += [f"- {b['scenario']}/{b['text']}" for b in vs_base]
    lines += ["", "## Pareto front (in-distribution velocity error against inference cost)", ""]
    for scenario, front in report["pareto"].items():
        lines.append(f"- {scenario}: by GMACs per video: {', '.join(front['gmacs']) or '-'}; "
                     f"by latency: {', '.join(front['latency']) or '-'}")
    routing = _routing_report(report)
    if routing["models"]:
        lines += [""]
        lines.append(routing_markdown(routing).replace(
            "## Routing\n", "## Routing\n\nEach sparse variant's first seed, its final model.\n", 1))
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in report.get("plots", [])), ""]
    return "\n".join(lines)


def _routing_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The routing summaries of the first seed of every sparse variant, as evals/routing.py reads them."""
    models: dict[str, Any] = {}
    for c in report.get("cells", []):
        r = c["eval"].get("routing")
        name = f"{c['scenario']}/{c['size']}/{c['variant']}"
        if r and name not in models:
            models[name] = {"routing": r}
    return {"models": models, "headline_split": "id"}


def _baseline_lines(ax: Any, report: Mapping[str, Any], key: str) -> None:
    """Dashed horizontal lines at the model-free references of a physics metric (``split/key``)."""
    split, _, metric = key.partition("/")
    if metric not in _PHYSICS_KEYS:
        return
    for scenario, base in report.get("baselines", {}).items():
        for (name, label), style in zip(STUDY_BASELINES, (":", "--", "-.")):
            val = base.get(split, {}).get(name, {}).get(metric)
            if val is not None:
                ax.axhline(val, color="0.35", linestyle=style, linewidth=1, label=f"{scenario}: {label}")


def _baseline_legend(axes: Any) -> None:
    for ax in axes:
        hl = [(h, lab) for h, lab in zip(*ax.get_legend_handles_labels()) if any(name in lab for _, name in STUDY_BASELINES)]
        if hl:
            ax.legend(*zip(*hl), fontsize=7)


def plot_study(report: Mapping[str, Any], out: Path) -> list[Path]:
    """quality_vs_train_flops.png (curves with interval bars) and quality_vs_inference_cost.png."""
    paths = []
    agg = report["aggregate"]
    keys = [("id/val_loss", "held-out loss (id)"), ("id/velocity_error", "velocity error, id (px/frame)"),
            ("ood/velocity_error", "velocity error, ood (px/frame)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for ax, (key, label) in zip(axes, keys):
        for scenario, sizes in agg.items():
            for size, variants in sizes.items():
                for v, g in variants.items():
                    # points where no seed had a value (no ball detected) are left out, not the series
                    pts = [p for p in g["curve"] if p[key]["mean"] is not None]
                    if not pts:
                        continue
                    xs = [p["train_flops"] / 1e15 for p in pts]
                    ys = [p[key]["mean"] for p in pts]
                    err = [[(p[key]["mean"] - p[key]["lo"]) if p[key]["lo"] is not None else 0 for p in pts],
                           [(p[key]["hi"] - p[key]["mean"]) if p[key]["hi"] is not None else 0 for p in pts]]
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"{scenario}/{size}/{v}")
        _baseline_lines(ax, report, key)
        ax.set_xlabel("training compute (PFLOPs = 1e15 FLOPs)")
        ax.set_ylabel(label)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    _baseline_legend(axes[1:])
    fig.suptitle("Quality against training compute (mean, 95 % interval over seeds)")
    fig.tight_layout()
    paths.append(out / "quality_vs_train_flops.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (cost_key, label) in zip(axes, [("gmacs_per_video", "inference GMACs per video"), ("latency_ms", "latency per video (ms)")]):
        for scenario, sizes in agg.items():
            for size, variants in sizes.items():
                for v, g in variants.items():
                    c = report["costs"].get(f"{scenario}/{size}/{v}", {}).get(cost_key)
                    m = g["metrics"]["id/velocity_error"]
                    if c is None or m["mean"] is None:
                        continue
                    yerr = [[m["mean"] - m["lo"]], [m["hi"] - m["mean"]]] if m["lo"] is not None else None
                    ax.errorbar([c], [m["mean"]], yerr=yerr, marker="o", capsize=3, label=f"{scenario}/{size}/{v}")
        _baseline_lines(ax, report, "id/velocity_error")
        ax.set_xlabel(label)
        ax.set_ylabel("velocity error, id (px/frame)")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.suptitle("Quality against inference cost")
    fig.tight_layout()
    paths.append(out / "quality_vs_inference_cost.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_study_report(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write ``out/report.json``, the plots and ``out/report.md``; returns the report."""
    report["plots"] = [p.name for p in plot_study(report, out)] + [p.name for p in plot_routing(_routing_report(report), out)]
    write_json(report, out / "report.json")
    tmp = out / ".report.md.tmp"
    tmp.write_text(markdown(report))
    tmp.replace(out / "report.md")
    return report


def load_eval_splits(data_root: Path, limit: Optional[int] = None) -> list[EvalSplit]:
    """The study's validation splits of one scenario: ``id`` then ``ood``."""
    return [load_split("id", data_root / "val_id", limit), load_split("ood", data_root / "val_ood", limit)]


