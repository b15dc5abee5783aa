"""The continual protocol: one loop for every backbone.

For step t over the order: fill the buffer with domain t's embeddings, train its
learning module (SAMCL's AugModule, or CAD's adapter + decoder; not for an unseen,
test-only domain), save it, grow and retrain the selector on the buffer, evaluate on
domains 0..min(T-1, t+1) with task-agnostic routing, and update ``metrics.json``.
"""
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed as dist
from .bounded import check_torch_file
from .config import Config
from .data import DataError, SegmentationSplit, collate, read_domain_map
from .losses import training_loss
from .metrics import METRICS, AccuracyMatrix, MetricAccumulator, per_image_metrics
from .model import SAMCLModel
from .run_folder import (MANIFEST, METRICS_FILE, PARTIAL_DIR, SELECTOR_FILE, RunFolderError, backbone_identity,
                         buffer_part, load_module, load_selector, module_path, package_versions, read_manifest,
                         save_module, save_selector, selector_snapshot, sha256_file, verify_files, write_config,
                         write_json)
from .io import atomic_torch_save
from .feature_cache import PrefixCache
from .precision import amp_forward, autocast, check_amp
from .selector import EmbeddingBuffer, ModuleSelector, train_selector

# Settings a resume may change; every other setting is the run's own.
RESUMABLE_SETTINGS = ("order", "unseen", "data_root", "train_json", "test_json", "num_workers", "eval_batch_size",
                      "ckpt", "run_dir", "output_dir", "feature_cache", "cache_budget_gb")

log = logging.getLogger("samcl.continual")


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


class SegmentStep(nn.Module):
    """The training forward of one domain as an nn.Module, so that DDP can wrap it
    (only the learning module's parameters require gradients)."""

    def __init__(self, backbone, module) -> None:
        super().__init__()
        self.backbone = backbone
        self.module = module

    def forward(self, prefix: Dict[str, torch.Tensor], heat: Optional[torch.Tensor], points: torch.Tensor,
                labels: torch.Tensor, images: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None):
        return self.module.segment(self.backbone, prefix, images, heat, points, labels, boxes=boxes)


def make_optimizer(cfg: Config, module: nn.Module) -> torch.optim.Optimizer:
    """Adam (SAMCL) or AdamW (CAD) over the module's trainable parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate_split(model: SAMCLModel, loader: DataLoader, device: torch.device, *, routed: bool = True,
                   module=None, with_vanilla: bool = False, desc: str = "eval", amp: str = "off") -> Dict:
    """Metrics of one test split, every image counted once (also across ranks).

    routed=True: every image goes through the selector (task-agnostic); otherwise
    all images use ``module`` (None: vanilla). with_vanilla adds a vanilla pass
    over the same frozen prefix. amp="bf16" runs the inference under bfloat16
    autocast (CUDA; metrics from the float32-cast logits). Per-image results stay
    on the device until the split is done (no host round trip per batch).
    """
    # eval mode for the backbone and every module involved (CAD's adapter has BatchNorm)
    parts = [m for m in (model.backbone, module, *model.modules_by_domain.values()) if m is not None]
    modes = [(m, m.training) for m in parts]
    for m in parts:
        m.eval()
    rows = []  # per image: dataset index, choice, iou, f1, mae (, vanilla iou, f1, mae)
    for raw in image_progress(loader, desc):
        b = to_device(raw, device)
        with autocast(amp, device):
            prefix = model.backbone.encode_prefix(b.images)
            if routed:
                choice = model.route(prefix)
                logits, _ = model.segment_routed(prefix, choice, b.points, b.labels, images=b.images)
            else:
                choice = torch.full((len(b.names),), -1, device=device)
                logits, _ = model.segment_one(module, prefix, b.points, b.labels, images=b.images)
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


class ContinualTrainer:
    """Runs the protocol for ``cfg`` on ``model`` and writes the run folder."""

    def __init__(self, cfg: Config, model: SAMCLModel, device: torch.device, run_dir: Path,
                 overwrite: bool = False, resume: bool = False, checkpoint: Optional[Dict] = None) -> None:
        check_amp(cfg.amp, device)  # --amp bf16 only on CUDA, before any file is made
        self.cfg = cfg
        self.cache_stats: Dict = {}  # the last domain's feature-cache statistics
        self.model = model
        self.device = device
        self.run_dir = Path(run_dir)
        self.domains = cfg.domains
        self.unseen = [d for d in self.domains if d in set(cfg.unseen)]
        self.checkpoint = checkpoint or {}
        self.buffer = EmbeddingBuffer(cfg.num_embedding)
        self.matrix = AccuracyMatrix(self.domains, self.unseen)
        self.steps: List[Dict] = []
        self.run_bar = tqdm(disable=True)  # the whole run's bar, made by run()
        self.checksums: Dict[str, str] = {}
        self.completed: List[str] = []
        if resume:
            self._restore()
        self.train_sets, self.test_sets = self._load_data()  # data errors come before any file is made
        if not resume:
            self._prepare_folder(overwrite)

    # ------------------------------------------------------------ setup
    def _prepare_folder(self, overwrite: bool) -> None:
        exists = (self.run_dir / MANIFEST).exists()
        dist.barrier()  # every rank has looked before rank 0 may replace it
        if exists and not overwrite:
            raise RunFolderError(
                f"run folder {self.run_dir} already holds a run; pass --overwrite to replace it "
                f"or --run_dir for a new folder, or --resume it")
        if dist.is_main():
            if exists:
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()

    def identity(self) -> Dict:
        """What a resume must find unchanged: module type, backbone, its weights, the module spec."""
        return {"module": self.cfg.module, "backbone": backbone_identity(self.model.backbone),
                "checkpoint": self.checkpoint, "spec": self.model.spec.to_dict()}

    def _restore(self) -> None:
        """Pick up a run folder: check it is the same setup, verify finished files, reload them."""
        manifest = read_manifest(self.run_dir)
        old = {k: manifest.get(k) for k in ("module", "backbone", "checkpoint", "spec")}
        new = json.loads(json.dumps(self.identity()))
        diff = [f"{k}: run has {old[k]}, now {new[k]}" for k in new if old[k] != new[k]]
        if diff:
            raise RunFolderError(f"cannot resume {self.run_dir} with another setup ({'; '.join(diff)}); "
                                 f"resume with the run's backbone, checkpoint and module, or start a new run folder")
        old_order = manifest["order"]
        if self.domains[: len(old_order)] != old_order:
            raise RunFolderError(f"--order {self.cfg.order} must start with the run's order {'_'.join(old_order)} "
                                 f"(new domains are added at the end)")
        self.completed = list(manifest["completed"])
        self.checksums = dict(manifest.get("files", {}))
        finished = [f for d in self.completed for f in self._step_files(d)]
        verify_files(self.run_dir, self.checksums, finished)
        for d in self.completed:
            self.buffer.load_part(self.run_dir / buffer_part(d), d)
            module = None if d in self.unseen else load_module(module_path(self.run_dir, d), self.model.backbone,
                                                               self.model.kind)
            self.model.add_domain(d, module)
        if self.completed:
            selector, domains = load_selector(self.run_dir / selector_snapshot(self.completed[-1]))
            assert domains == self.completed
            self.model.selector = selector.to(self.device)
        self.steps = self._restore_steps()
        for partial in sorted((self.run_dir / PARTIAL_DIR).glob("*.pt")):  # read by _load_partial later
            try:
                check_torch_file(partial, "partial-domain file", RunFolderError)
            except RunFolderError as e:
                raise RunFolderError(f"{e}; delete it to train {partial.stem} from its first epoch") from None
        for step in self.steps:
            for d, res in step["evaluation"].items():
                self.matrix.set(step["step"], self.domains.index(d), res["metrics"])
        log.info("resuming %s: done %s; to do %s", self.run_dir, self.completed or "nothing",
                 [d for d in self.domains if d not in self.completed])

    def _restore_steps(self) -> List[Dict]:
        """The finished steps of metrics.json, checked against the checksum run.json records. A run
        stopped between writing metrics.json and run.json (the commit) leaves exactly one step more
        than run.json's; that file is used for its finished steps, with a warning."""
        path = self.run_dir / METRICS_FILE
        if not path.is_file():
            if self.completed and METRICS_FILE in self.checksums:
                verify_files(self.run_dir, self.checksums, [METRICS_FILE])  # names it missing
            return []
        try:
            steps = json.loads(path.read_text()).get("steps")
            if not isinstance(steps, list):
                raise ValueError("no list of steps")
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            raise RunFolderError(f"{path} is corrupt ({e}); restore it from a copy. Nothing was changed.") from None
        recorded = self.checksums.get(METRICS_FILE)
        if recorded is not None and sha256_file(path) != recorded:
            nxt = [d for d in self.domains if d not in self.completed][:1]
            if len(steps) == len(self.completed) + 1 and [steps[-1].get("domain")] == nxt:
                log.warning("%s is one step ahead of %s (the run stopped while committing %s); its first %d "
                            "step(s) are used", path, MANIFEST, nxt[0], len(self.completed))
            else:
                verify_files(self.run_dir, self.checksums, [METRICS_FILE])  # names the mismatch, changes nothing
        return steps[: len(self.completed)]

    def _step_files(self, domain: str) -> List[str]:
        files = [buffer_part(domain), selector_snapshot(domain)]
        return files if domain in self.unseen else [module_path(self.run_dir, domain).name] + files

    def _load_data(self):
        """Test splits of every domain; train splits only of the domains still to learn."""
        cfg, root = self.cfg, Path(self.cfg.data_root)
        todo = [d for d in self.domains if d not in self.completed]
        train_map = read_domain_map(Path(cfg.train_json), root) if todo else {}
        test_map = read_domain_map(Path(cfg.test_json), root)
        missing = [f"{d} (in train map)" for d in todo if d not in train_map]
        missing += [f"{d} (in test map)" for d in self.domains if d not in test_map]
        if missing:
            raise RunFolderError(f"--order names domains the JSON maps lack: {', '.join(missing)}; "
                                 f"train map {cfg.train_json}, test map {cfg.test_json} under {root}")
        size = self.model.backbone.img_size
        kw = dict(img_size=size, mask_binarize=cfg.mask_binarize, mask_threshold=cfg.mask_threshold)
        train = {d: SegmentationSplit(train_map[d], domain=d, **kw) for d in todo}
        test = {d: SegmentationSplit(test_map[d], domain=d, **kw) for d in self.domains}
        for d in self.domains:
            log.info("domain %-10s train %s  test %5d images (%s)%s", d,
                     f"{len(train[d]):5d} images ({train_map[d]})" if d in train else "(done: buffer only)",
                     len(test[d]), test_map[d], "  [unseen: no module]" if d in self.unseen else "")
        return train, test

    # ------------------------------------------------------------ protocol
    def run(self) -> Dict:
        cfg = self.cfg
        if dist.is_main():
            self._write_manifest()
            write_config(self.run_dir, cfg.to_dict())
        log.info(self.model.describe_module())
        self._measure_added_domain()
        todo = [d for d in self.domains if d not in self.completed]
        # the whole run at a glance (domain t of T, epochs done, time left), above the epoch's own bar
        self.run_bar = progress(total=cfg.epoch * sum(d not in self.unseen for d in todo), desc="run", unit="epoch",
                                leave=True, position=0)
        for t, domain in enumerate(self.domains):
            if domain in self.completed:
                continue
            self.run_bar.set_description(f"run: domain {t + 1}/{len(self.domains)} {domain}")
            step_start = time.time()
            log.info("=== step %d/%d: %s ===", t + 1, len(self.domains), domain)
            loader = make_loader(self.train_sets[domain], cfg.batch_size, True, cfg.seed + t, cfg.num_workers,
                                 self.device)
            step: Dict = {"step": t, "domain": domain, "trained": domain not in self.unseen}
            if domain in self.unseen:
                self._collect_embeddings(domain, loader)
                self.model.add_domain(domain, None)
            else:
                module = self.initial_module(t)
                step["training"] = self._train_module(domain, module, loader)
                if dist.is_main():
                    save_module(module, self.model.backbone, domain, module_path(self.run_dir, domain))
                self.model.add_domain(domain, module)
            if dist.is_main():
                self.buffer.save_part(self.run_dir / buffer_part(domain), domain)
            step["buffer"] = {d: int(e.shape[0]) for d, e in self.buffer.store.items()}
            step["selector_loss"] = self._fit_selector(t)
            step["evaluation"] = self._evaluate(t)
            step["summary"] = {m: self.matrix.summary(t, m) for m in METRICS}
            step["seconds"] = round(time.time() - step_start, 2)
            self.steps.append(step)
            self._log_step(t)
            self._commit(domain)
        self.run_bar.close()
        return self.metrics()

    def initial_module(self, t: int) -> nn.Module:
        """A fresh module for step t. module_init "shared" (the release: one module built once and
        copied for every domain) draws it from the same seed at every step, so every domain starts
        from identical parameters; "per_domain" draws it from seed + t."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + (t if self.cfg.module_init == "per_domain" else 0))
            return self.model.new_module()

    def _commit(self, domain: str) -> None:
        """Record the step: metrics.json, then run.json with the checksums (the commit point)."""
        self.completed.append(domain)
        if not dist.is_main():
            return
        self._write_metrics()
        for rel in self._step_files(domain) + [SELECTOR_FILE, METRICS_FILE]:
            self.checksums[rel] = sha256_file(self.run_dir / rel)
        self._write_manifest()
        partial = self._partial_path(domain)
        if partial.exists():
            partial.unlink()
        if partial.parent.is_dir() and not any(partial.parent.iterdir()):
            partial.parent.rmdir()  # a finished run folder keeps no empty partial/

    def _partial_path(self, domain: str) -> Path:
        return self.run_dir / PARTIAL_DIR / f"{domain}.pt"

    def _save_partial(self, domain: str, module: nn.Module, opt, sched, loader: DataLoader, epoch: int,
                      history: Dict) -> None:
        if not dist.is_main():
            return
        atomic_torch_save({"epoch": epoch, "module": module.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "history": history,
                           "generator": None if loader.generator is None else loader.generator.get_state(),
                           "buffer": self.buffer.store.get(domain), "buffer_index": self.buffer.seen.get(domain),
                           "world_size": dist.world_size()},
                          self._partial_path(domain))

    def _load_partial(self, domain: str, module: nn.Module, opt, sched, loader: DataLoader) -> Optional[Dict]:
        path = self._partial_path(domain)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            log.warning("%s is unreadable (%s): %s starts over", path, str(e).splitlines()[0], domain)
            return None
        if state["world_size"] != dist.world_size():
            log.warning("%s was saved by %d process(es), this run has %d: %s starts over", path,
                        state["world_size"], dist.world_size(), domain)
            return None
        module.load_state_dict(state["module"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if loader.generator is not None:
            loader.generator.set_state(state["generator"])
        if state["buffer"] is not None:
            self.buffer.store[domain] = state["buffer"]
            self.buffer.seen[domain] = state["buffer_index"]
        log.info("%s: resuming after epoch %d (from %s)", domain, state["epoch"] + 1, path)
        return state

    def _train_module(self, domain: str, module: nn.Module, loader: DataLoader) -> Dict:
        cfg, model = self.cfg, self.model
        opt = make_optimizer(cfg, module)
        t_max = cfg.epoch if cfg.scheduler == "reference" else cfg.epoch * len(loader)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=1e-7)
        history: Dict[str, list] = {"epoch_loss": [], "lr_end": [], "validation": []}
        partial = self._load_partial(domain, module, opt, sched, loader)
        first = 0
        if partial is not None:
            history, first = partial["history"], partial["epoch"] + 1
        val_loader = None
        step = SegmentStep(model.backbone, module)
        if dist.is_distributed():
            step = DistributedDataParallel(step, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                           find_unused_parameters=module.has_unused_parameters)
        step = amp_forward(step, cfg.amp, self.device)  # --amp bf16: autocast forward, fp32 outputs and loss
        # the frozen features, once per image: the prefix, or (CAD) the whole frozen embedding too
        cache = PrefixCache.for_training(cfg, self.device, len(loader.dataset),
                                         encode=getattr(module, "frozen_features", None))
        # The release sets train mode once per domain; its validation switches to eval mode and
        # never back, so every epoch after the first validation trains in eval mode (train_mode
        # "reference"). Only SAM 2's decoder behaves differently (mask choice by stability).
        backbone_training = cfg.train_mode == "every_epoch" or not history["validation"]
        self.run_bar.update(first)  # epochs done before a resume
        for epoch in range(first, cfg.epoch):
            set_epoch(loader, epoch)
            cache.new_epoch()
            model.backbone.train(backbone_training)
            module.train()
            total, count = torch.zeros((), device=self.device), 0  # summed on the device: no sync per step
            for raw in progress(loader, f"{domain} epoch {epoch + 1}/{cfg.epoch}", unit="batch"):
                b = to_device(raw, self.device)
                prefix = cache.prefix(model.backbone, b.images, raw["index"])
                if self.buffer.missing(domain) > 0:
                    self._buffer_batch(domain, prefix, raw["index"])
                heat = model.heatmap(b.points, b.labels) if model.needs_heatmap else None
                logits, iou = step(prefix, heat, b.points, b.labels, b.images, model.boxes(len(b.names)))
                loss = training_loss(cfg.loss, logits, iou, b.masks, cfg.iou_target, cfg.focal)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()  # per iteration, as the reference does (quirk Q4)
                total += loss.detach()
                count += len(b.names)
            total, count = (sum(v) for v in zip(*dist.all_gather_objects((total.item(), count))))
            history["epoch_loss"].append(total / max(count, 1))
            history["lr_end"].append(opt.param_groups[0]["lr"])
            log.info("%s epoch %d/%d  loss/image %.4f  lr %.3g", domain, epoch + 1, cfg.epoch,
                     history["epoch_loss"][-1], history["lr_end"][-1])
            if cfg.val_every > 0 and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epoch):
                val_loader = val_loader or make_loader(self.test_sets[domain], cfg.eval_batch_size, False, 0,
                                                       cfg.num_workers, self.device)
                res = evaluate_split(model, val_loader, self.device, routed=False, module=module,
                                     desc=f"{domain} validation", amp=cfg.amp)["metrics"]
                history["validation"].append({"epoch": epoch + 1, **res})
                backbone_training = cfg.train_mode == "every_epoch"
                log.info("%s validation after epoch %d: IoU %.4f  F1 %.4f  MAE %.4f", domain, epoch + 1,
                         res["iou"], res["f1"], res["mae"])
            self._save_partial(domain, module, opt, sched, loader, epoch, history)
            self.run_bar.update(1)
        self.cache_stats = cache.close()
        module.eval()
        if self.buffer.missing(domain) > 0:
            log.warning("%s has only %d training images: the buffer keeps all of them (num_embedding %d)",
                        domain, len(self.train_sets[domain]), self.cfg.num_embedding)
        return history

    @torch.no_grad()
    def _buffer_batch(self, domain: str, prefix: Dict[str, torch.Tensor], index: torch.Tensor) -> None:
        """Add a batch's selector embeddings (of every rank, in rank order) to the buffer."""
        emb = self.model.backbone.selector_embedding(prefix)
        self.buffer.add(domain, dist.all_gather_tensor(emb), dist.all_gather_tensor(index.to(emb.device)))

    @torch.no_grad()
    def _collect_embeddings(self, domain: str, loader: DataLoader) -> None:
        """Buffer for a domain that trains no module: the prefix of its first training images."""
        self.model.backbone.eval()
        for raw in progress(loader, f"{domain} embeddings"):
            if self.buffer.missing(domain) <= 0:
                break
            b = to_device(raw, self.device)
            self._buffer_batch(domain, self.model.backbone.encode_prefix(b.images), raw["index"])
        log.info("%s: %d embeddings buffered (no module: routed images use vanilla %s)", domain,
                 self.buffer.store[domain].shape[0], self.model.backbone.family.upper())

    def _fit_selector(self, t: int) -> List[float]:
        model, cfg = self.model, self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1000 + t)
            if model.selector is None:
                model.selector = ModuleSelector(model.backbone.selector_dim, len(model.domains)).to(self.device)
            else:
                model.selector.grow(len(model.domains))
        x, y = self.buffer.dataset(model.domains)
        history = train_selector(model.selector, x, y, lr=cfg.selector_lr, epochs=cfg.selector_epochs,
                                 batch_size=cfg.selector_batch_size,
                                 generator=torch.Generator().manual_seed(cfg.seed + t))
        dist.broadcast_module(model.selector)  # every rank routes with rank 0's selector
        if dist.is_main():
            save_selector(model.selector, model.domains, self.run_dir / selector_snapshot(model.domains[-1]))
            save_selector(model.selector, model.domains, self.run_dir / SELECTOR_FILE)
        log.info("selector: %d domains, %d buffered embeddings (%.2f MB), final loss %.4f", len(model.domains),
                 x.shape[0], self.buffer.size_bytes() / 1024**2, history[-1] if history else float("nan"))
        return history

    def _evaluate(self, t: int) -> Dict:
        """Routed evaluation on domains 0..min(T-1, t+1) after step t."""
        return {self.domains[j]: self._evaluate_domain(t, j) for j in range(min(len(self.domains) - 1, t + 1) + 1)}

    def _evaluate_domain(self, t: int, j: int) -> Dict:
        d = self.domains[j]
        loader = make_loader(self.test_sets[d], self.cfg.eval_batch_size, False, 0, self.cfg.num_workers, self.device)
        res = evaluate_split(self.model, loader, self.device, desc=f"test {d}", amp=self.cfg.amp)
        res["selector_accuracy"] = selector_accuracy(res["selector_counts"], d)
        self.matrix.set(t, j, res["metrics"])
        return res

    def _measure_added_domain(self) -> None:
        """A finished run extended by new domains never saw the first of them: measure it now,
        with the model as it is, so that A[t][t+1] (forward transfer) exists."""
        t = len(self.completed) - 1
        if t < 0 or t + 1 >= len(self.domains) or self.matrix.get(t, t + 1) is not None:
            return
        res = self._evaluate_domain(t, t + 1)
        res["measured_when_added"] = True
        self.steps[t]["evaluation"][self.domains[t + 1]] = res
        self.steps[t]["summary"] = {m: self.matrix.summary(t, m) for m in METRICS}
        log.info("new domain %s before training: IoU %.4f (routed %s)", self.domains[t + 1], res["metrics"]["iou"],
                 res["selector_counts"])

    # ------------------------------------------------------------ output
    def _log_step(self, t: int) -> None:
        step = self.steps[-1]
        for d, res in step["evaluation"].items():
            m = res["metrics"]
            acc = res["selector_accuracy"]
            log.info("after %s | test %-10s IoU %.4f F1 %.4f MAE %.4f | selector %s | routed %s",
                     self.domains[t], d, m["iou"], m["f1"], m["mae"],
                     "n/a (not learned yet)" if acc is None else f"{acc:.1%}", res["selector_counts"])
        s = step["summary"]["iou"]
        log.info("after %s | IoU AA %s FM %s FT %s", self.domains[t], *(_fmt(s[k]) for k in ("AA", "FM", "FT")))

    def metrics(self) -> Dict:
        return {
            "format": "samcl-metrics",
            "version": 1,
            "config": self.cfg.to_dict(),
            "versions": package_versions(),
            "backbone": backbone_identity(self.model.backbone),
            **({"aug_module": {k: self._module_summary()[k] for k in ("counted_parameters", "counted_mb", "spec")}}
               if self.model.kind == "augmodule" else {}),
            "learning_module": self._module_summary(),
            "accuracy_matrix": self.matrix.to_dict(),
            "steps": self.steps,
        }

    def _module_summary(self) -> Dict:
        if getattr(self, "_summary", None) is None:
            self._summary = {"module": self.cfg.module, **self.model.module_summary()}
        return self._summary

    def _write_metrics(self) -> None:
        write_json(self.run_dir / METRICS_FILE, self.metrics())

    def _write_manifest(self) -> None:
        cfg = self.cfg
        write_json(self.run_dir / MANIFEST, {
            "format": "samcl-run",
            "version": 1,
            **self.identity(),
            "order": self.domains,
            "unseen": self.unseen,
            "completed": list(self.completed),
            "modules": {d: module_path(self.run_dir, d).name for d in self.completed if d not in self.unseen},
            "selector": SELECTOR_FILE,
            "files": self.checksums,
            "config": cfg.to_dict(),
            "versions": package_versions(),
        })


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
