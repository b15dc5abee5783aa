"""Opening a run folder: the model it holds, its own configuration and its manifest, each read once.

:func:`open_run` opens both kinds of folder that test.py, predict.py and the predictor read:

* a run folder of this project (``run.json``, :mod:`samcl.run_folder`): its stored
  configuration, every finished domain's module and the selector; the files are verified
  against run.json's checksums and the backbone weights against the run's recorded hash;
* a release folder (the authors' ``Module_Selector.pth`` + ``<domain>.pth`` pickles,
  :mod:`samcl.release`): every pickle is read once, by the restricted loader, and the
  family's default recipe with the settings given is the run's configuration.

:func:`build_model` builds the model a configuration names (train.py builds a new run's with it).
"""
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, NamedTuple, Optional, Union

import torch

from .backbones import build_backbone
from .backbones.build import default_checkpoint
from .bounded import check_torch_file
from .config import Config, build_config, default_config, load_config
from .model import ModuleBank
from .plugins import check_plugins
from .registry import LEARNING_MODULES
from .release import RELEASE_ORDER, RELEASE_UNSEEN
from .release.folder import (check_release_family, is_release_folder, read_release_folder, release_model,
                             release_run_config, report_dir_for)
from .run_folder import (MANIFEST, RunFolderError, backbone_identity, check_same_checkpoint, checkpoint_identity,
                         load_module, load_selector, module_path, read_manifest, run_weights, selector_file,
                         selector_snapshot, sha256_file, verify_files)
from .loading import seed_everything

log = logging.getLogger("samcl.opening")

# What a release folder, which stores no configuration, is read with from a reader's configuration
# (test.py's command line, :func:`open_with`): the backbone, the seed of random weights, the domain
# order and where the report goes. A run folder keeps its own.
RELEASE_READ_SETTINGS = ("backbone", "vit_name", "hiera_name", "img_size", "selector_layer", "heat_orientation",
                         "upsample", "seed", "deterministic", "order", "unseen", "output_dir")


class OpenedRun(NamedTuple):
    """An opened run folder (or release folder)."""

    model: ModuleBank  # backbone with its weights, every finished domain's module, the selector
    config: Config  # the run's own configuration, with the backbone weights it was opened with
    manifest: Dict[str, Any]  # run.json; for a release folder what it would say (format "samcl-release")
    report_dir: Path  # where test outputs go: the run folder; <output_dir>/release_<name> for a release folder


# ----------------------------------------------------------------------------- the model a configuration names
def build_model(cfg: Config, device: torch.device) -> ModuleBank:
    """Backbone with its weights, an empty module bank of ``cfg``'s learning-module kind, on ``device``."""
    check_plugins(cfg)  # names first: an unknown or unfitting method or module before any weights are read
    seed_everything(cfg.seed, cfg.deterministic)
    path = checkpoint_path(cfg)
    if path is not None and os.path.lexists(path):  # bounded checks first; build_backbone names a missing file
        check_torch_file(path, "backbone checkpoint")
    backbone = build_backbone(cfg)
    spec = LEARNING_MODULES.get(cfg.learning_module_kind).spec_class.for_backbone(backbone, cfg)
    return ModuleBank(backbone, spec, prompt=cfg.prompt).to(device)


def checkpoint_path(cfg: Config) -> Optional[Path]:
    """The backbone weights file of ``cfg`` (None: random weights)."""
    return None if cfg.random_weights else (Path(cfg.ckpt) if cfg.ckpt else default_checkpoint(cfg))


def config_checkpoint_identity(cfg: Config) -> Dict[str, Any]:
    """The identity (file and SHA-256, or random seed) of ``cfg``'s backbone weights."""
    return checkpoint_identity(checkpoint_path(cfg), cfg.random_weights, cfg.seed)


# ----------------------------------------------------------------------------- opening
def open_run(run_dir: Union[str, Path], device: Union[str, torch.device], *, ckpt: Optional[str] = None,
             random_weights: Optional[bool] = None, settings: Optional[Mapping[str, Any]] = None,
             release_settings: Optional[Mapping[str, Any]] = None) -> OpenedRun:
    """Open a run folder of this project (converted release folders included) or a release folder.

    Args:
        run_dir: the folder; device: where the model goes.
        ckpt, random_weights: backbone weights instead of the run's own. Either given, the pair
            replaces the run's (random_weights None counts as False). They must be the weights the
            run records (a converted release records none; a release folder has no record).
        settings: Config settings that replace the run's own (None values are ignored), e.g.
            ``img_size`` or ``order`` for a release folder.
        release_settings: the settings a release folder is read with, over its family's recipe and
            under ``settings`` (test.py: its command line's, :func:`open_with`); a run folder keeps its own.
    """
    run_dir = Path(run_dir)
    device = torch.device(device)
    weights = {} if ckpt is None and random_weights is None else {"ckpt": ckpt, "random_weights": bool(random_weights)}
    given = {k: v for k, v in (settings or {}).items() if v is not None}
    if is_release_folder(run_dir):
        read = {k: v for k, v in (release_settings or {}).items() if v is not None}
        return _open_release(run_dir, device, {**read, **given}, weights)
    return _open_run_folder(run_dir, device, given, weights)


def open_with(run_dir: Union[str, Path], cfg: Config, device: Union[str, torch.device]) -> OpenedRun:
    """:func:`open_run` as test.py opens a folder with its configuration ``cfg``: ``cfg``'s backbone
    weights replace the run's when it names any (a ``ckpt``, or ``random_weights``); with neither, a run
    folder is opened with the weights its run.json records (official file or random weights), as
    --resume, predict.py and the predictor open it. A release folder is read with ``cfg``'s
    :data:`RELEASE_READ_SETTINGS`."""
    named = cfg.ckpt is not None or bool(cfg.random_weights)
    return open_run(run_dir, device, ckpt=cfg.ckpt if named else None,
                    random_weights=cfg.random_weights if named else None,
                    release_settings={k: getattr(cfg, k) for k in RELEASE_READ_SETTINGS})


def _open_run_folder(run_dir: Path, device: torch.device, given: Dict[str, Any],
                     weights: Dict[str, Any]) -> OpenedRun:
    manifest = read_manifest(run_dir)
    cfg = build_config([(str(run_dir / MANIFEST), manifest["config"]), ("the settings given", given)])
    cfg = dataclasses.replace(cfg, **weights)
    _check_weights(run_dir, manifest, cfg)
    completed, with_module = manifest["completed"], set(manifest.get("modules", {}))
    if not completed:
        raise RunFolderError(f"{run_dir} has no finished domain yet; nothing to test")
    fmt = run_weights(manifest)  # safetensors; "pth" for a folder written before (read with weights_only)
    modules = [module_path(run_dir, d, fmt).name for d in completed if d in with_module]
    snapshot = selector_snapshot(completed[-1], fmt)
    routed = snapshot in manifest["files"]  # methods without a selector (e.g. finetune) write none
    verify_files(run_dir, manifest["files"], modules + ([snapshot] if routed else []))
    if routed:
        _check_latest_selector(run_dir, manifest["files"], selector_file(fmt), snapshot)
    model = build_model(cfg, device)
    built = json.loads(json.dumps(backbone_identity(model.backbone)))
    if manifest.get("backbone") not in (None, built):
        raise RunFolderError(f"{run_dir} was trained on the backbone {manifest['backbone']}, but the one built from "
                             f"its settings is {built}; its run.json is inconsistent")
    selector, domains = load_selector(run_dir / snapshot) if routed else (None, completed)
    for d in domains:
        model.add_domain(d, load_module(module_path(run_dir, d, fmt), model.backbone, model.kind)
                         if d in with_module else None)
    model.selector = None if selector is None else selector.to(device)
    model.routes = routed  # without a selector: one shared module, whose latest snapshot segments
    if len(completed) < len(manifest["order"]):
        log.warning("%s is unfinished: only %s of %s are done (train.py --resume %s continues it)", run_dir,
                    completed, manifest["order"], run_dir)
    return OpenedRun(model, cfg, manifest, run_dir)


def _check_latest_selector(run_dir: Path, checksums: Dict[str, str], latest: str, snapshot: str) -> None:
    """The selector a test reads is the last step's snapshot (verified above). ``Module_Selector.*``
    is the same selector under the release's file name, a copy for export: it is not read, so a
    changed copy does not change what is tested; that is said rather than passed over."""
    path = run_dir / latest
    if latest in checksums and (not path.is_file() or sha256_file(path) != checksums[latest]):
        log.warning("%s is not the selector %s records (changed, replaced or missing); it is a copy for export, "
                    "not read: the run is tested with %s", path, MANIFEST, snapshot)


def _check_weights(run_dir: Path, manifest: Dict[str, Any], cfg: Config) -> None:
    """The backbone weights about to be loaded must be those the run was trained on (a missing
    file is left to build_model, which names it and the fix)."""
    path = checkpoint_path(cfg)
    if path is not None and not path.is_file():
        return
    check_same_checkpoint(run_dir, manifest.get("checkpoint"), config_checkpoint_identity(cfg))


def _open_release(folder: Path, device: torch.device, given: Dict[str, Any], weights: Dict[str, Any]) -> OpenedRun:
    """Read every pickle once; the family's recipe with ``given`` and the release's module shape is the run's
    configuration. The domain order is the given one, else the release's (the default of both recipes)."""
    order = [d for d in str(given["order"]).split("_") if d] if "order" in given else RELEASE_ORDER
    rel = read_release_folder(folder, order, given.get("unseen", RELEASE_UNSEEN))
    if "backbone" in given:
        wanted = Config(**{k: given[k] for k in ("backbone", "vit_name", "hiera_name") if k in given})
        check_release_family(rel, wanted.backbone, wanted.arch_name)
    cfg = load_config(default_config(rel.family, None), {**given, "backbone": rel.family, **weights})
    cfg = release_run_config(rel, cfg)
    model = release_model(rel, cfg, device, build_model)
    return OpenedRun(model, cfg, rel.manifest, report_dir_for(folder, Path(cfg.output_dir)))
