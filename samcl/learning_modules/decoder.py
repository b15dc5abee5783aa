"""Decoder fine-tuning: the frozen encoder, and a trainable copy of the mask decoder per domain.

On SAM 2 the copy leaves out the decoder's high-resolution projections (``conv_s0``,
``conv_s1``): they run inside the frozen image path, before the decoder proper, and
stay the backbone's own.
"""
import copy
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import nn

from ..backbones.base import Backbone, DecodeOptions, Features
from ..registry import register_learning_module
from .base import LearningModule, ModuleSpec

IMAGE_PATH_PARTS = ("conv_s0", "conv_s1")  # SAM 2: used by the image path, not by the decoder's forward


@dataclass(frozen=True)
class DecoderSpec(ModuleSpec):
    """parameters: the decoder copy's parameter count (to refuse another backbone's decoder)."""

    parameters: int

    @classmethod
    def for_backbone(cls, backbone: Backbone, cfg: Any = None) -> "DecoderSpec":
        """Counted on the backbone's decoder itself (no copy), without the image-path parts."""
        return cls(parameters=sum(p.numel() for name, p in backbone.mask_decoder.named_parameters()
                                  if name.split(".")[0] not in IMAGE_PATH_PARTS))

    def check(self, backbone: Backbone) -> None:
        have = DecoderSpec.for_backbone(backbone).parameters
        if have != self.parameters:
            raise ValueError(f"decoder module ({self.parameters:,} parameters) does not fit backbone "
                             f"{backbone.family}/{backbone.arch} (its decoder has {have:,})")


def _copy(backbone: Backbone) -> nn.Module:
    decoder = copy.deepcopy(backbone.mask_decoder)
    for name in IMAGE_PATH_PARTS:
        if hasattr(decoder, name):
            delattr(decoder, name)
    return decoder.requires_grad_(True)


@register_learning_module("decoder")
class DecoderModule(LearningModule):
    spec_class = DecoderSpec
    # with one mask output, the other mask tokens' heads get no gradient
    has_unused_parameters = True

    def __init__(self, spec: DecoderSpec, decoder: nn.Module) -> None:
        super().__init__(spec)
        self.decoder = decoder

    @classmethod
    def build(cls, spec: DecoderSpec, backbone: Backbone) -> "DecoderModule":
        return cls(spec, _copy(backbone))

    def segment(self, backbone: Backbone, prefix: Features, images: Optional[torch.Tensor],
                heatmap: Optional[torch.Tensor], points: torch.Tensor, labels: torch.Tensor,
                boxes: Optional[torch.Tensor] = None, low_res: bool = False,
                options: Optional[DecodeOptions] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            features = backbone.encode_suffix(prefix)
        return backbone.decode(features, points, labels, boxes=boxes, low_res=low_res, mask_decoder=self.decoder,
                               options=options)
