"""LoRA on the qkv projections of the blocks after the selector layer.

``qkv(x) + (alpha / r) * B(A(x))`` with ``A`` (in -> r) Kaiming-uniform and ``B``
(r -> out) zero-initialised, so a fresh module is the frozen backbone; only A and B
train. The blocks up to the selector layer are untouched, so the frozen prefix (and
the Module Selector's embedding) is shared with every other module, as the AugModule's.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..backbones.base import Backbone
from ..registry import register_learning_module
from .base import Hook, LearningModule, ModuleSpec


@dataclass(frozen=True)
class LoRASpec(ModuleSpec):
    """layers: block indices; shapes: (in, out) of each layer's qkv; rank r; alpha (scale alpha / r)."""

    layers: Tuple[int, ...]
    shapes: Tuple[Tuple[int, int], ...]
    rank: int = 10
    alpha: float = 10.0

    @classmethod
    def for_backbone(cls, backbone: Backbone, cfg: Any = None) -> "LoRASpec":
        rank = int(getattr(cfg, "rank", None) or 10)
        layers = tuple(range(backbone.selector_layer + 1, backbone.depth))
        return cls(layers=layers, shapes=tuple(_shape(backbone, i) for i in layers), rank=rank, alpha=float(rank))

    def check(self, backbone: Backbone) -> None:
        problems = []
        if self.layers and min(self.layers) <= backbone.selector_layer:
            problems.append(f"layers {list(self.layers)} reach the frozen prefix (selector layer "
                            f"{backbone.selector_layer})")
        for i, shape in zip(self.layers, self.shapes):
            if not 0 <= i < backbone.depth or _shape(backbone, i) != tuple(shape):
                problems.append(f"block {i} has no qkv of shape {tuple(shape)}")
        if problems:
            raise ValueError(f"LoRA module does not fit backbone {backbone.family}/{backbone.arch}: "
                             + "; ".join(problems))


def _shape(backbone: Backbone, i: int) -> Tuple[int, int]:
    qkv = backbone.qkv(i)
    return (qkv.in_features, qkv.out_features)


@register_learning_module("lora")
class LoRAModule(LearningModule):
    spec_class = LoRASpec

    def __init__(self, spec: LoRASpec) -> None:
        super().__init__(spec)
        self.scale = spec.alpha / spec.rank
        self.A = nn.ModuleList(nn.Linear(i, spec.rank, bias=False) for i, _ in spec.shapes)
        self.B = nn.ModuleList(nn.Linear(spec.rank, o, bias=False) for _, o in spec.shapes)
        for b in self.B:
            nn.init.zeros_(b.weight)

    def hooks(self, backbone: Backbone, context: Dict[str, Any]) -> List[Hook]:
        """A forward hook on the qkv projection of every layer: adds ``scale * B(A(x))``."""
        def make(a: nn.Linear, b: nn.Linear):
            def hook(_module, inputs, output: torch.Tensor) -> torch.Tensor:
                return output + self.scale * b(a(inputs[0]))
            return hook

        return [(backbone.qkv(i), "forward", make(a, b)) for i, a, b in zip(self.spec.layers, self.A, self.B)]
