"""Write a comparison report: report.json, report.md, PNG plots, sample GIFs, TensorBoard scalars.

Input is :func:`sparse_dit.evals.compare.compare`'s ``(report, videos)``. Files under ``out``:

- ``report.json``: every number (NaN/inf written as null, so any JSON reader loads it);
- ``report.md``: the tables (models, calibration baselines, per split, cost by size);
- ``quality_vs_train_flops.png``, ``quality_vs_inference.png``: velocity error and held-out loss
  against training FLOPs, and against inference MACs per video and measured latency, with the
  baselines as horizontal lines;
- ``samples_<split>.gif``: for a few validation videos, rows of ground truth | copy-last |
  constant velocity | each model, the context frames marked with a red border;
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

import matplotlib

matplotlib.use("Agg")  # files only, never a window (also on machines with a display)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
from torch.utils.tensorboard import SummaryWriter

from sparse_dit.evals.routing import plot_routing, routing_markdown
from sparse_dit.video_io import save_video, side_by_side

__all__ = ["write_report", "write_json", "markdown", "plot_quality", "write_sample_gifs", "write_tensorboard", "REQUIRED_MODEL_KEYS"]

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
    out += ["## Models", ""]
    out.append(_table(
        ["model", "params", "active params", "GMACs/sample", "train PFLOPs", "val loss", "velocity err (px/frame)",
         "position err (px)", "detection", "PSNR", "SSIM", "traj. FD", "GMACs/video", "latency (ms)"],
        [[n, m["total_params"], m["active_params"], m["gmacs_per_sample"],
          (m["train_flops"] / 1e15) if m.get("train_flops") is not None else None, m["val_loss"], m.get("velocity_error"),
          m.get("position_error"), m.get("detection_rate"), m.get("psnr"), m.get("ssim"), m.get("trajectory_fd"),
          m.get("gmacs_per_video"), m.get("latency_ms")] for n, m in models.items()]))
    skipped = sorted({f"{k}: {v}" for m in models.values() for k, v in (m.get("skipped_metrics") or {}).items()})
    if skipped:  # e.g. physics metrics on a video dataset without simulator states (evals/splits.py)
        out += ["", "Skipped metrics (\"-\" above): " + "; ".join(skipped) + "."]
    out += ["", "## Calibration baselines", "",
            "Ground truth measures the instrument (~0 error, detection 1); copy-last-frame's velocity error is "
            "the ground-truth speed; constant velocity extrapolates the context (exact for uniform motion). "
            "uniform_noise, gaussian_noise and blank hold no ball: detection ~0 and no error (\"-\"), so they never look "
            "better than copy-last-frame. Splits without simulator states score the baselines by PSNR/SSIM only.", ""]
    rows = []
    for split, base in report["baselines_by_split"].items():
        for name, s in base.items():
            rows.append([split, name, s.get("velocity_error"), s.get("position_error"), s.get("detection_rate"), s.get("gt_speed"),
                         s.get("psnr"), s.get("ssim")])
    out.append(_table(["split", "baseline", "velocity err", "position err", "detection", "GT speed", "PSNR", "SSIM"], rows))
    out += ["", "## Per split", ""]
    rows = []
    for n, m in models.items():
        for split, s in m["splits"].items():
            base = report["baselines_by_split"][split].get("copy_last_frame", {}).get("velocity_error")
            rows.append([n, split, s.get("velocity_error"), base, s.get("position_error"), s.get("detection_rate"), s.get("psnr"), s.get("ssim"),
                         s.get("trajectory_fd")])
    out.append(_table(["model", "split", "velocity err", "copy-last velocity err", "position err", "detection", "PSNR", "SSIM", "traj. FD"], rows))
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


def _save(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure (tight layout, 100 dpi), close it, return its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_quality(report: Mapping[str, Any], out: str | Path) -> list[Path]:
    """Quality vs training FLOPs and vs inference MACs / latency (PNG files).

    Args:
        report: the report.
        out: output folder.
    """
    out = Path(out)
    models, base = report["models"], report["baselines"]
    names = list(models)
    paths = []

    def baselines(ax: Any) -> None:
        for (bname, style) in (("copy_last_frame", "--"), ("constant_velocity", ":")):
            v = base.get(bname, {}).get("velocity_error")
            if v is not None and math.isfinite(v):
                ax.axhline(v, linestyle=style, color="grey", label=bname.replace("_", " "))

    def scatter(ax: Any, xkey: str, ykey: str, xlabel: str, ylabel: str, scale: float = 1.0) -> None:
        for n in names:
            x, y = models[n].get(xkey), models[n].get(ykey)
            if x is None or y is None or not math.isfinite(float(y)):
                continue
            ax.scatter([x / scale], [y], s=60, label=n)
            ax.annotate(n, (x / scale, y), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    scatter(axes[0], "train_flops", "velocity_error", "training PFLOPs", "velocity error (px/frame)", 1e15)
    baselines(axes[0])
    axes[0].legend(fontsize=8)
    scatter(axes[1], "train_flops", "val_loss", "training PFLOPs", "held-out loss")
    axes[1].legend(fontsize=8)
    fig.suptitle("Quality vs training compute")
    paths.append(_save(fig, out / "quality_vs_train_flops.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    scatter(axes[0], "gmacs_per_video", "velocity_error", "inference GMACs per video", "velocity error (px/frame)")
    baselines(axes[0])
    axes[0].legend(fontsize=8)
    scatter(axes[1], "latency_ms", "velocity_error", "latency per video (ms)", "velocity error (px/frame)")
    baselines(axes[1])
    fig.suptitle("Quality vs inference cost")
    paths.append(_save(fig, out / "quality_vs_inference.png"))
    return paths


def _frame_border(video: np.ndarray, context_frames: int) -> np.ndarray:
    v = video.copy()
    v[:context_frames, [0, -1], :] = (220, 30, 30)
    v[:context_frames, :, [0, -1]] = (220, 30, 30)
    return v


def write_sample_gifs(videos: Mapping[str, Mapping[str, np.ndarray]], out: str | Path, num_samples: int = 4,
                      context_frames: int = 3, fps: float = 4.0, scale: int = 4) -> list[Path]:
    """One GIF per split: a row per video, columns ground truth | baselines | models.

    Args:
        videos: split -> name -> uint8 (N, T, H, W, 3) (``compare``'s second output).
        out: output folder.
        num_samples: videos (rows) per GIF.
        context_frames: given frames (drawn with a red border).
        fps: GIF frame rate.
        scale: nearest-neighbour upscaling.
    """
    paths = []
    for split, by_name in videos.items():
        names = list(by_name)
        n = min(num_samples, min(v.shape[0] for v in by_name.values()))
        rows = [side_by_side([_frame_border(by_name[k][i], context_frames) for k in names], gap=2) for i in range(n)]
        grid = side_by_side([r.transpose(0, 2, 1, 3) for r in rows], gap=2).transpose(0, 2, 1, 3)  # stack rows
        p = save_video(Path(out) / f"samples_{split}.gif", grid, fps=fps, scale=scale)
        (Path(out) / f"samples_{split}.txt").write_text("columns, left to right: " + ", ".join(names) + "\n")
        paths.append(p)
    return paths


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
    if tensorboard:
        files.append(write_tensorboard(report, out).name + "/")
    files += ["report.md", "report.json"]
    report["files"] = files
    (out / "report.md").write_text(markdown(report, title))
    write_json(report, out / "report.json")
    return report
