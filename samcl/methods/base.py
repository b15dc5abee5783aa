"""What every continual-learning method is: how learning proceeds across domains.

A method (mammoth's ContinualModel, in spirit) is driven by the protocol
(:mod:`samcl.continual`), which owns the data, the epochs, the run folder, resume,
DDP, bf16 and the feature cache, and calls for every domain t of the order:

* :meth:`ContinualMethod.begin_domain` -> the learning module that trains on domain t
  (None: the domain trains nothing, e.g. an unseen, test-only domain), on the training
  data of :meth:`ContinualMethod.training_domains` (by default domain t's alone);
* :meth:`ContinualMethod.observe` for every training batch of every epoch -> the loss
  (the protocol runs backward and the optimiser and scheduler steps);
* :meth:`ContinualMethod.end_domain` -> what the method records for the step (it may read
  the domain's training data once more, e.g. for a Fisher);

and :meth:`ContinualMethod.segment` to evaluate a batch, saying which module each image
used. The optimiser, the scheduler and the loss are the method's, built from the
configuration. A new method is one file in ``samcl/methods/`` (found there, no list to edit):
subclass, register it with ``@register_method("name")``, and declare any settings of its own in a
:class:`samcl.settings.Settings` subclass in the same file (its flags then appear in ``--help``).
"""
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..backbones.base import Features
from ..loading import Batch
from ..losses import training_loss
from ..model import ModuleBank
from ..learning_modules.base import LearningModule
from ..run_folder import WEIGHTS
from ..selector import EmbeddingBuffer

# the training forward the protocol hands to observe: SegmentStep (possibly under DDP and autocast)
Forward = nn.Module


class ContinualMethod:
    """Base of every method. ``model`` is the module bank (backbone, modules by domain,
    selector); ``buffer`` the embedding buffer the protocol fills from each domain's first
    training images; ``run_dir`` where the method writes its own files (None when testing)."""

    name: ClassVar[str]
    # the learning-module kinds the method works with (None: any)
    learning_modules: ClassVar[Optional[Tuple[str, ...]]] = None
    # whether segment() chooses a domain's module per image (then its choices are counted per test domain)
    routes: ClassVar[bool] = True
    # whether the protocol keeps the embedding buffer (each domain's selector embeddings) for the method
    keeps_embeddings: ClassVar[bool] = True
    # whether the method keeps every step's module (a bank) or only the latest one (one shared module)
    keeps_every_module: ClassVar[bool] = True
    # the setting a named variant sets in the sweep's --methods (samcl:oracle -> selector "oracle"), if any
    variant: ClassVar[Optional[str]] = None
    # the weight format of the run folder's files, which names the method's own files too
    # (run_folder.selector_snapshot, ...); the run state sets the run's own ("pth": written before safetensors)
    weights: str = WEIGHTS
    # the named terms of the training loss that observe() records with term(); the protocol writes each one's
    # mean per image and epoch (metrics.json, a step's "loss_terms"); together they sum to the loss
    loss_terms: ClassVar[Tuple[str, ...]] = ("task",)

    def __init__(self, cfg: Any, model: ModuleBank, device: torch.device, buffer: Optional[EmbeddingBuffer] = None,
                 run_dir: Optional[Path] = None) -> None:
        self.cfg = cfg
        self.model = model
        self.device = device
        self.buffer = buffer
        self.run_dir = run_dir
        self.terms: Dict[str, torch.Tensor] = {}  # the terms of the batch in hand (term, take_terms)

    # ------------------------------------------------------------------ lifecycle
    def begin_domain(self, t: int, domain: str, trains: bool) -> Optional[LearningModule]:
        raise NotImplementedError

    def holds_out(self, domain: str) -> bool:
        """Whether the method leaves ``domain`` (a test-only one) out of the model: no embeddings in
        the buffer, no part of the bank or the selector; it is only tested. By default none is."""
        return False

    def training_domains(self, t: int, domain: str, trainable: List[str]) -> List[str]:
        """The domains whose training data the module of step t trains on (``trainable``: every
        domain of the order that has training data, in order)."""
        return [domain]

    def observe(self, batch: Batch, prefix: Features, forward: Forward) -> torch.Tensor:
        """The loss of one training batch: the module's forward through ``forward`` and the configured loss."""
        return self.term("task", self.loss(*self.run_forward(batch, prefix, forward), batch))

    def term(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` (a scalar), recorded as the batch's term ``name`` (one of :attr:`loss_terms`) as it
        enters the loss, its weight included; returned unchanged."""
        if name not in self.loss_terms:
            raise ValueError(f"{type(self).__name__} records a loss term {name!r} it does not declare in "
                             f"loss_terms {self.loss_terms}")
        self.terms[name] = value.detach().float() + self.terms[name] if name in self.terms else value.detach().float()
        return value

    def take_terms(self) -> Dict[str, torch.Tensor]:
        """The terms :meth:`term` recorded since the last call (then forgotten)."""
        out, self.terms = self.terms, {}
        return out

    def run_forward(self, batch: Batch, prefix: Features, forward: Forward,
                    low_res: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, 1, S, S), or the decoder's (N, 1, 4G, 4G) with ``low_res``; IoU (N, 1)) of a
        batch through ``forward`` (the training forward, or any SegmentStep), with the model's prompts."""
        heat = self.model.heatmap(batch.points, batch.labels) if self.model.needs_heatmap else None
        return forward(prefix, heat, batch.points, batch.labels, batch.images, self.model.boxes(len(batch.names)),
                       low_res=low_res)

    def loss(self, logits: torch.Tensor, iou: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The configured training loss of (N, 1, S, S) logits and IoU (N, 1) against the batch's masks."""
        return training_loss(self.cfg.loss, logits, iou, batch.masks, self.cfg.iou_target, self.cfg.focal)

    def end_domain(self, t: int, domain: str, module: Optional[LearningModule],
                   data: Optional[DataLoader]) -> Dict[str, Any]:
        """After training (``data``: the step's training loader, None when nothing trained): update
        the method's state, write its files, return what the step records."""
        raise NotImplementedError

    def segment(self, prefix: Features, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, 1, S, S), choice (N,)) of a test batch: which domain's module each image used."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state in the run folder
    def restore(self, completed: List[str]) -> None:
        """Reload the method's own state after the finished steps ``completed`` (resume, test)."""

    def state_dict(self) -> Dict[str, Any]:
        """What the method changes while a domain trains (a replay buffer, ...), saved with the
        partial epoch (tensors, numbers, strings, lists and dicts of them: loaded weights-only)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Reload :meth:`state_dict` when a domain resumes after its last saved epoch."""

    def step_files(self, domain: str) -> List[str]:
        """Files (relative to the run folder) the method writes once for a step, checksummed at its commit."""
        return []

    def run_files(self) -> List[str]:
        """Files the method rewrites at every step, checksummed at each commit."""
        return []

    def kept_files(self, done: List[str]) -> List[str]:
        """The method's own files it needs to go on after the steps ``done`` (in order): what storage
        counts beside the modules and the embedding buffer. By default the latest step's files (a
        method whose files are snapshots of its whole state); the rest stay as a record."""
        return self.step_files(done[-1]) if done else []

    def needs_buffer(self) -> bool:
        """Whether the embedding buffer is part of what the method keeps (storage), beside being written."""
        return self.keeps_embeddings

    # ------------------------------------------------------------------ optimisation, from the configuration
    def make_optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """Adam (SAMCL's recipe) or AdamW (CAD's) over the module's trainable parameters."""
        params = [p for p in module.parameters() if p.requires_grad]
        if self.cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, batches_per_epoch: int):
        """Cosine annealing stepped every iteration: T_max = epochs as the release (quirk Q4,
        scheduler "reference") or one cosine over the domain's iterations ("cosine")."""
        t_max = self.cfg.epoch if self.cfg.scheduler == "reference" else self.cfg.epoch * batches_per_epoch
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=1e-7)
