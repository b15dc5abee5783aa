"""Loading the data for training and evaluation, for every method and module.

Seeding, the batch the methods see (:class:`Batch`), data loaders (seeded, sharded under
torchrun, with data errors that read the same with worker processes as without), the
splits of a run, and progress bars.
"""
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed as dist
from .data import DataError, SegmentationSplit, SplitPart, collate, domain_map_file, hold_out, read_domain_map
from .run_folder import RunFolderError

log = logging.getLogger("samcl.loading")


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
    domains: List[str] = field(default_factory=list)  # each image's true domain (its test split's key)


def to_device(batch: dict, device: torch.device) -> Batch:
    nb = device.type == "cuda"
    return Batch(
        images=batch["image"].to(device, non_blocking=nb).float(),
        masks=batch["mask"].to(device, non_blocking=nb),
        points=batch["points"].to(device, non_blocking=nb),
        labels=batch["labels"].to(device, non_blocking=nb),
        names=batch["name"],
        domains=list(batch.get("domain", [])),
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



def load_splits(cfg: Any, img_size: int, domains: Sequence[str], todo: Sequence[str], unseen: Sequence[str]
                ) -> Tuple[Dict[str, SegmentationSplit], Dict[str, SegmentationSplit]]:
    """Test splits of every domain of the order; train splits only of the domains still to learn
    (``todo``). Data errors come here, before any file is made."""
    root = Path(cfg.data_root)
    train_map = read_domain_map(Path(cfg.train_json), root) if todo or cfg.val_fraction > 0 else {}
    test_map = read_domain_map(Path(cfg.test_json), root)
    missing = [f"{d} (in train map)" for d in (domains if cfg.val_fraction > 0 else todo) if d not in train_map]
    missing += [f"{d} (in test map)" for d in domains if d not in test_map]
    if missing:
        raise RunFolderError(f"--order names domains the JSON maps lack: {', '.join(missing)}; "
                             f"train map {domain_map_file(cfg.train_json, root)}, test map "
                             f"{domain_map_file(cfg.test_json, root)}")
    kw = dict(img_size=img_size, mask_binarize=cfg.mask_binarize, mask_threshold=cfg.mask_threshold)
    # a held-out validation part is drawn from every domain's training split, finished ones too
    train = {d: SegmentationSplit(train_map[d], domain=d, **kw) for d in (domains if cfg.val_fraction > 0 else todo)}
    test = {d: SegmentationSplit(test_map[d], domain=d, **kw) for d in domains}
    for d in domains:
        log.info("domain %-10s train %s  test %5d images (%s)%s", d,
                 f"{len(train[d]):5d} images ({train_map[d]})" if d in train else "(done: buffer only)",
                 len(test[d]), test_map[d], "  [unseen: no module]" if d in unseen else "")
    return train, test


def held_out_parts(cfg: Any, train: Dict[str, SegmentationSplit]) -> Tuple[Dict[str, Any], Dict[str, SplitPart]]:
    """(what trains, what validates) of each domain's training split: with ``cfg.val_fraction`` > 0 the
    kept and the held-out parts (:func:`samcl.data.hold_out`, drawn from ``cfg.seed``); else the
    splits as they are and no validation part."""
    if cfg.val_fraction <= 0:
        return train, {}
    kept, held = {}, {}
    for d, split in train.items():
        keep, val = hold_out(len(split), cfg.val_fraction, cfg.seed, d)
        kept[d], held[d] = SplitPart(split, keep), SplitPart(split, val)
        log.info("domain %-10s validation: %d of its %d training images held out (val_fraction %g, seed %d)", d,
                 len(val), len(split), cfg.val_fraction, cfg.seed)
    return kept, held
