"""Static point generation (generate_point.py)."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np

from samcl.data import load_mask
from samcl.points import generate_split_points, sample_points
from tests.conftest import REPO, SAMPLE, require
from tests.test_data import make_split


def test_sample_points_with_replacement_on_foreground():
    mask = np.zeros((1024, 1024), np.uint8)
    mask[100, 200] = 1  # one foreground pixel: every draw must hit it
    pts, labels = sample_points(mask, 3, np.random.default_rng(0))
    assert pts == [[200.0, 100.0]] * 3 and labels == [1, 1, 1]


def test_empty_mask_gets_negative_points_and_is_reported(tmp_path, caplog):
    root = make_split(tmp_path / "s", points=False)
    cv2.imwrite(str(root / "masks" / "b.png"), np.zeros((40, 60), np.uint8))
    entries, empty = generate_split_points(root, n=3, seed=1)
    assert empty == ["b.png"] and entries["b.png"][1] == [0, 0, 0]
    assert "b.png has no foreground" in caplog.text
    assert entries["a.png"][1] == [1, 1, 1]


def test_seeded_and_independent_of_the_file_subset(tmp_path):
    r1 = make_split(tmp_path / "one", names=("a", "b", "c"), points=False)
    r2 = make_split(tmp_path / "two", names=("b",), points=False)
    e1, _ = generate_split_points(r1, n=4, seed=7)
    e2, _ = generate_split_points(r2, n=4, seed=7)
    assert e1["b.png"] == e2["b.png"] and len(e1["b.png"][0]) == 4
    e3, _ = generate_split_points(r2, n=4, seed=8)
    assert e3["b.png"] != e2["b.png"]
    assert json.loads((r1 / "masks" / "points.json").read_text()) == e1


def link_sample(tmp_path):
    """The sample's test splits as a writable tree of symlinks (the sample itself is read-only)."""
    sample = require(SAMPLE)
    test_map = json.loads((sample / "datasets_test.json").read_text())
    for folder in test_map.values():
        for sub in ("images", "masks"):
            dst = tmp_path / folder / sub
            dst.mkdir(parents=True)
            for f in (sample / folder / sub).iterdir():
                if f.name != "points.json":
                    os.symlink(f, dst / f.name)
    (tmp_path / "datasets_test.json").write_text(json.dumps(test_map))
    (tmp_path / "datasets_train.json").write_text("{}")
    return test_map


def test_generate_point_script_on_the_real_sample(tmp_path):
    test_map = link_sample(tmp_path)
    r = subprocess.run([sys.executable, str(REPO / "generate_point.py"), "--data_root", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    sizes = set()
    for folder in test_map.values():
        entries = json.loads((tmp_path / folder / "masks" / "points.json").read_text())
        assert len(entries) == 5
        for name, (pts, labels) in entries.items():
            mask_path = tmp_path / folder / "masks" / name
            sizes.add(cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE).shape)
            mask = load_mask(mask_path, 1024)
            assert len(pts) == 3 and labels == [1, 1, 1]
            for x, y in pts:
                assert mask[int(y), int(x)] == 1, (name, x, y)
    assert any(h != w for h, w in sizes) and max(max(s) for s in sizes) > 2000  # non-square and very large
