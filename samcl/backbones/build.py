"""Build the backbone a Config names, with its weights."""
import logging
from pathlib import Path

from ..config import REPO_ROOT, Config
from .base import Backbone

log = logging.getLogger(__name__)


def default_checkpoint(cfg: Config) -> Path:
    from .sam import sam_architectures

    name = sam_architectures().get(cfg.vit_name, {}).get("checkpoint")
    if name is None:
        raise ValueError(f"{cfg.vit_name} has no official checkpoint; pass --ckpt PATH or --random_weights")
    return REPO_ROOT / "checkpoint" / name


def build_backbone(cfg: Config) -> Backbone:
    """The frozen backbone of ``cfg`` in eval mode on CPU: official weights from
    ``cfg.ckpt`` (default ``checkpoint/<official name>``), or random weights when
    ``cfg.random_weights`` is set (a loud warning: results then mean nothing)."""
    from .sam import SAMBackbone, build_sam, load_sam_weights

    sam, _arch = build_sam(cfg.vit_name, cfg.img_size)
    if cfg.random_weights:
        if cfg.ckpt:
            raise ValueError("--random_weights and --ckpt exclude each other")
        log.warning(
            "!!! RANDOM WEIGHTS: %s is built with random weights (seed %d), not the official "
            "checkpoint. Masks and metrics are meaningless except as a smoke test. !!!",
            cfg.vit_name,
            cfg.seed,
        )
    else:
        load_sam_weights(sam, Path(cfg.ckpt) if cfg.ckpt else default_checkpoint(cfg), cfg.vit_name)
    backbone = SAMBackbone(
        sam,
        cfg.vit_name,
        selector_layer=cfg.selector_layer,
        heat_orientation=cfg.heat_orientation,
        upsample=cfg.upsample,
    )
    return backbone.eval()
