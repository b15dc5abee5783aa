"""Release module files, selector and folders, mapped onto this project's AugModule and selector."""
import dataclasses
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import FAMILY_NAMES
from ..learning_modules.augmodule import AugModule, AugModuleSpec
from ..run_folder import MANIFEST, run_markers
from ..selector import ModuleSelector
from . import RELEASE_ORDER, RELEASE_UNSEEN
from .unpickle import MODULE_GLOBALS, ReleaseExtra, ReleaseFormatError, SELECTOR_GLOBALS, restricted_load


log = logging.getLogger("samcl.release")

EXPORT_INFO_FILE = "samcl_export.json"  # written by `export`: the order the selector's outputs follow
SELECTOR_FILE = "Module_Selector.pth"  # the release's selector (a plain state dict)
NON_MODULE_FILES = frozenset({SELECTOR_FILE, "embedding_buffer.pth"})
LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, used by AugModule and by the release

# The two released families: the --module name of the reference scripts (display names: FAMILY_NAMES).
RELEASE_MODULE_NAMES = {"sam": "SAMCL", "sam2": "SAMCL_2"}  # --module of the reference's scripts
SAM2_ARCH = "hiera_t"


# ----------------------------------------------------------------------------- module files
@dataclass
class ReleaseModule:
    """One release module file mapped onto this project's AugModule."""

    path: Path
    family: str  # "sam" or "sam2"
    spec: AugModuleSpec
    module: AugModule
    cnt: int  # the authors' Extra.cnt (kept for export)

    def describe(self) -> str:
        return (f"{self.path.name}: {FAMILY_NAMES[self.family]} module, width {self.spec.dim}, rank {self.spec.rank}, "
                f"blocks {list(self.spec.layers)}, neck {self.spec.neck_channels}, "
                f"{self.module.counted_parameters():,} counted parameters")


def _numbered(prefix: str, n: int) -> List[str]:
    return [f"{prefix}_{i:03d}" for i in range(n)]


def _linear(obj: Any, name: str, path: Path, in_f: int, out_f: Optional[int] = None) -> nn.Linear:
    if type(obj) is not nn.Linear:
        raise ReleaseFormatError(f"{path}: {name} is a {type(obj).__name__}, expected a Linear")
    w, b = obj._parameters.get("weight"), obj._parameters.get("bias")
    want = (out_f if out_f is not None else obj.out_features, in_f)
    if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ReleaseFormatError(f"{path}: {name} lacks a weight or bias tensor")
    if (obj.in_features, obj.out_features) != (want[1], want[0]) or tuple(w.shape) != want or tuple(b.shape) != want[:1]:
        raise ReleaseFormatError(f"{path}: {name} is Linear({obj.in_features} -> {obj.out_features}) with weight "
                                 f"{tuple(w.shape)}, expected Linear({want[1]} -> {want[0]})")
    if w.dtype != torch.float32 or b.dtype != torch.float32:
        raise ReleaseFormatError(f"{path}: {name} holds {w.dtype} tensors, expected float32")
    return obj


def _layernorm(obj: Any, name: str, path: Path, rank: int) -> nn.LayerNorm:
    if type(obj) is not nn.LayerNorm:
        raise ReleaseFormatError(f"{path}: {name} is a {type(obj).__name__}, expected a LayerNorm")
    w, b = obj._parameters.get("weight"), obj._parameters.get("bias")
    if (tuple(obj.normalized_shape) != (rank,) or not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor)
            or tuple(w.shape) != (rank,) or tuple(b.shape) != (rank,)):
        raise ReleaseFormatError(f"{path}: {name} is LayerNorm({tuple(obj.normalized_shape)}) without the usual affine "
                                 f"weight and bias of size {rank}")
    if float(obj.eps) != LAYERNORM_EPS:
        raise ReleaseFormatError(f"{path}: {name} has eps {obj.eps}; the AugModule uses {LAYERNORM_EPS}")
    if w.dtype != torch.float32 or b.dtype != torch.float32:
        raise ReleaseFormatError(f"{path}: {name} holds {w.dtype} tensors, expected float32")
    return obj


def module_from_release_dict(data: Any, path: Path) -> ReleaseModule:
    """Check a loaded release module dict and map it onto an AugModule, tensor for tensor.

    ``A`` gives width (in_features) and rank (out_features); ``lora_layer`` the blocks;
    ``B_i``/``norm1_i``/``norm2_i`` (numbered in layer order) become ``B.i``/``norm1.i``/
    ``norm2.i``; ``extra.upward``/``upward_`` (SAM only) give the neck channels.
    """
    path = Path(path)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ReleaseFormatError(f"{path} holds a {type(data).__name__}, not a release module dict "
                                 f"(keys extra, lora_layer, A, B_000.., norm1_000.., norm2_000..)")
    for key in ("extra", "lora_layer", "A"):
        if key not in data:
            raise ReleaseFormatError(f"{path} has no {key!r}: it is not a SAMCL release module file")
    layers = data["lora_layer"]
    if (not isinstance(layers, list) or not layers or not all(type(i) is int and i >= 0 for i in layers)
            or len(set(layers)) != len(layers)):
        raise ReleaseFormatError(f"{path}: lora_layer must be a non-empty list of distinct block indices, got {layers!r}")
    n = len(layers)
    expected = {"extra", "lora_layer", "A", *_numbered("B", n), *_numbered("norm1", n), *_numbered("norm2", n)}
    missing, unknown = sorted(expected - set(data)), sorted(set(data) - expected)
    if missing or unknown:
        raise ReleaseFormatError(f"{path}: lora_layer names {n} blocks {layers}, but the file "
                                 + "; ".join(x for x in (f"lacks {missing}" if missing else "",
                                                         f"has unexpected entries {unknown}" if unknown else "") if x))
    a = data["A"]
    if type(a) is not nn.Linear:
        raise ReleaseFormatError(f"{path}: A is a {type(a).__name__}, expected a Linear")
    dim, rank = int(a.in_features), int(a.out_features)
    _linear(a, "A", path, dim, rank)
    extra = data["extra"]
    if not isinstance(extra, ReleaseExtra):
        raise ReleaseFormatError(f"{path}: extra is a {type(extra).__name__}, expected the authors' Extra")
    family = extra.family
    sub = extra._modules
    _linear(sub.get("layer"), "extra.layer", path, rank, rank)
    _layernorm(sub.get("norm"), "extra.norm", path, rank)
    allowed_sub = {"layer", "norm", "upward", "upward_"} if family == "sam" else {"layer", "norm"}
    if set(sub) - allowed_sub:
        raise ReleaseFormatError(f"{path}: extra ({'.'.join(extra.release_global)}) has unexpected parts "
                                 f"{sorted(set(sub) - allowed_sub)}")
    neck: Optional[Tuple[int, int]] = None
    if family == "sam":
        if sub.get("upward") is None or sub.get("upward_") is None:
            raise ReleaseFormatError(f"{path}: extra is module.SAMCL.Extra (SAM) but lacks upward/upward_ "
                                     f"(the neck injection); the file is inconsistent")
        up = _linear(sub["upward"], "extra.upward", path, rank, dim)
        up_ = _linear(sub["upward_"], "extra.upward_", path, rank)
        neck = (int(up.out_features), int(up_.out_features))
    spec = AugModuleSpec(dim=dim, layers=tuple(layers), neck_channels=neck, rank=rank)
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def put(prefix: str, obj: nn.Module) -> None:
        for pname, t in obj._parameters.items():
            state[f"{prefix}.{pname}"] = t.detach()

    put("A", a)
    for i in range(n):
        put(f"B.{i}", _linear(data[f"B_{i:03d}"], f"B_{i:03d}", path, rank, dim))
        put(f"norm1.{i}", _layernorm(data[f"norm1_{i:03d}"], f"norm1_{i:03d}", path, rank))
        put(f"norm2.{i}", _layernorm(data[f"norm2_{i:03d}"], f"norm2_{i:03d}", path, rank))
    put("extra.layer", sub["layer"])
    put("extra.norm", sub["norm"])
    if neck is not None:
        put("extra.upward", sub["upward"])
        put("extra.upward_", sub["upward_"])
    with torch.random.fork_rng(devices=[]):  # building an AugModule draws A's init; keep the caller's RNG intact
        module = AugModule(spec)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ReleaseFormatError(f"{path}: does not map onto an AugModule ({str(e).splitlines()[0]})") from None
    cnt = getattr(extra, "cnt", 0)
    return ReleaseModule(path=path, family=family, spec=spec, module=module.eval(),
                         cnt=int(cnt) if type(cnt) is int else 0)


def read_release_module(path: Path) -> ReleaseModule:
    """Load one release ``<domain>.pth`` safely into an AugModule (no backbone check)."""
    data = restricted_load(path, MODULE_GLOBALS)
    try:
        return module_from_release_dict(data, Path(path))
    except (AttributeError, TypeError, KeyError) as e:  # objects rebuilt with missing or odd attributes
        raise ReleaseFormatError(f"{path} is a malformed release module file ({type(e).__name__}: {e}); "
                                 f"re-download it") from None


def check_fits(rm: ReleaseModule, backbone: Any) -> None:
    """Refuse a release module whose family or shape does not fit ``backbone``, naming both."""
    theirs = f"{FAMILY_NAMES[rm.family]} (width {rm.spec.dim}, blocks {list(rm.spec.layers)}, " \
             f"{'neck injection' if rm.spec.neck_channels else 'no neck injection'})"
    ours = f"{backbone.family}/{backbone.arch} (width {backbone.selector_dim})"
    hint = "test_SAM2.py (a SAM 2.1 Hiera-T backbone)" if rm.family == "sam2" else "test.py with --vit_name vit_b"
    if rm.family != backbone.family:
        raise ReleaseFormatError(f"release module {rm.path} is a {theirs} module, but the backbone is {ours}; "
                                 f"use it with {hint}")
    try:
        rm.spec.check(backbone)
    except ValueError as e:
        raise ReleaseFormatError(f"release module {rm.path} is a {theirs} module and does not fit the backbone "
                                 f"{ours}: {e}; use it with {hint}") from None


def load_release_module(path: Path, backbone: Any) -> AugModule:
    """Release ``<domain>.pth`` -> AugModule for ``backbone`` (refusing another family or shape)."""
    rm = read_release_module(path)
    check_fits(rm, backbone)
    return rm.module


# ----------------------------------------------------------------------------- selector
def selector_from_state(state: Any, path: Path) -> ModuleSelector:
    """Plain selector state dict (layer1..4, norm1..3 with running stats) -> ModuleSelector in eval mode.

    The input width d comes from ``layer1.weight`` and the number of domains K from
    ``layer4.weight``.
    """
    path = Path(path)
    if isinstance(state, dict) and state.get("format") == "samcl-selector":
        raise ReleaseFormatError(f"{path} is a selector file of this project, not of the release; its folder needs "
                                 f"its {MANIFEST} (a run folder) to be used")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReleaseFormatError(f"{path} is not a selector state dict (layer1..4, norm1..3)")
    for key in ("layer1.weight", "layer4.weight"):
        if key not in state or state[key].dim() != 2:
            raise ReleaseFormatError(f"{path} has no 2-D {key}: not a Module Selector state dict")
    dim, k = int(state["layer1.weight"].shape[1]), int(state["layer4.weight"].shape[0])
    selector = ModuleSelector(dim, k)
    try:
        selector.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise ReleaseFormatError(f"{path} does not fit the selector MLP of width {dim} with {k} outputs "
                                 f"(the release's MLP layout): {msg[:400]}") from None
    return selector.eval()


def read_release_selector(path: Path) -> ModuleSelector:
    """Load the release ``Module_Selector.pth`` (CUDA-saved plain state dict) on the CPU."""
    return selector_from_state(restricted_load(path, SELECTOR_GLOBALS), Path(path))


# ----------------------------------------------------------------------------- folders
def module_files(folder: Path) -> Dict[str, Path]:
    """Domain -> ``<domain>.pth`` of a release-style folder (selector and buffer excluded)."""
    return {p.stem: p for p in sorted(Path(folder).glob("*.pth")) if p.name not in NON_MODULE_FILES}


def is_release_folder(folder: Path) -> bool:
    """A release-style folder: no run.json, a Module_Selector.pth, and module ``.pth`` files; none of
    a run folder's other files (a run folder that lost its run.json is not taken for a release)."""
    folder = Path(folder)
    return (folder.is_dir() and not (folder / MANIFEST).exists() and (folder / SELECTOR_FILE).is_file()
            and bool(module_files(folder)) and not run_markers(folder))


def release_manifest(folder: Path, order: Sequence[str], unseen: Sequence[str]) -> Dict[str, Any]:
    """What a run.json would say of a release folder.

    The order is the one written by ``export`` (``samcl_export.json``) if present,
    else ``order`` (the release's is Kvasir, camo, ISTD, ISIC, cod, COCO); domains of
    ``unseen`` have no module file and are vanilla.
    """
    folder = Path(folder)
    info_path = folder / EXPORT_INFO_FILE
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            order, unseen = list(info["order"]), list(info["unseen"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ReleaseFormatError(f"{info_path} is corrupt ({e}); delete it to use --order/--unseen") from None
    order = list(order)
    unseen = [d for d in order if d in set(unseen)]
    files = module_files(folder)
    missing = [d for d in order if d not in unseen and d not in files]
    if missing:
        raise ReleaseFormatError(
            f"release folder {folder} has no module file for {', '.join(f'{d}.pth' for d in missing)} of the order "
            f"{'_'.join(order)}; pass the order the release was trained in with --order (release: "
            f"{'_'.join(RELEASE_ORDER)}) and its test-only domains with --unseen")
    ignored = sorted(set(files) - set(order))
    if ignored:
        log.warning("%s: module files %s are not in the order %s and are ignored", folder, ignored, "_".join(order))
    for d in unseen:
        if d in files:
            log.warning("%s: %s is listed as unseen (vanilla) but has a module file; the file is ignored", folder, d)
    return {"format": "samcl-release", "release_dir": str(folder), "order": order, "unseen": unseen,
            "modules": {d: files[d].name for d in order if d not in unseen}, "selector": SELECTOR_FILE}


@dataclass
class ReleaseFolder:
    """A release folder read into memory: modules by domain, selector, family, and what a run.json
    would say of it (:func:`release_manifest`)."""

    folder: Path
    order: List[str]
    unseen: List[str]
    modules: Dict[str, ReleaseModule]
    selector: ModuleSelector
    family: str
    manifest: Dict[str, Any]

    @property
    def spec(self) -> AugModuleSpec:
        return next(iter(self.modules.values())).spec


def read_release_folder(folder: Path, order: Sequence[str] = RELEASE_ORDER,
                        unseen: Sequence[str] = RELEASE_UNSEEN) -> ReleaseFolder:
    """Load every module of ``order`` and the selector, checking they agree with each other."""
    folder = Path(folder)
    man = release_manifest(folder, order, unseen)
    mods = {d: read_release_module(folder / f) for d, f in man["modules"].items()}
    if not mods:
        raise ReleaseFormatError(f"release folder {folder}: every domain of the order is unseen; nothing to load")
    first = next(iter(mods.values()))
    for rm in mods.values():
        if (rm.family, rm.spec) != (first.family, first.spec):
            raise ReleaseFormatError(f"release folder {folder} mixes modules: {first.describe()} vs {rm.describe()}")
    selector = read_release_selector(folder / SELECTOR_FILE)
    if selector.num_domains != len(man["order"]):
        raise ReleaseFormatError(
            f"{folder / SELECTOR_FILE} has {selector.num_domains} outputs but the order {'_'.join(man['order'])} names "
            f"{len(man['order'])} domains; pass the order it was trained with (--order, release: "
            f"{'_'.join(RELEASE_ORDER)})")
    sel_dim = selector.layer1.in_features
    if sel_dim != first.spec.dim:
        raise ReleaseFormatError(f"{folder / SELECTOR_FILE} takes {sel_dim}-d embeddings but the modules are "
                                 f"{first.spec.dim} wide: the files come from different releases")
    return ReleaseFolder(folder, man["order"], man["unseen"], mods, selector, first.family, man)


def report_dir_for(folder: Path, output_dir: Path) -> Path:
    """Where test.py writes its report for a (read-only) release folder: ``<output_dir>/release_<name>``."""
    return Path(output_dir) / f"release_{Path(folder).resolve().name}"


def check_release_family(rel: ReleaseFolder, backbone: str, arch: str) -> None:
    """Refuse to read a release folder as a ``backbone`` (``arch``) run when its modules are of the other
    family, naming the script that tests it."""
    if rel.family != backbone:
        tool = "test_SAM2.py" if rel.family == "sam2" else "test.py"
        raise ReleaseFormatError(
            f"{rel.folder} holds {FAMILY_NAMES[rel.family]} modules (width {rel.spec.dim}, blocks "
            f"{list(rel.spec.layers)}), but this run is set up for the {FAMILY_NAMES.get(backbone, backbone)} "
            f"backbone ({backbone}/{arch}); test it with {tool}")


def release_run_config(rel: ReleaseFolder, cfg: Any) -> Any:
    """``cfg`` (a Config of the folder's family) with the release's module shape, order and unseen domains."""
    return dataclasses.replace(cfg, ckpt=None if cfg.random_weights else cfg.ckpt, rank=rel.spec.rank,
                               aug_layers=list(rel.spec.layers), order="_".join(rel.order), unseen=list(rel.unseen))


def release_model(rel: ReleaseFolder, cfg: Any, device: torch.device,
                  build_model: Callable[[Any, torch.device], Any]) -> Any:
    """ModuleBank of a release folder read by :func:`read_release_folder`: the backbone of ``cfg``
    (:func:`release_run_config`), the release's modules and selector.

    ``build_model(cfg, device)`` is the model factory of :mod:`samcl.opening`, so this package
    needs none of the training code. With ``cfg.random_weights`` the backbone is random (smoke tests).
    """
    model = build_model(cfg, device)
    for rm in rel.modules.values():
        check_fits(rm, model.backbone)
    if rel.selector.layer1.in_features != model.backbone.selector_dim:
        raise ReleaseFormatError(f"{rel.folder / SELECTOR_FILE} takes {rel.selector.layer1.in_features}-d "
                                 f"embeddings but backbone {model.backbone.family}/{model.backbone.arch} gives "
                                 f"{model.backbone.selector_dim}-d ones")
    for d in rel.order:
        model.add_domain(d, rel.modules[d].module if d in rel.modules else None)
    model.selector = rel.selector.to(device)
    log.info("release folder %s: %s modules for %s, vanilla for %s, selector over %s", rel.folder,
             FAMILY_NAMES[rel.family], list(rel.modules), rel.unseen, rel.order)
    return model
