"""The generic machinery of training and evaluation, for every method and module.

Seeding, data loaders (seeded, sharded under torchrun, with data errors that read the same
with worker processes as without), progress bars, the training step's ``nn.Module`` that
DDP wraps, and the evaluation of a test split (every image once, also across ranks).
"""
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed as dist
from .backbones.base import Features
from .data import DataError, SegmentationSplit, collate, read_domain_map
from .metrics import METRICS, MetricAccumulator, per_image_metrics
from .model import SAMCLModel
from .precision import autocast
from .run_folder import RunFolderError
from .selector import EmbeddingBuffer

log = logging.getLogger("samcl.training")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@dataclass
class Batch:
    images: torch.Tensor  # (N, 3, S, S) float 0..255
    masks: torch.Tensor  # (N, 1, S, S) {0, 1}
    points: torch.Tensor  # (N, P, 2)
    labels: torch.Tensor  # (N, P)
    names: List[str]


def to_device(batch: dict, device: torch.device) -> Batch:
    nb = device.type == "cuda"
    return Batch(
        images=batch["image"].to(device, non_blocking=nb).float(),
        masks=batch["mask"].to(device, non_blocking=nb),
        points=batch["points"].to(device, non_blocking=nb),
        labels=batch["labels"].to(device, non_blocking=nb),
        names=batch["name"],
    )


def make_loader(ds: SegmentationSplit, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                device: torch.device) -> DataLoader:
    """Seeded loader; under torchrun each rank reads its share through a DistributedSampler
    (which pads the last share with repeats: evaluation removes them by dataset index).
    Workers are capped at the CPUs this process may use (shared among a machine's ranks)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    num_workers = min(num_workers, max(cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1))
    sampler = None
    if dist.is_distributed():
        sampler = DistributedSampler(ds, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=shuffle,
                                     seed=seed, drop_last=False)
    return _Loader(
        ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, num_workers=num_workers,
        collate_fn=collate, generator=torch.Generator().manual_seed(seed) if shuffle and sampler is None else None,
        # Not persistent: a persistent iterator skips the per-epoch seed draw from the loader's
        # generator, so the shuffle order of epochs 2.. would depend on num_workers.
        pin_memory=device.type == "cuda", persistent_workers=False,
    )


# what reading a sample raises for a bad file: with workers, re-raised with the worker's header
WORKER_DATA_ERRORS = (DataError, OSError)
_WORKER_HEADER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.")


def worker_message(e: BaseException) -> Optional[str]:
    """The original message of a data error re-raised from a DataLoader worker (whose message is
    "Caught X in DataLoader worker process N." plus the worker's traceback); None for any other."""
    text = str(e)
    if not isinstance(e, WORKER_DATA_ERRORS) or not _WORKER_HEADER.match(text):
        return None
    cls = type(e)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    at = text.rfind(f"\n{name}: ")
    return text[at + len(name) + 3:].strip() if at >= 0 else None


class _Loader(DataLoader):
    """A DataLoader whose data errors read the same with workers as without: the worker's
    header and traceback are dropped (the message names the file)."""

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except WORKER_DATA_ERRORS as e:
                message = worker_message(e)
                if message is None:
                    raise
                raise type(e)(message) from None
            yield batch


def set_epoch(loader: DataLoader, epoch: int) -> None:
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def progress(iterable=None, desc: str = "", **kw):
    """tqdm on rank 0's terminal, silent otherwise (logs carry the numbers); it vanishes when done
    unless ``leave=True``."""
    kw.setdefault("leave", False)
    kw.setdefault("disable", None if dist.is_main() else True)
    return tqdm(iterable, desc=desc, dynamic_ncols=True, **kw)


def image_progress(loader: DataLoader, desc: str, **kw):
    """Batches of ``loader`` with a bar that counts images (this process's share under torchrun)."""
    bar = progress(total=len(loader.sampler), desc=desc, unit="img", **kw)
    with bar:
        for batch in loader:
            yield batch
            bar.update(len(batch["name"]))


# (prefix, batch) -> (mask logits (N, 1, S, S), choice (N,): index into model.domains, -1 for none)
Segmenter = Callable[[Features, "Batch"], Tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def evaluate_split(model: SAMCLModel, loader: DataLoader, device: torch.device, segment: Segmenter, *,
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
        counts = torch.bincount(table[:, 1].long(), minlength=len(model.domains))
        out["selector_counts"] = {d: int(counts[k]) for k, d in enumerate(model.domains)}
    if with_vanilla:
        out["vanilla"] = _mean_metrics(table[:, 5:8])
    return out


def _mean_metrics(cols: torch.Tensor) -> Dict[str, float]:
    acc = MetricAccumulator()
    acc.update({m: cols[:, i] for i, m in enumerate(METRICS)})
    return acc.result()


def selector_accuracy(counts: Dict[str, int], true_domain: str) -> Optional[float]:
    """Share of a domain's test images routed to it; None if the selector does not know it yet."""
    total = sum(counts.values())
    if true_domain not in counts or total == 0:
        return None
    return counts[true_domain] / total


class SegmentStep(nn.Module):
    """The training forward of one domain as an nn.Module, so that DDP can wrap it
    (only the learning module's parameters require gradients)."""

    def __init__(self, backbone, module) -> None:
        super().__init__()
        self.backbone = backbone
        self.module = module

    def forward(self, prefix: Dict[str, torch.Tensor], heat: Optional[torch.Tensor], points: torch.Tensor,
                labels: torch.Tensor, images: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None,
                low_res: bool = False):
        """(logits (N, 1, S, S), or the decoder's (N, 1, 4G, 4G) with ``low_res``; IoU (N, 1))."""
        return self.module.segment(self.backbone, prefix, images, heat, points, labels, boxes=boxes, low_res=low_res)


def load_splits(cfg: Any, img_size: int, domains: Sequence[str], todo: Sequence[str], unseen: Sequence[str]
                ) -> Tuple[Dict[str, SegmentationSplit], Dict[str, SegmentationSplit]]:
    """Test splits of every domain of the order; train splits only of the domains still to learn
    (``todo``). Data errors come here, before any file is made."""
    root = Path(cfg.data_root)
    train_map = read_domain_map(Path(cfg.train_json), root) if todo else {}
    test_map = read_domain_map(Path(cfg.test_json), root)
    missing = [f"{d} (in train map)" for d in todo if d not in train_map]
    missing += [f"{d} (in test map)" for d in domains if d not in test_map]
    if missing:
        raise RunFolderError(f"--order names domains the JSON maps lack: {', '.join(missing)}; "
                             f"train map {cfg.train_json}, test map {cfg.test_json} under {root}")
    kw = dict(img_size=img_size, mask_binarize=cfg.mask_binarize, mask_threshold=cfg.mask_threshold)
    train = {d: SegmentationSplit(train_map[d], domain=d, **kw) for d in todo}
    test = {d: SegmentationSplit(test_map[d], domain=d, **kw) for d in domains}
    for d in domains:
        log.info("domain %-10s train %s  test %5d images (%s)%s", d,
                 f"{len(train[d]):5d} images ({train_map[d]})" if d in train else "(done: buffer only)",
                 len(test[d]), test_map[d], "  [unseen: no module]" if d in unseen else "")
    return train, test


def routed(model: SAMCLModel) -> Segmenter:
    """Segmenter of task-agnostic routing: each image with the module of the domain the selector picks."""
    def segment(prefix: Features, b: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        choice = model.route(prefix)
        logits, _ = model.segment_routed(prefix, choice, b.points, b.labels, images=b.images)
        return logits, choice
    return segment


def with_module(model: SAMCLModel, module: nn.Module) -> Segmenter:
    """Segmenter of every image with ``module`` (no routing; choice -1), e.g. to validate it."""
    def segment(prefix: Features, b: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, _ = model.segment_one(module, prefix, b.points, b.labels, images=b.images)
        return logits, torch.full((len(b.names),), -1, device=logits.device)
    return segment


@torch.no_grad()
def buffer_batch(backbone: nn.Module, buffer: EmbeddingBuffer, domain: str, prefix: Features,
                 index: torch.Tensor) -> None:
    """Add a batch's selector embeddings (of every rank, in rank order) to the buffer."""
    emb = backbone.selector_embedding(prefix)
    buffer.add(domain, dist.all_gather_tensor(emb), dist.all_gather_tensor(index.to(emb.device)))


@torch.no_grad()
def collect_embeddings(backbone: nn.Module, buffer: EmbeddingBuffer, domain: str, loader: DataLoader,
                       device: torch.device) -> None:
    """Buffer for a domain that trains no module: the prefix of its first training images."""
    backbone.eval()
    for raw in progress(loader, f"{domain} embeddings"):
        if buffer.missing(domain) <= 0:
            break
        b = to_device(raw, device)
        buffer_batch(backbone, buffer, domain, backbone.encode_prefix(b.images), raw["index"])
    log.info("%s: %d embeddings buffered (no module: routed images use vanilla %s)", domain,
             buffer.store[domain].shape[0], backbone.family.upper())
