"""The one interface the continual loop and the learning modules see of a frozen backbone.

A backbone splits its image encoder at the *selector layer*:

* :meth:`Backbone.encode_prefix` runs the frozen blocks up to and including the
  selector layer, once per image, without autograd. Its result is a dict of
  batch-first tensors, so it can be indexed, cached or split by routed domain.
* :meth:`Backbone.selector_embedding` turns that prefix into the Module
  Selector's input (mean over the grid).
* :meth:`Backbone.encode_suffix` runs the rest of the encoder and returns the
  decoder's image features; :meth:`Backbone.decode` prompts the decoder with one
  point set per image; :meth:`Backbone.segment` is the two.

A backbone knows no learning module. It exposes its geometry (depth, widths, windows,
grid) and the named points where a module may act — :meth:`attention`, :meth:`qkv`,
:meth:`mlp` of a block, :attr:`neck`, :attr:`mask_decoder` — and a learning module
installs its own hooks there for the duration of a call (:mod:`samcl.learning_modules`). Where a
module needs a block's computation itself, the backbone provides it
(:meth:`prefixed_attention`: the attention with extra key/value tokens), so that only
the backbones read their package's code.
"""
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Features = Dict[str, torch.Tensor]
UPSAMPLE_MODES = ("nearest", "bilinear")
# (x (N, rows, cols, C_in), key (N, P, C), value (N, P, C)) -> the attention's output (see Backbone.prefixed_attention)
PrefixedAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def grid_mean(tokens: torch.Tensor) -> torch.Tensor:
    """(N, rows, cols, C) tokens -> (N, C) mean over the grid, reduced as the release does it
    (channels first, then the mean over columns and then over rows: the same float rounding)."""
    return tokens.permute(0, 3, 1, 2).mean(-1).mean(-1)


def index_features(features: Features, index: torch.Tensor) -> Features:
    """Select samples (batch-first) from every tensor of a prefix or feature dict."""
    return {k: v[index] for k, v in features.items()}


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, P, C) -> (B, heads, P, C / heads)."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


@dataclass(frozen=True)
class BlockGeometry:
    """What a learning module needs to know of encoder block i.

    width: token width of the block's output; keeps_shape: the block maps (N, G, G, C)
    tokens to the same shape (no pooling, no change of width); window: its attention
    window side (0: global attention).
    """

    width: int
    keeps_shape: bool
    window: int


@dataclass(frozen=True)
class BlockPlan:
    """Shapes of one encoder block for a given input side (what a memory estimate reads,
    :mod:`samcl.memory`).

    grid_in, grid_out: side of the token grid the block reads and writes (q-pooling shrinks it);
    width_in, width_out: token widths; heads: attention heads; window: attention window side
    (0: global attention over the whole grid); padded: side of the grid after the window padding;
    q_stride: query pooling stride (1: none); rel_pos: decomposed relative positions are added
    to the attention map; attention: the attention path, "materialised" (the (B * heads) x N x N
    map is computed, as ``segment_anything``'s Attention) or "sdpa" (``scaled_dot_product_attention``).
    """

    grid_in: int
    grid_out: int
    width_in: int
    width_out: int
    heads: int
    window: int
    padded: int
    q_stride: int = 1
    rel_pos: bool = False
    attention: str = "materialised"


def padded_side(grid: int, window: int) -> int:
    """Side of a ``grid`` padded up to whole windows (the grid itself for global attention)."""
    return -(-grid // window) * window if window > 0 else grid


@dataclass(frozen=True)
class DecodeOptions:
    """What a decoder call may take besides one point set (or box) per image: segment_anything's
    SamPredictor inputs. The defaults are the continual loop's call (one mask, no mask prompt).

    multimask: the decoder's three multimask outputs (C = 3) instead of its single mask (C = 1;
        SAM 2 picks it by stability in eval mode).
    mask_input: (N, 1, 4G, 4G) low-resolution logits of an earlier prediction, a dense prompt.
    points_with_box: a box prompt goes with the points (as SamPredictor takes both) instead of
        replacing them (CAD's full-image box).
    """

    multimask: bool = False
    mask_input: Optional[torch.Tensor] = None
    points_with_box: bool = False

    def index(self, idx: torch.Tensor) -> "DecodeOptions":
        """The options of the images ``idx`` of the batch."""
        return self if self.mask_input is None else replace(self, mask_input=self.mask_input[idx])


class Backbone(nn.Module):
    """Frozen SAM-family model split at the selector layer. Subclasses set the attributes.

    Attributes:
        family: "sam" or "sam2"; recorded in run folders and checked on load.
        arch: architecture name (e.g. "vit_b", "hiera_t").
        img_size: side S of the square model input.
        grid_size: side G of the token grid at the selector layer (64 at 1024).
        depth: number of encoder blocks.
        selector_layer: block whose output feeds the selector.
        selector_dim: width of that output.
        embedding_channels: channels of the decoder's image embedding (256).
        heat_orientation: layout of the point heatmap where a module adds it around the
            neck ("reference", quirk Q1, or "corrected"); a setting the modules read.
    """

    family: str
    arch: str
    img_size: int
    grid_size: int
    depth: int
    selector_layer: int
    selector_dim: int
    embedding_channels: int
    # the bound the family's own image predictor clamps the low-resolution logits it returns to (None: none)
    predictor_logit_limit: Optional[float] = None

    def __init__(self, arch: str, heat_orientation: str = "reference", upsample: str = "nearest") -> None:
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.arch = arch
        self.heat_orientation = heat_orientation
        self.upsample = upsample

    def _resolve_selector_layer(self, requested: Optional[int], default: int, depth: int) -> int:
        """The selector block: ``requested`` or the backbone's ``default``; at least one block must follow."""
        layer = default if requested is None else int(requested)
        if not 0 <= layer < depth - 1:
            raise ValueError(f"selector layer {layer} must leave at least one of the {depth} blocks after it")
        return layer

    # -------------------------------------------------------------- geometry and injection points
    def block(self, i: int) -> nn.Module:
        """Encoder block i (a ``segment_anything`` Block or a ``sam2`` MultiScaleBlock)."""
        raise NotImplementedError

    def block_plans(self, img_size: int) -> List[BlockPlan]:
        """Every encoder block's shapes for an ``img_size`` input (any valid side, not only the built one)."""
        raise NotImplementedError

    @property
    def input_multiple(self) -> int:
        """An input side must be a multiple of this (SAM: the patch size)."""
        raise NotImplementedError

    def prefix_elements(self, img_size: int) -> int:
        """Numbers per image in :meth:`encode_prefix`'s output for an ``img_size`` input (what the
        training cache keeps per image)."""
        plans = self.block_plans(img_size)
        return plans[self.selector_layer].grid_out ** 2 * plans[self.selector_layer].width_out

    def geometry(self, i: int) -> BlockGeometry:
        raise NotImplementedError

    def attention(self, i: int) -> nn.Module:
        """The attention of block i: called on (N, rows, cols, C) tokens (windows batched)."""
        return self.block(i).attn

    def qkv(self, i: int) -> nn.Linear:
        """The qkv projection inside block i's attention."""
        return self.block(i).attn.qkv

    def mlp(self, i: int) -> nn.Module:
        """The MLP of block i."""
        return self.block(i).mlp

    def prefixed_attention(self, i: int) -> PrefixedAttention:
        """The forward of block i's attention with P extra key/value tokens before the image tokens'
        own: ``(x, key, value) -> out``, x (B, rows, cols, C_in) as :meth:`attention` is called
        (windows batched), key and value (B, P, C) in the attention's key/value space (after the qkv
        projection, C = its qkv's out / 3, split into its heads as its own keys and values). The
        image tokens' queries attend to them; no query is added. With P = 0 it is the stock forward,
        bit for bit. Computed from the attention's own weights, so a module that replaces the
        attention's forward with it (a "replace" hook) keeps the frozen weights."""
        raise NotImplementedError(f"the {self.family} backbone has no attention with extra key/value tokens")

    @property
    def neck(self) -> Optional[nn.Module]:
        """The module from the last block's tokens to the decoder's embedding, where a module
        may add terms (SAM's neck); None where there is no such single point (SAM 2)."""
        return None

    @property
    def mask_decoder(self) -> nn.Module:
        raise NotImplementedError

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution logits, which a mask prompt takes too (4x the
        decoder's image embedding: 256 at 1024)."""
        raise NotImplementedError

    # -------------------------------------------------------------- forward contract
    def prefix(self, images: torch.Tensor) -> Features:
        """(N, 3, S, S) float 0..255 -> blocks up to the selector layer, with autograd (for a module
        acting inside them)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_prefix(self, images: torch.Tensor) -> Features:
        """(N, 3, S, S) float 0..255 -> frozen prefix features (no autograd)."""
        return self.prefix(images)

    def selector_embedding(self, prefix: Features) -> torch.Tensor:
        """Prefix -> (N, selector_dim): the selector-layer output averaged over the grid."""
        return grid_mean(prefix["tokens"])

    def encode_suffix(self, prefix: Features) -> Features:
        """Blocks after the selector layer and the neck (with whatever hooks a module installed)
        -> the decoder's image features."""
        raise NotImplementedError

    def decode(self, features: Features, points: torch.Tensor, labels: torch.Tensor,
               boxes: Optional[torch.Tensor] = None, low_res: bool = False,
               mask_decoder: Optional[nn.Module] = None,
               options: Optional[DecodeOptions] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """One prompt set per image.

        Args:
            points: (N, P, 2) (x, y) in the S x S input frame; labels: (N, P). P = 0: no point prompt.
            boxes: (N, 4) box prompts (x0, y0, x1, y1) instead of the points, where supported.
            low_res: return the decoder's own low-resolution logits (N, C, 4G, 4G) instead.
            mask_decoder: a decoder to use instead of the backbone's own (a module's copy).
            options: multimask output, a mask prompt, a box with the points (default: none of them).
        Returns:
            mask logits (N, C, S, S) (see :meth:`upsample_logits`) and predicted IoU (N, C); C = 1,
            3 with ``options.multimask``.
        """
        raise NotImplementedError

    def upsample_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        """(N, C, 4G, 4G) decoder logits -> (N, C, S, S) float, by ``self.upsample``
        (nearest on SAM as the release, quirk Q6; bilinear on SAM 2 as its predictor)."""
        kwargs = {"align_corners": False} if self.upsample == "bilinear" else {}
        return F.interpolate(low_res.float(), size=(self.img_size, self.img_size), mode=self.upsample, **kwargs)

    def segment(self, prefix: Features, points: torch.Tensor, labels: torch.Tensor,
                boxes: Optional[torch.Tensor] = None, low_res: bool = False,
                options: Optional[DecodeOptions] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Suffix + decoder for one group of images (``boxes``: (N, 4) box prompts instead of the
        points, SAM only; ``low_res``, ``options``: see :meth:`decode`)."""
        return self.decode(self.encode_suffix(prefix), points, labels, boxes=boxes, low_res=low_res, options=options)

    def freeze(self) -> "Backbone":
        """No parameter of the backbone trains; train/eval mode still follows the caller
        (it matters for SAM 2's decoder)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self
