"""Segmentation metrics and the continual-learning accuracy matrix."""
import math
from typing import Any, Dict, List, Optional, Sequence

import torch

from .losses import binary_iou

METRICS = ("iou", "f1", "mae")
LOWER_IS_BETTER = ("mae",)  # forgetting and transfer of these are taken with the sign turned


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
    """A[t][j]: metrics on test domain j after training step t (row t measures j <= t + 1), the
    vanilla (zero-shot, no module) score Z[j] of each test domain, and the summary of every step.

    The release's summary (``AA``, ``FM``, ``FT``), with L = t (t - 1 when domain t is a test-only
    unseen domain), as the release computes it for every metric:
    AA = mean_{j<=L} A[t][j]; FM = mean_{j<=L} (A[j][j] - A[t][j]); FT = mean_{j<L} A[j][j+1].

    The canonical summary over the same matrix, with ``learned`` the trained domains j <= t and
    ``earlier`` all of them but the last (s = +1, for MAE s = -1, so that forgetting reads positive
    and transfer reads as a gain for every metric):
    FM_max = mean_{j in earlier} s * (best_{l in [j, t-1]} A[l][j] - A[t][j]), best = max (MAE: min)
    (Chaudhry et al. 2018); BWT = mean_{j in earlier} s * (A[t][j] - A[j][j]) (Lopez-Paz & Ranzato
    2017); FWT = mean_{j in learned, j >= 1} s * (A[j-1][j] - Z[j]); AIA = the mean of the release's
    AA over the trained steps, the current step's AA standing for the last one; unseen = mean of
    A[t][u] over the test-only domains u measured in row t, unseen_vanilla = mean of their Z[u].
    """

    def __init__(self, domains: Sequence[str], unseen: Sequence[str] = ()) -> None:
        self.domains = list(domains)
        self.unseen = set(unseen)
        self.cells: Dict[int, Dict[int, Dict[str, float]]] = {}
        self.vanilla: Dict[int, Dict[str, float]] = {}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "AccuracyMatrix":
        """The matrix of :meth:`to_dict`'s output (a metrics.json's ``accuracy_matrix``); one without
        vanilla scores (written before they were recorded) has none."""
        matrix = cls(d["domains"], d.get("unseen", ()))
        rows = {m: d["matrix"][m] for m in METRICS if m in d["matrix"]}
        steps = [s["step"] for s in d["summary"][METRICS[0]]] if d.get("summary") else range(len(rows["iou"]))
        for k, t in enumerate(steps):
            for j in range(len(matrix.domains)):
                values = {m: rows[m][k][j] for m in rows}
                if all(v is not None for v in values.values()):
                    matrix.set(t, j, values)
        for j, _ in enumerate(matrix.domains):
            z = {m: v[j] for m, v in d.get("vanilla", {}).items()}
            if z and all(v is not None for v in z.values()):
                matrix.set_vanilla(j, z)
        return matrix

    def set(self, t: int, j: int, values: Dict[str, float]) -> None:
        self.cells.setdefault(t, {})[j] = dict(values)

    def get(self, t: int, j: int, metric: str = "iou") -> Optional[float]:
        return self.cells.get(t, {}).get(j, {}).get(metric)

    def set_vanilla(self, j: int, values: Dict[str, float]) -> None:
        """Z[j]: test domain j with the frozen model, no module (the same after every step)."""
        self.vanilla[j] = dict(values)

    def get_vanilla(self, j: int, metric: str = "iou") -> Optional[float]:
        return self.vanilla.get(j, {}).get(metric)

    def last_learned(self, t: int) -> int:
        return t - 1 if self.domains[t] in self.unseen else t

    def summary(self, t: int, metric: str = "iou") -> Dict[str, Optional[float]]:
        """The release's AA/FM/FT and the canonical FM_max/BWT/FWT/AIA/unseen after step t."""
        return self.release_summary(t, metric) | self.canonical_summary(t, metric)

    def release_summary(self, t: int, metric: str = "iou") -> Dict[str, Optional[float]]:
        """AA, FM and FT as the release computes them (the same formula for every metric: for MAE,
        whose lower values are better, a rise of MAE gives a negative FM)."""
        big_l = self.last_learned(t)
        aa = _mean([self.get(t, j, metric) for j in range(big_l + 1)])
        fm = _mean([
            None if self.get(j, j, metric) is None or self.get(t, j, metric) is None
            else self.get(j, j, metric) - self.get(t, j, metric)
            for j in range(big_l + 1)
        ])
        ft = _mean([self.get(j, j + 1, metric) for j in range(big_l)])
        return {"AA": aa, "FM": fm, "FT": ft}

    def canonical_summary(self, t: int, metric: str = "iou") -> Dict[str, Optional[float]]:
        """FM_max, BWT, FWT, AIA, unseen and unseen_vanilla after step t (see the class)."""
        s = -1.0 if metric in LOWER_IS_BETTER else 1.0
        learned = [j for j in range(t + 1) if self.domains[j] not in self.unseen]
        earlier = learned[:-1]

        def diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
            return None if a is None or b is None else s * (a - b)

        def best(j: int) -> Optional[float]:
            past = [self.get(l, j, metric) for l in range(j, t)]
            return None if any(v is None for v in past) else max(past, key=lambda v: s * v)

        unseen = [j for j, d in enumerate(self.domains) if d in self.unseen and self.get(t, j, metric) is not None]
        aa = [self.release_summary(k, metric)["AA"] for k in earlier] + [self.release_summary(t, metric)["AA"]]
        return {
            "FM_max": _mean([diff(best(j), self.get(t, j, metric)) for j in earlier]),
            "BWT": _mean([diff(self.get(t, j, metric), self.get(j, j, metric)) for j in earlier]),
            "FWT": _mean([diff(self.get(j - 1, j, metric), self.get_vanilla(j, metric)) for j in learned if j >= 1]),
            "AIA": _mean(aa),
            "unseen": _mean([self.get(t, j, metric) for j in unseen]),
            "unseen_vanilla": _mean([self.get_vanilla(j, metric) for j in unseen]),
        }

    def to_dict(self) -> dict:
        steps = sorted(self.cells)
        n = len(self.domains)
        return {
            "domains": self.domains,
            "unseen": sorted(self.unseen),
            "matrix": {m: [[self.get(t, j, m) for j in range(n)] for t in steps] for m in METRICS},
            "vanilla": {m: [self.get_vanilla(j, m) for j in range(n)] for m in METRICS},
            "n_images": [[self.cells[t].get(j, {}).get("n") for j in range(n)] for t in steps],
            "summary": {m: [self.summary(t, m) | {"step": t} for t in steps] for m in METRICS},
        }


def _mean(values: List[Optional[float]]) -> Optional[float]:
    """The mean, or None if there is no value or one is missing (None or NaN)."""
    if not values or any(v is None or math.isnan(v) for v in values):
        return None
    return sum(values) / len(values)
