"""AugModule: the per-domain learning module of SAMCL.

One shared low-rank projection ``A`` (dim -> r), and per augmented encoder block
an up-projection ``B_l`` (r -> dim) with two LayerNorms. The point heatmap
enters through ``extra`` (r -> r Linear, LayerNorm, ReLU); on SAM it is also
injected around the neck through ``extra.upward`` / ``extra.upward_``.
``B_l`` and the ``upward`` layers start at zero, so a fresh module is exactly
the frozen backbone.
"""
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ORIENTATIONS = ("reference", "corrected")


@dataclass(frozen=True)
class AugModuleSpec:
    """Everything needed to rebuild an AugModule; derived from the backbone.

    dim: token width of the augmented blocks (768 for ViT-B, 384 for Hiera-T stage 3).
    layers: encoder block indices that get a branch, in order.
    neck_channels: (encoder width, embedding channels) for the SAM neck injection,
        None where the backbone has none (SAM 2).
    rank: r, the width of the low-rank branch.
    """

    dim: int
    layers: Tuple[int, ...]
    neck_channels: Optional[Tuple[int, int]] = None
    rank: int = 10

    kind = "augmodule"  # class attribute, not a field: the learning-module kind (samcl.model)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self, backbone) -> None:
        backbone.check_aug_spec(self)

    def build(self, backbone=None) -> "AugModule":
        return AugModule(self)

    def describe(self, backbone=None) -> str:
        return AugModule(self).describe()

    @classmethod
    def from_dict(cls, d: dict) -> "AugModuleSpec":
        neck = d.get("neck_channels")
        return cls(
            dim=int(d["dim"]),
            layers=tuple(int(i) for i in d["layers"]),
            neck_channels=None if neck is None else (int(neck[0]), int(neck[1])),
            rank=int(d.get("rank", 10)),
        )


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


class AugModule(nn.Module):
    """The trainable module of one domain.

    Use through a backbone: ``heat`` once per image batch, ``branch`` inside each
    augmented block's attention, ``neck_terms`` around the SAM neck.
    """

    kind = "augmodule"
    needs_heatmap = True
    has_unused_parameters = False

    def __init__(self, spec: AugModuleSpec) -> None:
        super().__init__()
        self.spec = spec
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

    # ------------------------------------------------------------------ size
    def counted_parameters(self) -> int:
        """Parameters the paper counts: A, every B, and extra's Linear layers (no LayerNorms)."""
        linears = [self.A, *self.B, self.extra.layer, self.extra.upward, self.extra.upward_]
        return sum(p.numel() for lin in linears if lin is not None for p in lin.parameters())

    def counted_size_mb(self) -> float:
        return self.counted_parameters() * 4 / 1024**2

    def describe(self) -> str:
        return (
            f"AugModule: {self.counted_parameters():,} parameters = {self.counted_size_mb():.4f} MB "
            f"(counted as the reference does: A, B, extra Linear layers; LayerNorms excluded; "
            f"{sum(p.numel() for p in self.parameters()):,} in total) on blocks {list(self.spec.layers)}"
        )

    # ------------------------------------------------------------------ maths
    def segment(self, backbone, prefix, images, heatmap, points, labels, boxes=None, low_res=False):
        """Suffix with this module + the backbone's decoder (the learning-module interface;
        ``images`` is unused: the AugModule reads the frozen prefix and the heatmap)."""
        return backbone.segment(prefix, self, heatmap, points, labels, boxes=boxes, low_res=low_res)

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
