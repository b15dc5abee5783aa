"""python -m samcl.sweep --launcher local / slurm (submitit's local executor stands in for SLURM),
--status, --summarise and --dry_run: parallel runs equal to serial ones, a killed job resumed, a
failed job reported while the others finish.

The tests that start job processes take minutes on a 2-core machine: they run with
SAMCL_SLOW_TESTS=1 (the others, and the plan's and the folder's bookkeeping, always run)."""
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from samcl import sweep, sweep_estimate, sweep_launch
from samcl.cli import CLIError
from samcl.config import CONFIG_DIR
from samcl.demo import make_demo_data
from samcl.lock import RunLock

REPO = Path(__file__).resolve().parent.parent
DEMO = str(CONFIG_DIR / "demo_sam.yaml")
def SLOW(test):  # noqa: N802  (a decorator named as pytest's marks)
    """Marked slow, and skipped unless SAMCL_SLOW_TESTS is set (CI sets it: `pytest -m slow` after the suite)."""
    skip = pytest.mark.skipif(not os.environ.get("SAMCL_SLOW_TESTS"),
                              reason="starts job processes (minutes on 2 cores): set SAMCL_SLOW_TESTS=1")
    return pytest.mark.slow(skip(test))


def has_submitit() -> bool:
    try:
        import submitit  # noqa: F401
    except ImportError:
        return False
    return True


SUBMITIT = pytest.mark.skipif(not has_submitit(), reason=f"submitit is not installed ({sweep_launch.INSTALL_SUBMITIT})")


def argv_for(data, out, methods="zeroshot,finetune", orders=1, seeds=1, epoch=1, *extra):
    return ["--methods", methods, "--orders", str(orders), "--seeds", str(seeds), "--config", DEMO,
            "--data_root", str(data), "--device", "cpu", "--order", "polyp_shadow_natural", "--unseen", "natural",
            "--epoch", str(epoch), "--set", "num_embedding=3", "--set", "batch_size=2", "--set", "selector_epochs=2",
            "--set", "val_every=0", "--num_workers", "0", "--output", str(out), *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch_data")
    make_demo_data(root, n_train=4, n_test=2)
    return root


def plan_of(argv):
    return sweep.plan_from_args(sweep.build_parser().parse_args(argv))


def comparable(run_dir: Path):
    """What a run's result is: its files' checksums (run.json) and its metrics but for timings."""
    manifest = json.loads((run_dir / "run.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = [{k: v for k, v in s.items() if k not in ("seconds", "training_seconds")} for s in metrics["steps"]]
    files = {k: v for k, v in manifest["files"].items() if k != "metrics.json"}  # metrics.json holds the timings
    return files, metrics["accuracy_matrix"], steps


# ----------------------------------------------------------------------------- small parts
def test_slurm_times_and_extra_options():
    assert [sweep_launch.slurm_minutes(t) for t in ("90", "1:30", "12:00:00", "2-00:00:00", "1-06", "0:0:30")] == [
        90, 2, 720, 2880, 1800, 1]
    with pytest.raises(CLIError, match="SLURM's format"):
        sweep_launch.slurm_minutes("two hours")
    assert sweep_launch.parse_extra(["account=proj", "--qos=high", "constraint=a100|h100"]) == {
        "account": "proj", "qos": "high", "constraint": "a100|h100"}
    with pytest.raises(CLIError, match="KEY=VALUE"):
        sweep_launch.parse_extra(["account"])


def test_the_slurm_launcher_without_submitit_says_how_to_install_it(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    out = tmp_path / "sweep"
    with pytest.raises(CLIError, match=r"submitit, which is not installed: pip install 'samcl\[slurm\]'"):
        sweep.main(argv_for(data, out, "zeroshot", 1, 1, 1, "--launcher", "slurm"))
    assert not out.exists()  # refused before anything is written


def test_the_dry_run_prints_the_plan_and_its_cost_without_training(data, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep.main(argv_for(data, out, "samcl,zeroshot", 2, 2, 3, "--dry_run", "--images_per_second", "2")) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "8 run(s) = 2 method(s) x 2 order(s) x 2 seed(s); 3 epoch(s) per domain" in text
    assert "order0: polyp shadow natural\norder1: shadow polyp natural" in text and "seeds: 1234, 1235" in text
    assert "images (train/test): polyp 4/2, shadow 4/2, natural 4/2" in text
    # per run: 3 epochs x (4 + 4) trained images; evaluated after step t: domains 0..t+1, 2 test images each
    # (2 + 3 + 3 domains) -> 16; samcl: 4 runs x (24 / 2 + 16 / 2) s; zeroshot trains nothing: 4 x 16 / 2 s
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.split()[:1] in (["samcl"], ["zeroshot"])}
    assert rows["samcl"][1:4] == ["4", "96", "64"] and rows["zeroshot"][1:4] == ["4", "0", "64"]
    assert float(rows["samcl"][-1]) == pytest.approx(round(4 * (24 / 2 + 16 / 2) / 3600, 5), rel=1e-2)
    assert float(rows["zeroshot"][-1]) == pytest.approx(4 * 16 / 2 / 3600, rel=1e-2)
    assert f"total: {4 * (20 + 8) / 3600:.3g} device-hour(s) for 8 run(s)" in text
    with pytest.raises(CLIError, match="--measure .* or --images_per_second"):
        sweep.main(argv_for(data, out, "samcl", 1, 1, 1, "--dry_run"))
    # splits not under the data root: unknown, unless --assume_images says how many
    assert sweep.main(argv_for(tmp_path, out, "finetune", 1, 1, 1, "--dry_run", "--images_per_second", "1")) == 0
    assert "polyp unknown/unknown" in capsys.readouterr().out
    assert sweep.main(argv_for(tmp_path, out, "finetune", 1, 1, 1, "--dry_run", "--images_per_second", "1",
                               "--assume_images", "10")) == 0
    assert "polyp 10/10" in capsys.readouterr().out and not out.exists()


def test_measure_times_a_training_step_of_each_method_here(data, tmp_path, capsys):
    plan, out = plan_of(argv_for(data, tmp_path / "sweep", "finetune"))
    speeds = sweep_estimate.measure(plan, torch.device("cpu"), steps=1)
    assert list(speeds) == ["finetune"] and all(0 < s < 1e6 for s in speeds["finetune"])
    assert not out.exists()


# ----------------------------------------------------------------------------- status and summary
def test_status_and_summarise_in_every_state(data, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = argv_for(data, out, "zeroshot,finetune", 1, 3, 1, "--order", "polyp_natural")  # a short order: fast
    plan, _ = plan_of(argv)
    sweep.open_sweep(plan, out)  # sweep.json, as a launcher writes it
    ops = sweep.SWEEP_OPS
    runs = [r.folder for r in plan.runs]
    assert runs == [f"{m}/order0_seed{s}" for m in ("zeroshot", "finetune") for s in (1234, 1235, 1236)]
    # done: a job run here
    assert sweep_launch.run_job(out, runs[0], "cpu", None, ops) == "done"
    assert json.loads((out / "launch" / "zeroshot__order0_seed1234.json").read_text())["state"] == "done"
    # queued; failed (as a job records it); interrupted: a partial epoch and nobody holding the lock
    sweep_launch.write_state(out, runs[1], "queued", log="q.log")
    sweep_launch.write_state(out, runs[2], "failed", error="DataError: x.jpg is corrupt", log="f.log")
    (out / runs[3] / "partial").mkdir(parents=True)
    torch.save({"epoch": 0}, out / runs[3] / "partial" / "polyp.pt")
    sweep_launch.write_state(out, runs[3], "running", pid=1)
    with RunLock(out / runs[4]):  # running: the run folder's lock is held
        rows = sweep_launch.status_rows(out, ops)
    assert [(r["run"], r["state"], r["reached"]) for r in rows] == [
        (runs[0], "done", "2/2 domains"), (runs[1], "queued", "0/2 domains"), (runs[2], "failed", "0/2 domains"),
        (runs[3], "interrupted", "0/2 domains, polyp epoch 1/1"), (runs[4], "running", "0/2 domains"),
        (runs[5], "not started", "0/2 domains")]
    assert rows[2]["error"] == "DataError: x.jpg is corrupt" and rows[2]["log"] == "f.log"
    assert rows[4]["where"] == f"pid {os.getpid()} on {os.uname().nodename}"
    assert sweep.main(["--status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "error: DataError: x.jpg is corrupt\n    log: f.log" in text
    assert text.strip().splitlines()[-1] == "1 done, 1 queued, 1 failed, 1 interrupted, 2 not started"  # lock freed
    # --summarise waits for the summary's lock, then writes what has finished
    (out / "summary.csv").unlink()
    lock = RunLock(out, sweep_launch.SUMMARY_LOCK).acquire()
    threading.Timer(1.0, lock.release).start()
    start = time.time()
    assert sweep.main(["--summarise", str(out)]) == 0
    assert time.time() - start >= 0.9
    with open(out / "summary.csv") as f:
        assert [(r["method"], r["runs"]) for r in csv.DictReader(f)] == [("zeroshot", "1"), ("finetune", "0")]
    assert "1 finished run(s)" in capsys.readouterr().out
    with pytest.raises(CLIError, match="not a sweep folder"):
        sweep.main(["--status", str(tmp_path)])


# ----------------------------------------------------------------------------- jobs
@SLOW
@SUBMITIT
def test_a_failing_job_is_reported_and_the_others_finish(tmp_path, capsys):
    make_demo_data(tmp_path, n_train=4, n_test=2)
    bad = tmp_path / "data" / "Shadow" / "train" / "images" / "shadow_000.jpg"
    bad.write_bytes(b"not an image")  # finetune fails at shadow; zeroshot reads no training image
    out = tmp_path / "sweep"
    rc = sweep.main(argv_for(tmp_path, out, "zeroshot,finetune", 1, 1, 1, "--launcher", "slurm", "--slurm_cluster",
                             "local", "--slurm_cpus_per_run", "1"))
    assert rc == 1
    assert "1 run(s) failed: finetune/order0_seed1234" in capsys.readouterr().err
    log = (out / "sweep_log.txt").read_text()
    job = json.loads((out / "launch" / "finetune__order0_seed1234.job.json").read_text())
    assert f"finetune/order0_seed1234: FAILED (log {job['log']};" in log and f"DataError: {bad}" in log
    assert Path(job["log"]).is_file() and f"DataError: {bad}" in Path(job["log"]).read_text()
    rows = {r["run"]: r for r in sweep_launch.status_rows(out, sweep.SWEEP_OPS)}
    assert rows["zeroshot/order0_seed1234"]["state"] == "done"
    assert rows["finetune/order0_seed1234"]["state"] == "failed"
    assert rows["finetune/order0_seed1234"]["reached"] == "1/3 domains"  # polyp finished before shadow failed
    with open(out / "summary.csv") as f:
        assert [(r["method"], r["runs"]) for r in csv.DictReader(f)] == [("zeroshot", "1"), ("finetune", "0")]


@SLOW
def test_local_parallel_runs_equal_the_serial_ones(data, tmp_path):
    methods = "samcl,finetune,er"
    parallel = tmp_path / "parallel"
    assert sweep.main(argv_for(data, parallel, methods, 2, 1, 1, "--launcher", "local", "--parallel", "2")) == 0
    # a CPU run's last bits depend on its thread count: the serial sweep with a job's share of the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        serial = tmp_path / "serial"
        assert sweep.main(argv_for(data, serial, methods, 2)) == 0
    finally:
        torch.set_num_threads(threads)
    plan, _ = plan_of(argv_for(data, serial, methods, 2))
    assert len(plan.runs) == 6
    for r in plan.runs:
        assert comparable(parallel / r.folder) == comparable(serial / r.folder), r.folder
    log = (parallel / "sweep_log.txt").read_text()
    assert log.count(": started, pid ") == 6 and log.count(": done (log ") == 6
    assert (parallel / "summary.csv").read_text() .count("\n") == 4  # header + 3 methods


@SLOW
def test_a_killed_job_is_resumed_not_restarted(data, tmp_path):
    out = tmp_path / "sweep"
    argv = argv_for(data, out, "finetune", 1, 1, 2)
    plan, _ = plan_of(argv)
    sweep.open_sweep(plan, out)
    folder = plan.runs[0].folder
    run = out / folder
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "samcl.sweep", "--job", str(out), folder, "--device", "cpu",
                             "--threads", "1"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "partial" / "shadow.pt").exists():  # shadow has finished an epoch
        assert proc.poll() is None and time.time() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    polyp = (run / "polyp.safetensors").read_bytes()
    row = sweep_launch.status_rows(out, sweep.SWEEP_OPS)[0]
    assert (row["state"], row["reached"]) == ("interrupted", "1/3 domains, shadow epoch 1/2")
    # the sweep called again (one job: as many threads as the killed one had on this 2-core machine)
    assert sweep.main(argv + ["--launcher", "local", "--parallel", str(os.cpu_count() or 1)]) == 0
    assert (run / "polyp.safetensors").read_bytes() == polyp  # a finished domain is never trained again
    run_log = (run / "log.txt").read_text()
    assert "shadow: resuming after epoch 1" in run_log and run_log.count("polyp epoch 1/2") == 1
    # equal to an uninterrupted run with the same threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = tmp_path / "reference"
        assert sweep.main(argv_for(data, reference, "finetune", 1, 1, 2)) == 0
    finally:
        torch.set_num_threads(threads)
    assert comparable(run) == comparable(reference / folder)


@SLOW
@SUBMITIT
def test_a_preempted_job_is_requeued_and_resumes_from_its_last_saved_epoch(data, tmp_path):
    import submitit

    out = tmp_path / "sweep"
    argv = argv_for(data, out, "finetune", 1, 1, 2, "--launcher", "slurm", "--slurm_cluster", "local",
                    "--slurm_cpus_per_run", "1")
    args = sweep.build_parser().parse_args(argv)
    plan, _ = sweep.plan_from_args(args)
    sweep.open_sweep(plan, out)
    folder = plan.runs[0].folder
    run = out / folder
    job = sweep_launch.submitit_executor(out, args).submit(sweep_launch.RunJob(out, folder, "cpu", 1, sweep.SWEEP_OPS))
    deadline = time.time() + 300
    while not (run / "partial" / "shadow.pt").exists():  # shadow has finished an epoch
        assert not job.done() and time.time() < deadline, "the job ended before it could be stopped"
        time.sleep(0.05)
    polyp = (run / "polyp.safetensors").read_bytes()
    # the signal SLURM sends a job before pre-empting it (or at its time limit), to the job's process
    os.kill(json.loads((out / "launch" / "finetune__order0_seed1234.json").read_text())["pid"], signal.SIGUSR2)
    assert job.result() == "done"
    assert (run / "polyp.safetensors").read_bytes() == polyp
    run_log = (run / "log.txt").read_text()
    assert "shadow: resuming after epoch 1" in run_log and run_log.count("polyp epoch 1/2") == 1
    assert "this job is preempted" in Path(job.paths.stderr).read_text() + Path(job.paths.stdout).read_text()
    assert isinstance(sweep_launch.RunJob(out, folder, "cpu", 1, sweep.SWEEP_OPS).checkpoint(),
                      submitit.helpers.DelayedSubmission)
    assert json.loads((run / "run.json").read_text())["completed"] == ["polyp", "shadow", "natural"]
