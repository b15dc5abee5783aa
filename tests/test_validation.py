"""Validation on a held-out part of the training splits, the named loss terms per epoch, the sweep's
grid, and L2P's prompt histogram and zero-initialised gates."""
import dataclasses
import json

import pytest
import torch

from samcl import pipeline, sweep, sweep_grid
from samcl.config import CONFIG_DIR, ConfigError, load_config
from samcl.data import SegmentationSplit, SplitPart, collate, hold_out, read_domain_map
from samcl.demo import make_demo_data
from samcl.learning_modules.prompt_pool import PromptPoolSpec
from samcl.loading import to_device
from samcl.losses import training_loss
from samcl.methods.ewc import EWC, trainable
from samcl.registry import METHODS
from samcl.training_step import SegmentStep
from tests.conftest import tiny_backbone

CPU = torch.device("cpu")
N_TRAIN = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    make_demo_data(root, n_train=N_TRAIN, n_test=2)
    return root


def cfg_for(data, run_dir, method="ewc", **kw):
    return load_config(CONFIG_DIR / "demo_sam.yaml", {
        "data_root": str(data), "run_dir": str(run_dir), "method": method, "epoch": 2, "num_embedding": 2,
        "batch_size": 2, "eval_batch_size": 2, "selector_epochs": 2, "val_every": 1, "num_workers": 0,
        "order": "polyp_shadow", "unseen": [], **kw})


# ---------------------------------------------------------------------------------------------- the held-out part
def test_the_held_out_part_is_disjoint_sized_and_fixed_by_seed_and_domain():
    keep, held = hold_out(10, 0.25, 7, "polyp")
    assert len(held) == 2 and len(keep) == 8  # round(0.25 * 10) = 2 (Python rounds half to even)
    assert sorted(keep + held) == list(range(10)) and not set(keep) & set(held)
    assert keep == sorted(keep) and held == sorted(held)
    assert hold_out(10, 0.25, 7, "polyp") == (keep, held)  # the same seed and domain: the same draw
    draws = {tuple(hold_out(10, 0.25, s, d)[1]) for s in (7, 8, 9) for d in ("polyp", "shadow")}
    assert len(draws) > 1  # seed and domain both enter the draw
    assert len(hold_out(3, 0.01, 0, "a")[1]) == 1 and len(hold_out(3, 0.9, 0, "a")[0]) == 1  # one each at least
    with pytest.raises(ValueError, match="polyp has 1 training image"):
        hold_out(1, 0.5, 0, "polyp")


def test_a_part_reads_its_items_of_the_split_with_its_own_index(data):
    split = SegmentationSplit(read_domain_map(data / "datasets_train.json", data)["polyp"], 64, domain="polyp")
    part = SplitPart(split, [3, 1])
    assert len(part) == 2 and part.names == [split.pairs[3][0].name, split.pairs[1][0].name]
    item = part[0]
    assert item["index"] == 0 and item["name"] == split[3]["name"] and torch.equal(item["image"], split[3]["image"])
    with pytest.raises(IndexError):
        part[2]


def test_train_fraction_validation_needs_a_fraction(data, tmp_path):
    with pytest.raises(ConfigError, match="validation train_fraction .* val_fraction is 0"):
        cfg_for(data, tmp_path, validation="train_fraction")
    with pytest.raises(ConfigError, match=r"val_fraction must be in 0\.\.0\.9"):
        cfg_for(data, tmp_path, val_fraction=0.95)


@pytest.fixture(scope="module")
def held_out_run(data, tmp_path_factory):
    """EWC over polyp, shadow with a held-out 0.4 (2 of 5 images per domain) that validates and evaluates."""
    run = tmp_path_factory.mktemp("held_out") / "run"
    cfg = cfg_for(data, run, val_fraction=0.4, validation="train_fraction", evaluate_on="train_fraction",
                  scheduler="cosine", lr=0.05, ewc_lambda=1e4, epoch=1)
    return run, pipeline.train(cfg, CPU), cfg


def test_run_json_names_the_held_out_files_and_they_validate_and_evaluate(held_out_run):
    run, metrics, cfg = held_out_run
    named = json.loads((run / "run.json").read_text())["validation_files"]
    for d in ("polyp", "shadow"):
        _, held = hold_out(N_TRAIN, 0.4, cfg.seed, d)
        assert named[d] == [f"{d}_{i:03d}{'.jpg' if i % 2 == 0 else '.png'}" for i in held]
    step = metrics["steps"][1]
    assert [v["n"] for v in step["training"]["validation"]] == [2]  # the held-out 2, not the 2 test images
    assert step["evaluation"]["shadow"]["metrics"]["iou"] == pytest.approx(step["training"]["validation"][-1]["iou"])
    assert step["evaluation"]["shadow"]["metrics"]["n"] == 2


def test_every_epoch_records_each_loss_term_and_they_sum_to_the_loss(held_out_run):
    _, metrics, _ = held_out_run
    for step in metrics["steps"]:
        terms, total = step["loss_terms"], step["training"]["epoch_loss"]
        assert list(terms) == ["task", "ewc_penalty"] and "loss_terms" not in step["training"]
        assert len(total) == 1 and terms["task"][0] + terms["ewc_penalty"][0] == pytest.approx(total[0], rel=1e-5)
    assert metrics["steps"][0]["loss_terms"]["ewc_penalty"] == [0.0]  # nothing to hold before domain 1 ends
    assert metrics["steps"][1]["loss_terms"]["ewc_penalty"][0] > 0  # the module moved from theta* in the epoch


def test_ewc_records_its_task_and_penalty_terms_on_a_hand_case(data, tmp_path):
    cfg = cfg_for(data, tmp_path, ewc_lambda=30.0)
    model = pipeline.build_model(cfg, CPU)
    method = EWC(cfg, model, CPU, None, tmp_path)
    module = method.begin_domain(0, "polyp", True)
    params = trainable(module)
    g = torch.Generator().manual_seed(0)
    method.fisher = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    method.theta = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    split = SegmentationSplit(read_domain_map(data / "datasets_train.json", data)["polyp"], model.backbone.img_size,
                              domain="polyp")
    b = to_device(collate([split[0], split[1]]), CPU)
    prefix = model.backbone.encode_prefix(b.images)
    forward = SegmentStep(model.backbone, module)
    loss = method.observe(b, prefix, forward)
    terms = method.take_terms()
    assert list(terms) == ["task", "ewc_penalty"] and method.take_terms() == {}
    hand = 30.0 / 2 * sum((method.fisher[n].double() * (params[n].double() - method.theta[n].double()) ** 2).sum()
                          for n in params)
    assert terms["ewc_penalty"].item() == pytest.approx(hand.item(), rel=1e-5) and hand > 1
    with torch.no_grad():
        heat = model.heatmap(b.points, b.labels) if model.needs_heatmap else None
        logits, iou = forward(prefix, heat, b.points, b.labels, b.images)
        task = training_loss(cfg.loss, logits, iou, b.masks, cfg.iou_target, cfg.focal)
    assert terms["task"].item() == pytest.approx(task.item(), rel=1e-6)
    assert (terms["task"] + terms["ewc_penalty"]).item() == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(ValueError, match="does not declare"):
        method.term("lwf_distillation", loss)


def test_every_method_names_its_loss_terms():
    names = {m: METHODS.get(m).loss_terms for m in ("finetune", "joint", "samcl", "er", "ewc", "lwf", "der",
                                                     "olora", "l2p")}
    assert names == {"finetune": ("task",), "joint": ("task",), "samcl": ("task",), "er": ("task",),
                     "ewc": ("task", "ewc_penalty"), "lwf": ("task", "lwf_distillation"),
                     "der": ("task", "der_logits", "der_labels"), "olora": ("task", "olora_orthogonality"),
                     "l2p": ("task", "l2p_pull")}


# ---------------------------------------------------------------------------------------------- the sweep's grid
def test_grid_items_are_read_as_yaml_and_bad_ones_refused():
    assert sweep_grid.parse_grid(["ewc_lambda=1,100", "lr=1e-3,0.01"]) == {"ewc_lambda": [1, 100],
                                                                         "lr": ["1e-3", 0.01]}
    for bad, message in (("ewc_lambda", "expected KEY=v1,v2"), ("nosuch=1", "not a setting"),
                         ("seed=1,2", "sets seed itself"), ("val_fraction=0.1", "sets val_fraction itself")):
        with pytest.raises(ConfigError, match=message):
            sweep_grid.parse_grid([bad])
    with pytest.raises(ConfigError, match="names lr twice"):
        sweep_grid.parse_grid(["lr=1", "lr=2"])


def test_a_key_concerns_the_methods_that_declare_it_or_train_its_module():
    assert sweep_grid.concerns("lr", "finetune", "lora")  # a core setting concerns every method
    assert sweep_grid.concerns("ewc_lambda", "ewc", "lora") and not sweep_grid.concerns("ewc_lambda", "lwf", "lora")
    assert sweep_grid.concerns("replay_size", "der", "lora")  # DER extends ER, whose setting it is
    assert sweep_grid.concerns("l2p_top_k", "l2p", "prompt_pool") and not sweep_grid.concerns("l2p_top_k", "ewc",
                                                                                              "lora")


def test_the_best_point_has_the_highest_aa_then_the_lowest_fm_then_comes_first():
    rows = [{"method": "ewc", "point": p, "iou_AA": aa, "iou_FM": fm}
            for p, aa, fm in (("a", 0.5, 0.2), ("b", 0.6, 0.3), ("c", 0.6, 0.1), ("d", 0.6, 0.1), ("e", None, 0.0))]
    rows.append({"method": "lwf", "point": "x", "iou_AA": 0.1, "iou_FM": None})
    best = sweep_grid.choose(rows)
    assert best["ewc"]["point"] == "c" and best["lwf"]["point"] == "x"


def test_the_grid_trains_its_points_on_the_held_out_split_and_the_plan_takes_the_best(data, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--methods", "ewc,finetune", "--config", str(CONFIG_DIR / "demo_sam.yaml"), "--data_root", str(data),
            "--order", "polyp", "--unseen", "--output", str(out), "--set", "epoch=1", "--set", "num_embedding=2",
            "--set", "val_every=0", "--set", "batch_size=2", "--set", "scheduler=cosine"]
    plan, _ = sweep.plan_from_args(sweep.build_parser().parse_args(argv))
    grid = sweep_grid.parse_grid(["ewc_lambda=1,1000"])
    plan = sweep_grid.run_grid(plan, grid, out, CPU)
    table = json.loads((out / "grid" / "grid.json").read_text())
    assert [(r["method"], r["point"]) for r in table["rows"]] == [("ewc", "ewc_lambda=1"), ("ewc", "ewc_lambda=1000")]
    best = sweep_grid.choose(table["rows"])["ewc"]
    assert best["chosen"] and table["chosen"] == {"ewc": {"ewc_lambda": int(best["point"].split("=")[1])}}
    for r in table["rows"]:
        metrics = json.loads((out / r["folder"] / "metrics.json").read_text())
        assert metrics["config"]["evaluate_on"] == "train_fraction" and metrics["config"]["val_fraction"] == 0.2
        assert metrics["steps"][0]["summary"]["iou"]["AA"] == pytest.approx(r["iou_AA"])
        assert json.loads((out / r["folder"] / "run.json").read_text())["validation_files"]["polyp"]
    assert (out / "grid" / "grid.md").read_text().count("| ewc |") == 2
    assert (out / "grid" / "grid.csv").read_text().splitlines()[0].startswith("method,point,iou_AA,iou_FM")
    assert not (out / "grid" / "finetune").exists()  # ewc_lambda does not concern finetune
    chosen = table["chosen"]["ewc"]["ewc_lambda"]
    assert {r.settings["ewc_lambda"] for r in plan.runs if r.method == "ewc"} == {chosen}
    assert all(r.settings["val_fraction"] == 0 and r.settings["evaluate_on"] == "test" for r in plan.runs)


# ---------------------------------------------------------------------------------------------- L2P
@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_a_gated_untrained_pool_leaves_the_frozen_output_unchanged(family):
    bb = tiny_backbone(family)
    spec = dataclasses.replace(PromptPoolSpec.for_backbone(bb), gated=True)
    module = spec.build(bb).eval()
    g = torch.Generator().manual_seed(0)
    s = bb.img_size
    images = torch.randint(0, 256, (2, 3, s, s), generator=g).float()
    points, labels = torch.rand(2, 3, 2, generator=g) * s, torch.tensor([[1, 1, 0], [1, 0, 1]])
    prefix = bb.encode_prefix(images)
    with torch.no_grad():
        stock, stock_iou = bb.segment(prefix, points, labels)
        gated, gated_iou = module.segment(bb, prefix, None, None, points, labels)
        ungated = dataclasses.replace(spec, gated=False).build(bb).eval()
        ungated.load_state_dict({k: v for k, v in module.state_dict().items() if k != "gates"})
        changed, _ = ungated.segment(bb, prefix, None, None, points, labels)
    assert torch.equal(gated, stock) and torch.equal(gated_iou, stock_iou)
    assert not torch.equal(changed, stock)  # L2P's own initialisation changes the frozen output
    assert list(module.state_dict()) == ["keys", "gates"] + [f"prompts.{j}" for j in range(len(spec.layers))]
    assert "gates" not in ungated.state_dict()


def test_l2p_records_the_histogram_of_chosen_prompts_per_domain(data, tmp_path):
    cfg = cfg_for(data, tmp_path / "run", "l2p", learning_module="prompt_pool", epoch=1, val_every=0,
                  order="polyp", l2p_pool_size=6, l2p_top_k=2, l2p_prompt_length=2, l2p_gate=True, grad_clip=1.0)
    step = pipeline.train(cfg, CPU)["steps"][0]
    hist = step["prompt_histogram"]
    assert len(hist) == 6 and sum(hist) == N_TRAIN * 2  # every image of the epoch chose 2 prompts
    assert list(step["loss_terms"]) == ["task", "l2p_pull"] and step["loss_terms"]["l2p_pull"][0] > 0
