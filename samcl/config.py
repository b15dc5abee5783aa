"""Run configuration: dataclass defaults < YAML file (``--config``) < command-line flags.

The defaults are the published SAMCL setting for SAM ViT-B (``configs/samcl_vit_b.yaml``).

Every setting is checked when a Config is validated, whatever it came from (YAML,
flags, a run folder's ``run.json`` on resume): its type from the dataclass field's
annotation, its value against :data:`CHOICES` (string settings) or :data:`RANGES`
(numbers; a number not listed there must be >= 0). A new field is covered by its
annotation alone. Failures raise :class:`ConfigError` naming the setting, the value,
where it came from and what is allowed.
"""
import logging
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
# The YAML recipes: configs/ at the top of a checkout (an editable install reads it there too),
# or the package data samcl/configs that a non-editable install copies it to (pyproject.toml).
_PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGE_CONFIGS if _PACKAGE_CONFIGS.is_dir() else REPO_ROOT / "configs"
# official weights and the authors' release folders: checkpoint/ of the checkout, or of the working
# directory when the package is installed (site-packages holds no checkpoint/)
CHECKPOINT_DIR = (REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()) / "checkpoint"

DEFAULT_CONFIG = {"sam": CONFIG_DIR / "samcl_vit_b.yaml", "sam2": CONFIG_DIR / "samcl2_hiera_t.yaml"}
# --module CAD without --config starts from CAD's own recipe (configs/cad_vit_b.yaml)
MODULE_CONFIG = {"CAD": CONFIG_DIR / "cad_vit_b.yaml"}


def default_config(family: str, module: Optional[str]) -> str:
    """The --config used when none is given: the module's own recipe, else the family's."""
    return str(MODULE_CONFIG.get(module, DEFAULT_CONFIG[family]))


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
FAMILY_NAMES = {"sam": "SAM (ViT)", "sam2": "SAM 2.1 (Hiera)"}


class Alias(NamedTuple):
    """What a ``--module`` name of the release's scripts stands for."""

    method: str
    learning_module: str
    backbone: str


# --module names the release's module files (SAMCL for SAM (ViT), SAMCL_2 for SAM 2.1); CAD is the
# convolutional adapter + decoder copy, on SAM (ViT). --method and --learning_module choose any pair.
MODULE_ALIASES = {"SAMCL": Alias("samcl", "augmodule", "sam"), "SAMCL_2": Alias("samcl", "augmodule", "sam2"),
                  "CAD": Alias("samcl", "cad", "sam")}


class Bounds(NamedTuple):
    """Allowed values of a numeric setting: ``low <= v <= high`` (``low < v`` with ``open_low``)."""

    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False

    def admits(self, v: float) -> bool:
        return ((self.low is None or (v > self.low if self.open_low else v >= self.low))
                and (self.high is None or v <= self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None and not self.open_low:
            return f"in {self.low}..{self.high}"
        parts = [f"{'>' if self.open_low else '>='} {self.low}" if self.low is not None else "",
                 f"<= {self.high}" if self.high is not None else ""]
        return " and ".join(p for p in parts if p)


NON_NEGATIVE = Bounds(0)
POSITIVE_INT = Bounds(1)
# Numeric settings with other bounds than >= 0 (for a list, each item's); floats must also be finite.
RANGES: Dict[str, Bounds] = {
    "img_size": POSITIVE_INT,
    "rank": POSITIVE_INT,
    "mask_threshold": Bounds(0, 255),
    "lr": Bounds(0, open_low=True),
    "selector_lr": Bounds(0, open_low=True),
    "epoch": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "seed": Bounds(0, 2**32 - 1),  # numpy's seed range
    "num_embedding": POSITIVE_INT,
    "selector_epochs": POSITIVE_INT,
    "selector_batch_size": POSITIVE_INT,
    "eval_batch_size": POSITIVE_INT,
    "replay_size": POSITIVE_INT,
    "lwf_temperature": Bounds(0, open_low=True),
    "l2p_pool_size": POSITIVE_INT,
    "l2p_top_k": POSITIVE_INT,
    "l2p_prompt_length": POSITIVE_INT,
}


class ConfigError(ValueError):
    """A setting of the wrong type, range or choice, or an unreadable config file; the message
    names the setting, the value, its source and what is allowed."""


@dataclass
class Config:
    # what to train: --module is a name for a (method, learning module, backbone) triple
    module: str = "SAMCL"
    method: str = "samcl"  # how learning proceeds across domains (samcl.methods)
    learning_module: Optional[str] = None  # what trains inside the frozen model (samcl.modules); None: --module's
    backbone: str = "sam"
    vit_name: str = "vit_b"  # SAM size (backbone sam)
    hiera_name: str = "hiera_t"  # SAM 2.1 size (backbone sam2): configs/models/sam2.yaml
    ckpt: Optional[str] = None  # None: checkpoint/<official file name of vit_name / hiera_name>
    random_weights: bool = False
    img_size: Optional[int] = None  # None: the architecture's (1024 for SAM and SAM 2.1)
    rank: int = 10
    selector_layer: Optional[int] = None  # None: derived from the backbone
    aug_layers: Optional[List[int]] = None  # None: derived from the backbone
    # the release's quirks (README, 'Fidelity to the release, and its quirks'): defaults reproduce it
    heat_orientation: str = "reference"  # Q1: heatmap added at the SAM neck untransposed; "corrected"
    upsample: Optional[str] = None  # Q6; None: the backbone's own (nearest on SAM as the reference, bilinear on SAM 2)
    mask_binarize: str = "threshold"  # Q5: 'threshold' (>= mask_threshold) or 'reference' (floor(v/255))
    mask_threshold: int = 128
    iou_target: str = "reference"  # Q3: 'reference' thresholds raw logits at 0.5; 'sigmoid' at p >= 0.5
    scheduler: str = "reference"  # Q4: cosine T_max=epochs stepped per iteration; 'cosine': one cosine per domain
    focal: str = "reference"  # focal loss on BCE of sigmoid probabilities (log clamped at -100); 'logits': from logits
    train_mode: str = "reference"  # backbone in train mode once per domain, eval after the first validation
    module_init: str = "shared"  # every domain's module starts from one draw; 'per_domain': a draw per domain
    # module training (SAMCL's recipe; CAD's is configs/cad_vit_b.yaml)
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
    # Module Selector and its embedding buffer
    num_embedding: int = 300
    selector_lr: float = 0.01
    selector_epochs: int = 25
    selector_batch_size: int = 24
    # the baselines' own settings (samcl/methods/<name>.py; configs/baselines/ says where each default comes from)
    replay_size: int = 200  # er, der: training samples the reservoir keeps, all domains together
    ewc_lambda: float = 100.0  # ewc: weight of the penalty lambda/2 sum F (theta - theta*)^2
    ewc_gamma: float = 1.0  # ewc: decay of the running Fisher (online EWC)
    der_alpha: float = 0.1  # der: weight of the MSE between replayed samples' logits and their stored logits
    der_beta: float = 0.5  # der: weight of the segmentation loss of replayed samples
    lwf_lambda: float = 1.0  # lwf: weight of the distillation of the previous model's mask logits
    lwf_temperature: float = 2.0  # lwf: temperature of that distillation
    olora_lambda: float = 0.5  # olora: weight of the orthogonality loss sum |A_old^T A_new|
    l2p_pool_size: int = 10  # l2p: key/prompt pairs in the pool
    l2p_top_k: int = 5  # l2p: prompts chosen per image
    l2p_prompt_length: int = 5  # l2p: prefix tokens per prompt and block
    l2p_pull_weight: float = 0.1  # l2p: weight of the key-pull loss
    # data (data/README.md)
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

    @property
    def module_kind(self) -> str:
        """The learning-module kind: ``learning_module``, or the one ``module`` names."""
        return self.learning_module or MODULE_ALIASES[self.module].learning_module

    def run_name(self) -> str:
        alias = MODULE_ALIASES[self.module]
        name = self.module if (self.method, self.module_kind) == alias[:2] else f"{self.method}-{self.module_kind}"
        return f"{name}_{self.order}_{self.num_embedding}_{self.seed}_training"

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.output_dir) / self.run_name()

    def validate(self, sources: Optional[Dict[str, str]] = None) -> "Config":
        """Check every setting (type, then choice or range), then how they combine.

        ``sources`` says where each setting came from (e.g. ``flag --lr``), for the messages.
        """
        sources = sources or {}
        for f in fields(self):
            setattr(self, f.name, check_setting(f.name, getattr(self, f.name), sources.get(f.name, "default")))
        if MODULE_ALIASES[self.module].backbone != self.backbone:
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
        self._check_unseen(sources)
        return self

    def _check_unseen(self, sources: Dict[str, str]) -> None:
        """Test-only domains must be in the order. A stray name given by a flag, or by a config file
        that also sets the order, is an error; one from the defaults, or from a file whose order a
        flag replaced, is ignored with a warning (a run's stored settings were checked when it began)."""
        stray = [d for d in self.unseen if d not in self.domains]
        if not stray:
            return
        src_unseen, src_order = sources.get("unseen", "default"), sources.get("order", "default")
        replaced = src_unseen.startswith("config file") and src_order.startswith("flag")
        if src_unseen.startswith(("flag", "config file")) and not replaced:
            raise ConfigError(f"unseen names {stray}, which the order {self.order!r} lacks ({src_unseen}; order: "
                              f"{src_order}): unseen domains are test-only domains of the order")
        if replaced or src_unseen == "default":
            logging.getLogger("samcl.config").warning(
                "unseen names %s (%s), which the order %r (%s) lacks; they are ignored", stray, src_unseen,
                self.order, src_order)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def stored_settings(stored: Dict[str, Any]) -> Dict[str, Any]:
    """A run folder's stored configuration, completed with :data:`LEGACY_SETTINGS` where it predates them."""
    return {**LEGACY_SETTINGS, **stored}


def _expected(hint: Any) -> str:
    """'an integer', 'a list of strings', ... for a field annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_expected(a) for a in inner) + " or null"
    if origin in (list, List):
        return f"a list of {_expected(args[0]).split(' ', 1)[1]}s" if args else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


# a YAML 1.1 quirk: PyYAML reads 1e-3 (no dot) as a string; such a string is taken as the number
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _typed(value: Any, hint: Any) -> Tuple[bool, Any]:
    """(fits, value converted) of ``value`` for the annotation ``hint``; bools are not numbers,
    an int is a float, and a numeric string (YAML's 1e-3) is a float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is not type(None):
                ok, v = _typed(value, a)
                if ok:
                    return True, v
        return False, value
    if origin in (list, List):
        if not isinstance(value, list):
            return False, value
        items = [_typed(v, args[0]) if args else (True, v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if hint is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint in (bool, str):
        return isinstance(value, hint), value
    return True, value


_HINTS: Dict[str, Any] = typing.get_type_hints(Config)


def check_setting(name: str, value: Any, source: str = "default") -> Any:
    """``value`` of setting ``name`` checked against its field type, CHOICES and RANGES (converted:
    an int for a float setting becomes a float). Raises ConfigError naming all four."""
    hint = _HINTS[name]
    ok, value = _typed(value, hint)
    if not ok:
        example = f", e.g. [{value}]" if isinstance(value, str) and typing.get_origin(hint) is list else ""
        raise ConfigError(f"{name} must be {_expected(hint)}{example}, got {value!r} ({source})")
    if value is None:
        return value
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{name} must be one of {CHOICES[name]}, got {value!r} ({source})")
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            bounds = RANGES.get(name, NON_NEGATIVE)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number {bounds}, got {value!r} ({source})")
            if not bounds.admits(v):
                what = f"every item of {name}" if isinstance(value, list) else name
                raise ConfigError(f"{what} must be {bounds}, got {value!r} ({source})")
    return value


def config_fields() -> Dict[str, Any]:
    return {f.name: f for f in fields(Config)}


def read_config_file(path: str) -> Dict[str, Any]:
    """The mapping of settings in a YAML file (``yaml.safe_load``: tags never construct objects);
    a syntax error names the file, line and column."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "not found"
        raise ConfigError(f"config file {p} {what} (the shipped ones are in {CONFIG_DIR})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({e.context}, line {e.context_mark.line + 1})" if e.context and e.context_mark else ""
        kind = ("a config holds plain values; tags such as !!python/... are refused"
                if isinstance(e, yaml.constructor.ConstructorError) else "not valid YAML")
        raise ConfigError(f"config file {p}{where}: {e.problem}{context}: {kind}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not readable YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings (name: value), not a {type(data).__name__}")
    return data


def build_config(layers: Iterable[Tuple[str, Dict[str, Any]]]) -> Config:
    """Config from the defaults and ``(source, settings)`` layers, later layers winning. Each
    setting is validated with its source named (a null in a file is a value, checked as any)."""
    known = config_fields()
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for source, settings in layers:
        unknown = sorted(str(k) for k in settings if k not in known)
        if unknown:
            raise ConfigError(f"{source}: unknown settings {unknown}; known: {sorted(known)}")
        values.update(settings)
        sources.update(dict.fromkeys(settings, source))
    return Config(**values).validate(sources)


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                flag_names: Optional[Dict[str, str]] = None) -> Config:
    """Build a Config from defaults, then the YAML file, then the overrides that are not None (the
    flags given; ``flag_names`` names their flags for the messages, default ``--<setting>``)."""
    layers = [(f"config file {path}", read_config_file(path))] if path is not None else []
    layers += [(f"flag {(flag_names or {}).get(k, '--' + str(k))}", {k: v})
               for k, v in (overrides or {}).items() if v is not None]
    return build_config(layers)


def load_model_table(name: str) -> Dict[str, Dict[str, Any]]:
    """Architectures from ``configs/models/<name>``, each merged over the file's ``defaults``."""
    path = CONFIG_DIR / "models" / name
    data = yaml.safe_load(path.read_text())
    defaults = data.pop("defaults", {})
    return {arch: {**defaults, **spec} for arch, spec in data.items()}


# the backbone sizes are the architectures of configs/models/
CHOICES["vit_name"] = tuple(load_model_table("sam.yaml"))
CHOICES["hiera_name"] = tuple(load_model_table("sam2.yaml"))
