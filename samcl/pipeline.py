"""What train.py and test.py do, as functions (the scripts only parse flags)."""
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .aug_module import AugModuleSpec
from .backbones import build_backbone
from .config import Config
from .continual import ContinualTrainer, evaluate_split, make_loader, seed_everything, selector_accuracy
from .data import SegmentationSplit, read_domain_map
from .metrics import METRICS
from .model import SAMCLModel
from .run_folder import (SELECTOR_FILE, TEST_METRICS_FILE, RunFolderError, load_module, load_selector,
                         module_path, package_versions, read_manifest, setup_logging, write_json)

log = logging.getLogger("samcl.pipeline")


def build_model(cfg: Config, device: torch.device) -> SAMCLModel:
    """Backbone with its weights, an empty module bank, on ``device``."""
    seed_everything(cfg.seed, cfg.deterministic)
    backbone = build_backbone(cfg)
    spec = backbone.default_aug_spec(cfg.rank)
    if cfg.aug_layers is not None:
        spec = AugModuleSpec(spec.dim, tuple(cfg.aug_layers), spec.neck_channels, spec.rank)
    return SAMCLModel(backbone, spec).to(device)


def train(cfg: Config, device: torch.device, overwrite: bool = False) -> Dict:
    run_dir = cfg.resolved_run_dir()
    setup_logging(run_dir)
    log.info("run folder %s on %s", run_dir, device)
    model = build_model(cfg, device)
    trainer = ContinualTrainer(cfg, model, device, run_dir, overwrite=overwrite)
    metrics = trainer.run()
    log.info("done: %s", run_dir)
    return metrics


def load_run(run_dir: Path, cfg: Config, device: torch.device) -> SAMCLModel:
    """Model of a run folder: its backbone settings, every finished module, the selector.

    ``cfg`` supplies only where the weights are and on which device (the run's own
    architecture, split and orientation are kept).
    """
    manifest = read_manifest(run_dir)
    run_cfg = Config(**{**manifest["config"], "ckpt": cfg.ckpt, "random_weights": cfg.random_weights,
                        "seed": manifest["config"]["seed"]})
    if run_cfg.random_weights and not cfg.random_weights:
        raise RunFolderError(f"{run_dir} was trained on random weights; pass --random_weights to test it")
    model = build_model(run_cfg, device)
    selector, sel_domains = load_selector(Path(run_dir) / SELECTOR_FILE) if (Path(run_dir) / SELECTOR_FILE).is_file() \
        else (None, [])
    if not sel_domains:
        raise RunFolderError(f"{run_dir} has no {SELECTOR_FILE}: no domain finished; nothing to test")
    unseen = set(manifest["unseen"])
    for d in sel_domains:
        model.add_domain(d, None if d in unseen else load_module(module_path(run_dir, d), model.backbone))
    model.selector = selector.to(device)
    if len(sel_domains) < len(manifest["order"]):
        log.warning("%s is unfinished: only %s of %s are done", run_dir, sel_domains, manifest["order"])
    return model


def test(run_dir: Path, cfg: Config, device: torch.device, with_vanilla: bool = True,
         output: Optional[Path] = None) -> Dict:
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    setup_logging(run_dir, "test_log.txt")
    model = load_run(run_dir, cfg, device)
    test_map = read_domain_map(Path(cfg.test_json), Path(cfg.data_root))
    order = manifest["order"]
    missing = [d for d in order if d not in test_map]
    if missing:
        raise RunFolderError(f"{cfg.test_json} has no test split for {missing}")
    results = {}
    for d in order:
        ds = SegmentationSplit(test_map[d], model.backbone.img_size, cfg.mask_binarize, cfg.mask_threshold, d)
        loader = make_loader(ds, cfg.eval_batch_size, False, 0, cfg.num_workers, device)
        res = evaluate_split(model, loader, device, with_vanilla=with_vanilla, desc=f"test {d}")
        res["selector_accuracy"] = selector_accuracy(res["selector_counts"], d)
        res["trained"] = d in model.modules_by_domain
        results[d] = res
    report = {"format": "samcl-test", "run_dir": str(run_dir), "domains": order,
              "unseen": manifest["unseen"], "selector_domains": model.domains, "results": results,
              "config": cfg.to_dict(), "versions": package_versions()}
    write_json(output or run_dir / TEST_METRICS_FILE, report)
    print(format_table(report, _train_summary(run_dir)))
    return report


def _train_summary(run_dir: Path) -> Optional[Dict]:
    from .run_folder import METRICS_FILE
    import json

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
                     + ", ".join(f"{k}:{c}" for k, c in r["selector_counts"].items() if c))
    lines.append("-" * len(head))
    if summary:
        for m in METRICS:
            s = summary[m]
            lines.append(f"continual ({m:>3}): AA {_f(s['AA'])}  FM {_f(s['FM'])}  FT {_f(s['FT'])}"
                         "   (after the last training step; metrics.json has every step)")
    return "\n".join(lines)
