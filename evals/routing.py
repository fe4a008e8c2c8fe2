"""The routing section of an evaluation report (issues 11 and 15).

:func:`sparse_dit.evals.compare.evaluate_run` samples the headline split inside a
:class:`~sparse_dit.moe.routing_stats.RoutingCollector` (hooks on every MoE router, the ordinary
sampler, no second sampling run) and stores its summary as the model's ``routing`` entry. This
module turns that entry into report.md text (:func:`routing_markdown`) and PNG heat maps
(:func:`plot_routing`), every statistic per MoE layer: a load summed over layers hides a
collapse in one layer (shared/PITFALLS.md).

Files per MoE model ``<name>``:

- ``routing_<name>_layer_x_expert.png``: share of routes per expert (a row per layer), and the
  tokens-per-expert histogram of each layer as bars;
- ``routing_<name>_expert_x_timestep.png``: one panel per layer, a row per expert and a column
  per timestep bin, the load relative to the bin's mean (1 = balanced);
- ``routing_<name>_spacetime.png``: the same by token frame and by coarse spatial region.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import torch

from sparse_dit.moe.routing_stats import RoutingCollector, relative_load

__all__ = ["RoutingCollector", "routing_models", "routing_markdown", "plot_routing"]


def routing_models(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Model name -> its ``routing`` summary, for the models that have one (MoE models)."""
    return {n: m["routing"] for n, m in report.get("models", {}).items() if m.get("routing")}


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _row_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def routing_markdown(report: Mapping[str, Any]) -> str:
    """The ``## Routing`` section of report.md ("" when no model has routing statistics).

    Args:
        report: :func:`~sparse_dit.evals.compare.compare`'s report (``models[name]["routing"]``).
    """
    models = routing_models(report)
    if not models:
        return ""
    head = report.get("headline_split", "id")
    out = ["## Routing", "",
           f"Collected with hooks on every MoE router while the sampler generated the `{head}` split (the same "
           "sampling as the metrics above). Per layer: *load* = share of routes per expert (balanced = 1/E); "
           "*max violation* = max load / mean load - 1 (0 = balanced, E - 1 = every route on one expert); "
           "*router entropy* = mean per-token entropy of the router's scores in nats (log E = uniform scores); "
           "*changed* = share of tokens whose set of experts differs from the previous sampler call's "
           "(consecutive steps, per CFG branch); *dropped* = share of routes dropped by capacity.", ""]
    for name, r in models.items():
        E = r["num_experts"]
        out += [f"### {name}", "",
                f"{r['num_layers']} MoE layers, {E} experts, {r['calls']} model calls; uniform router entropy "
                f"log {E} = {r['router_entropy_uniform']:.3f} nats.", ""]
        rows = [[lay["layer"], *[f"{v:.3f}" for v in lay["load_fraction"]], _f(lay["max_violation"]), _f(lay["router_entropy"]),
                 _f(lay["change_fraction"]), _f(lay["dropped_fraction"])] for lay in r["layers"]]
        out += _row_table(["layer", *[f"load e{e}" for e in range(E)], "max violation", "router entropy", "changed", "dropped"], rows)
        out += ["", f"Worst layer's max violation {_f(r['max_violation_worst'])}; the load summed over layers would show "
                f"{_f(r['max_violation_of_layer_sum'])} (a sum over layers can hide a collapsed layer). "
                f"Tokens that changed experts between consecutive calls, all layers: {_f(r['change_fraction'])}.", ""]
        bins = r["timestep_bins"]
        out += ["Max violation by timestep bin (t = 0 clean, 1 noise):", ""]
        out += _row_table(["layer", *[f"t {lo:.2f}-{hi:.2f}" for lo, hi in bins]],
                          [[lay["layer"], *[f"{v:.3f}" for v in vals]] for lay, vals in zip(r["layers"], r["max_violation_by_timestep_bin"])])
        F = len(r["max_violation_by_frame"][0]) if r["max_violation_by_frame"] else 0
        if F:
            out += ["", "Max violation by token frame:", ""]
            out += _row_table(["layer", *[f"frame {f}" for f in range(F)]],
                              [[lay["layer"], *[f"{v:.3f}" for v in vals]] for lay, vals in zip(r["layers"], r["max_violation_by_frame"])])
        G = r["regions"]
        out += ["", f"Max violation by spatial region ({G}x{G} cells of the token grid, row by row from the top left):", ""]
        out += _row_table(["layer", *[f"r{i // G},{i % G}" for i in range(G * G)]],
                          [[lay["layer"], *[f"{v:.3f}" for v in vals]] for lay, vals in zip(r["layers"], r["max_violation_by_region"])])
        pngs = [f"routing_{_safe(name)}_{k}.png" for k in ("layer_x_expert", "expert_x_timestep", "spacetime")]
        out += [""] + [f"![{p}]({p})" for p in pngs] + [""]
    return "\n".join(out) + "\n"


def _relative(load: np.ndarray) -> np.ndarray:
    """Load / mean load over the last axis (1 = balanced; 0 where a row has no routes)."""
    return relative_load(torch.from_numpy(load)).numpy()


def _panels(ax_row: Any, loads: np.ndarray, names: list[str], xlabels: list[str], xtitle: str, fig: Any) -> None:
    """One panel per layer: rows experts, columns bins, colour = load relative to the bin's mean."""
    im = None
    for ax, layer_load, lname in zip(ax_row, loads, names):
        rel = _relative(layer_load).T  # (E, bins)
        im = ax.imshow(rel, cmap="viridis", vmin=0, vmax=2, aspect="auto")
        ax.set_title(f"layer {lname}", fontsize=9)
        ax.set_xticks(range(len(xlabels)), xlabels, fontsize=7, rotation=45 if len(xlabels) > 3 else 0)
        ax.set_yticks(range(rel.shape[0]), [f"e{e}" for e in range(rel.shape[0])], fontsize=7)
        ax.set_xlabel(xtitle, fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=list(ax_row), label="load / mean load in the column", shrink=0.8)


def plot_routing(report: Mapping[str, Any], out: str | Path) -> list[Path]:
    """Heat-map PNGs of every MoE model's routing (see the module docstring for the files).

    Args:
        report: the report (``models[name]["routing"]``).
        out: output folder.
    """
    out = Path(out)
    paths = []
    for name, r in routing_models(report).items():
        names = [str(lay["layer"]) for lay in r["layers"]]
        L, E = r["num_layers"], r["num_experts"]
        load = np.array([lay["load"] for lay in r["layers"]], dtype=np.float64)  # (L, E)
        frac = load / np.maximum(load.sum(1, keepdims=True), 1e-12)
        # 1. layer x expert + per-layer tokens-per-expert histograms
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(4 + 0.6 * E + 5, 1.5 + 0.5 * L))
        im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=max(2.0 / E, float(frac.max())), aspect="auto")
        for i in range(L):
            for e in range(E):
                ax.text(e, i, f"{frac[i, e]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if frac[i, e] > 1.2 / E else "white")
        ax.set_xticks(range(E), [f"e{e}" for e in range(E)], fontsize=8)
        ax.set_yticks(range(L), [f"layer {n}" for n in names], fontsize=8)
        ax.set_xlabel("expert")
        ax.set_title(f"{name}: share of routes (balanced = {1 / E:.2f})", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
        width = 0.8 / L
        for i in range(L):
            bx.bar(np.arange(E) + (i - (L - 1) / 2) * width, load[i], width=width, label=f"layer {names[i]}")
        bx.axhline(load.sum(1).mean() / E, color="grey", linestyle="--", label="balanced")
        bx.set_xticks(range(E), [f"e{e}" for e in range(E)], fontsize=8)
        bx.set_xlabel("expert")
        bx.set_ylabel("tokens (routes)")
        bx.set_title("tokens per expert, each layer", fontsize=9)
        bx.legend(fontsize=7)
        paths.append(_save(fig, out / f"routing_{_safe(name)}_layer_x_expert.png"))
        # 2. expert x timestep bin, per layer
        fig, axes = plt.subplots(1, L, figsize=(2 + 2.6 * L, 2.2 + 0.35 * E), squeeze=False, layout="constrained")
        bins = [f"{lo:.2g}-{hi:.2g}" for lo, hi in r["timestep_bins"]]
        _panels(axes[0], np.array(r["load_by_timestep_bin"], dtype=np.float64), names, bins, "timestep t (0 = clean)", fig)
        fig.suptitle(f"{name}: expert load by timestep bin", fontsize=10)
        paths.append(_save(fig, out / f"routing_{_safe(name)}_expert_x_timestep.png", tight=False))
        # 3. by token frame and by spatial region
        frames = np.array(r["load_by_frame"], dtype=np.float64)
        regions = np.array(r["load_by_region"], dtype=np.float64)
        G = r["regions"]
        fig, axes = plt.subplots(2, L, figsize=(2 + 2.6 * L, 3.5 + 0.7 * E), squeeze=False, layout="constrained")
        _panels(axes[0], frames, names, [str(f) for f in range(frames.shape[1])], "token frame", fig)
        _panels(axes[1], regions, names, [f"{i // G},{i % G}" for i in range(G * G)], "region (row,col)", fig)
        fig.suptitle(f"{name}: expert load by spacetime position", fontsize=10)
        paths.append(_save(fig, out / f"routing_{_safe(name)}_spacetime.png", tight=False))
    return paths


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
