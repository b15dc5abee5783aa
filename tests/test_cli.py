"""Command-line behaviour: the reference's flags, device selection, clear errors."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samcl.cli import CLIError, resolve_device
from samcl.config import CONFIG_DIR, load_config
from tests.conftest import REPO

REFERENCE_FLAGS = ["--module", "--num_embedding", "--batch_size", "--lr", "--epoch", "--vit_name", "--ckpt",
                   "--img_size", "--seed", "--order", "--cuda"]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)


def test_train_help_lists_every_reference_flag_and_cpu_flags():
    out = run("train.py", "--help").stdout
    for flag in REFERENCE_FLAGS + ["--device", "--config", "--data_root", "--train_json", "--test_json", "--output_dir"]:
        assert flag in out, flag


def test_cuda_minus_one_outside_torchrun_says_distributed(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(CLIError, match="distributed training, which must be launched with torchrun"):
        resolve_device(-1, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_index_without_gpu_points_to_device_cpu():
    with pytest.raises(CLIError, match="--device cpu"):
        resolve_device(0, None)
    r = run("train.py", "--module", "SAMCL", "--batch_size", "8", "--cuda", "0")
    assert r.returncode != 0 and "--device cpu" in r.stderr and "Traceback" not in r.stderr


def test_device_defaults():
    assert resolve_device(None, "cpu") == torch.device("cpu")
    assert resolve_device(None, None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    r = run("train.py", "--device", "cpu", "--data_root", str(tmp_path), "--run_dir", str(tmp_path / "run"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "sam_vit_b_01ec64.pth not found" in r.stderr and "--random_weights" in r.stderr


def test_test_script_without_run_folder_is_a_clear_error(tmp_path):
    r = run("test.py", "--device", "cpu", "--run_dir", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("script,release", [("test.py", "SAM1"), ("test_SAM2.py", "SAM2")])
def test_test_without_any_run_folder_says_where_it_looked(tmp_path, script, release):
    """Neither the run folder train.py would make with these flags nor the release folder: one line
    naming both places, exit 2, nothing written."""
    from samcl.release.folder import is_release_folder

    if is_release_folder(REPO / "checkpoint" / release):
        pytest.skip(f"checkpoint/{release} holds the authors' release, which test.py would then test")
    r = subprocess.run([sys.executable, str(REPO / script), "--device", "cpu", "--output_dir", "runs"],
                       cwd=tmp_path, capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    expected_run = Path("runs") / load_config(CONFIG_DIR / ("samcl2_hiera_t.yaml" if release == "SAM2"
                                                            else "samcl_vit_b.yaml")).run_name()
    assert f"looked for the run folder {expected_run} " in lines[0]
    assert f"release modules in {REPO / 'checkpoint' / release} " in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_config_layering_and_validation(tmp_path):
    cfg = load_config(CONFIG_DIR / "samcl_vit_b.yaml")
    assert (cfg.lr, cfg.epoch, cfg.batch_size, cfg.seed, cfg.num_embedding) == (0.005, 20, 8, 1234, 300)
    assert cfg.domains == ["Kvasir", "camo", "ISTD", "ISIC", "cod", "COCO"] and cfg.unseen == ["COCO"]
    assert str(cfg.resolved_run_dir()) == "log_sam1/SAMCL_Kvasir_camo_ISTD_ISIC_cod_COCO_300_1234_training"
    assert load_config(CONFIG_DIR / "samcl_vit_b.yaml", {"lr": 0.1, "epoch": None}).lr == 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 3\n")
    with pytest.raises(ValueError, match="unknown settings.*learning_rate"):
        load_config(bad)
    with pytest.raises(ValueError, match="more than once"):
        load_config(None, {"order": "a_b_a"})
    with pytest.raises(ValueError, match="scheduler must be one of"):
        load_config(None, {"scheduler": "linear"})


def test_simple_testing_falls_back_to_the_release_folder(tmp_path, monkeypatch):
    """`python test.py --module SAMCL` tests checkpoint/SAM1 when no training run exists (README)."""
    from samcl import config
    from samcl.commands.test import default_test_folder
    from tests.conftest import RELEASE, require

    release = require(RELEASE / "SAM1")
    monkeypatch.setattr(config, "CHECKPOINT_DIR", tmp_path / "checkpoint")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIG_DIR / "samcl_vit_b.yaml")
    with pytest.raises(CLIError, match="nothing to test"):  # neither exists (test_test_without_any_run_folder...)
        default_test_folder(cfg, "sam")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "SAM1").symlink_to(release)
    assert default_test_folder(cfg, "sam") == tmp_path / "checkpoint" / "SAM1"
    cfg.resolved_run_dir().mkdir(parents=True)  # a training run with these flags wins
    assert default_test_folder(cfg, "sam") == cfg.resolved_run_dir()
