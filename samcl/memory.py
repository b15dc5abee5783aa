"""Memory preflight: the peak memory a training or test run will need, checked before anything is written.

:func:`estimate` counts, from the built backbone's shapes (:meth:`Backbone.block_plans`: width,
heads, window, global blocks, q-pooling, the split at the selector layer), the input side, the
batch and the precision:

* the batch: the loader's uint8 images, their float copy and the normalised input, the masks;
* the frozen prefix, without autograd: the largest transient of one block (its token tensors
  and its attention, :mod:`samcl.memory_blocks`) and the prefix output it hands on;
* the blocks after the selector layer: without autograd the same transients; in training, from
  the first block whose attention input needs a gradient (where a learning module acts before
  or inside it), what autograd keeps for the backward (token tensors and, on SAM's stock
  attention, the (B * heads) x N x N softmax maps) block after block, then the backward's
  transients as the kept tensors are freed again;
* the neck, the decoder, the logits at the input size and the loss (a fixed count per image
  of the embedding, the low-resolution logits and the input's pixels);
* the learning module's parameters with their gradients and Adam's two moments;
* the first step's one-time allocations (:data:`RUNTIME_TRAINING`, :data:`RUNTIME_INFERENCE`);
* on a CPU, the training feature cache (:mod:`samcl.feature_cache`: the prefix per training
  image of the largest split, within its budget: ``cache_budget_gb`` or half of what is free).

One block's bytes, its token tensors and its attention, come from :mod:`samcl.memory_blocks`,
one function per attention path (:data:`~samcl.memory_blocks.ATTENTION_PATHS`): "materialised"
is ``segment_anything``'s Attention (the maps computed, the softmax kept for the backward),
"chunked" the default path (a block of scores at a time), "sdpa" ``scaled_dot_product_attention``
(SAM 2's Hiera), which keeps no map.

Left out: the model's own weights (built before the check, so they are already taken from
what is free), the data loader's worker processes and what they prefetch, the allocator's
fragmentation and caches, the selector's training (small), and the buffers of the kernels
themselves. :data:`FREE_SHARE` keeps a margin for them. bf16 counts CUDA's autocast policy
(the softmax in fp32), a little more than a CPU's.
"""
import logging
import os
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

import torch

from . import distributed as dist
from .backbones.base import Backbone, BlockPlan
from .feature_cache import HOST_SHARE, available_host_bytes
from .learning_modules.base import LearningModule
from .memory_blocks import FLOAT, BlockCost, attention_sizes, block_cost
from .model import ModuleBank

log = logging.getLogger("samcl.memory")

GB = 1024 ** 3
FREE_SHARE = 0.9  # a run fits if its estimate is at most this share of the free memory
IMG_SIDES = (1024, 768, 512, 384, 256, 128)  # input sides suggested below the current one
# the neck, decoder, logits and loss per image, in numbers of: the embedding (E x G x G), the pixels (S x S)
HEAD_EMBEDDING = 24
HEAD_PIXELS = 12
# the first step's one-time allocations (kernel libraries, thread pools, the autograd engine), measured on a CPU
RUNTIME_INFERENCE = 48 * 1024 ** 2
RUNTIME_TRAINING = 64 * 1024 ** 2


class MemoryCheckError(ValueError):
    """A run whose estimated peak memory is more than is free; the message says what would fit."""


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of a phase, and what makes it (for the message)."""

    peak: int
    cache: int  # bytes of the training feature cache counted in ``peak`` (0: none)
    largest_map: str  # the largest attention of one image, in words ("" for none)
    phase: str = ""  # the phase at the peak, in words ("" for a test)

    @property
    def gb(self) -> float:
        return self.peak / GB


def _largest_map(plans: List[BlockPlan]) -> str:
    maps = [(attention_sizes(p)[1] * p.heads, i, p) for i, p in enumerate(plans) if p.attention == "materialised"]
    if not maps:
        return ""
    _, i, p = max(maps)
    n = p.window ** 2 if p.window else p.grid_in ** 2
    where = f"{(p.padded // p.window) ** 2} windows of {n} tokens" if p.window else f"{n} tokens"
    return f"block {i}'s attention maps: {p.heads} heads x {where} squared per image"


def kept_from(model: ModuleBank) -> Optional[int]:
    """The first encoder block whose attention keeps its maps for the backward when a module of the
    bank trains: the block where it hooks the attention's input or the attention itself, else the
    block after its first hook; None if it acts after the encoder only (neck, decoder)."""
    backbone = model.backbone
    with torch.random.fork_rng(devices=[]):
        module = model.spec.build(backbone)
    first: Optional[int] = None
    for target, kind, _fn in module.hooks(backbone, {}):
        for i in range(backbone.selector_layer + 1, backbone.depth):
            if not any(target is m for m in backbone.block(i).modules()):
                continue
            attention = backbone.attention(i)
            # a hook on the attention's output, its output projection, the MLP or the block's output leaves
            # the block's own maps without gradient; one on its input, its qkv or the attention itself does not
            after = ((target in (attention, backbone.block(i)) and kind == "forward")
                     or target is getattr(attention, "proj", None)
                     or any(target is m for m in backbone.mlp(i).modules()))
            k = i + 1 if after else i
            first = k if first is None else min(first, k)
    return first


def module_parameters(model: ModuleBank) -> int:
    with torch.random.fork_rng(devices=[]):
        return sum(p.numel() for p in model.spec.build(model.backbone).parameters())


def caches_more(model: ModuleBank) -> bool:
    """Whether the module's frozen features (the cache's entries) hold more than the prefix (CAD)."""
    return model.spec.module_class().frozen_features is not LearningModule.frozen_features


def _batch_bytes(img_size: int) -> int:
    """One image of a batch: uint8 from the loader, its float copy and the normalised input, the float mask."""
    return img_size ** 2 * (3 + 3 * 4 + 3 * 4 + 4)


def _head_bytes(backbone: Backbone, img_size: int) -> int:
    grid = backbone.block_plans(img_size)[backbone.selector_layer].grid_out
    return 4 * (HEAD_EMBEDDING * backbone.embedding_channels * grid ** 2 + HEAD_PIXELS * img_size ** 2)


def cache_item_bytes(model: ModuleBank, img_size: int) -> int:
    """Bytes the training cache keeps per image (fp32): the prefix, and the embedding for a module
    that caches it too."""
    backbone = model.backbone
    n = backbone.prefix_elements(img_size)
    if caches_more(model):
        n += backbone.embedding_channels * backbone.block_plans(img_size)[backbone.selector_layer].grid_out ** 2
    return 4 * n


def inference_peak(backbone: Backbone, img_size: int, batch: int, amp: str) -> int:
    """Evaluation or test: the whole encoder without autograd, the decoder, two sets of logits."""
    plans = backbone.block_plans(img_size)
    prefix_amp = amp  # test inference runs the prefix under autocast too
    prefix_out = backbone.prefix_elements(img_size) * FLOAT[prefix_amp]
    worst = max(batch * c.no_grad + c.scores(batch) for c in (block_cost(p, prefix_amp) for p in plans))
    return batch * (_batch_bytes(img_size) + prefix_out) + max(worst, batch * _head_bytes(backbone, img_size))


def training_peak(model: ModuleBank, img_size: int, batch: int, amp: str, first_kept: Optional[int]) -> int:
    """One training step: the prefix in fp32 without autograd, then the blocks after the selector
    layer, the head and the backward (``first_kept``: see :func:`kept_from`)."""
    backbone = model.backbone
    plans = backbone.block_plans(img_size)
    s = backbone.selector_layer
    live = batch * _batch_bytes(img_size)
    peak = live + max(batch * c.no_grad + c.scores(batch) for c in (block_cost(p, "off") for p in plans[: s + 1]))
    live += batch * backbone.prefix_elements(img_size) * 4
    kept: List[BlockCost] = []
    for i in range(s + 1, len(plans)):
        c = block_cost(plans[i], amp)
        if first_kept is not None and i >= first_kept:
            peak = max(peak, live + batch * c.forward + c.scores(batch))
            live += batch * c.kept
            kept.append(c)
        else:
            peak = max(peak, live + batch * c.no_grad + c.scores(batch))
    head = _head_bytes(backbone, img_size)
    peak = max(peak, live + batch * head)
    for c in reversed(kept):
        peak = max(peak, live + batch * c.backward + c.scores(batch, backward=True))
        live -= batch * c.kept
    return peak


def estimate(model: ModuleBank, *, img_size: int, batch: int, amp: str, training: bool,
             eval_batch: Optional[int] = None, cache: Optional[Tuple[str, Optional[float], int]] = None,
             free: int = 0, first_kept: Optional[int] = None, module_bytes: int = 0) -> Estimate:
    """The peak bytes of a training run (``training``: the step at ``batch``, its validation at
    ``eval_batch``, the optimizer and ``cache`` = (mode, budget in GB or None, images of the
    largest split) on a CPU) or of a test (``batch`` = the evaluation batch), over the built model.
    ``free``: the free bytes, which bound the cache's default budget."""
    backbone = model.backbone
    largest = _largest_map(backbone.block_plans(img_size))
    if not training:
        return Estimate(RUNTIME_INFERENCE + inference_peak(backbone, img_size, batch, amp), 0, largest)
    step = training_peak(model, img_size, batch, amp, first_kept)
    phase = "the training step"
    if eval_batch and inference_peak(backbone, img_size, eval_batch, amp) > step:
        step, phase = inference_peak(backbone, img_size, eval_batch, amp), f"the validation at batch {eval_batch}"
    step += 4 * module_bytes + RUNTIME_TRAINING  # parameters, gradients, Adam's two moments
    held = 0
    if cache is not None and cache[0] != "off":
        mode, budget_gb, items = cache
        budget = int(budget_gb * GB) if budget_gb is not None else int(max(free - step, 0) * HOST_SHARE)
        held = min(items * cache_item_bytes(model, img_size), budget)
    return Estimate(step + held, held, largest, phase)


# ----------------------------------------------------------------------------- the check
def free_bytes(device: torch.device) -> Tuple[int, str]:
    """Free memory where the run allocates, and where it was read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached), f"free on {device} (torch.cuda.mem_get_info)"
    return available_host_bytes(), "available host memory (MemAvailable)"


def _fmt(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB / 10 else f"{n / 1024 ** 2:.0f} MB"


@dataclass(frozen=True)
class Plan:
    """The settings an estimate is made for."""

    img_size: int
    batch: int
    amp: str
    eval_batch: Optional[int] = None  # a training run's validation batch
    cache_budget_gb: Optional[float] = None
    feature_cache: str = "auto"


def check_memory(cfg, model: ModuleBank, device: torch.device, *, training: bool, train_items: int = 0,
                 resume: bool = False, batch_flag: str = "--batch_size") -> Optional[Estimate]:
    """Refuse (:class:`MemoryCheckError`, one line) a run whose estimated peak is more than
    :data:`FREE_SHARE` of the free memory, with flags that fit; nothing if ``cfg.memory_check`` is off.

    ``training``: a training run (``cfg.batch_size``, its validation at ``cfg.eval_batch_size``, the
    cache of ``train_items`` images); else a test at ``cfg.eval_batch_size``. ``resume``: only flags a
    resume may change are suggested. ``batch_flag``: the flag of the batch size in the message."""
    if not getattr(cfg, "memory_check", True):
        return None
    from .precision import amp_available

    device = torch.device(device)
    free, where = free_bytes(device)
    first_kept = kept_from(model) if training else None
    module_bytes = module_parameters(model) * 4 if training else 0
    on_cpu = device.type == "cpu"
    ranks = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1) if on_cpu else 1  # they share the host

    def need(p: Plan) -> Estimate:
        e = estimate(model, img_size=p.img_size, batch=p.batch, amp=p.amp, training=training,
                     eval_batch=p.eval_batch,
                     cache=(p.feature_cache, p.cache_budget_gb, train_items) if training and on_cpu else None,
                     free=free // ranks, first_kept=first_kept, module_bytes=module_bytes)
        return replace(e, peak=e.peak * ranks)

    def fits(p: Plan) -> bool:
        return need(p).peak <= FREE_SHARE * free

    batch = cfg.batch_size if training else cfg.eval_batch_size
    now = Plan(model.backbone.img_size, batch, cfg.amp, cfg.eval_batch_size if training else None,
               getattr(cfg, "cache_budget_gb", None), getattr(cfg, "feature_cache", "auto"))
    est = need(now)
    verdict = None if fits(now) else refusal(cfg, model, now, est, free, where, need, fits, training, resume,
                                              batch_flag, amp_available(device), ranks)
    if dist.is_distributed():  # every rank refuses if one does (the others would wait for it)
        verdict = next((v for v in dist.all_gather_objects(verdict) if v), None)
    if verdict:
        raise MemoryCheckError(verdict)
    log.info("memory check: about %s of %s %s needed at the peak", _fmt(est.peak), _fmt(free), where)
    return est


def suggestions(model: ModuleBank, now: Plan, fits: Callable[[Plan], bool], training: bool, resume: bool,
                batch_flag: str, bf16: bool) -> List[Tuple[str, Plan]]:
    """Flags that fit, each checked by the estimate: the largest batch, the largest input side, bf16,
    the cache (a CPU training run); a resume may change the cache only."""
    out: List[Tuple[str, Plan]] = []
    if resume and training:
        budget = None
        if now.feature_cache != "off":
            for gb in (8, 4, 2, 1, 0.5):
                p = replace(now, cache_budget_gb=gb)
                if (now.cache_budget_gb is None or gb < now.cache_budget_gb) and fits(p):
                    budget = (f"--cache_budget_gb {gb:g}", p)
                    break
            if budget:
                out.append(budget)
            elif fits(replace(now, feature_cache="off")):
                out.append(("--feature_cache off", replace(now, feature_cache="off")))
        return out
    batches = smaller_batches(now, fits, batch_flag)
    if batches:
        out.append(batches)
    m = model.backbone.input_multiple
    sides = [s for s in IMG_SIDES if s < now.img_size and s % m == 0]
    fit_sides = [s for s in sides if fits(replace(now, img_size=s))]
    if fit_sides:
        out.append((f"--img_size {fit_sides[0]}", replace(now, img_size=fit_sides[0])))
    if bf16 and now.amp == "off" and fits(replace(now, amp="bf16")):
        out.append(("--amp bf16", replace(now, amp="bf16")))
    if training and now.feature_cache != "off" and fits(replace(now, feature_cache="off")):
        out.append(("--feature_cache off", replace(now, feature_cache="off")))
    if not batches and not fit_sides:  # neither alone: both together
        for s in sides:
            p = replace(now, img_size=s, batch=1, eval_batch=None if now.eval_batch is None else 1)
            if fits(p):
                evals = "" if now.eval_batch is None else " --eval_batch_size 1"
                out.append((f"{batch_flag} 1{evals} --img_size {s}", p))
                break
    return out


def smaller_batches(now: Plan, fits: Callable[[Plan], bool], batch_flag: str) -> Optional[Tuple[str, Plan]]:
    """The largest batch that fits (with a training run's validation batch lowered where that
    alone does not fit), as flags."""
    for b in range(now.batch, 0, -1):
        evals = [None] if now.eval_batch is None else range(now.eval_batch, 0, -1)
        for e in evals:
            p = replace(now, batch=b, eval_batch=e)
            if p != now and fits(p):
                flags = [f"{batch_flag} {b}"] if b != now.batch else []
                flags += [f"--eval_batch_size {e}"] if e != now.eval_batch else []
                return " ".join(flags), p
    return None


def refusal(cfg, model: ModuleBank, now: Plan, est: Estimate, free: int, where: str, need, fits, training: bool,
            resume: bool, batch_flag: str, bf16: bool, ranks: int) -> str:
    what = "training" if training else "testing"
    precision = "bf16" if now.amp == "bf16" else "fp32"
    parts = [f"memory check: {what} {cfg.arch_name} at {now.img_size} px, batch {now.batch}, {precision} needs "
             f"about {_fmt(est.peak)} at its peak" + (f" ({ranks} processes)" if ranks > 1 else "")]
    detail = [d for d in (est.phase, est.largest_map, f"feature cache {_fmt(est.cache)}" if est.cache else "") if d]
    if detail:
        parts[0] += f" ({'; '.join(detail)})"
    parts[0] += f", but {_fmt(free)} is {where}"
    options = suggestions(model, now, fits, training, resume, batch_flag, bf16)
    if options:
        parts.append("flags that fit: " + ", ".join(f"{flag} (about {_fmt(need(p).peak)})" for flag, p in options))
    elif resume:
        parts.append("a resume keeps the run's batch size, input size and precision")
    else:
        parts.append("no smaller batch or input side fits")
    parts.append("--no-memory_check skips this check")
    return "; ".join(parts)
