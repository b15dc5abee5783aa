"""A run folder: everything a continual run leaves behind, and how to read it back.

Layout (``log_sam1/<module>_<order>_<num_embedding>_<seed>_training/``)::

    run.json              manifest: backbone and checkpoint hash, module spec, order,
                          domains done, weight format, package versions, SHA-256 of every
                          file below
    config.yaml           the resolved configuration
    log.txt               the log
    <domain>.safetensors  one module per trained domain (state dict; kind, backbone and spec
                          as JSON in the header): an AugModule (--module SAMCL/SAMCL_2), a
                          CAD module (--module CAD), ...
    Module_Selector.safetensors   the latest selector (state dict + its domain order)
    selector/after_<domain>.safetensors   the selector as it was after each step
    embedding_buffer/<domain>.safetensors the stored selector embeddings of each domain
                          (the only record of past domains)
    metrics.json          accuracy matrix, vanilla scores, the summary per step, selector counts, versions
    partial/<domain>.pt   the domain in progress, saved after every epoch (for --resume;
                          a torch file: optimizer state, bounded-checked before it is read)
    test_metrics.json     written by test.py

Opening a run folder runs no pickle: its weights are safetensors files (:mod:`samcl.io`).
A run folder written before safetensors holds the same files as ``.pth`` (torch.save) and
no ``"weights"`` in run.json; it is read with torch's restricted unpickler after the
bounded checks, and a resume continues it in ``.pth`` so a folder is always one format.

The file names come from :func:`module_path`, :func:`selector_file`,
:func:`selector_snapshot` and :func:`buffer_part` with the run's weight format
(:func:`run_weights`: run.json's ``"weights"``; absent, ``.pth``).

Every file is written atomically (temporary file + rename). A step *commits* by
rewriting run.json last, with the checksums of what it wrote; files of finished
steps (modules, buffer parts, selector snapshots) are never rewritten.
"""
import hashlib
import json
import logging
import logging.handlers
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml
from torch import nn

from .backbones.base import Backbone
from .config import stored_settings
from .io import atomic_write_text, load_tagged, save_tagged
from .learning_modules.base import LearningModule
from .registry import LEARNING_MODULES
from .routing import selector_from_state
from .selector import ModuleSelector

MANIFEST = "run.json"
SELECTOR_STEM = "Module_Selector"
SELECTOR_DIR = "selector"
BUFFER_DIR = "embedding_buffer"
PARTIAL_DIR = "partial"
METRICS_FILE = "metrics.json"
TEST_METRICS_FILE = "test_metrics.json"
LOG_FILE = "log.txt"
CONFIG_FILE = "config.yaml"

# weight formats of a run folder's module, selector and buffer files -> their suffix
WEIGHT_SUFFIXES = {"safetensors": ".safetensors", "pth": ".pth"}
WEIGHTS = "safetensors"  # what new run folders are written in
LEGACY_WEIGHTS = "pth"  # a run.json without "weights": written before safetensors


class RunFolderError(ValueError):
    """A run folder is missing, incomplete or belongs to another setup; the message says what to do."""


def package_versions() -> Dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("torch", "torchvision", "segment-anything", "sam2", "numpy", "opencv-python-headless", "opencv-python"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out["cuda"] = torch.version.cuda or "none"
    return out


def run_weights(manifest: Dict[str, Any]) -> str:
    """The weight format of a run folder from its run.json as :func:`read_manifest` returns it
    (absent: written before safetensors)."""
    return manifest.get("weights", LEGACY_WEIGHTS)


def module_path(run_dir: Path, domain: str, weights: str) -> Path:
    return Path(run_dir) / f"{domain}{WEIGHT_SUFFIXES[weights]}"


def selector_file(weights: str) -> str:
    """The run's latest selector (rewritten at every step)."""
    return f"{SELECTOR_STEM}{WEIGHT_SUFFIXES[weights]}"


def step_snapshot(folder: str, domain: str, weights: str) -> str:
    """A method's file ``folder/after_<domain>`` as committed after ``domain``'s step (relative to
    the run folder, in the run's weight format)."""
    return f"{folder}/after_{domain}{WEIGHT_SUFFIXES[weights]}"


def selector_snapshot(domain: str, weights: str) -> str:
    """The selector as committed after ``domain``'s step."""
    return step_snapshot(SELECTOR_DIR, domain, weights)


def buffer_part(domain: str, weights: str) -> str:
    """``domain``'s stored selector embeddings."""
    return f"{BUFFER_DIR}/{domain}{WEIGHT_SUFFIXES[weights]}"


def backbone_identity(backbone: Backbone) -> Dict[str, Any]:
    return {"family": backbone.family, "arch": backbone.arch, "img_size": backbone.img_size,
            "selector_layer": backbone.selector_layer, "selector_dim": backbone.selector_dim}


def module_format(kind: str) -> str:
    """The format tag of a module file of a learning-module kind (``samcl-augmodule``, ``samcl-cad``, ...)."""
    return f"samcl-{kind}"


def save_module(module: LearningModule, backbone: Backbone, domain: str, path: Path) -> None:
    """A per-domain module as a plain state dict with its kind, spec and backbone (in the format
    ``path``'s suffix says)."""
    save_tagged({"format": module_format(module.name), "version": 1, "kind": module.name, "domain": domain,
                 "backbone": backbone_identity(backbone), "spec": module.spec.to_dict(),
                 "state_dict": module.state_dict()}, path)


def load_module(path: Path, backbone: Backbone, kind: str = "augmodule") -> LearningModule:
    """Load a module file of ``kind``, refusing one of another kind or written for another
    backbone (both are named)."""
    formats = {module_format(k): k for k in LEARNING_MODULES.names()}
    data = load_tagged(path, formats, "module file (for the authors' release files see docs/release.md)",
                       RunFolderError)
    found = formats[data["format"]]
    if found != kind:
        raise RunFolderError(f"{path} holds a {found} module, but this run uses {kind} modules; "
                             f"a run folder holds one kind")
    ident = data["backbone"]
    if (ident["family"], ident["arch"]) != (backbone.family, backbone.arch):
        raise RunFolderError(f"{path} was trained on {ident['family']}/{ident['arch']} but the backbone is "
                             f"{backbone.family}/{backbone.arch}; pass the matching --vit_name/--ckpt")
    spec = LEARNING_MODULES.get(kind).spec_class.from_dict(data["spec"])
    spec.check(backbone)
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten below
        module = spec.build(backbone)
    module.load_state_dict(data["state_dict"])
    return module.eval()


def save_selector(selector: nn.Module, domains: List[str], path: Path) -> None:
    """The Module Selector's state dict, or a training-free selector's state (``kind`` ncm, knn)."""
    if not isinstance(selector, ModuleSelector):
        save_tagged({"format": "samcl-selector", "version": 1, "domains": list(domains), "kind": selector.kind,
                     "state": selector.state()}, path)
        return
    save_tagged({"format": "samcl-selector", "version": 1, "domains": list(domains),
                 "dim": selector.layer1.in_features, "state_dict": selector.state_dict()}, path)


def load_selector(path: Path) -> tuple:
    """-> (ModuleSelector in eval mode, or an ncm / knn selector; its domain order). An MLP's outputs,
    the rows of its last layer: one per domain (selector_head grow), or one per domain of the run's
    order (full)."""
    data = load_tagged(path, ("samcl-selector",), "selector file", RunFolderError)
    if "kind" in data:
        return selector_from_state(data["kind"], data["state"]), list(data["domains"])
    head = data["state_dict"].get("layer4.weight")
    sel = ModuleSelector(data["dim"], len(data["domains"]) if head is None else int(head.shape[0]))
    sel.load_state_dict(data["state_dict"])
    return sel.eval(), list(data["domains"])


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# what a run folder holds besides run.json (a release folder has none of these)
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, LOG_FILE, SELECTOR_DIR, BUFFER_DIR, PARTIAL_DIR)
MANIFEST_KEYS = {"config": dict, "order": list, "completed": list, "unseen": list}


def run_markers(folder: Path) -> List[str]:
    """The run-folder files and folders present in ``folder`` (besides run.json)."""
    return [name for name in RUN_MARKERS if (Path(folder) / name).exists()]


def read_manifest(run_dir: Path) -> Dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise RunFolderError(f"run folder {run_dir} is a file, not a folder; pass the run's folder with --run_dir")
    if not Path(run_dir).is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist; train first (python train.py ...) or pass --run_dir")
    if not path.is_file():
        markers = run_markers(run_dir)
        if markers:
            raise RunFolderError(f"{run_dir} holds a run's files ({', '.join(markers)}) but no {MANIFEST}: it was "
                                 f"deleted or lost; restore it from a copy (the folder cannot be used without it)")
        raise RunFolderError(f"{run_dir} has no {MANIFEST}: it is not a finished or started SAMCL run folder")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is corrupt ({e})") from None
    bad = [k for k, kind in MANIFEST_KEYS.items() if not isinstance(manifest, dict) or not isinstance(manifest.get(k), kind)]
    if bad:
        raise RunFolderError(f"{path} is not a SAMCL run manifest (no valid {', '.join(bad)}); restore it from a copy")
    weights = run_weights(manifest)
    if not isinstance(weights, str) or weights not in WEIGHT_SUFFIXES:
        raise RunFolderError(f"{path} names the weight format {weights!r}, which this version does not "
                             f"know ({', '.join(WEIGHT_SUFFIXES)}); a newer SAMCL wrote it, or the file was edited")
    manifest["config"] = stored_settings(manifest["config"])
    return manifest


def describe_checkpoint(ident: Dict[str, Any]) -> str:
    """A checkpoint identity (:func:`checkpoint_identity`) in words, with its hash."""
    if ident.get("random_weights"):
        return f"random weights (seed {ident.get('seed')})"
    return f"{ident.get('file')} (sha256 {ident.get('sha256')})"


def check_same_checkpoint(run_dir: Path, recorded: Optional[Dict[str, Any]], given: Dict[str, Any]) -> None:
    """Refuse backbone weights other than the run's, naming both. A run that records no hash (one
    converted from the authors' release, which ships none) is tested as the release folder itself:
    with any weights, random ones as a smoke test."""
    if not recorded or not (recorded.get("random_weights") or recorded.get("sha256")):
        return
    same = bool(recorded.get("random_weights")) == bool(given.get("random_weights")) and (
        recorded.get("random_weights") or recorded["sha256"] == given.get("sha256"))
    if not same:
        fix = ("pass --random_weights and no --ckpt" if recorded.get("random_weights")
               else f"pass --ckpt with the run's {recorded.get('file')} and no --random_weights")
        raise RunFolderError(f"{run_dir} was trained on {describe_checkpoint(recorded)}, but the backbone weights "
                             f"given are {describe_checkpoint(given)}; {fix}")


def write_config(run_dir: Path, config: Dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))


class _Held(logging.handlers.BufferingHandler):
    """Keeps every record until a log file is opened (:func:`setup_logging` ``hold``)."""

    def __init__(self) -> None:
        super().__init__(capacity=0)

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return False


def setup_logging(run_dir: Optional[Path] = None, filename: str = LOG_FILE, main: bool = True,
                  hold: bool = False) -> logging.Logger:
    """Console + (optionally) ``<run_dir>/<filename>`` logging for the ``samcl`` loggers.

    Other ranks than the main one log warnings and errors to the console only. ``hold``
    keeps the records until a later call opens a file, which then starts with them (a
    folder is written only once it passed its checks, with the log of those checks).
    """
    root = logging.getLogger("samcl")
    root.setLevel(logging.INFO if main else logging.WARNING)
    if not main:
        run_dir = None
    held = [r for h in root.handlers if isinstance(h, _Held) for r in h.buffer]
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(run_dir) / filename)
        fh.setFormatter(fmt)
        for record in held:
            fh.handle(record)
        root.addHandler(fh)
    if hold:
        root.addHandler(_Held())
    root.propagate = False
    return root


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_files(run_dir: Path, checksums: Dict[str, str], names: Optional[List[str]] = None) -> None:
    """Compare files with their recorded SHA-256; report every bad one by name, touch nothing."""
    bad = []
    for rel in names if names is not None else list(checksums):
        path = Path(run_dir) / rel
        if not path.is_file():
            bad.append(f"{rel} (missing)")
        elif sha256_file(path) != checksums[rel]:
            bad.append(f"{rel} (checksum mismatch: truncated or modified)")
    if bad:
        raise RunFolderError(
            f"run folder {run_dir}: {', '.join(bad)}. Nothing was changed. Restore the file(s) from a copy; "
            f"a file of a finished domain that cannot be restored means retraining from that domain on "
            f"(a new run folder, or delete that domain's files and later ones and fix run.json).")


def checkpoint_identity(path: Optional[Path], random_weights: bool, seed: int) -> Dict[str, Any]:
    """The backbone weights a run was trained on: the file's name and SHA-256, or the random seed."""
    if random_weights:
        return {"random_weights": True, "seed": seed}
    return {"file": Path(path).name, "sha256": sha256_file(Path(path))}
