"""Dataset over the release layout: pairing, decoding, binarisation, points, errors."""
import json

import cv2
import numpy as np
import pytest
import torch

from samcl.data import DataError, SegmentationSplit, binarize_mask, collate, pair_split, read_domain_map
from tests.conftest import SAMPLE, require


def make_split(root, names=("a", "b"), size=(40, 60), exts=(".jpg", ".png"), points=True):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    entries = {}
    for i, name in enumerate(names):
        h, w = size
        img = np.full((h, w, 3), 30 * (i + 1), np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[5:20, 10:30] = 255
        mask[20, 10] = 200  # an anti-aliased edge value
        cv2.imwrite(str(root / "images" / f"{name}{exts[i % len(exts)]}"), img)
        cv2.imwrite(str(root / "masks" / f"{name}.png"), mask)
        entries[f"{name}.png"] = [[[100.0, 200.0], [300.0, 400.0], [1000.0, 10.0]], [1, 1, 1]]
    if points:
        (root / "masks" / "points.json").write_text(json.dumps(entries))
    return root


def test_sample_layout_and_values(tmp_path):
    ds = SegmentationSplit(make_split(tmp_path / "s"), img_size=128)
    assert len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.uint8
    assert item["mask"].shape == (1, 128, 128) and set(item["mask"].unique().tolist()) == {0.0, 1.0}
    # points.json lives in the 1024 frame; scaled to the 128 frame
    assert torch.allclose(item["points"], torch.tensor([[12.5, 25.0], [37.5, 50.0], [125.0, 1.25]]))
    assert item["labels"].tolist() == [1, 1, 1] and item["name"] == "a.jpg"
    b = collate([ds[0], ds[1]])
    assert b["image"].shape == (2, 3, 128, 128) and b["points"].shape == (2, 3, 2) and b["name"] == ["a.jpg", "b.png"]


def test_binarisation_threshold_and_reference_rule():
    m = np.array([[0, 127, 128, 200, 254, 255]], np.uint8)
    assert binarize_mask(m).tolist() == [[0, 0, 1, 1, 1, 1]]
    assert binarize_mask(m, "reference").tolist() == [[0, 0, 0, 0, 0, 1]]
    assert binarize_mask(m, "threshold", 200).tolist() == [[0, 0, 0, 1, 1, 1]]


def test_pairing_by_stem_reports_mismatches_by_name(tmp_path):
    root = make_split(tmp_path / "s", names=("a", "b", "c"))
    (root / "masks" / "b.png").unlink()
    cv2.imwrite(str(root / "masks" / "zz.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"images without a mask: b; masks without an image: zz"):
        pair_split(root)


def test_missing_folders_points_and_entries(tmp_path):
    with pytest.raises(DataError, match="images/ and masks/"):
        pair_split(tmp_path)
    root = make_split(tmp_path / "s", points=False)
    with pytest.raises(DataError, match="points.json not found.*generate_point.py"):
        SegmentationSplit(root, 64)
    (root / "masks" / "points.json").write_text(json.dumps({"a.png": [[[1, 2]], [1]]}))
    with pytest.raises(DataError, match="no points for 1 image.*b.png"):
        SegmentationSplit(root, 64)


def test_corrupt_truncated_and_mis_sized_files_are_named(tmp_path):
    root = make_split(tmp_path / "s")
    data = (root / "images" / "a.jpg").read_bytes()
    (root / "images" / "a.jpg").write_bytes(data[: len(data) // 2])
    ds = SegmentationSplit(root, 64)
    with pytest.raises(DataError, match=r"a\.jpg: cannot decode.*corrupt or truncated"):
        ds[0]
    (root / "images" / "b.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"b\.png: cannot decode"):
        ds[1]
    root2 = make_split(tmp_path / "t")
    cv2.imwrite(str(root2 / "masks" / "a.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match=r"masks/a\.png is 10x10 but its image .*a\.jpg is 60x40"):
        SegmentationSplit(root2, 64)[0]


def test_empty_mask_loads(tmp_path):
    root = make_split(tmp_path / "s")
    cv2.imwrite(str(root / "masks" / "a.png"), np.zeros((40, 60), np.uint8))
    assert SegmentationSplit(root, 64)[0]["mask"].sum() == 0


def test_domain_map_resolves_under_data_root(tmp_path):
    (tmp_path / "datasets_train.json").write_text(json.dumps({"Kvasir": "data/Kvasir/train"}))
    assert read_domain_map("datasets_train.json", tmp_path) == {"Kvasir": tmp_path / "data/Kvasir/train"}
    with pytest.raises(DataError, match="not found"):
        read_domain_map("nope.json", tmp_path)


def test_release_sample_loads_as_it_ships():
    sample = require(SAMPLE)
    test_map = read_domain_map(sample / "datasets_test.json", sample)
    for domain, folder in test_map.items():
        ds = SegmentationSplit(folder, img_size=256, domain=domain)
        assert len(ds) == 5
        item = ds[0]
        assert item["image"].shape == (3, 256, 256) and item["mask"].shape == (1, 256, 256)
        assert item["points"].shape == (3, 2) and (item["points"] >= 0).all() and (item["points"] < 256).all()


def test_awkward_files_are_read_as_pil_reads_them(tmp_path):
    """EXIF orientation is not applied, alpha is dropped, palettes are expanded and 16-bit values
    above 255 are clipped (PIL's convert, as the release); the README's data section says so."""
    from PIL import Image

    from samcl.data import read_image

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = (200, 10, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° to display"
    Image.fromarray(rgb).save(tmp_path / "exif.jpg", exif=exif, quality=95)
    img = read_image(tmp_path / "exif.jpg")
    assert img.mode == "RGB" and img.size == (30, 20)  # as stored, not rotated
    rgba = np.dstack([rgb, np.full((20, 30), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(np.asarray(read_image(tmp_path / "rgba.png")), rgb)  # alpha dropped, not composited
    pal = Image.fromarray(np.tile(np.arange(3, dtype=np.uint8), (4, 2)), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    pal.save(tmp_path / "pal.png")
    assert np.asarray(read_image(tmp_path / "pal.png"))[0, :3].tolist() == [[0, 0, 0], [255, 0, 0], [0, 0, 255]]
    m16 = np.zeros((4, 6), np.uint16)
    m16[0, :3] = (65535, 300, 1)
    cv2.imwrite(str(tmp_path / "m16.png"), m16)
    assert np.asarray(read_image(tmp_path / "m16.png", gray=True))[0, :4].tolist() == [255, 255, 1, 0]
