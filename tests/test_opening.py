"""samcl.opening.open_run: one reading of a run folder or a release folder, for every reader."""
import dataclasses
import pathlib

import numpy as np
import pytest
import torch

from samcl import pipeline
from samcl.methods.base import ContinualMethod
from samcl.opening import open_run
from samcl.predictor import SAMCLPredictor
from samcl.release import RELEASE_ORDER
from samcl.release.unpickle import ReleaseFormatError
from tests.conftest import RELEASE, require, train_demo_run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_demo_run(tmp_path_factory.mktemp("opening"))


def count_reads(monkeypatch, name: str) -> list:
    """Every Path.read_text of a file called ``name`` from now on."""
    seen = []
    read_text = pathlib.Path.read_text

    def counting(self, *args, **kwargs):
        if self.name == name:
            seen.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", counting)
    return seen


def test_every_reader_reads_run_json_once(run, monkeypatch, tmp_path):
    seen = count_reads(monkeypatch, "run.json")
    predictor = SAMCLPredictor.from_run(run.run_dir, device="cpu")
    assert len(seen) == 1
    assert predictor.run.manifest["order"] == ["polyp", "natural"] and predictor.run.config.order == "polyp_natural"
    seen.clear()
    pipeline.test(run.run_dir, run, CPU, with_vanilla=False, output=tmp_path / "report.json")
    assert len(seen) == 1


def test_the_test_method_is_built_from_the_runs_configuration(run, monkeypatch, tmp_path):
    """The command line supplies the data and the weights; the method gets the run's own settings, and the
    results do not change with settings the run keeps (here its learning rate and seed)."""
    got = []
    init = ContinualMethod.__init__

    def recording(self, cfg, *args, **kwargs):
        got.append(cfg)
        init(self, cfg, *args, **kwargs)

    monkeypatch.setattr(ContinualMethod, "__init__", recording)
    same = pipeline.test(run.run_dir, run, CPU, with_vanilla=False, output=tmp_path / "a.json")
    other = dataclasses.replace(run, lr=0.5, selector_lr=0.5)
    changed = pipeline.test(run.run_dir, other, CPU, with_vanilla=False, output=tmp_path / "b.json")
    assert [c.lr for c in got] == [run.lr, run.lr] and [c.method for c in got] == ["samcl", "samcl"]
    assert same["results"] == changed["results"]


def test_a_release_folder_is_unpickled_once_with_its_familys_recipe(monkeypatch):
    require(RELEASE)
    from samcl.release import folder

    read = []
    restricted_load = folder.restricted_load

    def counting(path, allowed):
        read.append(pathlib.Path(path).name)
        return restricted_load(path, allowed)

    monkeypatch.setattr(folder, "restricted_load", counting)
    opened = open_run(RELEASE / "SAM1", CPU, random_weights=True, settings={"img_size": 256})
    assert sorted(read) == sorted([f"{d}.pth" for d in RELEASE_ORDER[:5]] + ["Module_Selector.pth"])
    cfg = opened.config
    assert (cfg.backbone, cfg.vit_name, cfg.img_size, cfg.upsample, cfg.random_weights) == ("sam", "vit_b", 256,
                                                                                            "nearest", True)
    assert cfg.order == "_".join(RELEASE_ORDER) and cfg.unseen == ["COCO"] and cfg.method == "samcl"
    assert opened.manifest["format"] == "samcl-release" and opened.model.domains == list(RELEASE_ORDER)
    assert opened.report_dir == pathlib.Path(cfg.output_dir) / "release_SAM1"
    read.clear()
    with pytest.raises(ReleaseFormatError, match=r"holds SAM \(ViT\) modules .* test it with test.py"):
        open_run(RELEASE / "SAM1", CPU, random_weights=True, release_settings={"backbone": "sam2"})
    assert len(read) == 6  # refused after the one reading, before any backbone is built


def test_weights_given_replace_the_runs_as_a_pair(run, tmp_path):
    """A checkpoint given for a run trained on random weights: random_weights is then False too, and the
    weights check names both; the run's own weights open, and segment."""
    from samcl.backbones.sam import build_sam
    from samcl.run_folder import RunFolderError

    torch.save(build_sam("vit_tiny")[0].state_dict(), tmp_path / "other.pth")
    with pytest.raises(RunFolderError, match=r"was trained on random weights \(seed 1234\), but the backbone weights "
                                             r"given are other.pth .*; pass --random_weights and no --ckpt"):
        open_run(run.run_dir, CPU, ckpt=str(tmp_path / "other.pth"))
    opened = open_run(run.run_dir, CPU, random_weights=True)
    assert (opened.config.ckpt, opened.config.random_weights) == (None, True)
    predictor = SAMCLPredictor(opened.model)
    predictor.set_image(np.zeros((40, 60, 3), dtype=np.uint8))
    masks, scores, low = predictor.predict([[10, 10]], [1], multimask_output=False)
    assert masks.shape == (1, 40, 60) and scores.shape == (1,) and predictor.routing.domain in ("polyp", "natural")
