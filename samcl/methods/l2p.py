"""L2P, Learning to Prompt (Wang et al. 2022), as prefix tuning: ONE prompt pool trained through
the domains (as fine-tuning trains one shared module), every image choosing its prompts by the
cosine similarity of its frozen selector-layer embedding to the pool's keys
(:mod:`samcl.learning_modules.prompt_pool`). The loss adds L2P's key-pull term,
``l2p_pull_weight * mean over images of sum over the chosen keys of (1 - cos(query, key))``, to
the segmentation loss (summed over the batch's images); the keys get their gradient from that
term only. Inference is task-agnostic (the same choice of prompts, no selector). Every image takes its
own top-k during training too: neither L2P's optional "prompt frequency" balancing nor its released
code's batch-wise choice (the batch's most frequent prompts for every image) is used. Besides the pool
(the protocol saves it with every partial epoch), the method counts how often each prompt was chosen
while a domain trained (every image of every epoch): the step records it as ``prompt_histogram``
(M counts), which shows whether the domains pick the same prompts.

What is built is closer to DualPrompt's E-prompts than to L2P's input-level prompts: see
:mod:`samcl.learning_modules.prompt_pool`.
"""
from typing import Any, Dict, Optional

import torch
from torch.utils.data import DataLoader

from .. import distributed as dist

from ..backbones.base import Features
from ..loading import Batch
from ..learning_modules.base import LearningModule
from ..learning_modules.prompt_pool import pull_loss
from ..registry import register_method
from ..settings import Settings, setting
from .base import Forward
from .finetune import FineTune


class L2PSettings(Settings):
    """L2P's key-pull loss (the pool's own sizes are the prompt_pool learning module's settings)."""

    l2p_pull_weight: float = setting(0.1, "l2p: weight of the key-pull loss")


@register_method("l2p")
class L2P(FineTune):
    learning_modules = ("prompt_pool",)
    loss_terms = ("task", "l2p_pull")
    histogram: Optional[torch.Tensor] = None  # (M,) prompt choices while the current domain trains

    def begin_domain(self, t: int, domain: str, trains: bool) -> Optional[LearningModule]:
        """The shared pool (drawn from the seed at the first domain). Every parameter gets a gradient
        (the keys from the pull term, always in the loss), which DDP is told."""
        module = super().begin_domain(t, domain, trains)
        if module is not None:
            module.has_unused_parameters = False
            self.histogram = torch.zeros(module.spec.pool_size, dtype=torch.long, device=self.device)
        return module

    def observe(self, batch: Batch, prefix: Features, forward: Forward) -> torch.Tensor:
        """The segmentation loss plus ``l2p_pull_weight`` times the pull loss of the batch's chosen keys."""
        loss = super().observe(batch, prefix, forward)
        pool = self.current()
        # every rank counts every rank's choices: one histogram, saved whole with the partial epoch
        chosen = dist.all_gather_tensor(pool.last_chosen)
        self.histogram += torch.bincount(chosen.flatten(), minlength=pool.spec.pool_size)
        return loss + self.term("l2p_pull", self.cfg.l2p_pull_weight * pull_loss(pool.last_similarity))

    def end_domain(self, t: int, domain: str, module: Optional[LearningModule],
                   data: Optional[DataLoader]) -> Dict[str, Any]:
        """The step's record: how often each prompt of the pool was chosen while the domain trained
        (every rank's images, with the repeats that pad the last share under torchrun)."""
        out = super().end_domain(t, domain, module, data)
        if module is not None and self.histogram is not None:
            out["prompt_histogram"] = self.histogram.tolist()
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {} if self.histogram is None else {"prompt_histogram": self.histogram.cpu()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "prompt_histogram" in state:
            self.histogram = state["prompt_histogram"].to(self.device)
