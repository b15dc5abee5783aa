"""docs/data.md's "Try it first" block, run exactly as written (from a fresh folder holding the scripts):
synthetic domains, points, the check, vit_tiny with random weights at its own 128 px, a test that
takes the weights from run.json, a resume with a longer order and a test that finds the resumed
folder by the order in its run.json."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Try it first: on the CPU, without weights"
SCRIPTS = ("train.py", "test.py", "generate_point.py")


def tryout_block() -> str:
    text = (REPO / "docs" / "data.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section has one bash block"
    return blocks[0]


@pytest.fixture(scope="module")
def tried(tmp_path_factory):
    """The block's output and its tryout folder (the scripts linked in beside it, `python` this interpreter,
    and the user's own maps in the folder it starts from, which the tryout leaves alone)."""
    here = tmp_path_factory.mktemp("tryout")
    for name in SCRIPTS:
        (here / name).symlink_to(REPO / name)
    bin_dir = here / ".bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a link would leave the venv
    (bin_dir / "python").chmod(0o755)
    for split in ("train", "test"):
        (here / f"datasets_{split}.json").write_text(json.dumps({"Garden": f"data/Garden/{split}"}))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", tryout_block()], cwd=here, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return here / "tryout", r.stdout + r.stderr


def test_the_block_trains_the_tiny_backbone_at_its_own_size_with_random_weights(tried):
    here, _ = tried
    run = here / "log_sam1" / "SAMCL_polyp_shadow_300_1234_training"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["backbone"]["arch"] == "vit_tiny" and manifest["backbone"]["img_size"] == 128
    assert manifest["checkpoint"] == {"random_weights": True, "seed": 1234}
    assert manifest["completed"] == ["polyp", "shadow", "lesion"]  # resumed with the longer order
    assert json.loads((here / "datasets_train.json").read_text())["polyp"] == "data/Polyp/train"


def test_the_tests_find_the_run_with_its_own_weights_before_and_after_the_resume(tried):
    here, out = tried
    run = Path("log_sam1") / "SAMCL_polyp_shadow_300_1234_training"
    assert "has no official checkpoint" not in out
    assert (f"resumed {run}: its run.json has the order polyp_shadow_lesion (the folder keeps its name); test it "
            f"with:\n    python ../test.py --run_dir {run} --device cpu") in out
    assert (f"no run folder log_sam1/SAMCL_polyp_shadow_lesion_300_1234_training: testing {run}, whose run.json "
            f"has the order polyp_shadow_lesion\n") in out
    report = json.loads((here / run / "test_metrics.json").read_text())
    assert report["domains"] == ["polyp", "shadow", "lesion"]  # the second test: the whole resumed order
