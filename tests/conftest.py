"""Shared fixtures: tiny backbones built from the real package classes, reference data paths."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO.parent / "shared" / "reference"
SAMPLE = REFERENCE / "samcl_sample"
RELEASE = REFERENCE / "samcl_release" / "checkpoint"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (it lives in ../shared/reference beside the repo)")
    return path


def train_demo_run(root: Path, n_train: int = 4):
    """Demo data in ``root`` (``n_train`` training images per domain) and a one-epoch SAMCL run on
    polyp (natural unseen) in ``root / "run"``; returns the run's Config."""
    from samcl import pipeline
    from samcl.config import CONFIG_DIR, load_config
    from samcl.demo import make_demo_data

    make_demo_data(root, n_train=n_train, n_test=2)
    cfg = load_config(CONFIG_DIR / "demo_sam.yaml", {
        "data_root": str(root), "run_dir": str(root / "run"), "epoch": 1, "num_embedding": 2, "batch_size": 2,
        "selector_epochs": 2, "val_every": 0, "order": "polyp_natural", "unseen": ["natural"], "num_workers": 0})
    pipeline.train(cfg, torch.device("cpu"))
    return cfg


def tiny_backbone(family: str):
    """A seeded random tiny backbone of ``family``: SAM vit_tiny or SAM 2.1 hiera_toy (eval mode)."""
    from samcl.backbones.sam import SAMBackbone, build_sam
    from samcl.backbones.sam2 import SAM2Backbone, build_sam2_model

    torch.manual_seed(0)
    if family == "sam":
        return SAMBackbone(build_sam("vit_tiny")[0], "vit_tiny").eval()
    return SAM2Backbone(build_sam2_model("hiera_toy")[0], "hiera_toy").eval()


@pytest.fixture
def tiny_sam():
    """A seeded random vit_tiny SAMBackbone (same classes as ViT-B)."""
    from samcl.backbones.sam import SAMBackbone, build_sam

    torch.manual_seed(0)
    sam, _ = build_sam("vit_tiny")
    return SAMBackbone(sam, "vit_tiny").eval()
