"""Run configuration: dataclass defaults < YAML recipe (``--config``) < command-line flags.

Every setting is declared once (:mod:`samcl.settings`): the core ones are the fields of
:class:`CoreSettings`, a method's or learning module's own are declared in its file; :class:`Config`
is all of them. The defaults are the published SAMCL setting for SAM ViT-B
(``configs/samcl_vit_b.yaml``).

Every setting is checked when a Config is validated, whatever it came from (YAML, flags, a run
folder's ``run.json`` on resume): its type from the field's annotation, its value against the
choices or the range its declaration gives (a number without one must be >= 0; floats finite).
Failures raise :class:`ConfigError` naming the setting, the value, where it came from and what is
allowed. A recipe may start from another (``base: finetune.yaml``, relative to its own folder) and
hold only the lines that differ.
"""
import logging
import math
import re
import typing
from dataclasses import asdict, dataclass, fields, make_dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

import yaml

from .settings import Bounds, Meta, meta, plugin_settings, setting

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


# Settings newer than some run folders, with the value that reproduces how such older runs
# were made: a run folder whose stored configuration lacks one resumes (and reports) with it.
LEGACY_SETTINGS = {"focal": "logits", "train_mode": "every_epoch", "module_init": "per_domain"}
FAMILY_NAMES = {"sam": "SAM (ViT)", "sam2": "SAM 2.1 (Hiera)"}
# the top-level script of each (family, command): the SAM 2.1 ones are the --backbone sam2 aliases
SCRIPTS = {("sam", "train"): "train.py", ("sam", "test"): "test.py",
           ("sam2", "train"): "train_SAM2.py", ("sam2", "test"): "test_SAM2.py"}


class Alias(NamedTuple):
    """What a ``--module`` name of the release's scripts stands for."""

    method: str
    learning_module: str
    backbone: str


# --module names the release's module files (SAMCL for SAM (ViT), SAMCL_2 for SAM 2.1); CAD is the
# convolutional adapter + decoder copy, on SAM (ViT). --method and --learning_module choose any pair.
MODULE_ALIASES = {"SAMCL": Alias("samcl", "augmodule", "sam"), "SAMCL_2": Alias("samcl", "augmodule", "sam2"),
                  "CAD": Alias("samcl", "cad", "sam")}


class ConfigError(ValueError):
    """A setting of the wrong type, range or choice, or an unreadable config file; the message
    names the setting, the value, its source and what is allowed."""


def load_model_table(name: str) -> Dict[str, Dict[str, Any]]:
    """Architectures from ``configs/models/<name>``, each merged over the file's ``defaults``."""
    path = CONFIG_DIR / "models" / name
    data = yaml.safe_load(path.read_text())
    defaults = data.pop("defaults", {})
    return {arch: {**defaults, **spec} for arch, spec in data.items()}


POSITIVE = {"low": 1}  # an integer setting that counts something
QUIRK = "the release's behaviour, quirks included (docs/fidelity.md)"


@dataclass
class CoreSettings:
    """The settings every run has; with the plugins' own (:data:`PLUGIN_SETTINGS`) they make
    :class:`Config`. Defaults: the published setting of SAMCL on SAM ViT-B."""

    # ------------------------------------------------------------ what to train
    module: str = setting("SAMCL", "the release scripts' name for a (method, learning module, backbone) triple: "
                          "SAMCL (samcl, augmodule, SAM), SAMCL_2 (samcl, augmodule, SAM 2.1), CAD (samcl, cad, SAM; "
                          "without --config it takes configs/cad_vit_b.yaml, CAD's recipe)",
                          choices=tuple(MODULE_ALIASES), scope="common", group="what to train")
    method: str = setting("samcl", "continual-learning method, a file of samcl/methods/: {methods}", scope="common",
                          group="what to train")
    learning_module: Optional[str] = setting(
        None, "what trains inside the frozen model, a file of samcl/learning_modules/: {modules} (default: the one "
              "--module names: augmodule, or cad for CAD)", scope="common", group="what to train")
    backbone: str = setting("sam", "sam: SAM (ViT), as train.py / test.py; sam2: SAM 2.1 (Hiera), as train_SAM2.py / "
                            "test_SAM2.py (those scripts are this flag's aliases)", choices=("sam", "sam2"),
                            scope="common", group="what to train")
    vit_name: str = setting("vit_b", "SAM size (backbone sam; vit_tiny: tests and demo)",
                            choices=tuple(load_model_table("sam.yaml")), scope="common", group="backbone")
    hiera_name: str = setting("hiera_t", "SAM 2.1 size (backbone sam2; hiera_toy: tests and demo)",
                              choices=tuple(load_model_table("sam2.yaml")), scope="common", group="backbone")
    ckpt: Optional[str] = setting(None, "official backbone weights (default: checkpoint/<the official file of the "
                                  "size>, e.g. checkpoint/sam_vit_b_01ec64.pth)", scope="common", group="backbone")
    random_weights: bool = setting(False, "build the backbone with random weights instead of --ckpt (smoke tests "
                                   "only; loud warning)", scope="common", group="backbone")
    img_size: Optional[int] = setting(None, "model input side (default: the architecture's: 1024, the tiny "
                                      "vit_tiny and hiera_toy 128)", **POSITIVE, scope="common", group="backbone")
    rank: int = setting(10, "rank of the learning module's low-rank maps (AugModule, LoRA)", **POSITIVE,
                        group="backbone")
    selector_layer: Optional[int] = setting(None, "block whose output the Module Selector reads (default: derived "
                                            "from the backbone)", group="backbone")
    aug_layers: Optional[List[int]] = setting(None, "blocks the AugModule acts on (default: derived from the "
                                              "backbone)", group="backbone")
    attention: str = setting("chunked", "SAM's image-encoder attention: chunked: a block of queries at a time, no "
                             "N x N map kept (the default); sdpa: scaled_dot_product_attention with the relative "
                             "positions folded into the keys; stock: segment_anything's own, maps materialised (the "
                             "release's numbers bit for bit). SAM 2's Hiera always uses its own SDPA",
                             choices=("chunked", "sdpa", "stock"), scope="common", group="backbone")
    # ------------------------------------------------------------ the release's behaviour
    heat_orientation: str = setting("reference", "point heatmap at the SAM neck: reference: added without the "
                                    "transpose used inside the blocks, as the release (quirk Q1); corrected: "
                                    "transposed", choices=("reference", "corrected"), scope="common", group=QUIRK)
    upsample: Optional[str] = setting(None, "logit upsampling to the input size (default: the backbone's own: nearest "
                                      "on SAM, as the release, quirk Q6; bilinear on SAM 2.1, as its predictor)",
                                      choices=("nearest", "bilinear"), scope="common", group=QUIRK)
    mask_binarize: str = setting("threshold", "threshold: a mask pixel is foreground if >= --mask_threshold; "
                                 "reference: floor(v/255), the release's (quirk Q5)",
                                 choices=("threshold", "reference"), scope="common", group=QUIRK)
    mask_threshold: int = setting(128, "binarisation threshold of mask_binarize threshold", high=255, scope="common",
                                  group=QUIRK)
    iou_target: str = setting("reference", "IoU-head target: reference thresholds raw logits at 0.5 (quirk Q3); "
                              "sigmoid at p >= 0.5", choices=("reference", "sigmoid"), group=QUIRK)
    scheduler: str = setting("reference", "reference: cosine with T_max=epochs stepped per iteration (quirk Q4); "
                             "cosine: one cosine over the domain's iterations", choices=("reference", "cosine"),
                             group=QUIRK)
    focal: str = setting("reference", "focal term: reference: BCE on sigmoid probabilities as the release (its log "
                         "is clamped at -100, so saturated wrong pixels cost 100 and pass no gradient); logits: BCE "
                         "from logits (unbounded, full gradient)", choices=("reference", "logits"), group=QUIRK)
    train_mode: str = setting("reference", "backbone train/eval mode during training: reference: train mode once per "
                              "domain, eval mode from the first validation on, as the release (matters for SAM 2's "
                              "decoder, which picks its mask by stability in eval mode); every_epoch: train mode in "
                              "every epoch", choices=("reference", "every_epoch"), group=QUIRK)
    module_init: str = setting("shared", "shared: every domain's learning module starts from the same random draw, "
                               "as the release; per_domain: a new draw per domain", choices=("shared", "per_domain"),
                               group=QUIRK)
    # ------------------------------------------------------------ training (SAMCL's recipe; CAD's: cad_vit_b.yaml)
    loss: str = setting("samcl", "samcl: focal + 10 dice + IoU-head MSE; bce_iou: CAD's BCE + soft IoU loss",
                        choices=("samcl", "bce_iou"), group="training")
    optimizer: str = setting("adam", "adam (SAMCL) or adamw (CAD)", choices=("adam", "adamw"), group="training")
    weight_decay: float = setting(0.0, "optimizer weight decay (CAD: 0.01)", group="training")
    prompt: str = setting("points", "points: the static points.json prompts; box: CAD's full-image box (learning "
                          "modules that read no point heatmap)", choices=("points", "box"), group="training")
    lr: float = setting(0.005, "learning rate of the learning module (CAD: 2e-4)", open_low=True, group="training")
    epoch: int = setting(20, "epochs per domain", **POSITIVE, group="training")
    batch_size: int = setting(8, "images per training batch (per process under torchrun)", **POSITIVE,
                              group="training")
    seed: int = setting(1234, "random seed", high=2**32 - 1, scope="common", group="training")  # numpy's range
    val_every: int = setting(5, "validate every N epochs (0: never), on the split --validation names",
                             group="training")
    grad_clip: float = setting(0.0, "clip the learning module's gradient norm to this before every optimiser step "
                               "(0: no clipping, as the release; L2P's recipe: 1.0, as its reference code)",
                               group="training")
    deterministic: bool = setting(True, "deterministic algorithms", group="training")
    # ------------------------------------------------------------ validation (docs/validation.md)
    val_fraction: float = setting(0.0, "fraction of each domain's training split held out for validation, drawn "
                                  "per domain from --seed and disjoint from what trains; run.json names the held-out "
                                  "files (0: none, the whole split trains)", high=0.9, group="validation")
    validation: str = setting("test", "what the validation every --val_every epochs reads: test: the domain's test "
                              "split, as the release (it only logs, and switches the train/eval mode); "
                              "train_fraction: the held-out --val_fraction of its training split",
                              choices=("test", "train_fraction"), group="validation")
    evaluate_on: str = setting("test", "what the accuracy matrix after every step measures: test: the test splits; "
                               "train_fraction: the held-out --val_fraction of each domain's training split (how "
                               "the sweep's --grid scores its points)", choices=("test", "train_fraction"),
                               group="validation")
    # ------------------------------------------------------------ speed: the cache never changes results; bf16 does
    feature_cache: str = setting("auto", "keep each training image's frozen encoder prefix from epoch 1 for the "
                                 "later epochs (same results, less compute): auto (on the GPU if it fits beside the "
                                 "training step, else pinned host memory), device, cpu, or off (recompute every "
                                 "epoch, as the release)", choices=("auto", "off", "device", "cpu"), group="speed")
    cache_budget_gb: Optional[float] = setting(None, "cap on the feature cache in GB; images beyond it are recomputed "
                                               "every epoch (default: half the available host memory, or what fits "
                                               "on the GPU)", group="speed")
    memory_check: bool = setting(True, "estimate the peak memory of training or testing before anything is "
                                 "written and refuse, with flags that fit, a run that would not fit in what is free "
                                 "(docs/performance.md)", scope="common", group="speed")
    amp: str = setting("off", "off: fp32, exact reproduction; bf16: bfloat16 autocast for the learning module's "
                       "forward in training and for test inference, faster; CUDA GPUs and CPUs with native bfloat16 "
                       "(docs/performance.md)", choices=("off", "bf16"), scope="common", group="speed")
    # ------------------------------------------------------------ Module Selector and its embedding buffer
    num_embedding: int = setting(300, "buffered selector embeddings per domain", **POSITIVE, scope="common",
                                 group="Module Selector")
    selector_lr: float = setting(0.01, "SGD learning rate of the selector", open_low=True, group="Module Selector")
    selector_epochs: int = setting(25, "selector epochs after each domain", **POSITIVE, group="Module Selector")
    selector_batch_size: int = setting(24, "selector batch size", **POSITIVE, group="Module Selector")
    selector_head: str = setting("grow", "grow: the selector has one output per domain so far, grown after each "
                                 "domain, consulted from two domains on; full: one output for every domain of the "
                                 "order from the first step and consulted from it, as the release (an image sent "
                                 "to a domain not trained yet uses the frozen model and is counted)",
                                 choices=("grow", "full"), group="Module Selector")
    # ------------------------------------------------------------ data (data/README.md)
    order: str = setting("Kvasir_camo_ISTD_ISIC_cod_COCO", "domain keys in training order joined by '_'",
                         scope="common", group="data")
    unseen: List[str] = setting(["COCO"], "test-only domains of the order: they train no learning module (their "
                                "training split still fills the selector's buffer; routed images use the frozen "
                                "model); with no name, none", scope="common", group="data")
    data_root: str = setting(".", "folder the JSON maps and their paths are relative to", scope="common",
                             group="data")
    train_json: str = setting("datasets_train.json", "domain -> train split map, under --data_root", group="data")
    test_json: str = setting("datasets_test.json", "domain -> test split map, under --data_root", scope="common",
                             group="data")
    num_workers: int = setting(4, "data-loading worker processes (capped at the CPUs available)", scope="common",
                               group="data")
    eval_batch_size: int = setting(8, "images per evaluation batch", **POSITIVE, scope="common", group="data")
    # ------------------------------------------------------------ output
    output_dir: str = setting("log_sam1", "parent of run folders", scope="common", group="output")
    run_dir: Optional[str] = setting(None, "run folder (default: <output_dir>/<module>_<order>_<num_embedding>_<seed>"
                                     "_training)", scope="common", group="output")

    @property
    def arch_name(self) -> str:
        """The backbone size: vit_name for SAM, hiera_name for SAM 2."""
        return self.hiera_name if self.backbone == "sam2" else self.vit_name

    @property
    def domains(self) -> List[str]:
        return [d for d in self.order.split("_") if d]

    @property
    def learning_module_kind(self) -> str:
        """The learning-module kind: ``learning_module``, or the one ``module`` names."""
        return self.learning_module or MODULE_ALIASES[self.module].learning_module

    def run_name(self) -> str:
        alias = MODULE_ALIASES[self.module]
        kind = self.learning_module_kind
        name = self.module if (self.method, kind) == alias[:2] else f"{self.method}-{kind}"
        return f"{name}_{self.order}_{self.num_embedding}_{self.seed}_training"

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.output_dir) / self.run_name()

    def validate(self, sources: Optional[Dict[str, str]] = None) -> "CoreSettings":
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
        for name in ("validation", "evaluate_on"):
            if getattr(self, name) == "train_fraction" and self.val_fraction <= 0:
                raise ConfigError(f"{name} train_fraction reads the held-out part of the training splits, but "
                                  f"val_fraction is 0 ({sources.get('val_fraction', 'default')}): pass --val_fraction, "
                                  f"e.g. 0.2")
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


# every plugin's settings, read from its file without importing it (samcl.settings)
PLUGIN_SETTINGS = plugin_settings()
Config = make_dataclass("Config", PLUGIN_SETTINGS, bases=(CoreSettings,))
Config.__module__ = __name__
Config.__doc__ = "Every setting of a run: :class:`CoreSettings` and each method's and learning module's own."
SETTINGS_META: Dict[str, Meta] = {f.name: meta(f) for f in fields(Config)}
# the choices of the string settings and the ranges of the numeric ones, as declared
CHOICES: Dict[str, Tuple[Any, ...]] = {k: m.choices for k, m in SETTINGS_META.items() if m.choices is not None}
RANGES: Dict[str, Bounds] = {k: m.bounds for k, m in SETTINGS_META.items()}


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


SETTING_TYPES: Dict[str, Any] = typing.get_type_hints(Config)  # each setting's annotation


def check_setting(name: str, value: Any, source: str = "default") -> Any:
    """``value`` of setting ``name`` checked against its field type, CHOICES and RANGES (converted:
    an int for a float setting becomes a float). Raises ConfigError naming all four."""
    hint = SETTING_TYPES[name]
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
            bounds = RANGES[name]
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number {bounds}, got {value!r} ({source})")
            if not bounds.admits(v):
                what = f"every item of {name}" if isinstance(value, list) else name
                raise ConfigError(f"{what} must be {bounds}, got {value!r} ({source})")
    return value


def config_fields() -> Dict[str, Any]:
    return {f.name: f for f in fields(Config)}


BASE_KEY = "base"  # a recipe's first line may name the recipe it starts from


def read_config_file(path: str, _chain: Tuple[Path, ...] = ()) -> Dict[str, Any]:
    """The mapping of settings in a YAML recipe (``yaml.safe_load``: tags never construct objects),
    over those of the recipe its ``base:`` names (relative to its own folder; bases may chain); a
    syntax error names the file, line and column."""
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
    if BASE_KEY not in data:
        return data
    base = data.pop(BASE_KEY)
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {p}: {BASE_KEY} must name a recipe file, got {base!r}")
    base_path = (p.parent / base).resolve()
    chain = _chain + (p.resolve(),)
    if base_path in chain:
        raise ConfigError(f"config file {p}: {BASE_KEY} {base} leads back to {base_path} "
                          f"({' -> '.join(str(c) for c in chain)})")
    return {**read_config_file(str(base_path), chain), **data}


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
