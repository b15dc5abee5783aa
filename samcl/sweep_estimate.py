"""``samcl.sweep --dry_run``: a sweep's plan and what it costs, in device-hours, before anything runs.

hours = sum over runs of (training images / training throughput + evaluated images / evaluation
throughput) / 3600; the images are counted in the splits the plan's maps name, the throughput
measured here (:func:`measure`: a one-epoch run of each method on generated images) or given
(``--images_per_second``). docs/sweep.md says what it leaves out.
"""
import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from .cli import CLIError
from .sweep_plan import Plan, Run

if TYPE_CHECKING:
    import torch

log = logging.getLogger("samcl.sweep")

TRAINS_NOTHING = ("zeroshot",)  # methods whose steps train no module (the estimate counts no training images)


def image_counts(plan: Plan, assume: Optional[int] = None) -> Dict[str, Dict[str, Optional[int]]]:
    """Domain -> {"train": n, "test": n}: the images of each split the plan's maps name (the first
    run's data root); a split not found: ``assume`` (None: unknown)."""
    from .data import DataError, pair_split, read_domain_map

    s = plan.runs[0].settings
    counts: Dict[str, Dict[str, Optional[int]]] = {d: {} for d in plan.orders[0]}
    for split, key in (("train", "train_json"), ("test", "test_json")):
        try:
            folders = read_domain_map(Path(s[key]), Path(s["data_root"]))
        except DataError:
            folders = {}
        for d in counts:
            try:
                counts[d][split] = len(pair_split(folders[d]))
            except (KeyError, DataError, OSError):
                counts[d][split] = assume
    return counts


def run_images(r: Run, order: Sequence[str], unseen: Sequence[str],
               counts: Dict[str, Dict[str, Optional[int]]]) -> Tuple[Optional[int], Optional[int]]:
    """(training images, evaluated images) of one run: every epoch's images of every trained domain
    (none for a method that trains nothing); after each step t the test splits of domains 0 .. t+1
    (the next one for forward transfer), as the protocol evaluates them."""
    trained = [d for d in order if d not in unseen]
    train = [counts[d]["train"] for d in trained]
    n_train = None if None in train else 0 if r.method in TRAINS_NOTHING else r.settings["epoch"] * sum(train)
    evaluated = [order[j] for t in range(len(order)) for j in range(min(len(order) - 1, t + 1) + 1)]
    test = [counts[d]["test"] for d in evaluated]
    return n_train, None if None in test else sum(test)


def measure(plan: Plan, device: "torch.device", steps: int = 2) -> Dict[str, Tuple[float, float]]:
    """Method -> (training images/s, evaluated images/s), from a one-domain, one-epoch run of each
    method with its first run's settings (random weights) on ``steps`` batches of generated images."""
    from . import pipeline
    from .config import build_config
    from .demo import make_demo_data
    from .run_folder import setup_logging

    speeds = {}
    with tempfile.TemporaryDirectory(prefix="samcl-measure-") as tmp:
        root = Path(tmp)
        for m in plan.methods:
            r = next(r for r in plan.runs if r.method == m)
            s = r.settings
            n_test = s["eval_batch_size"]
            make_demo_data(root / m, n_train=steps * s["batch_size"], n_test=n_test)
            cfg = build_config([("--measure", {**s, "data_root": str(root / m), "random_weights": True,
                                               "train_json": str(root / m / "datasets_train.json"),
                                               "test_json": str(root / m / "datasets_test.json"),
                                               "order": "polyp", "unseen": [], "epoch": 1, "val_every": 0,
                                               "num_workers": 0, "run_dir": str(root / m / "run")})])
            pipeline.train(cfg, device)
            setup_logging(None)
            step = json.loads((root / m / "run" / "metrics.json").read_text())["steps"][0]
            train_s = step["training_seconds"]
            eval_s = max(step["seconds"] - train_s, 1e-9)
            # a method that trains nothing (zeroshot) has no training throughput to measure
            speeds[m] = (steps * s["batch_size"] / train_s if train_s > 0 else None, n_test / eval_s)
            log.info("measured %s on %s: %.3g training images/s, %.3g evaluated images/s", m, device, *speeds[m])
    return speeds


def estimate(plan: Plan, counts: Dict[str, Dict[str, Optional[int]]],
             speeds: Dict[str, Tuple[Optional[float], float]]) -> List[Dict[str, Any]]:
    """Per method: runs, training and evaluated images, device-hours (training images / training
    throughput + evaluated images / evaluation throughput, summed over its runs)."""
    rows = []
    for m in plan.methods:
        runs = [r for r in plan.runs if r.method == m]
        images = [run_images(r, plan.orders[r.order], plan.unseen, counts) for r in runs]
        train = None if any(i[0] is None for i in images) else sum(i[0] for i in images)
        evaluated = None if any(i[1] is None for i in images) else sum(i[1] for i in images)
        ips_train, ips_eval = speeds[m]
        training_s = 0.0 if train == 0 else None if train is None or ips_train is None else train / ips_train
        hours = None if training_s is None or evaluated is None else (training_s + evaluated / ips_eval) / 3600
        rows.append({"method": m, "runs": len(runs), "train_images": train, "eval_images": evaluated,
                     "train_ips": ips_train, "eval_ips": ips_eval, "hours": hours})
    return rows


def dry_run_text(plan: Plan, output: Path, counts: Dict[str, Dict[str, Optional[int]]],
                 rows: Sequence[Dict[str, Any]], source: str) -> str:
    """The plan and the estimate as printed by --dry_run."""
    def n(v: Optional[float]) -> str:
        return "unknown" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"

    s = plan.runs[0].settings
    lines = [f"sweep {output}: {len(plan.runs)} run(s) = {len(plan.methods)} method(s) x {len(plan.orders)} "
             f"order(s) x {len(plan.seeds)} seed(s); {s['epoch']} epoch(s) per domain, {s['vit_name']} at "
             f"{str(s['img_size']) + ' px' if s.get('img_size') else 'its default input size'}, batch "
             f"{s['batch_size']}",
             f"methods: {', '.join(plan.methods)}", f"seeds: {', '.join(map(str, plan.seeds))}"]
    lines += [f"order{k}: {' '.join(o)}" for k, o in enumerate(plan.orders)]
    lines.append("images (train/test): " + ", ".join(f"{d} {n(c['train'])}/{n(c['test'])}" for d, c in counts.items()))
    lines.append(f"throughput: {source}")
    lines.append(f"{'method':<12} {'runs':>4} {'train images':>14} {'eval images':>12} {'train img/s':>11} "
                 f"{'eval img/s':>10} {'device-hours':>12}")
    for r in rows:
        train_ips = "-" if r["train_images"] == 0 else n(r["train_ips"])
        lines.append(f"{r['method']:<12} {r['runs']:>4} {n(r['train_images']):>14} {n(r['eval_images']):>12} "
                     f"{train_ips:>11} {n(r['eval_ips']):>10} {n(r['hours']):>12}")
    hours = [r["hours"] for r in rows]
    total = None if None in hours else sum(hours)
    lines.append(f"total: {n(total)} device-hour(s) for {len(plan.runs)} run(s) (one device per run); "
                 f"images / throughput, see docs/sweep.md")
    return "\n".join(lines)


def dry_run(plan: Plan, output: Path, args: argparse.Namespace) -> str:
    """--dry_run: the plan and its cost, from --images_per_second or --measure; nothing is trained."""
    counts = image_counts(plan, args.assume_images)
    if args.measure:
        from .cli import resolve_device

        device = resolve_device(args.cuda, args.device)
        speeds = measure(plan, device)
        source = f"measured on {device} (--measure: a one-epoch run of each method, random weights)"
    elif args.images_per_second:
        speeds = {m: (args.images_per_second, args.images_per_second) for m in plan.methods}
        source = f"--images_per_second {args.images_per_second} for training and evaluation alike"
    else:
        raise CLIError("--dry_run estimates the cost from a throughput: pass --measure (times each method here) "
                       "or --images_per_second N")
    return dry_run_text(plan, output, counts, estimate(plan, counts, speeds), source)
