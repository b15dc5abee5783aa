"""Every entry point refuses a bad flag, setting, file or data with exit status 2 and one line on
stderr naming what to fix: no traceback, and nothing written (no run folder)."""
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from samcl.config import ConfigError, load_config
from samcl.data import DataError, SegmentationSplit
from samcl.demo import make_demo_data
from samcl.loading import make_loader
from samcl.pipeline import continue_hint
from tests.conftest import REPO

TRAIN, TEST = "train.py", "test.py"
DEMO = ["--config", "configs/demo_sam.yaml", "--data_root", "{tmp}/data", "--order", "polyp_natural"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors_data")
    make_demo_data(root, n_train=4, n_test=2)
    return root


def stem_collision(tmp: Path) -> None:
    images = tmp / "data" / "data" / "Polyp" / "train" / "images"
    shutil.copy(images / "polyp_000.jpg", images / "polyp_000.png")


def point_out_of_frame(tmp: Path) -> None:
    path = tmp / "data" / "data" / "Polyp" / "train" / "masks" / "points.json"
    points = json.loads(path.read_text())
    first = sorted(points)[0]
    points[first][0][0] = [2000.0, 5.0]
    path.write_text(json.dumps(points))


def symlink_loop(tmp: Path) -> None:
    (tmp / "loop_a.pth").symlink_to(tmp / "loop_b.pth")
    (tmp / "loop_b.pth").symlink_to(tmp / "loop_a.pth")


def run_folder_without_manifest(tmp: Path) -> None:
    run = tmp / "lost"
    (run / "selector").mkdir(parents=True)
    for name in ("config.yaml", "metrics.json", "log.txt", "Module_Selector.safetensors", "polyp.safetensors"):
        (run / name).write_text("x")


# id, script (or "-m module"), arguments, files to write under {tmp}, setup, text the message must contain
CASES = [
    ("flag-type", TRAIN, ["--epoch", "ten"], {}, None, "argument --epoch: invalid int value: 'ten'"),
    ("unknown-flag", TRAIN, ["--learning_rate", "1"], {}, None, "unrecognized arguments: --learning_rate"),
    ("yaml-int", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "epoch: ten\n"}, None,
     "epoch must be an integer, got 'ten' (config file {tmp}/c.yaml)"),
    ("yaml-float", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "lr: fast\n"}, None,
     "lr must be a number, got 'fast' (config file {tmp}/c.yaml)"),
    ("yaml-str", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "order: 123\n"}, None,
     "order must be a string, got 123"),
    ("yaml-null", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "epoch:\n"}, None,
     "epoch must be an integer, got None (config file {tmp}/c.yaml)"),
    ("yaml-nan", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "lr: .nan\n"}, None, "lr must be a finite number > 0"),
    ("yaml-bool", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "random_weights: maybe\n"}, None,
     "random_weights must be true or false, got 'maybe'"),
    ("yaml-rank", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "rank: 0\n"}, None, "rank must be >= 1, got 0"),
    ("yaml-list-item", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "aug_layers: [7, -1]\n"}, None,
     "every item of aug_layers must be >= 0, got [7, -1]"),
    ("yaml-unseen-string", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "order: a_natural\nunseen: natural\n"},
     None, "unseen must be a list of strings, e.g. [natural], got 'natural'"),
    ("yaml-unseen-stray", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "order: a_b\nunseen: [c]\n"}, None,
     "unseen names ['c'], which the order 'a_b' lacks"),
    ("yaml-unknown", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "learning_rate: 1\n"}, None,
     "config file {tmp}/c.yaml: unknown settings ['learning_rate']"),
    ("yaml-syntax", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "epoch: 3\norder: [a\n"}, None,
     "config file {tmp}/c.yaml line 3, column 1: expected ',' or ']'"),
    ("yaml-python-tag", TRAIN, ["--config", "{tmp}/c.yaml"],
     {"c.yaml": "lr: !!python/object/apply:os.system ['touch {tmp}/pwned']\n"}, None,
     "config file {tmp}/c.yaml line 1, column 5: could not determine a constructor"),
    ("yaml-not-mapping", TRAIN, ["--config", "{tmp}/c.yaml"], {"c.yaml": "- lr\n"}, None,
     "config file {tmp}/c.yaml must hold a mapping of settings"),
    ("config-missing", TRAIN, ["--config", "{tmp}/none.yaml"], {}, None, "config file {tmp}/none.yaml not found"),
    ("config-directory", TRAIN, ["--config", "{tmp}"], {}, None, "config file {tmp} is a directory"),
    ("unseen-flag", TRAIN, ["--unseen", "nowhere"], {}, None, "unseen names ['nowhere'], which the order"),
    ("device", TRAIN, ["--device", "gpu0"], {}, None, "--device 'gpu0' is not a device this package runs on"),
    ("cuda", TRAIN, ["--cuda", "-2"], {}, None, "--cuda -2 is not a GPU index"),
    ("img-size", TRAIN, ["--img_size", "-8"], {}, None, "img_size must be >= 1, got -8 (flag --img_size)"),
    ("lr", TRAIN, ["--lr", "-1"], {}, None, "lr must be > 0, got -1.0 (flag --lr)"),
    ("num-workers", TRAIN, ["--num_workers", "-1"], {}, None, "num_workers must be >= 0, got -1 (flag --num_workers)"),
    ("val-every", TRAIN, ["--val_every", "-1"], {}, None, "val_every must be >= 0, got -1"),
    ("seed", TRAIN, ["--seed", "-1"], {}, None, "seed must be in 0..4294967295, got -1"),
    ("mask-threshold", TRAIN, ["--mask_threshold", "256"], {}, None, "mask_threshold must be in 0..255"),
    ("cache-budget", TRAIN, ["--cache_budget_gb", "-1"], {}, None, "cache_budget_gb must be >= 0"),
    ("vit-name", TRAIN, ["--vit_name", "vit_x"], {}, None, "argument --vit_name: invalid choice: 'vit_x' (choose from 'vit_b'"),
    ("choice", TRAIN, ["--scheduler", "linear"], {}, None, "argument --scheduler: invalid choice: 'linear'"),
    ("cad-on-sam2", "train_SAM2.py", ["--module", "CAD"], {}, None,
     "--module CAD runs on the SAM (ViT) backbone, but train_SAM2.py is the SAM 2.1 (Hiera) script: use train.py"),
    ("samcl2-on-sam", TEST, ["--module", "SAMCL_2"], {}, None, "use test_SAM2.py"),
    ("ckpt-directory", TRAIN, ["--ckpt", "{tmp}"], {}, None, "backbone checkpoint {tmp} is a directory"),
    ("ckpt-symlink-loop", TRAIN, ["--ckpt", "{tmp}/loop_a.pth"], {}, symlink_loop,
     "backbone checkpoint {tmp}/loop_a.pth is a symlink loop"),
    ("ckpt-and-random", TRAIN, [*DEMO, "--ckpt", "{tmp}/c.yaml"], {"c.yaml": ""}, None,
     "--random_weights and --ckpt exclude each other"),
    ("resume-missing", TRAIN, ["--resume", "{tmp}/nothing"], {}, None, "run folder {tmp}/nothing does not exist"),
    ("resume-with-config", TRAIN, ["--resume", "{tmp}", "--config", "x.yaml"], {}, None,
     "--resume keeps the run's own settings"),
    ("test-batch-size", TEST, ["--batch_size", "0"], {}, None, "eval_batch_size must be >= 1, got 0 (flag --batch_size)"),
    ("test-missing-run", TEST, ["--run_dir", "{tmp}/nothing"], {}, None, "run folder {tmp}/nothing does not exist"),
    ("test-run-is-a-file", TEST, ["--run_dir", "{tmp}/c.yaml"], {"c.yaml": ""}, None,
     "run folder {tmp}/c.yaml is a file, not a folder"),
    ("test-lost-manifest", TEST, ["--run_dir", "{tmp}/lost"], {}, run_folder_without_manifest,
     "{tmp}/lost holds a run's files (config.yaml, metrics.json, log.txt, selector) but no run.json"),
    ("stem-collision", TRAIN, DEMO, {}, stem_collision,
     "images: polyp_000.jpg and polyp_000.png share the name 'polyp_000'"),
    ("point-out-of-frame", TRAIN, DEMO, {}, point_out_of_frame, "lie outside the 1024x1024 frame of points.json"),
    ("generate-point-count", "generate_point.py", ["--num_points", "0"], {}, None, "--num_points must be at least 1"),
    ("generate-point-threshold", "generate_point.py", ["--mask_threshold", "300"], {}, None,
     "mask_threshold must be in 0..255, got 300 (flag --mask_threshold)"),
    ("release-flag", "-m samcl.release", ["convert", "{tmp}", "{tmp}/out", "--family", "sam3"], {}, None,
     "argument --family: invalid choice: 'sam3'"),
    ("release-missing", "-m samcl.release", ["inspect", "{tmp}/nothing"], {}, None,
     "release folder {tmp}/nothing has no module file"),
    ("demo-device", "-m samcl.demo", ["--device", "gpu0", "--output", "{tmp}/demo"], {}, None, "--device 'gpu0'"),
]


def files_under(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line_and_exit_status_2(case, tmp_path, demo_data):
    _id, script, args, files, setup, needle = case
    if "{tmp}/data" in " ".join(args):
        shutil.copytree(demo_data, tmp_path / "data")
    for name, text in files.items():
        (tmp_path / name).write_text(text.replace("{tmp}", str(tmp_path)))
    if setup:
        setup(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if script in ("train.py", "train_SAM2.py"):
        args += ["--device", "cpu"] * ("--device" not in args) + ["--output_dir", str(tmp_path / "out")]
        args += ["--run_dir", str(tmp_path / "run")] * ("--resume" not in args)
    before = files_under(tmp_path)
    cmd = [sys.executable, *script.split(), *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    assert files_under(tmp_path) == before  # no run folder, no log, nothing else


def test_a_python_tag_in_a_config_constructs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "c.yaml").write_text(f"lr: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="tags such as !!python/... are refused"):
        load_config(tmp_path / "c.yaml")
    assert not marker.exists()


def test_settings_take_their_type_from_the_dataclass():
    cfg = load_config(None, {"lr": "1e-3", "weight_decay": 0, "cache_budget_gb": 2})  # YAML 1.1 reads 1e-3 as text
    assert (cfg.lr, cfg.weight_decay, cfg.cache_budget_gb) == (0.001, 0.0, 2.0)
    assert all(type(v) is float for v in (cfg.lr, cfg.weight_decay, cfg.cache_budget_gb))
    for bad in ({"epoch": True}, {"epoch": 2.0}, {"unseen": [1]}, {"deterministic": 1}, {"ckpt": 5}):
        with pytest.raises(ConfigError, match=f"{next(iter(bad))} must be"):
            load_config(None, bad)


def test_unseen_outside_an_order_given_later_is_dropped_with_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("samcl"), "propagate", True)  # setup_logging may have cut it off
    cfg = load_config("configs/samcl_vit_b.yaml", {"order": "Kvasir_camo"})  # the file's unseen COCO
    assert cfg.unseen == ["COCO"] and "unseen names ['COCO']" in caplog.text and "they are ignored" in caplog.text


# ----------------------------------------------------------------------------- DataLoader workers
def corrupt_split(demo_data, tmp_path) -> Path:
    shutil.copytree(demo_data / "data" / "Polyp" / "train", tmp_path / "split")
    (tmp_path / "split" / "images" / "polyp_002.jpg").write_bytes(b"not an image")
    return tmp_path / "split"


def data_error(split: Path, num_workers: int) -> str:
    loader = make_loader(SegmentationSplit(split, 128, domain="polyp"), 2, False, 0, num_workers, torch.device("cpu"))
    with pytest.raises(DataError) as e:
        for _ in loader:
            pass
    return str(e.value)


def test_a_worker_side_data_error_reads_as_the_in_process_one(demo_data, tmp_path):
    split = corrupt_split(demo_data, tmp_path)
    in_process = data_error(split, 0)
    assert in_process.startswith(f"{split / 'images' / 'polyp_002.jpg'}: cannot decode")
    assert data_error(split, 2) == in_process

    data = tmp_path / "data_root"
    shutil.copytree(demo_data, data)
    shutil.copytree(split, data / "data" / "Polyp" / "train", dirs_exist_ok=True)
    r = subprocess.run([sys.executable, "train.py", *[a.replace("{tmp}/data", str(data)) for a in DEMO],
                        "--num_workers", "2", "--epoch", "1", "--num_embedding", "2", "--device", "cpu",
                        "--run_dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "DataLoader worker" not in r.stderr, r.stderr
    message = in_process.replace(str(split), str(data / "data/Polyp/train"))
    hint = continue_hint(SimpleNamespace(backbone="sam"), tmp_path / "run")  # the run folder existed by then
    assert r.stderr.strip().splitlines() == [f"error: {message}; {hint}"]
