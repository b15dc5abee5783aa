"""python -m samcl.sweep: the plan's orders and seeds, a summary equal to the runs' own numbers, and a
second call that skips finished runs, resumes unfinished ones and refuses another plan."""
import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from samcl import pipeline, sweep, sweep_plan
from samcl.cli import CLIError
from samcl.config import CONFIG_DIR, build_config
from samcl.demo import make_demo_data

CPU = torch.device("cpu")
DEMO = str(CONFIG_DIR / "demo_sam.yaml")
MB = 1024**2


# ----------------------------------------------------------------------------- the plan
def test_orders_start_with_the_configured_one_then_distinct_random_ones_with_the_unseen_last():
    orders = sweep_plan.draw_orders(["a", "b", "c", "d"], ["u", "v"], 4, order_seed=0)
    # numpy.random.default_rng(0).permutation(4) draws [2, 0, 1, 3], then [3, 2, 1, 0], then [1, 3, 0, 2]
    assert orders == [["a", "b", "c", "d", "u", "v"], ["c", "a", "b", "d", "u", "v"],
                      ["d", "c", "b", "a", "u", "v"], ["b", "d", "a", "c", "u", "v"]]
    rng, expected = np.random.default_rng(0), [["a", "b", "c", "d"]]  # the same drawing, written out
    while len(expected) < 4:
        drawn = [["a", "b", "c", "d"][i] for i in rng.permutation(4)]
        expected += [drawn] if drawn not in expected else []
    assert [o[:4] for o in orders] == expected
    assert sweep_plan.draw_orders(["a", "b", "c", "d"], ["u", "v"], 4, 0) == orders  # deterministic
    assert sweep_plan.draw_orders(["a", "b", "c", "d"], ["u", "v"], 2, 0) == orders[:2]  # a larger K only adds orders
    assert sweep_plan.draw_orders(["a", "b", "c", "d"], [], 1, 5) == [["a", "b", "c", "d"]]
    assert sweep_plan.draw_orders(["a", "b", "c", "d"], [], 2, 1) != sweep_plan.draw_orders(["a", "b", "c", "d"], [], 2, 0)
    # K = n!: every permutation once (a repeated drawing is drawn again), the configured one first
    every = sweep_plan.draw_orders(["a", "b", "c"], ["u"], 6, 0)
    assert every[0] == ["a", "b", "c", "u"] and all(o[-1] == "u" for o in every)
    assert sorted(tuple(o[:3]) for o in every) == sorted(itertools.permutations("abc"))
    with pytest.raises(ValueError, match="only 6 distinct"):
        sweep_plan.draw_orders(["a", "b", "c"], ["u"], 7, 0)
    with pytest.raises(ValueError, match="at least 1"):
        sweep_plan.draw_orders(["a", "b"], [], 0, 0)


def test_the_plan_runs_every_method_over_every_order_and_seed_with_its_settings(tmp_path):
    plan = sweep_plan.make_plan(["zeroshot", "finetune"], 2, 3, tmp_path / "s", DEMO, {"epoch": 3})
    assert plan.orders == [["polyp", "shadow", "lesion", "natural"], ["lesion", "polyp", "shadow", "natural"]]
    assert plan.seeds == [1234, 1235, 1236] and plan.unseen == ["natural"]
    assert [(r.method, r.order, r.seed) for r in plan.runs] == [
        (m, k, s) for m in ("zeroshot", "finetune") for k in (0, 1) for s in (1234, 1235, 1236)]
    r = plan.runs[4]
    assert r.folder == "zeroshot/order1_seed1235"
    assert {k: r.settings[k] for k in ("method", "order", "unseen", "seed", "run_dir", "epoch", "vit_name")} == {
        "method": "zeroshot", "order": "lesion_polyp_shadow_natural", "unseen": ["natural"], "seed": 1235,
        "run_dir": str(tmp_path / "s" / "zeroshot" / "order1_seed1235"), "epoch": 3, "vit_name": "vit_tiny"}
    assert r.config().resolved_run_dir() == tmp_path / "s" / r.folder
    # without --config: each method's own recipe, samcl's with the baselines' LoRA module
    assert sweep_plan.recipe_for("finetune", None) == CONFIG_DIR / "baselines" / "finetune.yaml"
    assert sweep_plan.recipe_for("samcl", None) == CONFIG_DIR / "samcl_lora_vit_b.yaml"
    assert sweep_plan.recipe_for("nosuchmethod", DEMO) == CONFIG_DIR / "demo_sam.yaml"
    with pytest.raises(ValueError, match="no recipe"):
        sweep_plan.recipe_for("nosuchmethod", None)
    plan = sweep_plan.make_plan(["samcl", "finetune"], 1, 1, tmp_path / "t")
    assert [r.settings["learning_module"] for r in plan.runs] == ["lora", "lora"]
    assert plan.orders == [["Kvasir", "camo", "ISTD", "ISIC", "cod", "COCO"]]
    with pytest.raises(ValueError, match="more than once"):
        sweep_plan.make_plan(["finetune", "finetune"], 1, 1, tmp_path / "u", DEMO)
    with pytest.raises(ValueError, match="sets"):
        sweep_plan.make_plan(["finetune"], 1, 1, tmp_path / "u", DEMO, {"run_dir": "x"})
    # a method that trains a module kind of its own keeps it, whatever the file or the flags say
    plan = sweep_plan.make_plan(["olora", "l2p", "finetune"], 1, 1, tmp_path / "v", DEMO, {"learning_module": "lora"})
    assert [r.settings["learning_module"] for r in plan.runs] == ["olora", "prompt_pool", "lora"]


def test_mean_and_sample_std():
    assert sweep._mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, math.sqrt(((4 / 3) ** 2 + (1 / 3) ** 2
                                                                                  + (5 / 3) ** 2) / 2)))
    assert sweep._mean_std([0.25]) == (0.25, 0.0)
    assert sweep._mean_std([0.25, None]) == (None, None) and sweep._mean_std([]) == (None, None)


def test_set_values_are_read_as_yaml():
    assert sweep.parse_set(["epoch=2", "lr=1e-3", "unseen=[a, b]", "deterministic=false", "order=a_b"]) == {
        "epoch": 2, "lr": "1e-3", "unseen": ["a", "b"], "deterministic": False, "order": "a_b"}
    with pytest.raises(CLIError, match="KEY=VALUE"):
        sweep.parse_set(["epoch"])


# ----------------------------------------------------------------------------- a sweep
def argv_for(data, out, *extra):
    return ["--methods", "zeroshot,finetune", "--orders", "2", "--seeds", "1", "--config", DEMO,
            "--data_root", str(data), "--device", "cpu", "--order", "polyp_shadow_natural", "--unseen", "natural",
            "--epoch", "1", "--set", "num_embedding=3", "--set", "batch_size=2", "--set", "selector_epochs=2",
            "--set", "val_every=0", "--num_workers", "0", "--output", str(out), *extra]


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A sweep of zeroshot and finetune over 2 orders x 1 seed, into a folder where the first
    finetune run was already trained over its order's first domain only."""
    root = tmp_path_factory.mktemp("sweep")
    make_demo_data(root, n_train=4, n_test=2)
    out = root / "sweep"
    argv = argv_for(root, out)
    plan, _ = sweep.plan_from_args(sweep.build_parser().parse_args(argv))
    first = next(r for r in plan.runs if r.folder == "finetune/order0_seed1234")
    pipeline.train(build_config([("test", {**first.settings, "order": "polyp", "unseen": []})]), CPU)
    run = out / first.folder
    before = {"module": (run / "polyp.safetensors").read_bytes(),
              "step": json.loads((run / "metrics.json").read_text())["steps"][0]}
    assert sweep.main(argv) == 0
    return root, out, plan, before


def test_the_summary_is_the_mean_and_std_of_the_runs_own_metrics(swept):
    root, out, plan, _ = swept
    assert json.loads((out / "sweep.json").read_text())["orders"] == [
        ["polyp", "shadow", "natural"], ["shadow", "polyp", "natural"]]
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["zeroshot", "finetune"]
    md = (out / "summary.md").read_text()
    for row in rows:
        m = row["method"]
        metrics = [json.loads((out / m / f"order{k}_seed1234" / "metrics.json").read_text()) for k in (0, 1)]
        assert row["runs"] == "2"
        for metric, k in itertools.product(("iou", "f1", "mae"), ("AA", "FM", "FT")):
            values = np.array([mt["steps"][-1]["summary"][metric][k] for mt in metrics])
            assert float(row[f"{metric}_{k}_mean"]) == pytest.approx(values.mean(), abs=1e-12), (m, metric, k)
            assert float(row[f"{metric}_{k}_std"]) == pytest.approx(values.std(ddof=1), abs=1e-12), (m, metric, k)
        trained = [[s for s in mt["steps"] if s["trained"]] for mt in metrics]
        stored = np.array([mt["steps"][-1]["storage"]["kept_bytes"] / len(t) / MB if t else 0.0
                           for mt, t in zip(metrics, trained)])
        assert float(row["stored_mb_per_domain_mean"]) == pytest.approx(stored.mean())
        seconds = np.array([sum(s["training_seconds"] for s in mt["steps"]) for mt in metrics])
        assert float(row["training_seconds_mean"]) == pytest.approx(seconds.mean())
        iou = np.array([mt["steps"][-1]["summary"]["iou"]["AA"] for mt in metrics])
        module = "none" if m == "zeroshot" else "augmodule"  # zero-shot trains no module
        assert f"| {m} | {module} | 2 | {iou.mean():.4f} ± {iou.std(ddof=1):.4f} |" in md
    assert [r["stored_mb_per_domain_mean"] == "0.0" for r in rows] == [True, False]  # zeroshot keeps nothing
    with Image.open(out / "summary.png") as picture:
        assert picture.format == "PNG" and picture.width > 400


def test_an_unfinished_run_folder_is_resumed_not_restarted(swept):
    _, out, _, before = swept
    run = out / "finetune" / "order0_seed1234"
    assert json.loads((run / "run.json").read_text())["completed"] == ["polyp", "shadow", "natural"]
    assert (run / "polyp.safetensors").read_bytes() == before["module"]
    step = json.loads((run / "metrics.json").read_text())["steps"][0]
    assert step["training"] == before["step"]["training"]
    assert step["training_seconds"] == before["step"]["training_seconds"]
    log = (out / "sweep_log.txt").read_text()
    assert f"resuming {run}" in log and f"training {out / 'finetune' / 'order1_seed1234'}" in log
    run_log = (run / "log.txt").read_text()  # one log: the first domain's training, then the rest
    assert run_log.index("step 1/1: polyp") < run_log.index("new domain shadow before training") < run_log.index(
        "step 2/3: shadow")
    assert "step 1/3" not in run_log


def test_a_second_call_skips_the_finished_runs(swept, monkeypatch):
    root, out, plan, _ = swept
    runs = {r.folder: files_of(out / r.folder) for r in plan.runs}

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pipeline, "train", refuse)
    monkeypatch.setattr(pipeline, "resume", refuse)
    lines = len((out / "sweep_log.txt").read_text().splitlines())
    assert sweep.main(argv_for(root, out)) == 0
    assert {r.folder: files_of(out / r.folder) for r in plan.runs} == runs
    new = (out / "sweep_log.txt").read_text().splitlines()[lines:]
    assert sum("skipped" in line for line in new) == len(plan.runs) == 4


def test_another_plan_into_the_same_folder_is_refused(swept):
    root, out, _, _ = swept
    plan = (out / "sweep.json").read_bytes()
    with pytest.raises(CLIError, match="holds another sweep.*seeds"):
        sweep.main(argv_for(root, out, "--seeds", "2"))
    with pytest.raises(CLIError, match="epoch 1 -> 3"):
        sweep.main(argv_for(root, out, "--epoch", "3"))
    assert (out / "sweep.json").read_bytes() == plan
