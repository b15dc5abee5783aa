"""SAM-Adapter-style bottleneck adapters in every encoder block.

Each block's MLP gets a parallel bottleneck ``mlp(x) + up(GELU(down(x)))`` with hidden
width ``max(4, width * ratio)`` (ratio 1/32: 24 for ViT-B, as SAM-Adapter's) and ``up``
zero-initialised, so a fresh module is the frozen backbone. The adapters sit in the
prefix blocks too, so this module runs the whole encoder from the image with autograd
(``reads_images``); the Module Selector still reads the frozen prefix.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone, DecodeOptions, Features
from ..registry import register_learning_module
from .base import Hook, LearningModule, ModuleSpec


@dataclass(frozen=True)
class AdapterSpec(ModuleSpec):
    """widths: the MLP width of every block (in order); hidden: the bottleneck widths."""

    widths: Tuple[int, ...]
    hidden: Tuple[int, ...]

    @classmethod
    def for_backbone(cls, backbone: Backbone, cfg: Any = None, ratio: float = 1 / 32) -> "AdapterSpec":
        widths = tuple(_width(backbone, i) for i in range(backbone.depth))
        return cls(widths=widths, hidden=tuple(max(4, int(w * ratio)) for w in widths))

    def check(self, backbone: Backbone) -> None:
        have = tuple(_width(backbone, i) for i in range(backbone.depth))
        if have != tuple(self.widths):
            raise ValueError(f"adapter module (block widths {list(self.widths)}) does not fit backbone "
                             f"{backbone.family}/{backbone.arch} (block widths {list(have)})")


def _width(backbone: Backbone, i: int) -> int:
    return backbone.geometry(i).width  # the block's MLP runs at its output width


class Bottleneck(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x)))


@register_learning_module("adapter")
class AdapterModule(LearningModule):
    spec_class = AdapterSpec
    reads_images = True

    def __init__(self, spec: AdapterSpec) -> None:
        super().__init__(spec)
        self.adapters = nn.ModuleList(Bottleneck(w, h) for w, h in zip(spec.widths, spec.hidden))

    def hooks(self, backbone: Backbone, context: Dict[str, Any]) -> List[Hook]:
        """A forward hook on every block's MLP: adds the block's bottleneck of the MLP's input."""
        def make(adapter: Bottleneck):
            return lambda _module, inputs, output: output + adapter(inputs[0])

        return [(backbone.mlp(i), "forward", make(a)) for i, a in enumerate(self.adapters)]

    def segment(self, backbone: Backbone, prefix: Features, images: Optional[torch.Tensor],
                heatmap: Optional[torch.Tensor], points: torch.Tensor, labels: torch.Tensor,
                boxes: Optional[torch.Tensor] = None, low_res: bool = False,
                options: Optional[DecodeOptions] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The whole encoder from the images with the adapters, then the decoder."""
        if images is None:
            raise ValueError("an adapter module needs the batch's images (it acts inside every encoder block)")
        with self.attached(backbone):
            features = backbone.encode_suffix(backbone.prefix(images))
        return backbone.decode(features, points, labels, boxes=boxes, low_res=low_res, options=options)
