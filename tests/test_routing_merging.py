"""The baselines that separate SAMCL's parts: other ways to route to its modules (ncm, knn, oracle),
merged modules (mean, task arithmetic, TIES) and full-depth LoRA, against hand-computed values."""
import json
from types import SimpleNamespace

import pytest
import torch

from samcl import pipeline
from samcl.compare import method_label
from samcl.config import CONFIG_DIR, load_config
from samcl.demo import make_demo_data
from samcl.learning_modules.augmodule import AugModuleSpec
from samcl.learning_modules.lora import LoRASpec
from samcl.methods.merge import disjoint_mean, elect, lora_products, merge_modules, merge_vectors, trim
from samcl.methods.samcl import SAMCL, oracle_choice
from samcl.model import ModuleBank
from samcl.routing import NearestMeanSelector, NearestNeighbourSelector
from samcl.run_folder import load_selector, save_selector, selector_snapshot
from samcl.selector import EmbeddingBuffer, ModuleSelector, train_selector
from samcl.sweep_plan import make_plan

CPU = torch.device("cpu")


# ------------------------------------------------------------------ merging, by hand
TAUS = torch.tensor([[4.0, -1.0, 0.5, -3.0],
                     [-2.0, 3.0, 0.2, 1.0],
                     [1.0, -5.0, -0.1, 0.3]])


def test_ties_trims_elects_and_takes_the_disjoint_mean_as_written_out():
    trimmed = trim(TAUS, 50)  # 2 of 4 entries per vector, the largest by magnitude
    assert torch.equal(trimmed, torch.tensor([[4.0, 0, 0, -3.0], [-2.0, 3.0, 0, 0], [1.0, -5.0, 0, 0]]))
    sign = elect(trimmed)  # signs of the sums 3, -2, 0, -3
    assert torch.equal(sign, torch.tensor([1.0, -1.0, 0.0, -1.0]))
    # entry 0: 4 and 1 agree with +, -2 does not -> 2.5; entry 1: only -5; entry 2: nothing kept; entry 3: -3
    assert torch.equal(disjoint_mean(trimmed, sign), torch.tensor([2.5, -5.0, 0.0, -3.0]))
    assert torch.equal(merge_vectors(TAUS, "ties", k=50, ties_lambda=2.0), torch.tensor([5.0, -10.0, 0.0, -6.0]))
    # k = 20 % of 4 entries keeps int(0.8) = 0: at least the largest is kept
    assert torch.equal(trim(TAUS[:1], 20), torch.tensor([[4.0, 0, 0, 0]]))


def test_identical_task_vectors_merge_to_themselves_under_mean_and_ta_scales_the_sum():
    tau = TAUS[0]
    assert torch.equal(merge_vectors(torch.stack([tau, tau]), "mean"), tau)
    assert torch.allclose(merge_vectors(TAUS, "ta", lam=0.3), 0.3 * TAUS.sum(0))
    with pytest.raises(ValueError, match="unknown merge 'sum'"):
        merge_vectors(TAUS, "sum")


def _trained(spec, backbone, seed):
    """A module of ``spec`` drawn from seed 0 (theta0) with every parameter moved by a seeded step."""
    torch.manual_seed(0)
    module = spec.build(backbone)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def test_merging_one_domain_gives_that_domains_module(tiny_sam):
    torch.manual_seed(0)
    spec = AugModuleSpec.for_backbone(tiny_sam)
    initial, trained = spec.build(tiny_sam), _trained(spec, tiny_sam, 1)
    for how in ("mean", "ties"):
        merged = merge_modules(initial, [trained], how, k=100.0)
        for (name, a), b in zip(merged.named_parameters(), trained.parameters()):
            assert torch.allclose(a, b, atol=1e-6), (how, name)
    # task arithmetic scales the one task vector
    ta = merge_modules(initial, [trained], "ta", lam=0.3)
    for a, b, c in zip(ta.parameters(), initial.parameters(), trained.parameters()):
        assert torch.allclose(a, b + 0.3 * (c - b), atol=1e-6)


def test_lora_merges_the_products_and_stores_them_exactly_at_rank_n_r(tiny_sam):
    spec = LoRASpec.for_backbone(tiny_sam)
    torch.manual_seed(0)
    initial = spec.build(tiny_sam)
    one, two = _trained(spec, tiny_sam, 1), _trained(spec, tiny_sam, 2)
    merged = merge_modules(initial, [one], "mean")
    assert merged.spec.rank == spec.rank and merged.scale == 1.0
    for a, b in zip(lora_products(merged), lora_products(one)):
        assert torch.allclose(a, b, atol=1e-5)
    same = merge_modules(initial, [one, one], "mean")  # identical task vectors: themselves
    for a, b in zip(lora_products(same), lora_products(one)):
        assert torch.allclose(a, b, atol=1e-5)
    # two domains: the mean of the products B A (not of A and B), stored exactly at rank 2 r
    both = merge_modules(initial, [one, two], "mean")
    assert both.spec.rank == 2 * spec.rank
    for a, b, c in zip(lora_products(both), lora_products(one), lora_products(two)):
        assert torch.allclose(a, (b + c) / 2, atol=1e-5)


# ------------------------------------------------------------------ routing, by hand
def test_nearest_mean_routes_to_the_closest_mean_by_cosine():
    sel = NearestMeanSelector(torch.zeros(0, 2))
    sel.add(torch.tensor([[2.0, 0.0], [4.0, 0.0]]))  # mean (3, 0)
    sel.add(torch.tensor([[0.0, 1.0], [1.0, 1.0]]))  # mean (0.5, 1)
    assert torch.allclose(sel.means, torch.tensor([[3.0, 0.0], [0.5, 1.0]]))
    # (1, 0.3): cosine 0.958 to (3, 0), 0.685 to (0.5, 1); (10, 9) is far from both in distance, nearer in angle
    assert sel.route(torch.tensor([[1.0, 0.3], [10.0, 9.0], [-1.0, 0.5]])).tolist() == [0, 1, 1]


def test_knn_takes_the_majority_and_breaks_a_tie_by_the_nearest():
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [0.0, 1.0], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    x = torch.tensor([[1.0, 0.05]])  # nearest first: rows 0/1 (label 0), 2 (1), then 4, 3 (1)
    assert NearestNeighbourSelector(bank, labels, 2, k=1).route(x).tolist() == [0]
    assert NearestNeighbourSelector(bank, labels, 2, k=3).route(x).tolist() == [0]  # 2 votes to 1
    assert NearestNeighbourSelector(bank, labels, 2, k=4).route(x).tolist() == [0]  # 2 to 2: the nearest's
    assert NearestNeighbourSelector(bank, labels, 2, k=5).route(x).tolist() == [1]  # 2 to 3
    probs = NearestNeighbourSelector(bank, labels, 2, k=3).probabilities(x)
    assert torch.allclose(probs, torch.tensor([[2.5 / 3.5, 1 / 3.5]]))


def test_training_free_selectors_round_trip_through_their_file(tmp_path):
    ncm = NearestMeanSelector(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    knn = NearestNeighbourSelector(torch.eye(3), torch.tensor([0, 1, 1]), 2, k=3)
    for sel in (ncm, knn):
        path = tmp_path / f"{sel.kind}.safetensors"
        save_selector(sel, ["a", "b"], path)
        loaded, domains = load_selector(path)
        assert type(loaded) is type(sel) and domains == ["a", "b"]
        assert all(torch.equal(loaded.state()[k], v) for k, v in sel.state().items())


def test_oracle_choice_is_the_true_domain_and_vanilla_for_one_the_bank_lacks():
    assert oracle_choice(["a", "b", "u"], ["b", "a", "u", "x"]).tolist() == [1, 0, 2, -1]
    with pytest.raises(ValueError, match="carries none"):
        oracle_choice(["a"], [])


def test_mlp_is_the_module_selector_trained_as_before(tiny_sam, tmp_path):
    """--selector mlp grows and retrains the Module Selector exactly as SAMCL did before the choice
    existed: seeds seed + 1000 + t for the new outputs, seed + t for the batches."""
    cfg = load_config(CONFIG_DIR / "demo_sam.yaml", {"selector_epochs": 3})
    buffer = EmbeddingBuffer(4)
    model = ModuleBank(tiny_sam, LoRASpec.for_backbone(tiny_sam))
    method = SAMCL(cfg, model, CPU, buffer, tmp_path)
    g = torch.Generator().manual_seed(0)
    expected = None
    for t, d in enumerate(("a", "b")):
        buffer.add(d, torch.randn(4, tiny_sam.selector_dim, generator=g) + 3 * t)
        model.add_domain(d, None)
        method._fit_selector(t)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1000 + t)
            if expected is None:
                expected = ModuleSelector(tiny_sam.selector_dim, 1)
            else:
                expected.grow(2)
        train_selector(expected, *buffer.dataset(model.domains), lr=cfg.selector_lr, epochs=3,
                       batch_size=cfg.selector_batch_size, generator=torch.Generator().manual_seed(cfg.seed + t))
        assert all(torch.equal(a, b) for a, b in zip(model.selector.state_dict().values(),
                                                     expected.state_dict().values()))
    loaded, domains = load_selector(tmp_path / selector_snapshot("b", method.weights))
    assert domains == ["a", "b"] and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                                            expected.state_dict().values()))


# ------------------------------------------------------------------ full-depth LoRA
def test_lora_on_every_block_reads_the_image_and_trains_the_prefix_blocks(tiny_sam):
    after = LoRASpec.for_backbone(tiny_sam)
    every = LoRASpec.for_backbone(tiny_sam, SimpleNamespace(rank=4, lora_blocks="all"))
    assert after.layers == tuple(range(tiny_sam.selector_layer + 1, tiny_sam.depth))
    assert every.layers == tuple(range(tiny_sam.depth)) and every.rank == 4
    torch.manual_seed(0)
    module = every.build(tiny_sam)
    every.check(tiny_sam)
    assert module.counted_parameters() == sum(4 * (i + o) for i, o in every.shapes)
    for b in module.B:
        torch.nn.init.normal_(b.weight, std=0.1)
    images = torch.rand(1, 3, tiny_sam.img_size, tiny_sam.img_size) * 255
    points, labels = torch.tensor([[[30.0, 40.0]]]), torch.ones(1, 1, dtype=torch.long)
    prefix = tiny_sam.encode_prefix(images)
    logits, _ = module.segment(tiny_sam, prefix, images, None, points, labels, low_res=True)
    logits.sum().backward()
    assert module.A[0].weight.grad is not None and module.A[0].weight.grad.abs().sum() > 0  # block 0 trains
    with pytest.raises(ValueError, match="needs the batch's images"):
        module.segment(tiny_sam, prefix, None, None, points, labels)


# ------------------------------------------------------------------ in the tables
def test_sweep_names_variants_and_compare_labels_them(tmp_path):
    plan = make_plan(["samcl", "samcl:oracle", "merge:ties"], 1, 1, tmp_path, config=str(CONFIG_DIR / "demo_sam.yaml"))
    got = {(r.method, r.folder, r.settings["method"], r.settings["selector"], r.settings["merge"]) for r in plan.runs}
    assert got == {("samcl", "samcl/order0_seed1234", "samcl", "mlp", "ties"),
                   ("samcl:oracle", "samcl-oracle/order0_seed1234", "samcl", "oracle", "ties"),
                   ("merge:ties", "merge-ties/order0_seed1234", "merge", "mlp", "ties")}
    with pytest.raises(Exception, match="finetune.* has no named variants"):
        make_plan(["finetune:x"], 1, 1, tmp_path, config=str(CONFIG_DIR / "demo_sam.yaml"))
    assert [method_label("samcl", {"selector": s}) for s in ("mlp", "ncm")] == ["samcl", "samcl (ncm)"]
    assert method_label("merge", {"merge": "ties"}) == "merge (ties)" and method_label("er", {}) == "er"


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    make_demo_data(root, n_train=2, n_test=2)
    cfg = load_config(CONFIG_DIR / "demo_sam.yaml", {
        "data_root": str(root), "run_dir": str(root / "run"), "epoch": 1, "num_embedding": 2, "batch_size": 2,
        "val_every": 0, "order": "polyp_shadow_natural", "unseen": ["natural"], "num_workers": 0,
        "selector": "oracle"})
    return cfg, pipeline.train(cfg, CPU)


def test_oracle_routes_every_test_image_to_its_true_domain(oracle_run):
    cfg, metrics = oracle_run
    run = cfg.resolved_run_dir()
    for step in metrics["steps"]:
        for d, res in step["evaluation"].items():
            counts = res["selector_counts"]
            if d in counts:  # a domain of the bank: all its 2 test images, the test-only one to vanilla
                assert counts == {k: 2 if k == d else 0 for k in counts} and res["selector_accuracy"] == 1.0
            else:  # the next domain, not reached: vanilla, counted for none
                assert sum(counts.values()) == 0 and res["selector_accuracy"] is None
    assert not (run / "selector").exists()  # no selector kept; the buffer is a record, not counted
    storage = metrics["steps"][-1]["storage"]
    assert storage["kept_bytes"] == sum((run / f"{d}.safetensors").stat().st_size for d in ("polyp", "shadow"))
    report = pipeline.test(run, cfg, CPU, with_vanilla=False)
    assert {d: r["selector_accuracy"] for d, r in report["results"].items()} == {
        "polyp": 1.0, "shadow": 1.0, "natural": 1.0}
    iou = metrics["accuracy_matrix"]["matrix"]["iou"][-1]
    assert [report["results"][d]["metrics"]["iou"] for d in ("polyp", "shadow", "natural")] == pytest.approx(iou)
    assert json.loads((run / "run.json").read_text())["config"]["selector"] == "oracle"
