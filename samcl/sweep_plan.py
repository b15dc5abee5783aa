"""The plan of a sweep (:mod:`samcl.sweep`): which method runs which domain order with which seed,
with what settings, in which folder; and the check that a second call brings the same plan.

Orders: the configured one, then random permutations of its trained domains drawn with
``numpy.random.default_rng(order_seed)`` (a repeat drawn again), the unseen domains last.
Seeds: the configured one and the next integers. Settings: each method's recipe (or one
``--config`` file for all), the command line's settings over it, then what the plan sets per run.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .config import CONFIG_DIR, Config, ConfigError, build_config, read_config_file

PLAN_FILE = "sweep.json"
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


def method_settings(label: str) -> Dict[str, Any]:
    """The settings a ``--methods`` entry sets: ``method`` (and its variant, ``samcl:oracle`` -> selector
    oracle, ``merge:ties`` -> merge ties: the value of the setting the method's class names in ``variant``)."""
    from .plugins import METHODS

    name, _, variant = label.partition(":")
    if not variant:
        return {"method": name}
    setting = getattr(METHODS.get(name), "variant", None)
    if setting is None:
        raise ConfigError(f"--methods {label}: method {name!r} has no named variants")
    return {"method": name, setting: variant}


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
    named = {m: method_settings(m) for m in methods}  # a label "method:variant" runs method with its variant
    recipes = {m: recipe_for(named[m]["method"], config) for m in methods}
    flags = [(f"flag {sources.get(k, '--' + k)}", {k: v}) for k, v in overrides.items()]
    files = {m: read_config_file(str(p)) for m, p in recipes.items()}
    base = {m: build_config([(f"config file {recipes[m]}", files[m]), *flags,
                             ("--methods", {**named[m], **own_module(named[m]["method"])})]) for m in methods}
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
                folder = f"{m.replace(':', '-')}/order{k}_seed{s}"
                planned = {**named[m], **own_module(named[m]["method"]), "order": "_".join(o), "unseen": unseen,
                           "seed": s, "run_dir": str(Path(output) / folder)}
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
