"""Release folder -> run folder in this project's format (convert), and back (export)."""
import copy
import json
import logging
import os
import pickle
import shutil
import tempfile
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..backbones.build import backbone_family
from ..backbones.sam import sam_architectures
from ..config import FAMILY_NAMES, Config
from ..io import atomic_write_text, load_tagged, save_tagged
from ..learning_modules.augmodule import AugModule, AugModuleSpec
from ..registry import LEARNING_MODULES
from ..run_folder import (MANIFEST, WEIGHTS, RunFolderError, load_selector, module_format, module_path,
                          package_versions, read_manifest, run_weights, save_selector, selector_file,
                          selector_snapshot, sha256_file, verify_files, write_json)
from .folder import (EXPORT_INFO_FILE, RELEASE_MODULE_NAMES, RELEASE_ORDER, RELEASE_UNSEEN, SAM2_ARCH, SELECTOR_FILE,
                     read_release_folder, read_release_module)
from .unpickle import EXTRA_CLASSES, ReleaseExtra, ReleaseFormatError


log = logging.getLogger("samcl.release")

# ----------------------------------------------------------------------------- convert
def _identity(family: str, spec: AugModuleSpec) -> Dict[str, Any]:
    """Backbone identity (as run.json records it) of a release family, from the module shape."""
    if family == "sam":
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

    Writes ``<domain>.safetensors`` (format samcl-augmodule, plain state dict + spec, plus
    the authors' ``cnt``), ``Module_Selector.safetensors`` and its snapshot (format
    samcl-selector) and ``run.json``: a run folder that opens without a pickle.
    Returns the manifest.
    """
    src, dst = Path(src), Path(dst)
    rel = read_release_folder(src, order, unseen)
    if family is not None and family != rel.family:
        raise ReleaseFormatError(f"{src} holds {FAMILY_NAMES[rel.family]} modules, not {FAMILY_NAMES.get(family, family)}"
                                 f" (--family {family}); pass --family {rel.family}")
    _prepare_destination(dst, overwrite, src)
    ident = _identity(rel.family, rel.spec)
    modules = {d: module_path(dst, d, WEIGHTS).name for d in rel.modules}
    written: List[str] = []
    for d, rm in rel.modules.items():
        save_tagged({"format": "samcl-augmodule", "version": 1, "domain": d, "backbone": ident,
                     "spec": rm.spec.to_dict(), "state_dict": rm.module.state_dict(),
                     "release": {"extra_class": ".".join(EXTRA_CLASSES[rm.family].release_global),
                                 "cnt": rm.cnt, "source": str(rm.path)}}, dst / modules[d])
        written.append(modules[d])
    # the release has only the final selector: it is the snapshot "after" the last domain
    snapshot = selector_snapshot(rel.order[-1], WEIGHTS)
    for name in (snapshot, selector_file(WEIGHTS)):
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
        "weights": WEIGHTS, "modules": modules, "selector": selector_file(WEIGHTS),
        "files": {name: sha256_file(dst / name) for name in written},
        "config": cfg.to_dict(), "versions": package_versions(),
        "converted_from": {"format": "samcl-release", "folder": str(src.resolve()),
                           "note": "the release ships no embedding buffer and only the final selector: the run "
                                   "can be tested and exported, not resumed or extended"},
    }
    write_json(dst / MANIFEST, manifest)
    return manifest


def _official_checkpoint(family: str, arch: str) -> Optional[str]:
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
    formats = [module_format(k) for k in LEARNING_MODULES.names()]
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
    routing = manifest.get("config", {}).get("selector", "mlp")
    if routing != "mlp":
        raise RunFolderError(f"{run_dir} routes with --selector {routing}; the release format holds the Module "
                             f"Selector (an MLP) only")
    weights = run_weights(manifest)
    # the selector as committed after the last finished domain (the latest selector may be newer)
    snapshot = selector_snapshot(completed[-1], weights)
    selector_path = run_dir / (snapshot if (run_dir / snapshot).is_file() else selector_file(weights))
    unseen = [d for d in completed if d in set(manifest["unseen"])]
    if "files" in manifest:
        names = [module_path(run_dir, d, weights).name for d in completed if d not in unseen]
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
        module, data = _read_own_module(module_path(run_dir, d, weights))
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


