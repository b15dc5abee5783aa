"""Entry points: ``--help`` answers without importing torch or a backbone package, and every
process ends promptly after its last line with its files complete and the right exit status."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from samcl.demo import make_demo_data
from tests.conftest import REPO

HEAVY = ("torch", "segment_anything", "sam2")
# Records (on stderr, with the importing stack) every import of a heavy package, then lets it
# proceed, so the entry point behaves exactly as it does for a user.
WATCH = f"""
import runpy, sys, traceback
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            sys.stderr.write(f"HEAVY IMPORT {{name}}\\n" + "".join(traceback.format_stack(limit=12)))
            sys.stderr.flush()
        return None
sys.meta_path.insert(0, Watch())
"""
# entry point -> how the command line (or the console script pip writes) starts it
ENTRY_POINTS = {
    "train.py": "runpy.run_path('train.py', run_name='__main__')",
    "test.py": "runpy.run_path('test.py', run_name='__main__')",
    "train_SAM2.py": "runpy.run_path('train_SAM2.py', run_name='__main__')",
    "test_SAM2.py": "runpy.run_path('test_SAM2.py', run_name='__main__')",
    "generate_point.py": "runpy.run_path('generate_point.py', run_name='__main__')",
    "python -m samcl.demo": "runpy.run_module('samcl.demo', run_name='__main__', alter_sys=True)",
    "python -m samcl.weights": "runpy.run_module('samcl.weights', run_name='__main__', alter_sys=True)",
    "python -m samcl.datacheck": "runpy.run_module('samcl.datacheck', run_name='__main__', alter_sys=True)",
    "python -m samcl.sweep": "runpy.run_module('samcl.sweep', run_name='__main__', alter_sys=True)",
    "samcl-train": "from samcl.scripts import train; sys.exit(train())",
    "samcl-test": "from samcl.scripts import test; sys.exit(test())",
    "samcl-points": "from samcl.scripts import points; sys.exit(points())",
    "samcl-demo": "from samcl.scripts import demo; sys.exit(demo())",
    "samcl-app": "from samcl.scripts import app; sys.exit(app())",
    "python -m samcl.app": "runpy.run_module('samcl.app', run_name='__main__', alter_sys=True)",
}


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_imports_no_heavy_package(name):
    code = WATCH + f"sys.argv = [{name.split()[-1]!r}, '--help']\n" + ENTRY_POINTS[name] + "\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY IMPORT" not in r.stderr, r.stderr
    assert r.stdout.startswith("usage:") and "--help" in r.stdout


def test_console_scripts_show_the_top_level_scripts_help():
    """samcl-train --help is train.py --help (the same text; under its own name, which argparse takes
    from sys.argv[0] and aligns the usage lines on, so the name is the script's here)."""
    for script, entry in (("train.py", "train"), ("test.py", "test"), ("generate_point.py", "points")):
        top = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True).stdout
        console = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = [{script!r}, '--help']; "
                                  f"from samcl.scripts import {entry}; {entry}()"],
                                 cwd=REPO, capture_output=True, text=True).stdout
        assert console == top and "python " + script in top


# ----------------------------------------------------------------------------- prompt exit
# After the last line a process flushes its streams and logging and leaves; the interpreter's
# teardown of torch took 0.3-0.8 s on an idle machine before (samcl.cli.exit_now).
MAX_EXIT_LAG_S = 0.5


def run_timed(args: List[str], cwd: Path = REPO) -> Tuple[int, str, float]:
    """(exit status, stdout + stderr, seconds from the last output line to the exit)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines arrive when printed, not when flushed at the end
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines, last = [], time.monotonic()
    for line in proc.stdout:  # until end of file: every process holding the pipe (workers too) has ended
        last = time.monotonic()
        lines.append(line.decode())
    code = proc.wait()
    return code, "".join(lines), time.monotonic() - last


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit")
    make_demo_data(root, n_train=4, n_test=2, points=False)
    return root


def test_scripts_end_promptly_with_complete_files(data):
    r = run_timed(["generate_point.py", "--data_root", str(data)])
    assert r[0] == 0 and r[2] < MAX_EXIT_LAG_S, r
    for split in (data / "data").glob("*/*"):
        assert len(json.loads((split / "masks" / "points.json").read_text())) == (4 if split.name == "train" else 2)

    run = data / "run"
    common = ["--config", "configs/demo_sam.yaml", "--data_root", str(data), "--device", "cpu",
              "--order", "polyp_natural", "--num_embedding", "3", "--run_dir", str(run)]
    # loader worker processes too: they must be gone when the script ends
    r = run_timed(["train.py", *common, "--epoch", "1", "--batch_size", "4", "--num_workers", "2"])
    assert r[0] == 0 and r[2] < MAX_EXIT_LAG_S, r
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["completed"] == ["polyp", "natural"] and not (run / "partial").exists()
    log = (run / "log.txt").read_text().splitlines()
    assert log and log[-1].split(" ", 2)[-1].strip() in r[1]  # the log file holds the last message too

    r = run_timed(["test.py", *common, "--no_vanilla"])
    assert r[0] == 0 and r[2] < MAX_EXIT_LAG_S, r
    report = json.loads((run / "test_metrics.json").read_text())
    assert sorted(report["results"]) == ["natural", "polyp"] and (run / "test_log.txt").read_text()

    # an explained error once torch is loaded: one line, exit status 2, as prompt
    r = run_timed(["test.py", *common, "--device", "cuda:99"])
    assert r[0] == 2 and r[2] < MAX_EXIT_LAG_S, r
    assert r[1].strip().splitlines()[-1].startswith("error: --device cuda:99") and "Traceback" not in r[1]


RUN_SCRIPT = """
import logging, sys
from samcl.cli import CLIError, run_script
logging.basicConfig(filename=sys.argv[2], level=logging.INFO)
def main():
    print("buffered line", end="")  # stdout is a pipe: block-buffered until run_script flushes it
    logging.info("logged line")
    outcome = sys.argv[1]
    if outcome == "error":
        raise CLIError("a problem the user can fix")
    if outcome == "bug":
        raise RuntimeError("a bug")
    if outcome == "exit":
        sys.exit("a message")
    return {"ok": None, "code": 3}[outcome]
run_script(main)
"""


@pytest.mark.parametrize("outcome,code", [("ok", 0), ("code", 3), ("error", 2), ("exit", 1), ("bug", 1)])
def test_run_script_flushes_and_exits_with_the_right_status(tmp_path, outcome, code):
    log = tmp_path / "log.txt"
    r = subprocess.run([sys.executable, "-c", RUN_SCRIPT, outcome, str(log)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == code and r.stdout == "buffered line", r
    assert "logged line" in log.read_text()
    assert {"ok": "", "code": "", "error": "error: a problem the user can fix\n", "exit": "a message\n"}.get(
        outcome, "Traceback") in r.stderr
    assert ("Traceback" in r.stderr) == (outcome == "bug")  # a bug keeps its traceback and the ordinary exit
