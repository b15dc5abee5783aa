"""Learning without Forgetting (Li & Hoiem 2016), for mask logits: ONE shared module trained
through the domains; from the second trained domain on, every batch also distils the module as it
was after the previous trained domain (a frozen copy) into the module that trains.

On the current batch, with the copy's mask logits o (no autograd) and the current ones n, both
(N, 1, S, S), and the temperature T = ``lwf_temperature``, the loss adds

    lwf_lambda * T^2 * sum over images of the mean over pixels of KL( sigmoid(o/T) || sigmoid(n/T) ),

the KL divergence of two Bernoulli distributions (the two-class case of the paper's softened
softmax; T^2 keeps the gradient's scale independent of T, Hinton et al. 2015). The per-image means
are summed over the batch as the segmentation loss sums its per-image terms, so the weight of the
two terms does not depend on the batch size. The KL is written from the logits with logsigmoid,
``p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q))`` with ``log p = logsigmoid(o/T)`` and
``log(1 - p) = logsigmoid(-o/T)``: exactly 0 for equal logits, finite for any.

The paper records the old network's responses once before training; the copy is frozen and the
images carry no augmentation, so computing them per batch gives the same targets. The copy runs
on the same frozen features, in the same precision (``--amp``) and in the current module's
train/eval mode, so the term is exactly 0 while the module equals the copy (with a BatchNorm both
normalise by the batch statistics; the copy's running statistics, which train mode does not read,
are never used). On resume the copy comes from :meth:`FineTune.current`, the module file of the
latest trained domain (bit for bit the module that was in memory); nothing changes within a
domain, so the partial-epoch state is empty.
"""
import copy
from typing import Optional

import torch
import torch.nn.functional as F

from ..backbones.base import Features
from ..loading import Batch
from ..learning_modules.base import LearningModule
from ..precision import amp_forward
from ..registry import register_method
from ..settings import Settings, setting
from ..training_step import SegmentStep
from .base import Forward
from .finetune import FineTune


def bernoulli_kl(old_logits: torch.Tensor, new_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per pixel KL( sigmoid(old/T) || sigmoid(new/T) ), the shape of the inputs; 0 where they are equal."""
    a, b = old_logits / temperature, new_logits / temperature
    p = torch.sigmoid(a)
    return p * (F.logsigmoid(a) - F.logsigmoid(b)) + (1 - p) * (F.logsigmoid(-a) - F.logsigmoid(-b))


def distillation(old_logits: torch.Tensor, new_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, 1, S, S) logits -> the sum over images of each image's mean :func:`bernoulli_kl` (a scalar)."""
    return bernoulli_kl(old_logits, new_logits, temperature).flatten(1).mean(1).sum()


def frozen_copy(module: LearningModule) -> LearningModule:
    """A copy of ``module`` that does not train (no gradients, none carried over)."""
    old = copy.deepcopy(module)
    for p in old.parameters():
        p.requires_grad_(False)
        p.grad = None
    return old


class LwFSettings(Settings):
    """Learning without Forgetting's distillation."""

    lwf_lambda: float = setting(1.0, "lwf: weight of the distillation of the previous model's mask logits")
    lwf_temperature: float = setting(2.0, "lwf: temperature of that distillation", open_low=True)


@register_method("lwf")
class LwF(FineTune):
    old: Optional[LearningModule] = None  # the module after the previous trained domain
    loss_terms = ("task", "lwf_distillation")

    def begin_domain(self, t: int, domain: str, trains: bool) -> Optional[LearningModule]:
        """The shared module; from the second trained domain on, a frozen copy of it as it is now."""
        if trains:
            previous = self.current()
            self.old = None if previous is None else frozen_copy(previous)
        return super().begin_domain(t, domain, trains)

    def observe(self, batch: Batch, prefix: Features, forward: Forward) -> torch.Tensor:
        logits, iou = self.run_forward(batch, prefix, forward)
        loss = self.term("task", self.loss(logits, iou, batch))
        if self.old is None:
            return loss
        self.old.train(self.current().training)
        old_forward = amp_forward(SegmentStep(self.model.backbone, self.old), self.cfg.amp, self.device)
        with torch.no_grad():
            old_logits, _ = self.run_forward(batch, prefix, old_forward)
        t = self.cfg.lwf_temperature
        kd = self.cfg.lwf_lambda * t ** 2 * distillation(old_logits, logits, t)
        return loss + self.term("lwf_distillation", kd)
