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
    summary.png            AA and FM (IoU) per method with std error bars; the IoU accuracy matrix
                           of one run per method (the first finished one in the plan's order)

Calling the same sweep again skips the runs whose run.json says every domain of the order is
done, resumes the unfinished ones (from their last finished domain and saved epoch) and starts the
missing ones. A different plan (methods, orders, seeds, or any setting but those a resume may
change: data paths, workers, feature cache) into a folder holding a sweep.json is refused: use
another --output. A folder without sweep.json is taken over: run folders already at the planned
places must hold the planned settings (checked as train.py --resume checks them).

Under torchrun (--cuda -1) the process group is joined once and every run uses all its processes;
only rank 0 writes sweep.json, the sweep's log and the summary.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from .cli import CLIError, Parser, explained_errors, resolve_device, training_processes
from .config import CONFIG_DIR, Config, ConfigError, build_config, read_config_file

if TYPE_CHECKING:
    import torch

log = logging.getLogger("samcl.sweep")

PLAN_FILE = "sweep.json"
LOG_FILE = "sweep_log.txt"
SUMMARY = "summary"  # summary.md, summary.csv, summary.png
METRICS = ("iou", "f1", "mae")  # as samcl.metrics.METRICS, without importing torch
STEPS = ("AA", "FM", "FT")
# the summary's numeric columns: (row key of samcl.compare.summarise, markdown heading)
COLUMNS = [(f"{m}_{k}", f"{name} {k}") for m, name in (("iou", "IoU"), ("f1", "F1"), ("mae", "MAE"))
           for k in STEPS] + [("stored_mb_per_domain", "MB/domain"), ("training_seconds", "train s")]
SAMCL_RECIPE = CONFIG_DIR / "samcl_lora_vit_b.yaml"
# set per run by the sweep; not through --set
PLANNED = ("method", "order", "unseen", "seed", "run_dir")


@dataclass
class Run:
    """One run of the plan: ``method`` over ``orders[order]`` with ``seed``, in ``folder`` (relative
    to the sweep folder), with ``settings`` (the whole configuration, Config.to_dict())."""

    method: str
    order: int
    seed: int
    folder: str
    settings: Dict[str, Any]

    def config(self) -> Config:
        return build_config([(f"{PLAN_FILE} run {self.folder}", self.settings)])


@dataclass
class Plan:
    methods: List[str]
    orders: List[List[str]]  # whole orders: the trained domains, then the unseen ones
    unseen: List[str]
    seeds: List[int]
    order_seed: int
    recipes: Dict[str, str]  # method -> the settings file it started from
    runs: List[Run] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"format": "samcl-sweep", "version": 1, "methods": self.methods, "orders": self.orders,
                "unseen": self.unseen, "seeds": self.seeds, "order_seed": self.order_seed, "recipes": self.recipes,
                "runs": [vars(r) for r in self.runs]}


# ----------------------------------------------------------------------------- the plan
def draw_orders(trained: Sequence[str], unseen: Sequence[str], count: int, order_seed: int) -> List[List[str]]:
    """``count`` distinct orders: ``trained`` as given, then random permutations of it drawn with
    ``numpy.random.default_rng(order_seed)`` (a repeated one is drawn again); ``unseen`` last in each."""
    trained = list(trained)
    if count < 1:
        raise ConfigError(f"--orders must be at least 1, got {count}")
    possible = math.factorial(len(trained))
    if count > possible:
        raise ConfigError(f"--orders {count}: the {len(trained)} trained domain(s) {trained} have only {possible} "
                          f"distinct order(s)")
    rng = np.random.default_rng(order_seed)
    orders = [trained]
    while len(orders) < count:
        drawn = [trained[i] for i in rng.permutation(len(trained))]
        if drawn not in orders:
            orders.append(drawn)
    return [o + list(unseen) for o in orders]


def recipe_for(method: str, config: Optional[str]) -> Path:
    """The settings file a method's runs start from (see the module's docstring)."""
    if config is not None:
        return Path(config)
    own = CONFIG_DIR / "baselines" / f"{method}.yaml"
    if own.is_file():
        return own
    if method == "samcl":
        return SAMCL_RECIPE
    raise ConfigError(f"method {method!r} has no recipe {own}; pass --config FILE (used for every method, its "
                      f"method replaced)")


def own_module(method: str) -> Dict[str, Any]:
    """``{"learning_module": kind}`` for a method that trains a module kind of its own (its first),
    else nothing: the settings file's module stays."""
    from .plugins import METHODS  # the registered methods (imports torch: only once a plan is made)

    kinds = METHODS.get(method).learning_modules
    return {"learning_module": kinds[0]} if kinds else {}


def _agreed(values: Dict[str, Any], name: str, flag: str) -> Any:
    """The one value every method's recipe gives a setting; several: an error asking for ``flag``."""
    distinct = {json.dumps(v) for v in values.values()}
    if len(distinct) > 1:
        raise ConfigError(f"the methods' recipes disagree on {name} ({values}): every method runs the same "
                          f"{name}s; pass {flag}")
    return next(iter(values.values()))


def make_plan(methods: Sequence[str], n_orders: int, n_seeds: int, output: Path, config: Optional[str] = None,
              overrides: Optional[Dict[str, Any]] = None, sources: Optional[Dict[str, str]] = None,
              order_seed: int = 0) -> Plan:
    """Every run of the sweep with its whole configuration. ``overrides``: settings given on the
    command line (``sources`` names each one's flag), over every method's recipe."""
    methods = list(methods)
    if not methods or any(not m for m in methods):
        raise ConfigError(f"--methods names no method or an empty one: {methods}")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise ConfigError(f"--methods names {dup} more than once")
    if n_seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n_seeds}")
    overrides, sources = dict(overrides or {}), dict(sources or {})
    refused = sorted(k for k in overrides if k in ("method", "run_dir"))
    if refused:
        raise ConfigError(f"the sweep sets {refused} itself (--methods, --output)")
    recipes = {m: recipe_for(m, config) for m in methods}
    flags = [(f"flag {sources.get(k, '--' + k)}", {k: v}) for k, v in overrides.items()]
    files = {m: read_config_file(str(p)) for m, p in recipes.items()}
    base = {m: build_config([(f"config file {recipes[m]}", files[m]), *flags,
                             ("--methods", {"method": m, **own_module(m)})]) for m in methods}
    order = _agreed({m: c.domains for m, c in base.items()}, "order", "--order")
    unseen_set = set(_agreed({m: [d for d in c.domains if d in c.unseen] for m, c in base.items()}, "unseen",
                             "--unseen"))
    seed = _agreed({m: c.seed for m, c in base.items()}, "seed", "--seed")
    unseen = [d for d in order if d in unseen_set]
    orders = draw_orders([d for d in order if d not in unseen_set], unseen, n_orders, order_seed)
    seeds = [seed + i for i in range(n_seeds)]
    plan = Plan(methods, orders, unseen, seeds, order_seed, {m: str(p) for m, p in recipes.items()})
    for m in methods:
        for k, o in enumerate(orders):
            for s in seeds:
                folder = f"{m}/order{k}_seed{s}"
                planned = {"method": m, **own_module(m), "order": "_".join(o), "unseen": unseen, "seed": s,
                           "run_dir": str(Path(output) / folder)}
                cfg = build_config([(f"config file {recipes[m]}", files[m]), *flags, ("the sweep's plan", planned)])
                plan.runs.append(Run(m, k, s, folder, cfg.to_dict()))
    return plan


def default_output(config: Optional[str], methods: Sequence[str], n_orders: int, n_seeds: int) -> Path:
    stem = Path(config).stem if config else "baselines"
    return Path("sweeps") / f"{stem}_{'-'.join(methods)}_o{n_orders}_s{n_seeds}"


def _comparable(plan: Dict[str, Any], free: Sequence[str]) -> Dict[str, Any]:
    """What must match between two calls of one sweep: the plan without the settings a resume may change."""
    runs = [{**r, "settings": {k: v for k, v in r["settings"].items() if k not in free}} for r in plan["runs"]]
    return {k: v for k, v in plan.items() if k not in ("runs", "recipes")} | {"runs": runs}


def check_plan(folder: Path, plan: Plan) -> None:
    """A sweep.json in ``folder`` must hold ``plan`` (but for the settings a resume may change)."""
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not a readable sweep plan ({e}); use another --output") from None
    if not isinstance(old, dict) or not isinstance(old.get("runs"), list):
        raise ConfigError(f"{path} is not a sweep plan (no list of runs); use another --output")
    from .continual import RESUMABLE_SETTINGS

    free = [k for k in RESUMABLE_SETTINGS if k not in ("order", "unseen")]
    new = json.loads(json.dumps(plan.to_dict()))
    a, b = _comparable(old, free), _comparable(new, free)
    if a != b:
        diff = [k for k in b if k != "runs" and a.get(k) != b[k]]
        if not diff:  # only the runs' settings: name the first that differs
            for ra, rb in zip(a["runs"], b["runs"]):
                was = ra["settings"]
                changed = {k: (was.get(k), v) for k, v in rb["settings"].items() if was.get(k) != v}
                if changed:
                    diff = [f"{rb['folder']}: " + ", ".join(f"{k} {x!r} -> {y!r}" for k, (x, y) in changed.items())]
                    break
        raise ConfigError(f"{folder} holds another sweep ({PLAN_FILE} differs in {'; '.join(diff)}): "
                          f"call it with the plan it was made with, or pass another --output")


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


def run_sweep(plan: Plan, output: Path, device: "torch.device") -> List[Dict[str, Any]]:
    """Train, resume or skip every run of ``plan`` in ``output``; returns the summary's rows."""
    from . import distributed as dist
    from . import pipeline
    from .plugins import check_plugins
    from .run_folder import RunFolderError, setup_logging, write_json

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
    rows: List[Dict[str, Any]] = []
    for i, r in enumerate(plan.runs, 1):
        run_dir = output / r.folder
        order = plan.orders[r.order]
        what = f"[{i}/{len(plan.runs)}] {r.method} order{r.order} {'_'.join(order)} seed {r.seed}"
        try:
            status = run_status(run_dir, order)
            if status != "missing":
                pipeline.resume_config(run_dir, r.settings)  # refuses a run with other settings than planned
        except RunFolderError as e:
            raise RunFolderError(f"the sweep's run {r.folder}: {e}") from None
        if status == "done":
            log.info("%s: skipped, %s is finished", what, run_dir)
            continue
        log.info("%s: %s %s", what, "training" if status == "missing" else "resuming", run_dir)
        if status == "missing":
            pipeline.train(r.config(), device)
        else:
            pipeline.resume(run_dir, r.settings, device)
        setup_logging(None, main=dist.is_main())  # the run's log file closes with the run
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
                      + f"\nSeeds: {', '.join(map(str, plan.seeds))}\n\n{table}\n")
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
    p.add_argument("--methods", required=True, metavar="M1,M2,...",
                   help="continual methods joined by ',' (names registered in samcl/methods, e.g. "
                        "samcl,finetune,joint,zeroshot)")
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
        return make_plan(methods, args.orders, args.seeds, output, args.config, settings, sources,
                         args.order_seed), output


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    plan, output = plan_from_args(args)
    # torch and the backbones only now, once the flags and the plan passed
    from . import distributed

    with training_processes():
        device = resolve_device(args.cuda, args.device)
        rows = run_sweep(plan, output, device)
        main_rank = distributed.is_main()
    if main_rank:
        print(markdown(rows))
        print(f"\nwrote {output / (SUMMARY + '.md')}, {SUMMARY}.csv and {SUMMARY}.png")
    return 0


if __name__ == "__main__":
    from .cli import run_script

    run_script(main)
