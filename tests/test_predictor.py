"""SAMCLPredictor: the same masks as test.py for the same image and points, at the image's own size."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from samcl import pipeline
from samcl.config import CONFIG_DIR, load_config
from samcl.data import POINTS_FRAME, SegmentationSplit, read_domain_map
from samcl.demo import make_demo_data
from samcl.predictor import SAMCLPredictor
from tests.conftest import RELEASE, SAMPLE

CPU = torch.device("cpu")
CONFIGS = {"sam": "demo_sam.yaml", "sam2": "demo_sam2.yaml"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("predictor")
    make_demo_data(root, n_train=4, n_test=3)
    out = {}
    for family, config in CONFIGS.items():
        cfg = load_config(CONFIG_DIR / config, {
            "data_root": str(root), "run_dir": str(root / family), "epoch": 2, "num_embedding": 3, "batch_size": 2,
            "selector_epochs": 3, "val_every": 0, "order": "polyp_shadow_natural", "unseen": ["natural"],
            "num_workers": 0})
        pipeline.train(cfg, CPU)
        out[family] = (root / family, cfg)
    return root, out


def original(split: SegmentationSplit, i: int):
    """(image as the file holds it, its points.json points in the image's own pixels, labels)."""
    img_path, _ = split.pairs[i]
    image = np.asarray(Image.open(img_path).convert("RGB"))
    h, w = image.shape[:2]
    entry = split.points[i]
    pts = np.asarray(entry[0], dtype=np.float64) * np.array([w / POINTS_FRAME, h / POINTS_FRAME])
    return image, pts, np.asarray(entry[1])


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_predict_equals_the_test_path_at_the_original_size(runs, family):
    root, by_family = runs
    run, cfg = by_family[family]
    predictor = SAMCLPredictor.from_run(run, device="cpu")
    model = predictor.model
    test_map = read_domain_map(cfg.test_json, root)
    for domain in ("polyp", "shadow"):
        split = SegmentationSplit(test_map[domain], model.backbone.img_size)
        for i in range(len(split)):
            item = split[i]
            image, pts, labels = original(split, i)
            assert image.shape[0] != image.shape[1]  # non-square: the mapping matters
            with torch.no_grad():  # test.py's path: the dataset item, routed as a batch of one
                want = model.predict(item["image"][None].float(), item["points"][None], item["labels"][None])
            want_logits = F.interpolate(want["logits"], size=image.shape[:2], mode="bilinear", align_corners=False)
            predictor.set_image(image)
            got = predictor.predict(pts, labels, return_logits=True)
            assert got.masks.shape == (1,) + image.shape[:2]
            assert np.allclose(got.masks, want_logits[0].numpy(), atol=1e-4)
            assert got.domain == model.domains[int(want["choice"][0])]
            assert got.probabilities == pytest.approx(dict(zip(model.domains, want["probabilities"][0].tolist())))
            assert got.low_res_logits.shape == (1, 4 * model.backbone.grid_size, 4 * model.backbone.grid_size)
            binary = predictor.predict(pts, labels)
            assert binary.masks.dtype == bool and np.array_equal(binary.masks, got.masks > 0)


def test_forced_domains_vanilla_and_batches(runs):
    root, by_family = runs
    run, cfg = by_family["sam"]
    predictor = SAMCLPredictor.from_run(run, device="cpu")
    split = SegmentationSplit(read_domain_map(cfg.test_json, root)["polyp"], predictor.img_size)
    samples = [original(split, i) for i in range(len(split))]
    image, pts, labels = samples[0]
    predictor.set_image(image)
    forced = predictor.predict(pts, labels, domain="shadow")
    vanilla = predictor.predict(pts, labels, domain="vanilla")
    assert forced.domain == "shadow" and vanilla.domain == "vanilla"
    routed = predictor.predict(pts, labels)
    assert forced.probabilities == routed.probabilities  # the selector's view does not change with the choice
    with pytest.raises(ValueError, match="unknown domain 'kvasir'"):
        predictor.predict(pts, labels, domain="kvasir")
    with pytest.raises(ValueError, match="lie outside the"):
        predictor.predict([[image.shape[1] + 5, 3]], [1])
    with pytest.raises(ValueError, match="multimask_output=True is not supported"):
        predictor.predict(pts, labels, multimask_output=True)
    batch = predictor.predict_batch([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples],
                                    return_logits=True)
    for (img, p, lab), got in zip(samples, batch):
        predictor.set_image(img)
        one = predictor.predict(p, lab, return_logits=True)
        assert got.domain == one.domain and np.allclose(got.masks, one.masks, atol=1e-4)


def test_release_folder_loads_with_its_family():
    if not RELEASE.exists():
        pytest.skip(f"reference data {RELEASE} is absent (it lives in ../shared/reference beside the repo)")
    predictor = SAMCLPredictor.from_run(RELEASE / "SAM1", device="cpu", random_weights=True, img_size=256)
    assert predictor.model.domains == ["Kvasir", "camo", "ISTD", "ISIC", "cod", "COCO"]
    image = np.asarray(Image.open(sorted((SAMPLE / "data" / "Kvasir" / "test" / "images").iterdir())[0]).convert("RGB"))
    predictor.set_image(image)
    out = predictor.predict([[image.shape[1] / 2, image.shape[0] / 2]], [1])
    assert out.masks.shape == (1,) + image.shape[:2] and out.domain in predictor.model.domains + ["vanilla"]
    assert sum(out.probabilities.values()) == pytest.approx(1.0)
