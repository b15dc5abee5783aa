"""Pictures of results: a mask and its prompt points drawn over the image, with a caption."""
import textwrap
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

PREDICTION = (255, 64, 32)  # the predicted mask's colour (RGB)
TRUTH = (40, 220, 90)  # the ground truth's outline
POSITIVE, NEGATIVE = (255, 230, 0), (0, 160, 255)  # foreground / background points
ALPHA = 0.45
MIN_WIDTH = 320  # pixels; narrower images are enlarged by a whole factor
CHAR_WIDTH, LINE_HEIGHT = 6, 13  # PIL's default bitmap font


def overlay(image: np.ndarray, mask: np.ndarray, points: Optional[np.ndarray] = None,
            labels: Optional[Sequence[int]] = None, caption: str = "", truth: Optional[np.ndarray] = None) -> Image.Image:
    """The image (H, W, 3 uint8) with ``mask`` (H, W bool) tinted, the ``truth`` mask's outline,
    the points ((P, 2) x, y in pixels; labels 1 yellow, 0 blue) and the caption, wrapped, in a strip
    below. An image narrower than 320 pixels is enlarged by a whole factor first."""
    h, w = image.shape[:2]
    out = image.astype(np.float32).copy()
    m = np.asarray(mask, dtype=bool)
    out[m] = (1 - ALPHA) * out[m] + ALPHA * np.array(PREDICTION, np.float32)
    if truth is not None:
        t = np.asarray(truth, dtype=bool)
        edge = t & ~(np.roll(t, 1, 0) & np.roll(t, -1, 0) & np.roll(t, 1, 1) & np.roll(t, -1, 1))
        out[edge] = TRUTH
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    scale = max(1, -(-MIN_WIDTH // w))  # small images are enlarged (nearest) so the picture stays readable
    if scale > 1:
        picture = picture.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    radius = max(3, round(min(h, w) * scale / 80))
    for k, (x, y) in enumerate(np.asarray(points if points is not None else np.zeros((0, 2))).reshape(-1, 2)):
        colour = POSITIVE if labels is None or int(labels[k]) == 1 else NEGATIVE
        x, y = x * scale, y * scale
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(0, 0, 0))
    if not caption:
        return picture
    width = picture.width
    lines = textwrap.wrap(caption, max(10, (width - 12) // CHAR_WIDTH)) or [""]
    strip = Image.new("RGB", (width, LINE_HEIGHT * len(lines) + 8), (20, 20, 20))
    ImageDraw.Draw(strip).multiline_text((6, 4), "\n".join(lines), fill=(240, 240, 240), spacing=2)
    framed = Image.new("RGB", (width, picture.height + strip.height))
    framed.paste(picture, (0, 0))
    framed.paste(strip, (0, picture.height))
    return framed

METRIC_NAMES = {"iou": "IoU", "f1": "F1", "mae": "MAE"}


def _pyplot():
    """matplotlib with the non-interactive Agg backend: pictures are files, on machines without a display."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _matrix_panel(ax, rows: Sequence[Sequence[Optional[float]]], domains: Sequence[str], metric: str,
                  title: str) -> None:
    """One metric's accuracy matrix A[t][j] (row t: after step t; column j: test domain j) as an
    annotated heatmap on ``ax``; a cell not measured (None) stays blank."""
    values = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
    cmap = "viridis_r" if metric == "mae" else "viridis"
    ax.imshow(values, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for t in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[t, j]):
                v = values[t, j]
                ax.text(j, t, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if (v < 0.55) != (metric == "mae") else "black")
    ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(values.shape[0]), [f"after {domains[t]}" for t in range(values.shape[0])], fontsize=8)
    ax.set_title(title, fontsize=10)


def draw_report(accuracy_matrix: Dict, path: Path, title: str = "") -> Path:
    """``report.png`` of a run: the accuracy matrix A[t][j] of every metric as an annotated
    heatmap (row t: after training step t; column j: test domain j; blank: not measured), and
    AA and FM of every metric over the steps. ``accuracy_matrix``: metrics.json's."""
    plt = _pyplot()
    domains = accuracy_matrix["domains"]
    matrices = accuracy_matrix["matrix"]
    summary = accuracy_matrix["summary"]
    metrics = [m for m in METRIC_NAMES if m in matrices]
    n = len(domains)
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 0.55 * n + 2.6),
                             gridspec_kw={"width_ratios": [1] * len(metrics) + [1.15]})
    for ax, m in zip(axes, metrics):
        _matrix_panel(ax, matrices[m], domains, m, f"{METRIC_NAMES[m]}: A[t][j]")
    ax = axes[-1]
    steps = list(range(len(summary[metrics[0]])))
    for m, colour in zip(metrics, ("tab:blue", "tab:green", "tab:red")):
        aa = [s["AA"] for s in summary[m]]
        fm = [s["FM"] for s in summary[m]]
        ax.plot(steps, [np.nan if v is None else v for v in aa], "-o", color=colour, label=f"AA {METRIC_NAMES[m]}")
        ax.plot(steps, [np.nan if v is None else v for v in fm], "--x", color=colour, label=f"FM {METRIC_NAMES[m]}")
    ax.set_xticks(steps, [domains[t] for t in steps], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("after training step", fontsize=9)
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("average accuracy and forgetting", fontsize=10)
    return _save(fig, path, title)


def draw_comparison(rows: Sequence[Dict], path: Path) -> Path:
    """The comparison of ``python -m samcl.compare``: AA and FM (IoU) per run as bars, and the
    storage per domain."""
    plt = _pyplot()
    names = [r["run"] if len(r["run"]) <= 28 else r["run"][:25] + "..." for r in rows]
    x = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(rows) + 4), 3.8))
    a.bar(x - 0.2, [r["iou_AA"] or 0 for r in rows], 0.4, label="AA (IoU)")
    a.bar(x + 0.2, [r["iou_FM"] or 0 for r in rows], 0.4, label="FM (IoU)")
    a.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    a.axhline(0, color="grey", lw=0.5)
    a.legend(fontsize=8)
    a.set_title("after the last step", fontsize=10)
    b.bar(x, [r["stored_mb_per_domain"] for r in rows], 0.5, color="tab:purple")
    b.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    b.set_ylabel("MB", fontsize=9)
    b.set_title("stored per trained domain", fontsize=10)
    return _save(fig, path)


def draw_sweep(rows: Sequence[Dict], matrices: Dict[str, Tuple[str, Dict]], path: Path, title: str = "") -> Path:
    """``summary.png`` of ``python -m samcl.sweep``: AA and FM (IoU) per method as bars with the
    sample std over its runs as error bars (top), and below, per method, the IoU accuracy matrix
    A[t][j] of one of its runs. ``rows``: the sweep's summary rows (``iou_AA_mean``, ``iou_AA_std``,
    ...; a method without a finished run draws no bar); ``matrices``: method -> (the run's folder,
    its metrics.json accuracy matrix)."""
    plt = _pyplot()
    shown = [r["method"] for r in rows if r["method"] in matrices]
    ncols = max(1, min(4, len(shown)))
    nrows = 1 + -(-len(shown) // ncols)
    side = max((len(matrices[m][1]["domains"]) for m in shown), default=3)
    fig = plt.figure(figsize=(max(7.0, 4.2 * ncols), 3.8 + (nrows - 1) * (0.55 * side + 2.4)))
    grid = fig.add_gridspec(nrows, ncols, height_ratios=[3.8] + [0.55 * side + 2.4] * (nrows - 1))
    bars = fig.add_subplot(grid[0, :])
    x = np.arange(len(rows))

    def values(key: str):
        return ([np.nan if r[f"{key}_mean"] is None else r[f"{key}_mean"] for r in rows],
                [0.0 if r[f"{key}_std"] is None else r[f"{key}_std"] for r in rows])

    for shift, key, label in ((-0.2, "iou_AA", "AA (IoU)"), (0.2, "iou_FM", "FM (IoU)")):
        mean, std = values(key)
        bars.bar(x + shift, mean, 0.4, yerr=std, capsize=4, label=label)
    bars.set_xticks(x, [f"{r['method']} (n={r['runs']})" for r in rows], fontsize=9)
    bars.axhline(0, color="grey", lw=0.5)
    bars.legend(fontsize=8)
    bars.set_title("after the last step: mean and sample std over orders x seeds", fontsize=10)
    for i, m in enumerate(shown):
        folder, matrix = matrices[m]
        ax = fig.add_subplot(grid[1 + i // ncols, i % ncols])
        _matrix_panel(ax, matrix["matrix"]["iou"], matrix["domains"], "iou", f"{m}: IoU A[t][j] ({folder})")
    return _save(fig, path, title)


def _save(fig, path: Path, title: str = "") -> Path:
    """Title, lay out, write and close a figure."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)
    return Path(path)
