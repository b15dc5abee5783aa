"""The training forward of one domain (the nn.Module DDP wraps) and the embedding buffer's filling."""
import logging
from typing import Dict, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as dist
from .backbones.base import Features
from .loading import progress, to_device
from .selector import EmbeddingBuffer

log = logging.getLogger("samcl.training_step")


class SegmentStep(nn.Module):
    """The training forward of one domain as an nn.Module, so that DDP can wrap it
    (only the learning module's parameters require gradients)."""

    def __init__(self, backbone, module) -> None:
        super().__init__()
        self.backbone = backbone
        self.module = module

    def forward(self, prefix: Dict[str, torch.Tensor], heat: Optional[torch.Tensor], points: torch.Tensor,
                labels: torch.Tensor, images: Optional[torch.Tensor] = None, boxes: Optional[torch.Tensor] = None,
                low_res: bool = False):
        """(logits (N, 1, S, S), or the decoder's (N, 1, 4G, 4G) with ``low_res``; IoU (N, 1))."""
        return self.module.segment(self.backbone, prefix, images, heat, points, labels, boxes=boxes, low_res=low_res)



@torch.no_grad()
def buffer_batch(backbone: nn.Module, buffer: EmbeddingBuffer, domain: str, prefix: Features,
                 index: torch.Tensor) -> None:
    """Add a batch's selector embeddings (of every rank, in rank order) to the buffer."""
    emb = backbone.selector_embedding(prefix)
    buffer.add(domain, dist.all_gather_tensor(emb), dist.all_gather_tensor(index.to(emb.device)))


@torch.no_grad()
def collect_embeddings(backbone: nn.Module, buffer: EmbeddingBuffer, domain: str, loader: DataLoader,
                       device: torch.device) -> None:
    """Buffer for a domain that trains no module: the prefix of its first training images."""
    backbone.eval()
    for raw in progress(loader, f"{domain} embeddings"):
        if buffer.missing(domain) <= 0:
            break
        b = to_device(raw, device)
        buffer_batch(backbone, buffer, domain, backbone.encode_prefix(b.images), raw["index"])
    log.info("%s: %d embeddings buffered (no module: routed images use vanilla %s)", domain,
             buffer.store[domain].shape[0], backbone.family.upper())
