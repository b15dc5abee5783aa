"""Data checker (generate_point.py --check, samcl.datacheck): every problem in one run, nothing written."""
import hashlib
import json
import os
import subprocess
import sys

import cv2
import numpy as np

from samcl import datacheck
from tests.conftest import REPO

H, W = 40, 60
IN_FRAME = [[[100.0, 200.0], [300.0, 400.0], [1000.0, 10.0]], [1, 1, 1]]


def binary_mask(h=H, w=W):
    m = np.zeros((h, w), np.uint8)
    m[5:20, 10:30] = 255
    return m


def write_split(root, pairs, points=True):
    """pairs: {stem: (image ext, mask array)}; images are grey rectangles of the mask's default size."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for i, (stem, (ext, mask)) in enumerate(pairs.items()):
        cv2.imwrite(str(root / "images" / f"{stem}{ext}"), np.full((H, W, 3), 40 + 20 * i, np.uint8))
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    if points:
        (root / "masks" / "points.json").write_text(json.dumps({f"{s}.png": IN_FRAME for s in pairs}))
    return root


def clean_tree(root):
    for split in ("train", "test"):
        write_split(root / "data" / "Good" / split, {"a": (".jpg", binary_mask()), "b": (".png", binary_mask())})
    (root / "datasets_train.json").write_text(json.dumps({"Good": "data/Good/train"}))
    (root / "datasets_test.json").write_text(json.dumps({"Good": "data/Good/test"}))
    return root


def tree_digest(root):
    """Every file's path and content hash, and every folder: what 'nothing was written' compares."""
    entries = []
    for folder, dirs, files in os.walk(root):
        entries.append(("dir", os.path.relpath(folder, root)))
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as fh:
                entries.append((os.path.relpath(path, root), hashlib.sha256(fh.read()).hexdigest()))
    return sorted(entries)


def check(root, capsys, *extra):
    rc = datacheck.main(["--data_root", str(root), "--train_json", "datasets_train.json",
                         "--test_json", "datasets_test.json", *extra])
    return rc, capsys.readouterr().out


def test_clean_tree_passes(tmp_path, capsys):
    root = clean_tree(tmp_path)
    before = tree_digest(root)
    rc, out = check(root, capsys)
    assert rc == 0, out
    assert "problem:" not in out and "warning:" not in out and "clean: 2 split(s), 4 image/mask pairs" in out
    assert tree_digest(root) == before


def planted_tree(root):
    """A clean domain plus one with every kind of problem, and domains in one map only."""
    clean_tree(root)
    bad = root / "data" / "Bad" / "train"
    zero_one = binary_mask() // 255  # values 0 and 1
    edge = binary_mask()
    edge[20, 10:30] = 200  # an anti-aliased edge: a warning, not a problem
    write_split(bad, {"dup": (".jpg", binary_mask()), "trunc": (".jpg", binary_mask()),
                      "small": (".png", binary_mask(30, 30)), "empty": (".png", np.zeros((H, W), np.uint8)),
                      "zeroone": (".png", zero_one), "edge": (".png", edge), "nopoints": (".png", binary_mask()),
                      "outside": (".png", binary_mask()), "twomasks": (".png", binary_mask()),
                      "badmask": (".png", binary_mask()), "stale": (".png", binary_mask())})
    cv2.imwrite(str(bad / "images" / "dup.png"), np.zeros((H, W, 3), np.uint8))  # second image, same stem
    cv2.imwrite(str(bad / "images" / "lonely.png"), np.zeros((H, W, 3), np.uint8))  # image without a mask
    cv2.imwrite(str(bad / "masks" / "orphan.png"), binary_mask())  # mask without an image
    cv2.imwrite(str(bad / "masks" / "twomasks.bmp"), binary_mask())  # second mask, same stem
    data = (bad / "images" / "trunc.jpg").read_bytes()
    (bad / "images" / "trunc.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    (bad / "masks" / "badmask.png").write_bytes(b"not a png at all")  # corrupt mask
    points = json.loads((bad / "masks" / "points.json").read_text())
    del points["nopoints.png"]
    points["outside.png"] = [[[1500.0, 20.0], [10.0, -3.0]], [1, 1]]
    points["stale.png"] = [IN_FRAME[0], [0, 0, 0]]  # negative points, as made for an empty mask
    (bad / "masks" / "points.json").write_text(json.dumps(points))
    # the Bad test split lacks points.json; Ghost's folder does not exist; OnlyTrain / Ghost are in one map only
    write_split(root / "data" / "Bad" / "test", {"x": (".png", binary_mask())}, points=False)
    (root / "datasets_train.json").write_text(json.dumps(
        {"Good": "data/Good/train", "Bad": "data/Bad/train", "OnlyTrain": "data/Good/train",
         "Under_score": "data/Good/train"}))
    (root / "datasets_test.json").write_text(json.dumps(
        {"Good": "data/Good/test", "Bad": "data/Bad/test", "Ghost": "data/Ghost/test",
         "Under_score": "data/Good/test"}))
    return root


EXPECTED = [  # (a file or folder, what its problem line says, {root}: the tree's absolute path)
    ("Bad/train/images/dup.jpg", "2 images share the stem 'dup'"),
    ("Bad/train/masks/twomasks.bmp", "2 masks share the stem 'twomasks'"),
    ("Bad/train/images/lonely.png", "image without a mask"),
    ("Bad/train/masks/orphan.png", "mask without an image"),
    ("Bad/train/images/trunc.jpg", "truncated JPEG"),
    ("Bad/train/masks/badmask.png", "cannot decode the image"),
    ("Bad/train/masks/small.png", "mask is 30x30 but its image small.png is 60x40"),
    ("Bad/train/masks/empty.png", "no foreground"),
    ("Bad/train/masks/empty.png", "has positive points but the mask is empty"),
    ("Bad/train/masks/zeroone.png", "a 0/1 mask (300 pixels are 1): binarisation (>= 128) reads it as empty"),
    ("Bad/train/masks/zeroone.png", "has positive points but the mask is empty"),
    ("Bad/train/masks/stale.png", "has only negative points but the mask is not empty"),
    ("Bad/train/masks/nopoints.png", "no entry in"),
    ("Bad/train/masks/outside.png", "lie outside the 1024x1024 frame"),
    ("Bad/test/masks/points.json", "not found; generate the static prompt points"),
    ("Ghost/test", "split folder missing"),
    ("datasets_test.json", "domain 'OnlyTrain' is in {root}/datasets_train.json but not in this map"),
    ("datasets_train.json", "domain 'Ghost' is in {root}/datasets_test.json but not in this map"),
    ("datasets_train.json: domain key", "'Under_score' contains '_', which --order uses to join keys"),
]


def test_every_planted_problem_is_reported_in_one_run_and_nothing_is_written(tmp_path, capsys):
    root = planted_tree(tmp_path)
    before = tree_digest(root)
    rc, out = check(root, capsys)
    assert rc == 1
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    for where, what in EXPECTED:
        what = what.format(root=root.absolute())
        assert any(where in line and what in line for line in problems), (where, what, out)
    assert len(problems) == len(EXPECTED), out  # each once, nothing else
    assert "[[1500.0, 20.0], [10.0, -3.0]] lie outside the 1024x1024 frame" in out
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "edge.png: not binary: 20 pixels" in warnings[0] and "(>= 128)" in warnings[0]
    summary = out.split("\n\n", 1)[1]
    for row in ("Good         train       2         0         0", "Bad          train      11        14         1",
                "Bad          test        1         1         0", "Ghost        test        0         1         0",
                "OnlyTrain    test        -         1         0  (not in the map)",
                "Under_score  -           -         1         0  (the JSON maps)"):
        assert row in summary, (row, summary)
    assert f"{len(EXPECTED)} problem(s), 1 warning(s); nothing was written" in out
    assert tree_digest(root) == before


def test_generate_point_check_dispatches_before_writing(tmp_path):
    root = planted_tree(tmp_path)
    before = tree_digest(root)
    r = subprocess.run([sys.executable, "generate_point.py", "--check", "--data_root", str(root),
                        "--domains", "Bad", "Good"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "trunc.jpg" in r.stdout and "Ghost" not in r.stdout  # --domains limits the check
    assert tree_digest(root) == before  # in particular no points.json for Bad/test


def test_domain_filter_and_reference_rule(tmp_path, capsys):
    root = planted_tree(tmp_path)
    rc, out = check(root, capsys, "--domains", "Good", "Nope")
    assert rc == 1 and "--domains names 'Nope', which neither JSON map has" in out and "Bad/" not in out
    rc, out = check(root, capsys, "--domains", "Bad", "--mask_binarize", "reference")
    assert "edge.png: not binary: 20 pixels" in out and "floor(v/255)" in out
