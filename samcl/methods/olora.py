"""O-LoRA (Wang et al. 2023): a new LoRA pair per domain, kept orthogonal to the earlier ones.

At every trained domain the learning module (:mod:`samcl.learning_modules.olora`) grows by one LoRA
pair: the earlier pairs are copied from the previous module and frozen (no gradient, no
optimiser state), the new pair starts as a LoRA (A Kaiming-uniform, B zero, drawn from
seed + t). The loss adds ``olora_lambda * sum_layers sum_old sum_ij |(A_old^T A_new)_ij|``
(O-LoRA's L_orth; A as the paper's (in, r) matrices, see
:func:`samcl.learning_modules.olora.orthogonality`) to the segmentation loss (summed over the batch's
images). Inference is task-agnostic: every image with all pairs summed (no selector). The
module file of each step holds all its pairs, so only the latest one is kept.
"""
import dataclasses
from typing import Optional

import torch

from ..backbones.base import Features
from ..loading import Batch
from ..learning_modules.base import LearningModule
from ..registry import register_method
from ..settings import Settings, setting
from .base import Forward
from .finetune import FineTune


class OLoRASettings(Settings):
    """O-LoRA's orthogonality loss."""

    olora_lambda: float = setting(0.5, "olora: weight of the orthogonality loss sum |A_old^T A_new|")


@register_method("olora")
class OLoRA(FineTune):
    learning_modules = ("olora",)
    loss_terms = ("task", "olora_orthogonality")

    def begin_domain(self, t: int, domain: str, trains: bool) -> Optional[LearningModule]:
        """The previous module (resumed or tested: the latest trained domain's file) with one more
        pair; the new pair drawn from seed + t (with one pair, the LoRA that finetune draws
        from the seed at its first domain, for t = 0)."""
        if not trains:
            return None
        earlier = self.current()
        tasks = 1 if earlier is None else earlier.spec.tasks + 1
        spec = dataclasses.replace(self.model.spec, tasks=tasks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed + t)
            module = spec.build(self.model.backbone).to(self.model.device)
        if earlier is not None:
            module.take_earlier(earlier)
        self.shared = module
        return module

    def observe(self, batch: Batch, prefix: Features, forward: Forward) -> torch.Tensor:
        """The segmentation loss, plus ``olora_lambda`` times the orthogonality loss from the second pair on."""
        loss = super().observe(batch, prefix, forward)
        module = self.current()
        if module.spec.tasks > 1:
            loss = loss + self.term("olora_orthogonality", self.cfg.olora_lambda * module.orthogonality_loss())
        return loss
