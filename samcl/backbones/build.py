"""Build the backbone a Config names, with its weights.

Every registered backbone class (``samcl.registry.BACKBONES``) offers the same class-level
entry points: ``architectures()``, ``build_model(arch, img_size) -> (model, entry)``,
``load_weights(model, path, arch)`` and ``default_upsample``.
"""
import logging
from pathlib import Path
from typing import Type

from ..config import CHECKPOINT_DIR, Config
from ..registry import BACKBONES
from .base import Backbone

log = logging.getLogger(__name__)


def backbone_family(family: str) -> Type[Backbone]:
    """The registered backbone class of a family ("sam", "sam2")."""
    return BACKBONES.get(family)


def default_checkpoint(cfg: Config) -> Path:
    name = backbone_family(cfg.backbone).architectures().get(cfg.arch_name, {}).get("checkpoint")
    if name is None:
        raise ValueError(f"{cfg.arch_name} has no official checkpoint; pass --ckpt PATH or --random_weights")
    return CHECKPOINT_DIR / name


def build_backbone(cfg: Config) -> Backbone:
    """The frozen backbone of ``cfg`` in eval mode on CPU: official weights from
    ``cfg.ckpt`` (default ``checkpoint/<official name>``), or random weights when
    ``cfg.random_weights`` is set (a loud warning: results then mean nothing)."""
    family = backbone_family(cfg.backbone)
    if cfg.random_weights:
        if cfg.ckpt:
            raise ValueError("--random_weights and --ckpt exclude each other")
        log.warning(
            "!!! RANDOM WEIGHTS: %s is built with random weights (seed %d), not the official "
            "checkpoint. Masks and metrics are meaningless except as a smoke test. !!!",
            cfg.arch_name,
            cfg.seed,
        )
    model, _entry = family.build_model(cfg.arch_name, cfg.img_size)
    if not cfg.random_weights:
        family.load_weights(model, Path(cfg.ckpt) if cfg.ckpt else default_checkpoint(cfg), cfg.arch_name)
    backbone = family(
        model,
        cfg.arch_name,
        selector_layer=cfg.selector_layer,
        heat_orientation=cfg.heat_orientation,
        upsample=cfg.upsample or family.default_upsample,
        attention=cfg.attention,
    )
    return backbone.eval()
