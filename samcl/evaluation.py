"""Evaluation of a test split (every image once, also across ranks) with a segmenter: task-agnostic
routing through the Module Selector, or one module for every image."""
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as dist
from .backbones.base import Features
from .loading import Batch, image_progress, to_device
from .metrics import METRICS, MetricAccumulator, per_image_metrics
from .model import ModuleBank
from .precision import autocast

# (prefix, batch) -> (mask logits (N, 1, S, S), choice (N,): index into model.domains, -1 for none)
Segmenter = Callable[[Features, Batch], Tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def evaluate_split(model: ModuleBank, loader: DataLoader, device: torch.device, segment: Segmenter, *,
                   routed: bool = True, modules: Tuple[nn.Module, ...] = (), with_vanilla: bool = False,
                   desc: str = "eval", amp: str = "off") -> Dict:
    """Metrics of one test split through ``segment``, every image counted once (also across ranks).

    routed=True: ``segment`` chooses a domain per image (task-agnostic) and the counts of its
    choices are reported. ``modules``: modules outside the model's bank that ``segment`` uses
    (put in eval mode with the backbone and the bank). with_vanilla adds a vanilla pass over the
    same frozen prefix. amp="bf16" runs the inference under bfloat16 autocast (metrics from the
    float32-cast logits). Per-image results stay on the device until the split is done.
    """
    # eval mode for the backbone and every module involved (CAD's adapter has BatchNorm)
    parts = [model.backbone, *modules, *model.modules_by_domain.values()]
    modes = [(m, m.training) for m in parts]
    for m in parts:
        m.eval()
    rows = []  # per image: dataset index, choice, iou, f1, mae (, vanilla iou, f1, mae)
    for raw in image_progress(loader, desc):
        b = to_device(raw, device)
        with autocast(amp, device):
            prefix = model.backbone.encode_prefix(b.images)
            logits, choice = segment(prefix, b)
            vanilla_logits = model.segment_vanilla(prefix, b.points, b.labels)[0] if with_vanilla else None
        cols = [raw["index"].to(device).double(), choice.double()]
        cols += [v.double() for v in per_image_metrics(logits.float(), b.masks).values()]
        if with_vanilla:
            cols += [v.double() for v in per_image_metrics(vanilla_logits.float(), b.masks).values()]
        rows.append(torch.stack(cols, 1))
    for m, mode in modes:
        m.train(mode)
    table = torch.cat([t for t in dist.all_gather_objects(torch.cat(rows).cpu()) if t.numel()])
    _, first = np.unique(table[:, 0].numpy(), return_index=True)  # padding repeats counted once
    table = table[torch.from_numpy(first)]
    out: Dict = {"metrics": _mean_metrics(table[:, 2:5])}
    if routed:
        choice = table[:, 1].long()
        counts = torch.bincount(choice[choice >= 0], minlength=len(model.domains))  # -1 (vanilla) not counted
        out["selector_counts"] = {d: int(counts[k]) for k, d in enumerate(model.domains)}
        if model.selector is not None and model.selector.num_domains > len(model.domains):
            # selector_head full: images sent to a domain not trained yet (segmented by the frozen model)
            out["selector_untrained"] = int((choice < 0).sum())
    if with_vanilla:
        out["vanilla"] = _mean_metrics(table[:, 5:8])
    return out


def _mean_metrics(cols: torch.Tensor) -> Dict[str, float]:
    acc = MetricAccumulator()
    acc.update({m: cols[:, i] for i, m in enumerate(METRICS)})
    return acc.result()


def selector_accuracy(counts: Dict[str, int], true_domain: str, untrained: int = 0) -> Optional[float]:
    """Share of a domain's test images routed to it (``untrained``: those sent to a domain not
    trained yet, counted wrong); None if the selector does not know it yet."""
    total = sum(counts.values()) + untrained
    if true_domain not in counts or total == 0:
        return None
    return counts[true_domain] / total


def routed(model: ModuleBank) -> Segmenter:
    """Segmenter of task-agnostic routing: each image with the module of the domain the selector picks."""
    def segment(prefix: Features, b: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        choice = model.route(prefix)
        logits, _ = model.segment_routed(prefix, choice, b.points, b.labels, images=b.images)
        return logits, choice
    return segment


def with_module(model: ModuleBank, module: nn.Module) -> Segmenter:
    """Segmenter of every image with ``module`` (no routing; choice -1), e.g. to validate it."""
    def segment(prefix: Features, b: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, _ = model.segment_one(module, prefix, b.points, b.labels, images=b.images)
        return logits, torch.full((len(b.names),), -1, device=logits.device)
    return segment
