"""The baselines' defining behaviour under the one protocol: zero-shot trains nothing and scores
as the frozen model; fine-tuning one shared module forgets a domain that conflicts with a later one."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from samcl import pipeline
from samcl.config import CONFIG_DIR, load_config
from samcl.demo import make_demo_data
from samcl.points import generate_split_points
from samcl.predictor import SAMCLPredictor

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The demo's domains, and 'flip': the polyp images with every mask inverted (a conflicting domain)."""
    root = tmp_path_factory.mktemp("baselines")
    make_demo_data(root, n_train=6, n_test=3)
    maps = {split: json.loads((root / f"datasets_{split}.json").read_text()) for split in ("train", "test")}
    for split in ("train", "test"):
        src, dst = root / "data" / "Polyp" / split, root / "data" / "Flip" / split
        shutil.copytree(src / "images", dst / "images")
        (dst / "masks").mkdir(parents=True)
        for m in (src / "masks").glob("*.png"):
            Image.fromarray(255 - np.asarray(Image.open(m).convert("L"))).save(dst / "masks" / m.name)
        generate_split_points(dst)
        maps[split]["flip"] = f"data/Flip/{split}"
        (root / f"datasets_{split}.json").write_text(json.dumps(maps[split]))
    return root


def cfg_for(data, run_dir, method, **kw):
    return load_config(CONFIG_DIR / "demo_sam.yaml", {
        "data_root": str(data), "run_dir": str(run_dir), "method": method, "epoch": 2, "num_embedding": 3,
        "batch_size": 3, "selector_epochs": 2, "val_every": 0, "num_workers": 0, **kw})


def test_zeroshot_trains_nothing_and_scores_as_the_frozen_model(data, tmp_path):
    cfg = cfg_for(data, tmp_path / "run", "zeroshot", order="polyp_shadow_natural")
    before = {k: v.clone() for k, v in pipeline.build_model(cfg, CPU).backbone.state_dict().items()}
    metrics = pipeline.train(cfg, CPU)
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["modules"] == {}
    assert not list(run.glob("polyp.*")) and not (run / "selector").exists()
    assert all(not s["trained"] for s in metrics["steps"])
    assert all(s["summary"]["iou"]["FM"] == 0 for s in metrics["steps"])
    report = pipeline.test(run, cfg, CPU)
    for d, res in report["results"].items():
        assert res["metrics"] == res["vanilla"] and "selector_counts" not in res, d
    model = pipeline.load_run(run, cfg, CPU)
    assert model.modules_by_domain.keys() == set() and model.selector is None
    assert model.latest_trained() == -1  # the predictor segments with the frozen model
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())


def test_finetune_forgets_a_domain_that_a_later_one_contradicts(data, tmp_path):
    run = tmp_path / "run"
    cfg = cfg_for(data, run, "finetune", order="polyp_flip", unseen=[], epoch=4)
    metrics = pipeline.train(cfg, CPU)
    steps = metrics["steps"]
    iou = metrics["accuracy_matrix"]["matrix"]["iou"]
    # FM after step 1: the mean over both domains of A[j][j] - A[1][j] (the last one's term is 0)
    assert iou[1][0] < iou[0][0] and steps[1]["summary"]["iou"]["FM"] == pytest.approx((iou[0][0] - iou[1][0]) / 2)
    assert steps[1]["summary"]["iou"]["FM"] > 1e-3  # clearly above rounding: this run measured 0.0055
    assert set(json.loads((run / "run.json").read_text())["modules"]) == {"polyp", "flip"}  # a snapshot per domain
    report = pipeline.test(run, cfg, CPU, with_vanilla=False)  # the module as after the last domain, for every image
    for j, d in enumerate(("polyp", "flip")):
        assert report["results"][d]["metrics"]["iou"] == pytest.approx(iou[1][j])
    # the predictor, task-agnostic, segments with the latest module too (there is no selector)
    predictor = SAMCLPredictor.from_run(run, device="cpu")
    image = np.asarray(Image.open(sorted((data / "data" / "Polyp" / "test" / "images").iterdir())[0]).convert("RGB"))
    predictor.set_image(image)
    latest = predictor.predict([[20, 20]], [1], multimask_output=False, return_logits=True)[0]
    assert predictor.routing.domain == "flip" and np.array_equal(latest, predictor.predict(
        [[20, 20]], [1], multimask_output=False, return_logits=True, domain="flip")[0])
    # SAMCL on the same domains keeps one module each: what it loses comes from routing alone
    samcl = pipeline.train(cfg_for(data, tmp_path / "samcl", "samcl", order="polyp_flip", unseen=[], epoch=4), CPU)
    routed = samcl["steps"][1]["evaluation"]["polyp"]
    if routed["selector_accuracy"] == 1.0:
        assert samcl["steps"][1]["summary"]["iou"]["FM"] == pytest.approx(0.0, abs=1e-12)


def test_joint_trains_once_on_the_union_and_does_not_depend_on_the_order(data, tmp_path):
    results = {}
    for order in ("polyp_shadow_natural", "shadow_polyp_natural"):
        run = tmp_path / order
        metrics = pipeline.train(cfg_for(data, run, "joint", order=order, epoch=1), CPU)
        steps = metrics["steps"]
        assert [s["trained"] for s in steps] == [True, False, False]
        assert steps[0]["trained_on"] == ["polyp", "shadow"]  # name order, whatever the order of the run
        assert steps[0]["training"]["epoch_loss"] and len(steps[0]["training"]["epoch_loss"]) == 1
        first = order.split("_")[0]
        assert json.loads((run / "run.json").read_text())["modules"] == {first: f"{first}.safetensors"}
        assert steps[-1]["summary"]["iou"]["FM"] == pytest.approx(0.0, abs=1e-12)  # one module, never changed
        module = pipeline.load_run(run, cfg_for(data, run, "joint", order=order), CPU).module_for(first)
        results[order] = ({k: v.clone() for k, v in module.state_dict().items()},
                          {d: r["metrics"] for d, r in steps[-1]["evaluation"].items()})
    (m1, r1), (m2, r2) = results.values()
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    assert r1 == r2


def test_demo_compare_trains_each_method_and_prints_one_table(tmp_path, monkeypatch, capsys):
    import functools

    from samcl import demo

    monkeypatch.setattr(demo, "make_demo_data", functools.partial(make_demo_data, n_train=4, n_test=2))
    threads = torch.get_num_threads()
    try:
        demo.main(["--compare", "--output", str(tmp_path), "--epoch", "1"])
    finally:
        torch.set_num_threads(threads)  # the demo pins one thread for its printed table
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| run | method | module | backbone | domains | iou_AA | iou_FM |")
    assert [r.split(" | ")[1:3] for r in rows[1:]] == [
        ["zeroshot", "none"], ["finetune", "lora"], ["er", "lora"], ["samcl", "lora"], ["samcl (oracle)", "lora"],
        ["samcl (ncm)", "lora"], ["merge (ties)", "lora"]]
    for label in demo.COMPARED:
        run = json.loads((tmp_path / "compare_sam" / label.replace(":", "-") / "run.json").read_text())
        method, _, variant = label.partition(":")
        assert run["completed"] == ["polyp", "shadow", "lesion", "natural"] and run["config"]["method"] == method
        assert not variant or variant in (run["config"]["selector"], run["config"]["merge"])
    assert (tmp_path / "compare.csv").read_text().count("\n") == 8 and (tmp_path / "compare.png").is_file()


@pytest.mark.parametrize("method", ["zeroshot", "finetune", "joint"])
def test_the_simple_baselines_run_on_sam2(method, data, tmp_path):
    cfg = load_config(CONFIG_DIR / "demo_sam2.yaml", {
        "data_root": str(data), "run_dir": str(tmp_path / "run"), "method": method, "learning_module": "lora",
        "epoch": 1, "batch_size": 3, "val_every": 0, "num_workers": 0, "order": "polyp_shadow", "unseen": []})
    metrics = pipeline.train(cfg, CPU)
    assert [s["trained"] for s in metrics["steps"]] == {"zeroshot": [False, False], "finetune": [True, True],
                                                         "joint": [True, False]}[method]
    report = pipeline.test(tmp_path / "run", cfg, CPU)
    last = metrics["accuracy_matrix"]["matrix"]["iou"][-1]
    assert [report["results"][d]["metrics"]["iou"] for d in ("polyp", "shadow")] == pytest.approx(last)
    model = pipeline.load_run(tmp_path / "run", cfg, CPU)
    assert model.backbone.family == "sam2" and model.latest_trained() == {"zeroshot": -1, "finetune": 1,
                                                                          "joint": 0}[method]
