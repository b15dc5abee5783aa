"""unseen_embeddings: the release's "train" lets an unseen (test-only) domain's training split fill
SAMCL's embedding buffer and gives the selector a class for it; "none" holds it out entirely."""
import json

import pytest
import torch

from samcl import pipeline
from samcl.config import CONFIG_DIR, load_config
from samcl.demo import make_demo_data
from samcl.opening import open_run
from samcl.run_folder import buffer_part, load_selector, selector_snapshot
from samcl.sweep_plan import make_plan

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("unseen")
    make_demo_data(root, n_train=4, n_test=2, points=True)
    return root


def test_none_leaves_the_unseen_domain_out_of_the_buffer_and_the_selector(data, tmp_path):
    # the release's "train" (the default) is pinned by test_end_to_end (a natural class in the selector)
    # and test_cad (natural's part of the buffer)
    cfg = load_config(CONFIG_DIR / "demo_sam.yaml", {
        "data_root": str(data), "run_dir": str(tmp_path / "run"), "epoch": 1, "num_embedding": 2, "batch_size": 2,
        "selector_epochs": 2, "val_every": 0, "order": "polyp_natural", "unseen": ["natural"], "num_workers": 0,
        "unseen_embeddings": "none"})
    pipeline.train(cfg, CPU)
    run = tmp_path / "run"
    before, _ = load_selector(run / selector_snapshot("polyp", "safetensors"))
    selector, domains = load_selector(run / selector_snapshot("natural", "safetensors"))
    assert domains == ["polyp"] and selector.layer4.out_features == 1  # no class for natural
    # the unseen step leaves the selector as it was (it is not retrained)
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), selector.state_dict().values()))
    assert not (run / buffer_part("natural", "safetensors")).exists()
    assert (run / buffer_part("polyp", "safetensors")).is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    last = metrics["steps"][-1]
    assert last["domain"] == "natural" and last["held_out"] is True and "selector_loss" not in last
    assert last["buffer"] == {"polyp": 2}  # no natural embeddings
    # every natural test image is routed to the trained domain's module: there is no route to vanilla SAM
    assert last["evaluation"]["natural"]["selector_counts"] == {"polyp": 2}
    # the unseen column and the vanilla score beside it, after the last step
    summary = last["summary"]["iou"]
    assert summary["unseen"] == last["evaluation"]["natural"]["metrics"]["iou"]
    assert summary["unseen_vanilla"] == metrics["steps"][0]["evaluation"]["natural"]["vanilla"]["iou"]
    # opened for testing (or resumed), the model routes among the selector's domains only
    assert open_run(run, CPU).model.domains == ["polyp"]
    assert set(json.loads((run / "run.json").read_text())["files"]) >= {selector_snapshot("natural", "safetensors")}
    # resumed with a domain added after it: natural stays out, the selector grows to polyp and shadow
    pipeline.resume(run, {"order": "polyp_natural_shadow"}, CPU)
    _, domains = load_selector(run / selector_snapshot("shadow", "safetensors"))
    assert domains == ["polyp", "shadow"] and not (run / buffer_part("natural", "safetensors")).exists()
    last = json.loads((run / "metrics.json").read_text())["steps"][-1]
    assert last["buffer"] == {"polyp": 2, "shadow": 2}
    assert set(last["evaluation"]["natural"]["selector_counts"]) == {"polyp", "shadow"}


def test_the_sweep_carries_the_setting_to_its_runs(tmp_path):
    plan = make_plan(["samcl", "finetune"], 1, 1, tmp_path / "s", str(CONFIG_DIR / "demo_sam.yaml"),
                     {"unseen_embeddings": "none"})
    assert [r.settings["unseen_embeddings"] for r in plan.runs] == ["none", "none"]
