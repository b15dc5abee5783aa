"""SAMCL: a learning module per domain, routed by the Module Selector (the paper's method).

Every trained domain gets its own module (they never overwrite each other); after each
domain the selector, an MLP on the frozen selector-layer embedding, is retrained on the
embedding buffer. Its head (``selector_head``): "grow" has one output per domain so far, grown
after each domain; "full" (the release's) has one output for every domain of the order from the
first step on (but a held-out unseen domain, below), grown only when a resume appends domains to
the order. At test time every image is routed to the module of the domain the selector picks
(task-agnostic); an unseen, test-only domain has no module, so its images run through the frozen
backbone, as do images a full head sends to a domain not trained yet (the release would stop
there; they are counted).

``unseen_embeddings``: ``train`` (the release) fills the buffer from an unseen domain's training
split and gives the selector a class for it, so that its images are routed to the frozen model:
the unseen domain is then seen by the selector, though no module trains on it. ``none`` holds it
out: no embeddings, no class, the selector is left as after the last trained domain, and every
test image, the unseen domain's too, is routed to one of the trained domains' modules (the one
whose domain its embedding resembles most); there is no route to the frozen model.

``--selector`` chooses how a test image picks its module, over the same embedding buffer and
the same modules, to separate what the learned selector contributes:

* ``mlp`` (default): the Module Selector above.
* ``ncm``: the nearest mean (cosine) of each domain's stored embeddings, no training
  (:class:`samcl.routing.NearestMeanSelector`); a step appends the new domain's mean. It keeps
  the (K, d) means only: storage counts the selector, not the buffer.
* ``knn``: the majority domain of the ``knn_k`` nearest stored embeddings (cosine;
  :class:`samcl.routing.NearestNeighbourSelector`). Its selector file holds the whole buffer, so
  storage counts it instead of the buffer.
* ``oracle``: the test image's true domain picks the module (a domain that has no module, or is
  not reached yet, uses the frozen backbone): the upper bound of routing. It keeps no selector
  and needs no buffer at test time (storage counts the modules only); a test image must carry
  its domain, so it routes only in an evaluation of a domain's test split.

All of them record per-domain choice counts and selector accuracy in every evaluation.
"""
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from .. import distributed as dist
from ..backbones.base import Features
from ..evaluation import routed
from ..loading import Batch
from ..learning_modules.base import LearningModule
from ..registry import register_method
from ..routing import NearestMeanSelector, NearestNeighbourSelector
from ..run_folder import load_selector, save_selector, selector_file, selector_snapshot
from ..selector import ModuleSelector, train_selector
from ..settings import Settings, setting
from .base import ContinualMethod

log = logging.getLogger("samcl.methods.samcl")


class SAMCLSettings(Settings):
    """What SAMCL's Module Selector learns of the unseen (test-only) domains, and how SAMCL routes."""

    unseen_embeddings: str = setting(
        "train", "samcl: train: an unseen domain's training split fills the embedding buffer and the selector gets "
        "a class for it that routes to the frozen model (the release); none: the unseen domain gives nothing (no "
        "embeddings, no class), it is truly held out and its images are routed among the trained domains "
        "(docs/metrics.md)", choices=("train", "none"))
    selector: str = setting("mlp", "samcl: how a test image picks its module: mlp (the Module Selector), ncm (nearest "
                            "mean embedding), knn (k nearest embeddings), oracle (its true domain)",
                            choices=("mlp", "ncm", "knn", "oracle"))
    knn_k: int = setting(5, "samcl --selector knn: the stored embeddings that vote", low=1)


@register_method("samcl")
class SAMCL(ContinualMethod):
    variant = "selector"

    def begin_domain(self, t: int, domain: str, trains: bool) -> Optional[LearningModule]:
        """A fresh module for step t. module_init "shared" (the release: one module built once and
        copied for every domain) draws it from the same seed at every step, so every domain starts
        from identical parameters; "per_domain" draws it from seed + t."""
        if not trains:
            if self.holds_out(domain) and self.model.selector is None:
                raise ValueError(f"unseen_embeddings none holds out the test-only domain {domain!r}, which comes "
                                 f"before any trained domain: there is nothing to route its images to; put the "
                                 f"unseen domains after the trained ones, or use unseen_embeddings train")
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + (t if self.cfg.module_init == "per_domain" else 0))
            return self.model.new_module()

    def end_domain(self, t: int, domain: str, module: Optional[LearningModule],
                   data: Optional[DataLoader]) -> Dict[str, Any]:
        if self.holds_out(domain):
            self._save_selector(domain)  # the step's snapshot: the selector as it was
            return {"held_out": True}
        self.model.add_domain(domain, module)
        return {"selector_loss": self._fit_selector(t)}

    def holds_out(self, domain: str) -> bool:
        """A test-only domain with ``unseen_embeddings none``: not in the buffer, the bank or the selector."""
        return getattr(self.cfg, "unseen_embeddings", "train") == "none" and domain in self.cfg.unseen

    def segment(self, prefix: Features, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Task-agnostic: every image with the module of the domain the selector picks (oracle: its
        own domain's)."""
        if self.cfg.selector != "oracle":
            return routed(self.model)(prefix, batch)
        choice = oracle_choice(self.model.domains, batch.domains).to(self.device)
        logits, _ = self.model.segment_routed(prefix, choice, batch.points, batch.labels, images=batch.images)
        return logits, choice

    def restore(self, completed: List[str]) -> None:
        if completed and self.cfg.selector != "oracle":
            selector, domains = load_selector(self.run_dir / selector_snapshot(completed[-1], self.weights))
            assert domains == [d for d in completed if not self.holds_out(d)]
            self.model.selector = selector.to(self.device)

    def step_files(self, domain: str) -> List[str]:
        return [] if self.cfg.selector == "oracle" else [selector_snapshot(domain, self.weights)]

    def run_files(self) -> List[str]:
        return [] if self.cfg.selector == "oracle" else [selector_file(self.weights)]

    def needs_buffer(self) -> bool:
        """The MLP retrains on the buffer after every domain; ncm and knn keep what they need in their
        selector file, the oracle nothing."""
        return self.cfg.selector == "mlp"

    def kept_files(self, done: List[str]) -> List[str]:
        """One selector (the run's latest; none for the oracle); every step's snapshot is a record
        for reproducing the accuracy matrix, not memory the method needs."""
        return self.run_files() if done else []

    def head_size(self) -> int:
        """The selector's outputs after this step: the domains so far (grow) or the whole order (full),
        less a held-out unseen domain (:meth:`holds_out`), which never gets a class."""
        if getattr(self.cfg, "selector_head", "grow") == "full":
            return max(len([d for d in self.cfg.domains if not self.holds_out(d)]), len(self.model.domains))
        return len(self.model.domains)

    def _fit_selector(self, t: int) -> List[float]:
        """The step's selector (the MLP retrained; the ncm / knn state extended); [] for the oracle."""
        if self.cfg.selector == "mlp":
            return self._fit_mlp(t)
        if self.cfg.selector == "oracle":
            return []
        model = self.model
        if self.cfg.selector == "ncm":
            if model.selector is None:
                model.selector = NearestMeanSelector(torch.zeros(0, model.backbone.selector_dim)).to(self.device)
            model.selector.add(self.buffer.store[model.domains[-1]])
        else:
            x, y = self.buffer.dataset(model.domains)
            model.selector = NearestNeighbourSelector(x, y, len(model.domains), self.cfg.knn_k).to(self.device)
        self._save_selector(model.domains[-1])
        log.info("%s selector: %d domains", self.cfg.selector, len(model.domains))
        return []

    def _fit_mlp(self, t: int) -> List[float]:
        """Build the selector (first step) or grow it to :meth:`head_size` (the new outputs drawn
        from seed + 1000 + t) and retrain it on the whole buffer; write it as the step's snapshot
        and as the run's selector."""
        model, cfg = self.model, self.cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1000 + t)
            if model.selector is None:
                model.selector = ModuleSelector(model.backbone.selector_dim, self.head_size()).to(self.device)
            else:
                model.selector.grow(self.head_size())
        x, y = self.buffer.dataset(model.domains)
        history = train_selector(model.selector, x, y, lr=cfg.selector_lr, epochs=cfg.selector_epochs,
                                 batch_size=cfg.selector_batch_size,
                                 generator=torch.Generator().manual_seed(cfg.seed + t))
        self._save_selector(model.domains[-1])
        log.info("selector: %d domains, %d buffered embeddings (%.2f MB), final loss %.4f", len(model.domains),
                 x.shape[0], self.buffer.size_bytes() / 1024**2, history[-1] if history else float("nan"))
        return history

    def _save_selector(self, domain: str) -> None:
        """The selector as step ``domain``'s snapshot and as the run's selector (rank 0's, broadcast
        first so that every rank routes with it); nothing for the oracle, which has none."""
        if self.model.selector is None:
            return
        dist.broadcast_module(self.model.selector)
        if dist.is_main():
            for name in (selector_snapshot(domain, self.weights), selector_file(self.weights)):
                save_selector(self.model.selector, self.model.domains, self.run_dir / name)


def oracle_choice(domains: List[str], true_domains: List[str]) -> torch.Tensor:
    """(N,) index in ``domains`` of each image's true domain; -1 (vanilla) for a domain the bank
    does not hold yet."""
    if not true_domains:
        raise ValueError("--selector oracle routes by each test image's true domain; this batch carries none")
    return torch.tensor([domains.index(d) if d in domains else -1 for d in true_domains], dtype=torch.long)
