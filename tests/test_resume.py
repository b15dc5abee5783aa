"""Durable run folders: kill and resume, adding domains, corrupt files, foreign setups."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from samcl import pipeline
from samcl.backbones.sam import build_sam
from samcl.config import CONFIG_DIR, load_config
from samcl.lock import LOCK_FILE
from samcl.demo import make_demo_data
from samcl.io import read_tagged
from samcl.run_folder import RunFolderError, load_selector, sha256_file
from tests.conftest import REPO

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    make_demo_data(root, n_train=8, n_test=3)
    return root


def settings(root, run_dir, **kw):
    return {"data_root": str(root), "run_dir": str(run_dir), "epoch": 4, "num_embedding": 4, "batch_size": 4,
            "val_every": 2, "selector_epochs": 3, "order": "polyp_shadow_natural", "num_workers": 0, **kw}


def module_tensors(path):
    return read_tagged(path, "module file")["state_dict"]


def comparable_steps(run_dir):
    steps = json.loads((run_dir / "metrics.json").read_text())["steps"]
    for s in steps:  # wall-clock fields differ between any two runs
        s.pop("seconds")
        s.pop("training_seconds")
    return steps


def test_sigkill_during_second_domain_then_resume_equals_uninterrupted(data, tmp_path):
    reference = tmp_path / "uninterrupted"
    pipeline.train(load_config(CONFIG_DIR / "demo_sam.yaml", settings(data, reference)), CPU)

    killed = tmp_path / "killed"
    args = [sys.executable, "train.py", "--config", "configs/demo_sam.yaml", "--device", "cpu"]
    for k, v in settings(data, killed).items():
        args += [f"--{k}", str(v)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "partial" / "shadow.pt").exists():  # shadow has finished an epoch
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((killed / "run.json").read_text())["completed"] == ["polyp"]
    polyp_bytes = (killed / "polyp.safetensors").read_bytes()

    r = subprocess.run([sys.executable, "train.py", "--resume", str(killed), "--device", "cpu"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming" in r.stdout and "shadow: resuming after epoch" in r.stdout
    assert (killed / "polyp.safetensors").read_bytes() == polyp_bytes  # a finished module is never rewritten
    for d in ("polyp", "shadow"):
        a, b = module_tensors(reference / f"{d}.safetensors"), module_tensors(killed / f"{d}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), d
    assert comparable_steps(killed) == comparable_steps(reference)
    assert json.loads((killed / "run.json").read_text())["completed"] == ["polyp", "shadow", "natural"]


def test_adding_a_domain_to_a_finished_run(data, tmp_path):
    run = tmp_path / "run"
    pipeline.train(load_config(CONFIG_DIR / "demo_sam.yaml", settings(data, run, order="polyp_natural")), CPU)
    before = {f: (run / f).read_bytes() for f in ("polyp.safetensors", "embedding_buffer/polyp.safetensors",
                                                  "embedding_buffer/natural.safetensors",
                                                  "selector/after_natural.safetensors")}
    old_selector, _ = load_selector(run / "selector/after_natural.safetensors")

    # the old domains' training images are never needed again: only the buffer
    hidden = data / "hidden_polyp_train"
    shutil.move(data / "data/Polyp/train", hidden)
    try:
        metrics = pipeline.resume(run, {"order": "polyp_natural_shadow", "data_root": str(data)}, CPU)
    finally:
        shutil.move(hidden, data / "data/Polyp/train")

    assert all((run / f).read_bytes() == b for f, b in before.items())
    selector, domains = load_selector(run / "Module_Selector.safetensors")
    assert domains == ["polyp", "natural", "shadow"] and selector.num_domains == old_selector.num_domains + 1 == 3
    iou = metrics["accuracy_matrix"]["matrix"]["iou"]
    assert len(iou) == 3 and all(len(row) == 3 for row in iou)
    assert iou[2][2] is not None and iou[1][2] is not None  # the new domain, and before training it (FT)
    assert metrics["steps"][1]["evaluation"]["shadow"]["measured_when_added"]
    assert metrics["steps"][2]["summary"]["iou"]["FT"] is not None
    assert [s["domain"] for s in metrics["steps"]] == ["polyp", "natural", "shadow"]
    assert (run / "shadow.safetensors").is_file()
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["order"] == ["polyp", "natural", "shadow"] and manifest["completed"] == manifest["order"]


def test_truncated_module_file_is_reported_by_name_and_nothing_is_touched(data, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(CONFIG_DIR / "demo_sam.yaml", settings(data, run, order="polyp_natural", epoch=1))
    pipeline.train(cfg, CPU)
    data_bytes = (run / "polyp.safetensors").read_bytes()
    (run / "polyp.safetensors").write_bytes(data_bytes[: len(data_bytes) // 2])
    def state():  # every file but the logs, which record the refused attempt, and the lock the attempt took
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*")
                if p.is_file() and p.suffix != ".txt" and p.name != LOCK_FILE}

    snapshot = state()
    with pytest.raises(RunFolderError, match=r"polyp\.safetensors \(checksum mismatch: truncated or modified\)"):
        pipeline.load_run(run, cfg, CPU)
    with pytest.raises(RunFolderError, match=r"polyp\.safetensors \(checksum mismatch"):
        pipeline.resume(run, {"order": "polyp_natural_shadow"}, CPU)
    assert state() == snapshot


def test_resume_with_another_backbone_checkpoint_or_setting_is_refused(data, tmp_path):
    torch.manual_seed(3)
    ckpt_a, ckpt_b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(build_sam("vit_tiny")[0].state_dict(), ckpt_a)
    torch.save(build_sam("vit_tiny")[0].state_dict(), ckpt_b)
    run = tmp_path / "run"
    pipeline.train(load_config(CONFIG_DIR / "demo_sam.yaml", settings(
        data, run, order="polyp", epoch=1, random_weights=False, ckpt=str(ckpt_a))), CPU)
    assert json.loads((run / "run.json").read_text())["checkpoint"]["sha256"] == sha256_file(ckpt_a)
    with pytest.raises(RunFolderError, match=r"cannot resume .*checkpoint: run has .*now"):
        pipeline.resume(run, {"order": "polyp_shadow", "ckpt": str(ckpt_b)}, CPU)
    with pytest.raises(RunFolderError, match=r"keeps the run's settings.*vit_name='vit_tiny'"):
        pipeline.resume(run, {"vit_name": "vit_b"}, CPU)
    with pytest.raises(RunFolderError, match="must start with the run's order polyp"):
        pipeline.resume(run, {"order": "shadow_polyp", "ckpt": str(ckpt_a)}, CPU)
    # the run folder is intact: the same checkpoint resumes (nothing left to do) fine
    pipeline.resume(run, {"ckpt": str(ckpt_a)}, CPU)
    assert os.path.exists(run / "polyp.safetensors")


def test_run_folder_made_before_the_release_defaults_resumes_as_it_was_trained(data, tmp_path):
    """A run.json whose config predates the focal / train_mode / module_init settings was trained
    with BCE from logits, train mode every epoch and a module draw per domain: it resumes so."""
    old = {"focal": "logits", "train_mode": "every_epoch", "module_init": "per_domain"}
    kw = dict(epoch=2, val_every=1)
    whole = tmp_path / "whole"
    pipeline.train(load_config(CONFIG_DIR / "demo_sam.yaml", settings(data, whole, order="polyp_shadow", **kw, **old)),
                   CPU)
    run = tmp_path / "old"
    pipeline.train(load_config(CONFIG_DIR / "demo_sam.yaml", settings(data, run, order="polyp", **kw, **old)), CPU)
    manifest = json.loads((run / "run.json").read_text())
    for k in old:
        del manifest["config"][k]
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(RunFolderError, match=r"keeps the run's settings.*focal='logits'"):
        pipeline.resume(run, {"focal": "reference"}, CPU)
    pipeline.resume(run, {"order": "polyp_shadow"}, CPU)
    for k, v in old.items():
        assert json.loads((run / "run.json").read_text())["config"][k] == v
    for f in ("polyp.safetensors", "shadow.safetensors"):
        a, b = module_tensors(whole / f), module_tensors(run / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f


# ----------------------------------------------------------------------------- verification before use
@pytest.fixture(scope="module")
def ckpt_run(data, tmp_path_factory):
    """A one-domain run trained on the weights a.pth; b.pth is another checkpoint of the same shape."""
    root = tmp_path_factory.mktemp("ckpt_run")
    torch.manual_seed(5)
    for name in ("a.pth", "b.pth"):
        torch.save(build_sam("vit_tiny")[0].state_dict(), root / name)
    pipeline.train(load_config(CONFIG_DIR / "demo_sam.yaml", settings(
        data, root / "run", order="polyp", epoch=1, random_weights=False, ckpt=str(root / "a.pth"))), CPU)
    (root / "weights.yaml").write_text((REPO / "configs" / "demo_sam.yaml").read_text()
                                       .replace("random_weights: true", "random_weights: false"))
    return root


def folder_state(run):
    return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_test_py_refuses_other_weights_than_the_runs_naming_both(data, ckpt_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ckpt_run / "run", run)
    a, b = ckpt_run / "a.pth", ckpt_run / "b.pth"
    sha_a, sha_b = sha256_file(a), sha256_file(b)
    cmd = [sys.executable, "test.py", "--config", str(ckpt_run / "weights.yaml"), "--data_root", str(data),
           "--run_dir", str(run), "--device", "cpu", "--no_vanilla"]
    before = folder_state(run)
    for extra, given in ((["--ckpt", str(b)], f"b.pth (sha256 {sha_b})"),
                         (["--random_weights"], "random weights (seed 1234)")):
        r = subprocess.run(cmd + extra, cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"error: {run} was trained on a.pth (sha256 {sha_a}), but the backbone weights given are {given}; "
            f"pass --ckpt with the run's a.pth and no --random_weights"]
        assert folder_state(run) == before  # no test_log.txt: nothing is written before the check
    # a run trained on random weights, given a checkpoint
    manifest = json.loads((run / "run.json").read_text())
    manifest["checkpoint"] = {"random_weights": True, "seed": 1234}
    (run / "run.json").write_text(json.dumps(manifest))
    r = subprocess.run(cmd + ["--ckpt", str(a)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {run} was trained on random weights (seed 1234), but the backbone weights given are a.pth "
        f"(sha256 {sha_a}); pass --random_weights and no --ckpt"], r.stderr
    # the run's own weights: tested, and only then the log is written
    shutil.rmtree(run)
    shutil.copytree(ckpt_run / "run", run)
    r = subprocess.run(cmd + ["--ckpt", str(a)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (run / "test_log.txt").is_file() and (run / "test_metrics.json").is_file()


def test_resume_checks_metrics_json_against_its_checksum(data, ckpt_run, tmp_path, caplog, monkeypatch):
    from samcl.continual import ContinualTrainer

    run = tmp_path / "run"
    shutil.copytree(ckpt_run / "run", run)
    overrides = {"order": "polyp_shadow", "ckpt": str(ckpt_run / "a.pth")}
    metrics = json.loads((run / "metrics.json").read_text())
    tampered = json.loads(json.dumps(metrics))
    tampered["steps"][0]["evaluation"]["polyp"]["metrics"]["iou"] = 0.99
    (run / "metrics.json").write_text(json.dumps(tampered))
    before = folder_state(run)
    with pytest.raises(RunFolderError, match=r"metrics\.json \(checksum mismatch: truncated or modified\)"):
        pipeline.resume(run, overrides, CPU)
    (run / "metrics.json").write_text('{"steps": [')
    with pytest.raises(RunFolderError, match=r"metrics\.json is corrupt"):
        pipeline.resume(run, overrides, CPU)
    assert {p: b for p, b in folder_state(run).items() if p.name != "metrics.json"} == \
        {p: b for p, b in before.items() if p.name != "metrics.json"}

    # stopped between writing metrics.json and run.json: one step ahead, for the next domain
    ahead = json.loads(json.dumps(metrics))
    ahead["steps"].append({**metrics["steps"][0], "step": 1, "domain": "shadow"})
    (run / "metrics.json").write_text(json.dumps(ahead))
    monkeypatch.setattr(logging.getLogger("samcl"), "propagate", True)
    cfg = pipeline.resume_config(run, overrides)
    trainer = ContinualTrainer(cfg, pipeline.build_model(cfg, CPU), CPU, run, resume=True,
                               checkpoint=pipeline.config_checkpoint_identity(cfg))
    assert trainer.state.steps == metrics["steps"] and "one step ahead" in caplog.text


def test_resume_settings_are_typed_with_their_source(ckpt_run, tmp_path):
    from samcl.config import ConfigError

    run = tmp_path / "run"
    shutil.copytree(ckpt_run / "run", run)
    with pytest.raises(ConfigError, match=r"num_workers must be >= 0, got -1 \(flag --num_workers\)"):
        pipeline.resume(run, {"num_workers": -1}, CPU)
    manifest = json.loads((run / "run.json").read_text())
    manifest["config"]["lr"] = "fast"
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"lr must be a number, got 'fast' \({run / 'run.json'}\)"):
        pipeline.resume(run, {}, CPU)
