"""SAM's attention with decomposed relative positions, without keeping the N x N maps.

``segment_anything``'s Attention computes, per head, ``softmax(s q kᵀ + B) v`` where the
relative-position bias ``B[i, (kh, kw)] = rel_h[i, kh] + rel_w[i, kw]`` comes from the query
(``rel_h = q · R_h``, ``rel_w = q · R_w``, :func:`decomposed_rel_pos_terms`). It materialises
the scores, the bias sum and the softmax as (B * heads) x N x N tensors, and autograd keeps the
softmax for the backward: at 1024 px a global block of ViT-B holds 12 x 4096 x 4096 floats
(0.8 GB) per image. The paths here compute the same function:

* ``chunked`` (:class:`ChunkedRelPosAttention`): query blocks of a bounded size, each block's
  scores, bias and softmax made and dropped in turn; the forward keeps only the output and each
  row's log-sum-exp, and the backward recomputes one block at a time (as FlashAttention does,
  in plain torch operations). The bias's gradient is summed back onto ``rel_h`` and ``rel_w``.
* ``sdpa`` (:func:`sdpa_rel_pos_attention`): the bias folded into the dot product, so that
  ``torch.nn.functional.scaled_dot_product_attention`` runs with no mask: the query becomes
  ``[s q, rel_h, rel_w]`` and the key ``[k, onehot(kh), onehot(kw)]`` (head width c + Kh + Kw,
  the value zero-padded to it).
* ``stock``: ``segment_anything``'s own computation (the release's numbers bit for bit).

Extra key/value tokens before the image's own (a prompt pool's prefixes) get no bias
(:func:`prefixed_sam_attention`, which every path goes through).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, add_decomposed_rel_pos, get_rel_pos

from .base import split_heads

ATTENTION_PATHS = ("chunked", "sdpa", "stock")
# scores computed at once by the chunked path (elements, summed over heads and windows): 16 MB of fp32 on a CPU,
# where a block this size stays near the caches and the loop costs little; 256 MB on a GPU, where launches cost more
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
# query rows of one head (or window) per block: a fixed number for a key count, whatever the batch, so that an
# image's result does not depend on the images beside it (128 rows of 4096 keys)
ROW_ELEMENTS = 1 << 19


def decomposed_rel_pos_terms(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                             grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two halves of the relative-position bias, as ``segment_anything``'s
    ``add_decomposed_rel_pos`` forms them before adding them to the map.

    q: (BH, h * w, c) unscaled queries; grid: (h, w), queries and keys alike.
    Returns rel_h (BH, h * w, h) and rel_w (BH, h * w, w).
    """
    h, w = grid
    r_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, rel_pos_h))
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, rel_pos_w))
    return rel_h.reshape(q.shape[0], h * w, h), rel_w.reshape(q.shape[0], h * w, w)


def _blocks(bh: int, rows: int, keys: int, device: torch.device):
    """(head range, row range) pairs that cover a (bh, rows, keys) score tensor: blocks of a fixed number of
    rows (:data:`ROW_ELEMENTS`, at least 16), as many heads at once as :data:`CHUNK_ELEMENTS` allows."""
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    step_rows = min(rows, max(16, ROW_ELEMENTS // keys))
    step_bh = min(bh, max(1, budget // (step_rows * keys)))
    for b0 in range(0, bh, step_bh):
        for r0 in range(0, rows, step_rows):
            yield slice(b0, min(bh, b0 + step_bh)), slice(r0, min(rows, r0 + step_rows))


def score_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs (autocast's softmax), the inputs' own otherwise (fp64 stays fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _scores(q: torch.Tensor, kt: torch.Tensor, rel_h: Optional[torch.Tensor], rel_w: Optional[torch.Tensor],
            prefix: int) -> torch.Tensor:
    """Scores (bh, rows, P + M) of one block, at least fp32 (:func:`score_dtype`): q (bh, rows, c)
    against the scaled keys kt (bh, c, P + M), with the bias on the image columns."""
    dtype = score_dtype(q)
    s = torch.bmm(q, kt).to(dtype)
    if rel_h is not None:
        image = s[..., prefix:].unflatten(-1, (rel_h.shape[-1], rel_w.shape[-1]))
        image.add_(rel_h.to(dtype)[..., :, None]).add_(rel_w.to(dtype)[..., None, :])
    return s


class ChunkedRelPosAttention(torch.autograd.Function):
    """softmax(scale q kᵀ + bias) v computed a block of queries at a time (see the module's docstring).

    q: (BH, N, c); k, v: (BH, P + M, c) with P extra tokens first; rel_h (BH, N, Kh) and rel_w
    (BH, N, Kw) with Kh * Kw = M, or both None (no bias). Returns (BH, N, c) in v's dtype.
    Scores, softmax and its gradient are at least fp32 whatever the inputs' dtype (as autocast's softmax).
    """

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, scale: float):  # type: ignore[override]
        with torch.autocast(q.device.type, enabled=False):
            prefix = k.shape[1] - (rel_h.shape[-1] * rel_w.shape[-1] if rel_h is not None else k.shape[1])
            kt = (k * scale).transpose(1, 2)
            out = torch.empty(q.shape[:2] + (v.shape[-1],), dtype=v.dtype, device=q.device)
            lse = torch.empty(q.shape[:2], dtype=score_dtype(q), device=q.device)
            for b, r in _blocks(q.shape[0], q.shape[1], k.shape[1], q.device):
                s = _scores(q[b, r], kt[b], None if rel_h is None else rel_h[b, r],
                            None if rel_w is None else rel_w[b, r], prefix)
                m = torch.logsumexp(s, dim=-1, keepdim=True)
                torch.bmm(s.sub_(m).exp_().to(v.dtype), v[b], out=out[b, r])
                lse[b, r] = m[..., 0]
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out, lse)
        ctx.scale, ctx.prefix = scale, prefix
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
        scale, prefix = ctx.scale, ctx.prefix
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(v.dtype)
            kt = (k * scale).transpose(1, 2)
            dq = torch.empty_like(q)
            acc = score_dtype(q)
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
            d_rel_h = None if rel_h is None else torch.empty_like(rel_h)
            d_rel_w = None if rel_w is None else torch.empty_like(rel_w)
            delta = (grad_out.to(acc) * out.to(acc)).sum(-1)  # (BH, N): rowsum(dO * O)
            for b, r in _blocks(q.shape[0], q.shape[1], k.shape[1], q.device):
                p = _scores(q[b, r], kt[b], None if rel_h is None else rel_h[b, r],
                            None if rel_w is None else rel_w[b, r], prefix)
                p.sub_(lse[b, r, None]).exp_()  # the softmax, recomputed
                g = grad_out[b, r]
                dv[b] += torch.bmm(p.transpose(1, 2).to(v.dtype), g).to(acc)
                ds = torch.bmm(g, v[b].transpose(1, 2)).to(acc).sub_(delta[b, r, None]).mul_(p)  # dL/dscores
                if rel_h is not None:
                    image = ds[..., prefix:].unflatten(-1, (rel_h.shape[-1], rel_w.shape[-1]))
                    d_rel_h[b, r] = image.sum(-1).to(rel_h.dtype)
                    d_rel_w[b, r] = image.sum(-2).to(rel_w.dtype)
                ds = ds.to(q.dtype)
                dq[b, r] = torch.bmm(ds, kt[b].transpose(1, 2))
                dk[b] += torch.bmm(ds.transpose(1, 2), q[b, r]).to(acc).mul_(scale)
        return dq, dk.to(k.dtype), dv.to(v.dtype), d_rel_h, d_rel_w, None


def sdpa_rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: Optional[torch.Tensor],
                           rel_w: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """The same function as :class:`ChunkedRelPosAttention` through ``scaled_dot_product_attention``,
    the bias folded into wider queries and keys (one-hot key positions): no mask, so the fused
    kernels apply."""
    if rel_h is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    prefix = k.shape[1] - kh * kw
    eye_h = torch.eye(kh, dtype=k.dtype, device=k.device).repeat_interleave(kw, 0)  # key (a, b) -> onehot(a)
    eye_w = torch.eye(kw, dtype=k.dtype, device=k.device).repeat(kh, 1)  # key (a, b) -> onehot(b)
    positions = torch.cat([eye_h, eye_w], dim=-1)
    if prefix:
        positions = torch.cat([positions.new_zeros(prefix, kh + kw), positions])
    c = v.shape[-1]
    # the fused kernels want one head width for queries, keys and values, a multiple of 8: zero columns
    # (which add nothing to a dot product) pad all three to it, and the output drops the value's padding
    width = -(-(c + kh + kw) // 8) * 8
    pad = width - (c + kh + kw)
    q_wide = F.pad(torch.cat([q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype)], dim=-1), (0, pad))
    k_wide = F.pad(torch.cat([k, positions.expand(k.shape[0], -1, -1)], dim=-1), (0, pad))
    return F.scaled_dot_product_attention(q_wide, k_wide, F.pad(v, (0, width - c)), scale=1.0)[..., :c]


def rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: Optional[torch.Tensor],
                      rel_w: Optional[torch.Tensor], scale: float, path: str) -> torch.Tensor:
    """softmax(scale q kᵀ + bias) v by a memory-efficient ``path`` ("chunked" or "sdpa"); shapes as
    :class:`ChunkedRelPosAttention`."""
    if path == "sdpa":
        return sdpa_rel_pos_attention(q, k, v, rel_h, rel_w, scale)
    if path == "chunked":
        return ChunkedRelPosAttention.apply(q, k, v, rel_h, rel_w, scale)
    raise ValueError(f"unknown attention path {path!r}; choose from {ATTENTION_PATHS}")


def prefixed_sam_attention(attn: torch.nn.Module, x: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor) -> torch.Tensor:
    """``segment_anything``'s Attention.forward on ``x`` (B, H, W, C) with P extra key/value tokens
    ``key``, ``value`` (B, P, C) before the image tokens' own; relative positions (when the block
    uses them) are added to the image columns of the attention map only (prompt columns get none).
    A :class:`MemoryEfficientAttention` computes by its path and keeps
    no map; the stock Attention with P = 0 runs the same operations as its own forward (the same
    result bit for bit). Returns (B, H, W, C)."""
    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)  # (B * heads, HW, c)
    p = key.shape[1]
    if p:
        k = torch.cat([split_heads(key, heads).reshape(b * heads, p, -1), k], dim=1)
        v = torch.cat([split_heads(value, heads).reshape(b * heads, p, -1), v], dim=1)
    if isinstance(attn, MemoryEfficientAttention):
        rel_h = rel_w = None
        if attn.use_rel_pos:
            rel_h, rel_w = decomposed_rel_pos_terms(q, attn.rel_pos_h, attn.rel_pos_w, (h, w))
        out = rel_pos_attention(q, k, v, rel_h, rel_w, attn.scale, attn.path)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)  # (B * heads, HW, P + HW)
        if attn.use_rel_pos:
            image = add_decomposed_rel_pos(scores[..., p:].contiguous(), q, attn.rel_pos_h, attn.rel_pos_w,
                                           (h, w), (h, w))
            scores = torch.cat([scores[..., :p], image], dim=-1) if p else image
        out = scores.softmax(dim=-1) @ v
    out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out)


class MemoryEfficientAttention(Attention):
    """``segment_anything``'s Attention with a memory-efficient forward (same parameters, same
    state dict). :func:`use_attention` turns a built model's attentions into this class in place."""

    path: str = "chunked"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        empty = x.new_zeros(x.shape[0], 0, self.qkv.out_features // 3)
        return prefixed_sam_attention(self, x, empty, empty)


def use_attention(model: torch.nn.Module, path: str) -> None:
    """Every ``segment_anything`` Attention of ``model`` computes by ``path`` from now on
    ("stock": the package's own forward). Parameters and hooks stay as they are."""
    if path not in ATTENTION_PATHS:
        raise ValueError(f"unknown attention path {path!r}; choose from {ATTENTION_PATHS}")
    for m in model.modules():
        if isinstance(m, Attention):
            if path == "stock":
                m.__class__ = Attention
            else:
                m.__class__ = MemoryEfficientAttention
                m.path = path
