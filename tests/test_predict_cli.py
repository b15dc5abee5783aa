"""predict.py: masks, overlays and predictions.json for a folder; bad files listed, the rest done."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from samcl import pipeline
from samcl.config import CONFIG_DIR, load_config
from samcl.demo import make_demo_data
from tests.conftest import REPO


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_cli")
    make_demo_data(root, n_train=4, n_test=2)
    cfg = load_config(CONFIG_DIR / "demo_sam.yaml", {
        "data_root": str(root), "run_dir": str(root / "run"), "epoch": 1, "num_embedding": 2, "batch_size": 2,
        "selector_epochs": 2, "val_every": 0, "order": "polyp_natural", "unseen": ["natural"], "num_workers": 0})
    pipeline.train(cfg, torch.device("cpu"))
    return root


def predict(*args):
    return subprocess.run([sys.executable, "predict.py", *map(str, args)], cwd=REPO, capture_output=True, text=True)


def test_a_folder_with_a_corrupt_file_writes_the_others_and_names_it(run, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(run / "data" / "Polyp" / "test" / "images", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    good = sorted(p for p in folder.iterdir() if p.name != "broken.jpg")
    out = tmp_path / "out"
    r = predict("--run_dir", run / "run", "--input", folder, "--points", "10,12;30,20", "--output", out,
                "--device", "cpu", "--batch_size", "2")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "1 file(s) failed" in r.stdout and "broken.jpg" in r.stdout
    report = json.loads((out / "predictions.json").read_text())
    assert sorted(report["results"]) == sorted(p.name for p in good) and "broken.jpg" in report["failures"][0]
    for p in good:
        w, h = Image.open(p).size
        mask = np.asarray(Image.open(out / f"{p.stem}_mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        res = report["results"][p.name]
        assert res["area"] == int((mask == 255).sum()) and res["domain"] in ("polyp", "natural")
        assert sum(res["probabilities"].values()) == pytest.approx(1.0)
        overlay = Image.open(out / f"{p.stem}_overlay.png")
        k = overlay.size[0] // w  # narrow images are enlarged by a whole factor; the caption strip below
        assert overlay.format == "PNG" and overlay.size[0] == k * w and overlay.size[1] > k * h


def test_points_outside_an_image_and_a_bad_run_folder_are_named(run, tmp_path):
    image = sorted((run / "data" / "Polyp" / "test" / "images").iterdir())[0]
    w, h = Image.open(image).size
    r = predict("--run_dir", run / "run", "--input", image, "--points", f"{w + 10},5", "--output", tmp_path / "o",
                "--device", "cpu")
    assert r.returncode == 1 and f"lie outside the {w}x{h} image" in r.stdout and image.name in r.stdout
    bad = tmp_path / "bad_run"
    shutil.copytree(run / "run", bad)
    (bad / "polyp.safetensors").write_bytes((bad / "polyp.safetensors").read_bytes()[:-10])
    r = predict("--run_dir", bad, "--input", image, "--points", "5,5", "--output", tmp_path / "o2", "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "polyp.safetensors" in r.stderr
    assert r.stderr.strip().count("\n") == 0  # one line


def test_a_box_goes_with_the_points_as_in_the_predictor(run, tmp_path):
    from samcl.data import read_image
    from samcl.predictor import SAMCLPredictor

    image = sorted((run / "data" / "Polyp" / "test" / "images").iterdir())[0]
    w, h = Image.open(image).size
    box = [2, 3, w - 4, h - 5]
    out = tmp_path / "o"
    r = predict("--run_dir", run / "run", "--input", image, "--points", "10,12", "--box", ",".join(map(str, box)),
                "--output", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    predictor = SAMCLPredictor.from_run(run / "run", device="cpu")
    predictor.set_image(np.asarray(read_image(image)))
    masks, scores, _ = predictor.predict([[10, 12]], [1], box=box, multimask_output=False)
    with_box = predictor.predict([[10, 12]], [1], box=box, multimask_output=False, return_logits=True)[0]
    alone = predictor.predict([[10, 12]], [1], multimask_output=False, return_logits=True)[0]
    assert not np.allclose(with_box, alone, atol=1e-3)  # the box counts, with the point
    assert np.array_equal(np.asarray(Image.open(out / f"{image.stem}_mask.png")) == 255, masks[0])
    result = json.loads((out / "predictions.json").read_text())["results"][image.name]
    assert result["domain"] == predictor.routing.domain
    assert result["iou_prediction"] == pytest.approx(float(scores[0]), abs=1e-6)
