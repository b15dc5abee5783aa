"""LoRA on the qkv projections of the encoder blocks after the selector layer (or of every block).

``qkv(x) + (alpha / r) * B(A(x))`` with ``A`` (in -> r) Kaiming-uniform and ``B``
(r -> out) zero-initialised, so a fresh module is the frozen backbone; only A and B
train. With ``lora_blocks`` "after_selector" (the default) the blocks up to the selector
layer are untouched, so the frozen prefix (and the Module Selector's embedding) is shared
with every other module, as the AugModule's. With "all" every encoder block's qkv gets LoRA
(for the baselines that train one shared module and route nothing): the module then runs the
whole encoder from the image with autograd, as the adapter does (the Module Selector, where
there is one, still reads the frozen prefix). The mask decoder's attention has separate q, k
and v projections, not a qkv, so this kind leaves the decoder frozen.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..backbones.base import Backbone, DecodeOptions, Features
from ..registry import register_learning_module
from ..settings import Settings, setting
from .base import Hook, LearningModule, ModuleSpec


class LoRASettings(Settings):
    """Where LoRA acts."""

    lora_blocks: str = setting("after_selector", "lora: the encoder blocks whose qkv get LoRA: after_selector (those "
                               "after the selector layer, sharing the frozen prefix) or all (every block; the module "
                               "runs the whole encoder from the image)", choices=("after_selector", "all"))


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
        first = 0 if getattr(cfg, "lora_blocks", "after_selector") == "all" else backbone.selector_layer + 1
        layers = tuple(range(first, backbone.depth))
        return cls(layers=layers, shapes=tuple(_shape(backbone, i) for i in layers), rank=rank, alpha=float(rank))

    def check(self, backbone: Backbone) -> None:
        problems = []
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

    def segment(self, backbone: Backbone, prefix: Features, images: Optional[torch.Tensor],
                heatmap: Optional[torch.Tensor], points: torch.Tensor, labels: torch.Tensor,
                boxes: Optional[torch.Tensor] = None, low_res: bool = False,
                options: Optional[DecodeOptions] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """After the selector layer only: the frozen prefix through the hooked suffix. On blocks of
        the prefix too (``lora_blocks`` all): the whole encoder from the images."""
        if not self.spec.layers or min(self.spec.layers) > backbone.selector_layer:
            return super().segment(backbone, prefix, images, heatmap, points, labels, boxes, low_res, options)
        if images is None:
            raise ValueError("a LoRA module on every block needs the batch's images (it acts inside the prefix)")
        with self.attached(backbone):
            features = backbone.encode_suffix(backbone.prefix(images))
        return backbone.decode(features, points, labels, boxes=boxes, low_res=low_res, options=options)
