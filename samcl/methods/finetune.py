"""Fine-tuning: ONE learning module trained through the domains in order, nothing against
forgetting (the lower bound of every comparison). Every test image uses the module as it is
after the latest domain; the run folder keeps its snapshot after each domain."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from ..backbones.base import Features
from ..loading import Batch
from ..learning_modules.base import LearningModule
from ..registry import register_method
from .base import ContinualMethod


@register_method("finetune")
class FineTune(ContinualMethod):
    routes = False
    keeps_embeddings = False
    keeps_every_module = False
    shared: Optional[LearningModule] = None

    def begin_domain(self, t: int, domain: str, trains: bool) -> Optional[LearningModule]:
        """The shared module (drawn from the seed at the first domain), trained on further."""
        if not trains:
            return None
        if self.current() is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                self.shared = self.model.new_module()
        return self.current()

    def end_domain(self, t: int, domain: str, module: Optional[LearningModule],
                   data: Optional[DataLoader]) -> Dict[str, Any]:
        self.model.add_domain(domain, module)
        return {}

    def current(self) -> Optional[LearningModule]:
        """The module as trained so far: the one in training, or (resumed or testing a run folder) the
        snapshot of the latest domain that trained."""
        if self.shared is None:
            trained = [d for d in self.model.domains if self.model.module_for(d) is not None]
            self.shared = self.model.module_for(trained[-1]) if trained else None
        return self.shared

    def segment(self, prefix: Features, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self.model.segment_one(self.current(), prefix, batch.points, batch.labels, images=batch.images)
        return logits, torch.full((len(batch.names),), -1, device=logits.device)
