"""What every learning module is: a small trainable network that acts inside a frozen backbone.

A learning module (peft's adapter, in spirit) owns its injection: it declares the named
points of the backbone it acts on (:meth:`LearningModule.injection_points`) and installs
its hooks there only for the duration of a call (:meth:`LearningModule.attached`), so the
backbone is stock again afterwards and many modules stay resident, switched by which one
is attached. A module is rebuilt from its *spec*, a small frozen dataclass derived from
the backbone and the configuration, stored beside its weights.

A new kind is one file in ``samcl/learning_modules/`` (found there, no list to edit): subclass
:class:`ModuleSpec` and :class:`LearningModule`, register the module class with
``@register_learning_module("name")``, and declare any settings of its own in a
:class:`samcl.settings.Settings` subclass in the same file.
"""
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..backbones.base import Backbone, DecodeOptions, Features
from ..registry import LEARNING_MODULES

# (backbone submodule, "forward" | "forward_pre", hook) as nn.Module.register_forward(_pre)_hook takes it;
# or (submodule, "replace", forward): the submodule's forward itself, for a module that recomputes the
# submodule's whole output (a hook would run the stock forward first, only to discard it)
Hook = Tuple[nn.Module, str, Callable]


@dataclass(frozen=True)
class ModuleSpec:
    """Everything needed to rebuild a module of one kind (subclasses add the fields)."""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModuleSpec":
        """Rebuild from :meth:`to_dict` (lists back to tuples; unknown keys refused)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                      for k, v in d.items()})

    @classmethod
    def for_backbone(cls, backbone: Backbone, cfg: Any = None) -> "ModuleSpec":
        """The spec for ``backbone`` (settings from ``cfg``, a Config, where the kind has any);
        raises ValueError with the reason where the kind cannot act on this backbone."""
        raise NotImplementedError

    def check(self, backbone: Backbone) -> None:
        """Refuse a spec made for another backbone (ValueError naming both)."""
        raise NotImplementedError

    @property
    def kind(self) -> str:
        """The registered name of the module kind this spec builds."""
        return self.module_class().name

    def module_class(self) -> type:
        for name in LEARNING_MODULES.names():
            if LEARNING_MODULES.get(name).spec_class is type(self):
                return LEARNING_MODULES.get(name)
        raise ValueError(f"no learning module is registered for {type(self).__name__}")

    def build(self, backbone: Backbone) -> "LearningModule":
        """A fresh module of this spec for ``backbone``."""
        return self.module_class().build(self, backbone)

    def describe(self, backbone: Backbone) -> str:
        with torch.random.fork_rng(devices=[]):
            return self.build(backbone).describe()


class LearningModule(nn.Module):
    """The trainable module of one domain (or one shared module, for some methods).

    Class attributes a kind sets: ``spec_class``; ``needs_heatmap`` (reads the point
    heatmap); ``reads_images`` (reads the batch's images, not only the frozen prefix);
    ``has_unused_parameters`` (some parameters get no gradient under its loss: DDP must
    know). ``name`` is set by the registry.
    """

    name: ClassVar[str]
    spec_class: ClassVar[type]
    needs_heatmap: ClassVar[bool] = False
    reads_images: ClassVar[bool] = False
    has_unused_parameters: ClassVar[bool] = False
    # the backbone families the kind fits (None: every family), and why not the others
    backbones: ClassVar[Optional[Tuple[str, ...]]] = None
    backbone_reason: ClassVar[str] = ""

    def __init__(self, spec: ModuleSpec) -> None:
        super().__init__()
        self.spec = spec

    @classmethod
    def build(cls, spec: ModuleSpec, backbone: Backbone) -> "LearningModule":
        """A fresh module of ``spec`` for ``backbone`` (modules that copy a part of the backbone
        override this)."""
        return cls(spec)

    # ------------------------------------------------------------------ injection
    def injection_points(self, backbone: Backbone) -> List[str]:
        """Names (relative to the backbone) of the submodules this module hooks."""
        names = {id(m): n for n, m in backbone.named_modules()}
        return sorted({names[id(target)] for target, _kind, _fn in self.hooks(backbone, {})})

    def hooks(self, backbone: Backbone, context: Dict[str, Any]) -> List[Hook]:
        """The hooks to install for one call; ``context`` holds that call's extra inputs
        (``heatmap`` (N, G, G) for modules that need it)."""
        return []

    @contextmanager
    def attached(self, backbone: Backbone, **context: Any) -> Iterator[None]:
        """Within the block, the backbone runs with this module's hooks; they are removed after."""
        handles, replaced = [], []
        try:
            for target, kind, fn in self.hooks(backbone, context):
                if kind == "replace":
                    target.forward = fn  # an instance attribute: nn.Module.__call__ runs it instead
                    replaced.append(target)
                    continue
                register = target.register_forward_pre_hook if kind == "forward_pre" else target.register_forward_hook
                handles.append(register(fn))
            yield
        finally:
            for h in handles:
                h.remove()
            for target in replaced:
                del target.forward  # the class's forward again

    # ------------------------------------------------------------------ forward
    def segment(self, backbone: Backbone, prefix: Features, images: Optional[torch.Tensor],
                heatmap: Optional[torch.Tensor], points: torch.Tensor, labels: torch.Tensor,
                boxes: Optional[torch.Tensor] = None, low_res: bool = False,
                options: Optional[DecodeOptions] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, C, S, S) (``low_res``: the decoder's (N, C, 4G, 4G)) and IoU (N, C) of a batch
        that uses this module: by default the backbone's suffix and decoder with the hooks attached.
        C = 1 unless ``options`` (:class:`~samcl.backbones.base.DecodeOptions`) asks for multimask output."""
        with self.attached(backbone, heatmap=heatmap):
            return backbone.segment(prefix, points, labels, boxes=boxes, low_res=low_res, options=options)

    def frozen_features(self, backbone: Backbone, images: torch.Tensor) -> Features:
        """The frozen features the training cache keeps per image: the prefix (modules whose
        whole encoder path is frozen may keep more)."""
        return backbone.encode_prefix(images)

    # ------------------------------------------------------------------ size
    def counted_parameters(self) -> int:
        """Parameters this kind stores per domain (by default all of them)."""
        return sum(p.numel() for p in self.parameters())

    def counted_size_mb(self) -> float:
        return self.counted_parameters() * 4 / 1024**2

    def describe(self) -> str:
        return (f"{type(self).__name__} ({self.name}): {self.counted_parameters():,} parameters = "
                f"{self.counted_size_mb():.4f} MB")


def segment_with(module: Optional[LearningModule], backbone: Backbone, prefix: Features,
                 images: Optional[torch.Tensor], heatmap: Optional[torch.Tensor], points: torch.Tensor,
                 labels: torch.Tensor, boxes: Optional[torch.Tensor] = None, low_res: bool = False,
                 options: Optional[DecodeOptions] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One group of images through ``module`` (None: the frozen backbone)."""
    if module is None:
        return backbone.segment(prefix, points, labels, boxes=boxes, low_res=low_res, options=options)
    return module.segment(backbone, prefix, images, heatmap, points, labels, boxes=boxes, low_res=low_res,
                          options=options)
