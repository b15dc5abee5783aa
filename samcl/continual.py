"""The continual protocol (SPEC §6-§8): one loop for every backbone.

For step t over the order: fill the buffer with domain t's embeddings, train its
AugModule (not for an unseen, test-only domain), save it, grow and retrain the
selector on the buffer, evaluate on domains 0..min(T-1, t+1) with task-agnostic
routing, and update ``metrics.json``.
"""
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .aug_module import AugModule
from .config import Config
from .data import SegmentationSplit, collate, read_domain_map
from .losses import samcl_loss
from .metrics import METRICS, AccuracyMatrix, MetricAccumulator, per_image_metrics
from .model import SAMCLModel
from .run_folder import (BUFFER_FILE, MANIFEST, METRICS_FILE, SELECTOR_FILE, RunFolderError, backbone_identity,
                         module_path, package_versions, save_module, save_selector, write_config, write_json)
from .selector import EmbeddingBuffer, ModuleSelector, train_selector

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
                device: torch.device, drop_last: bool = False) -> DataLoader:
    return DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collate,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=False,
    )


def progress(iterable, desc: str, **kw):
    """tqdm on a terminal, silent otherwise (logs carry the numbers)."""
    return tqdm(iterable, desc=desc, dynamic_ncols=True, disable=None, leave=False, **kw)


@torch.no_grad()
def evaluate_split(model: SAMCLModel, loader: DataLoader, device: torch.device, *, routed: bool = True,
                   module: Optional[AugModule] = None, with_vanilla: bool = False, desc: str = "eval") -> Dict:
    """Metrics of one test split.

    routed=True: every image goes through the selector (task-agnostic); otherwise
    all images use ``module`` (None: vanilla). with_vanilla adds a vanilla pass
    over the same frozen prefix.
    """
    was_training = model.backbone.training
    model.backbone.eval()
    acc, vanilla_acc = MetricAccumulator(), MetricAccumulator()
    counts = torch.zeros(max(len(model.domains), 1), dtype=torch.long)
    for raw in progress(loader, desc):
        b = to_device(raw, device)
        prefix = model.backbone.encode_prefix(b.images)
        if routed:
            choice = model.route(prefix)
            counts += torch.bincount(choice.cpu(), minlength=counts.numel())
            logits, _ = model.segment_routed(prefix, choice, b.points, b.labels)
        else:
            logits, _ = model.backbone.segment(prefix, module, model.heatmap(b.points, b.labels) if module else None,
                                               b.points, b.labels)
        acc.update(per_image_metrics(logits, b.masks))
        if with_vanilla:
            vanilla_acc.update(per_image_metrics(model.segment_vanilla(prefix, b.points, b.labels)[0], b.masks))
    model.backbone.train(was_training)
    out: Dict = {"metrics": acc.result()}
    if routed:
        out["selector_counts"] = {d: int(counts[k]) for k, d in enumerate(model.domains)}
    if with_vanilla:
        out["vanilla"] = vanilla_acc.result()
    return out


def selector_accuracy(counts: Dict[str, int], true_domain: str) -> Optional[float]:
    """Share of a domain's test images routed to it; None if the selector does not know it yet."""
    total = sum(counts.values())
    if true_domain not in counts or total == 0:
        return None
    return counts[true_domain] / total


class ContinualTrainer:
    """Runs the protocol for ``cfg`` on ``model`` and writes the run folder."""

    def __init__(self, cfg: Config, model: SAMCLModel, device: torch.device, run_dir: Path,
                 overwrite: bool = False) -> None:
        self.cfg = cfg
        self.model = model
        self.device = device
        self.run_dir = Path(run_dir)
        self.domains = cfg.domains
        self.unseen = [d for d in self.domains if d in set(cfg.unseen)]
        self._prepare_folder(overwrite)
        self.train_sets, self.test_sets = self._load_data()
        self.buffer = EmbeddingBuffer(cfg.num_embedding)
        self.matrix = AccuracyMatrix(self.domains, self.unseen)
        self.steps: List[Dict] = []

    # ------------------------------------------------------------ setup
    def _prepare_folder(self, overwrite: bool) -> None:
        if (self.run_dir / MANIFEST).exists():
            if not overwrite:
                raise RunFolderError(
                    f"run folder {self.run_dir} already holds a run; pass --overwrite to replace it "
                    f"or --run_dir for a new folder")
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _load_data(self):
        cfg, root = self.cfg, Path(self.cfg.data_root)
        train_map = read_domain_map(Path(cfg.train_json), root)
        test_map = read_domain_map(Path(cfg.test_json), root)
        missing = [f"{d} (in {name})" for name, m in (("train map", train_map), ("test map", test_map))
                   for d in self.domains if d not in m]
        if missing:
            raise RunFolderError(f"--order names domains the JSON maps lack: {', '.join(missing)}; "
                                 f"train map {cfg.train_json}, test map {cfg.test_json} under {root}")
        size = self.model.backbone.img_size
        kw = dict(img_size=size, mask_binarize=cfg.mask_binarize, mask_threshold=cfg.mask_threshold)
        train = {d: SegmentationSplit(train_map[d], domain=d, **kw) for d in self.domains}
        test = {d: SegmentationSplit(test_map[d], domain=d, **kw) for d in self.domains}
        for d in self.domains:
            log.info("domain %-10s train %5d images (%s)  test %5d images (%s)%s", d, len(train[d]),
                     train_map[d], len(test[d]), test_map[d], "  [unseen: no module]" if d in self.unseen else "")
        return train, test

    # ------------------------------------------------------------ protocol
    def run(self) -> Dict:
        cfg = self.cfg
        self._write_manifest(completed=[])
        write_config(self.run_dir, cfg.to_dict())
        spec = self.model.spec
        log.info(AugModule(spec).describe())
        for t, domain in enumerate(self.domains):
            step_start = time.time()
            torch.manual_seed(cfg.seed + t)
            log.info("=== step %d/%d: %s ===", t + 1, len(self.domains), domain)
            loader = make_loader(self.train_sets[domain], cfg.batch_size, True, cfg.seed + t, cfg.num_workers,
                                 self.device)
            step: Dict = {"step": t, "domain": domain, "trained": domain not in self.unseen}
            if domain in self.unseen:
                self._collect_embeddings(domain, loader)
                self.model.add_domain(domain, None)
            else:
                module = self.model.new_module()
                step["training"] = self._train_module(domain, module, loader)
                save_module(module, self.model.backbone, domain, module_path(self.run_dir, domain))
                self.model.add_domain(domain, module)
            step["buffer"] = {d: int(e.shape[0]) for d, e in self.buffer.store.items()}
            step["selector_loss"] = self._fit_selector(t)
            step["evaluation"] = self._evaluate(t)
            step["summary"] = {m: self.matrix.summary(t, m) for m in METRICS}
            step["seconds"] = round(time.time() - step_start, 2)
            self.steps.append(step)
            self._log_step(t)
            self._write_metrics()
            self._write_manifest(completed=self.domains[: t + 1])
        return self.metrics()

    def _train_module(self, domain: str, module: AugModule, loader: DataLoader) -> Dict:
        cfg, model = self.cfg, self.model
        opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, weight_decay=0.0)
        t_max = cfg.epoch if cfg.scheduler == "reference" else cfg.epoch * len(loader)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=1e-7)
        history: Dict[str, list] = {"epoch_loss": [], "lr_end": [], "validation": []}
        val_loader = None
        for epoch in progress(range(cfg.epoch), f"{domain} epochs"):
            model.backbone.train()
            module.train()
            total, count = 0.0, 0
            for raw in progress(loader, f"{domain} epoch {epoch + 1}/{cfg.epoch}"):
                b = to_device(raw, self.device)
                prefix = model.backbone.encode_prefix(b.images)
                if self.buffer.missing(domain) > 0:
                    self.buffer.add(domain, model.backbone.selector_embedding(prefix))
                logits, iou = model.backbone.segment(prefix, module, model.heatmap(b.points, b.labels),
                                                     b.points, b.labels)
                loss = samcl_loss(logits, iou, b.masks, cfg.iou_target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()  # per iteration, as the reference does (quirk Q4)
                total += loss.item()
                count += len(b.names)
            history["epoch_loss"].append(total / max(count, 1))
            history["lr_end"].append(opt.param_groups[0]["lr"])
            log.info("%s epoch %d/%d  loss/image %.4f  lr %.3g", domain, epoch + 1, cfg.epoch,
                     history["epoch_loss"][-1], history["lr_end"][-1])
            if cfg.val_every > 0 and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epoch):
                val_loader = val_loader or make_loader(self.test_sets[domain], cfg.eval_batch_size, False, 0,
                                                       cfg.num_workers, self.device)
                res = evaluate_split(model, val_loader, self.device, routed=False, module=module,
                                     desc=f"{domain} validation")["metrics"]
                history["validation"].append({"epoch": epoch + 1, **res})
                log.info("%s validation after epoch %d: IoU %.4f  F1 %.4f  MAE %.4f", domain, epoch + 1,
                         res["iou"], res["f1"], res["mae"])
        module.eval()
        if self.buffer.missing(domain) > 0:
            log.warning("%s has only %d training images: the buffer keeps all of them (num_embedding %d)",
                        domain, len(self.train_sets[domain]), self.cfg.num_embedding)
        return history

    @torch.no_grad()
    def _collect_embeddings(self, domain: str, loader: DataLoader) -> None:
        """Buffer for a domain that trains no module: the prefix of its first training images."""
        self.model.backbone.eval()
        for raw in progress(loader, f"{domain} embeddings"):
            if self.buffer.missing(domain) <= 0:
                break
            b = to_device(raw, self.device)
            self.buffer.add(domain, self.model.backbone.selector_embedding(self.model.backbone.encode_prefix(b.images)))
        log.info("%s: %d embeddings buffered (no module: routed images use vanilla %s)", domain,
                 self.buffer.store[domain].shape[0], self.model.backbone.family.upper())

    def _fit_selector(self, t: int) -> List[float]:
        model, cfg = self.model, self.cfg
        if model.selector is None:
            model.selector = ModuleSelector(model.backbone.selector_dim, len(model.domains)).to(self.device)
        else:
            model.selector.grow(len(model.domains))
        x, y = self.buffer.dataset(model.domains)
        history = train_selector(model.selector, x, y, lr=cfg.selector_lr, epochs=cfg.selector_epochs,
                                 batch_size=cfg.selector_batch_size,
                                 generator=torch.Generator().manual_seed(cfg.seed + t))
        save_selector(model.selector, model.domains, self.run_dir / SELECTOR_FILE)
        self.buffer.save(self.run_dir / BUFFER_FILE)
        log.info("selector: %d domains, %d buffered embeddings (%.2f MB), final loss %.4f", len(model.domains),
                 x.shape[0], self.buffer.size_bytes() / 1024**2, history[-1] if history else float("nan"))
        return history

    def _evaluate(self, t: int) -> Dict:
        cfg = self.cfg
        out = {}
        for j in range(min(len(self.domains) - 1, t + 1) + 1):
            d = self.domains[j]
            loader = make_loader(self.test_sets[d], cfg.eval_batch_size, False, 0, cfg.num_workers, self.device)
            res = evaluate_split(self.model, loader, self.device, desc=f"test {d}")
            res["selector_accuracy"] = selector_accuracy(res["selector_counts"], d)
            self.matrix.set(t, j, res["metrics"])
            out[d] = res
        return out

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
            "aug_module": {"counted_parameters": AugModule(self.model.spec).counted_parameters(),
                           "counted_mb": round(AugModule(self.model.spec).counted_size_mb(), 6),
                           "spec": self.model.spec.to_dict()},
            "accuracy_matrix": self.matrix.to_dict(),
            "steps": self.steps,
        }

    def _write_metrics(self) -> None:
        write_json(self.run_dir / METRICS_FILE, self.metrics())

    def _write_manifest(self, completed: List[str]) -> None:
        cfg = self.cfg
        write_json(self.run_dir / MANIFEST, {
            "format": "samcl-run",
            "version": 1,
            "module": cfg.module,
            "backbone": backbone_identity(self.model.backbone)
            | {"checkpoint": cfg.ckpt, "random_weights": cfg.random_weights, "vit_name": cfg.vit_name},
            "spec": self.model.spec.to_dict(),
            "order": self.domains,
            "unseen": self.unseen,
            "completed": list(completed),
            "modules": {d: module_path(self.run_dir, d).name for d in completed if d not in self.unseen},
            "selector": SELECTOR_FILE,
            "buffer": BUFFER_FILE,
            "config": cfg.to_dict(),
            "versions": package_versions(),
        })


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
