"""AugModule: the per-domain learning module of SAMCL.

One shared low-rank projection ``A`` (dim -> r), and per augmented encoder block
an up-projection ``B_l`` (r -> dim) with two LayerNorms, added in parallel to the
block's attention. The point heatmap enters through ``extra`` (r -> r Linear,
LayerNorm, ReLU); on SAM it is also injected around the neck through
``extra.upward`` / ``extra.upward_``. ``B_l`` and the ``upward`` layers start at
zero, so a fresh module is exactly the frozen backbone.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone
from ..registry import register_learning_module
from .base import Hook, LearningModule, ModuleSpec

ORIENTATIONS = ("reference", "corrected")


@dataclass(frozen=True)
class AugModuleSpec(ModuleSpec):
    """Everything needed to rebuild an AugModule; derived from the backbone.

    dim: token width of the augmented blocks (768 for ViT-B, 384 for Hiera-T stage 3).
    layers: encoder block indices that get a branch, in order.
    neck_channels: (encoder width, embedding channels) for the SAM neck injection,
        None where the backbone has no neck point (SAM 2).
    rank: r, the width of the low-rank branch.
    """

    dim: int
    layers: Tuple[int, ...]
    neck_channels: Optional[Tuple[int, int]] = None
    rank: int = 10

    @classmethod
    def for_backbone(cls, backbone: Backbone, cfg: Any = None) -> "AugModuleSpec":
        """The release's layout: every block after the selector layer on SAM (7..11 of ViT-B);
        on SAM 2 the blocks from the selector + 1 to depth - 2, up to the first whose width
        differs (6..9 of Hiera-T). ``cfg.rank`` and ``cfg.aug_layers`` override."""
        rank = int(getattr(cfg, "rank", None) or 10)
        dim = backbone.selector_dim
        if getattr(cfg, "aug_layers", None) is not None:
            layers = tuple(int(i) for i in cfg.aug_layers)
        else:
            end = backbone.depth if backbone.neck is not None else backbone.depth - 2
            picked: List[int] = []
            for i in range(backbone.selector_layer + 1, end):
                g = backbone.geometry(i)
                if not (g.keeps_shape and g.width == dim):
                    break
                picked.append(i)
            if not picked:
                raise ValueError(f"no block after selector layer {backbone.selector_layer} has its width {dim}; "
                                 f"choose an earlier selector layer")
            layers = tuple(picked)
        neck = None if backbone.neck is None else (dim, backbone.embedding_channels)
        return cls(dim=dim, layers=layers, neck_channels=neck, rank=rank)

    def check(self, backbone: Backbone) -> None:
        """Refuse a module built for another backbone, naming both."""
        dim = backbone.selector_dim
        neck = None if backbone.neck is None else (dim, backbone.embedding_channels)
        problems = []
        if self.dim != dim:
            problems.append(f"width {self.dim} (this backbone: {dim})")
        if self.neck_channels != neck:
            problems.append(f"neck {self.neck_channels} (this backbone: {neck})")
        if self.layers and min(self.layers) <= backbone.selector_layer:
            problems.append(f"layers {list(self.layers)} reach the frozen prefix (selector layer "
                            f"{backbone.selector_layer})")
        bad = [i for i in self.layers if not (0 <= i < backbone.depth and backbone.geometry(i).keeps_shape
                                              and backbone.geometry(i).width == self.dim)]
        if bad:
            problems.append(f"layers {bad} do not exist or have another width")
        if problems:
            raise ValueError(f"AugModule does not fit backbone {backbone.family}/{backbone.arch}: " + "; ".join(problems))


class Extra(nn.Module):
    """Heatmap path: r -> r Linear + LayerNorm (+ SAM's zero-init neck projections)."""

    def __init__(self, rank: int, neck_channels: Optional[Tuple[int, int]]) -> None:
        super().__init__()
        self.layer = nn.Linear(rank, rank)
        self.norm = nn.LayerNorm(rank)
        self.upward: Optional[nn.Linear] = None
        self.upward_: Optional[nn.Linear] = None
        if neck_channels is not None:
            self.upward = nn.Linear(rank, neck_channels[0])
            self.upward_ = nn.Linear(rank, neck_channels[1])
            for lin in (self.upward, self.upward_):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)


@register_learning_module("augmodule")
class AugModule(LearningModule):
    """The trainable module of one domain.

    It acts through :meth:`hooks`: :meth:`branch` after each augmented block's attention,
    :meth:`neck_terms` around the SAM neck; :meth:`heat` turns the heatmap into its input.
    """

    spec_class = AugModuleSpec
    needs_heatmap = True

    def __init__(self, spec: AugModuleSpec) -> None:
        super().__init__(spec)
        r = spec.rank
        self.A = nn.Linear(spec.dim, r)  # default init: Kaiming-uniform, a = sqrt(5)
        nn.init.zeros_(self.A.bias)
        self.B = nn.ModuleList(nn.Linear(r, spec.dim) for _ in spec.layers)
        for lin in self.B:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.norm1 = nn.ModuleList(nn.LayerNorm(r) for _ in spec.layers)
        self.norm2 = nn.ModuleList(nn.LayerNorm(r) for _ in spec.layers)
        self.extra = Extra(r, spec.neck_channels)
        self._slot = {layer: i for i, layer in enumerate(spec.layers)}

    # ------------------------------------------------------------------ injection
    def hooks(self, backbone: Backbone, context: Dict[str, Any]) -> List[Hook]:
        """A forward hook on the attention of every augmented block (adds :meth:`branch`, with the
        heat laid out like the block's tokens, quirk Q2 in windows) and, on SAM, a pre- and a
        forward hook on the neck (adds the :meth:`neck_terms`)."""
        heatmap = context.get("heatmap")
        state: Dict[str, torch.Tensor] = {}

        def heat() -> torch.Tensor:
            if heatmap is None:
                raise ValueError("an AugModule needs the point heatmap of the batch")
            if "heat" not in state:
                state["heat"] = self.heat(heatmap)
            return state["heat"]

        def attention_hook(layer: int, window: int):
            def hook(_module, inputs, output):
                t, h = inputs[0], heat()
                laid = window_heat(h, window, t.shape[0] // h.shape[0]) if window > 0 else token_heat(h)
                return output + self.branch(layer, t, laid)
            return hook

        out: List[Hook] = [(backbone.attention(i), "forward", attention_hook(i, backbone.geometry(i).window))
                           for i in self.spec.layers]
        if self.spec.neck_channels is not None:
            def neck_pre(_module, inputs):
                u1, state["u2"] = self.neck_terms(heat(), backbone.heat_orientation)
                return (inputs[0] + u1,)

            def neck_post(_module, _inputs, output):
                return output + state.pop("u2")

            out += [(backbone.neck, "forward_pre", neck_pre), (backbone.neck, "forward", neck_post)]
        return out

    # ------------------------------------------------------------------ size
    def counted_parameters(self) -> int:
        """Parameters the paper counts: A, every B, and extra's Linear layers (no LayerNorms)."""
        linears = [self.A, *self.B, self.extra.layer, self.extra.upward, self.extra.upward_]
        return sum(p.numel() for lin in linears if lin is not None for p in lin.parameters())

    def describe(self) -> str:
        return (
            f"AugModule: {self.counted_parameters():,} parameters = {self.counted_size_mb():.4f} MB "
            f"(counted as the reference does: A, B, extra Linear layers; LayerNorms excluded; "
            f"{sum(p.numel() for p in self.parameters()):,} in total) on blocks {list(self.spec.layers)}"
        )

    # ------------------------------------------------------------------ maths
    def heat(self, heatmap: torch.Tensor) -> torch.Tensor:
        """(N, G, G) heatmap, first axis x -> (N, Gx, Gy, r) after extra.layer, norm, ReLU."""
        h = heatmap.unsqueeze(-1).expand(*heatmap.shape, self.spec.rank)
        return F.relu(self.extra.norm(self.extra.layer(h)))

    def branch(self, layer: int, tokens: torch.Tensor, heat: torch.Tensor) -> torch.Tensor:
        """Parallel branch of block ``layer``: ``B_l(norm1_l(A(t)) + norm2_l(H))``.

        Args:
            tokens: attention input t, (..., rows, cols, dim).
            heat: H laid out like t, (..., rows, cols, r) (broadcastable).
        Returns:
            (..., rows, cols, dim), added to the block's attention output.
        """
        i = self._slot[layer]
        return self.B[i](self.norm1[i](self.A(tokens)) + self.norm2[i](heat))

    def neck_terms(self, heat: torch.Tensor, orientation: str = "reference") -> Tuple[torch.Tensor, torch.Tensor]:
        """(U1, U2) for ``embedding = neck(X + U1) + U2`` on SAM.

        Args:
            heat: (N, Gx, Gy, r) from :meth:`heat`.
            orientation: "reference" keeps the release's layout (first spatial axis x,
                added to token maps whose first axis is y: quirk Q1); "corrected"
                aligns them.
        Returns:
            U1 (N, dim, a, b) and U2 (N, channels, a, b).
        """
        if self.extra.upward is None:
            raise ValueError("this AugModule has no neck injection (built for a backbone without one)")
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        if orientation == "corrected":
            heat = heat.transpose(1, 2)
        u1 = self.extra.upward(heat).permute(0, 3, 1, 2)
        u2 = self.extra.upward_(heat).permute(0, 3, 1, 2)
        return u1, u2


def window_heat(heat: torch.Tensor, window: int, windows_per_image: int) -> torch.Tensor:
    """Heat for a windowed block: the whole map resized to window x window (nearest),
    transposed to token layout, and the same map given to every window (quirk Q2).

    Args:
        heat: (N, Gx, Gy, r).
    Returns:
        (N * windows_per_image, window, window, r).
    """
    small = F.interpolate(heat.permute(0, 3, 1, 2), size=(window, window), mode="nearest")
    small = small.permute(0, 3, 2, 1)  # (N, y, x, r)
    return small.repeat_interleave(windows_per_image, dim=0)


def token_heat(heat: torch.Tensor) -> torch.Tensor:
    """Heat for a global-attention block: (N, Gx, Gy, r) -> (N, y, x, r), aligned with tokens."""
    return heat.transpose(1, 2)
