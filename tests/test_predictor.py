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
from samcl.model import ModuleBank
from samcl.learning_modules.augmodule import AugModuleSpec
from samcl.predictor import SAMCLPredictor
from tests.conftest import RELEASE, SAMPLE, tiny_backbone

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
            masks, scores, low = predictor.predict(pts, labels, multimask_output=False, return_logits=True)
            assert masks.shape == (1,) + image.shape[:2] and scores.shape == (1,)
            assert np.allclose(masks, want_logits[0].numpy(), atol=1e-4)
            assert np.allclose(scores, want["iou"][0].numpy(), atol=1e-6)
            assert predictor.routing.domain == model.domains[int(want["choice"][0])]
            assert predictor.routing.probabilities == pytest.approx(
                dict(zip(model.domains, want["probabilities"][0].tolist())))
            assert low.shape == (1, 4 * model.backbone.grid_size, 4 * model.backbone.grid_size)
            binary, _, _ = predictor.predict(pts, labels, multimask_output=False)
            assert binary.dtype == bool and np.array_equal(binary, masks > 0)
            three, three_scores, three_low = predictor.predict(pts, labels)  # SamPredictor's default: 3 masks
            assert three.shape == (3,) + image.shape[:2] and three.dtype == bool
            assert three_scores.shape == (3,) and three_low.shape == (3,) + low.shape[1:]


def test_forced_domains_vanilla_and_batches(runs):
    root, by_family = runs
    run, cfg = by_family["sam"]
    predictor = SAMCLPredictor.from_run(run, device="cpu")
    split = SegmentationSplit(read_domain_map(cfg.test_json, root)["polyp"], predictor.img_size)
    samples = [original(split, i) for i in range(len(split))]
    image, pts, labels = samples[0]
    predictor.set_image(image)
    assert predictor.routing is None
    predictor.predict(pts, labels, domain="shadow")
    forced = predictor.routing
    predictor.predict(pts, labels, domain="vanilla")
    assert forced.domain == "shadow" and predictor.routing.domain == "vanilla"
    predictor.predict(pts, labels)
    assert forced.probabilities == predictor.routing.probabilities  # the selector's view does not change
    with pytest.raises(ValueError, match="unknown domain 'kvasir'"):
        predictor.predict(pts, labels, domain="kvasir")
    with pytest.raises(ValueError, match="lie outside the"):
        predictor.predict([[image.shape[1] + 5, 3]], [1])
    with pytest.raises(ValueError, match=r"mask_input must be \(1, 64, 64\) low-resolution logits"):
        predictor.predict(pts, labels, mask_input=np.zeros((3, 64, 64)))
    with pytest.raises(ValueError, match="the augmodule modules read the point heatmap: give at least one point"):
        predictor.predict(box=[0, 0, 10, 10])
    with pytest.raises(TypeError):
        predictor.predict(pts, labels, None, None, True, False, "shadow")  # domain is keyword-only
    for multimask in (False, True):
        batch = predictor.predict_batch([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples],
                                        return_logits=True, multimask_output=multimask)
        for (img, p, lab), got in zip(samples, batch):
            predictor.set_image(img)
            masks, scores, low = predictor.predict(p, lab, multimask_output=multimask, return_logits=True)
            assert got.domain == predictor.routing.domain and got.probabilities == predictor.routing.probabilities
            assert got.masks.shape == masks.shape == (3 if multimask else 1,) + img.shape[:2]
            assert np.allclose(got.masks, masks, atol=1e-4) and np.allclose(got.iou_predictions, scores, atol=1e-5)
            assert np.allclose(got.low_res_logits, low, atol=1e-4)


def test_release_folder_loads_with_its_family():
    if not RELEASE.exists():
        pytest.skip(f"reference data {RELEASE} is absent (it lives in ../shared/reference beside the repo)")
    predictor = SAMCLPredictor.from_run(RELEASE / "SAM1", device="cpu", random_weights=True, img_size=256)
    assert predictor.model.domains == ["Kvasir", "camo", "ISTD", "ISIC", "cod", "COCO"]
    image = np.asarray(Image.open(sorted((SAMPLE / "data" / "Kvasir" / "test" / "images").iterdir())[0]).convert("RGB"))
    predictor.set_image(image)
    masks, _, _ = predictor.predict([[image.shape[1] / 2, image.shape[0] / 2]], [1], multimask_output=False)
    assert masks.shape == (1,) + image.shape[:2] and predictor.routing.domain in predictor.model.domains + ["vanilla"]
    assert sum(predictor.routing.probabilities.values()) == pytest.approx(1.0)
    assert predictor.run.manifest["format"] == "samcl-release" and predictor.run.config.img_size == 256


# ----------------------------------------------------------------------------- SamPredictor's language
def vanilla(family: str) -> SAMCLPredictor:
    """Our predictor on a tiny backbone with no learning module, upsampling bilinearly as SamPredictor does."""
    bb = tiny_backbone(family)
    bb.upsample = "bilinear"
    return SAMCLPredictor(ModuleBank(bb, AugModuleSpec.for_backbone(bb)))


def stock(family: str, backbone):
    """segment_anything's SamPredictor (sam2's SAM2ImagePredictor) on the same model."""
    if family == "sam":
        from segment_anything import SamPredictor

        return SamPredictor(backbone.sam)
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    s = backbone.img_size
    predictor = SAM2ImagePredictor(backbone.sam2)
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]  # stock values assume 1024
    return predictor


def assert_same(ours, theirs, return_logits: bool, family: str) -> None:
    if family == "sam2" and not return_logits:  # SAM2ImagePredictor returns its bool masks as float32
        theirs = (theirs[0].astype(bool),) + tuple(theirs[1:])
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
    if return_logits:
        np.testing.assert_allclose(ours[0], theirs[0], rtol=0, atol=1e-4)
    else:  # the same pixels set, up to a logit within rounding of the threshold
        assert (ours[0] != theirs[0]).mean() < 1e-4
    np.testing.assert_allclose(ours[1], theirs[1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours[2], theirs[2], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_predict_returns_what_the_stock_predictor_returns(family):
    """Same calls, same square S x S image (no resize in either), no learning module: the same
    masks, scores and low-resolution logits, with points, a box, both, and a mask prompt."""
    ours = vanilla(family)
    theirs = stock(family, ours.model.backbone)
    s = ours.img_size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
    ours.set_image(image)
    with torch.no_grad():
        theirs.set_image(image)
    points = rng.uniform(0, s, (3, 2)).astype(np.float32)
    labels = np.array([1, 1, 0])
    box = np.array([0.2 * s, 0.25 * s, 0.7 * s, 0.8 * s], dtype=np.float32)
    calls = [dict(point_coords=points, point_labels=labels), dict(point_coords=points[:1], point_labels=labels[:1]),
             dict(box=box), dict(point_coords=points[2:], point_labels=labels[2:], box=box)]
    for call in calls:
        for multimask in (True, False):
            for return_logits in (True, False):
                kw = dict(call, multimask_output=multimask, return_logits=return_logits)
                with torch.no_grad():
                    want = theirs.predict(**kw)
                got = ours.predict(**kw, domain="vanilla")
                assert got[0].shape[0] == (3 if multimask else 1)
                assert_same(got, want, return_logits, family)
                assert ours.routing.domain == "vanilla"
        # the best low-resolution mask back as a mask prompt, with and without the points
        low = want[2][np.argmax(want[1])][None]
        for kw in (dict(call, mask_input=low, multimask_output=False), dict(mask_input=low, multimask_output=True)):
            with torch.no_grad():
                want_again = theirs.predict(**kw, return_logits=True)
            assert_same(ours.predict(**kw, return_logits=True, domain="vanilla"), want_again, True, family)
