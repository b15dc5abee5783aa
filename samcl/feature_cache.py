"""Frozen-prefix feature cache for module training.

The encoder prefix (blocks up to the selector layer, :meth:`Backbone.encode_prefix`)
is frozen and the training data carry no random augmentation, so an image's prefix
is the same in every epoch. :class:`PrefixCache` computes it once per training
image (keyed by its dataset index) and hands the stored copy back in later epochs.

* Exact: the stored tensors are the fp32 values the encoder computed; nothing is
  converted. A cached prefix equals a recomputed one wherever the encoder gives an
  image the same result in any batch (true on the CPU; on CUDA the GEMM kernels
  may round differently for another batch size, at the last bit).
* Bounded: a byte budget caps it; images beyond the budget are recomputed every
  epoch as without the cache. Nothing is written to disk (``--resume`` simply
  starts with an empty cache).
* Modes (``--feature_cache``): ``auto`` (default) fills host memory during the
  first epoch and then moves the cache to the GPU if it fits beside the training
  step's measured peak (else it stays in pinned host memory); ``device`` keeps it
  on the training device from the start; ``cpu`` in host memory (pinned when
  training on CUDA); ``off`` computes the prefix every time, as the release does.
  On a CPU device, ``auto``/``device``/``cpu`` are the same (host memory).
* Distributed: each rank caches the images its sampler gives it. A
  DistributedSampler reshuffles the shards every epoch, so a rank meets more of
  the dataset over the epochs; the budget (host default divided among the ranks
  of a machine) bounds what it keeps.
* A prefix that is not deterministic in training mode (a dropout or drop-path
  layer with p > 0 runs inside it) cannot be cached: the cache then switches
  itself off with a warning.
"""
import logging
import os
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

log = logging.getLogger("samcl.feature_cache")

CACHE_MODES = ("auto", "off", "device", "cpu")
GiB = 1024 ** 3
HOST_SHARE = 0.5  # default host budget: this share of the available memory (divided among local ranks)
DEVICE_SHARE = 0.4  # default budget of mode "device": this share of the GPU's free memory
DEVICE_MARGIN = 0.1  # auto: keep this share of the GPU's memory (at least 1 GiB) free beside step peak + cache

Features = Dict[str, torch.Tensor]


def available_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux); a fixed 8 GiB guess elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB


def _local_world_size() -> int:
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)


def _stochastic(m: nn.Module) -> bool:
    """A layer that draws random numbers in training mode (dropout, drop-path / stochastic depth)."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    return float(getattr(m, "drop_prob", 0.0) or 0.0) > 0


def _layout(v: torch.Tensor) -> List[int]:
    """Dimension order in which ``v`` is laid out in memory (batch first), so that a stored copy
    keeps the strides of the computed tensor: kernels downstream may round differently for
    another layout, and the cache must hand back exactly what the encoder gave."""
    order = [0] + sorted(range(1, v.dim()), key=lambda d: -v.stride(d))
    return order if v.permute(order).is_contiguous() else list(range(v.dim()))


def _inverse(order: List[int]) -> List[int]:
    inv = [0] * len(order)
    for i, d in enumerate(order):
        inv[d] = i
    return inv


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024 ** 2:.1f} MB" if n < GiB else f"{n / GiB:.2f} GB"


class PrefixCache:
    """Per-image cache of a backbone's frozen prefix over one training split.

    Args:
        mode: one of :data:`CACHE_MODES`.
        device: the training device (where :meth:`prefix` returns its tensors).
        n_items: length of the dataset (dataset indices are 0..n_items-1).
        budget_gb: cap on the bytes held (None: derived, see the module doc).
    """

    def __init__(self, mode: str, device: torch.device, n_items: int, budget_gb: Optional[float] = None,
                 encode: Optional[Callable[[Any, torch.Tensor], Features]] = None) -> None:
        if mode not in CACHE_MODES:
            raise ValueError(f"feature_cache must be one of {CACHE_MODES}, got {mode!r}")
        if budget_gb is not None and budget_gb < 0:
            raise ValueError(f"cache_budget_gb must be >= 0, got {budget_gb}")
        self.mode = mode
        # what is frozen and worth keeping: the prefix, or more (CAD adds the whole frozen embedding)
        self.encode = encode or (lambda backbone, images: backbone.encode_prefix(images))
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" names the current GPU: say which,
            self.device = torch.device("cuda", torch.cuda.current_device())  # so that slab.device == self.device
        self.n_items = int(n_items)
        self.budget_gb = budget_gb
        self.cuda = self.device.type == "cuda"
        self.enabled = mode != "off" and self.n_items > 0
        self.reason = "off" if mode == "off" else ""
        self.slot = torch.full((max(self.n_items, 0),), -1, dtype=torch.long)  # dataset index -> slot
        self.slabs: Dict[str, torch.Tensor] = {}  # per prefix entry: (capacity, ...) in memory order
        self.orders: Dict[str, List[int]] = {}  # per entry: its memory order (see _layout)
        self.capacity = 0
        self.used = 0
        self.item_bytes = 0
        self.hits = 0
        self.misses = 0
        self.epochs = 0
        self._checked = False
        self._promotion_tried = False
        # where the slabs go first: the device for mode "device" (and on a CPU device), else host memory
        self.on_device = mode == "device" or not self.cuda
        if self.cuda and self.enabled and mode == "auto":
            torch.cuda.reset_peak_memory_stats(self.device)  # auto measures the first epoch's peak

    @classmethod
    def for_training(cls, cfg, device: torch.device, n_items: int,
                     encode: Optional[Callable[[Any, torch.Tensor], Features]] = None) -> "PrefixCache":
        """The cache a training run's settings ask for (``feature_cache``, ``cache_budget_gb``);
        ``encode(backbone, images)`` computes the frozen features (default: the prefix)."""
        return cls(getattr(cfg, "feature_cache", "auto"), device, n_items, getattr(cfg, "cache_budget_gb", None),
                   encode)

    # ------------------------------------------------------------ sizes
    @property
    def location(self) -> str:
        if not self.slabs:
            return "none"
        dev = next(iter(self.slabs.values())).device
        return "host (pinned)" if dev.type == "cpu" and self.cuda else str(dev)

    def bytes_held(self) -> int:
        """Bytes the cache holds (allocated slabs, filled or not)."""
        return sum(s.numel() * s.element_size() for s in self.slabs.values())

    def _budget(self, on_device: bool) -> int:
        if self.budget_gb is not None:
            return int(self.budget_gb * GiB)
        if on_device and self.cuda:
            free, _total = torch.cuda.mem_get_info(self.device)
            return int(free * DEVICE_SHARE)
        return int(available_host_bytes() * HOST_SHARE / _local_world_size())

    def stats(self) -> Dict:
        total = self.hits + self.misses
        return {"mode": self.mode, "enabled": self.enabled, "reason": self.reason, "location": self.location,
                "images": self.used, "capacity": self.capacity, "dataset": self.n_items,
                "bytes_per_image": self.item_bytes, "bytes": self.bytes_held(), "hits": self.hits,
                "misses": self.misses, "hit_rate": self.hits / total if total else 0.0}

    # ------------------------------------------------------------ epochs
    def new_epoch(self) -> None:
        """Called at the start of every training epoch; ``auto`` on CUDA moves the cache to
        the GPU after the first epoch if it fits beside the measured step peak."""
        self.epochs += 1
        if (self.enabled and self.mode == "auto" and self.cuda and not self.on_device and self.slabs
                and not self._promotion_tried and self.epochs >= 2):
            self._promotion_tried = True
            self._promote()

    def _promote(self) -> None:
        free, total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        transient = max(torch.cuda.max_memory_allocated(self.device) - allocated, 0)
        headroom = free + (reserved - allocated) - transient - max(int(total * DEVICE_MARGIN), GiB)
        if self.budget_gb is not None:
            headroom = min(headroom, int(self.budget_gb * GiB))
        capacity = min(self.n_items, headroom // max(self.item_bytes, 1))
        if capacity < self.used or capacity <= 0:
            log.info("feature cache stays in host memory: %s do not fit beside the training step on %s "
                     "(headroom %s)", _fmt_bytes(self.used * self.item_bytes), self.device, _fmt_bytes(max(headroom, 0)))
            return
        slabs = {}
        for k, s in self.slabs.items():
            d = torch.empty((capacity,) + tuple(s.shape[1:]), dtype=s.dtype, device=self.device)
            d[: self.used].copy_(s[: self.used])
            slabs[k] = d
        self.slabs, self.capacity, self.on_device = slabs, capacity, True
        log.info("feature cache moved to %s: %d images, %s", self.device, self.used, _fmt_bytes(self.bytes_held()))

    # ------------------------------------------------------------ lookups
    def prefix(self, backbone, images: torch.Tensor, index: torch.Tensor) -> Features:
        """The frozen prefix of a batch: stored entries where present, computed (and stored while
        the budget lasts) otherwise. ``index``: (N,) dataset indices of the batch."""
        if not self.enabled:
            return self.encode(backbone, images)
        index = index.detach().long().cpu()
        slots = self.slot[index]
        hit = slots >= 0
        n_hit = int(hit.sum())
        self.hits += n_hit
        self.misses += len(index) - n_hit
        if n_hit == len(index):
            return self._gather(slots)
        if n_hit == 0:
            out = self._compute(backbone, images)
            self._store(index, out)
            return out
        miss = (~hit).nonzero().squeeze(1)
        computed = self._compute(backbone, images[miss.to(images.device)])
        self._store(index[miss], computed)
        if not self.enabled:  # switched itself off: compute the rest too
            return self.encode(backbone, images)
        cached = self._gather(slots[hit])
        hit_pos = hit.nonzero().squeeze(1).to(self.device)
        miss_pos = miss.to(self.device)
        out = {}
        for k, v in computed.items():
            order = self.orders[k]
            phys = v.permute(order)
            t = phys.new_empty((len(index),) + tuple(phys.shape[1:]))
            t[miss_pos] = phys
            t[hit_pos] = cached[k].permute(order)
            out[k] = t.permute(_inverse(order))
        return out

    def _gather(self, slots: torch.Tensor) -> Features:
        out = {}
        for k, s in self.slabs.items():
            if s.device == self.device:
                t = s.index_select(0, slots.to(s.device))
            else:  # host slab, CUDA training: gather into pinned memory, copy asynchronously
                staging = torch.empty((len(slots),) + tuple(s.shape[1:]), dtype=s.dtype, pin_memory=True)
                torch.index_select(s, 0, slots, out=staging)
                t = staging.to(self.device, non_blocking=True)
            out[k] = t.permute(_inverse(self.orders[k]))  # the computed tensor's strides
        return out

    def _compute(self, backbone, images: torch.Tensor) -> Features:
        if self._checked:
            return self.encode(backbone, images)
        # first call: watch for layers that would make the prefix random in training mode
        fired = []
        handles = [m.register_forward_pre_hook(lambda mod, _inp: fired.append(mod) if mod.training else None)
                   for m in backbone.modules() if _stochastic(m)]
        try:
            out = self.encode(backbone, images)
        finally:
            for h in handles:
                h.remove()
        self._checked = True
        if fired:
            self.enabled = False
            self.reason = f"the prefix is random in training mode ({type(fired[0]).__name__})"
            log.warning("feature cache off: %s; the prefix is computed every epoch", self.reason)
        return out

    def _store(self, index: torch.Tensor, feats: Features) -> None:
        if not self.enabled:
            return
        if not self.slabs and not self._allocate(feats):
            return
        room = self.capacity - self.used
        if room <= 0:
            return
        index = index[:room]
        n = len(index)
        slots = torch.arange(self.used, self.used + n)
        for k, s in self.slabs.items():
            s[slots.to(s.device)] = feats[k][:n].permute(self.orders[k]).to(s.device)
        self.slot[index] = slots
        self.used += n

    def _allocate(self, feats: Features) -> bool:
        """Size the slabs from the first computed batch: one row per image, up to the budget."""
        n = next(iter(feats.values())).shape[0]
        self.item_bytes = sum(v.numel() // n * v.element_size() for v in feats.values())
        budget = self._budget(self.on_device)
        self.capacity = min(self.n_items, budget // max(self.item_bytes, 1))
        if self.capacity <= 0:
            self.enabled = False
            self.reason = (f"budget {_fmt_bytes(budget)} is less than one image's prefix "
                           f"({_fmt_bytes(self.item_bytes)})")
            log.warning("feature cache off: %s", self.reason)
            return False
        dev = self.device if self.on_device else torch.device("cpu")
        pin = self.cuda and dev.type == "cpu"
        self.orders = {k: _layout(v) for k, v in feats.items()}
        self.slabs = {k: torch.empty((self.capacity,) + tuple(v.permute(self.orders[k]).shape[1:]), dtype=v.dtype,
                                     device=dev, pin_memory=pin) for k, v in feats.items()}
        log.info("feature cache: up to %d of %d images (%s each, %s) in %s%s", self.capacity, self.n_items,
                 _fmt_bytes(self.item_bytes), _fmt_bytes(self.bytes_held()), self.location,
                 "" if self.capacity == self.n_items else " (the rest is recomputed every epoch)")
        return True

    def close(self) -> Dict:
        """Free the slabs; returns the final stats."""
        s = self.stats()
        if self.enabled:
            log.info("feature cache: %d images (%s, %s), hit rate %.1f%%", s["images"], _fmt_bytes(s["bytes"]),
                     s["location"], 100 * s["hit_rate"])
        self.slabs = {}
        return s
