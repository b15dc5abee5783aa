"""Zero-shot: the frozen model, nothing trains (the floor of every comparison; no forgetting by construction)."""
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from ..backbones.base import Features
from ..loading import Batch
from ..learning_modules.base import LearningModule
from ..registry import register_method
from .base import ContinualMethod


@register_method("zeroshot")
class ZeroShot(ContinualMethod):
    routes = False
    keeps_embeddings = False
    keeps_every_module = False

    def begin_domain(self, t: int, domain: str, trains: bool) -> Optional[LearningModule]:
        return None

    def end_domain(self, t: int, domain: str, module: Optional[LearningModule],
                   data: Optional[DataLoader]) -> Dict[str, Any]:
        self.model.add_domain(domain, None)
        return {}

    def segment(self, prefix: Features, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self.model.segment_vanilla(prefix, batch.points, batch.labels)
        return logits, torch.full((len(batch.names),), -1, device=logits.device)
