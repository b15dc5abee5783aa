"""Merging: a module per domain, merged after each step into ONE module that segments every domain.

Every trained domain gets a fresh module drawn from the seed, the same initial module theta0
at every step (SAMCL's recipe with module_init "shared", whatever module_init says), trained on
that domain alone. After the step the modules trained so far are merged into one, with the task
vectors tau_j = theta_j - theta0 (``--merge``):

* ``mean``: theta0 + mean_j tau_j.
* ``ta``: task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023),
  theta0 + lambda * sum_j tau_j with lambda = ``merge_lambda`` (0.3: the paper picks lambda on
  held-out data from 0 to 1; this protocol has no validation split, so a fixed value is used).
* ``ties``: TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging
  Models", NeurIPS 2023): trim each tau_j to its ``ties_k`` % largest entries by magnitude (the
  others set to 0), elect each entry's sign as the sign of the trimmed vectors' sum, take the
  disjoint mean (over the trimmed vectors whose entry is nonzero and of the elected sign), scale
  it by ``ties_lambda``: theta0 + lambda * tau_m. k = 20 % and lambda = 1 are the paper's
  defaults when no validation set tunes them.

A task vector is the whole module's, flattened (TIES trims over all of it, as the paper does
over a model). What is merged depends on the module kind:

* LoRA: the products Delta W = (alpha / r) B A of each layer, not A and B separately (their
  factors are not aligned across domains; theta0's product is 0, B being zero-initialised). The
  merged Delta W of a layer is stored as a LoRA module of rank R = min(n r, in, out) with
  scale 1 (alpha = R), from its truncated SVD (B = U_R S_R^1/2, A = S_R^1/2 V_R^T): exact for
  ``mean`` and ``ta`` (a sum of n rank-r products has rank <= n r), the best rank-R
  approximation for ``ties`` (whose trimming does not keep the rank).
* every other kind (the AugModule, ...): its parameters directly (buffers, e.g. BatchNorm
  statistics, are theta0's).

The protocol evaluates every domain with the merged module (task-agnostic, no selector, no
embedding buffer). Files: ``<domain>.<suffix>`` is the merged module after that step (so a test
or the predictor reads the latest merge as a shared module's snapshot), ``merge/trained_<domain>``
the domain's trained module. Storage counts the latest merged module and every trained module
(re-merging at the next step needs each tau_j under ``ties``; ``mean`` and ``ta`` could keep a
running sum instead); each step records the merged module's size alone as ``merged_parameters``.
"""
import copy
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from .. import distributed as dist
from ..backbones.base import Features
from ..learning_modules.base import LearningModule
from ..learning_modules.lora import LoRAModule, LoRASpec
from ..loading import Batch
from ..registry import register_method
from ..run_folder import WEIGHT_SUFFIXES, load_module, module_path, save_module
from ..settings import Settings, setting
from .base import ContinualMethod

log = logging.getLogger("samcl.methods.merge")

FOLDER = "merge"  # merge/trained_<domain>.<suffix>


class MergeSettings(Settings):
    """How the per-domain modules become one (--method merge)."""

    merge: str = setting("ties", "merge: how the domains' modules become one: mean, ta (task arithmetic), ties",
                         choices=("mean", "ta", "ties"))
    merge_lambda: float = setting(0.3, "merge --merge ta: the scale lambda of the summed task vectors "
                                  "(Ilharco et al. 2023)")
    ties_k: float = setting(20.0, "merge --merge ties: % of each task vector's entries kept, by magnitude "
                            "(Yadav et al. 2023)", low=0, high=100, open_low=True)
    ties_lambda: float = setting(1.0, "merge --merge ties: the scale lambda of the merged task vector "
                                 "(Yadav et al. 2023)")


# ---------------------------------------------------------------------------- task vectors, merged
def trim(taus: torch.Tensor, k: float) -> torch.Tensor:
    """(n, P) task vectors -> each row with only its ``k`` % largest-magnitude entries (int(P k / 100),
    at least the largest; entries tied with the smallest kept one are kept too), the others 0."""
    p = taus.shape[1]
    keep = max(int(p * k / 100), 1)
    kth = taus.abs().kthvalue(p - keep + 1, dim=1, keepdim=True).values  # the keep-th largest magnitude
    return taus * (taus.abs() >= kth)


def elect(trimmed: torch.Tensor) -> torch.Tensor:
    """(n, P) -> (P,) the sign of each entry's total mass, sign(sum_j tau_j) (0 where it is 0)."""
    return torch.sign(trimmed.sum(dim=0))


def disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """(n, P), (P,) -> (P,) the mean over j of the nonzero entries whose sign is the elected one (0 if none)."""
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    return (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def merge_vectors(taus: torch.Tensor, how: str, lam: float = 0.3, k: float = 20.0,
                  ties_lambda: float = 1.0) -> torch.Tensor:
    """(n, P) task vectors -> (P,) the merged task vector (``how``: mean, ta, ties)."""
    if how == "mean":
        return taus.mean(dim=0)
    if how == "ta":
        return lam * taus.sum(dim=0)
    if how == "ties":
        trimmed = trim(taus, k)
        return ties_lambda * disjoint_mean(trimmed, elect(trimmed))
    raise ValueError(f"unknown merge {how!r}; one of mean, ta, ties")


# ---------------------------------------------------------------------------- modules, merged
def lora_products(module: LoRAModule) -> List[torch.Tensor]:
    """Each layer's Delta W = scale * B A, (out, in)."""
    return [module.scale * b.weight @ a.weight for a, b in zip(module.A, module.B)]


def lora_from_products(spec: LoRASpec, deltas: List[torch.Tensor], rank: int) -> LoRAModule:
    """A LoRA module of scale 1 whose products are the rank-``rank`` truncated SVD of ``deltas``."""
    rank = min([rank] + [min(d.shape) for d in deltas])
    module = LoRAModule(LoRASpec(layers=spec.layers, shapes=spec.shapes, rank=rank, alpha=float(rank)))
    with torch.no_grad():
        for a, b, delta in zip(module.A, module.B, deltas):
            u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
            root = s[:rank].sqrt()
            b.weight.copy_((u[:, :rank] * root).to(b.weight.dtype))
            a.weight.copy_((root[:, None] * vh[:rank]).to(a.weight.dtype))
    return module


def merge_modules(initial: LearningModule, trained: List[LearningModule], how: str, lam: float = 0.3,
                  k: float = 20.0, ties_lambda: float = 1.0) -> LearningModule:
    """One module from the modules ``trained`` from ``initial`` (theta0), as the module docstring says."""
    if isinstance(initial, LoRAModule):
        products = [lora_products(m) for m in trained]
        shapes = [d.shape for d in products[0]]
        taus = torch.stack([torch.cat([d.reshape(-1) for d in p]) for p in products])
        merged = merge_vectors(taus.double(), how, lam, k, ties_lambda).float()
        deltas = [part.reshape(shape) for part, shape in zip(merged.split([s.numel() for s in shapes]), shapes)]
        return lora_from_products(initial.spec, deltas, initial.spec.rank * len(trained)).to(merged.device)
    names = [n for n, _ in initial.named_parameters()]
    start = torch.cat([p.detach().reshape(-1) for p in initial.parameters()])
    taus = torch.stack([torch.cat([dict(m.named_parameters())[n].detach().reshape(-1) for n in names]) - start
                        for m in trained])
    flat = start + merge_vectors(taus, how, lam, k, ties_lambda)
    merged = copy.deepcopy(initial)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat, merged.parameters())
    return merged


def trained_file(domain: str, weights: str) -> str:
    return f"{FOLDER}/trained_{domain}{WEIGHT_SUFFIXES[weights]}"


@register_method("merge")
class Merge(ContinualMethod):
    routes = False
    keeps_embeddings = False
    variant = "merge"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained: Dict[str, LearningModule] = {}  # each trained domain's own module, in order

    def initial(self) -> LearningModule:
        """theta0: the module drawn from the seed, the start of every domain's training."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return self.model.new_module()

    def begin_domain(self, t: int, domain: str, trains: bool) -> Optional[LearningModule]:
        return self.initial() if trains else None

    def end_domain(self, t: int, domain: str, module: Optional[LearningModule],
                   data: Optional[DataLoader]) -> Dict[str, Any]:
        if module is None:
            self.model.add_domain(domain, None)
            return {}
        self.trained[domain] = module
        cfg = self.cfg
        merged = merge_modules(self.initial(), list(self.trained.values()), cfg.merge, cfg.merge_lambda, cfg.ties_k,
                               cfg.ties_lambda).to(self.device).eval()
        if dist.is_main():  # the step's module file is the merge (checksummed at the commit, after this)
            save_module(module, self.model.backbone, domain, self.run_dir / trained_file(domain, self.weights))
            save_module(merged, self.model.backbone, domain, module_path(self.run_dir, domain, self.weights))
        self.model.add_domain(domain, merged)
        log.info("merge (%s) of %s: %d parameters", cfg.merge, ", ".join(self.trained), merged.counted_parameters())
        return {"merge": {"how": cfg.merge, "domains": list(self.trained),
                          "merged_parameters": merged.counted_parameters()}}

    def current(self) -> Optional[LearningModule]:
        """The latest merge (None before any domain trained: the frozen model)."""
        k = self.model.latest_trained()
        return None if k < 0 else self.model.module_for(self.model.domains[k])

    def segment(self, prefix: Features, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self.model.segment_one(self.current(), prefix, batch.points, batch.labels, images=batch.images)
        return logits, torch.full((len(batch.names),), -1, device=logits.device)

    def restore(self, completed: List[str]) -> None:
        for d in completed:
            if d not in self.cfg.unseen:
                self.trained[d] = load_module(self.run_dir / trained_file(d, self.weights), self.model.backbone,
                                              self.model.kind).to(self.device)

    def step_files(self, domain: str) -> List[str]:
        return [] if domain in self.cfg.unseen else [trained_file(domain, self.weights)]

    def kept_files(self, done: List[str]) -> List[str]:
        """Every trained module (re-merging needs them); the latest merge is the run's module."""
        return [rel for d in done for rel in self.step_files(d)]
