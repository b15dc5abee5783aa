"""Segmentation metrics and the continual-learning accuracy matrix."""
import math
from typing import Dict, List, Optional, Sequence

import torch

from .losses import binary_iou

METRICS = ("iou", "f1", "mae")


def per_image_metrics(logits: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
    """IoU, F1 and MAE per image with P = sigmoid(logits) >= 0.5.

    Args:
        logits, target: (N, 1, H, W); target in {0, 1}.
    Returns:
        {"iou": (N,), "f1": (N,), "mae": (N,)}; IoU and F1 are 1.0 where P and G are both empty.
    """
    p = (torch.sigmoid(logits.float()) >= 0.5).flatten(1).float()
    g = target.flatten(1).float()
    inter = (p * g).sum(1)
    total = p.sum(1) + g.sum(1)
    f1 = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    return {"iou": binary_iou(p, g), "f1": f1, "mae": (p - g).abs().mean(1)}


class MetricAccumulator:
    """Running per-image sums of one domain's metrics."""

    def __init__(self) -> None:
        self.sums = {m: 0.0 for m in METRICS}
        self.count = 0

    def update(self, values: Dict[str, torch.Tensor]) -> None:
        for m in METRICS:
            self.sums[m] += float(values[m].double().sum())
        self.count += int(values[METRICS[0]].numel())

    def result(self) -> Dict[str, float]:
        if self.count == 0:
            return {m: float("nan") for m in METRICS} | {"n": 0}
        return {m: self.sums[m] / self.count for m in METRICS} | {"n": self.count}


class AccuracyMatrix:
    """A[t][j]: metrics on test domain j after training step t, and AA/FM/FT per step.

    With L = t (t - 1 when domain t is a test-only unseen domain):
    AA = mean_{j<=L} A[t][j]; FM = mean_{j<=L} (A[j][j] - A[t][j]); FT = mean_{j<L} A[j][j+1].
    """

    def __init__(self, domains: Sequence[str], unseen: Sequence[str] = ()) -> None:
        self.domains = list(domains)
        self.unseen = set(unseen)
        self.cells: Dict[int, Dict[int, Dict[str, float]]] = {}

    def set(self, t: int, j: int, values: Dict[str, float]) -> None:
        self.cells.setdefault(t, {})[j] = dict(values)

    def get(self, t: int, j: int, metric: str = "iou") -> Optional[float]:
        return self.cells.get(t, {}).get(j, {}).get(metric)

    def last_learned(self, t: int) -> int:
        return t - 1 if self.domains[t] in self.unseen else t

    def summary(self, t: int, metric: str = "iou") -> Dict[str, Optional[float]]:
        big_l = self.last_learned(t)

        def mean(values: List[Optional[float]]) -> Optional[float]:
            if not values or any(v is None or math.isnan(v) for v in values):
                return None
            return sum(values) / len(values)

        aa = mean([self.get(t, j, metric) for j in range(big_l + 1)])
        fm = mean([
            None if self.get(j, j, metric) is None or self.get(t, j, metric) is None
            else self.get(j, j, metric) - self.get(t, j, metric)
            for j in range(big_l + 1)
        ])
        ft = mean([self.get(j, j + 1, metric) for j in range(big_l)])
        return {"AA": aa, "FM": fm, "FT": ft}

    def to_dict(self) -> dict:
        steps = sorted(self.cells)
        return {
            "domains": self.domains,
            "unseen": sorted(self.unseen),
            "matrix": {
                m: [[self.get(t, j, m) for j in range(len(self.domains))] for t in steps] for m in METRICS
            },
            "n_images": [[self.cells[t].get(j, {}).get("n") for j in range(len(self.domains))] for t in steps],
            "summary": {m: [self.summary(t, m) | {"step": t} for t in steps] for m in METRICS},
        }
