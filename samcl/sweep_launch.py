"""A sweep's runs as independent jobs, one device each: on this machine (``--launcher local``) or on a
SLURM cluster through submitit (``--launcher slurm``), and the sweep folder's summary
(``--summarise``); its records and ``--status`` are :mod:`samcl.sweep_status`'s, the cost estimate
(``--dry_run``) :mod:`samcl.sweep_estimate`'s. :mod:`samcl.sweep` runs them.

Each job trains, resumes or skips one run of the folder's ``sweep.json`` (as the serial sweep does),
records its state in ``launch/<method>__order<k>_seed<s>.json`` (queued, running, done, failed with
its error) and, once its run is done, rewrites the summary under the sweep folder's summary lock
(``.summary.lock``: one writer at a time, the others wait). A job stopped by SLURM (pre-emption, the
time limit) is requeued by submitit's checkpointing and resumes from its run folder's last saved
epoch; a job killed outright resumes the same way when the sweep is called again. A failed run is
reported with its error and its log; the other runs go on.

This module does not import :mod:`samcl.sweep` (which imports it): the sweep hands over what a job
needs (:class:`SweepOps`), functions that pickle by name into the jobs.
"""
import argparse
import importlib
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from .cli import CLIError
from .lock import RunLock
from .sweep_estimate import dry_run
from .sweep_status import SweepOps, format_status, load_plan, read_state, run_key, status_rows, write_state
from .sweep_plan import PLAN_FILE, Plan, Run

if TYPE_CHECKING:
    import torch

log = logging.getLogger("samcl.sweep")

LAUNCHERS = ("serial", "local", "slurm")
JOBS_DIR = "jobs"  # the jobs' own logs (stdout and stderr)
SUMMARY_LOCK = ".summary.lock"
INSTALL_SUBMITIT = "pip install 'samcl[slurm]' (or: pip install submitit)"


def write_summary_locked(plan: Plan, output: Path, ops: SweepOps) -> List[Dict[str, Any]]:
    """The summary rewritten by one writer at a time (the others wait for the sweep folder's lock)."""
    with RunLock(output, SUMMARY_LOCK, wait=True):
        return ops.function("summarise")(plan, Path(output))


# ----------------------------------------------------------------------------- one job
def run_job(output: Path, folder: str, device: Optional[str], threads: Optional[int], ops: SweepOps) -> str:
    """The body of a job: the run ``folder`` of the sweep in ``output`` trained, resumed or skipped;
    its state recorded; the summary rewritten. Returns 'done'; an error is recorded, then raised."""
    import torch

    output = Path(output)
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device if device else "cuda:0" if torch.cuda.is_available() else "cpu")
    plan = load_plan(output)
    r = next((r for r in plan.runs if r.folder == folder), None)
    if r is None:
        raise CLIError(f"{output / PLAN_FILE} plans no run {folder}")
    write_state(output, folder, "running", pid=os.getpid(), host=socket.gethostname(), error=None)
    try:
        ops.function("advance")(output, r, plan.orders[r.order], dev, f"job {folder}")
    except BaseException as e:
        write_state(output, folder, "failed", error=f"{type(e).__name__}: {e}")
        raise
    write_state(output, folder, "done")
    write_summary_locked(plan, output, ops)
    return "done"


class RunJob:
    """One run as a submitit job. On pre-emption or at the time limit submitit calls
    :meth:`checkpoint`: the job is requeued and resumes from its run folder's last saved epoch."""

    def __init__(self, output: Path, folder: str, device: Optional[str], threads: Optional[int],
                 ops: SweepOps) -> None:
        self.output, self.folder, self.device, self.threads, self.ops = str(output), folder, device, threads, ops

    def __call__(self) -> str:
        return run_job(Path(self.output), self.folder, self.device, self.threads, self.ops)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        write_state(Path(self.output), self.folder, "queued", note="requeued (pre-emption or time limit)")
        return submitit.helpers.DelayedSubmission(RunJob(Path(self.output), self.folder, self.device, self.threads,
                                                         self.ops))


# ----------------------------------------------------------------------------- the launchers
def _todo(plan: Plan, output: Path, ops: SweepOps) -> List[Run]:
    """The runs still to train or finish, every existing one checked against its planned settings;
    the finished ones are logged as skipped."""
    todo = []
    for r in plan.runs:
        if ops.function("check")(output, r, plan.orders[r.order]) == "done":
            log.info("%s: skipped, %s is finished", r.folder, Path(output) / r.folder)
        else:
            todo.append(r)
    return todo


def _report(output: Path, r: Run, ok: bool, log_path: Path, error: Optional[str] = None) -> None:
    if ok:
        log.info("%s: done (log %s)", r.folder, log_path)
    else:
        error = read_state(output, r.folder).get("error") or error or "no error recorded"
        log.error("%s: FAILED (log %s; once the cause is fixed, calling the sweep again resumes it): %s", r.folder,
                  log_path, error)


def visible_gpus() -> List[str]:
    """The GPUs a local launch cycles over: CUDA_VISIBLE_DEVICES's list, else every one torch sees."""
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def launch_local(plan: Plan, output: Path, parallel: int, device: "torch.device", ops: SweepOps,
                 one_gpu: bool = False) -> List[str]:
    """``parallel`` runs at once, each ``python -m samcl.sweep --job`` in its own process: on a GPU
    device pinned to one GPU (CUDA_VISIBLE_DEVICES), cycling over the visible ones (``one_gpu``:
    all on ``device``'s); on the CPU with an even share of the cores as threads. Returns the
    folders of the runs that failed."""
    if parallel < 1:
        raise CLIError(f"--parallel must be at least 1, got {parallel}")
    output = Path(output)
    gpus = visible_gpus() if device.type == "cuda" else []
    if gpus and one_gpu:
        gpus = [gpus[device.index or 0]]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    todo = _todo(plan, output, ops)
    for r in todo:
        write_state(output, r.folder, "queued", log=str(output / JOBS_DIR / f"{run_key(r.folder)}.log"), error=None)
    env_path = os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])
    running: Dict[int, Tuple[Run, subprocess.Popen, Path, Any]] = {}  # slot -> run, process, log, its file
    failed: List[str] = []
    while todo or running:
        for slot in range(parallel):
            if slot in running or not todo:
                continue
            r = todo.pop(0)
            job_log = output / JOBS_DIR / f"{run_key(r.folder)}.log"
            job_log.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "PYTHONPATH": env_path, "OMP_NUM_THREADS": str(threads)}
            argv = [sys.executable, "-m", "samcl.sweep", "--job", str(output), r.folder, "--threads", str(threads)]
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
                argv += ["--device", "cuda:0"]
            else:
                argv += ["--device", str(device)]
            f = open(job_log, "ab")
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
            running[slot] = (r, proc, job_log, f)
            where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else f"{threads} CPU thread(s)"
            log.info("%s: started, pid %d on %s (log %s)", r.folder, proc.pid, where, job_log)
        time.sleep(0.2)
        for slot, (r, proc, job_log, f) in list(running.items()):
            if proc.poll() is None:
                continue
            f.close()
            del running[slot]
            _report(output, r, proc.returncode == 0, job_log, f"exit code {proc.returncode}")
            if proc.returncode != 0:
                failed.append(r.folder)
    return failed


def slurm_minutes(text: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes (rounded up)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise CLIError(f"--slurm_time {text!r}: expected SLURM's format, e.g. 2-00:00:00, 12:00:00 or 90 (minutes)")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        secs = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        secs = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        secs = a * 60 + b
    else:  # MM
        secs = a * 60
    return max(1, -(-secs // 60))


def parse_extra(items: Sequence[str]) -> Dict[str, str]:
    """``--slurm_extra KEY=VALUE`` items: further #SBATCH options (``--KEY=VALUE``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--slurm_extra {item!r}: expected KEY=VALUE, e.g. --slurm_extra account=myproject")
        out[key.strip().lstrip("-")] = value
    return out


def import_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise CLIError(f"--launcher slurm submits through submitit, which is not installed: {INSTALL_SUBMITIT}") \
            from None
    return submitit


def submitit_executor(output: Path, args: argparse.Namespace) -> Any:
    """submitit's executor for the flags: SLURM's (or, with --slurm_cluster local, its local one,
    which runs the jobs as subprocesses of this machine), its logs in the sweep's jobs/."""
    submitit = import_submitit()
    ex = submitit.AutoExecutor(folder=Path(output) / JOBS_DIR / "%j", cluster=args.slurm_cluster)
    params: Dict[str, Any] = {"name": f"samcl-{Path(output).name}", "nodes": 1, "tasks_per_node": 1,
                              "timeout_min": slurm_minutes(args.slurm_time), "gpus_per_node": args.slurm_gpus_per_run,
                              "cpus_per_task": args.slurm_cpus_per_run}
    if args.slurm_cluster == "slurm":
        params["slurm_array_parallelism"] = args.parallel
        if args.slurm_partition:
            params["slurm_partition"] = args.slurm_partition
        if args.slurm_mem:
            params["slurm_mem"] = args.slurm_mem
        if args.slurm_extra:
            params["slurm_additional_parameters"] = parse_extra(args.slurm_extra)
    ex.update_parameters(**params)
    return ex


def launch_submitit(plan: Plan, output: Path, args: argparse.Namespace, ops: SweepOps,
                    wait: bool = True) -> List[str]:
    """Every run still to do as one job (a job array on SLURM); then, with ``wait``, each job's end
    reported as it comes. Returns the folders of the runs that failed."""
    output = Path(output)
    ex = submitit_executor(output, args)
    todo = _todo(plan, output, ops)
    for r in todo:
        write_state(output, r.folder, "queued", error=None)
    with ex.batch():
        jobs = [ex.submit(RunJob(output, r.folder, args.device, args.slurm_cpus_per_run, ops)) for r in todo]
    for r, j in zip(todo, jobs):
        write_state(output, r.folder, "submitted", ".job.json", job_id=str(j.job_id), log=str(j.paths.stderr))
        log.info("%s: submitted as job %s (log %s)", r.folder, j.job_id, j.paths.stderr)
    failed: List[str] = []
    if not wait:
        return failed
    pending = list(zip(todo, jobs))
    while pending:
        for r, j in list(pending):
            if not j.done():
                continue
            pending.remove((r, j))
            try:
                j.result()
                _report(output, r, True, j.paths.stderr)
            except Exception as e:  # noqa: BLE001 (a failed job is reported; the others go on)
                failed.append(r.folder)
                _report(output, r, False, j.paths.stderr, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        time.sleep(1.0)
    return failed


# ----------------------------------------------------------------------------- the command line
def add_launch_flags(p: argparse.ArgumentParser) -> None:
    """The sweep's flags of launching, inspecting and estimating (see docs/sweep.md)."""
    g = p.add_argument_group("launching", "where the runs go (docs/sweep.md)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="serial",
                   help="serial: one run after another in this process (default); local: --parallel runs at once "
                        "on this machine, one GPU each; slurm: one SLURM job per run through submitit")
    g.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="local: runs at once (default 1); slurm: the most jobs of the array running at once")
    g.add_argument("--slurm_partition", help="slurm: the partition")
    g.add_argument("--slurm_time", default="1-00:00:00",
                   help="slurm: each job's time limit (default 1-00:00:00); a job stopped at it is requeued and "
                        "resumes from its last saved epoch")
    g.add_argument("--slurm_gpus_per_run", type=int, default=1, metavar="N", help="slurm: GPUs per job (default 1)")
    g.add_argument("--slurm_cpus_per_run", type=int, default=8, metavar="N",
                   help="slurm: CPU cores per job, also its torch threads (default 8)")
    g.add_argument("--slurm_mem", metavar="SIZE", help="slurm: memory per job, SLURM's format (e.g. 64G)")
    g.add_argument("--slurm_extra", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: a further #SBATCH option --KEY=VALUE (repeat it: --slurm_extra account=proj)")
    g.add_argument("--slurm_cluster", choices=("slurm", "local"), default="slurm",
                   help="slurm: 'local' runs the jobs through submitit's local executor, as subprocesses of this "
                        "machine with SLURM's interface (to try a sweep before submitting it)")
    g = p.add_argument_group("inspecting", "a sweep folder, in whatever state its runs are")
    g.add_argument("--status", type=Path, metavar="FOLDER",
                   help="per run: done / running / queued / failed / interrupted / not started, with the domains "
                        "and epoch reached; then exit")
    g.add_argument("--summarise", type=Path, metavar="FOLDER",
                   help="rewrite the summary from the finished runs (one writer at a time); then exit")
    g.add_argument("--dry_run", action="store_true",
                   help="print the plan and its cost in device-hours (needs --measure or --images_per_second); "
                        "nothing is trained or written")
    g.add_argument("--measure", action="store_true",
                   help="--dry_run: time a one-epoch run of each method on this device (random weights, "
                        "generated images at the planned size and batch)")
    g.add_argument("--images_per_second", type=float, metavar="X",
                   help="--dry_run: the training and evaluation throughput of one device, in images/s")
    g.add_argument("--assume_images", type=int, metavar="N",
                   help="--dry_run: images per split for splits not found under the data root")
    # a local launch's job process: python -m samcl.sweep --job SWEEP_FOLDER RUN_FOLDER
    p.add_argument("--job", nargs=2, metavar=("SWEEP", "RUN"), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)


def inspect_or_job(args: argparse.Namespace, ops: SweepOps) -> int:
    """--status, --summarise, or a local launch's job (--job SWEEP RUN)."""
    from .commands.train import training_processes
    from .run_folder import setup_logging

    if args.job:
        with training_processes():
            setup_logging(None)
            run_job(Path(args.job[0]), args.job[1], args.device, args.threads, ops)
        return 0
    if args.status:
        print(format_status(status_rows(args.status, ops)))
        return 0
    with training_processes():
        rows = write_summary_locked(load_plan(args.summarise), args.summarise, ops)
    print(f"{sum(r['runs'] for r in rows)} finished run(s); wrote {Path(args.summarise) / 'summary.md'}, "
          f"summary.csv and summary.png")
    return 0


def launch(plan: Plan, output: Path, args: argparse.Namespace, ops: SweepOps) -> int:
    """--dry_run, or the plan's runs through the local or the SLURM launcher. 1 if a run failed."""
    from .cli import resolve_device
    from .commands.train import training_processes

    if args.dry_run:
        with training_processes():
            print(dry_run(plan, output, args))
        return 0
    if args.cuda == -1:
        raise CLIError(f"--launcher {args.launcher} runs each run on one device: --cuda -1 (torchrun) is for the "
                       f"serial launcher")
    if args.launcher == "slurm":  # submitit installed and the flags readable before anything is written
        import_submitit()
        slurm_minutes(args.slurm_time)
        parse_extra(args.slurm_extra)
    with training_processes():
        sweep = importlib.import_module(ops.summarise.partition(":")[0])  # samcl.sweep (which imports this module)
        sweep.open_sweep(plan, output)
        if args.launcher == "local":
            named = args.cuda is not None or (args.device or "").startswith("cuda:")  # one GPU named: all on it
            failed = launch_local(plan, output, args.parallel, resolve_device(args.cuda, args.device), ops, named)
        else:
            failed = launch_submitit(plan, output, args, ops)
        rows = write_summary_locked(plan, output, ops)
        log.info("sweep %s: %d of %d run(s) finished, %d failed%s; summary in %s", output,
                 sum(r["runs"] for r in rows), len(plan.runs), len(failed),
                 f" ({', '.join(failed)})" if failed else "", Path(output) / "summary.md")
        sweep._sweep_log(Path(output), False)
    print(sweep.markdown(rows))
    if failed:
        print(f"\n{len(failed)} run(s) failed: {', '.join(failed)}; their errors and logs: python -m samcl.sweep "
              f"--status {output}", file=sys.stderr)
        return 1
    return 0
