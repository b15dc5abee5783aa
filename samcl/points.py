"""Static prompt points: what ``generate_point.py`` writes.

For each mask: resize to 1024 x 1024 (nearest), binarise, draw ``n`` foreground
pixels uniformly *with replacement*, shuffle, store ``[[x, y], ...]`` with label
1. A mask with no foreground gets ``n`` pixels drawn uniformly over the whole
frame with label 0 (negative points: "nothing here"); its name is reported.
Every file's draw is seeded by (seed, file name), so the result does not depend
on the order or the subset of files processed.
"""
import json
import logging
import zlib
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from .data import POINTS_FILE, POINTS_FRAME, load_mask, pair_split
from .io import atomic_write_text

log = logging.getLogger(__name__)


def sample_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> Tuple[List[List[float]], List[int]]:
    """(points, labels) for a {0,1} mask whose rows are y and columns x."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        h, w = mask.shape
        flat = rng.integers(0, h * w, size=n)
        return [[float(f % w), float(f // w)] for f in flat], [0] * n
    idx = rng.permutation(rng.integers(0, len(xs), size=n))
    return [[float(xs[i]), float(ys[i])] for i in idx], [1] * n


def file_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def generate_split_points(split_dir: Path, n: int = 3, seed: int = 1234, rule: str = "threshold",
                          threshold: int = 128) -> Tuple[Dict[str, list], List[str]]:
    """Write ``<split>/masks/points.json``; return the entries and the names of empty masks."""
    entries: Dict[str, list] = {}
    empty: List[str] = []
    for _img, mask_path in pair_split(split_dir):
        mask = load_mask(mask_path, POINTS_FRAME, rule, threshold)
        pts, labels = sample_points(mask, n, file_rng(seed, mask_path.name))
        if labels[0] == 0:
            empty.append(mask_path.name)
            log.warning("%s has no foreground: wrote %d negative points (label 0) spread over the image",
                        mask_path, n)
        entries[mask_path.name] = [pts, labels]
    atomic_write_text(Path(split_dir) / "masks" / POINTS_FILE, json.dumps(entries))
    return entries, empty
