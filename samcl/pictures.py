"""Pictures of results: a mask and its prompts drawn over the image, with a legend and a caption."""
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw


RGB = Tuple[int, int, int]
# hues the mask and the ground truth are drawn in: the ones farthest from the image's colour under them
PALETTE: Tuple[RGB, ...] = ((0, 235, 255), (255, 40, 220), (60, 255, 60), (255, 150, 0), (50, 110, 255),
                            (255, 240, 0))
POSITIVE, NEGATIVE = (255, 255, 255), (0, 0, 0)  # foreground / background points (the other as their rim)
BOX = (255, 255, 255)  # the box prompt, on a black line
ALPHA = 0.35  # the mask's tint
MIN_WIDTH = 320  # pixels; narrower images are enlarged by a whole factor
CHAR_WIDTH, LINE_HEIGHT = 6, 13  # at most, in PIL's default font
STRIP = (20, 20, 20)  # the legend's and caption's background
TEXT = (240, 240, 240)


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(b, np.float32)))


def overlay_colours(image: np.ndarray, mask: np.ndarray, truth: Optional[np.ndarray] = None) -> Tuple[RGB, RGB]:
    """(mask colour, ground-truth colour) for ``image`` (H, W, 3 uint8): the mask's is the
    :data:`PALETTE` hue farthest from the image's mean colour under the mask and the truth (the
    whole image when both are empty); the truth's the one farthest from both that mean and the
    mask's colour."""
    region = np.asarray(mask, dtype=bool)
    if truth is not None:
        region = region | np.asarray(truth, dtype=bool)
    pixels = image[region] if region.any() else image.reshape(-1, image.shape[-1])
    mean = pixels.reshape(-1, 3).astype(np.float64).mean(0)
    first = max(PALETTE, key=lambda c: _distance(c, mean))
    second = max((c for c in PALETTE if c != first), key=lambda c: min(_distance(c, mean), _distance(c, first)))
    return first, second


def contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """(H, W) bool: the pixels of ``mask`` within ``width`` pixels of its outside (beyond the image
    is outside, so a mask touching the border is outlined along it)."""
    m = np.asarray(mask, dtype=bool)
    inner = m.copy()
    for _ in range(max(1, width)):
        pad = np.pad(inner, 1, constant_values=False)
        inner = inner & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    return m & ~inner


def _legend_entries(mask_colour: RGB, truth_colour: Optional[RGB], labels: Sequence[int], box: bool):
    entries = [("mask", "fill", mask_colour)]
    if truth_colour is not None:
        entries.append(("ground truth", "outline", truth_colour))
    if any(int(v) == 1 for v in labels):
        entries.append(("foreground point", "point", POSITIVE))
    if any(int(v) == 0 for v in labels):
        entries.append(("background point", "point", NEGATIVE))
    if box:
        entries.append(("box", "outline", BOX))
    return entries


def _point(draw: ImageDraw.ImageDraw, x: float, y: float, radius: int, colour: RGB) -> None:
    rim = NEGATIVE if colour == POSITIVE else POSITIVE
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=rim, width=max(1, radius // 3))


def _strip(width: int, entries, caption: str) -> Image.Image:
    """The legend's swatches (wrapped to ``width``) and the caption, light on dark."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows: List[List[Tuple[int, tuple]]] = [[]]
    x, swatch, gap = 6, 10, 14
    for entry in entries:
        w = swatch + 4 + int(probe.textlength(entry[0])) + gap
        if rows[-1] and x + w > width:
            rows.append([])
            x = 6
        rows[-1].append((x, entry))
        x += w
    lines = textwrap.wrap(caption, max(10, (width - 12) // CHAR_WIDTH)) if caption else []
    height = 4 + LINE_HEIGHT * (len(rows) + len(lines)) + 2 * bool(lines) + 4
    strip = Image.new("RGB", (width, height), STRIP)
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        y = 4 + r * LINE_HEIGHT
        for x, (name, kind, colour) in row:
            box = [x, y + 1, x + swatch, y + 1 + swatch]
            if kind == "fill":
                draw.rectangle(box, fill=tuple(int(round((1 - ALPHA) * s + ALPHA * c)) for s, c in zip(STRIP, colour)),
                               outline=colour, width=2)
            elif kind == "outline":
                draw.rectangle(box, outline=colour, width=2)
            else:
                _point(draw, x + swatch / 2, y + 1 + swatch / 2, swatch // 2, colour)
            draw.text((x + swatch + 4, y), name, fill=TEXT)
    if lines:
        draw.multiline_text((6, 4 + LINE_HEIGHT * len(rows) + 2), "\n".join(lines), fill=TEXT, spacing=2)
    return strip


def enlargement(width: int) -> int:
    """The whole factor :func:`overlay` enlarges an image ``width`` pixels wide by (1 from
    :data:`MIN_WIDTH` up), so that the picture stays readable; a point (x, y) of the image is at
    (x, y) times it in the picture."""
    return max(1, -(-MIN_WIDTH // width))


def overlay(image: np.ndarray, mask: np.ndarray, points: Optional[np.ndarray] = None,
            labels: Optional[Sequence[int]] = None, caption: str = "", truth: Optional[np.ndarray] = None,
            box: Optional[Sequence[float]] = None) -> Image.Image:
    """The image (H, W, 3 uint8) with ``mask`` (H, W bool) outlined and tinted in the colour of
    :func:`overlay_colours` (chosen against the image under it, so a red polyp gets no red mask),
    the ``truth`` mask's outline, the points ((P, 2) x, y in pixels; labels 1 white, 0 black), the
    ``box`` (x0, y0, x1, y1 in pixels), and below, a legend and the caption, wrapped. An image
    narrower than 320 pixels is enlarged (nearest) by a whole factor first."""
    h, w = image.shape[:2]
    scale = enlargement(w)

    def big(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, scale, 0), scale, 1) if scale > 1 else a

    m = np.asarray(mask, dtype=bool)
    t = None if truth is None else np.asarray(truth, dtype=bool)
    mask_colour, truth_colour = overlay_colours(image, m, t)
    out = big(image[..., :3]).astype(np.float32)
    m = big(m)
    line = int(np.clip(round(min(h, w) * scale / 160), 2, 12))  # the outline's width, in picture pixels
    out[m] = (1 - ALPHA) * out[m] + ALPHA * np.array(mask_colour, np.float32)
    out[contour(m, line)] = mask_colour
    if t is not None:
        out[contour(big(t), (line + 1) // 2)] = truth_colour
    picture = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    if box is not None:
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0), width=line + 2)
        draw.rectangle([x0 + 1, y0 + 1, x1 - 1, y1 - 1], outline=BOX, width=max(1, line - 1))
    radius = max(4, round(min(h, w) * scale / 70))
    pts = np.asarray(points if points is not None else np.zeros((0, 2)), dtype=np.float64).reshape(-1, 2)
    point_labels = [1] * len(pts) if labels is None else [int(v) for v in labels]
    for (x, y), label in zip(pts, point_labels):
        _point(draw, x * scale, y * scale, radius, POSITIVE if label == 1 else NEGATIVE)
    entries = _legend_entries(mask_colour, None if t is None else truth_colour, point_labels, box is not None)
    strip = _strip(picture.width, entries, caption)
    framed = Image.new("RGB", (picture.width, picture.height + strip.height))
    framed.paste(picture, (0, 0))
    framed.paste(strip, (0, picture.height))
    return framed


METRIC_NAMES = {"iou": "IoU", "f1": "F1", "mae": "MAE"}
# the bars of the comparison and the sweep's summary: (row key, legend); the sweep's rows add _mean / _std
BARS = (("iou_AA", "AA (IoU)"), ("iou_FM", "FM (IoU)"), ("iou_unseen", "unseen (IoU)"),
        ("iou_unseen_vanilla", "unseen, vanilla (IoU)"))


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


def lower_is_better(metric: str) -> bool:
    """Whether a lower ``metric`` is better (MAE), as samcl.metrics says; read when drawn, since
    samcl.metrics imports torch and the scripts' --help imports this module without it."""
    from .metrics import LOWER_IS_BETTER

    return metric in LOWER_IS_BETTER


def forgetting_curve(summary: Sequence[Dict], metric: str) -> List[float]:
    """The release's FM after every step as the report draws it: a lower-is-better metric's (MAE)
    with its sign turned, so that forgetting reads positive for every metric; NaN where there is none."""
    turn = -1.0 if lower_is_better(metric) else 1.0
    return [np.nan if s["FM"] is None else turn * s["FM"] for s in summary]


def draw_report(accuracy_matrix: Dict, path: Path, title: str = "") -> Path:
    """``report.png`` of a run: the accuracy matrix A[t][j] of every metric as an annotated
    heatmap (row t: after training step t; column j: test domain j; blank: not measured), and
    AA and the release's FM of every metric over the steps, MAE's FM with its sign turned so that a
    rise of MAE (forgetting) reads positive as for IoU and F1. ``accuracy_matrix``: metrics.json's."""
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
        ax.plot(steps, [np.nan if v is None else v for v in aa], "-o", color=colour, label=f"AA {METRIC_NAMES[m]}")
        ax.plot(steps, forgetting_curve(summary[m], m), "--x", color=colour,
                label=f"FM {METRIC_NAMES[m]}" + (" (rise +)" if lower_is_better(m) else ""))
    ax.set_xticks(steps, [domains[t] for t in steps], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("after training step", fontsize=9)
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("average accuracy and forgetting", fontsize=10)
    return _save(fig, path, title)


def _megabytes(v: float) -> str:
    """A storage size for a bar's label: 0.0213 MB, 2.51 MB, 358 MB."""
    if v <= 0:
        return "0 MB"
    return f"{v:.3g} MB" if v < 100 else f"{v:.0f} MB"


def storage_panel(ax, names: Sequence[str], megabytes: Sequence[Optional[float]]) -> None:
    """Stored MB per trained domain as bars on a log scale (sizes differ by orders of magnitude:
    a LoRA module's 0.02 MB beside a full model's hundreds), each bar with its value written on it."""
    values = [float(v) if v is not None else 0.0 for v in megabytes]
    x = np.arange(len(values))
    positive = [v for v in values if v > 0]
    low, high = (min(positive), max(positive)) if positive else (0.01, 1.0)
    floor = 10 ** np.floor(np.log10(low) - 0.5)  # the bars rise from here; the axis starts below the smallest
    bars = ax.bar(x, [v - floor if v > 0 else 0.0 for v in values], 0.5, bottom=floor, color="tab:purple")
    ax.set_yscale("log")
    ax.set_ylim(floor, 10 ** (np.log10(high) + 0.6))  # room above the tallest bar for its label
    ax.bar_label(bars, labels=[_megabytes(v) for v in values], fontsize=8, padding=2)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MB (log scale)", fontsize=9)
    ax.set_title("stored per trained domain", fontsize=10)


def comparison_figure(rows: Sequence[Dict]):
    """The figure of :func:`draw_comparison` (left: AA, FM and the unseen domains' score with the
    vanilla one, IoU; right: :func:`storage_panel`)."""
    plt = _pyplot()
    names = [r["run"] if len(r["run"]) <= 28 else r["run"][:25] + "..." for r in rows]
    x = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(rows) + 4), 3.8))
    for k, (key, label) in enumerate(BARS):
        a.bar(x + (k - 1.5) * 0.2, [r.get(key) or 0 for r in rows], 0.2, label=label)
    a.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    a.axhline(0, color="grey", lw=0.5)
    a.legend(fontsize=8)
    a.set_title("after the last step", fontsize=10)
    storage_panel(b, names, [r["stored_mb_per_domain"] for r in rows])
    return fig


def draw_comparison(rows: Sequence[Dict], path: Path) -> Path:
    """The comparison of ``python -m samcl.compare``: AA, FM and the unseen score (IoU) per run as bars, and the
    storage per domain on a log scale."""
    return _save(comparison_figure(rows), path)


def draw_sweep(rows: Sequence[Dict], matrices: Dict[str, Tuple[str, Dict]], path: Path, title: str = "") -> Path:
    """``summary.png`` of ``python -m samcl.sweep``: AA, FM and the unseen domains' score with the
    vanilla one (IoU) per method as bars with the
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

    for k, (key, label) in enumerate(BARS):
        mean, std = values(key)
        bars.bar(x + (k - 1.5) * 0.2, mean, 0.2, yerr=std, capsize=3, label=label)
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
