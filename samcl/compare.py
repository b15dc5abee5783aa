"""Compare finished runs: per metric the release's AA / FM / FT, the canonical FM_max / BWT / FWT /
AIA and the score on the unseen (test-only) domains beside the vanilla one; storage per domain and
training time.

    python -m samcl.compare log_sam1/SAMCL_... log_sam1/samcl-lora_... [--csv compare.csv]

Prints a markdown table (one row per run folder, the summary after its last step, recomputed from
its accuracy matrix by samcl.metrics.AccuracyMatrix, so that runs written before a column existed
get it too; FWT and the vanilla scores need the vanilla scores metrics.json records since then),
writes the same as CSV and draws it beside (``compare.png``: AA, FM and the unseen score per run,
storage). The columns are defined in docs/metrics.md. Storage is what a run needs after its last
step, per trained domain: its module files (all of them for a module bank, the latest for one
shared module), its embedding buffer (every domain's) and the method's own files (one selector,
the latest replay buffer or Fisher), from ``metrics.json`` or, for runs written before it recorded
storage, from the files. ``record_mb``: the files kept only to reproduce the run (each step's
selector snapshot, earlier snapshots of a shared module).
"""
import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .config import MODULE_ALIASES
from .metrics import METRICS, AccuracyMatrix
from .run_folder import (MANIFEST, METRICS_FILE, RunFolderError, buffer_part, module_path, read_manifest, run_weights,
                         selector_snapshot)

# the summary's columns per metric: the release's, then the canonical ones (docs/metrics.md)
RELEASE_SUMMARY = ("AA", "FM", "FT")
SUMMARY = RELEASE_SUMMARY + ("FM_max", "BWT", "FWT", "AIA", "unseen", "unseen_vanilla")
# a method's variant setting and its default, named in the row ("samcl (oracle)"; the default unnamed)
VARIANTS = {"samcl": ("selector", "mlp"), "merge": ("merge", None)}
MB = 1024**2


def step_storage(run_dir: Path, step: Dict[str, Any], weights: str) -> int:
    """Bytes a step keeps: recorded in metrics.json, else the sizes of its files (in the run's
    weight format)."""
    if "storage" in step:
        return int(step["storage"]["bytes"])
    d = step["domain"]
    files = [module_path(run_dir, d, weights).name, buffer_part(d, weights), selector_snapshot(d, weights)]
    return sum((run_dir / f).stat().st_size for f in files if (run_dir / f).is_file())


def method_label(method: str, cfg: Dict[str, Any]) -> str:
    """``method``, with its variant where it is not the default: "samcl (oracle)", "merge (ties)"."""
    setting, default = VARIANTS.get(method, (None, None))
    value = cfg.get(setting) if setting else None
    return method if value in (None, default) else f"{method} ({value})"


def summarise(run_dir: Path) -> Dict[str, Any]:
    """One row of the comparison for a finished (or partly finished) run folder."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not (run_dir / MANIFEST).is_file() or not path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder with a {METRICS_FILE} (train it first)")
    try:
        metrics = json.loads(path.read_text())
        steps: List[Dict[str, Any]] = metrics["steps"]
        cfg = metrics["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise RunFolderError(f"{path} is not a readable metrics file ({e})") from None
    if not steps:
        raise RunFolderError(f"{run_dir} has no finished step yet")
    alias = MODULE_ALIASES.get(cfg.get("module"), MODULE_ALIASES["SAMCL"])
    trained = [s for s in steps if s.get("trained")]
    row: Dict[str, Any] = {
        "run": run_dir.name,
        "method": method_label(cfg.get("method") or alias.method, cfg),
        "module": (cfg.get("learning_module") or alias.learning_module) if trained else "none",
        "backbone": f"{cfg.get('backbone', alias.backbone)}/{metrics.get('backbone', {}).get('arch', '?')}",
        "domains": len(steps),
    }
    matrix = AccuracyMatrix.from_dict(metrics["accuracy_matrix"])
    t = steps[-1]["step"]
    for m in METRICS:
        last = matrix.summary(t, m)
        for k in SUMMARY:
            row[f"{m}_{k}"] = last[k]
    weights = run_weights(read_manifest(run_dir))
    kept = steps[-1].get("storage", {}).get("kept_bytes")  # what the method keeps, recorded since baselines
    if kept is None:
        kept = sum(step_storage(run_dir, s, weights) for s in trained)
    row["stored_mb_per_domain"] = kept / len(trained) / MB if trained else 0.0
    # files kept only to reproduce the run (each step's selector snapshot, earlier module snapshots)
    row["record_mb"] = steps[-1].get("storage", {}).get("extra_bytes", 0) / MB
    row["training_seconds"] = sum(s.get("training_seconds", s.get("seconds", 0.0)) for s in steps)
    return row


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def markdown(rows: Sequence[Dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import Parser  # one-line errors for bad flags, as every entry point

    p = Parser(prog="python -m samcl.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with run.json and metrics.json)")
    p.add_argument("--csv", type=Path, default=Path("compare.csv"), help="where to write the table as CSV "
                   "(default compare.csv)")
    args = p.parse_args(argv)
    try:
        rows = [summarise(r) for r in args.runs]
    except (RunFolderError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(rows))
    write_csv(rows, args.csv)
    from .pictures import draw_comparison  # matplotlib only once there is something to draw

    figure = draw_comparison(rows, args.csv.with_suffix(".png"))
    print(f"\nwrote {args.csv} and {figure}")
    return 0


if __name__ == "__main__":
    from .cli import run_script

    run_script(main)
