"""Online EWC (Schwarz et al. 2018, "Progress & Compress"; mammoth's ewc_on): ONE shared module
trained through the domains, held near the parameters that mattered for the earlier ones.

After each trained domain, the diagonal empirical Fisher of the module's trainable parameters on
that domain's training data: the squared gradient of each image's own loss (the configured
training loss of the image alone, a batch of one, so the IoU-head term is not divided by the
batch size), averaged over the images. The per-image gradients come from a loop over the images
(exact; the learning modules are small, so one forward and backward per image is cheap next to
the epochs), through the training forward (:class:`SegmentStep`) on the frozen features the
training cache keeps (the module's ``frozen_features``: ``encode_prefix``, for CAD with the frozen
embedding). The pass runs the backbone and the module in eval mode, the mode in which the module
is tested (and, under train_mode "reference", trained after the first validation), in the
training precision (``--amp``), and puts the modes back after. Then, with gamma = ``ewc_gamma``:

    F <- gamma * F + F_domain,    theta* <- theta (the module now),

and every later batch adds ``ewc_lambda / 2 * sum F (theta - theta*)^2`` to its loss (nothing
before the first domain ends). Under torchrun each rank computes the squared gradients of its
share of the data (DistributedSampler's share, whose last images may repeat a few), the sums and
the image counts are added across ranks, so every rank holds the same Fisher.

Files: ``ewc/after_<domain>`` holds F as of that step (storage counts the latest one with the
module; a step that trains nothing writes it unchanged). theta* is the module at the end of the
latest trained domain, which its module file already holds, so it is not written twice: a resume
takes theta* from that module (files written with theta* inside are read as before) and F from
the latest finished step's file. F and theta* change only at the end of a domain, so the
partial-epoch state is empty.
"""
import logging
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import distributed as dist
from ..backbones.base import Features
from ..io import load_tagged, save_tagged
from ..loading import Batch, progress, to_device
from ..losses import training_loss
from ..learning_modules.base import LearningModule
from ..precision import amp_forward
from ..registry import register_method
from ..settings import Settings, setting
from ..run_folder import RunFolderError, step_snapshot
from ..training_step import SegmentStep
from .base import Forward
from .finetune import FineTune

log = logging.getLogger("samcl.methods.ewc")

FOLDER = "ewc"  # ewc/after_<domain>.<suffix>
FORMAT = "samcl-ewc"
Tensors = Dict[str, torch.Tensor]  # by parameter name


def trainable(module: nn.Module) -> Dict[str, nn.Parameter]:
    """The parameters of ``module`` that train, by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def squared_gradients(params: Dict[str, torch.Tensor], losses: Iterable[torch.Tensor]) -> Tuple[Tensors, int]:
    """Sum over the scalar ``losses`` (one per image) of each parameter's squared gradient
    (zero where a loss does not reach it), and how many losses there were."""
    names, tensors = list(params), list(params.values())
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    for loss in losses:
        for n, g in zip(names, torch.autograd.grad(loss, tensors, allow_unused=True)):
            if g is not None:
                total[n] += g.detach().float() ** 2
        count += 1
    return total, count


def sum_over_ranks(total: Tensors, count: int) -> Tuple[Tensors, int]:
    """Add every rank's sums and counts (in rank order: the same result on every rank)."""
    if not dist.is_distributed():
        return total, count
    names = list(total)
    if not names:
        return total, sum(dist.all_gather_objects(count))
    flat = torch.cat([total[n].reshape(-1) for n in names]).unsqueeze(0)
    flat = dist.all_gather_tensor(flat).sum(0)
    out, at = {}, 0
    for n in names:
        k = total[n].numel()
        out[n] = flat[at: at + k].reshape(total[n].shape)
        at += k
    return out, sum(dist.all_gather_objects(count))


def online_fisher(running: Tensors, new: Tensors, gamma: float) -> Tensors:
    """``gamma * running + new`` (``new`` alone before the first domain)."""
    return {n: gamma * running[n] + f if n in running else f.clone() for n, f in new.items()}


def ewc_penalty(params: Dict[str, torch.Tensor], fisher: Tensors, theta: Tensors, lam: float) -> torch.Tensor:
    """``lam / 2 * sum F (params - theta)^2`` over the parameters ``fisher`` names."""
    return lam / 2 * sum((fisher[n] * (params[n] - theta[n]) ** 2).sum() for n in fisher)


class EWCSettings(Settings):
    """Online EWC."""

    ewc_lambda: float = setting(100.0, "ewc: weight of the penalty lambda/2 sum F (theta - theta*)^2")
    ewc_gamma: float = setting(1.0, "ewc: decay of the running Fisher (online EWC)")


@register_method("ewc")
class EWC(FineTune):
    loss_terms = ("task", "ewc_penalty")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fisher: Tensors = {}  # the running Fisher F
        self.theta: Tensors = {}  # theta*: the module after the latest trained domain

    def observe(self, batch: Batch, prefix: Features, forward: Forward) -> torch.Tensor:
        loss = super().observe(batch, prefix, forward)
        if not self.fisher:
            return loss
        return loss + self.term("ewc_penalty", ewc_penalty(trainable(self.current()), self.fisher, self.theta,
                                                           self.cfg.ewc_lambda))

    def end_domain(self, t: int, domain: str, module: Optional[LearningModule],
                   data: Optional[DataLoader]) -> Dict[str, Any]:
        record: Dict[str, Any] = {}
        if module is not None:
            fisher, images = self.domain_fisher(module, data, domain)
            self.fisher = online_fisher(self.fisher, fisher, self.cfg.ewc_gamma)
            self.theta = {n: p.detach().clone() for n, p in trainable(module).items()}
            record["fisher_images"] = images
            log.info("%s: Fisher over %d images, mean %.3g (running: %.3g)", domain, images,
                     _mean(fisher), _mean(self.fisher))
        if dist.is_main():
            save_tagged({"format": FORMAT, "version": 2, "domain": domain, "gamma": self.cfg.ewc_gamma,
                         "fisher": self.fisher}, self.run_dir / self.snapshot(domain))
        return {**super().end_domain(t, domain, module, data), **record}

    def domain_fisher(self, module: LearningModule, data: DataLoader, domain: str = "") -> Tuple[Tensors, int]:
        """The diagonal empirical Fisher of ``module``'s trainable parameters on ``data`` (every
        rank's share), and the number of images it averages."""
        parts = (self.model.backbone, module)
        modes = [m.training for m in parts]
        for m in parts:
            m.eval()
        try:
            total, count = squared_gradients(trainable(module), self.image_losses(module, data, domain))
        finally:
            for m, mode in zip(parts, modes):
                m.train(mode)
        total, count = sum_over_ranks(total, count)
        return {n: f / max(count, 1) for n, f in total.items()}, count

    def image_losses(self, module: LearningModule, data: DataLoader, domain: str = "") -> Iterator[torch.Tensor]:
        """The configured training loss of each image of ``data`` alone, through the training
        forward (the frozen features as the training cache computes them)."""
        cfg, backbone = self.cfg, self.model.backbone
        forward = amp_forward(SegmentStep(backbone, module), cfg.amp, self.device)
        for raw in progress(data, f"{domain} Fisher", unit="batch"):
            b = to_device(raw, self.device)
            with torch.no_grad():
                prefix = module.frozen_features(backbone, b.images)
            heat = self.model.heatmap(b.points, b.labels) if self.model.needs_heatmap else None
            for i in range(len(b.names)):
                one = slice(i, i + 1)
                logits, iou = forward({k: v[one] for k, v in prefix.items()}, None if heat is None else heat[one],
                                      b.points[one], b.labels[one], b.images[one], self.model.boxes(1))
                yield training_loss(cfg.loss, logits, iou, b.masks[one], cfg.iou_target, cfg.focal)

    # ------------------------------------------------------------------ state in the run folder
    def snapshot(self, domain: str) -> str:
        return step_snapshot(FOLDER, domain, self.weights)

    def step_files(self, domain: str) -> List[str]:
        return [self.snapshot(domain)]

    def restore(self, completed: List[str]) -> None:
        if completed:
            state = load_tagged(self.run_dir / self.snapshot(completed[-1]), (FORMAT,), "EWC state", RunFolderError)
            self.fisher = {n: f.to(self.device) for n, f in state["fisher"].items()}
            if "theta" in state:  # written before theta* was read from the module file
                self.theta = {n: p.to(self.device) for n, p in state["theta"].items()}
            elif self.fisher and self.current() is not None:
                self.theta = {n: p.detach().clone() for n, p in trainable(self.current()).items()}


def _mean(tensors: Tensors) -> float:
    n = sum(t.numel() for t in tensors.values())
    return float(sum(t.double().sum() for t in tensors.values()) / max(n, 1))
