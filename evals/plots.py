"""A comparison report's figures: quality against cost and against sampler steps, labelled sample grids.

Rules every plot here keeps (issue 15: two compute-matched models looked far apart):

- **Units are what the label says**: the x value is divided by the unit's scale where the label
  is written (``training PFLOPs`` = FLOPs / 1e15), in one place (:data:`COST_AXES`).
- **Cost axes start at 0**: FLOPs, MACs and latency are ratio quantities; an axis that spans
  6.309-6.321 GMACs makes a 0.2 % difference fill the plot. When the models' values differ by
  less than :data:`MATCHED_WITHIN` of their size, the panel says "matched within x %".
- **Error bars are the report's 95 % intervals** (``ci95``, over videos); latency's bars span
  the timed runs (min to max).
- **Sample grids are labelled**: every column of the GIF carries its name (ground truth,
  baselines, models), a footer says which frames are given context and which are generated,
  and a PNG contact sheet lays the frames out in time with the names on the rows.

:func:`quality_figures` and :func:`steps_figure` return the matplotlib figures (tests read
their axes back); :func:`plot_quality` writes them as PNGs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window (also on machines with a display)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sparse_dit.video_io import save_video, side_by_side

__all__ = ["COST_AXES", "MATCHED_WITHIN", "quality_figures", "steps_figure", "plot_quality", "label_strip",
           "write_sample_gifs", "write_sample_sheets"]

# Cost axes: report key -> (label, divisor from the stored unit to the label's unit).
COST_AXES: dict[str, tuple[str, float]] = {
    "train_flops": ("training PFLOPs", 1e15),  # stored in FLOPs
    "gmacs_per_video": ("inference GMACs per video", 1.0),  # stored in GMACs
    "latency_ms": ("latency per video (ms)", 1.0),  # stored in ms
}
# Models whose cost differs by less than this fraction are "matched" (and the panel says so).
MATCHED_WITHIN = 0.01
_QUALITY = {"velocity_error": "velocity error (px/frame)", "val_loss": "held-out loss", "psnr": "PSNR (dB)",
            "position_error": "position error (px)", "detection_rate": "detection rate", "ssim": "SSIM"}
_RED = (220, 30, 30)


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating, np.integer)) and math.isfinite(float(x))


def _yerr(m: Mapping[str, Any], key: str, y: float) -> list[list[float]] | None:
    ci = (m.get("ci95") or {}).get(key)
    if not ci or not (_finite(ci[0]) and _finite(ci[1])):
        return None
    return [[max(0.0, y - ci[0])], [max(0.0, ci[1] - y)]]


def _cost_panel(ax: Any, models: Mapping[str, Mapping[str, Any]], xkey: str, ykey: str,
                baselines: Mapping[str, Any] | None = None) -> None:
    """One panel: ``ykey`` (with its 95 % interval) against the cost ``xkey``; x from 0."""
    xlabel, div = COST_AXES[xkey]
    xs = []
    for name, m in models.items():
        x, y = m.get(xkey), m.get(ykey)
        if not (_finite(x) and _finite(y)):
            continue
        x = float(x) / div
        xs.append(x)
        xerr = None
        if xkey == "latency_ms" and m.get("latency_runs_ms"):
            runs = [float(r) for r in m["latency_runs_ms"]]
            xerr = [[max(0.0, x - min(runs))], [max(0.0, max(runs) - x)]]
        ax.errorbar([x], [float(y)], yerr=_yerr(m, ykey, float(y)), xerr=xerr, fmt="o", capsize=4, markersize=7, label=name)
        ax.annotate(name, (x, float(y)), textcoords="offset points", xytext=(6, 6), fontsize=8)
    for bname, style in (("copy_last_frame", "--"), ("constant_velocity", ":")):
        v = (baselines or {}).get(bname, {}).get(ykey)
        if _finite(v):
            ax.axhline(float(v), linestyle=style, color="grey", label=bname.replace("_", " "))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(_QUALITY.get(ykey, ykey) + " (95% CI)")
    ax.grid(alpha=0.3)
    if xs:
        hi = max(xs)
        ax.set_xlim(0.0, hi * 1.2 if hi > 0 else 1.0)  # a cost axis starts at 0: ratios read true
        if len(xs) > 1 and hi > 0 and (hi - min(xs)) / hi < MATCHED_WITHIN:
            ax.text(0.03, 0.04, f"matched within {100 * (hi - min(xs)) / hi:.2g}%", transform=ax.transAxes, fontsize=9,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "grey"})
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def quality_figures(report: Mapping[str, Any]) -> dict[str, Any]:
    """The quality-vs-cost figures, by file name (not saved; see :func:`plot_quality`).

    Args:
        report: :func:`~sparse_dit.evals.compare.compare`'s report (with ``ci95`` for error bars).
    """
    models, base = report["models"], report.get("baselines", {})
    figs = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _cost_panel(axes[0], models, "train_flops", "velocity_error", base)
    _cost_panel(axes[1], models, "train_flops", "val_loss")
    fig.suptitle("Quality vs training compute (error bars: 95% intervals over videos)", fontsize=10)
    figs["quality_vs_train_flops.png"] = fig
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _cost_panel(axes[0], models, "gmacs_per_video", "velocity_error", base)
    _cost_panel(axes[1], models, "latency_ms", "velocity_error", base)
    fig.suptitle("Quality vs inference cost (latency bars: min-max of the timed runs)", fontsize=10)
    figs["quality_vs_inference.png"] = fig
    steps = steps_figure(report)
    if steps is not None:
        figs["quality_vs_steps.png"] = steps
    return figs


def steps_figure(report: Mapping[str, Any], keys: Sequence[str] = ("velocity_error", "psnr")) -> Any | None:
    """Quality against sampler steps, one curve per model with 95 % error bars (None without a sweep).

    Args:
        report: a report whose models carry ``steps_sweep`` (``compare(..., steps_sweep=[...])``).
        keys: the metrics, one panel each.
    """
    models = {n: m for n, m in report["models"].items() if m.get("steps_sweep")}
    if not models:
        return None
    base = report.get("baselines", {})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, m in models.items():
            pts = [p for p in m["steps_sweep"] if _finite(p.get(key))]
            if not pts:
                continue
            x = [p["steps"] for p in pts]
            y = [float(p[key]) for p in pts]
            err = [_yerr(p, key, v) or [[0.0], [0.0]] for p, v in zip(pts, y)]
            ax.errorbar(x, y, yerr=[[e[0][0] for e in err], [e[1][0] for e in err]], marker="o", capsize=3, label=name)
        for bname, style in (("copy_last_frame", "--"), ("constant_velocity", ":")):
            v = base.get(bname, {}).get(key)
            if _finite(v):
                ax.axhline(float(v), linestyle=style, color="grey", label=bname.replace("_", " "))
        ax.set_xscale("log", base=2)
        ticks = sorted({int(p["steps"]) for m in models.values() for p in m["steps_sweep"]})
        ax.set_xticks(ticks, [str(t) for t in ticks])  # the step counts evaluated, not powers of 2
        ax.minorticks_off()
        ax.set_xlabel("sampler steps (model calls per video = steps for Euler)")
        ax.set_ylabel(_QUALITY.get(key, key) + " (95% CI)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Quality vs sampling steps ({report.get('headline_split', 'id')} split)", fontsize=10)
    return fig


def _save(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure (tight layout, 100 dpi), close it, return its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_quality(report: Mapping[str, Any], out: str | Path) -> list[Path]:
    """Write :func:`quality_figures` as PNGs into ``out``; returns their paths.

    Args:
        report: the report.
        out: output folder.
    """
    return [_save(fig, Path(out) / name) for name, fig in quality_figures(report).items()]


# ------------------------------------------------------------------ labelled sample grids


def _font(size: int = 11) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def label_strip(labels: Sequence[str], widths: Sequence[int], gap: int, font_size: int = 11) -> np.ndarray:
    """A white uint8 (h, W, 3) band with each label centred (and word-wrapped) over its column.

    Args:
        labels: one per column.
        widths: column widths in px.
        gap: px between columns.
        font_size: text size in px.
    """
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(probe, t, font, w) for t, w in zip(labels, widths)]
    line_h = font_size + 2
    h = 4 + line_h * max(len(w) for w in wrapped)
    total = sum(widths) + gap * (len(widths) - 1)
    img = Image.new("RGB", (total, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    x = 0
    for lines, w in zip(wrapped, widths):
        for j, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text((x + max(0.0, (w - tw) / 2), 2 + j * line_h), line, fill=(0, 0, 0), font=font)
        x += w + gap
    return np.asarray(img, dtype=np.uint8)


def _text_band(text: str, width: int, font_size: int = 11, color: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    return label_strip([text], [width], 0, font_size) if color == (0, 0, 0) else _colored_band(text, width, font_size, color)


def _colored_band(text: str, width: int, font_size: int, color: tuple[int, int, int]) -> np.ndarray:
    band = Image.fromarray(label_strip([text], [width], 0, font_size))
    arr = np.asarray(band).copy()
    arr[(arr < 128).all(axis=-1)] = color  # recolour the text
    return arr


def _frame_border(video: np.ndarray, context_frames: int, scale: int) -> np.ndarray:
    v = video.copy()
    b = max(1, scale // 2)
    v[:context_frames, :b, :] = _RED
    v[:context_frames, -b:, :] = _RED
    v[:context_frames, :, :b] = _RED
    v[:context_frames, :, -b:] = _RED
    return v


def _label(name: str) -> str:
    return name.replace("_", " ")


def write_sample_gifs(videos: Mapping[str, Mapping[str, np.ndarray]], out: str | Path, num_samples: int = 4,
                      context_frames: int = 3, fps: float = 4.0, scale: int = 4) -> list[Path]:
    """One labelled GIF per split: a row per video, a named column per source.

    Columns: ground truth, the baselines, the models (their names in a header); context frames
    have a red border, and a footer says for each frame whether it was given or generated.
    ``samples_<split>.txt`` lists the columns too.

    Args:
        videos: split -> name -> uint8 (N, T, H, W, 3) (``compare``'s second output).
        out: output folder.
        num_samples: videos (rows) per GIF.
        context_frames: given frames.
        fps: GIF frame rate.
        scale: nearest-neighbour upscaling (labels are drawn at the upscaled size).
    """
    paths = []
    gap = 2 * scale
    for split, by_name in videos.items():
        names = list(by_name)
        n = min(num_samples, min(v.shape[0] for v in by_name.values()))
        big = {k: v[:n].repeat(scale, axis=2).repeat(scale, axis=3) for k, v in by_name.items()}
        T, h, w = big[names[0]].shape[1:4]
        rows = [side_by_side([_frame_border(big[k][i], context_frames, scale) for k in names], gap=gap) for i in range(n)]
        grid = side_by_side([r.transpose(0, 2, 1, 3) for r in rows], gap=gap).transpose(0, 2, 1, 3)  # stack rows
        width = grid.shape[2]
        head = label_strip([_label(k) for k in names], [w] * len(names), gap)
        feet = [_colored_band(f"frame {t + 1}/{T}: " + ("given context (red border)" if t < context_frames else "generated"),
                              width, 11, _RED if t < context_frames else (0, 0, 0)) for t in range(T)]
        fh = max(f.shape[0] for f in feet)  # wrapped footers differ in height: pad to one
        feet = [np.concatenate([f, np.full((fh - f.shape[0], width, 3), 255, np.uint8)]) for f in feet]
        frames = [np.concatenate([head, grid[t], feet[t]], axis=0) for t in range(T)]
        p = save_video(Path(out) / f"samples_{split}.gif", np.stack(frames), fps=fps, scale=1)
        (Path(out) / f"samples_{split}.txt").write_text(
            "columns, left to right: " + ", ".join(names) + f"\nrows: the first {n} videos of the split; frames 1-"
            f"{context_frames} are the given context (red border), the rest generated\n")
        paths.append(p)
    return paths


def write_sample_sheets(videos: Mapping[str, Mapping[str, np.ndarray]], out: str | Path, num_samples: int = 2,
                        context_frames: int = 3, scale: int = 3) -> list[Path]:
    """One labelled PNG contact sheet per split: per video, a row per source and a column per frame.

    Args:
        videos: split -> name -> uint8 (N, T, H, W, 3).
        out: output folder.
        num_samples: videos (blocks) per sheet.
        context_frames: given frames (column headers say "given" or "generated").
        scale: nearest-neighbour upscaling.
    """
    paths = []
    gap = 2 * scale
    for split, by_name in videos.items():
        names = list(by_name)
        n = min(num_samples, min(v.shape[0] for v in by_name.values()))
        T, H, W = by_name[names[0]].shape[1:4]
        h, w = H * scale, W * scale
        label_w = max(90, 7 * max(len(k) for k in names))
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        font = _font(11)
        blocks = []
        header = label_strip(["", *[f"t={t} " + ("given" if t < context_frames else "generated") for t in range(T)]],
                             [label_w] + [w] * T, gap)
        for i in range(n):
            rows = []
            for k in names:
                cells = [by_name[k][i, t].repeat(scale, axis=0).repeat(scale, axis=1) for t in range(T)]
                cells = [_frame_border(c[None], 1 if t < context_frames else 0, scale)[0] for t, c in enumerate(cells)]
                strip = side_by_side([c[None] for c in cells], gap=gap)[0]
                tag = Image.new("RGB", (label_w, h), (255, 255, 255))
                draw = ImageDraw.Draw(tag)
                lines = _wrap(probe, _label(k), font, label_w - 4)
                for j, line in enumerate(lines[: max(1, h // 13)]):
                    draw.text((2, 2 + 13 * j), line, fill=(0, 0, 0), font=font)
                rows.append(np.concatenate([np.asarray(tag), np.full((h, gap, 3), 255, np.uint8), strip], axis=1))
            title = _text_band(f"video {i + 1} of split {split}", rows[0].shape[1])
            blocks.append(np.concatenate([title, *[np.concatenate([r, np.full((gap, r.shape[1], 3), 255, np.uint8)])
                                                   for r in rows]], axis=0))
        sheet = np.concatenate([header, *blocks], axis=0)
        path = Path(out) / f"samples_{split}.png"
        tmp = path.with_name(f".{path.stem}.tmp.png")
        Image.fromarray(sheet).save(tmp)
        tmp.replace(path)
        paths.append(path)
    return paths
