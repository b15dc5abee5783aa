"""What train.py and test.py do, as functions (the scripts only parse flags)."""
import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as dist
from . import methods  # noqa: F401  (registers the methods)
from .config import FAMILY_NAMES, SCRIPTS, Config, build_config
from .continual import RESUMABLE_SETTINGS, ContinualTrainer
from .data import SegmentationSplit, binarize_mask, domain_map_file, read_domain_map, read_image
from .evaluation import evaluate_split, selector_accuracy
from .io import add_note
from .loading import make_loader
from .memory import check_memory
from .metrics import METRICS, per_image_metrics
from .model import ModuleBank
from .pictures import overlay
from .opening import build_model, config_checkpoint_identity, open_with
from .precision import autocast, check_amp
from .registry import METHODS
from .run_folder import (MANIFEST, METRICS_FILE, TEST_METRICS_FILE, RunFolderError, package_versions, read_manifest,
                         setup_logging, write_json)

log = logging.getLogger("samcl.pipeline")
OVERLAY_DIR = "overlays"


def _run_continual(cfg: Config, device: torch.device, run_dir: Path, notices: Tuple[str, ...] = (),
                   **trainer_options) -> Dict:
    """Build the model and run the protocol into ``run_dir``; the log file is opened only once
    the backbone, the data and the folder check out (a failed start leaves nothing behind), and
    starts with what was logged before (``notices`` first). An error once the folder holds the run
    says how to continue it."""
    setup_logging(None, main=dist.is_main(), hold=True)
    for notice in notices:
        log.warning(notice)
    model = build_model(cfg, device)
    trainer = ContinualTrainer(cfg, model, device, run_dir, checkpoint=config_checkpoint_identity(cfg),
                               **trainer_options)
    setup_logging(run_dir, main=dist.is_main())
    log.info("run folder %s on %s (%d process(es))", run_dir, device, dist.world_size())
    try:
        metrics = trainer.run()
    except (ValueError, OSError) as e:  # the errors a user can fix: after the fix, --resume goes on
        add_note(e, continue_hint(cfg, run_dir))
        raise
    log.info("done: %s", run_dir)
    return metrics


def continue_hint(cfg: Config, run_dir: Path) -> str:
    """What to run once the cause of a stop is fixed: the run folder keeps every finished domain and
    the last saved epoch of the one in progress."""
    script = SCRIPTS[cfg.backbone, "train"]
    return (f"the run folder {run_dir} keeps every finished domain and the last saved epoch; once this is fixed, "
            f"continue it with: python {script} --resume {run_dir} (or start it over: the same command with "
            f"--overwrite)")


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


def resume(run_dir: Path, overrides: Dict, device: torch.device, family: Optional[str] = None) -> Dict:
    """Continue an interrupted run, or add the new domains of a longer ``--order`` to a finished one.
    The run keeps its own backbone: ``family``, the resuming script's, is only compared with it and
    a difference said first."""
    cfg = resume_config(run_dir, overrides)
    notices = ()
    if family is not None and family != cfg.backbone:
        called, own = SCRIPTS[family, "train"], SCRIPTS[cfg.backbone, "train"]
        notices = (f"{run_dir} is a {FAMILY_NAMES[cfg.backbone]} run ({cfg.backbone}/{cfg.arch_name}), resumed with "
                   f"{called}: it goes on with its own backbone ({own} is its script)",)
    return _run_continual(cfg, device, Path(run_dir), notices, resume=True)


def load_run(run_dir: Path, cfg: Config, device: torch.device) -> ModuleBank:
    """Model of a run folder or a release folder, opened as test.py opens it with ``cfg``
    (:func:`samcl.opening.open_with`: ``cfg`` supplies the weights; the run keeps its own settings)."""
    return open_with(run_dir, cfg, device).model


def test(run_dir: Path, cfg: Config, device: torch.device, with_vanilla: bool = True,
         output: Optional[Path] = None, save_overlays: int = 0) -> Dict:
    """Route every test image of every domain of the run's order; write and print the report.

    The run is opened by :func:`samcl.opening.open_with` and segments with its own method and
    settings; ``cfg`` supplies the backbone weights, the data, batch size, workers, precision and
    mask binarisation. Works on a run folder of this project and on a release-style folder (whose
    report goes to ``<output_dir>/release_<folder name>/``, the folder itself being
    read-only data). ``save_overlays``: that many pictures per domain in the report
    folder's ``overlays/`` (prediction, ground truth, points, the routed domain).
    """
    run_dir = Path(run_dir)
    setup_logging(None, hold=True)  # the log file only once the folder and the weights passed verification
    check_amp(cfg.amp, device)
    run = open_with(run_dir, cfg, device)
    model, manifest, report_dir = run.model, run.manifest, run.report_dir
    check_memory(cfg, model, device, training=False)  # before the report folder's log file
    method = METHODS.get(run.config.method)(run.config, model, device)  # the run's method, as it was trained
    setup_logging(report_dir, "test_log.txt")
    test_map = read_domain_map(Path(cfg.test_json), Path(cfg.data_root))
    order = manifest["order"]
    missing = [d for d in order if d not in test_map]
    if missing:
        raise RunFolderError(f"{domain_map_file(cfg.test_json, cfg.data_root)} has no test split for {missing}")
    results = {}
    for d in order:
        ds = SegmentationSplit(test_map[d], model.backbone.img_size, cfg.mask_binarize, cfg.mask_threshold, d)
        loader = make_loader(ds, cfg.eval_batch_size, False, 0, cfg.num_workers, device)
        res = evaluate_split(model, loader, device, method.segment, routed=method.routes, with_vanilla=with_vanilla,
                             desc=f"test {d}", amp=cfg.amp)
        res["selector_accuracy"] = selector_accuracy(res.get("selector_counts", {}), d,
                                                     res.get("selector_untrained", 0))
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
def save_test_overlays(model: ModuleBank, split: SegmentationSplit, indices, folder: Path, amp: str = "off") -> None:
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
        for m in METRICS:  # the canonical columns (docs/metrics.md), in runs that recorded them
            s = summary[m]
            if "FM_max" in s:
                lines.append(f"canonical ({m:>3}): FM_max {_f(s['FM_max'])}  BWT {_f(s['BWT'])}  FWT {_f(s['FWT'])}  "
                             f"AIA {_f(s['AIA'])}  unseen {_f(s['unseen'])} (vanilla {_f(s['unseen_vanilla'])})")
    return "\n".join(lines)
