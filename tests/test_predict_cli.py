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
from tests.conftest import REPO, train_demo_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_cli")
    train_demo_run(root)
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


@pytest.fixture(scope="module")
def lora_run(run):
    """A run of the same data whose learning module (LoRA) does not read the point heatmap."""
    cfg = load_config(CONFIG_DIR / "demo_sam.yaml", {
        "data_root": str(run), "run_dir": str(run / "lora_run"), "epoch": 1, "num_embedding": 2, "batch_size": 2,
        "selector_epochs": 2, "val_every": 0, "order": "polyp_natural", "unseen": ["natural"], "num_workers": 0,
        "method": "samcl", "learning_module": "lora"})
    pipeline.train(cfg, torch.device("cpu"))
    return run / "lora_run"


def test_the_datas_points_json_segments_every_image_scaled_from_its_frame(run, tmp_path):
    from samcl.data import POINTS_FRAME, read_image
    from samcl.predictor import SAMCLPredictor

    split = run / "data" / "Polyp" / "test"
    points = json.loads((split / "masks" / "points.json").read_text())
    images = sorted((split / "images").iterdir())
    assert any(p.suffix == ".jpg" for p in images) and not any(p.name in points for p in images if p.suffix == ".jpg")
    out = tmp_path / "o"
    r = predict("--run_dir", run / "run", "--input", split / "images", "--points_json", split / "masks" / "points.json",
                "--output", out, "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the data's points.json format" in r.stdout
    report = json.loads((out / "predictions.json").read_text())
    assert sorted(report["results"]) == [p.name for p in images] and report["failures"] == []
    predictor = SAMCLPredictor.from_run(run / "run", device="cpu")
    for p in images:  # the mask of the entry with the image's stem, scaled from the 1024 frame to the image
        image = np.asarray(read_image(p))
        h, w = image.shape[:2]
        pts, labels = points[p.stem + ".png"]
        predictor.set_image(image)
        want = predictor.predict(np.asarray(pts) * [w / POINTS_FRAME, h / POINTS_FRAME], labels,
                                 multimask_output=False)[0][0]
        assert np.array_equal(np.asarray(Image.open(out / f"{p.stem}_mask.png")) == 255, want)
    renamed = tmp_path / "prompts.json"  # another name reads as pixels, unless told
    shutil.copyfile(split / "masks" / "points.json", renamed)
    r = predict("--run_dir", run / "run", "--input", split / "images", "--points_json", renamed,
                "--output", tmp_path / "o2", "--device", "cpu")
    assert r.returncode == 1 and "give --points_frame 1024" in r.stdout and "in each image's own pixels" in r.stdout
    r = predict("--run_dir", run / "run", "--input", split / "images", "--points_json", renamed, "--points_frame",
                "1024", "--output", tmp_path / "o3", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    for p in images:
        assert (Image.open(tmp_path / "o3" / f"{p.stem}_mask.png").tobytes()
                == Image.open(out / f"{p.stem}_mask.png").tobytes())


def test_pixel_prompts_are_found_by_image_name_or_stem_and_a_missing_one_is_named(run, tmp_path):
    images = sorted((run / "data" / "Polyp" / "test" / "images").iterdir())
    prompts = tmp_path / "mine.json"
    prompts.write_text(json.dumps({images[0].name: [[10, 12]], images[1].stem: [[[10, 12], [3, 4]], [1, 0]]}))
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images[:2]:
        shutil.copyfile(p, folder / p.name)
    shutil.copyfile(images[0], folder / ("other" + images[0].suffix))
    r = predict("--run_dir", run / "run", "--input", folder, "--points_json", prompts, "--output", tmp_path / "o",
                "--device", "cpu")
    assert r.returncode == 1 and "in each image's own pixels" in r.stdout
    report = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert sorted(report["results"]) == sorted(p.name for p in images[:2])
    assert len(report["failures"]) == 1 and "has no entry for other" in report["failures"][0]


def test_a_box_alone_works_for_lora_and_is_refused_with_the_reason_for_augmodule(run, lora_run, tmp_path):
    from samcl.data import read_image
    from samcl.predictor import SAMCLPredictor

    image = sorted((run / "data" / "Polyp" / "test" / "images").iterdir())[0]
    w, h = Image.open(image).size
    box = [2, 3, w - 4, h - 5]
    out = tmp_path / "lora"
    r = predict("--run_dir", lora_run, "--input", image, "--box", ",".join(map(str, box)), "--output", out,
                "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    predictor = SAMCLPredictor.from_run(lora_run, device="cpu")
    assert not predictor.model.needs_heatmap
    predictor.set_image(np.asarray(read_image(image)))
    masks, scores, _ = predictor.predict(box=box, multimask_output=False)
    assert np.array_equal(np.asarray(Image.open(out / f"{image.stem}_mask.png")) == 255, masks[0])
    result = json.loads((out / "predictions.json").read_text())["results"][image.name]
    assert result["domain"] == predictor.routing.domain
    assert result["iou_prediction"] == pytest.approx(float(scores[0]), abs=1e-6)
    r = predict("--run_dir", run / "run", "--input", image, "--box", ",".join(map(str, box)), "--output",
                tmp_path / "aug", "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "aug").exists()
    assert ("error: --box alone: this run's learning module (augmodule) reads the point heatmap, so every prompt needs "
            "at least one point: add --points 'x,y' (a point on the object) with the box") in r.stderr
    r = predict("--run_dir", run / "run", "--input", image, "--box", ",".join(map(str, box)), "--domain", "vanilla",
                "--output", tmp_path / "vanilla", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "vanilla" / "predictions.json").read_text())["results"][image.name]["domain"] \
        == "vanilla"
    r = predict("--run_dir", run / "run", "--input", image, "--output", tmp_path / "none", "--device", "cpu")
    assert r.returncode == 2 and "give the prompts: --points, --points_json or --box" in r.stderr
