"""L2P's prompt pool (Wang et al. 2022) as prefix tuning of the blocks after the selector layer.

What is built: prompts as prefixes of the late blocks' keys and values, chosen per image by L2P's
query-key matching. That is closer to DualPrompt's E-prompts (prefix tuning of some blocks'
keys/values; Wang et al. 2022b) than to L2P's own prompts, which are tokens prepended to the
input sequence of the first block: SAM's image encoder sees a dense token grid (windowed
attention, no class token), so tokens added to its input would change the grid's shape.

The pool holds M keys (M, D_sel), D_sel = ``backbone.selector_dim``, and for every late block
(the blocks after the selector layer) M prompts (M, 2, L, C): a key prompt ``[:, 0]`` and a
value prompt ``[:, 1]`` of L tokens each, learnt separately, in the block attention's key/value
space (C = the attention's width, split into its heads like the block's own keys and values;
after the qkv projection: no bias, no relative position). Per image the query is the frozen
prefix embedding ``backbone.selector_embedding(prefix)``, the one the Module Selector reads;
the top-k keys by cosine similarity choose k prompts, whose k*L key and k*L value tokens are
prepended to the keys and values of every late block's attention (the image tokens' queries
attend to them; no query is added, so the token grid keeps its shape).

Injection: while attached, each late block's attention runs another forward instead of its own
(a "replace" injection): the same attention, from the attention's own qkv/proj weights, with
the extra keys and values, which the backbone provides (:meth:`Backbone.prefixed_attention
<samcl.backbones.base.Backbone.prefixed_attention>`); with no prompt it computes exactly what
the stock forward does, once. In windowed blocks every window of an image gets that image's
prompts; SAM's relative positions are added to the image-token columns of the attention map
only (prompt columns get none); SAM 2's q-pooling blocks pool the queries as the stock
attention does, the prompts join the (unpooled) keys and values.

Initialisation: keys and prompts uniform in [-1, 1] (L2P's). Prefixes change a fresh module's
output even with zero values (the prompt columns take part of every softmax), so by default a fresh
pool already changes the frozen model's output, as L2P's and DualPrompt's do. With ``l2p_gate`` every
late block mixes ``plain + g_j * (prompted - plain)`` with a learnt scalar g_j that starts at 0
(zero-init gating, as LLaMA-Adapter's): an untrained pool leaves the frozen model's output bit for
bit unchanged, and the prompts start learning once the gates move from 0 (they get no gradient
at the first step). It computes each late block's attention twice (with and without prompts).
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone, DecodeOptions, Features, PrefixedAttention
from ..registry import register_learning_module
from ..settings import Settings, setting
from .base import Hook, LearningModule, ModuleSpec


class PromptPoolSettings(Settings):
    """The prompt pool's sizes (--method l2p)."""

    l2p_pool_size: int = setting(10, "l2p: key/prompt pairs in the pool", low=1)
    l2p_top_k: int = setting(5, "l2p: prompts chosen per image", low=1)
    l2p_prompt_length: int = setting(5, "l2p: prefix tokens per prompt and block", low=1)
    l2p_gate: bool = setting(False, "l2p: a zero-initialised gate per late block on the prompts' effect, so that an "
                             "untrained pool leaves the frozen model's output unchanged (off: L2P's initialisation, "
                             "which changes it)")


@dataclass(frozen=True)
class PromptPoolSpec(ModuleSpec):
    """layers: the late blocks; widths: each one's attention width C (its qkv's out / 3);
    key_dim: D_sel; pool_size M; top_k k; length L (tokens per key and per value prompt)."""

    layers: Tuple[int, ...]
    widths: Tuple[int, ...]
    key_dim: int
    pool_size: int = 10
    top_k: int = 5
    length: int = 5
    gated: bool = False

    @classmethod
    def for_backbone(cls, backbone: Backbone, cfg: Any = None) -> "PromptPoolSpec":
        """Every block after the selector layer; M, k, L from ``cfg.l2p_pool_size``, ``l2p_top_k``,
        ``l2p_prompt_length`` (10, 5, 5 without a cfg)."""
        if backbone.family not in FAMILIES:
            raise ValueError(f"the prompt pool recomputes the attention of SAM and SAM 2 blocks, not of a "
                             f"{backbone.family} backbone")
        layers = tuple(range(backbone.selector_layer + 1, backbone.depth))
        spec = cls(layers=layers, widths=tuple(_width(backbone, i) for i in layers), key_dim=backbone.selector_dim,
                   pool_size=int(getattr(cfg, "l2p_pool_size", None) or 10),
                   top_k=int(getattr(cfg, "l2p_top_k", None) or 5),
                   length=int(getattr(cfg, "l2p_prompt_length", None) or 5),
                   gated=bool(getattr(cfg, "l2p_gate", False)))
        if spec.top_k > spec.pool_size:
            raise ValueError(f"l2p_top_k {spec.top_k} chooses more prompts than the pool holds "
                             f"(l2p_pool_size {spec.pool_size})")
        return spec

    def check(self, backbone: Backbone) -> None:
        problems = []
        if backbone.family not in FAMILIES:
            problems.append(f"no prefix attention for the {backbone.family} family")
        if self.key_dim != backbone.selector_dim:
            problems.append(f"keys of width {self.key_dim} (selector embedding: {backbone.selector_dim})")
        if self.layers and min(self.layers) <= backbone.selector_layer:
            problems.append(f"layers {list(self.layers)} reach the frozen prefix (selector layer "
                            f"{backbone.selector_layer})")
        for i, w in zip(self.layers, self.widths):
            if not 0 <= i < backbone.depth or _width(backbone, i) != w:
                problems.append(f"block {i} has no attention of width {w}")
        if problems:
            raise ValueError(f"prompt-pool module does not fit backbone {backbone.family}/{backbone.arch}: "
                             + "; ".join(problems))


def _width(backbone: Backbone, i: int) -> int:
    return backbone.qkv(i).out_features // 3


# the backbone families whose Backbone.prefixed_attention the pool runs
FAMILIES = ("sam", "sam2")


# ---------------------------------------------------------------------------- the module
def choose(query: torch.Tensor, keys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top-k keys of every query by cosine similarity.

    Args:
        query: (N, D); keys: (M, D).
    Returns:
        indices (N, k) into the pool, by decreasing similarity (ties: the lower index first,
        a stable sort), and their cosine similarities (N, k) (differentiable in the keys).
    """
    sim = F.normalize(query, dim=1) @ F.normalize(keys, dim=1).transpose(0, 1)  # (N, M)
    order = torch.sort(sim.detach(), dim=1, descending=True, stable=True).indices[:, :k]
    return order, sim.gather(1, order)


def pull_loss(similarity: torch.Tensor) -> torch.Tensor:
    """L2P's key-pull term: mean over images of sum over the chosen keys of (1 - cos(query, key));
    ``similarity`` (N, k) from :func:`choose`."""
    return (1 - similarity).sum(dim=1).mean()


@register_learning_module("prompt_pool")
class PromptPoolModule(LearningModule):
    """``keys`` (M, D_sel); ``prompts[j]`` (M, 2, L, C_j) of late block ``spec.layers[j]``.
    ``last_similarity`` is the (N, k) cosine similarity of the last call's chosen keys (the
    method's pull loss)."""

    spec_class = PromptPoolSpec
    backbones = FAMILIES
    backbone_reason = "the prompts enter by recomputing SAM's and SAM 2's block attention"
    # the keys get a gradient only from a loss on last_similarity (L2P's key pull), not from the segmentation
    # loss; a method whose loss always includes that term sets it False on its module (under DDP a parameter
    # unreachable from the forward's outputs but given a gradient later must not be declared unused)
    has_unused_parameters = True

    def __init__(self, spec: PromptPoolSpec) -> None:
        super().__init__(spec)
        self.keys = nn.Parameter(torch.empty(spec.pool_size, spec.key_dim).uniform_(-1, 1))
        self.prompts = nn.ParameterList(nn.Parameter(torch.empty(spec.pool_size, 2, spec.length, c).uniform_(-1, 1))
                                        for c in spec.widths)
        # l2p_gate: one scalar per late block, 0 at the start (no parameter without it: the files stay as they were)
        self.gates = nn.Parameter(torch.zeros(len(spec.layers))) if spec.gated else None
        self.last_similarity: Optional[torch.Tensor] = None
        self.last_chosen: Optional[torch.Tensor] = None  # (N, k) pool indices of the last call

    def select(self, query: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, D_sel) queries -> chosen pool indices (N, k) and their similarities (N, k) (:func:`choose`)."""
        return choose(query, self.keys, self.spec.top_k)

    def hooks(self, backbone: Backbone, context: Dict[str, Any]) -> List[Hook]:
        """The attention of every late block replaced, for the call, by the same attention with the
        chosen prompts (``context["chosen"]``: (N, k) pool indices per image; k may be 0)."""
        chosen: Optional[torch.Tensor] = context.get("chosen")

        def make(j: int, attention: PrefixedAttention):
            def forward(x: torch.Tensor) -> torch.Tensor:
                if chosen is None:
                    raise ValueError("a prompt-pool module chooses its prompts from the prefix: "
                                     "run it through segment()")
                n, k = chosen.shape
                p = self.prompts[j][chosen]  # (N, k, 2, L, C)
                # (N, 2, kL, C): the chosen prompts' tokens in rank order
                p = p.transpose(1, 2).reshape(n, 2, k * self.spec.length, p.shape[-1])
                p = p.repeat_interleave(x.shape[0] // n, dim=0)  # every window of an image: its prompts
                prompted = attention(x, p[:, 0], p[:, 1])
                if self.gates is None:
                    return prompted
                plain = attention(x, p[:, 0, :0], p[:, 1, :0])  # no prompt: the stock attention
                return plain + self.gates[j] * (prompted - plain)
            return forward

        return [(backbone.attention(i), "replace", make(j, backbone.prefixed_attention(i)))
                for j, i in enumerate(self.spec.layers)]

    def segment(self, backbone: Backbone, prefix: Features, images: Optional[torch.Tensor],
                heatmap: Optional[torch.Tensor], points: torch.Tensor, labels: torch.Tensor,
                boxes: Optional[torch.Tensor] = None, low_res: bool = False,
                options: Optional[DecodeOptions] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Choose the prompts from the prefix's selector embedding, then the suffix and the decoder
        with them; records ``last_similarity``."""
        chosen, self.last_similarity = self.select(backbone.selector_embedding(prefix))
        self.last_chosen = chosen
        with self.attached(backbone, chosen=chosen):
            return backbone.segment(prefix, points, labels, boxes=boxes, low_res=low_res, options=options)

    def describe(self) -> str:
        s = self.spec
        return (f"PromptPoolModule (prompt_pool): {self.counted_parameters():,} parameters = "
                f"{self.counted_size_mb():.4f} MB (pool of {s.pool_size} keys and key/value prompts of "
                f"{s.length} tokens on blocks {list(s.layers)}; top {s.top_k} per image"
                f"{'; zero-initialised gates' if s.gated else ''})")
