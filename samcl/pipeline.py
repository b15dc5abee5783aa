"""What train.py and test.py do, as functions (the scripts only parse flags)."""
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as dist
from . import methods  # noqa: F401  (registers the methods)
from .backbones import build_backbone
from .backbones.build import default_checkpoint
from .bounded import check_torch_file
from .config import Config, build_config
from .continual import RESUMABLE_SETTINGS, ContinualTrainer
from .data import SegmentationSplit, binarize_mask, read_domain_map, read_image
from .evaluation import evaluate_split, selector_accuracy
from .loading import make_loader, seed_everything
from .metrics import METRICS, per_image_metrics
from .model import SAMCLModel
from .pictures import overlay
from .plugins import check_plugins
from .precision import autocast, check_amp
from .registry import METHODS, MODULES
from .release.folder import is_release_folder, load_release_run, release_manifest, report_dir_for
from .run_folder import (MANIFEST, METRICS_FILE, TEST_METRICS_FILE, RunFolderError, backbone_identity,
                         check_same_checkpoint, checkpoint_identity, load_module, load_selector, module_path,
                         package_versions, read_manifest, run_weights, selector_snapshot, setup_logging, verify_files,
                         write_json)

log = logging.getLogger("samcl.pipeline")
OVERLAY_DIR = "overlays"


def build_model(cfg: Config, device: torch.device) -> SAMCLModel:
    """Backbone with its weights, an empty module bank of ``cfg``'s learning-module kind, on ``device``."""
    check_plugins(cfg)  # names first: an unknown or unfitting method or module before any weights are read
    seed_everything(cfg.seed, cfg.deterministic)
    path = _checkpoint_path(cfg)
    if path is not None and os.path.lexists(path):  # bounded checks first; build_backbone names a missing file
        check_torch_file(path, "backbone checkpoint")
    backbone = build_backbone(cfg)
    spec = MODULES.get(cfg.module_kind).spec_class.for_backbone(backbone, cfg)
    return SAMCLModel(backbone, spec, prompt=cfg.prompt).to(device)


def _checkpoint_path(cfg: Config) -> Optional[Path]:
    """The backbone weights file of ``cfg`` (None: random weights)."""
    return None if cfg.random_weights else (Path(cfg.ckpt) if cfg.ckpt else default_checkpoint(cfg))


def _checkpoint_identity(cfg: Config) -> Dict:
    return checkpoint_identity(_checkpoint_path(cfg), cfg.random_weights, cfg.seed)


def _run_continual(cfg: Config, device: torch.device, run_dir: Path, **trainer_options) -> Dict:
    """Build the model and run the protocol into ``run_dir``; the log file is opened only once
    the backbone, the data and the folder check out (a failed start leaves nothing behind)."""
    setup_logging(None, main=dist.is_main())
    model = build_model(cfg, device)
    trainer = ContinualTrainer(cfg, model, device, run_dir, checkpoint=_checkpoint_identity(cfg), **trainer_options)
    setup_logging(run_dir, main=dist.is_main())
    log.info("run folder %s on %s (%d process(es))", run_dir, device, dist.world_size())
    metrics = trainer.run()
    log.info("done: %s", run_dir)
    return metrics


def train(cfg: Config, device: torch.device, overwrite: bool = False) -> Dict:
    """A new continual run into ``cfg``'s run folder."""
    return _run_continual(cfg, device, cfg.resolved_run_dir(), overwrite=overwrite)


def resume_config(run_dir: Path, overrides: Dict) -> Config:
    """The run's own configuration with the few settings a resume may change (RESUMABLE_SETTINGS).

    Any other explicitly given setting that differs from the run's is refused.
    """
    stored = read_manifest(run_dir)["config"]
    changed = {k: v for k, v in overrides.items() if v is not None and k not in RESUMABLE_SETTINGS
               and stored.get(k, getattr(Config, k, None)) != v}  # a setting newer than the run: its default
    if changed:
        raise RunFolderError(f"a resume keeps the run's settings; {run_dir} was trained with "
                             + ", ".join(f"{k}={stored.get(k)!r}" for k in changed)
                             + f" (given: {changed}). Only {', '.join(RESUMABLE_SETTINGS)} may change.")
    allowed = [(f"flag --{k}", {k: v}) for k, v in overrides.items() if v is not None and k in RESUMABLE_SETTINGS]
    return build_config([(str(Path(run_dir) / MANIFEST), stored), *allowed, ("--resume", {"run_dir": str(run_dir)})])


def resume(run_dir: Path, overrides: Dict, device: torch.device) -> Dict:
    """Continue an interrupted run, or add the new domains of a longer ``--order`` to a finished one."""
    return _run_continual(resume_config(run_dir, overrides), device, Path(run_dir), resume=True)


def load_run(run_dir: Path, cfg: Config, device: torch.device) -> SAMCLModel:
    """Model of a run folder: its backbone settings, every finished module, the selector.

    ``cfg`` supplies only where the weights are and on which device (the run's own
    architecture, split and orientation are kept). A release-style folder (the
    authors' ``Module_Selector.pth`` + ``<domain>.pth`` pickles, no run.json) is read
    by :func:`samcl.release.load_release_run` with ``cfg``'s backbone and order.
    """
    if is_release_folder(run_dir):
        return load_release_run(Path(run_dir), cfg, device, build_model)
    manifest = read_manifest(run_dir)
    run_cfg = dataclasses.replace(build_config([(str(Path(run_dir) / MANIFEST), manifest["config"])]),
                                  ckpt=cfg.ckpt, random_weights=cfg.random_weights)
    _check_weights(run_dir, manifest, run_cfg)
    completed, with_module = manifest["completed"], set(manifest.get("modules", {}))
    if not completed:
        raise RunFolderError(f"{run_dir} has no finished domain yet; nothing to test")
    weights = run_weights(manifest)  # safetensors; "pth" for a folder written before (read with weights_only)
    modules = [module_path(run_dir, d, weights).name for d in completed if d in with_module]
    snapshot = selector_snapshot(completed[-1], weights)
    routed = snapshot in manifest["files"]  # methods without a selector (e.g. finetune) write none
    verify_files(run_dir, manifest["files"], modules + ([snapshot] if routed else []))
    model = build_model(run_cfg, device)
    built = json.loads(json.dumps(backbone_identity(model.backbone)))
    if manifest.get("backbone") not in (None, built):
        raise RunFolderError(f"{run_dir} was trained on the backbone {manifest['backbone']}, but the one built from "
                             f"its settings is {built}; its run.json is inconsistent")
    selector, domains = load_selector(Path(run_dir) / snapshot) if routed else (None, completed)
    for d in domains:
        model.add_domain(d, load_module(module_path(run_dir, d, weights), model.backbone, model.kind)
                         if d in with_module else None)
    model.selector = None if selector is None else selector.to(device)
    model.routes = routed  # without a selector: one shared module, whose latest snapshot segments
    if len(completed) < len(manifest["order"]):
        log.warning("%s is unfinished: only %s of %s are done (train.py --resume %s continues it)", run_dir,
                    completed, manifest["order"], run_dir)
    return model


def _check_weights(run_dir: Path, manifest: Dict, run_cfg: Config) -> None:
    """The backbone weights about to be loaded must be those the run was trained on (a missing
    file is left to build_model, which names it and the fix)."""
    path = _checkpoint_path(run_cfg)
    if path is not None and not path.is_file():
        return
    check_same_checkpoint(run_dir, manifest.get("checkpoint"), _checkpoint_identity(run_cfg))


def run_info(run_dir: Path, cfg: Config) -> Tuple[Dict, Path]:
    """(manifest, folder for test outputs) of a run folder or of a release-style folder."""
    if is_release_folder(run_dir):
        return release_manifest(Path(run_dir), cfg.domains, cfg.unseen), report_dir_for(run_dir, Path(cfg.output_dir))
    return read_manifest(run_dir), Path(run_dir)


def test(run_dir: Path, cfg: Config, device: torch.device, with_vanilla: bool = True,
         output: Optional[Path] = None, save_overlays: int = 0) -> Dict:
    """Route every test image of every domain of the run's order; write and print the report.

    Works on a run folder of this project and on a release-style folder (whose
    report goes to ``<output_dir>/release_<folder name>/``, the folder itself being
    read-only data). ``save_overlays``: that many pictures per domain in the report
    folder's ``overlays/`` (prediction, ground truth, points, the routed domain).
    """
    run_dir = Path(run_dir)
    setup_logging(None, hold=True)  # the log file only once the folder and the weights passed verification
    manifest, report_dir = run_info(run_dir, cfg)
    check_amp(cfg.amp, device)
    model = load_run(run_dir, cfg, device)
    method = METHODS.get(manifest.get("config", {}).get("method", "samcl"))(cfg, model, device)
    setup_logging(report_dir, "test_log.txt")
    test_map = read_domain_map(Path(cfg.test_json), Path(cfg.data_root))
    order = manifest["order"]
    missing = [d for d in order if d not in test_map]
    if missing:
        raise RunFolderError(f"{cfg.test_json} has no test split for {missing}")
    results = {}
    for d in order:
        ds = SegmentationSplit(test_map[d], model.backbone.img_size, cfg.mask_binarize, cfg.mask_threshold, d)
        loader = make_loader(ds, cfg.eval_batch_size, False, 0, cfg.num_workers, device)
        res = evaluate_split(model, loader, device, method.segment, routed=method.routes, with_vanilla=with_vanilla,
                             desc=f"test {d}", amp=cfg.amp)
        res["selector_accuracy"] = selector_accuracy(res.get("selector_counts", {}), d)
        res["trained"] = d in model.modules_by_domain
        results[d] = res
        if save_overlays > 0:
            save_test_overlays(model, ds, range(min(save_overlays, len(ds))), report_dir / OVERLAY_DIR, cfg.amp)
    report = {"format": "samcl-test", "run_dir": str(run_dir), "domains": order,
              "unseen": manifest["unseen"], "selector_domains": model.domains, "results": results,
              "config": cfg.to_dict(), "versions": package_versions()}
    write_json(output or report_dir / TEST_METRICS_FILE, report)
    print(format_table(report, _train_summary(run_dir)))
    return report


@torch.no_grad()
def save_test_overlays(model: SAMCLModel, split: SegmentationSplit, indices, folder: Path, amp: str = "off") -> None:
    """Pictures of test images: the routed prediction resized to the image's own size, the ground
    truth's outline, the points, and the routed domain and IoU in a caption (``<domain>_<image>.png``)."""
    folder.mkdir(parents=True, exist_ok=True)
    device = model.device
    for i in indices:
        item = split[i]
        img_path, mask_path = split.pairs[i]
        image = np.asarray(read_image(img_path))
        truth = binarize_mask(np.asarray(read_image(mask_path, gray=True)), split.mask_binarize,
                              split.mask_threshold).astype(bool)
        h, w = image.shape[:2]
        with autocast(amp, device):
            out = model.predict(item["image"][None].to(device).float(), item["points"][None].to(device),
                                item["labels"][None].to(device))
        logits = F.interpolate(out["logits"].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        mask = (logits > 0).cpu().numpy()
        k = int(out["choice"][0])
        iou = per_image_metrics(out["logits"].float(), item["mask"][None].to(device))["iou"].item()
        scale = np.array([w / model.backbone.img_size, h / model.backbone.img_size])
        caption = f"{split.domain}/{img_path.name}: routed to {'vanilla' if k < 0 else model.domains[k]}, IoU {iou:.3f}"
        overlay(image, mask, item["points"].numpy() * scale, item["labels"].tolist(), caption, truth).save(
            folder / f"{split.domain}_{img_path.stem}.png")


def _train_summary(run_dir: Path) -> Optional[Dict]:
    p = Path(run_dir) / METRICS_FILE
    if not p.is_file():
        return None
    steps = json.loads(p.read_text()).get("steps", [])
    return steps[-1]["summary"] if steps else None


def _f(v: Optional[float], pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "   n/a"
    return f"{v * 100:6.2f}" if pct else f"{v:6.4f}"


def format_table(report: Dict, summary: Optional[Dict] = None) -> str:
    """The per-domain table test.py prints."""
    lines: List[str] = []
    head = f"{'domain':<10} {'module':<8} {'IoU':>6} {'F1':>6} {'MAE':>6} {'vanilla IoU':>11} {'selector':>8}  routed to"
    lines += [head, "-" * len(head)]
    for d in report["domains"]:
        r = report["results"][d]
        m, v = r["metrics"], r.get("vanilla", {})
        lines.append(f"{d:<10} {'trained' if r['trained'] else 'vanilla':<8} {_f(m['iou'])} {_f(m['f1'])} "
                     f"{_f(m['mae'])} {_f(v.get('iou')):>11} {_f(r['selector_accuracy'], True):>7}%  "
                     + ", ".join(f"{k}:{c}" for k, c in r.get("selector_counts", {}).items() if c))
    lines.append("-" * len(head))
    if summary:
        for m in METRICS:
            s = summary[m]
            lines.append(f"continual ({m:>3}): AA {_f(s['AA'])}  FM {_f(s['FM'])}  FT {_f(s['FT'])}"
                         "   (after the last training step; metrics.json has every step)")
    return "\n".join(lines)
