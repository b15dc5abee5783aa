"""Build the backbone a Config names, with its weights."""
import logging
from pathlib import Path

from ..config import REPO_ROOT, Config
from .base import Backbone

log = logging.getLogger(__name__)


def _architectures(cfg: Config) -> dict:
    if cfg.backbone == "sam2":
        from .sam2 import sam2_architectures

        return sam2_architectures()
    from .sam import sam_architectures

    return sam_architectures()


def default_checkpoint(cfg: Config) -> Path:
    name = _architectures(cfg).get(cfg.arch_name, {}).get("checkpoint")
    if name is None:
        raise ValueError(f"{cfg.arch_name} has no official checkpoint; pass --ckpt PATH or --random_weights")
    return REPO_ROOT / "checkpoint" / name


def build_backbone(cfg: Config) -> Backbone:
    """The frozen backbone of ``cfg`` in eval mode on CPU: official weights from
    ``cfg.ckpt`` (default ``checkpoint/<official name>``), or random weights when
    ``cfg.random_weights`` is set (a loud warning: results then mean nothing)."""
    if cfg.random_weights:
        if cfg.ckpt:
            raise ValueError("--random_weights and --ckpt exclude each other")
        log.warning(
            "!!! RANDOM WEIGHTS: %s is built with random weights (seed %d), not the official "
            "checkpoint. Masks and metrics are meaningless except as a smoke test. !!!",
            cfg.arch_name,
            cfg.seed,
        )
    if cfg.backbone == "sam2":
        return _build_sam2(cfg)
    from .sam import SAMBackbone, build_sam, load_sam_weights

    sam, _arch = build_sam(cfg.vit_name, cfg.img_size)
    if not cfg.random_weights:
        load_sam_weights(sam, Path(cfg.ckpt) if cfg.ckpt else default_checkpoint(cfg), cfg.vit_name)
    backbone = SAMBackbone(
        sam,
        cfg.vit_name,
        selector_layer=cfg.selector_layer,
        heat_orientation=cfg.heat_orientation,
        upsample=cfg.upsample or "nearest",  # quirk Q6
    )
    return backbone.eval()


def _build_sam2(cfg: Config) -> Backbone:
    from .sam2 import SAM2Backbone, build_sam2_model, load_sam2_weights

    model, entry = build_sam2_model(cfg.hiera_name, cfg.img_size)
    if not cfg.random_weights:
        path = Path(cfg.ckpt) if cfg.ckpt else default_checkpoint(cfg)
        load_sam2_weights(model, path, cfg.hiera_name, entry.get("checkpoint"))
    backbone = SAM2Backbone(
        model,
        cfg.hiera_name,
        selector_layer=cfg.selector_layer,
        heat_orientation=cfg.heat_orientation,
        upsample=cfg.upsample or "bilinear",  # SAM 2's image predictor upsamples bilinearly
    )
    return backbone.eval()
