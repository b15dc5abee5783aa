"""Joint training: ONE learning module trained once on the union of every training domain (the
upper bound of every comparison; not continual). It trains at the first step that has training
data, on the domains of the whole order in name order (so the result does not depend on the
order), and then only evaluates: each later step tests the domains seen so far with that module."""
from typing import List, Optional

from ..learning_modules.base import LearningModule
from ..registry import register_method
from .finetune import FineTune


@register_method("joint")
class Joint(FineTune):
    def begin_domain(self, t: int, domain: str, trains: bool) -> Optional[LearningModule]:
        """The module, drawn from the seed, at the first domain with training data; nothing after."""
        if not trains or self.current() is not None:
            return None
        return super().begin_domain(t, domain, trains)

    def training_domains(self, t: int, domain: str, trainable: List[str]) -> List[str]:
        return sorted(trainable)
