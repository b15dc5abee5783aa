"""The sweep's hyper-parameter grid (``--grid KEY=v1,v2,...``): each method's settings chosen on
held-out training images, never on a test split.

For every method, the grid's points are the products of the values of the keys that concern it (a
core setting, e.g. lr, concerns every method; a method's or a learning module's own setting, e.g.
ewc_lambda, the methods that declare it or train that module). On the plan's first order and first
seed, every point trains as a run of its own on the kept part of each domain's training split and
is scored on the held-out part (``val_fraction`` of the settings, or 0.2 if they hold none out;
``validation`` and ``evaluate_on`` train_fraction). The point with the highest AA of IoU after the
last step wins; ties go to the lower FM of IoU, then to the earlier point. The choice and the whole
grid are written to ``<sweep>/grid/`` (grid.md, grid.csv, grid.json), the points' runs to
``<sweep>/grid/<method>/<point>/``, and every run of the plan, every order and seed, takes the
chosen values (so sweep.json holds them). A method that no key concerns runs as planned. A second
call skips the points already finished, as the sweep does its runs.
"""
import csv
import io
import itertools
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .config import SETTINGS_META, ConfigError, build_config
from .sweep_plan import PLANNED, Plan, Run

if TYPE_CHECKING:
    import torch

log = logging.getLogger("samcl.sweep")

GRID_DIR = "grid"
DEFAULT_FRACTION = 0.2  # held out per domain when the settings hold out nothing
PLUGIN_GROUPS = ("method ", "learning module ")  # the --help groups of a plugin's own settings


def parse_grid(items: Sequence[str]) -> Dict[str, List[Any]]:
    """``--grid KEY=v1,v2,...`` items -> {KEY: [values]}, each value read as YAML (1, 0.1, true, text)."""
    grid: Dict[str, List[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=v1,v2,..., e.g. --grid ewc_lambda=1,100")
        if key not in SETTINGS_META:
            raise ConfigError(f"--grid {item!r}: {key!r} is not a setting (docs/settings.md lists them)")
        if key in PLANNED or key in ("val_fraction", "validation", "evaluate_on"):
            raise ConfigError(f"--grid {item!r}: the sweep sets {key} itself")
        if key in grid:
            raise ConfigError(f"--grid names {key} twice; give its values in one --grid {key}=v1,v2,...")
        try:
            values = [yaml.safe_load(v) for v in text.split(",")]
        except yaml.YAMLError as e:
            raise ConfigError(f"--grid {item!r}: a value is not readable ({str(e).splitlines()[0]})") from None
        grid[key] = values
    return grid


def concerns(key: str, method: str, module_kind: str) -> bool:
    """Whether setting ``key`` changes what ``method`` training ``module_kind`` does: a core setting
    always; a plugin's own setting if the method (or a method it extends) or the module declares it."""
    from .plugins import METHODS  # imports torch: only once a grid is run

    group = SETTINGS_META[key].group
    if not group.startswith(PLUGIN_GROUPS):
        return True
    owners = {f"method {c.__module__.rsplit('.', 1)[-1]}" for c in METHODS.get(method).__mro__
              if c.__module__.startswith("samcl.methods.")}
    return group in owners | {f"learning module {module_kind}"}


def point_name(point: Dict[str, Any]) -> str:
    """A point's folder name: ``ewc_lambda=1+lr=0.001``."""
    return "+".join(f"{k}={v}" for k, v in point.items())


def grid_runs(plan: Plan, grid: Dict[str, List[Any]], output: Path) -> List[Tuple[Run, Dict[str, Any]]]:
    """(run, point) of every method's grid points: its first run of the plan (first order, first
    seed) with the point's values, trained on the kept part and scored on the held-out part."""
    out = []
    for m in plan.methods:
        first = next(r for r in plan.runs if r.method == m and r.order == 0 and r.seed == plan.seeds[0])
        kind = first.config().learning_module_kind
        keys = [k for k in grid if concerns(k, m, kind)]
        for values in itertools.product(*(grid[k] for k in keys)) if keys else ():
            point = dict(zip(keys, values))
            folder = f"{GRID_DIR}/{m}/{point_name(point)}"
            held = {"val_fraction": first.settings.get("val_fraction") or DEFAULT_FRACTION,
                    "validation": "train_fraction", "evaluate_on": "train_fraction",
                    "run_dir": str(Path(output) / folder)}
            cfg = build_config([(f"the grid point {folder}", {**first.settings, **point, **held})])
            out.append((Run(m, 0, first.seed, folder, cfg.to_dict()), point))
    return out


def _finished(run_dir: Path, order: Sequence[str]) -> Optional[bool]:
    """None: no run there; True: every domain of ``order`` done; False: unfinished."""
    from .run_folder import MANIFEST, read_manifest

    if not (Path(run_dir) / MANIFEST).is_file():
        return None
    return list(read_manifest(run_dir)["completed"]) == list(order)


def choose(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """method -> the row of its best point: the highest iou_AA, then the lowest iou_FM, then the first."""
    def rank(r: Dict[str, Any]) -> Tuple[float, float]:  # a missing value (n/a) ranks last
        aa, fm = r["iou_AA"], r["iou_FM"]
        return (-math.inf if aa is None else aa), (-math.inf if fm is None else -fm)

    best: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        if r["method"] not in best or rank(r) > rank(best[r["method"]]):
            best[r["method"]] = r
    return best


COLUMNS = ("method", "point", "iou_AA", "iou_FM", "f1_AA", "f1_FM", "mae_AA", "mae_FM", "chosen", "folder")


def grid_table(rows: List[Dict[str, Any]]) -> Tuple[str, str]:
    """(markdown, csv) of the grid's rows."""
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        md.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else "n/a" if r[c] is None else
                                    ("yes" if r[c] is True else "" if r[c] is False else str(r[c]))
                                    for c in COLUMNS) + " |")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows({c: r[c] for c in COLUMNS} for r in rows)
    return "\n".join(md) + "\n", buf.getvalue()


def run_grid(plan: Plan, grid: Dict[str, List[Any]], output: Path, device: "torch.device") -> Plan:
    """Train (or resume, or skip) every grid point, write the grid's table and choice, and return the
    plan with each method's chosen values in every run."""
    from . import distributed as dist
    from . import pipeline
    from .compare import summarise
    from .io import atomic_write_text
    from .run_folder import setup_logging

    output = Path(output)
    runs = grid_runs(plan, grid, output)
    order = plan.orders[0]
    for i, (r, _point) in enumerate(runs, 1):
        status = _finished(output / r.folder, order)
        what = f"[grid {i}/{len(runs)}] {r.folder}"
        if status is True:
            log.info("%s: skipped, finished", what)
            continue
        log.info("%s: %s", what, "training" if status is None else "resuming")
        if status is None:
            pipeline.train(r.config(), device)
        else:
            pipeline.resume(output / r.folder, r.settings, device)
        setup_logging(None, main=dist.is_main())
    dist.barrier()
    rows = []
    for r, point in runs:
        s = summarise(output / r.folder)
        rows.append({"method": r.method, "point": point_name(point), **{c: s[c] for c in COLUMNS[2:8]},
                     "chosen": False, "folder": r.folder, "values": point})
    best = choose(rows)
    for r in best.values():
        r["chosen"] = True
    chosen = {m: r["values"] for m, r in best.items()}
    if dist.is_main() and rows:
        md, table = grid_table(rows)
        folder = output / GRID_DIR
        fraction = runs[0][0].settings["val_fraction"]
        atomic_write_text(folder / "grid.md", f"# Grid of {output.name}\n\nEach point trained on order0 "
                          f"({' '.join(order)}) with seed {plan.seeds[0]}, on the training splits less a held-out "
                          f"{fraction:g} of each, and scored on that held-out part (never on a test split). Best per "
                          f"method: the highest AA of IoU, ties the lowest FM of IoU.\n\n{md}")
        atomic_write_text(folder / "grid.csv", table)
        atomic_write_text(folder / "grid.json", json.dumps(
            {"format": "samcl-grid", "version": 1, "grid": grid, "val_fraction": fraction, "chosen": chosen,
             "rows": [{k: v for k, v in r.items() if k != "values"} for r in rows]}, indent=1) + "\n")
    for m, values in chosen.items():
        log.info("grid: %s takes %s (AA of IoU %.4f on the held-out part)", m, point_name(values), best[m]["iou_AA"])
    return with_choice(plan, chosen)


def with_choice(plan: Plan, chosen: Dict[str, Dict[str, Any]]) -> Plan:
    """The plan with each method's ``chosen`` values in every one of its runs."""
    for r in plan.runs:
        if r.method in chosen:
            r.settings = build_config([(f"the grid's choice for {r.method}", {**r.settings, **chosen[r.method]})
                                       ]).to_dict()
    return plan
