"""The one interface the continual loop sees of a frozen segmentation backbone.

A backbone splits its image encoder at the *selector layer*:

* :meth:`Backbone.encode_prefix` runs the frozen blocks up to and including the
  selector layer, once per image, without autograd. Its result is a dict of
  batch-first tensors, so it can be indexed, cached or split by routed domain.
* :meth:`Backbone.selector_embedding` turns that prefix into the Module
  Selector's input (mean over the grid).
* :meth:`Backbone.encode_suffix` runs the rest of the encoder with one AugModule
  (or none: vanilla) and returns the decoder's image features.
* :meth:`Backbone.decode` prompts the decoder with one point set per image.

The AugModule acts through forward hooks that each family installs once on the
stock modules; :meth:`Backbone.augmenting` says which module and heatmap they
use for the current call.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..aug_module import AugModule, AugModuleSpec, token_heat, window_heat

Features = Dict[str, torch.Tensor]
UPSAMPLE_MODES = ("nearest", "bilinear")


@dataclass
class _Active:
    module: AugModule
    heat: torch.Tensor  # (N, Gx, Gy, r)
    batch: int


def grid_mean(tokens: torch.Tensor) -> torch.Tensor:
    """(N, rows, cols, C) tokens -> (N, C) mean over the grid, reduced as the release does it
    (channels first, then the mean over columns and then over rows: the same float rounding)."""
    return tokens.permute(0, 3, 1, 2).mean(-1).mean(-1)


def index_features(features: Features, index: torch.Tensor) -> Features:
    """Select samples (batch-first) from every tensor of a prefix or feature dict."""
    return {k: v[index] for k, v in features.items()}


class Backbone(nn.Module):
    """Frozen SAM-family model split at the selector layer. Subclasses set the attributes.

    Attributes:
        family: "sam" or "sam2"; recorded in run folders and checked on load.
        arch: architecture name (e.g. "vit_b", "hiera_t").
        img_size: side S of the square model input.
        grid_size: side G of the token grid at the augmented blocks (64 at 1024).
        selector_layer: block whose output feeds the selector.
        selector_dim: width of that output.
    """

    family: str
    arch: str
    img_size: int
    grid_size: int
    selector_layer: int
    selector_dim: int

    def __init__(self, arch: str, heat_orientation: str = "reference", upsample: str = "nearest") -> None:
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.arch = arch
        self.heat_orientation = heat_orientation
        self.upsample = upsample
        self._active: Optional[_Active] = None

    def _resolve_selector_layer(self, requested: Optional[int], default: int, depth: int) -> int:
        """The selector block: ``requested`` or the backbone's ``default``; at least one block must follow."""
        layer = default if requested is None else int(requested)
        if not 0 <= layer < depth - 1:
            raise ValueError(f"selector layer {layer} must leave at least one of the {depth} blocks after it")
        return layer

    # -------------------------------------------------------------- contract
    def default_aug_spec(self, rank: int = 10) -> AugModuleSpec:
        raise NotImplementedError

    def encode_prefix(self, images: torch.Tensor) -> Features:
        """(N, 3, S, S) float 0..255 -> frozen prefix features (no autograd)."""
        raise NotImplementedError

    def selector_embedding(self, prefix: Features) -> torch.Tensor:
        """Prefix -> (N, selector_dim): the selector-layer output averaged over the grid."""
        raise NotImplementedError

    def _run_suffix(self, prefix: Features) -> Features:
        """Blocks after the selector layer and the neck, with whatever module is active."""
        raise NotImplementedError

    def decode(self, features: Features, points: torch.Tensor, labels: torch.Tensor,
               boxes: Optional[torch.Tensor] = None, low_res: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """One prompt set per image.

        Args:
            points: (N, P, 2) (x, y) in the S x S input frame; labels: (N, P).
            boxes: (N, 4) box prompts (x0, y0, x1, y1) instead of the points, where supported.
            low_res: return the decoder's own low-resolution logits (N, 1, 4G, 4G) instead.
        Returns:
            mask logits (N, 1, S, S) (see :meth:`upsample_logits`) and predicted IoU (N, 1).
        """
        raise NotImplementedError

    def upsample_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """(N, 1, 4G, 4G) decoder logits -> (N, 1, S, S) float, by ``self.upsample``
        (nearest on SAM as the release, quirk Q6; bilinear on SAM 2 as its predictor)."""
        kwargs = {"align_corners": False} if self.upsample == "bilinear" else {}
        return F.interpolate(low_res.float(), size=(self.img_size, self.img_size), mode=self.upsample, **kwargs)

    # -------------------------------------------------------------- shared
    def check_aug_spec(self, spec: AugModuleSpec) -> None:
        """Refuse a module built for another backbone, naming both."""
        expected = self.default_aug_spec(spec.rank)
        problems = []
        if spec.dim != expected.dim:
            problems.append(f"width {spec.dim} (this backbone: {expected.dim})")
        if spec.neck_channels != expected.neck_channels:
            problems.append(f"neck {spec.neck_channels} (this backbone: {expected.neck_channels})")
        if spec.layers and min(spec.layers) <= self.selector_layer:
            problems.append(f"layers {list(spec.layers)} reach the frozen prefix (selector layer {self.selector_layer})")
        bad = [i for i in spec.layers if not self._layer_accepts(i, spec.dim)]
        if bad:
            problems.append(f"layers {bad} do not exist or have another width")
        if problems:
            raise ValueError(
                f"AugModule does not fit backbone {self.family}/{self.arch}: " + "; ".join(problems)
            )

    def _layer_accepts(self, layer: int, dim: int) -> bool:
        raise NotImplementedError

    def _attention_hook(self, layer: int, window: int):
        """Forward hook for the attention module of encoder block ``layer``.

        The attention input t is (N, G, G, C) in a global block or (N * nw, w, w, C)
        in a windowed one (``window`` = w > 0); while a module is active and lists
        ``layer``, the hook adds ``module.branch(layer, t, H)`` to the attention
        output, with H laid out like t (quirk Q2 for windows).
        """

        def hook(_module, inputs, output):
            act = self._active
            if act is None or layer not in act.module.spec.layers:
                return None
            t = inputs[0]
            heat = window_heat(act.heat, window, t.shape[0] // act.batch) if window > 0 else token_heat(act.heat)
            return output + act.module.branch(layer, t, heat)

        return hook

    @contextmanager
    def augmenting(self, module: Optional[AugModule], heatmap: Optional[torch.Tensor]) -> Iterator[None]:
        """Within the block, the installed hooks apply ``module`` with ``heatmap`` (N, G, G)."""
        if module is None:
            yield
            return
        if heatmap is None:
            raise ValueError("an AugModule needs the point heatmap of the batch")
        previous = self._active
        self._active = _Active(module, module.heat(heatmap), heatmap.shape[0])
        try:
            yield
        finally:
            self._active = previous

    def encode_suffix(self, prefix: Features, module: Optional[AugModule], heatmap: Optional[torch.Tensor]) -> Features:
        """Rest of the encoder with ``module`` (None: vanilla) -> decoder features."""
        with self.augmenting(module, heatmap):
            return self._run_suffix(prefix)

    def segment(
        self,
        prefix: Features,
        module: Optional[AugModule],
        heatmap: Optional[torch.Tensor],
        points: torch.Tensor,
        labels: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        low_res: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Suffix + decoder for one group of images sharing a module (``boxes``: (N, 4) box
        prompts instead of the points, SAM only; ``low_res``: see :meth:`decode`)."""
        return self.decode(self.encode_suffix(prefix, module, heatmap), points, labels, boxes=boxes, low_res=low_res)

    def freeze(self) -> "Backbone":
        """No parameter of the backbone trains; train/eval mode still follows the caller
        (it matters for SAM 2's decoder)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self
