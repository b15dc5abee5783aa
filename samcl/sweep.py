"""Several continual methods over several domain orders and seeds, under one protocol, summarised.

    python -m samcl.sweep --methods samcl,finetune,er --orders 3 --seeds 2 --cuda 0
    python -m samcl.sweep --methods zeroshot,finetune,samcl,joint --orders 2 --seeds 1 \\
        --config configs/demo_sam.yaml --data_root demo_output --device cpu --set epoch=2
    torchrun --nproc_per_node 4 -m samcl.sweep --methods samcl,finetune --orders 3 --seeds 3 --cuda -1

The plan. Orders: order0 is the configured order (its trained domains in their configured order);
order1 .. order<K-1> are random permutations of the trained domains, drawn one after the other
with numpy.random.default_rng(--order_seed).permutation, a drawing equal to an order already
taken being drawn again (so the first K orders of a larger K are the same). The unseen (test-only)
domains always come last, in their configured order. Seeds: the configured seed s (or --seed) and
s+1, ..., s+S-1. Every method runs every order with every seed.

Settings per method: with --config FILE, that file for every method with its `method` replaced;
without,
configs/baselines/<method>.yaml, and for samcl configs/samcl_lora_vit_b.yaml (the LoRA module the
baselines train). The flags below (--set and the explicit ones) override every method's
file; the sweep sets each run's method, order, unseen domains, seed and run folder itself, and the
learning module of a method that trains a kind of its own (olora, prompt_pool for l2p).

The folder (--output, default sweeps/<config>_<methods>_o<K>_s<S>):

    sweep.json             the plan: methods, orders (lists of domains), seeds, each run's settings
    sweep_log.txt          what the sweep did (trained, resumed, skipped)
    <method>/order<k>_seed<s>/   an ordinary run folder (train.py --resume continues it by hand)
    summary.md, summary.csv      one row per method: its finished runs, mean and std over orders x seeds
                           of every column of samcl.compare (summary.csv: <metric>_<column>_mean/_std,
                           e.g. iou_FM_max_mean; the columns are defined in docs/metrics.md)
    summary.png            AA, FM and the unseen domains' score (IoU, the vanilla score beside it) per
                           method with std error bars; the IoU accuracy matrix of one run per method
                           (the first finished one in the plan's order)

Calling the same sweep again skips the runs whose run.json says every domain of the order is
done, resumes the unfinished ones (from their last finished domain and saved epoch) and starts the
missing ones. A different plan (methods, orders, seeds, or any setting but those a resume may
change: data paths, workers, feature cache) into a folder holding a sweep.json is refused: use
another --output. A folder without sweep.json is taken over: run folders already at the planned
places must hold the planned settings (checked as train.py --resume checks them).

Under torchrun (--cuda -1) the process group is joined once and every run uses all its processes;
only rank 0 writes sweep.json, the sweep's log and the summary.

With --launcher local --parallel K (K runs at once here, one GPU each) or --launcher slurm (one
SLURM job per run, through submitit) the runs are independent jobs (samcl/sweep_launch.py);
--status FOLDER, --summarise FOLDER and --dry_run (the cost in device-hours): docs/sweep.md.

The summary is rewritten after every run that trained, so an interrupted sweep has one of what
finished (a run counts once every domain of its order is done). Each run contributes the summary
after its last step (metrics.json, read by samcl.compare.summarise, which also gives the stored MB
per trained domain and the training seconds); std is the sample standard deviation (n-1; 0 for
one run); a value some run lacks (n/a, e.g. FT with one trained domain) is n/a for the method.
"""
import argparse
import csv
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from .cli import CLIError, Parser, explained_errors, resolve_device
from .commands.train import training_processes
from .data import domain_map_file
from . import sweep_launch
from .sweep_launch import SweepOps, add_launch_flags
from .sweep_plan import PLAN_FILE, Plan, Run, check_plan, default_output, make_plan

if TYPE_CHECKING:
    import torch

log = logging.getLogger("samcl.sweep")

LOG_FILE = "sweep_log.txt"
SUMMARY = "summary"  # summary.md, summary.csv, summary.png
# samcl.compare.SUMMARY (compare imports torch; --help must not): the release's AA/FM/FT, then the
# canonical columns (docs/metrics.md)
SUMMARY_KEYS = ("AA", "FM", "FT", "FM_max", "BWT", "FWT", "AIA", "unseen", "unseen_vanilla")
# the summary's numeric columns: (row key of samcl.compare.summarise, markdown heading)
COLUMNS = [(f"{m}_{k}", f"{name} {k.replace('_vanilla', ' vanilla')}")
           for m, name in (("iou", "IoU"), ("f1", "F1"), ("mae", "MAE")) for k in SUMMARY_KEYS] + [
    ("stored_mb_per_domain", "MB/domain"), ("training_seconds", "train s")]


# ----------------------------------------------------------------------------- running it
def run_status(run_dir: Path, order: Sequence[str]) -> str:
    """'missing' (no run.json), 'done' (every domain of ``order`` finished) or 'unfinished'."""
    from .run_folder import MANIFEST, RunFolderError, read_manifest

    if not (Path(run_dir) / MANIFEST).is_file():
        return "missing"
    manifest = read_manifest(run_dir)
    if list(manifest["order"]) != list(order)[: len(manifest["order"])]:
        raise RunFolderError(f"{run_dir} holds a run over {manifest['order']}, which the planned order {list(order)} "
                             f"does not start with; move it away or pass another --output")
    return "done" if list(manifest["completed"]) == list(order) else "unfinished"


def _sweep_log(folder: Path, main: bool) -> None:
    """The sweep's own log file beside its runs (the runs' loggers write their own folders')."""
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(folder / LOG_FILE)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)


def open_sweep(plan: Plan, output: Path) -> None:
    """Check the plan against ``output`` (and every method's plugins), write sweep.json, open the sweep's log."""
    from . import distributed as dist
    from .plugins import check_plugins
    from .run_folder import setup_logging, write_json

    output = Path(output)
    setup_logging(None, main=dist.is_main())
    for r in plan.runs:  # every method and module known and fitting before anything is written
        check_plugins(r.config())
    check_plan(output, plan)  # every rank reads the old plan before rank 0 replaces it
    dist.barrier()
    _sweep_log(output, dist.is_main())
    if dist.is_main():
        write_json(output / PLAN_FILE, plan.to_dict())
        log.info("sweep %s: %d run(s): methods %s, %d order(s), seeds %s", output, len(plan.runs), plan.methods,
                 len(plan.orders), plan.seeds)
    dist.barrier()


def check_run(output: Path, r: Run, order: Sequence[str]) -> str:
    """:func:`run_status` of a planned run, whose folder (if any) must hold the planned settings."""
    from . import pipeline
    from .run_folder import RunFolderError

    try:
        status = run_status(Path(output) / r.folder, order)
        if status != "missing":
            pipeline.resume_config(Path(output) / r.folder, r.settings)  # refuses other settings than planned
    except RunFolderError as e:
        raise RunFolderError(f"the sweep's run {r.folder}: {e}") from None
    return status


def advance_run(output: Path, r: Run, order: Sequence[str], device: "torch.device", what: str) -> bool:
    """Train, resume or skip (finished) one planned run; whether it trained. ``what`` names it in the log."""
    from . import distributed as dist
    from . import pipeline
    from .run_folder import setup_logging

    run_dir = Path(output) / r.folder
    status = check_run(output, r, order)
    if status == "done":
        log.info("%s: skipped, %s is finished", what, run_dir)
        return False
    log.info("%s: %s %s", what, "training" if status == "missing" else "resuming", run_dir)
    if status == "missing":
        pipeline.train(r.config(), device)
    else:
        pipeline.resume(run_dir, r.settings, device)
    setup_logging(None, main=dist.is_main())  # the run's log file closes with the run
    return True


def run_sweep(plan: Plan, output: Path, device: "torch.device") -> List[Dict[str, Any]]:
    """Train, resume or skip every run of ``plan`` in ``output``; returns the summary's rows."""
    from . import distributed as dist

    output = Path(output)
    open_sweep(plan, output)
    rows: List[Dict[str, Any]] = []
    for i, r in enumerate(plan.runs, 1):
        order = plan.orders[r.order]
        what = f"[{i}/{len(plan.runs)}] {r.method} order{r.order} {'_'.join(order)} seed {r.seed}"
        if not advance_run(output, r, order, device, what):
            continue
        if dist.is_main():
            rows = write_summary(plan, output)
        dist.barrier()
    if dist.is_main():
        rows = write_summary(plan, output)
        log.info("sweep %s: %d of %d run(s) finished; summary in %s", output, sum(r["runs"] for r in rows),
                 len(plan.runs), output / f"{SUMMARY}.md")
    _sweep_log(output, False)  # closes the sweep's log file
    return rows


# ----------------------------------------------------------------------------- the summary
def _mean_std(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample std (n-1; 0 for one value); None if there is none or one is missing."""
    if not values or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None, None
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def finished_runs(plan: Plan, output: Path, method: str) -> List[Run]:
    """``method``'s runs whose every domain is done, in the plan's order."""
    return [r for r in plan.runs if r.method == method
            and run_status(Path(output) / r.folder, plan.orders[r.order]) == "done"]


def summary_rows(plan: Plan, output: Path) -> Tuple[List[Dict[str, Any]], Dict[str, Tuple[str, Dict]]]:
    """One row per method (mean and std of each column over its finished runs), and the accuracy
    matrix (metrics.json's) of the first finished run of each method, with that run's folder."""
    from .compare import summarise

    rows, matrices = [], {}
    for m in plan.methods:
        done = finished_runs(plan, output, m)
        per_run = [summarise(Path(output) / r.folder) for r in done]
        row: Dict[str, Any] = {"method": m, "module": per_run[0]["module"] if per_run else None, "runs": len(done)}
        for key, _ in COLUMNS:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([p[key] for p in per_run])
        rows.append(row)
        if done:
            metrics = json.loads((Path(output) / done[0].folder / "metrics.json").read_text())
            matrices[m] = (done[0].folder, metrics["accuracy_matrix"])
    return rows, matrices


def _cell(mean: Optional[float], std: Optional[float], digits: int) -> str:
    return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    """The summary as a markdown table: mean ± std per column."""
    heads = ["method", "module", "runs"] + [h for _, h in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [r["method"], r["module"] or "n/a", str(r["runs"])]
        cells += [_cell(r[f"{k}_mean"], r[f"{k}_std"], 1 if k == "training_seconds" else 4) for k, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routing_gap(rows: Sequence[Dict[str, Any]]) -> str:
    """What the selector's errors cost: IoU AA of samcl:oracle minus that of every other samcl routing
    in the sweep (a line each; empty without the oracle)."""
    aa = {r["method"]: r["iou_AA_mean"] for r in rows if r["method"].split(":")[0] == "samcl"}
    oracle = aa.get("samcl:oracle")
    lines = [f"- {m}: {oracle - v:+.4f}\n" for m, v in aa.items() if m != "samcl:oracle" and None not in (v, oracle)]
    return "\nRouting gap, IoU AA of samcl:oracle minus:\n\n" + "".join(lines) if lines else ""


def write_summary(plan: Plan, output: Path) -> List[Dict[str, Any]]:
    """summary.md, summary.csv and summary.png of the runs finished so far."""
    from .io import atomic_write_text

    output = Path(output)
    rows, matrices = summary_rows(plan, output)
    table = markdown(rows)
    atomic_write_text(output / f"{SUMMARY}.md",
                      f"# Sweep {output.name}\n\nMean ± sample std (n-1) over each method's finished runs "
                      f"({len(plan.orders)} order(s) x {len(plan.seeds)} seed(s) planned), after each run's last "
                      f"step. Orders:\n\n" + "".join(f"- order{k}: {' '.join(o)}\n" for k, o in enumerate(plan.orders))
                      + f"\nSeeds: {', '.join(map(str, plan.seeds))}\n\n{table}\n{routing_gap(rows)}")
    with open(output / f"{SUMMARY}.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (output / f"{SUMMARY}.csv.tmp").replace(output / f"{SUMMARY}.csv")
    try:
        from .pictures import draw_sweep

        draw_sweep(rows, matrices, output / f"{SUMMARY}.png", output.name)
    except Exception as e:  # noqa: BLE001 (a picture is derived data: it never ends a sweep)
        log.warning("%s could not be drawn (%s: %s)", output / f"{SUMMARY}.png", type(e).__name__, e)
    return rows


# the launchers' jobs call these by name (samcl.sweep, also when this file runs as __main__)
SWEEP_OPS = SweepOps(check="samcl.sweep:check_run", advance="samcl.sweep:advance_run",
                     summarise="samcl.sweep:write_summary")


# ----------------------------------------------------------------------------- command line
def parse_set(items: Sequence[str]) -> Dict[str, Any]:
    """``--set KEY=VALUE`` items as settings, each VALUE read as YAML (2, 0.1, true, [a, b], text)."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--set {item!r}: expected KEY=VALUE, e.g. --set epoch=2")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CLIError(f"--set {item!r}: the value is not readable ({str(e).splitlines()[0]})") from None
    return out


def build_parser() -> Parser:
    p = Parser(prog="python -m samcl.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", metavar="M1,M2,...",
                   help="continual methods joined by ',' (names registered in samcl/methods, e.g. "
                        "samcl,finetune,joint,zeroshot); a named variant is method:value, e.g. samcl:oracle, "
                        "samcl:ncm (--selector), merge:ties (--merge), in folder samcl-oracle/...")
    p.add_argument("--orders", type=int, default=1, metavar="K",
                   help="domain orders per method and seed: the configured one and K-1 random ones (default 1)")
    p.add_argument("--seeds", type=int, default=1, metavar="S",
                   help="seeds per method and order: the configured seed (or --seed) and the next S-1 integers "
                        "(default 1)")
    p.add_argument("--order_seed", type=int, default=0, metavar="N",
                   help="seed of numpy.random.default_rng that draws the random orders (default 0; independent "
                        "of the training seeds)")
    p.add_argument("--config", metavar="FILE",
                   help="YAML settings for every method, its method replaced (e.g. configs/demo_sam.yaml); default: "
                        "configs/baselines/<method>.yaml, for samcl configs/samcl_lora_vit_b.yaml")
    p.add_argument("--output", type=Path, metavar="DIR",
                   help="the sweep folder (default sweeps/<config file's name, or baselines>_<methods>_o<K>_s<S>)")
    p.add_argument("--device", help="torch device: cpu or cuda:N (default GPU 0 if available, else CPU)")
    p.add_argument("--cuda", type=int, metavar="N",
                   help="GPU index (overridden by --device); -1: every run on all processes of torchrun, one "
                        "device each (torchrun --nproc_per_node P -m samcl.sweep ... --cuda -1)")
    g = p.add_argument_group("settings", "over every method's file; an explicit flag wins over --set of the same "
                                         "setting (the sweep sets method and run folder itself)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting of samcl/config.py, the value read as YAML (repeat it: --set epoch=2 "
                        "--set feature_cache=off); --set order/unseen/seed act as the flags below")
    g.add_argument("--order", help="the configured order: domain keys joined by '_' (order0; the others permute "
                                   "its trained domains)")
    g.add_argument("--unseen", nargs="*", help="test-only domains of the order (last in every order)")
    g.add_argument("--seed", type=int, help="the first seed (default: the configured seed; the methods' files "
                                            "must agree on it, as on order and unseen, or these flags decide)")
    g.add_argument("--data_root", help="folder the JSON maps' paths are relative to")
    g.add_argument("--epoch", type=int, help="epochs per domain")
    g.add_argument("--batch_size", type=int, help="images per training batch")
    g.add_argument("--num_workers", type=int, help="data-loading worker processes")
    g.add_argument("--grid", action="append", default=[], metavar="KEY=v1,v2,...",
                   help="tune a setting first (repeat it for a product): every point trains on the first order and "
                        "seed on each training split less a held-out part and is scored there; each method's best "
                        "(AA of IoU, ties FM) is written to <output>/grid/ and used for every run "
                        "(docs/validation.md); it runs in this process before any launcher")
    add_launch_flags(p)
    return p


EXPLICIT = ("order", "unseen", "seed", "data_root", "epoch", "batch_size", "num_workers")


def plan_from_args(args: argparse.Namespace) -> Tuple[Plan, Path]:
    """The plan and the sweep folder of the parsed command line (explicit flags win over --set)."""
    settings = parse_set(args.set)
    sources = {k: f"--set {k}" for k in settings}
    for k in EXPLICIT:
        if getattr(args, k) is not None:
            settings[k], sources[k] = getattr(args, k), f"--{k}"
    methods = [m.strip() for m in args.methods.split(",")]
    output = args.output or default_output(args.config, methods, args.orders, args.seeds)
    with explained_errors():
        plan = make_plan(methods, args.orders, args.seeds, output, args.config, settings, sources, args.order_seed)
    for r in plan.runs:  # the maps under each run's data root, named by absolute path (docs/data.md)
        for key in ("train_json", "test_json"):
            r.settings[key] = str(domain_map_file(r.settings[key], r.settings["data_root"]))
    return plan, output


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.job or args.status or args.summarise:
        return sweep_launch.inspect_or_job(args, SWEEP_OPS)
    if not args.methods:
        raise CLIError("--methods is required (or --status / --summarise FOLDER)")
    plan, output = plan_from_args(args)
    from .sweep_grid import parse_grid, run_grid

    with explained_errors():
        grid = parse_grid(args.grid)
    if args.dry_run:
        return sweep_launch.launch(plan, output, args, SWEEP_OPS)
    # torch and the backbones only now, once the flags and the plan passed
    from . import distributed

    if args.launcher != "serial":  # the grid's points first, here; then the runs through the launcher
        if grid:
            with training_processes():
                plan = run_grid(plan, grid, output, resolve_device(args.cuda, args.device))
        return sweep_launch.launch(plan, output, args, SWEEP_OPS)
    with training_processes():
        device = resolve_device(args.cuda, args.device)
        if grid:
            plan = run_grid(plan, grid, output, device)
        rows = run_sweep(plan, output, device)
        main_rank = distributed.is_main()
    if main_rank:
        print(markdown(rows))
        print(f"\nwrote {output / (SUMMARY + '.md')}, {SUMMARY}.csv and {SUMMARY}.png")
    return 0


if __name__ == "__main__":
    from .cli import run_script

    run_script(main)
