"""Run configuration: dataclass defaults < YAML file (``--config``) < command-line flags.

The defaults are the published SAMCL setting for SAM ViT-B (SPEC §6-§8).
"""
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

CHOICES = {
    "module": ("SAMCL", "SAMCL_2", "CAD"),
    "backbone": ("sam", "sam2"),
    "heat_orientation": ("reference", "corrected"),
    "upsample": ("nearest", "bilinear"),
    "mask_binarize": ("threshold", "reference"),
    "iou_target": ("reference", "sigmoid"),
    "scheduler": ("reference", "cosine"),
    "focal": ("reference", "logits"),
    "train_mode": ("reference", "every_epoch"),
    "module_init": ("shared", "per_domain"),
    "loss": ("samcl", "bce_iou"),
    "optimizer": ("adam", "adamw"),
    "prompt": ("points", "box"),
    "feature_cache": ("auto", "off", "device", "cpu"),  # speed: samcl.feature_cache
    "amp": ("off", "bf16"),  # speed: samcl.precision
}
# Settings newer than some run folders, with the value that reproduces how such older runs
# were made: a run folder whose stored configuration lacks one resumes (and reports) with it.
LEGACY_SETTINGS = {"focal": "logits", "train_mode": "every_epoch", "module_init": "per_domain"}
# settings that may stay None (the backbone picks its own)
OPTIONAL_CHOICES = ("upsample",)
# --module names the reference's module files: SAMCL for SAM (ViT), SAMCL_2 for SAM 2.1;
# CAD (convolutional adapter + decoder copy, SPEC §11) is SAM (ViT) only
MODULE_BACKBONE = {"SAMCL": "sam", "SAMCL_2": "sam2", "CAD": "sam"}
# the learning-module kind each --module trains (samcl.model)
MODULE_KIND = {"SAMCL": "augmodule", "SAMCL_2": "augmodule", "CAD": "cad"}


@dataclass
class Config:
    # what to train
    module: str = "SAMCL"
    backbone: str = "sam"
    vit_name: str = "vit_b"  # SAM size (backbone sam)
    hiera_name: str = "hiera_t"  # SAM 2.1 size (backbone sam2): configs/models/sam2.yaml
    ckpt: Optional[str] = None  # None: checkpoint/<official file name of vit_name / hiera_name>
    random_weights: bool = False
    img_size: Optional[int] = None  # None: the architecture's (1024 for SAM and SAM 2.1)
    rank: int = 10
    selector_layer: Optional[int] = None  # None: derived from the backbone
    aug_layers: Optional[List[int]] = None  # None: derived from the backbone
    # reference quirks (SPEC §10): defaults reproduce the release
    heat_orientation: str = "reference"  # Q1
    upsample: Optional[str] = None  # Q6; None: the backbone's own (nearest on SAM as the reference, bilinear on SAM 2)
    mask_binarize: str = "threshold"  # Q5: 'threshold' (>= mask_threshold) or 'reference' (floor(v/255))
    mask_threshold: int = 128
    iou_target: str = "reference"  # Q3: 'reference' thresholds raw logits at 0.5; 'sigmoid' at p >= 0.5
    scheduler: str = "reference"  # Q4: cosine T_max=epochs stepped per iteration; 'cosine': one cosine per domain
    focal: str = "reference"  # focal loss on BCE of sigmoid probabilities (log clamped at -100); 'logits': from logits
    train_mode: str = "reference"  # backbone in train mode once per domain, eval after the first validation
    module_init: str = "shared"  # every domain's module starts from one draw; 'per_domain': a draw per domain
    # module training (SPEC §6; CAD's recipe, SPEC §11, is configs/cad_vit_b.yaml)
    loss: str = "samcl"  # 'samcl': focal + 10 dice + IoU-head MSE; 'bce_iou': CAD's BCE + soft-IoU loss
    optimizer: str = "adam"  # 'adam' (SAMCL) or 'adamw' (CAD)
    weight_decay: float = 0.0  # of the optimizer (CAD: AdamW's default 0.01)
    prompt: str = "points"  # 'points' (the static points.json prompts) or 'box' (CAD: full-image box; --module CAD only)
    lr: float = 0.005
    epoch: int = 20
    batch_size: int = 8
    seed: int = 1234
    val_every: int = 5
    deterministic: bool = True
    # speed (samcl.feature_cache, samcl.precision): the cache never changes results; amp bf16 does
    feature_cache: str = "auto"  # frozen-prefix cache over the epochs: auto, off, device, cpu
    cache_budget_gb: Optional[float] = None  # cap on the cache (None: derived from free memory)
    amp: str = "off"  # 'off': fp32 (reproduction); 'bf16': bfloat16 autocast (CUDA, bf16 CPUs)
    # selector (SPEC §7)
    num_embedding: int = 300
    selector_lr: float = 0.01
    selector_epochs: int = 25
    selector_batch_size: int = 24
    # data (SPEC §2)
    order: str = "Kvasir_camo_ISTD_ISIC_cod_COCO"
    unseen: List[str] = field(default_factory=lambda: ["COCO"])
    data_root: str = "."
    train_json: str = "datasets_train.json"
    test_json: str = "datasets_test.json"
    num_workers: int = 4
    eval_batch_size: int = 8
    # output
    output_dir: str = "log_sam1"
    run_dir: Optional[str] = None  # None: <output_dir>/<module>_<order>_<num_embedding>_<seed>_training

    @property
    def arch_name(self) -> str:
        """The backbone size: vit_name for SAM, hiera_name for SAM 2."""
        return self.hiera_name if self.backbone == "sam2" else self.vit_name

    @property
    def domains(self) -> List[str]:
        return [d for d in self.order.split("_") if d]

    def run_name(self) -> str:
        return f"{self.module}_{self.order}_{self.num_embedding}_{self.seed}_training"

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.output_dir) / self.run_name()

    def validate(self) -> "Config":
        for key, allowed in CHOICES.items():
            if getattr(self, key) is None and key in OPTIONAL_CHOICES:
                continue
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.module == "CAD" and self.backbone != "sam":
            raise ValueError(
                "--module CAD needs the SAM (ViT) backbone (train.py / test.py): SAM 2's mask decoder also owns "
                "the high-resolution projections inside its image path, so CAD does not fit it (README, 'CAD')")
        if self.prompt == "box" and self.module != "CAD":
            raise ValueError("prompt: box is CAD's recipe (--module CAD); SAMCL's AugModule reads the point heatmap")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if MODULE_BACKBONE[self.module] != self.backbone:
            raise ValueError(
                f"--module {self.module} is the {'SAM 2.1' if self.module == 'SAMCL_2' else 'SAM (ViT)'} variant, "
                f"but the backbone is {self.backbone!r}: use train.py / test.py with --module SAMCL (SAM) or "
                f"train_SAM2.py / test_SAM2.py with --module SAMCL_2 (SAM 2.1), or a matching --config")
        doms = self.domains
        if not doms:
            raise ValueError("--order names no domain (keys joined by '_', e.g. Kvasir_camo_COCO)")
        dup = sorted({d for d in doms if doms.count(d) > 1})
        if dup:
            raise ValueError(f"--order names {dup} more than once")
        for key in ("epoch", "batch_size", "num_embedding", "selector_epochs", "selector_batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.mask_threshold <= 255:
            raise ValueError(f"mask_threshold must be in 0..255, got {self.mask_threshold}")
        if self.cache_budget_gb is not None and self.cache_budget_gb < 0:
            raise ValueError(f"cache_budget_gb must be >= 0, got {self.cache_budget_gb}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def stored_settings(stored: Dict[str, Any]) -> Dict[str, Any]:
    """A run folder's stored configuration, completed with :data:`LEGACY_SETTINGS` where it predates them."""
    return {**LEGACY_SETTINGS, **stored}


def config_fields() -> Dict[str, Any]:
    return {f.name: f for f in fields(Config)}


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> Config:
    """Build a Config from defaults, then the YAML file, then non-None overrides."""
    values: Dict[str, Any] = {}
    known = config_fields()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found (the shipped ones are in {CONFIG_DIR})")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {p} must hold a mapping of settings")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"config file {p}: unknown settings {unknown}; known: {sorted(known)}")
        values.update(data)
    for k, v in (overrides or {}).items():
        if v is not None:
            if k not in known:
                raise ValueError(f"unknown setting {k!r}")
            values[k] = v
    return Config(**values).validate()


def load_model_table(name: str) -> Dict[str, Dict[str, Any]]:
    """Architectures from ``configs/models/<name>``, each merged over the file's ``defaults``."""
    path = CONFIG_DIR / "models" / name
    data = yaml.safe_load(path.read_text())
    defaults = data.pop("defaults", {})
    return {arch: {**defaults, **spec} for arch, spec in data.items()}
