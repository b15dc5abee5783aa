"""The continual protocol: one loop for every method, learning module and backbone.

For step t over the order: the method begins the domain (and says which module trains),
the module trains for the epochs (the method gives each batch's loss), the domain's first
training images fill the embedding buffer, the method ends the domain, every domain seen
so far and the next one are evaluated task-agnostically, and the step commits to the run
folder. The loop owns data, epochs, resume, DDP, bf16 and the feature cache, generically.
"""
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed as dist
from . import methods  # noqa: F401  (registers the methods)
from .data import JointSplit
from .evaluation import evaluate_split, selector_accuracy, with_module
from .feature_cache import PrefixCache
from .memory import check_memory
from .loading import held_out_parts, load_splits, make_loader, progress, set_epoch, to_device
from .metrics import METRICS
from .model import ModuleBank
from .learning_modules.base import LearningModule
from .precision import amp_forward, check_amp
from .registry import METHODS
from .run_state import RunState
from .selector import EmbeddingBuffer
from .training_step import SegmentStep, buffer_batch, collect_embeddings

# Settings a resume may change; every other setting is the run's own.
RESUMABLE_SETTINGS = ("order", "unseen", "data_root", "train_json", "test_json", "num_workers", "eval_batch_size",
                      "ckpt", "run_dir", "output_dir", "feature_cache", "cache_budget_gb", "memory_check")

log = logging.getLogger("samcl.continual")


class ContinualTrainer:
    """Runs the protocol for ``cfg`` (its method over ``model``) and writes the run folder."""

    def __init__(self, cfg, model: ModuleBank, device: torch.device, run_dir: Path, overwrite: bool = False,
                 resume: bool = False, checkpoint: Optional[Dict] = None) -> None:
        check_amp(cfg.amp, device)  # --amp bf16 only where it runs, before any file is made
        self.cfg, self.model, self.device = cfg, model, device
        self.method = METHODS.get(cfg.method)(cfg, model, device, EmbeddingBuffer(cfg.num_embedding), Path(run_dir))
        self.state = RunState(cfg, self.method, run_dir, checkpoint)
        self.run_bar = tqdm(disable=True)  # the whole run's bar, made by run()
        self.cache_stats: Dict = {}  # the last domain's feature-cache statistics
        try:  # the folder's lock is taken by restore (a resume) or prepare (a new run, once the data passed)
            if resume:
                self.state.restore()
            self.train_sets, self.test_sets = load_splits(cfg, model.backbone.img_size, self.state.domains,
                                                          self.state.todo(), self.state.unseen)
            # --val_fraction: what trains, and the held-out parts that validate (named in run.json)
            self.train_sets, self.val_sets = held_out_parts(cfg, self.train_sets)
            self.state.validation_files = {d: part.names for d, part in self.val_sets.items()}
            # the estimated peak against what is free, before a new run's folder is made
            trained = [len(self.train_sets[d]) for d in self.state.todo() if d not in self.state.unseen]
            check_memory(cfg, model, device, training=bool(trained), resume=resume, train_items=max(trained, default=0),
                         batch_flag="--batch_size" if trained else "--eval_batch_size")
            if not resume:
                self.state.prepare(overwrite)
        except BaseException:
            self.state.unlock()
            raise

    def run(self) -> Dict:
        """Every step still to do, then the run's metrics; the folder's lock is released at the end."""
        try:
            return self._run_steps()
        finally:
            self.state.unlock()

    def _run_steps(self) -> Dict:
        cfg, st = self.cfg, self.state
        st.begin()
        log.info(self.model.describe_module())
        self._measure_added_domain()
        # the whole run at a glance (domain t of T, epochs done, time left), above the epoch's own bar
        self.run_bar = progress(total=cfg.epoch * sum(d not in st.unseen for d in st.todo()), desc="run",
                                unit="epoch", leave=True, position=0)
        for t, domain in enumerate(st.domains):
            if domain in st.completed:
                continue
            self.run_bar.set_description(f"run: domain {t + 1}/{len(st.domains)} {domain}")
            start = time.time()
            log.info("=== step %d/%d: %s ===", t + 1, len(st.domains), domain)
            step: Dict = {"step": t, "domain": domain}
            module = self.method.begin_domain(t, domain, trains=domain not in st.unseen)
            step["trained"] = module is not None
            loader = None
            if module is not None:
                sources = self.method.training_domains(t, domain, [d for d in st.domains if d not in st.unseen])
                if sources != [domain]:
                    step["trained_on"] = sources
                loader = make_loader(self.train_sets[domain] if sources == [domain] else
                                     JointSplit([self.train_sets[d] for d in sources]),
                                     cfg.batch_size, True, cfg.seed + t, cfg.num_workers, self.device)
                step["training"] = self._train_module(domain, module, loader)
                step["loss_terms"] = step["training"].pop("loss_terms")
            elif st.buffered(domain):
                collect_embeddings(self.model.backbone, st.buffer, domain,
                                   make_loader(self.train_sets[domain], cfg.batch_size, True, cfg.seed + t,
                                               cfg.num_workers, self.device), self.device)
            step["training_seconds"] = round(time.time() - start, 2)
            st.save_step(domain, module)
            if self.method.keeps_embeddings:
                step["buffer"] = {d: int(e.shape[0]) for d, e in st.buffer.store.items()}
            step.update(self.method.end_domain(t, domain, module, loader))
            step["evaluation"] = {st.domains[j]: self._evaluate_domain(t, j)
                                  for j in range(min(len(st.domains) - 1, t + 1) + 1)}
            step["summary"] = {m: st.matrix.summary(t, m) for m in METRICS}
            step["storage"] = st.storage(domain)
            step["seconds"] = round(time.time() - start, 2)
            st.steps.append(step)
            st.log_step(t)
            st.commit(domain)
        self.run_bar.close()
        return st.metrics()

    def _train_module(self, domain: str, module: LearningModule, loader: DataLoader) -> Dict:
        cfg, model, st = self.cfg, self.model, self.state
        opt = self.method.make_optimizer(module)
        sched = self.method.make_scheduler(opt, len(loader))
        history: Dict[str, Any] = {"epoch_loss": [], "lr_end": [], "validation": []}
        partial = st.load_partial(domain, module, opt, sched, loader)
        first = 0
        if partial is not None:
            history, first = partial["history"], partial["epoch"] + 1
        # each named term of the method's loss (they sum to it): its mean per image, per epoch
        names = self.method.loss_terms
        history.setdefault("loss_terms", {k: [] for k in names})
        trainable = [p for p in module.parameters() if p.requires_grad]
        val_loader = None
        forward = SegmentStep(model.backbone, module)
        if dist.is_distributed():
            forward = DistributedDataParallel(forward, find_unused_parameters=module.has_unused_parameters,
                                              device_ids=[self.device.index] if self.device.type == "cuda" else None)
        forward = amp_forward(forward, cfg.amp, self.device)  # --amp bf16: autocast forward, fp32 outputs and loss
        # the frozen features, once per image: the prefix, or (CAD) the whole frozen embedding too
        cache = PrefixCache.for_training(cfg, self.device, len(loader.dataset), encode=module.frozen_features)
        # The release sets train mode once per domain; its validation switches to eval mode and
        # never back, so every epoch after the first validation trains in eval mode (train_mode
        # "reference"). Only SAM 2's decoder behaves differently (mask choice by stability).
        backbone_training = cfg.train_mode == "every_epoch" or not history["validation"]
        keep_embeddings = self.method.keeps_embeddings
        self.run_bar.update(first)  # epochs done before a resume
        for epoch in range(first, cfg.epoch):
            set_epoch(loader, epoch)
            cache.new_epoch()
            model.backbone.train(backbone_training)
            module.train()
            total, count = torch.zeros((), device=self.device), 0  # summed on the device: no sync per step
            terms = {k: torch.zeros((), device=self.device) for k in names}
            for raw in progress(loader, f"{domain} epoch {epoch + 1}/{cfg.epoch}", unit="batch"):
                b = to_device(raw, self.device)
                prefix = cache.prefix(model.backbone, b.images, raw["index"])
                if keep_embeddings and st.buffer.missing(domain) > 0:
                    buffer_batch(model.backbone, st.buffer, domain, prefix, raw["index"])
                loss = self.method.observe(b, prefix, forward)
                for k, v in self.method.take_terms().items():
                    terms[k] += v
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                opt.step()
                sched.step()  # per iteration, as the reference does (quirk Q4)
                total += loss.detach()
                count += len(b.names)
            total, count = (sum(v) for v in zip(*dist.all_gather_objects((total.item(), count))))
            term_sums = [sum(v) for v in zip(*dist.all_gather_objects([terms[k].item() for k in names]))]
            for k, v in zip(names, term_sums):
                history["loss_terms"].setdefault(k, []).append(v / max(count, 1))
            history["epoch_loss"].append(total / max(count, 1))
            history["lr_end"].append(opt.param_groups[0]["lr"])
            log.info("%s epoch %d/%d  loss/image %.4f  lr %.3g", domain, epoch + 1, cfg.epoch,
                     history["epoch_loss"][-1], history["lr_end"][-1])
            if cfg.val_every > 0 and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epoch):
                val_set = self.val_sets[domain] if cfg.validation == "train_fraction" else self.test_sets[domain]
                val_loader = val_loader or make_loader(val_set, cfg.eval_batch_size, False, 0, cfg.num_workers,
                                                       self.device)
                res = evaluate_split(model, val_loader, self.device, with_module(model, module), routed=False,
                                     modules=(module,), desc=f"{domain} validation", amp=cfg.amp)["metrics"]
                history["validation"].append({"epoch": epoch + 1, **res})
                backbone_training = cfg.train_mode == "every_epoch"
                log.info("%s validation after epoch %d: IoU %.4f  F1 %.4f  MAE %.4f", domain, epoch + 1,
                         res["iou"], res["f1"], res["mae"])
            st.save_partial(domain, module, opt, sched, loader, epoch, history)
            self.run_bar.update(1)
        self.cache_stats = cache.close()
        module.eval()
        if keep_embeddings and st.buffer.missing(domain) > 0:
            log.warning("%s has only %d training images: the buffer keeps all of them (num_embedding %d)",
                        domain, len(loader.dataset), cfg.num_embedding)
        return history

    def _evaluate_domain(self, t: int, j: int) -> Dict:
        """Domain j's test split (its held-out validation part with evaluate_on train_fraction) after
        step t, each image with the module the method chooses; the first time, the frozen model's
        (vanilla) score too (Z[j] of the forward transfer and the unseen columns)."""
        d, matrix = self.state.domains[j], self.state.matrix
        split = self.val_sets[d] if self.cfg.evaluate_on == "train_fraction" else self.test_sets[d]
        loader = make_loader(split, self.cfg.eval_batch_size, False, 0, self.cfg.num_workers, self.device)
        res = evaluate_split(self.model, loader, self.device, self.method.segment, routed=self.method.routes,
                             with_vanilla=matrix.get_vanilla(j) is None, desc=f"test {d}", amp=self.cfg.amp)
        res["selector_accuracy"] = selector_accuracy(res.get("selector_counts", {}), d,
                                                     res.get("selector_untrained", 0))
        matrix.set(t, j, res["metrics"])
        if "vanilla" in res:
            matrix.set_vanilla(j, res["vanilla"])
        return res

    def _measure_added_domain(self) -> None:
        """A finished run extended by new domains never saw the first of them: measure it now,
        with the model as it is, so that A[t][t+1] (forward transfer) exists."""
        st = self.state
        t = len(st.completed) - 1
        if t < 0 or t + 1 >= len(st.domains) or st.matrix.get(t, t + 1) is not None:
            return
        res = self._evaluate_domain(t, t + 1)
        res["measured_when_added"] = True
        st.steps[t]["evaluation"][st.domains[t + 1]] = res
        st.steps[t]["summary"] = {m: st.matrix.summary(t, m) for m in METRICS}
        log.info("new domain %s before training: IoU %.4f (routed %s)", st.domains[t + 1], res["metrics"]["iou"],
                 res.get("selector_counts", "-"))
