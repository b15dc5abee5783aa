"""CAD: the memory-efficient convolutional adapter, as a per-domain learning module.

A small convolutional network runs *beside* the frozen image encoder on the image
and its high-frequency part; its output is added to the encoder's embedding
(``embedding + 0.1 * adapter``) before a per-domain fine-tuned copy of SAM's mask
decoder. The encoder runs without autograd, so none of its activations are kept
for backward: training memory is the adapter's and the decoder's only.

Sizes are derived from the backbone (ViT-B at 1024 in brackets):

* adapter channels = the encoder embedding's channels (256);
* adapter grid = the embedding grid (64 x 64);
* adapter input side = 8 x grid (512): the three 2x2 pools then end exactly on the
  grid, and for SAM's patch-16 encoders this is img_size / 2, i.e. CAD's 512 at 1024,
  scaled with ``--img_size`` (img_size 512 -> 256; the vit_tiny test model, 128 px with
  patch 8 and a 16 x 16 grid -> 128).

Only SAM (ViT) backbones: SAM 2's mask decoder also owns the high-resolution feature
projections (``conv_s0``/``conv_s1``) that run inside its image path, before the
decoder proper, so "fine-tune the whole decoder while the encoder runs without
autograd" does not fit that backbone's split without re-plumbing its image path
(docs/cad.md).
"""
import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone, DecodeOptions
from ..registry import register_learning_module
from .base import LearningModule, ModuleSpec

# fraction of the spectrum's area (H*W) whose centred square is removed (CAD, SAM-Adapter: tau = 0.25)
TAU = 0.25
EPS = 1e-5


def high_pass(x: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """High-frequency part of every channel: |real(IFFT(FFT(x) with a centred square zeroed))|.

    The spectrum is the centred (``fftshift``) 2-D FFT with ``norm="forward"``; the zeroed
    square has side ``2 * floor(sqrt(H * W * tau) / 2)`` (256 of 512 for tau 0.25) around
    the centre (the DC term); the inverse uses the matching norm.

    Args:
        x: (N, C, H, W) real.
    Returns:
        (N, C, H, W), float32, >= 0.
    """
    x = x.float()
    h, w = x.shape[-2:]
    half = int(math.sqrt(h * w * tau) // 2)
    with torch.autocast(x.device.type, enabled=False):  # FFT in float32 under AMP too
        spec = torch.fft.fftshift(torch.fft.fft2(x, norm="forward"), dim=(-2, -1))
        keep = torch.ones(h, w, device=x.device)
        keep[h // 2 - half: h // 2 + half, w // 2 - half: w // 2 + half] = 0
        spec = spec * keep
        out = torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1)), norm="forward").real
    return out.abs()


def high_frequency(images: torch.Tensor, side: int = 512, tau: float = TAU) -> torch.Tensor:
    """CAD's adapter input.

    The image is resized to ``side`` x ``side`` (bilinear), kept as float 0..255, and its
    high-frequency part (:func:`high_pass`) is appended -> 6 channels; every channel is
    then divided by its own maximum + 1e-5 (per image).

    Args:
        images: (N, 3, H, W) float 0..255 (the model input, any size).
    Returns:
        (N, 6, side, side) float32 in [0, 1).
    """
    x = images.float()
    if x.shape[-2:] != (side, side):
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    x = torch.cat([x, high_pass(x, tau)], dim=1)
    return x / (x.amax(dim=(2, 3), keepdim=True) + EPS)


class ConvBlock(nn.Module):
    """3x3 conv (dilation 2, 'same'), BatchNorm, LeakyReLU(0.1), residual add, 2x2 average pool."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, dilation=2, padding="same")
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x + self.act(self.bn(self.conv(x))))


class ConvAdapter(nn.Module):
    """6 -> ``channels`` 1x1 conv, three :class:`ConvBlock` (side/2, /4, /8), each block's
    output adaptive-average-pooled to ``grid`` x ``grid``, summed, tanh.

    The 1x1 conv keeps PyTorch's default initialisation, the blocks' convs are
    Kaiming-normal (fan_out), BatchNorm weight 1 / bias 0, as in the authors' code.
    """

    def __init__(self, channels: int = 256, grid: int = 64, in_chans: int = 6) -> None:
        super().__init__()
        self.grid = grid
        self.conv_up = nn.Conv2d(in_chans, channels, kernel_size=1)
        self.blocks = nn.ModuleList(ConvBlock(channels) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 6, S, S) -> (N, channels, grid, grid) in (-1, 1)."""
        x = self.conv_up(x)
        out: Optional[torch.Tensor] = None
        for block in self.blocks:
            x = block(x)
            pooled = F.adaptive_avg_pool2d(x, self.grid)
            out = pooled if out is None else out + pooled
        return torch.tanh(out)


@dataclass(frozen=True)
class CADSpec(ModuleSpec):
    """Everything needed to rebuild a CAD module; derived from the backbone (:meth:`for_backbone`).

    channels: adapter output channels = encoder embedding channels (256 on SAM).
    grid: embedding grid side (64 at 1024).
    in_side: adapter input side, 8 * grid (512 at 1024).
    scale: weight of the adapter output in the embedding (0.1).
    """

    channels: int
    grid: int
    in_side: int
    scale: float = 0.1

    @classmethod
    def for_backbone(cls, backbone: Backbone, cfg: Any = None) -> "CADSpec":
        if getattr(backbone, "family", None) != "sam":
            raise ValueError(
                f"CAD needs a SAM (ViT) backbone, got {getattr(backbone, 'family', type(backbone).__name__)}: "
                f"SAM 2's mask decoder also owns the high-resolution projections (conv_s0/conv_s1) inside its "
                f"image path, so fine-tuning the whole decoder beside an autograd-free encoder does not fit "
                f"that backbone (docs/cad.md)")
        return cls(channels=int(backbone.embedding_channels), grid=int(backbone.grid_size),
                   in_side=8 * int(backbone.grid_size))

    def check(self, backbone) -> None:
        """Refuse a CAD module built for another backbone, naming both."""
        expected = CADSpec.for_backbone(backbone)
        if (self.channels, self.grid) != (expected.channels, expected.grid):
            raise ValueError(f"CAD module ({self.channels} channels, {self.grid}x{self.grid} grid) does not fit "
                             f"backbone {backbone.family}/{backbone.arch} ({expected.channels} channels, "
                             f"{expected.grid}x{expected.grid} grid)")


FROZEN_EMBEDDING = "cad_frozen_embedding"


@torch.no_grad()
def frozen_features(backbone, images: Optional[torch.Tensor], prefix: Optional[Dict[str, torch.Tensor]] = None
                    ) -> Dict[str, torch.Tensor]:
    """Everything of the frozen encoder that CAD reads: the prefix (the selector needs it) and the
    whole encoder embedding (N, C, G, G), computed without autograd. Under CAD the entire encoder is
    frozen, so the training cache keeps both and later epochs skip the encoder altogether."""
    prefix = dict(backbone.encode_prefix(images) if prefix is None else prefix)
    prefix[FROZEN_EMBEDDING] = backbone.encode_suffix(prefix)["image_embeddings"]
    return prefix


@register_learning_module("cad")
class CADModule(LearningModule):
    """The trainable module of one domain: a :class:`ConvAdapter` and its own copy of SAM's
    mask decoder (the backbone's prompt encoder and image encoder stay frozen and shared).
    Not zero-initialised (CAD's recipe): a fresh module already changes the embedding."""

    spec_class = CADSpec
    reads_images = True
    # under CAD's loss the decoder's IoU head and the extra multimask tokens get no gradient
    has_unused_parameters = True
    backbones = ("sam",)
    backbone_reason = ("SAM 2's mask decoder also owns the high-resolution projections (conv_s0/conv_s1) inside "
                       "its image path, so fine-tuning the whole decoder beside an autograd-free encoder does not "
                       "fit that backbone (docs/cad.md)")

    def __init__(self, spec: CADSpec, mask_decoder: nn.Module) -> None:
        super().__init__(spec)
        self.adapter = ConvAdapter(spec.channels, spec.grid)
        self.decoder = copy.deepcopy(mask_decoder)
        self.decoder.requires_grad_(True)

    @classmethod
    def build(cls, spec: CADSpec, backbone: Backbone) -> "CADModule":
        return cls(spec, backbone.mask_decoder)

    # ------------------------------------------------------------------ size
    def describe(self) -> str:
        a = sum(p.numel() for p in self.adapter.parameters())
        d = sum(p.numel() for p in self.decoder.parameters())
        return (f"CAD module: {self.counted_parameters():,} parameters = {self.counted_size_mb():.4f} MB "
                f"(ConvAdapter {a:,} + mask decoder {d:,}; float32; all trainable) "
                f"adapter input {self.spec.in_side}x{self.spec.in_side} -> {self.spec.channels}x"
                f"{self.spec.grid}x{self.spec.grid}, embedding + {self.spec.scale} x adapter")

    # ------------------------------------------------------------------ maths
    def embedding(self, backbone, prefix, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(frozen encoder embedding without autograd, adapter output), both (N, C, G, G)."""
        if images is None:
            raise ValueError("a CAD module needs the batch's images (the adapter reads them)")
        frozen = prefix.get(FROZEN_EMBEDDING)  # present when the training cache holds it
        if frozen is None:
            frozen = frozen_features(backbone, None, prefix)[FROZEN_EMBEDDING]
        return frozen, self.adapter(high_frequency(images, self.spec.in_side))

    def frozen_features(self, backbone, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """What the training cache keeps for CAD: the prefix and the whole frozen embedding."""
        return frozen_features(backbone, images)

    def segment(self, backbone, prefix, images: Optional[torch.Tensor], heatmap: Optional[torch.Tensor],
                points: torch.Tensor, labels: torch.Tensor, boxes: Optional[torch.Tensor] = None,
                low_res: bool = False, options: Optional[DecodeOptions] = None):
        """Logits (N, C, S, S) (``low_res``: the decoder's own) and predicted IoU (N, C) with this
        domain's adapter and decoder (C = 1 unless ``options`` asks for multimask output)."""
        frozen, adapted = self.embedding(backbone, prefix, images)
        emb = frozen + self.spec.scale * adapted
        return backbone.decode({"image_embeddings": emb}, points, labels, boxes=boxes, low_res=low_res,
                               mask_decoder=self.decoder, options=options)
