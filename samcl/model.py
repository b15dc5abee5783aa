"""SAMCL at inference: frozen backbone + resident AugModules + Module Selector.

All modules stay on the device; a batch is routed by the selector and split into
groups that share a module (SPEC §1, quirk Q8: no copies of SAM, no reloads).
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .aug_module import AugModule, AugModuleSpec
from .backbones.base import Backbone, Features, index_features
from .heatmap import points_to_heatmap
from .selector import ModuleSelector


class SAMCLModel(nn.Module):
    """``domains[k]`` is the domain of selector output k; ``modules[name]`` its AugModule,
    absent for a test-only (unseen) domain, which is vanilla SAM."""

    def __init__(self, backbone: Backbone, spec: AugModuleSpec) -> None:
        super().__init__()
        backbone.check_aug_spec(spec)
        self.backbone = backbone
        self.spec = spec
        self.modules_by_domain = nn.ModuleDict()
        self.domains: List[str] = []
        self.selector: Optional[ModuleSelector] = None

    # ------------------------------------------------------------ building
    def new_module(self) -> AugModule:
        return AugModule(self.spec).to(self.device)

    def add_domain(self, name: str, module: Optional[AugModule]) -> None:
        if name in self.domains:
            raise ValueError(f"domain {name!r} is already in the model")
        self.domains.append(name)
        if module is not None:
            self.backbone.check_aug_spec(module.spec)
            self.modules_by_domain[name] = module.to(self.device)

    def module_for(self, name: str) -> Optional[AugModule]:
        return self.modules_by_domain[name] if name in self.modules_by_domain else None

    @property
    def device(self) -> torch.device:
        return next(self.backbone.buffers()).device

    # ------------------------------------------------------------ inference
    def heatmap(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return points_to_heatmap(points, self.backbone.grid_size, self.backbone.img_size, labels)

    def route(self, prefix: Features) -> torch.Tensor:
        """(N,) selector choice per image; with a single domain there is nothing to choose."""
        if self.selector is None or len(self.domains) == 1:
            n = next(iter(prefix.values())).shape[0]
            return torch.zeros(n, dtype=torch.long, device=self.device)
        return self.selector.route(self.backbone.selector_embedding(prefix))

    def segment_routed(self, prefix: Features, choice: torch.Tensor, points: torch.Tensor,
                       labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Suffix + decoder with each image's chosen module, one pass per chosen domain.

        Returns logits (N, 1, S, S) and predicted IoU (N, 1), in input order.
        """
        heat = self.heatmap(points, labels)
        logits: Optional[torch.Tensor] = None
        iou: Optional[torch.Tensor] = None
        for k in torch.unique(choice).tolist():
            idx = (choice == k).nonzero().squeeze(1)
            module = self.module_for(self.domains[k])
            lg, io = self.backbone.segment(index_features(prefix, idx), module, heat[idx], points[idx], labels[idx])
            if logits is None:
                logits = lg.new_empty((choice.shape[0],) + lg.shape[1:])
                iou = io.new_empty((choice.shape[0],) + io.shape[1:])
            logits[idx] = lg
            iou[idx] = io
        return logits, iou

    def segment_vanilla(self, prefix: Features, points: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.backbone.segment(prefix, None, None, points, labels)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Task-agnostic inference: route every image, segment with its module."""
        prefix = self.backbone.encode_prefix(images)
        choice = self.route(prefix)
        logits, iou = self.segment_routed(prefix, choice, points, labels)
        return {"logits": logits, "iou": iou, "choice": choice}
