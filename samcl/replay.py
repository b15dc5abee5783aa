"""The rehearsal baselines' memory (er, der): a reservoir of raw training samples.

:class:`ReservoirBuffer` keeps at most ``capacity`` training samples of all domains together,
a uniform sample of every sample offered so far (Vitter's algorithm R, as mammoth's buffer):
the n-th sample offered (n counted from 0) is appended while n < capacity; after that a slot
j is drawn uniformly from 0..n and the sample replaces slot j if j < capacity (else it is
dropped). A sample is what a training batch holds for one image: the image (3, S, S) and its
mask (1, S, S), each kept as the lossless PNG of its uint8 values (decoded when the sample is
replayed: the replayed tensors equal the stored ones bit for bit), its prompt points (P, 2) and
labels (P,) as its batch row held them (P: that batch's, with its -1 padding), its file name and
domain, and for DER++ the decoder's low-resolution logits (1, 4G, 4G) float32 of the step that
stored it. Samples live in host memory; :meth:`ReservoirBuffer.sample` brings a draw to the
device as a :class:`~samcl.loading.Batch`, re-padding point sets of different sizes with label -1.

A byte budget (``budget``, ``--replay_mb``) instead of a sample count: the reservoir appends
samples while their bytes (:meth:`Sample.nbytes`: the PNGs, points, labels, logits) fit in the
budget; the first sample that does not fit fixes the capacity at the number held, and algorithm
R goes on with that capacity from that sample on (so the buffer stays a uniform sample of the
stream). Replacements change the total by the difference of two samples' sizes, so it stays
near the budget; the recorded bytes are the actual ones.

Randomness, all of it reproducible on resume:

* insertion draws come from the buffer's own ``torch.Generator`` seeded with ``seed``; its state
  and the count of samples offered are part of :meth:`ReservoirBuffer.state_dict`;
* replay draws (without replacement) come from a generator seeded afresh for every draw from
  (seed, rank, number of draws so far), so a resumed run draws as an uninterrupted one from
  that count alone.

Under torchrun every rank trains on its own shard: :meth:`ReservoirBuffer.add` gathers the
batch of every rank (in rank order) before offering it, so all ranks make the same insertion
draws and keep the same buffer (the run folder's file is rank 0's; every rank reloads it).
Replay draws differ per rank (the rank is in their seed): each rank replays its own samples,
as it trains on its own shard, and the draw count, identical on every rank, is all a resume
needs (a partial epoch is saved by rank 0 alone). A sample the DistributedSampler repeats to
even out the shards is offered twice, as a sample met in a later epoch is offered again
(mammoth's buffer sees every batch of every epoch).
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

from . import distributed as dist
from .data import PAD_LABEL
from .io import load_tagged, save_tagged
from .loading import Batch
from .run_folder import RunFolderError

REPLAY_FORMAT = "samcl-replay"
REPLAY_DIR = "replay"  # run folder: replay/after_<domain>.<suffix>, the buffer as committed after that step


def encode_png(t: torch.Tensor) -> bytes:
    """(C, H, W) uint8, C = 1 or 3 -> the lossless PNG of its values (OpenCV's encoder: the channels
    go in as they are and :func:`decode_png` gives them back in that order)."""
    a = t.detach().cpu().to(torch.uint8).permute(1, 2, 0).numpy()
    ok, data = cv2.imencode(".png", np.ascontiguousarray(a[..., 0] if a.shape[2] == 1 else a))
    if not ok:
        raise RuntimeError(f"a replay sample of shape {tuple(t.shape)} could not be encoded as PNG")
    return data.tobytes()


def decode_png(data: bytes) -> torch.Tensor:
    """The PNG of :func:`encode_png` -> its (C, H, W) uint8 tensor."""
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    a = a[..., None] if a.ndim == 2 else a
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


@dataclass
class Sample:
    """One stored training sample (host memory): image and mask as PNG bytes."""

    image_png: bytes  # the image (3, S, S) uint8
    mask_png: bytes  # the mask (1, S, S) uint8 {0, 1}
    points: torch.Tensor  # (P, 2) float, in the S x S frame
    labels: torch.Tensor  # (P,) long, -1 for padding
    name: str
    domain: str
    logits: Optional[torch.Tensor] = None  # (1, 4G, 4G) float32: the decoder's logits when it was stored (DER++)

    @property
    def image(self) -> torch.Tensor:
        return decode_png(self.image_png)

    @property
    def mask(self) -> torch.Tensor:
        return decode_png(self.mask_png)

    def nbytes(self) -> int:
        """What the sample costs to keep: its PNGs and the bytes of its tensors."""
        tensors = [t for t in (self.points, self.labels, self.logits) if t is not None]
        return len(self.image_png) + len(self.mask_png) + sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Replayed:
    """A draw from the buffer: the samples as a batch on the device, their stored logits
    (N, 1, 4G, 4G) float32 (None where the buffer keeps none), their slots (N,) and domains."""

    batch: Batch
    logits: Optional[torch.Tensor]
    slots: torch.Tensor
    domains: List[str]


def _draw_seed(seed: int, rank: int, draw: int) -> int:
    """The seed of replay draw ``draw`` on ``rank``: a stable hash, distinct for every triple."""
    return int.from_bytes(hashlib.sha256(f"replay/{seed}/{rank}/{draw}".encode()).digest()[:8], "little") >> 1


def pad_points(points: List[torch.Tensor], labels: List[torch.Tensor]):
    """Point sets of different sizes -> (N, P, 2) and (N, P), padded with label -1 as
    :func:`samcl.data.collate` pads a batch."""
    p = max(x.shape[0] for x in points)
    out = points[0].new_zeros((len(points), p, 2))
    lab = labels[0].new_full((len(labels), p), PAD_LABEL)
    for i, (x, y) in enumerate(zip(points, labels)):
        out[i, : x.shape[0]] = x
        lab[i, : y.shape[0]] = y
    return out, lab


class ReservoirBuffer:
    """At most ``capacity`` training samples over all domains, a uniform sample of the stream
    (see the module docstring); or, with ``budget`` (bytes), as many as fit in it when it is first
    reached (``capacity`` is None until then). ``seen``: samples offered so far; ``draws``:
    replay draws so far."""

    def __init__(self, capacity: Optional[int], seed: int, budget: Optional[int] = None) -> None:
        if budget is None and (capacity is None or capacity < 1):
            raise ValueError(f"a replay buffer holds at least one sample, got capacity {capacity}")
        if budget is not None and budget < 1:
            raise ValueError(f"a replay buffer's byte budget must be positive, got {budget}")
        self.capacity = None if capacity is None else int(capacity)
        self.budget = None if budget is None else int(budget)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.seen = 0
        self.draws = 0
        self.samples: List[Sample] = []

    def __len__(self) -> int:
        return len(self.samples)

    # ------------------------------------------------------------------ the stream
    def _slot(self) -> Optional[int]:
        """Algorithm R for the next sample offered: its slot, or None when it is not kept."""
        n = self.seen
        self.seen += 1
        if n < self.capacity:
            return n
        j = int(torch.randint(0, n + 1, (1,), generator=self.generator))
        return j if j < self.capacity else None

    def _place(self, make: Callable[[], Sample]) -> bool:
        """Offer the next sample of the stream (``make`` builds it, only when it may be kept); True if kept."""
        if self.capacity is None:  # a budget not reached yet: append while it fits
            sample = make()
            if self.size_bytes() + sample.nbytes() <= self.budget:
                self.seen += 1
                self.samples.append(sample)
                return True
            self.capacity = len(self.samples)  # 0 when one sample outweighs the budget: nothing is kept
            slot = self._slot()
        else:
            slot = self._slot()
            if slot is None:
                return False
            sample = make()
        if slot is None:
            return False
        if slot == len(self.samples):
            self.samples.append(sample)
        else:
            self.samples[slot] = sample
        return True

    @torch.no_grad()
    def add(self, batch: Batch, domain: str, logits: Optional[torch.Tensor] = None) -> int:
        """Offer every image of ``batch`` (of domain ``domain``; under torchrun every rank's batch,
        in rank order) to the reservoir, with its low-resolution ``logits`` (N, 1, 4G, 4G) where
        given. Returns how many were stored. Every rank must call it with its batch."""
        # per rank: its names and its batch's point count
        shards = dist.all_gather_objects((list(batch.names), batch.points.shape[1]))
        offered = [(r, i) for r, (names, _) in enumerate(shards) for i in range(len(names))]
        if self.capacity is not None:  # the slots are drawn before anything is gathered
            slots = [self._slot() for _ in offered]
            if all(slot is None for slot in slots):  # identical on every rank: then no rank gathers anything
                return 0
        rows = max(len(names) for names, _ in shards)  # every rank pads to as many rows and points
        points = max(q for _, q in shards)
        parts = {"images": batch.images.to(torch.uint8), "masks": batch.masks.to(torch.uint8),
                 "points": batch.points, "labels": batch.labels}
        if logits is not None:
            parts["logits"] = logits.float()
        parts = {k: _pad(v, rows, points if k in ("points", "labels") else None,
                         PAD_LABEL if k == "labels" else 0) for k, v in parts.items()}
        gathered = {k: dist.all_gather_tensor(v) for k, v in parts.items()}

        def make(r: int, i: int) -> Sample:
            row, q = r * rows + i, shards[r][1]
            return Sample(image_png=encode_png(gathered["images"][row]), mask_png=encode_png(gathered["masks"][row]),
                          points=gathered["points"][row, :q].cpu(), labels=gathered["labels"][row, :q].cpu(),
                          name=shards[r][0][i], domain=domain,
                          logits=gathered["logits"][row].cpu() if logits is not None else None)

        if self.capacity is None:
            return sum(self._place(lambda r=r, i=i: make(r, i)) for r, i in offered)
        for (r, i), slot in zip(offered, slots):
            if slot is None:
                continue
            if slot == len(self.samples):
                self.samples.append(make(r, i))
            else:
                self.samples[slot] = make(r, i)
        return sum(slot is not None for slot in slots)

    # ------------------------------------------------------------------ replay
    def sample(self, n: int, device: torch.device) -> Optional[Replayed]:
        """min(n, len) samples drawn without replacement (None when the buffer is empty), as a
        batch on ``device``: images float 0..255, masks float {0, 1}, points padded with label -1."""
        k = min(int(n), len(self.samples))
        if k <= 0:
            return None
        g = torch.Generator().manual_seed(_draw_seed(self.seed, dist.rank(), self.draws))
        self.draws += 1
        slots = torch.randperm(len(self.samples), generator=g)[:k]
        chosen = [self.samples[int(s)] for s in slots]
        points, labels = pad_points([s.points for s in chosen], [s.labels for s in chosen])
        batch = Batch(images=torch.stack([s.image for s in chosen]).to(device).float(),
                      masks=torch.stack([s.mask for s in chosen]).to(device).float(),
                      points=points.to(device), labels=labels.to(device), names=[s.name for s in chosen])
        logits = None
        if all(s.logits is not None for s in chosen):
            logits = torch.stack([s.logits for s in chosen]).to(device)
        return Replayed(batch, logits, slots, [s.domain for s in chosen])

    # ------------------------------------------------------------------ accounting
    def size_bytes(self) -> int:
        """Bytes of what the buffer keeps: each sample's PNGs, points, labels and logits."""
        return sum(s.nbytes() for s in self.samples)

    def domain_counts(self) -> Dict[str, int]:
        """Samples held per domain, in the order the domains first appear in the buffer."""
        out: Dict[str, int] = {}
        for s in self.samples:
            out[s.domain] = out.get(s.domain, 0) + 1
        return out

    def fingerprint(self) -> str:
        """SHA-256 of the whole state: equal on two ranks exactly when their buffers are equal."""
        h = hashlib.sha256()
        h.update(repr((self.capacity, self.budget, self.seed, self.seen, self.draws)).encode())
        h.update(self.generator.get_state().numpy().tobytes())
        for s in self.samples:
            h.update(repr((s.name, s.domain, s.points.shape[0], len(s.image_png), len(s.mask_png))).encode())
            h.update(s.image_png + s.mask_png)
            for t in (s.points, s.labels, s.logits):
                if t is not None:
                    h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The whole buffer (tensors, numbers, strings and lists: loaded weights-only), stacked:
        ``images`` and ``masks`` the samples' PNGs one after another (uint8) with
        ``image_ends`` / ``mask_ends`` (n,) where each ends, ``points`` (n, P, 2) and ``labels``
        (n, P) padded with -1, ``point_counts`` (n,) each sample's own P, ``logits``
        (n, 1, 4G, 4G) where kept; ``generator`` the insertion generator's state; ``capacity``
        -1 while a budget has not fixed it, ``budget`` -1 without one."""
        state: Dict[str, Any] = {"capacity": -1 if self.capacity is None else self.capacity,
                                 "budget": -1 if self.budget is None else self.budget, "seed": self.seed,
                                 "seen": self.seen, "draws": self.draws, "generator": self.generator.get_state(),
                                 "names": [s.name for s in self.samples], "domains": [s.domain for s in self.samples]}
        if self.samples:
            points, labels = pad_points([s.points for s in self.samples], [s.labels for s in self.samples])
            for key, blobs in (("images", [s.image_png for s in self.samples]),
                               ("masks", [s.mask_png for s in self.samples])):
                state[key] = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
                state[key[:-1] + "_ends"] = torch.tensor(np.cumsum([len(b) for b in blobs]), dtype=torch.long)
            state.update(points=points, labels=labels,
                         point_counts=torch.tensor([s.points.shape[0] for s in self.samples], dtype=torch.long))
            if all(s.logits is not None for s in self.samples):
                state["logits"] = torch.stack([s.logits for s in self.samples])
        return state

    @staticmethod
    def _settings(state: Dict[str, Any]) -> Tuple[Optional[int], Optional[int], int]:
        """(capacity, budget, seed) of a state (None: not fixed yet / no budget)."""
        capacity, budget = int(state["capacity"]), int(state.get("budget", -1))
        return (None if capacity < 0 else capacity), (None if budget < 0 else budget), int(state["seed"])

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        capacity, budget, seed = self._settings(state)
        if budget != self.budget or seed != self.seed or (budget is None and capacity != self.capacity):
            raise ValueError(f"a replay buffer of capacity {capacity}, budget {budget} and seed {seed} cannot be "
                             f"loaded into one of capacity {self.capacity}, budget {self.budget} and seed {self.seed}")
        names, domains = list(state["names"]), list(state["domains"])
        samples = []
        for i, (name, domain) in enumerate(zip(names, domains)):
            q = int(state["point_counts"][i])
            if "image_ends" in state:
                image, mask = _blob(state, "images", "image_ends", i), _blob(state, "masks", "mask_ends", i)
            else:  # written before the samples were kept as PNGs: (n, 3, S, S) and (n, 1, S, S) uint8
                image, mask = encode_png(state["images"][i]), encode_png(state["masks"][i])
            samples.append(Sample(image_png=image, mask_png=mask,
                                  points=state["points"][i, :q].clone(), labels=state["labels"][i, :q].clone(),
                                  name=name, domain=domain,
                                  logits=state["logits"][i].clone() if "logits" in state else None))
        self.samples = samples
        self.capacity = capacity
        self.seen, self.draws = int(state["seen"]), int(state["draws"])
        self.generator.set_state(state["generator"].clone())

    def save(self, path: Path) -> None:
        """The buffer as a tagged file (:func:`samcl.io.save_tagged`, in the format ``path``'s suffix says)."""
        save_tagged({"format": REPLAY_FORMAT, "version": 2, **self.state_dict()}, path)

    @classmethod
    def load(cls, path: Path) -> "ReservoirBuffer":
        """A buffer written by :meth:`save` (RunFolderError naming the file if it is not one)."""
        state = load_tagged(path, {REPLAY_FORMAT}, "replay buffer", RunFolderError)
        try:
            capacity, budget, seed = cls._settings(state)
            buffer = cls(capacity, seed, budget)
            buffer.load_state_dict(state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise RunFolderError(f"{path} is not a valid replay buffer written by this project ({e})") from None
        return buffer


def _blob(state: Dict[str, Any], key: str, ends: str, i: int) -> bytes:
    """Sample i's bytes of the concatenated ``state[key]``."""
    start = 0 if i == 0 else int(state[ends][i - 1])
    return state[key][start: int(state[ends][i])].numpy().tobytes()


def _pad(t: torch.Tensor, rows: int, points: Optional[int], fill: int) -> torch.Tensor:
    """``t`` padded to ``rows`` rows (and, for points and labels, to ``points`` along dim 1) with ``fill``."""
    shape = list(t.shape)
    shape[0] = rows
    if points is not None:
        shape[1] = points
    if list(t.shape) == shape:
        return t
    out = t.new_full(shape, fill)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out
