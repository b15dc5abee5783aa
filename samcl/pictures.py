"""Pictures of results: a mask and its prompt points drawn over the image, with a caption."""
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

PREDICTION = (255, 64, 32)  # the predicted mask's colour (RGB)
TRUTH = (40, 220, 90)  # the ground truth's outline
POSITIVE, NEGATIVE = (255, 230, 0), (0, 160, 255)  # foreground / background points
ALPHA = 0.45


def overlay(image: np.ndarray, mask: np.ndarray, points: Optional[np.ndarray] = None,
            labels: Optional[Sequence[int]] = None, caption: str = "", truth: Optional[np.ndarray] = None) -> Image.Image:
    """The image (H, W, 3 uint8) with ``mask`` (H, W bool) tinted, the ``truth`` mask's outline,
    the points ((P, 2) x, y in pixels; labels 1 yellow, 0 blue) and a caption strip below."""
    h, w = image.shape[:2]
    out = image.astype(np.float32).copy()
    m = np.asarray(mask, dtype=bool)
    out[m] = (1 - ALPHA) * out[m] + ALPHA * np.array(PREDICTION, np.float32)
    if truth is not None:
        t = np.asarray(truth, dtype=bool)
        edge = t & ~(np.roll(t, 1, 0) & np.roll(t, -1, 0) & np.roll(t, 1, 1) & np.roll(t, -1, 1))
        out[edge] = TRUTH
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    radius = max(3, round(min(h, w) / 80))
    for k, (x, y) in enumerate(np.asarray(points if points is not None else np.zeros((0, 2))).reshape(-1, 2)):
        colour = POSITIVE if labels is None or int(labels[k]) == 1 else NEGATIVE
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(0, 0, 0))
    if not caption:
        return picture
    strip = Image.new("RGB", (w, 22), (20, 20, 20))
    ImageDraw.Draw(strip).text((6, 5), caption, fill=(240, 240, 240))
    framed = Image.new("RGB", (w, h + strip.height))
    framed.paste(picture, (0, 0))
    framed.paste(strip, (0, h))
    return framed
