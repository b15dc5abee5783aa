"""What one encoder block holds, per image: its token tensors and its attention, by attention path.

:func:`block_cost` reads a :class:`~samcl.backbones.base.BlockPlan` (widths, heads, window, grid,
the attention path) and gives the bytes :mod:`samcl.memory` adds up block by block. The attention
is one function per path (:data:`ATTENTION_PATHS`); a new path is one function more.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from .backbones.attention import CHUNK_ELEMENTS, ROW_ELEMENTS
from .backbones.base import BlockPlan

FLOAT = {"off": 4, "bf16": 2}  # bytes of a token tensor in the autocast region
# numbers per token and unit of width a block holds besides its attention (measured on segment_anything's Block)
TOKENS_NO_GRAD = 11  # without autograd, the largest moment: the MLP (input, norm, 4C hidden, 4C activation)
TOKENS_KEPT = 16  # with autograd: norms, qkv, attention output, projections, the MLP's 8C, the residuals
TOKENS_FORWARD = 9  # with autograd, transient in the attention: the qkv and its reshaped copy, the scaled q
TOKENS_BACKWARD = 6  # in the backward: gradients of the qkv and of the tokens


@dataclass(frozen=True)
class AttentionCost:
    """Bytes of one image's attention in one block (beyond its token tensors).

    forward: alive at once while it runs; kept: kept for the backward (with autograd); backward:
    alive at once in its backward besides what it kept. A path that computes its scores a block at
    a time adds ``scores``: the bytes of one image's whole score map, of which ``scores_forward``
    (``scores_backward``) copies are in flight at once, together at most ``scores_cap`` bytes per
    copy for the whole batch.
    """

    forward: int
    kept: int
    backward: int
    scores: int = 0
    scores_cap: int = 0
    scores_forward: int = 0
    scores_backward: int = 0


def attention_sizes(plan: BlockPlan) -> Tuple[int, int]:
    """(queries, keys) summed over the windows of one image's attention, per head and key:
    (number of query tokens, attention-map entries)."""
    if plan.window > 0:
        windows = (plan.padded // plan.window) ** 2
        keys = plan.window ** 2
    else:
        windows, keys = 1, plan.grid_in ** 2
    queries = windows * keys // plan.q_stride ** 2
    return queries, queries * keys


def materialised_attention(plan: BlockPlan, amp: str) -> AttentionCost:
    """``segment_anything``'s Attention: the scores, the two additions of the decomposed relative
    positions (three maps at once), the softmax (kept for the backward) and, in the backward, the
    gradients of the softmax and of the scores. bf16: the maps in bf16, the softmax in fp32."""
    _, maps = attention_sizes(plan)
    maps *= plan.heads
    fwd, kept = (12, 4) if amp == "off" else (6, 6)
    return AttentionCost(forward=fwd * maps, kept=kept * maps, backward=8 * maps)


def sdpa_attention(plan: BlockPlan, amp: str) -> AttentionCost:
    """``scaled_dot_product_attention``: no map, its output and the softmax statistics (and the
    query, key and value gradients in the backward)."""
    queries, _ = attention_sizes(plan)
    out = queries * plan.width_out * FLOAT[amp]
    stats = queries * plan.heads * 4
    return AttentionCost(forward=out + stats, kept=out + stats, backward=3 * out)


def chunked_attention(plan: BlockPlan, amp: str) -> AttentionCost:
    """:class:`~samcl.backbones.attention.ChunkedRelPosAttention`: its output, the row statistics
    and the two relative-position terms kept; in flight, one block of scores as the path cuts them
    (:data:`~samcl.backbones.attention.ROW_ELEMENTS` rows of a head, as many heads of the whole batch
    as :data:`~samcl.backbones.attention.CHUNK_ELEMENTS` of the CPU allows) in fp32 and the
    log-sum-exp's temporary (the exponent is taken in place); in the backward the recomputed
    softmax, the score gradient and one temporary, and fp32 key and value gradients."""
    queries, _ = attention_sizes(plan)
    keys = plan.window ** 2 if plan.window else plan.grid_in ** 2
    matrices = queries // keys * plan.heads  # windows x heads of one image
    rows = min(keys, max(16, ROW_ELEMENTS // keys))
    out = queries * plan.width_out * FLOAT[amp]
    side = plan.window or plan.grid_in
    rel = queries * plan.heads * 2 * side * FLOAT[amp] if plan.rel_pos else 0
    kept = out + rel + queries * plan.heads * 4
    return AttentionCost(forward=kept, kept=kept, backward=3 * queries * plan.width_out * 4,
                         scores=4 * matrices * rows * keys,
                         scores_cap=4 * max(1, CHUNK_ELEMENTS["cpu"] // (rows * keys)) * rows * keys,
                         scores_forward=2, scores_backward=3)


def sdpa_rel_pos_attention(plan: BlockPlan, amp: str) -> AttentionCost:
    """The SDPA path with the relative positions folded into wider queries and keys
    (:func:`~samcl.backbones.attention.sdpa_rel_pos_attention`): as :func:`sdpa_attention`, plus the
    wide query and key (c + Kh + Kw per head) kept."""
    base = sdpa_attention(plan, amp)
    queries, _ = attention_sizes(plan)
    side = plan.window or plan.grid_in
    wide = 2 * queries * (plan.width_out + plan.heads * 2 * side) * FLOAT[amp] if plan.rel_pos else 0
    return AttentionCost(forward=base.forward + wide, kept=base.kept + wide, backward=base.backward + wide)


# attention path of a block plan -> its cost; a memory-efficient path is one function more
ATTENTION_PATHS: Dict[str, Callable[[BlockPlan, str], AttentionCost]] = {
    "materialised": materialised_attention, "sdpa": sdpa_attention, "chunked": chunked_attention,
    "sdpa_rel_pos": sdpa_rel_pos_attention}


@dataclass(frozen=True)
class BlockCost:
    """Bytes of one image in one block: ``no_grad`` peak without autograd; with autograd, ``forward``
    transient, ``kept`` for the backward and ``backward`` transient; ``attention``: its attention's
    cost, for the score blocks a batch shares (:meth:`scores`)."""

    no_grad: int
    forward: int
    kept: int
    backward: int
    attention: AttentionCost

    def scores(self, batch: int, backward: bool = False) -> int:
        """Bytes of the score blocks in flight for a ``batch`` (0 for a path that has none)."""
        a = self.attention
        one = min(batch * a.scores, a.scores_cap) if a.scores_cap else batch * a.scores
        return one * (a.scores_backward if backward else a.scores_forward)


def block_cost(plan: BlockPlan, amp: str) -> BlockCost:
    if plan.attention not in ATTENTION_PATHS:
        raise ValueError(f"no memory estimate for the attention path {plan.attention!r}; "
                         f"known: {sorted(ATTENTION_PATHS)}")
    att = ATTENTION_PATHS[plan.attention](plan, amp)
    b = FLOAT[amp]
    padded = plan.padded ** 2 * plan.width_out * b  # token tensors inside the windows
    tokens = max(plan.grid_in ** 2 * plan.width_in, plan.grid_out ** 2 * plan.width_out) * b
    return BlockCost(no_grad=max(TOKENS_FORWARD * padded + att.forward, TOKENS_NO_GRAD * tokens),
                     forward=TOKENS_FORWARD * padded + att.forward,
                     kept=TOKENS_KEPT * tokens + att.kept,
                     backward=TOKENS_BACKWARD * padded + att.backward, attention=att)
