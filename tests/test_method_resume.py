"""Every registered method, killed with SIGKILL in the middle of a run, resumes to exactly the run
it would have been uninterrupted: its modules, its own files (replay buffers, Fishers, selectors)
and every measured number (CPU, deterministic)."""
import json
import subprocess
import sys

import pytest
import torch

from samcl import pipeline
from samcl.config import CONFIG_DIR, load_config
from samcl.demo import make_demo_data
from samcl.registry import METHODS
from samcl.sweep_plan import method_settings
from tests.conftest import REPO

CPU = torch.device("cpu")

# Runs train.py in this process after patching the run state so that the process kills itself
# with SIGKILL at one point: right after the partial file of (domain, epoch) is written, or, with
# epoch -1, right after the step of `domain` commits. A kill from inside is exact where a kill from
# outside races the training.
KILLER = """
import os, signal, sys
from samcl import run_state
domain, epoch = sys.argv[1], int(sys.argv[2])
save_partial, commit = run_state.RunState.save_partial, run_state.RunState.commit
def partial_then_kill(self, d, module, opt, sched, loader, e, history):
    save_partial(self, d, module, opt, sched, loader, e, history)
    if (d, e) == (domain, epoch):
        os.kill(os.getpid(), signal.SIGKILL)
def commit_then_kill(self, d):
    commit(self, d)
    if (d, -1) == (domain, epoch):
        os.kill(os.getpid(), signal.SIGKILL)
run_state.RunState.save_partial, run_state.RunState.commit = partial_then_kill, commit_then_kill
from samcl.commands.train import train_main
train_main("sam", "", sys.argv[3:])
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("method_resume")
    make_demo_data(root, n_train=4, n_test=2)
    return root


def settings(label, root, run_dir):
    """``label``: a method, or a named variant as the sweep's (samcl:ncm)."""
    named = method_settings(label)
    kinds = METHODS.get(named["method"]).learning_modules
    return {**named, "learning_module": kinds[0] if kinds else "lora", "data_root": str(root),
            "run_dir": str(run_dir), "epoch": 3, "num_embedding": 2, "batch_size": 2, "val_every": 2,
            "selector_epochs": 2, "replay_size": 3, "order": "polyp_shadow_natural", "num_workers": 0}


def kill_point(method):
    """(domain, epoch) to die at: an epoch in the middle of a domain that trains, else after a commit."""
    if method == "zeroshot":
        return "polyp", -1  # nothing trains: die between two steps
    if method == "joint":
        return "polyp", 1  # the only training: the union, at the first step
    return "shadow", 1  # the second domain, after its second epoch of three


def comparable(run_dir):
    steps = json.loads((run_dir / "metrics.json").read_text())["steps"]
    for s in steps:  # wall-clock fields differ between any two runs
        s.pop("seconds")
        s.pop("training_seconds")
    files = json.loads((run_dir / "run.json").read_text())["files"]
    files.pop("metrics.json")  # holds the wall-clock fields
    return steps, files


# and SAMCL routed by nearest means, whose state grows by a domain a step (knn is rebuilt from the buffer at
# every step, the oracle keeps nothing: both resume through the mlp run's buffer and modules)
@pytest.mark.parametrize("method", METHODS.names() + ["samcl:ncm"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(method, data, tmp_path):
    reference = tmp_path / "uninterrupted"
    pipeline.train(load_config(CONFIG_DIR / "demo_sam.yaml", settings(method, data, reference)), CPU)

    killed = tmp_path / "killed"
    domain, epoch = kill_point(method)
    args = [sys.executable, "-c", KILLER, domain, str(epoch), "--config", "configs/demo_sam.yaml", "--device", "cpu"]
    for k, v in settings(method, data, killed).items():
        args += [f"--{k}", str(v)]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == -9, r.stdout[-3000:] + r.stderr[-3000:]  # it died by SIGKILL where it should
    done = json.loads((killed / "run.json").read_text())["completed"]
    assert done == (["polyp"] if domain == "shadow" or epoch == -1 else [])
    assert (killed / "partial" / f"{domain}.pt").is_file() == (epoch >= 0)

    r = subprocess.run([sys.executable, "train.py", "--resume", str(killed), "--device", "cpu"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if epoch >= 0:
        assert f"{domain}: resuming after epoch {epoch + 1}" in r.stdout
    assert comparable(killed) == comparable(reference)
    assert json.loads((killed / "run.json").read_text())["completed"] == ["polyp", "shadow", "natural"]
    assert not (killed / "partial").exists()
