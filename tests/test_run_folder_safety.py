"""A run folder's history cannot be rewritten: a resume may only append, a hand-edited config.yaml is
reported, another script family is said, every stop says how to continue, one process writes a
folder at a time (the OS's lock), and a full disk leaves the folder at its last commit or saved epoch."""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from samcl import pipeline
from samcl.commands.train import PEER_DIED, peer_failure
from samcl.config import CONFIG_DIR, load_config
from samcl.demo import make_demo_data
from samcl.lock import LOCK_FILE, RunFolderLocked, RunLock
from samcl.run_folder import verify_files
from tests.conftest import REPO
from tests.test_method_resume import comparable

CPU = torch.device("cpu")
ORDER = "polyp_shadow_natural"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    make_demo_data(root, n_train=4, n_test=2)
    return root


def settings(root: Path, run_dir: Path, **more) -> dict:
    return {"data_root": str(root), "run_dir": str(run_dir), "epoch": 2, "num_embedding": 2, "batch_size": 2,
            "val_every": 2, "selector_epochs": 2, "order": ORDER, "unseen": ["natural"], "num_workers": 0, **more}


def flags(values: dict) -> list:
    out = []
    for k, v in values.items():
        out += [f"--{k}", *map(str, v)] if isinstance(v, list) else [f"--{k}", str(v)]
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run every stopped-and-resumed one must equal."""
    run = tmp_path_factory.mktemp("reference") / "run"
    pipeline.train(load_config(CONFIG_DIR / "demo_sam.yaml", settings(data, run)), CPU)
    return run


@pytest.fixture
def finished(reference, tmp_path):
    """A copy of the finished reference run to resume."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


def train_py(*args: str, script: str = "train.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args, "--device", "cpu"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def folder_bytes(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- what a resume may change
def test_a_resume_may_not_make_a_trained_domain_unseen(finished):
    before = folder_bytes(finished)
    r = train_py("--resume", str(finished), "--unseen", "polyp", "natural")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert (f"error: {finished}: polyp was trained (it has a learning module); this resume would make it test-only "
            f"(unseen), but a finished step's role is fixed. --unseen on a resume may name only domains not "
            f"finished yet (none: every domain of the order is done) besides the run's own (natural)") in r.stderr
    assert folder_bytes(finished) == before


def test_a_resume_may_not_train_a_finished_test_only_domain(finished):
    before = folder_bytes(finished)
    r = train_py("--resume", str(finished), "--unseen")
    assert r.returncode == 2, r.stderr
    assert (f"{finished}: natural was finished as a test-only (unseen) domain; this resume would make it a trained "
            f"one") in r.stderr
    assert folder_bytes(finished) == before


def test_unseen_on_a_resume_may_name_the_domains_it_adds(data, tmp_path):
    run = tmp_path / "run"
    pipeline.train(load_config(CONFIG_DIR / "demo_sam.yaml", settings(data, run, order="polyp_natural", epoch=1)),
                   CPU)
    r = train_py("--resume", str(run), "--order", "polyp_natural_shadow_lesion", "--unseen", "natural", "lesion")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["completed"] == ["polyp", "natural", "shadow", "lesion"]
    assert manifest["unseen"] == ["natural", "lesion"] and sorted(manifest["modules"]) == ["polyp", "shadow"]


def test_a_hand_edited_config_yaml_is_reported_and_the_runs_settings_used(finished):
    path = finished / "config.yaml"
    edited = yaml.safe_load(path.read_text())
    edited.update(lr=0.5, epoch=9)
    path.write_text(yaml.safe_dump(edited, sort_keys=False))
    r = train_py("--resume", str(finished))
    assert r.returncode == 0, r.stderr[-2000:]
    line = [x for x in r.stdout.splitlines() if "config.yaml differs" in x]
    assert len(line) == 1 and line[0].endswith("config.yaml differs from the run's settings in epoch, lr; the run's "
                                               "settings are used (run.json), and the file is rewritten with them")
    stored = json.loads((finished / "run.json").read_text())["config"]
    assert yaml.safe_load(path.read_text()) == stored and (stored["lr"], stored["epoch"]) == (0.005, 2)


def test_another_familys_script_resumes_the_run_with_its_own_backbone_and_says_so_first(finished):
    r = train_py("--resume", str(finished), script="train_SAM2.py")
    assert r.returncode == 0, r.stderr[-2000:]
    first = r.stdout.splitlines()[0]
    assert first.endswith(f"{finished} is a SAM (ViT) run (sam/vit_tiny), resumed with train_SAM2.py: it goes on with "
                          f"its own backbone (train.py is its script)")
    assert first in (finished / "log.txt").read_text()


# ----------------------------------------------------------------------------- a stop says how to go on
def continue_hint(run: Path) -> str:
    return (f"; the run folder {run} keeps every finished domain and the last saved epoch; once this is fixed, "
            f"continue it with: python train.py --resume {run} (or start it over: the same command with --overwrite)")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _resize_mask(path: Path) -> None:
    Image.open(path).resize((17, 9)).save(path)


@pytest.mark.parametrize("damage, needle", [(_truncate, "shadow_000.jpg"), (_resize_mask, "shadow_000.png is 17x9")],
                         ids=["truncated-jpeg", "mask-of-another-size"])
def test_a_data_error_while_training_says_how_to_continue_and_the_resume_finishes_the_run(
        damage, needle, data, reference, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    name = "images/shadow_000.jpg" if damage is _truncate else "masks/shadow_000.png"
    victim = root / "data" / "Shadow" / "train" / name
    good = victim.read_bytes()
    damage(victim)
    run = tmp_path / "run"
    r = train_py("--config", "configs/demo_sam.yaml", *flags(settings(root, run)))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert r.stderr.rstrip().endswith(continue_hint(run)), r.stderr
    assert json.loads((run / "run.json").read_text())["completed"] == ["polyp"]  # the data error came in shadow
    victim.write_bytes(good)
    r = train_py("--resume", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert comparable(run) == comparable(reference)


def test_the_test_script_reads_the_verified_snapshot_and_says_when_the_export_copy_differs(finished, data):
    latest = finished / "Module_Selector.safetensors"
    latest.write_bytes(b"\x80\x04 a pickle, not a selector")
    out = subprocess.run([sys.executable, "test.py", "--config", "configs/demo_sam.yaml", "--run_dir", str(finished),
                          "--data_root", str(data), "--device", "cpu", "--no_vanilla", "--num_workers", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (f"{latest} is not the selector run.json records (changed, replaced or missing); it is a copy for "
            f"export, not read: the run is tested with selector/after_natural.safetensors") in out.stdout
    report = json.loads((finished / "test_metrics.json").read_text())
    assert report["results"]["polyp"]["selector_accuracy"] is not None  # routed by the verified snapshot


# ----------------------------------------------------------------------------- a rank that died
PEER = """
import os, sys, torch, torch.distributed as dist
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
dist.barrier()
if rank == 1:
    os._exit(9)  # dies without a word, as a process the kernel's OOM killer ends
os.environ.update(RANK="0", WORLD_SIZE="2")
from samcl.commands.train import training_processes
from samcl.cli import run_script
def main():
    with training_processes():
        torch.distributed.all_reduce(torch.ones(1))
        torch.distributed.all_reduce(torch.ones(1))
run_script(main)
"""


def test_a_rank_that_sees_another_die_names_the_likely_cause_first(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", PEER, str(rank), port], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    survivor = outs[0][1]
    assert procs[0].returncode != 0 and procs[1].returncode == 9
    assert survivor.startswith(f"[rank 0/2] {PEER_DIED}\n[rank 0/2] failed: "), survivor[-2000:]
    assert peer_failure(RuntimeError(survivor.splitlines()[1]))
    assert not peer_failure(RuntimeError("CUDA out of memory"))


# ----------------------------------------------------------------------------- the lock
def test_a_second_writer_is_refused_at_once_naming_the_holder(finished, data):
    before = folder_bytes(finished)
    with RunLock(finished):
        for args in (["--resume", str(finished)],
                     ["--config", "configs/demo_sam.yaml", *flags(settings(data, finished)), "--overwrite"]):
            r = train_py(*args)
            assert r.returncode == 2, r.stderr
            assert (f"error: run folder {finished} is in use: pid {os.getpid()} on host {socket.gethostname()} "
                    f"since ") in r.stderr
            assert f"is training in it (lock {finished / LOCK_FILE}); wait for it to end or stop it" in r.stderr
    assert {k: v for k, v in folder_bytes(finished).items() if k != LOCK_FILE} == \
        {k: v for k, v in before.items() if k != LOCK_FILE}
    with RunLock(finished):  # released: taken again, in this process too
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    code = ("import os, signal, sys; from samcl.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print(os.getpid(), flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", code, str(run)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    with caplog.at_level(logging.WARNING, logger="samcl.lock"), RunLock(run) as lock:
        assert lock.holder()["pid"] == os.getpid()
    assert f"taking over the lock left by pid {r.stdout.strip()} on host {socket.gethostname()} since" in caplog.text
    assert (run / LOCK_FILE).read_text() == ""  # a clean release leaves no holder behind
    with pytest.raises(RunFolderLocked):
        with RunLock(run), RunLock(run):
            pass


# ----------------------------------------------------------------------------- a full disk
# Runs train.py with the file-size limit lowered (RLIMIT_FSIZE) from the start, or at the moment a
# step of a domain saves its module or commits: the write that crosses it fails with EFBIG, as one
# on a full disk fails with ENOSPC. SIGXFSZ is ignored, so the write returns the error.
LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
point, limit = sys.argv[1], int(sys.argv[2])
def limit_now():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
from samcl import run_state
if point == "start":
    limit_now()
else:
    name, domain = point.split(":")
    original = getattr(run_state.RunState, name)
    def limited(self, d, *args):
        if d == domain:
            limit_now()
        return original(self, d, *args)
    setattr(run_state.RunState, name, limited)
from samcl.cli import run_script
from samcl.commands.train import train_main
run_script(train_main, "sam", "", sys.argv[3:])
"""


@pytest.mark.parametrize("point, limit, victim", [
    ("start", 20_000, "partial/polyp.pt"),  # the first epoch's partial file (module + Adam state)
    ("save_step:shadow", 5_000, "shadow.safetensors"),  # the module file of the second domain
    ("commit:shadow", 5_000, "metrics.json"),  # the second domain's commit
], ids=["partial-epoch", "module", "commit"])
def test_a_full_disk_leaves_the_last_commit_and_the_resume_equals_the_uninterrupted_run(
        point, limit, victim, data, reference, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-c", LIMITED, point, str(limit), "--config", "configs/demo_sam.yaml", "--device", "cpu",
            *flags(settings(data, run))]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: [Errno 27] cannot write {run / victim}: File too large (") and " MB free on its " \
        "disk); the file is as it was before" in last, last
    assert last.endswith(continue_hint(run))
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["completed"] == ([] if point == "start" else ["polyp"])
    # every file of the finished steps is as committed (the latest selector, rewritten by every step before
    # its commit, may be a step ahead, as after a kill there)
    verify_files(run, manifest["files"], [f for f in manifest["files"] if f != "Module_Selector.safetensors"])
    assert not list(run.rglob(".*.tmp"))  # no half-written file is left
    r = train_py("--resume", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    assert comparable(run) == comparable(reference)
