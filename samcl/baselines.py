"""Reference learning modules for the memory comparison (bench/memory.py), not for the loop.

* :class:`BlockAdapters` -- a SAM-Adapter-style bottleneck adapter inside *every* encoder
  block (parallel to the block's MLP: ``mlp(x) + up(GELU(down(x)))``, hidden = dim/32
  as SAM-Adapter's adapters (24 for ViT-B), ``up`` zero-initialised), trained together
  with a copy of the mask decoder, as in the SAM-Adapter runs CAD compares against. Gradients must flow back through every
  encoder block, so autograd keeps all encoder activations.
* :class:`QKVLoRA` -- plain LoRA (rank r, ``B`` zero-initialised, scale alpha/r) on the qkv
  projection of the blocks the AugModule uses (after the selector layer); only the
  LoRA matrices train, like the AugModule.
* :class:`DecoderOnly` -- the encoder without autograd and a trainable copy of the decoder
  (CAD without its adapter).

All three act on the stock ``segment_anything`` modules through forward hooks that
exist only inside :meth:`attached` (nothing of the package is copied, and the backbone
is unchanged afterwards). Each offers ``forward(backbone, images, points, labels)`` ->
(logits, iou) for one training step.
"""
import copy
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _run_encoder(backbone, images: torch.Tensor) -> torch.Tensor:
    """The full SAM image encoder (patch embedding, blocks, neck), with whatever hooks are attached."""
    return backbone.sam.image_encoder(backbone.sam.preprocess(images.float()))


class Bottleneck(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x)))


class _Hooked(nn.Module):
    """Installs ``self._hooks()`` (target module, hook) pairs for the duration of :meth:`attached`."""

    def _hooks(self, backbone) -> List[Tuple[nn.Module, object]]:
        raise NotImplementedError

    @contextmanager
    def attached(self, backbone) -> Iterator[None]:
        handles = [m.register_forward_hook(h) for m, h in self._hooks(backbone)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class BlockAdapters(_Hooked):
    """SAM-Adapter-style: a bottleneck adapter in every encoder block + a fine-tuned decoder copy."""

    name = "SAM-Adapter-style"

    def __init__(self, backbone, ratio: float = 1 / 32, train_decoder: bool = True) -> None:
        super().__init__()
        enc = backbone.sam.image_encoder
        dim = enc.blocks[0].norm1.normalized_shape[0]
        self.adapters = nn.ModuleList(Bottleneck(dim, max(4, int(dim * ratio))) for _ in enc.blocks)
        self.decoder = copy.deepcopy(backbone.sam.mask_decoder).requires_grad_(True) if train_decoder else None

    def _hooks(self, backbone):
        def make(adapter):
            return lambda _m, inputs, output: output + adapter(inputs[0])

        return [(blk.mlp, make(a)) for blk, a in zip(backbone.sam.image_encoder.blocks, self.adapters)]

    def forward(self, backbone, images, points, labels, boxes=None):
        with self.attached(backbone):
            emb = _run_encoder(backbone, images)
        return backbone.decode({"image_embeddings": emb}, points, labels, boxes=boxes, mask_decoder=self.decoder)


class QKVLoRA(_Hooked):
    """LoRA on the qkv projection of ``layers`` (default: the AugModule's blocks); decoder frozen."""

    name = "LoRA (qkv)"

    def __init__(self, backbone, rank: int = 10, alpha: Optional[float] = None,
                 layers: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        enc = backbone.sam.image_encoder
        self.layers = tuple(layers if layers is not None else backbone.default_aug_spec().layers)
        self.scale = (alpha if alpha is not None else rank) / rank
        self.A = nn.ModuleList()
        self.B = nn.ModuleList()
        for i in self.layers:
            qkv = enc.blocks[i].attn.qkv
            self.A.append(nn.Linear(qkv.in_features, rank, bias=False))
            self.B.append(nn.Linear(rank, qkv.out_features, bias=False))
            nn.init.zeros_(self.B[-1].weight)

    def _hooks(self, backbone):
        def make(a, b):
            return lambda _m, inputs, output: output + self.scale * b(a(inputs[0]))

        blocks = backbone.sam.image_encoder.blocks
        return [(blocks[i].attn.qkv, make(a, b)) for i, a, b in zip(self.layers, self.A, self.B)]

    def forward(self, backbone, images, points, labels, boxes=None):
        # the blocks before the first LoRA layer get no gradient: run them once without autograd,
        # as SAMCL's prefix (the backbone's split is at the selector layer, the LoRA layers follow it)
        prefix = backbone.encode_prefix(images)
        with self.attached(backbone):
            return backbone.segment(prefix, None, None, points, labels, boxes=boxes)


class DecoderOnly(nn.Module):
    """Decoder fine-tuning: the encoder without autograd, a trainable copy of the mask decoder."""

    name = "decoder only"

    def __init__(self, backbone) -> None:
        super().__init__()
        self.decoder = copy.deepcopy(backbone.sam.mask_decoder).requires_grad_(True)

    def forward(self, backbone, images, points, labels, boxes=None):
        with torch.no_grad():
            emb = _run_encoder(backbone, images)
        return backbone.decode({"image_embeddings": emb}, points, labels, boxes=boxes, mask_decoder=self.decoder)
