"""Write a comparison report: report.json, report.md, PNG plots, sample GIFs, TensorBoard scalars.

Input is :func:`sparse_dit.evals.compare.compare`'s ``(report, videos)``. Files under ``out``:

- ``report.json``: every number (NaN/inf written as null, so any JSON reader loads it);
- ``report.md``: the tables (models, calibration baselines, per split, cost by size);
- ``quality_vs_train_flops.png``, ``quality_vs_inference.png`` (and ``quality_vs_steps.png``
  with a steps sweep): velocity error and held-out loss with 95 % error bars against training
  PFLOPs, inference GMACs per video and measured latency (cost axes from 0; "matched within
  x %" where the models' costs are), the baselines as horizontal lines (:mod:`.plots`);
- ``samples_<split>.gif``: for a few validation videos, labelled columns ground truth |
  baselines | each model, the context frames marked with a red border and named in a footer;
  ``samples_<split>.png``: the same as a labelled contact sheet (frames left to right);
- every scalar with its 95 % interval over videos, a "Which differences are resolved" section
  (paired differences whose interval excludes 0), Frechet-distance checks (too few samples,
  the ground-truth floor) and, where a recipe ran with several seeds, intervals over seeds
  (:mod:`.stats_report`);
- ``routing_<model>_*.png`` and report.md's "Routing" section: every MoE model's per-layer expert
  load, imbalance and router entropy while it sampled the headline split (:mod:`.routing`);
- ``tb/<name>/``: TensorBoard scalars per model and baseline (``eval/<metric>``), so the
  runs overlay in one chart.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from sparse_dit.evals.plots import plot_quality, write_sample_gifs, write_sample_sheets
from sparse_dit.evals.routing import plot_routing, routing_markdown

__all__ = ["write_report", "write_json", "markdown", "plot_quality", "write_sample_gifs", "write_sample_sheets",
           "write_tensorboard", "REQUIRED_MODEL_KEYS"]

# Keys every model entry of report.json carries (issue 6's contract for the quickstart).
REQUIRED_MODEL_KEYS = ("total_params", "active_params", "gmacs_per_sample", "train_flops", "val_loss",
                       "velocity_error", "position_error", "detection_rate", "latency_ms")


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    return x


def write_json(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``report`` as strict JSON (NaN/inf -> null).

    Args:
        report: the report dict.
        path: output file.
    """
    path = Path(path)
    path.write_text(json.dumps(_clean(report), indent=2, allow_nan=False))
    return path


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _ci(entry: Mapping[str, Any], key: str, digits: int = 3) -> str:
    """``value [low, high]`` from ``entry[key]`` and ``entry["ci95"][key]`` ("-" for a missing value)."""
    v = entry.get(key)
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"  # e.g. PSNR of frames identical to the ground truth
    if not _finite(v):
        return "-"
    ci = (entry.get("ci95") or {}).get(key)
    if ci and _finite(ci[0]) and _finite(ci[1]):
        return f"{_fmt(float(v), digits)} [{_fmt(float(ci[0]), digits)}, {_fmt(float(ci[1]), digits)}]"
    return _fmt(float(v), digits)


def _fd_cell(entry: Mapping[str, Any]) -> str:
    """The trajectory FD cell: "unreliable: ..." when too few samples, "+" when a constant feature dominates."""
    check = entry.get("trajectory_fd_check") or {}
    if check and not check.get("reliable", True):
        return f"unreliable: {check['samples']} samples <= feature dim {check['feature_dim']}"
    cell = _ci(entry, "trajectory_fd", 1)
    return cell + " +" if cell != "-" and "constant in the ground truth" in check.get("note", "") else cell


def _matched_lines(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """A line per cost the models share within 1 % (so a reader sees them as matched)."""
    out = []
    for key, label in (("gmacs_per_sample", "GMACs per sample"), ("train_flops", "training FLOPs")):
        xs = [float(m[key]) for m in models.values() if _finite(m.get(key))]
        if len(xs) > 1 and max(xs) > 0 and (max(xs) - min(xs)) / max(xs) < 0.01:
            out.append(f"{label} matched within {100 * (max(xs) - min(xs)) / max(xs):.2g} % across the models.")
    return ["", " ".join(out)] if out else []


def _differences_section(report: Mapping[str, Any]) -> list[str]:
    """One sentence per (split, metric): which model differences the paired intervals resolve."""
    diffs = report.get("differences") or []
    if not diffs:
        return []
    out = ["", "## Which differences are resolved", "",
           "Each difference is b - a on the same videos, with its 95 % interval from resampling those videos "
           "(paired); resolved = the interval excludes 0, otherwise the data cannot tell the two apart at this "
           "number of videos.", ""]
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for d in diffs:
        groups.setdefault((d["split"], d["metric"]), []).append(d)
    for (_, _), ds in groups.items():
        resolved = [d for d in ds if d.get("resolved")]
        lead = "resolved" if resolved else "not resolved"
        out.append(f"- **{lead}**: " + " ".join(d["sentence"] for d in ds))
    return out


def _variants_section(report: Mapping[str, Any]) -> list[str]:
    """Variants run with several seeds: mean, interval over seeds, interval over videos; their differences."""
    v = report.get("variants") or {}
    groups = v.get("groups") or {}
    if not groups:
        return []
    out = ["", "## Over training seeds", "",
           "Runs of one recipe that differ only in their seed: the mean over seeds with a t-interval over seeds "
           "(training randomness) and a bootstrap interval over videos (which videos were drawn).", ""]
    rows = []
    for name, g in groups.items():
        for split, res in g["splits"].items():
            for key, r in res.items():
                rows.append([name, split, key, f"{len(g['runs'])} ({', '.join(map(str, g['seeds']))})", r["mean"],
                             _pair(r["ci95_seeds"]), _pair(r["ci95_videos"]), " ".join(_fmt(x) for x in r["per_seed"])])
    out.append(_table(["variant", "split", "metric", "seeds", "mean", "95% over seeds", "95% over videos", "per seed"], rows))
    if v.get("differences"):
        out += [""] + [f"- {d['sentence']}" for d in v["differences"]]
    return out


def _pair(ci: Any) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci and _finite(ci[0]) and _finite(ci[1]) else "-"


def _steps_section(report: Mapping[str, Any]) -> list[str]:
    """Quality against sampler steps (``compare(..., steps_sweep=...)``), with intervals."""
    rows = []
    for n, m in report["models"].items():
        for p in m.get("steps_sweep") or []:
            rows.append([n, p["steps"], _ci(p, "velocity_error"), _ci(p, "position_error"), _ci(p, "detection_rate"),
                         _ci(p, "psnr", 2), _ci(p, "ssim")])
    if not rows:
        return []
    return ["", f"## Quality vs sampling steps ({report.get('headline_split', 'id')} split)", "",
            _table(["model", "steps", "velocity err", "position err", "detection", "PSNR", "SSIM"], rows),
            "", "Plotted in `quality_vs_steps.png`."]


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def markdown(report: Mapping[str, Any], title: str = "Dense vs sparse: evaluation report") -> str:
    """The report's tables as Markdown.

    Args:
        report: :func:`~sparse_dit.evals.compare.compare`'s report.
        title: the page heading.
    """
    models, head = report["models"], report.get("headline_split", "id")
    out = [f"# {title}", ""]
    intro = report.get("description")
    if intro:
        out += [intro, ""]
    out += [f"Headline split: `{head}` ({report['splits'][head]['num_videos']} videos of T,H,W = "
            f"{report['splits'][head]['shape']}); context frames: {report['settings'].get('context_frames', 3)}.", ""]
    for w in report.get("data_warnings") or []:  # eval data unlike a run's training data (evals/splits.py)
        out += [f"**Warning:** {w}.", ""]
    iv = report.get("intervals") or {}
    out += ["## Models", ""]
    if iv:
        out += [f"Every quality number is followed by its 95 % interval over the split's videos, [low, high] "
                f"({iv.get('videos', '')}; fewer than {iv.get('min_videos', 10)} videos: none). Which differences the "
                "intervals resolve is said below the tables.", ""]
    out.append(_table(
        ["model", "params", "active params", "GMACs/sample", "train PFLOPs", "val loss", "velocity err (px/frame)",
         "position err (px)", "detection", "PSNR", "SSIM", "traj. FD", "GMACs/video", "latency (ms)"],
        [[n, m["total_params"], m["active_params"], m["gmacs_per_sample"],
          (m["train_flops"] / 1e15) if m.get("train_flops") is not None else None, _ci(m, "val_loss", 4),
          _ci(m, "velocity_error"), _ci(m, "position_error"), _ci(m, "detection_rate"), _ci(m, "psnr", 2),
          _ci(m, "ssim"), _fd_cell(m), m.get("gmacs_per_video"), m.get("latency_ms")] for n, m in models.items()]))
    out += _matched_lines(models)
    skipped = sorted({f"{k}: {v}" for m in models.values() for k, v in (m.get("skipped_metrics") or {}).items()})
    if skipped:  # e.g. physics metrics on a video dataset without simulator states (evals/splits.py)
        out += ["", "Skipped metrics (\"-\" above): " + "; ".join(skipped) + "."]
    out += ["", "## Calibration baselines", "",
            "Ground truth measures the instrument (~0 error, detection 1); copy-last-frame's velocity error is "
            "the ground-truth speed; constant velocity extrapolates the context (exact for uniform motion). "
            "PSNR, SSIM and the trajectory FD of the baselines give the models' numbers a scale. uniform_noise, "
            "gaussian_noise and blank hold no ball: detection ~0 and no error (\"-\"), so they never look better than "
            "copy-last-frame. Splits without simulator states score the baselines by PSNR/SSIM only.", ""]
    rows = []
    for split, base in report["baselines_by_split"].items():
        for name, s in base.items():
            rows.append([split, name, _ci(s, "velocity_error"), _ci(s, "position_error"), _ci(s, "detection_rate"),
                         s.get("gt_speed"), _ci(s, "psnr", 2), _ci(s, "ssim"), _fd_cell(s)])
    out.append(_table(["split", "baseline", "velocity err", "position err", "detection", "GT speed", "PSNR", "SSIM",
                       "traj. FD"], rows))
    floors = report.get("frechet_floor") or {}
    if floors:
        out += ["", "Trajectory Frechet distance floor: two halves of the real videos against each other "
                "(even- vs odd-numbered; z-scored as the models are), what real videos already score at that size: "
                + "; ".join(f"`{k}` {_fmt(v.get('trajectory_fd'))} ({v['videos'][0]} vs {v['videos'][1]} videos)"
                            for k, v in floors.items()) + ". A model's FD near or under its split's floor is "
                "indistinguishable from real videos by this estimator."]
    out += ["", "## Per split", ""]
    rows = []
    for n, m in models.items():
        for split, s in m["splits"].items():
            base = report["baselines_by_split"][split].get("copy_last_frame", {}).get("velocity_error")
            rows.append([n, split, _ci(s, "velocity_error"), base, _ci(s, "position_error"), _ci(s, "detection_rate"),
                         _ci(s, "psnr", 2), _ci(s, "ssim"), _fd_cell(s)])
    out.append(_table(["model", "split", "velocity err", "copy-last velocity err", "position err", "detection", "PSNR",
                       "SSIM", "traj. FD"], rows))
    notes = sorted({f"{n}/{split}: {s['trajectory_fd_check']['note']}" for n, m in models.items()
                    for split, s in m["splits"].items() if (s.get("trajectory_fd_check") or {}).get("note")})
    fvd = sorted({f"{n}/{split}: FVD {s['fvd_check']['note']}" for n, m in models.items() for split, s in m["splits"].items()
                  if (s.get("fvd_check") or {}).get("note")})
    if notes or fvd:
        out += ["", "Frechet-distance checks (+ marks a distance dominated by a feature that is constant in the "
                "ground truth: it is z-scored by a 1e-3 floor, so any spread of it in the generated videos outweighs "
                "the rest):", ""] + [f"- {x}" for x in notes + fvd]
    out += _differences_section(report)
    out += _variants_section(report)
    out += _steps_section(report)
    out += ["", "Velocity error per generated frame (px/frame):", ""]
    rows = [[n, s_name, " ".join(_fmt(v, 2) for v in s["velocity_error_per_frame"])] for n, m in models.items() for s_name, s in m["splits"].items()
            if "velocity_error_per_frame" in s]
    out.append(_table(["model", "split", "frames C .. T-1"], rows))
    out += ["", "Held-out flow-matching loss at fixed t (fixed noise):", ""]
    any_m = next(iter(models.values()))
    out.append(_table(["model", *[f"t={t:.2f}" for t in any_m["val_loss_t"]]], [[n, *m["val_loss_per_t"]] for n, m in models.items()]))
    costs = [(n, r) for n, m in models.items() for r in m.get("cost", [])]
    if costs:
        out += ["", "## Inference cost by video size", "",
                "Forward MACs x sampler calls; latency is the median of >= 5 generations after a warm-up.", ""]
        out.append(_table(["model", "T,H,W", "tokens", "GMACs/video", "latency (ms)", "videos/s", "peak memory (MiB)"],
                          [[n, ",".join(map(str, r["size"])), r["tokens"], r["gmacs_per_video"], r.get("latency_ms"),
                            r.get("throughput_videos_per_s"),
                            (r["peak_memory_bytes"] / 2**20) if r.get("peak_memory_bytes") else None] for n, r in costs]))
    routing = routing_markdown(report)  # per-layer expert load, imbalance, entropy (evals/routing.py)
    if routing:
        out += ["", routing.rstrip("\n")]
    files = report.get("files")
    if files:
        out += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    return "\n".join(out) + "\n"


def write_tensorboard(report: Mapping[str, Any], out: str | Path) -> Path:
    """TensorBoard scalars: one run per model and baseline under ``out/tb``.

    Tags: ``eval/<metric>`` (headline split), ``eval_<split>/<metric>`` and
    ``val_loss_by_t/t=<t>``. Baselines log their physics metrics only.

    Args:
        report: the report.
        out: output folder.
    """
    root = Path(out) / "tb"
    keys = ("velocity_error", "position_error", "detection_rate", "psnr", "ssim", "val_loss", "latency_ms",
            "gmacs_per_sample", "gmacs_per_video", "total_params", "active_params", "train_flops")
    for name, m in report["models"].items():
        w = SummaryWriter(str(root / name))
        step = int(m.get("train_steps") or 0)
        for k in keys:
            v = m.get(k)
            if v is not None and math.isfinite(float(v)):
                w.add_scalar(f"eval/{k}", float(v), step)
        for split, s in m["splits"].items():
            for k in ("velocity_error", "position_error", "detection_rate", "psnr", "ssim"):
                if s.get(k) is not None and math.isfinite(float(s[k])):
                    w.add_scalar(f"eval_{split}/{k}", float(s[k]), step)
        for t, v in zip(m["val_loss_t"], m["val_loss_per_t"]):
            w.add_scalar(f"val_loss_by_t/t={t:.2f}", float(v), step)
        w.close()
    for name, s in report["baselines"].items():
        w = SummaryWriter(str(root / f"baseline_{name}"))
        for k in ("velocity_error", "position_error", "detection_rate"):
            if s.get(k) is not None and math.isfinite(float(s[k])):
                w.add_scalar(f"eval/{k}", float(s[k]), 0)
        w.close()
    return root


def write_report(report: dict[str, Any], videos: Mapping[str, Mapping[str, np.ndarray]] | None, out: str | Path,
                 title: str = "Dense vs sparse: evaluation report", num_samples: int = 4, tensorboard: bool = True) -> dict[str, Any]:
    """Write every artefact of a comparison into ``out``; returns ``report`` with ``files`` added.

    Args:
        report: :func:`~sparse_dit.evals.compare.compare`'s report.
        videos: its videos (None: no GIFs).
        out: output folder (created).
        title: report.md's heading.
        num_samples: rows per sample GIF.
        tensorboard: also write TensorBoard scalars.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [p.name for p in plot_quality(report, out)]
    files += [p.name for p in plot_routing(report, out)]
    if videos:
        files += [p.name for p in write_sample_gifs(videos, out, num_samples, report["settings"].get("context_frames", 3))]
        files += [p.name for p in write_sample_sheets(videos, out, min(2, num_samples), report["settings"].get("context_frames", 3))]
    if tensorboard:
        files.append(write_tensorboard(report, out).name + "/")
    files += ["report.md", "report.json"]
    report["files"] = files
    (out / "report.md").write_text(markdown(report, title))
    write_json(report, out / "report.json")
    return report
