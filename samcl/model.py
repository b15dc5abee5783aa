"""The module bank: the frozen backbone, every domain's learning module and the Module Selector.

It is the model every method trains and tests. All learning modules stay on the device; a batch
is routed by the selector and split into groups that share a learning module (quirk Q8: no copies
of SAM, no reloads). Every domain's learning module is of one registered kind
(:mod:`samcl.learning_modules`), given by the bank's spec; a test-only domain has none: the frozen
backbone ("vanilla").
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .backbones.base import Backbone, DecodeOptions, Features, index_features
from .heatmap import points_to_heatmap
from .learning_modules.base import LearningModule, ModuleSpec, segment_with
from .selector import ModuleSelector

PROMPTS = ("points", "box")
VANILLA = "vanilla"  # the domain name that means "no module": the frozen backbone


def full_image_boxes(n: int, size: int, device: torch.device) -> torch.Tensor:
    """(n, 4) box prompts covering the whole S x S input: CAD's prompt (x0, y0, x1, y1) = (0, 0, S, S)."""
    return torch.tensor([[0.0, 0.0, float(size), float(size)]], device=device).expand(n, 4)


class ModuleBank(nn.Module):
    """``domains[k]`` is the domain of selector output k; ``modules_by_domain[name]`` its learning
    module, absent for a test-only (unseen) domain, which is vanilla SAM. ``spec`` says which kind
    of learning module every domain gets; ``prompt`` is "points" (SAMCL) or "box" (CAD's full-image
    box)."""

    def __init__(self, backbone: Backbone, spec: ModuleSpec, prompt: str = "points") -> None:
        super().__init__()
        if prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
        spec.check(backbone)
        self.backbone = backbone
        self.spec = spec
        self.prompt = prompt
        self.modules_by_domain = nn.ModuleDict()
        self.domains: List[str] = []
        self.selector: Optional[ModuleSelector] = None
        # False for a bank whose method trains one shared module (finetune, ewc, er, ...): its
        # task-agnostic choice is the latest trained module, not the selector's
        self.routes = True

    # ------------------------------------------------------------ building
    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def needs_heatmap(self) -> bool:
        return self.spec.module_class().needs_heatmap

    def new_module(self) -> LearningModule:
        return self.spec.build(self.backbone).to(self.device)

    def describe_module(self) -> str:
        return self.spec.describe(self.backbone)

    def module_summary(self) -> Dict:
        """Kind, counted parameters and size of one module of this model (built aside, RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            m = self.spec.build(self.backbone)
        return {"kind": self.kind, "counted_parameters": m.counted_parameters(),
                "counted_mb": round(m.counted_size_mb(), 6), "spec": self.spec.to_dict()}

    def add_domain(self, name: str, module: Optional[LearningModule]) -> None:
        if name in self.domains:
            raise ValueError(f"domain {name!r} is already in the model")
        if module is not None:
            got = getattr(module, "name", type(module).__name__)
            if got != self.kind:
                raise ValueError(f"domain {name!r}: this model takes {self.kind} modules, got a {got} module")
            module.spec.check(self.backbone)
        self.domains.append(name)
        if module is not None:
            self.modules_by_domain[name] = module.to(self.device)

    def module_for(self, name: str) -> Optional[LearningModule]:
        return self.modules_by_domain[name] if name in self.modules_by_domain else None

    @property
    def device(self) -> torch.device:
        return next(self.backbone.buffers()).device

    # ------------------------------------------------------------ inference
    def heatmap(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return points_to_heatmap(points, self.backbone.grid_size, self.backbone.img_size, labels)

    def boxes(self, n: int) -> Optional[torch.Tensor]:
        """Box prompts of a batch of ``n`` (prompt "box"), or None (point prompts)."""
        return full_image_boxes(n, self.backbone.img_size, self.device) if self.prompt == "box" else None

    def route_probabilities(self, prefix: Features) -> torch.Tensor:
        """(N, K) the selector's softmax over its outputs: ``domains``, then (selector_head full)
        the order's domains not trained yet. With a one-output selector (or none yet) there is
        nothing to choose and the one domain has probability 1."""
        if self.selector is None or self.selector.num_domains <= 1:
            n = next(iter(prefix.values())).shape[0]
            return torch.ones(n, max(len(self.domains), 1), device=self.device)
        return self.selector.probabilities(self.backbone.selector_embedding(prefix))

    def route(self, prefix: Features) -> torch.Tensor:
        """(N,) selector choice per image: the argmax of :meth:`route_probabilities`; -1 (the frozen
        model) where it names a domain of the order not trained yet (a full head only)."""
        choice = self.route_probabilities(prefix).argmax(dim=1)
        return torch.where(choice < len(self.domains), choice, torch.full_like(choice, -1))

    def latest_trained(self) -> int:
        """Index of the latest domain that has a module (-1: none, the frozen model)."""
        return max((k for k, d in enumerate(self.domains) if d in self.modules_by_domain), default=-1)

    def domain_index(self, domain: str) -> int:
        """Index of ``domain`` in ``domains``, or -1 for "vanilla" (no module)."""
        if domain == VANILLA:
            return -1
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; this model has {self.domains} (or {VANILLA!r}: no module)")
        return self.domains.index(domain)

    def segment_routed(self, prefix: Features, choice: torch.Tensor, points: torch.Tensor,
                       labels: torch.Tensor, images: Optional[torch.Tensor] = None,
                       low_res: bool = False, boxes: Optional[torch.Tensor] = None,
                       options: Optional[DecodeOptions] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each image with its chosen module, one pass per chosen domain (choice -1: vanilla).

        ``images`` (N, 3, S, S) are needed by modules that read the image (CAD). ``options``:
        multimask output, a mask prompt, a box with the points (:class:`DecodeOptions`).
        Returns logits (N, C, S, S) (``low_res``: the decoder's (N, C, 4G, 4G)) and
        predicted IoU (N, C), in input order (C = 1; 3 with ``options.multimask``).
        """
        heat = self.heatmap(points, labels) if self.needs_heatmap else None
        boxes = self.boxes(choice.shape[0]) if boxes is None else boxes
        logits: Optional[torch.Tensor] = None
        iou: Optional[torch.Tensor] = None
        for k in torch.unique(choice).tolist():
            idx = (choice == k).nonzero().squeeze(1)
            module = self.module_for(self.domains[k]) if k >= 0 else None
            lg, io = segment_with(module, self.backbone, index_features(prefix, idx),
                                  None if images is None else images[idx], None if heat is None else heat[idx],
                                  points[idx], labels[idx], None if boxes is None else boxes[idx], low_res,
                                  None if options is None else options.index(idx))
            if logits is None:
                logits = lg.new_empty((choice.shape[0],) + lg.shape[1:])
                iou = io.new_empty((choice.shape[0],) + io.shape[1:])
            logits[idx] = lg
            iou[idx] = io
        return logits, iou

    def segment_one(self, module: Optional[LearningModule], prefix: Features, points: torch.Tensor,
                    labels: torch.Tensor, images: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every image with ``module`` (None: vanilla), e.g. to validate a module being trained."""
        heat = self.heatmap(points, labels) if module is not None and module.needs_heatmap else None
        return segment_with(module, self.backbone, prefix, images, heat, points, labels, self.boxes(points.shape[0]))

    def segment_vanilla(self, prefix: Features, points: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.backbone.segment(prefix, points, labels, boxes=self.boxes(points.shape[0]))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, points: torch.Tensor, labels: torch.Tensor,
                domain: Optional[str] = None, boxes: Optional[torch.Tensor] = None,
                prefix: Optional[Features] = None, options: Optional[DecodeOptions] = None) -> Dict[str, torch.Tensor]:
        """Segment a batch: task-agnostic (``domain`` None: every image goes to the module the
        selector picks; for a bank that does not route, the latest trained module), or every image
        with one domain's module (``domain`` a name in ``domains``), or with none ("vanilla").

        Args:
            images: (N, 3, S, S) float 0..255; points: (N, P, 2) (x, y) in the S x S frame; labels: (N, P).
            boxes: (N, 4) box prompts (x0, y0, x1, y1) instead of the model's own prompt, where supported.
            prefix: the images' frozen prefix if already computed (:meth:`Backbone.encode_prefix`).
            options: multimask output, a mask prompt, a box with the points (:class:`DecodeOptions`).
        Returns:
            "logits" (N, C, S, S), "low_res_logits" (N, C, 4G, 4G), "iou" (N, C) (C = 1; 3 with
            ``options.multimask``), "choice" (N,) (index into ``domains``; -1: vanilla) and
            "probabilities" (N, K), the selector's softmax over ``domains`` (computed also when
            ``domain`` forces the choice).
        """
        prefix = self.backbone.encode_prefix(images) if prefix is None else prefix
        probs = self.route_probabilities(prefix)
        if domain is None and self.routes:
            choice = probs.argmax(dim=1)
        else:
            k = self.domain_index(domain) if domain is not None else self.latest_trained()
            choice = torch.full((images.shape[0],), k, dtype=torch.long, device=self.device)
        low, iou = self.segment_routed(prefix, choice, points, labels, images=images, low_res=True, boxes=boxes,
                                       options=options)
        return {"logits": self.backbone.upsample_logits(low), "low_res_logits": low, "iou": iou, "choice": choice,
                "probabilities": probs}


SAMCLModel = ModuleBank  # the module bank's earlier name, for code written against it
