"""Experience replay (ER): one shared module trained through the domains, every optimisation
batch half current data, half samples replayed from a reservoir of raw training samples of the
domains so far (:mod:`samcl.replay`; mammoth's ``er``).

Each training batch of N images is joined by min(N, buffer size) replayed samples (none while
the buffer is empty: the first batch of the first domain); the loss (the configured one, summed
over images) covers all of them. The replayed images' frozen prefix is computed afresh (the
training cache knows only the current domain's images). The current batch is offered to the
reservoir after its loss is computed (mammoth's order). The buffer is the method's whole memory
(each image and mask kept as a lossless PNG): written after every step as ``replay/after_<domain>``
(the buffer as of that step: the latest is what storage counts beside the module), reloaded from
the last finished step on resume, and carried across a partial epoch by :meth:`state_dict`.
``--replay_mb`` gives it a byte budget instead of a sample count (:mod:`samcl.replay`).
"""
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from .. import distributed as dist
from ..backbones.base import Features
from ..data import PAD_LABEL
from ..loading import Batch
from ..learning_modules.base import LearningModule
from ..registry import register_method
from ..settings import Settings, setting
from ..replay import REPLAY_DIR, Replayed, ReservoirBuffer
from ..run_folder import RunFolderError, step_snapshot
from .base import ContinualMethod, Forward
from .finetune import FineTune

log = logging.getLogger("samcl.methods.er")


def join_batches(current: Batch, replayed: Batch) -> Batch:
    """The current rows, then the replayed ones; point sets widened to one size with label -1."""
    p = max(current.points.shape[1], replayed.points.shape[1])

    def widen(x: torch.Tensor, fill: float) -> torch.Tensor:
        extra = x.new_full((x.shape[0], p - x.shape[1]) + tuple(x.shape[2:]), fill)
        return torch.cat([x, extra], 1)

    return Batch(images=torch.cat([current.images, replayed.images]), masks=torch.cat([current.masks, replayed.masks]),
                 points=torch.cat([widen(current.points, 0), widen(replayed.points, 0)]),
                 labels=torch.cat([widen(current.labels, PAD_LABEL), widen(replayed.labels, PAD_LABEL)]),
                 names=current.names + replayed.names)


def join_features(current: Features, replayed: Features) -> Features:
    """Two prefixes (dicts of batch-first tensors) as one, current rows first."""
    if current.keys() != replayed.keys():
        raise ValueError(f"prefixes with different parts cannot be joined: {sorted(current)} vs {sorted(replayed)}")
    return {k: torch.cat([v, replayed[k]]) for k, v in current.items()}


class ERSettings(Settings):
    """Experience replay (and DER++, which extends it)."""

    replay_size: int = setting(200, "er, der: training samples the reservoir keeps, all domains together", low=1)
    replay_mb: Optional[float] = setting(None, "er, der: a byte budget (MB) for the reservoir instead of "
                                         "--replay_size: samples (their PNGs, points, logits) are appended while "
                                         "they fit, then the count held is its capacity (algorithm R goes on)",
                                         low=0, open_low=True)


@register_method("er")
class ExperienceReplay(FineTune):
    routes = False
    keeps_embeddings = False
    keeps_every_module = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replay = ReservoirBuffer(*self.reservoir_settings())
        self.domain: Optional[str] = None  # the domain in training: what the buffer records for its samples

    def reservoir_settings(self) -> Tuple[Optional[int], int, Optional[int]]:
        """(capacity, seed, budget in bytes) of the reservoir: --replay_mb replaces --replay_size."""
        mb = getattr(self.cfg, "replay_mb", None)
        if mb is None:
            return self.cfg.replay_size, self.cfg.seed, None
        return None, self.cfg.seed, int(mb * 1024**2)

    def begin_domain(self, t: int, domain: str, trains: bool) -> Optional[LearningModule]:
        self.domain = domain
        return super().begin_domain(t, domain, trains)

    # ------------------------------------------------------------------ training
    def observe(self, batch: Batch, prefix: Features, forward: Forward) -> torch.Tensor:
        joined, joined_prefix, _ = self.compose(batch, prefix)
        loss = ContinualMethod.observe(self, joined, joined_prefix, forward)
        self.replay.add(batch, self.domain)
        return loss

    def compose(self, batch: Batch, prefix: Features) -> Tuple[Batch, Features, Optional[Replayed]]:
        """The optimisation batch: the N current rows, then min(N, buffer size) replayed ones (and
        the draw; None while the buffer is empty)."""
        replayed = self.replay.sample(len(batch.names), batch.images.device)
        if replayed is None:
            return batch, prefix, None
        return (join_batches(batch, replayed.batch), join_features(prefix, self.replay_prefix(replayed.batch)),
                replayed)

    @torch.no_grad()
    def replay_prefix(self, batch: Batch) -> Features:
        """The frozen features of replayed images, as the training cache gives them for current ones
        (the backbone's prefix; what the module kind keeps, e.g. CAD's whole frozen embedding)."""
        return self.current().frozen_features(self.model.backbone, batch.images)

    # ------------------------------------------------------------------ after a step, and the run folder
    def end_domain(self, t: int, domain: str, module: Optional[LearningModule],
                   data: Optional[DataLoader]) -> Dict[str, Any]:
        """Record the step's module, then write the whole buffer as this step's file (rank 0; every
        rank holds the same buffer, which is checked)."""
        out = super().end_domain(t, domain, module, data)
        if dist.is_distributed() and len(set(dist.all_gather_objects(self.replay.fingerprint()))) != 1:
            raise RuntimeError(f"{dist.rank_prefix()}the replay buffers of the ranks differ after {domain}")
        if dist.is_main():
            self.replay.save(self.run_dir / self.buffer_file(domain))
        r = self.replay
        log.info("replay buffer after %s: %d of %s samples (%s), %d offered, %.2f MB", domain, len(r),
                 r.capacity if r.capacity is not None else "(budget not reached)", r.domain_counts(), r.seen,
                 r.size_bytes() / 1024**2)
        return {**out, "replay": {"samples": len(self.replay), "seen": self.replay.seen,
                                  "bytes": self.replay.size_bytes(), "domains": self.replay.domain_counts()}}

    def buffer_file(self, domain: str) -> str:
        """The buffer as committed after ``domain``'s step (relative to the run folder)."""
        return step_snapshot(REPLAY_DIR, domain, self.weights)

    def step_files(self, domain: str) -> List[str]:
        return [self.buffer_file(domain)]

    def restore(self, completed: List[str]) -> None:
        """The buffer as after the last finished step."""
        if completed:
            self.replay = ReservoirBuffer.load(self.run_dir / self.buffer_file(completed[-1]))
            capacity, seed, budget = self.reservoir_settings()
            r = self.replay
            if (r.budget, r.seed) != (budget, seed) or (budget is None and r.capacity != capacity):
                held = f"replay_mb {r.budget / 1024**2:g}" if r.budget is not None else f"replay_size {r.capacity}"
                raise RunFolderError(f"{self.run_dir} was trained with {held} and seed {r.seed}; resume it with those")

    def state_dict(self) -> Dict[str, Any]:
        return {"replay": self.replay.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
