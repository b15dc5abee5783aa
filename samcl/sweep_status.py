"""A sweep folder's records of its jobs, and ``samcl.sweep --status``.

Each run's job state is ``launch/<method>__order<k>_seed<s>.json`` (queued, running, done, failed
with its error; ``.job.json``: its submitit job); :func:`status_rows` reads them with the run
folders (done / running / queued / failed / interrupted / not started, and the epoch reached).
"""
import dataclasses
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from .cli import CLIError
from .lock import lock_holder
from .sweep_plan import PLAN_FILE, Plan, Run

STATE_DIR = "launch"  # launch/<key>.json: a run's job state; launch/<key>.job.json: its submitit job


@dataclass(frozen=True)
class SweepOps:
    """What a job takes from :mod:`samcl.sweep`, each named "module:function" (a name pickles into a
    job and is imported there): ``check(output, run, order)`` -> 'missing' / 'unfinished' / 'done';
    ``advance(output, run, order, device, what)`` trains, resumes or skips the run;
    ``summarise(plan, output)`` rewrites the summary and returns its rows."""

    check: str
    advance: str
    summarise: str

    def function(self, which: str) -> Callable[..., Any]:
        """The function named by field ``which``, imported."""
        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)


def load_plan(output: Path) -> Plan:
    """The plan of the sweep folder ``output`` (its sweep.json)."""
    path = Path(output) / PLAN_FILE
    if not path.is_file():
        raise CLIError(f"{output} is not a sweep folder: it has no {PLAN_FILE}")
    data = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(Plan)} - {"runs"}
    return Plan(**{k: data[k] for k in names if k in data}, runs=[Run(**r) for r in data["runs"]])


def run_key(folder: str) -> str:
    """A run's name in launch/ and jobs/: its folder with '__' for '/'."""
    return folder.replace("/", "__")


def state_path(output: Path, folder: str, suffix: str = ".json") -> Path:
    return Path(output) / STATE_DIR / f"{run_key(folder)}{suffix}"


def read_state(output: Path, folder: str, suffix: str = ".json") -> Dict[str, Any]:
    try:
        return json.loads(state_path(output, folder, suffix).read_text())
    except (OSError, ValueError):
        return {}


def write_state(output: Path, folder: str, state: str, suffix: str = ".json", **info: Any) -> None:
    """Record a run's job state (what the record held before is kept unless ``info`` replaces it)."""
    from .io import atomic_write_text

    path = state_path(output, folder, suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**read_state(output, folder, suffix), "state": state, "time": time.time(), **info}
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


# ----------------------------------------------------------------------------- --status
def epoch_reached(run_dir: Path, order: Sequence[str], epochs: int) -> str:
    """'k/T domains' done, and the domain in progress's last saved epoch."""
    from .run_folder import MANIFEST, read_manifest

    done = list(read_manifest(run_dir)["completed"]) if (run_dir / MANIFEST).is_file() else []
    text = f"{len(done)}/{len(order)} domains"
    for partial in sorted((run_dir / "partial").glob("*.pt")):
        try:
            import torch

            epoch = torch.load(partial, map_location="cpu", weights_only=True, mmap=True)["epoch"] + 1
        except Exception:  # noqa: BLE001 (a partial file being written or damaged: the resume decides)
            continue
        text += f", {partial.stem} epoch {epoch}/{epochs}"
    return text


def status_rows(output: Path, ops: SweepOps) -> List[Dict[str, Any]]:
    """Per run: state (done / running / queued / failed / interrupted / not started), progress,
    error and log."""
    output = Path(output)
    plan = load_plan(output)
    rows = []
    for r in plan.runs:
        run_dir, order = output / r.folder, plan.orders[r.order]
        rec, job = read_state(output, r.folder), read_state(output, r.folder, ".job.json")
        done = ops.function("check")(output, r, order) == "done"
        holder = None if done else lock_holder(run_dir)
        recorded = rec.get("state")
        if done:
            state = "done"
        elif holder is not None:
            state = "running"
        elif recorded in ("failed", "queued"):
            state = recorded
        elif recorded == "running" or (run_dir / "run.json").is_file() or (run_dir / "partial").is_dir():
            state = "interrupted"  # started, not finished, nobody trains it: calling the sweep again resumes it
        else:
            state = "not started"
        rows.append({"run": r.folder, "state": state, "reached": epoch_reached(run_dir, order, r.settings["epoch"]),
                     "job": job.get("job_id"), "log": job.get("log") or rec.get("log"),
                     "error": rec.get("error") if state == "failed" else None,
                     "where": f"pid {holder.get('pid')} on {holder.get('host')}" if holder else None})
    return rows


def format_status(rows: Sequence[Dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        line = f"{row['run']:<40} {row['state']:<12} {row['reached']}"
        if row["where"]:
            line += f"  [{row['where']}]"
        if row["job"]:
            line += f"  job {row['job']}"
        if row["error"]:
            line += f"\n    error: {row['error']}\n    log: {row['log']}"
        lines.append(line)
    counts: Dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return "\n".join(lines + [", ".join(f"{n} {s}" for s, n in counts.items())])
