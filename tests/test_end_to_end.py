"""A short continual run on a tiny backbone writes every promised file; test.py reads it back."""
import json
import subprocess
import sys

import pytest
import torch

from samcl.config import CONFIG_DIR, load_config
from samcl.demo import make_demo_data
from samcl import pipeline
from samcl.run_folder import RunFolderError
from samcl.selector import EmbeddingBuffer
from tests.conftest import REPO

DOMAINS = ["polyp", "shadow", "lesion", "natural"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root, n_train=6, n_test=3)
    return root


def small_cfg(root, **kw):
    return load_config(CONFIG_DIR / "demo_sam.yaml", {
        "data_root": str(root), "output_dir": str(root / "log_sam1"), "epoch": 2, "num_embedding": 4,
        "batch_size": 3, "val_every": 1, "selector_epochs": 3, **kw})


def test_train_then_test_writes_every_promised_file(demo_data, capsys):
    cfg = small_cfg(demo_data)
    metrics = pipeline.train(cfg, torch.device("cpu"))
    run = cfg.resolved_run_dir()
    assert run.name == "SAMCL_polyp_shadow_lesion_natural_4_1234_training"
    for f in ("run.json", "config.yaml", "log.txt", "polyp.safetensors", "shadow.safetensors", "lesion.safetensors",
              "Module_Selector.safetensors", "metrics.json", *(f"embedding_buffer/{d}.safetensors" for d in DOMAINS),
              *(f"selector/after_{d}.safetensors" for d in DOMAINS)):
        assert (run / f).is_file(), f
    assert not (run / "natural.safetensors").exists()  # the unseen domain trains no module

    assert not (run / "partial").exists()  # committed steps leave no partial state, nor its folder
    buf = EmbeddingBuffer(4)
    for d in DOMAINS:
        buf.load_part(run / f"embedding_buffer/{d}.safetensors", d)
    assert buf.domains == DOMAINS and all(buf.store[d].shape == (4, 32) for d in DOMAINS)

    saved = json.loads((run / "metrics.json").read_text())
    assert saved["aug_module"]["counted_parameters"] == metrics["aug_module"]["counted_parameters"] > 0
    iou = saved["accuracy_matrix"]["matrix"]["iou"]
    assert len(iou) == 4
    # step t evaluates domains 0..min(T-1, t+1)
    assert [sum(v is not None for v in row) for row in iou] == [2, 3, 4, 4]
    steps = saved["steps"]
    assert [s["domain"] for s in steps] == DOMAINS and [s["trained"] for s in steps] == [True, True, True, False]
    assert set(steps[3]["evaluation"]["lesion"]["selector_counts"]) == set(DOMAINS)
    assert steps[0]["summary"]["iou"]["FT"] is None and steps[1]["summary"]["iou"]["FT"] is not None
    assert len(steps[0]["training"]["epoch_loss"]) == 2 and len(steps[0]["training"]["validation"]) == 2
    assert "torch" in saved["versions"] and saved["config"]["order"] == cfg.order
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["completed"] == DOMAINS and manifest["backbone"]["arch"] == "vit_tiny"
    assert "AugModule: " in (run / "log.txt").read_text() and "MB (counted as the reference" in (run / "log.txt").read_text()

    report = pipeline.test(run, cfg, torch.device("cpu"))
    out = capsys.readouterr().out
    assert (run / "test_metrics.json").is_file()
    assert set(report["results"]) == set(DOMAINS)
    for d in DOMAINS:
        r = report["results"][d]
        assert r["metrics"]["n"] == 3 and sum(r["selector_counts"].values()) == 3 and r["vanilla"]["n"] == 3
        assert d in out
    assert "vanilla IoU" in out and "AA" in out
    # routed test results equal the last training step's evaluation (same modules, same selector)
    for d in DOMAINS:
        assert report["results"][d]["metrics"]["iou"] == pytest.approx(steps[3]["evaluation"][d]["metrics"]["iou"])


def test_existing_run_folder_is_not_overwritten(demo_data):
    cfg = small_cfg(demo_data, epoch=1, run_dir=str(demo_data / "guarded"))
    (demo_data / "guarded").mkdir()
    (demo_data / "guarded" / "run.json").write_text("{}")
    with pytest.raises(RunFolderError, match="already holds a run.*--overwrite"):
        pipeline.train(cfg, torch.device("cpu"))
    assert (demo_data / "guarded" / "run.json").read_text() == "{}"


def test_order_naming_unknown_domain_is_refused(demo_data):
    cfg = small_cfg(demo_data, order="polyp_Kvasir", run_dir=str(demo_data / "bad_order"))
    with pytest.raises(RunFolderError, match=r"Kvasir \(in train map\)"):
        pipeline.train(cfg, torch.device("cpu"))


def test_scripts_run_from_the_command_line(demo_data):
    common = ["--config", "configs/demo_sam.yaml", "--data_root", str(demo_data), "--device", "cpu",
              "--order", "polyp_natural", "--num_embedding", "3", "--run_dir", str(demo_data / "cli")]
    r = subprocess.run([sys.executable, "train.py", *common, "--epoch", "1", "--batch_size", "4"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RANDOM WEIGHTS" in r.stdout + r.stderr
    r = subprocess.run([sys.executable, "test.py", *common, "--no_vanilla"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "polyp" in r.stdout and "natural" in r.stdout
    assert "vanilla" not in json.loads((demo_data / "cli" / "test_metrics.json").read_text())["results"]["polyp"]


def test_evaluation_progress_counts_images(demo_data):
    import io

    from samcl.data import SegmentationSplit
    from samcl.loading import image_progress, make_loader

    ds = SegmentationSplit(demo_data / "data" / "Polyp" / "test", 64)
    out = io.StringIO()
    batches = list(image_progress(make_loader(ds, 2, False, 0, 0, torch.device("cpu")), "test polyp",
                                  disable=False, file=out, leave=True, mininterval=0))
    assert len(batches) == 2 and "3/3" in out.getvalue() and "img" in out.getvalue()


def test_report_png_after_every_step_and_test_overlays(demo_data, tmp_path, monkeypatch):
    import matplotlib
    from PIL import Image

    monkeypatch.delenv("DISPLAY", raising=False)
    cfg = small_cfg(demo_data, epoch=1, order="polyp_natural", unseen=["natural"], run_dir=str(tmp_path / "run"))
    drawn = []
    from samcl import run_state

    real = run_state.draw_report
    monkeypatch.setattr(run_state, "draw_report", lambda m, p, t: drawn.append(len(m["matrix"]["iou"])) or real(m, p, t))
    pipeline.train(cfg, torch.device("cpu"))
    assert drawn == [1, 2]  # redrawn after each step, with the rows so far
    assert matplotlib.get_backend().lower() == "agg"
    report = Image.open(tmp_path / "run" / "report.png")
    assert report.format == "PNG" and report.size[0] > 3 * report.size[1] / 2
    pipeline.test(tmp_path / "run", cfg, torch.device("cpu"), with_vanilla=False, save_overlays=2)
    pictures = sorted((tmp_path / "run" / "overlays").iterdir())
    assert [p.name.split("_")[0] for p in pictures] == ["natural", "natural", "polyp", "polyp"]
    for p in pictures:
        stem = p.stem.split("_", 1)[1]
        domain_dir = "Natural" if p.name.startswith("natural") else "Polyp"
        source = next((demo_data / "data" / domain_dir / "test" / "images").glob(stem + ".*"))
        w, h = Image.open(source).size
        pw, ph = Image.open(p).size  # enlarged by a whole factor k when narrow, with the caption below
        k = pw // w
        assert Image.open(p).format == "PNG" and pw == k * w and ph > k * h and k == max(1, -(-320 // w))
