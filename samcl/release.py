"""The authors' released checkpoint format (SPEC §9): safe loading, conversion, export.

A release folder (``checkpoint/SAM1`` or ``checkpoint/SAM2`` of the original code)
holds ``Module_Selector.pth`` (a plain selector state dict saved from CUDA) and one
``<domain>.pth`` per trained domain: a pickled dict of whole module *objects*
(``extra``: an instance of the authors' class ``module.SAMCL.Extra`` /
``module.SAMCL_2.Extra``; ``A``, ``B_000``.. as ``nn.Linear``; ``norm1_000``..,
``norm2_000``.. as ``nn.LayerNorm``; ``lora_layer``: the block indices).

Loading never runs the pickle with ``weights_only=False``. Every file is first
scanned statically (``pickletools``) for the globals it references, which must all
be on :data:`MODULE_GLOBALS` / :data:`SELECTOR_GLOBALS`; it is then read by torch's
own restricted unpickler (``torch.load(weights_only=True)``) with exactly those
classes made loadable through ``torch.serialization.safe_globals``. The authors'
``Extra`` class is registered under its qualified name with a local stand-in
(:class:`ReleaseExtra`, :class:`ReleaseExtra2`), so nothing of the authors' code is
needed or imported. Only tensors are read from the rebuilt objects; none of them is
ever called.

Command line::

    python -m samcl.release inspect checkpoint/SAM1
    python -m samcl.release convert checkpoint/SAM1 runs/release_sam1 --family sam
    python -m samcl.release export log_sam1/<run> exported/SAM1

``convert`` writes a run folder in this project's format (``run.json``, plain
state dicts); ``export`` writes a run folder in the release's layout, loadable by
the authors' code (``torch.load(..., weights_only=False)`` in their environment).
"""
import argparse
import copy
import dataclasses
import json
import logging
import os
import pickle
import pickletools
import re
import shutil
import tempfile
import types
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from .bounded import TorchZip, check_torch_file
from .config import FAMILY_NAMES
from .io import atomic_torch_save, atomic_write_text, load_tagged
from .modules.augmodule import AugModule, AugModuleSpec
from .registry import MODULES
from .run_folder import (MANIFEST, SELECTOR_FILE, RunFolderError, load_selector, module_format, package_versions,
                         read_manifest, run_markers, save_selector, selector_snapshot, sha256_file, verify_files,
                         write_json)
from .selector import ModuleSelector

log = logging.getLogger("samcl.release")

RELEASE_ORDER: Tuple[str, ...] = ("Kvasir", "camo", "ISTD", "ISIC", "cod", "COCO")
RELEASE_UNSEEN: Tuple[str, ...] = ("COCO",)
EXPORT_INFO_FILE = "samcl_export.json"  # written by `export`: the order the selector's outputs follow
NON_MODULE_FILES = frozenset({SELECTOR_FILE, "embedding_buffer.pth"})
LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, used by AugModule and by the release

# The two released families: the --module name of the reference scripts (display names: FAMILY_NAMES).
RELEASE_MODULE_NAMES = {"sam": "SAMCL", "sam2": "SAMCL_2"}  # --module of the reference's scripts
SAM2_ARCH = "hiera_t"


class ReleaseFormatError(RunFolderError):
    """A release file is unreadable, malformed or does not fit the backbone; the message says what to do."""


class UnsafePickleError(ReleaseFormatError):
    """A checkpoint references a global outside the allow-list; it was not loaded."""


# ----------------------------------------------------------------------------- stand-ins
class ReleaseExtra(nn.Module):
    """Stand-in for the authors' ``module.SAMCL.Extra`` (SAM): holds ``layer``, ``norm``,
    ``upward``, ``upward_`` and the int ``cnt``. Never called; only its tensors are read."""

    release_global: Tuple[str, str] = ("module.SAMCL", "Extra")
    family = "sam"

    def __init__(self) -> None:
        super().__init__()
        self.cnt = 0


class ReleaseExtra2(ReleaseExtra):
    """Stand-in for the authors' ``module.SAMCL_2.Extra`` (SAM 2): ``layer``, ``norm`` and ``cnt``."""

    release_global = ("module.SAMCL_2", "Extra")
    family = "sam2"


EXTRA_CLASSES: Dict[str, Type[ReleaseExtra]] = {"sam": ReleaseExtra, "sam2": ReleaseExtra2}

# ----------------------------------------------------------------------------- allow-lists
_STORAGES = frozenset(f"torch.{t}Storage" for t in
                      ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool"))
SELECTOR_GLOBALS: FrozenSet[str] = frozenset({"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"}) | _STORAGES
MODULE_GLOBALS: FrozenSet[str] = SELECTOR_GLOBALS | frozenset({
    "builtins.set",
    "torch._utils._rebuild_parameter",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.normalization.LayerNorm",
    "module.SAMCL.Extra",
    "module.SAMCL_2.Extra",
})
# What torch's restricted unpickler is told it may rebuild beyond its built-in tensor support.
_TORCH_SAFE_GLOBALS: List[Any] = [
    nn.Linear,
    nn.LayerNorm,
    (ReleaseExtra, "module.SAMCL.Extra"),
    (ReleaseExtra2, "module.SAMCL_2.Extra"),
]


def pickle_globals(path: Path) -> List[str]:
    """Every global a torch zip checkpoint's pickle references, read statically (nothing runs).

    Dynamic lookups (STACK_GLOBAL, INST, OBJ) are reported as ``<OPCODE>``; torch's
    restricted unpickler does not support them, and neither does this loader.
    """
    data = TorchZip(Path(path), "checkpoint", ReleaseFormatError).pickle_bytes()
    found: List[str] = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                module, name = str(arg).split(" ", 1)
                if (module, name) in NAME_MAPPING:
                    module, name = NAME_MAPPING[(module, name)]
                elif module in IMPORT_MAPPING:
                    module = IMPORT_MAPPING[module]
                found.append(f"{module}.{name}")
            elif op.name in ("STACK_GLOBAL", "OBJ"):
                found.append(f"<{op.name}>")
    except Exception as e:  # malformed pickle stream
        raise ReleaseFormatError(f"{path}: its pickle is malformed ({e}); the file is corrupt") from None
    return found


def check_globals(path: Path, allowed: FrozenSet[str]) -> None:
    """Refuse ``path`` if its pickle references anything outside ``allowed`` (names file and globals)."""
    bad = sorted({g for g in pickle_globals(path) if g not in allowed})
    if bad:
        raise UnsafePickleError(
            f"refused to load {path}: it references {', '.join(bad)}, which is not on the allow-list of the SAMCL "
            f"release format ({', '.join(sorted(allowed - _STORAGES))} and tensor storages). It is not an authors' "
            f"release file or it has been tampered with: do not open it with torch.load(weights_only=False); "
            f"re-download the release checkpoints from the authors' repository instead.")


@contextmanager
def _allowed_in_torch() -> Iterator[None]:
    """Register the release classes with torch's restricted unpickler for the duration only
    (leaving entries the caller had registered before untouched)."""
    have = torch.serialization.get_safe_globals()
    missing = [g for g in _TORCH_SAFE_GLOBALS if g not in have]
    with torch.serialization.safe_globals(missing):
        yield


def torch_restricted_load(path: Path) -> Any:
    """``torch.load(weights_only=True, map_location='cpu')`` with the release classes allowed.

    This is the second line of defence (:func:`restricted_load` scans first); its
    refusals are re-raised as :class:`UnsafePickleError` naming the file and the global.
    """
    path = Path(path)
    try:
        with _allowed_in_torch():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"unrecognized function (.+?)(?: which|$)", str(e), re.M)
        what = m.group(1) if m else str(e).strip().splitlines()[-1]
        raise UnsafePickleError(f"refused to load {path}: torch's restricted unpickler rejected {what}; it is not "
                                f"a release file of the expected kind. Do not open it with "
                                f"torch.load(weights_only=False).") from None
    except ReleaseFormatError:
        raise
    except Exception as e:
        raise ReleaseFormatError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                                 f"; it is corrupt or truncated: re-download it") from None


def restricted_load(path: Path, allowed: FrozenSet[str] = MODULE_GLOBALS) -> Any:
    """Load a release checkpoint safely: static allow-list scan, bounded size checks
    (:mod:`samcl.bounded`), then torch's restricted unpickler."""
    path = Path(path)
    if not path.is_file() and not path.is_symlink():
        raise ReleaseFormatError(f"{path} not found")
    check_globals(path, allowed)
    check_torch_file(path, "checkpoint", ReleaseFormatError)
    return torch_restricted_load(path)


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
                                 f"(SPEC §7): {msg[:400]}") from None
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
    """A release folder read into memory: modules by domain, selector, family."""

    folder: Path
    order: List[str]
    unseen: List[str]
    modules: Dict[str, ReleaseModule]
    selector: ModuleSelector
    family: str

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
    return ReleaseFolder(folder, man["order"], man["unseen"], mods, selector, first.family)


def report_dir_for(folder: Path, output_dir: Path) -> Path:
    """Where test.py writes its report for a (read-only) release folder: ``<output_dir>/release_<name>``."""
    return Path(output_dir) / f"release_{Path(folder).resolve().name}"


def load_release_run(folder: Path, cfg: Any, device: torch.device) -> Any:
    """SAMCLModel of a release folder: backbone of ``cfg``, the release's modules and selector.

    Used by :func:`samcl.pipeline.load_run` (hence by ``test.py`` and ``test_SAM2.py``)
    when the folder is release-style. ``cfg.backbone`` ("sam" or "sam2") must be the
    family of the files; ``cfg.order``/``cfg.unseen`` give the domain order (default:
    the release's). With ``cfg.random_weights`` the backbone is random (smoke tests).
    """
    from .pipeline import build_model

    rel = read_release_folder(folder, cfg.domains, cfg.unseen)
    if rel.family != cfg.backbone:
        tool = "test_SAM2.py" if rel.family == "sam2" else "test.py"
        raise ReleaseFormatError(
            f"{folder} holds {FAMILY_NAMES[rel.family]} modules (width {rel.spec.dim}, blocks {list(rel.spec.layers)}), "
            f"but this run is set up for the {FAMILY_NAMES.get(cfg.backbone, cfg.backbone)} backbone "
            f"({cfg.backbone}/{getattr(cfg, 'arch_name', cfg.vit_name)}); test it with {tool}")
    run_cfg = dataclasses.replace(cfg, ckpt=None if cfg.random_weights else cfg.ckpt, rank=rel.spec.rank,
                                  aug_layers=list(rel.spec.layers), order="_".join(rel.order), unseen=list(rel.unseen))
    model = build_model(run_cfg, device)
    for rm in rel.modules.values():
        check_fits(rm, model.backbone)
    if rel.selector.layer1.in_features != model.backbone.selector_dim:
        raise ReleaseFormatError(f"{Path(folder) / SELECTOR_FILE} takes {rel.selector.layer1.in_features}-d embeddings "
                                 f"but backbone {model.backbone.family}/{model.backbone.arch} gives "
                                 f"{model.backbone.selector_dim}-d ones")
    for d in rel.order:
        model.add_domain(d, rel.modules[d].module if d in rel.modules else None)
    model.selector = rel.selector.to(device)
    log.info("release folder %s: %s modules for %s, vanilla for %s, selector over %s", folder,
             FAMILY_NAMES[rel.family], list(rel.modules), rel.unseen, rel.order)
    return model


# ----------------------------------------------------------------------------- convert
def _identity(family: str, spec: AugModuleSpec) -> Dict[str, Any]:
    """Backbone identity (as run.json records it) of a release family, from the module shape."""
    if family == "sam":
        from .backbones.sam import sam_architectures

        for name, a in sam_architectures().items():
            depth = int(a["depth"])
            if int(a["embed_dim"]) == spec.dim and tuple(spec.layers) == tuple(range(depth // 2 + 1, depth)):
                return {"family": "sam", "arch": name, "img_size": int(a["img_size"]),
                        "selector_layer": depth // 2, "selector_dim": spec.dim}
        raise ReleaseFormatError(f"no SAM architecture has width {spec.dim} with AugModule blocks {list(spec.layers)}")
    if spec.dim == 384 and tuple(spec.layers) == (6, 7, 8, 9):
        return {"family": "sam2", "arch": SAM2_ARCH, "img_size": 1024, "selector_layer": 5, "selector_dim": 384}
    raise ReleaseFormatError(f"only SAM 2.1 Hiera-T release modules (width 384, blocks 6..9) are known; got width "
                             f"{spec.dim}, blocks {list(spec.layers)}")


def _prepare_destination(dst: Path, overwrite: bool, src: Path) -> None:
    dst, src = Path(dst), Path(src)
    if dst.resolve() == src.resolve():
        raise ReleaseFormatError(f"destination {dst} is the source folder; choose another one")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ReleaseFormatError(f"destination {dst} is not empty; pass --overwrite or choose another folder")
    dst.mkdir(parents=True, exist_ok=True)


def convert(src: Path, dst: Path, family: Optional[str] = None, order: Sequence[str] = RELEASE_ORDER,
            unseen: Sequence[str] = RELEASE_UNSEEN, overwrite: bool = False) -> Dict[str, Any]:
    """Release folder ``src`` -> run folder ``dst`` in this project's format.

    Writes ``<domain>.pth`` (format samcl-augmodule, plain state dict + spec, plus the
    authors' ``cnt``), ``Module_Selector.pth`` (format samcl-selector) and ``run.json``.
    Returns the manifest.
    """
    from .config import Config

    src, dst = Path(src), Path(dst)
    rel = read_release_folder(src, order, unseen)
    if family is not None and family != rel.family:
        raise ReleaseFormatError(f"{src} holds {FAMILY_NAMES[rel.family]} modules, not {FAMILY_NAMES.get(family, family)}"
                                 f" (--family {family}); pass --family {rel.family}")
    _prepare_destination(dst, overwrite, src)
    ident = _identity(rel.family, rel.spec)
    written: List[str] = []
    for d, rm in rel.modules.items():
        atomic_torch_save({"format": "samcl-augmodule", "version": 1, "domain": d, "backbone": ident,
                           "spec": rm.spec.to_dict(), "state_dict": rm.module.state_dict(),
                           "release": {"extra_class": ".".join(EXTRA_CLASSES[rm.family].release_global),
                                       "cnt": rm.cnt, "source": str(rm.path)}}, dst / f"{d}.pth")
        written.append(f"{d}.pth")
    # the release has only the final selector: it is the snapshot "after" the last domain
    snapshot = selector_snapshot(rel.order[-1])
    for name in (snapshot, SELECTOR_FILE):
        save_selector(rel.selector, rel.order, dst / name)
    written.append(snapshot)
    size = {"hiera_name": ident["arch"]} if rel.family == "sam2" else {"vit_name": ident["arch"]}
    cfg = Config(module=RELEASE_MODULE_NAMES[rel.family], backbone=rel.family, ckpt=None, img_size=ident["img_size"],
                 rank=rel.spec.rank, aug_layers=list(rel.spec.layers), order="_".join(rel.order),
                 unseen=list(rel.unseen), run_dir=str(dst),
                 output_dir="log_sam2" if rel.family == "sam2" else "log_sam1", **size).validate()
    official = _official_checkpoint(rel.family, ident["arch"])
    manifest = {
        "format": "samcl-run", "version": 1, "module": cfg.module, "backbone": ident,
        "checkpoint": {"file": official, "sha256": None},  # trained on the official weights; hash not shipped
        "spec": rel.spec.to_dict(), "order": rel.order, "unseen": rel.unseen, "completed": rel.order,
        "modules": {d: f"{d}.pth" for d in rel.modules}, "selector": SELECTOR_FILE,
        "files": {name: sha256_file(dst / name) for name in written},
        "config": cfg.to_dict(), "versions": package_versions(),
        "converted_from": {"format": "samcl-release", "folder": str(src.resolve()),
                           "note": "the release ships no embedding buffer and only the final selector: the run "
                                   "can be tested and exported, not resumed or extended"},
    }
    write_json(dst / MANIFEST, manifest)
    return manifest


def _official_checkpoint(family: str, arch: str) -> Optional[str]:
    from .backbones.build import backbone_family

    return backbone_family(family).architectures().get(arch, {}).get("checkpoint")


# ----------------------------------------------------------------------------- export
class _ReleasePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pure-Python pickler that writes the stand-in Extra classes under the authors' names."""

    def save_global(self, obj: Any, name: Optional[str] = None) -> None:
        target = obj.__dict__.get("release_global") if isinstance(obj, type) and issubclass(obj, ReleaseExtra) else None
        if target is None:
            super().save_global(obj, name)
            return
        module, qualname = target
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + module.encode("utf-8") + b"\n" + qualname.encode("utf-8") + b"\n")
        self.memoize(obj)


_release_pickle_module = types.ModuleType("samcl_release_pickle")
_release_pickle_module.Pickler = _ReleasePickler  # type: ignore[attr-defined]


def release_dict(module: AugModule, family: str, cnt: int = 0) -> Dict[str, Any]:
    """AugModule -> the release's module dict of real nn.Linear / nn.LayerNorm objects and an Extra."""
    spec = module.spec
    if (family == "sam") != (spec.neck_channels is not None):
        raise ReleaseFormatError(f"a {FAMILY_NAMES[family]} release module "
                                 f"{'needs' if family == 'sam' else 'has no'} a neck injection; spec {spec}")

    def own(m: nn.Module) -> nn.Module:
        return copy.deepcopy(m).cpu().float().eval()

    extra = EXTRA_CLASSES[family]()
    extra.layer = own(module.extra.layer)
    extra.norm = own(module.extra.norm)
    if family == "sam":
        extra.upward = own(module.extra.upward)
        extra.upward_ = own(module.extra.upward_)
    extra.cnt = int(cnt)
    extra.eval()
    out: Dict[str, Any] = {"extra": extra, "lora_layer": [int(i) for i in spec.layers], "A": own(module.A)}
    for prefix, mods in (("B", module.B), ("norm1", module.norm1), ("norm2", module.norm2)):
        for i, m in enumerate(mods):
            out[f"{prefix}_{i:03d}"] = own(m)
    return out


def _save_named(obj: Any, path: Path, pickle_module: Any = pickle) -> None:
    """torch.save to ``path`` atomically, through a temporary folder so the zip's top folder
    is named after the file as in the release (``Kvasir/data.pkl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        torch.save(obj, tmp_dir / path.name, pickle_module=pickle_module)
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def save_release_module(module: AugModule, family: str, path: Path, cnt: int = 0) -> None:
    """Write ``path`` in the release's module format (the authors' code loads it with torch.load)."""
    _save_named(release_dict(module, family, cnt), path, _release_pickle_module)


def _read_own_module(path: Path) -> Tuple[AugModule, Dict[str, Any]]:
    formats = [module_format(k) for k in MODULES.names()]
    data = load_tagged(path, formats, "module file", RunFolderError)
    if data["format"] != module_format("augmodule"):
        raise RunFolderError(f"{path} holds a {data.get('kind')} module: the release format has AugModules only "
                             f"(only runs with AugModules, --module SAMCL/SAMCL_2, can be exported)")
    with torch.random.fork_rng(devices=[]):
        module = AugModule(AugModuleSpec.from_dict(data["spec"]))
    module.load_state_dict(data["state_dict"])
    return module.eval(), data


def export(run_dir: Path, dst: Path, overwrite: bool = False) -> Dict[str, Any]:
    """Run folder of this project -> folder in the release's layout (for the authors' code).

    Writes ``<domain>.pth`` (pickled modules, Extra as ``module.SAMCL[_2].Extra``),
    ``Module_Selector.pth`` (plain state dict) and ``samcl_export.json`` (the domain
    order of the selector's outputs). Every written module is read back with the
    restricted loader and compared bit for bit. Returns the export info.
    """
    run_dir, dst = Path(run_dir), Path(dst)
    manifest = read_manifest(run_dir)
    family = manifest["backbone"]["family"]
    if family not in EXTRA_CLASSES:
        raise RunFolderError(f"{run_dir} uses backbone family {family!r}; the release format exists for "
                             f"{sorted(EXTRA_CLASSES)} only")
    completed = list(manifest.get("completed") or [])
    if not completed:
        raise RunFolderError(f"{run_dir} has no finished domain yet; nothing to export")
    # the selector as committed after the last finished domain (Module_Selector.pth may be newer)
    snapshot = selector_snapshot(completed[-1])
    selector_path = run_dir / (snapshot if (run_dir / snapshot).is_file() else SELECTOR_FILE)
    unseen = [d for d in completed if d in set(manifest["unseen"])]
    if "files" in manifest:
        names = [f"{d}.pth" for d in completed if d not in unseen]
        verify_files(run_dir, manifest["files"], names + ([snapshot] if snapshot in manifest["files"] else []))
    selector, domains = load_selector(selector_path)
    if domains != completed:
        raise RunFolderError(f"{selector_path} covers {domains} but run.json says {completed} are done; "
                             f"the run folder is inconsistent")
    _prepare_destination(dst, overwrite, run_dir)
    written = {}
    for d in domains:
        if d in unseen:
            continue
        module, data = _read_own_module(run_dir / f"{d}.pth")
        cnt = int(data.get("release", {}).get("cnt", 0))
        out = dst / f"{d}.pth"
        save_release_module(module, family, out, cnt)
        back = read_release_module(out)
        ref, got = module.state_dict(), back.module.state_dict()
        if back.family != family or back.spec != module.spec or back.cnt != cnt or ref.keys() != got.keys() or \
                not all(torch.equal(ref[k], got[k]) for k in ref):
            raise ReleaseFormatError(f"exported {out} does not read back bit-exactly; please report this")
        written[d] = out.name
    _save_named(OrderedDict(selector.state_dict()), dst / SELECTOR_FILE)
    info = {"format": "samcl-export", "family": family, "order": list(domains), "unseen": unseen,
            "modules": written, "selector": SELECTOR_FILE, "source": str(run_dir.resolve())}
    atomic_write_text(dst / EXPORT_INFO_FILE, json.dumps(info, indent=2) + "\n")
    return info


# ----------------------------------------------------------------------------- CLI
def _inspect(folder: Path, order: Sequence[str], unseen: Sequence[str]) -> None:
    rel = read_release_folder(folder, order, unseen)
    print(f"{folder}: {FAMILY_NAMES[rel.family]} release, order {'_'.join(rel.order)}, vanilla for {rel.unseen}")
    for d, rm in rel.modules.items():
        print(f"  {d:<8} {rm.describe()}  (cnt {rm.cnt})")
    sel = rel.selector
    print(f"  selector: {sel.layer1.in_features}-d input, {sel.num_domains} outputs")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import Parser, explained_errors

    p = Parser(prog="python -m samcl.release", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    order_help = f"domain keys of the selector's outputs joined by '_' (default {'_'.join(RELEASE_ORDER)})"
    for name in ("inspect", "convert"):
        q = sub.add_parser(name, help="summarise a release folder" if name == "inspect"
                           else "release folder -> run folder in this project's format")
        q.add_argument("src", type=Path, help="release folder (Module_Selector.pth + <domain>.pth)")
        if name == "convert":
            q.add_argument("dst", type=Path, help="new run folder")
            q.add_argument("--family", choices=sorted(EXTRA_CLASSES), required=True,
                           help="sam (checkpoint/SAM1) or sam2 (checkpoint/SAM2); checked against the files")
            q.add_argument("--overwrite", action="store_true", help="write into a non-empty destination")
        q.add_argument("--order", default="_".join(RELEASE_ORDER), help=order_help)
        q.add_argument("--unseen", nargs="*", default=list(RELEASE_UNSEEN), help="domains without a module (default COCO)")
    q = sub.add_parser("export", help="run folder of this project -> release layout (for the authors' code)")
    q.add_argument("run_dir", type=Path)
    q.add_argument("dst", type=Path)
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty destination")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with explained_errors():
        if args.command == "inspect":
            _inspect(args.src, [d for d in args.order.split("_") if d], args.unseen)
        elif args.command == "convert":
            man = convert(args.src, args.dst, args.family, [d for d in args.order.split("_") if d], args.unseen,
                          args.overwrite)
            print(f"wrote run folder {args.dst}: modules {list(man['modules'])}, selector over {man['order']} "
                  f"(test it with test{'_SAM2' if args.family == 'sam2' else ''}.py --run_dir {args.dst})")
        else:
            info = export(args.run_dir, args.dst, args.overwrite)
            print(f"wrote release folder {args.dst}: modules {list(info['modules'])}, selector over {info['order']} "
                  f"(all modules verified bit-exact with the restricted loader)")
    return 0


if __name__ == "__main__":
    from .cli import run_script

    run_script(main)
