"""The regularisation baselines against hand-computed values: online EWC's penalty, per-image
Fisher, online update and file; LwF's Bernoulli KL of the softened mask logits; both end to end
on the tiny SAM and SAM 2, resumed runs equal uninterrupted ones, and EWC under torchrun."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from samcl import pipeline
from samcl.config import CONFIG_DIR, load_config
from samcl.data import SegmentationSplit, collate, read_domain_map
from samcl.demo import make_demo_data
from samcl.io import read_tagged
from samcl.loading import make_loader, to_device
from samcl.losses import training_loss
from samcl.methods.base import ContinualMethod
from samcl.methods.ewc import EWC, ewc_penalty, online_fisher, squared_gradients, trainable
from samcl.methods.lwf import LwF, bernoulli_kl, distillation
from samcl.training_step import SegmentStep
from tests.conftest import REPO

CPU = torch.device("cpu")
BACKBONES = ["demo_sam.yaml", "demo_sam2.yaml"]
N_TRAIN = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("regularisers")
    make_demo_data(root, n_train=N_TRAIN, n_test=2)
    return root


def cfg_for(data, run_dir, method, backbone="demo_sam.yaml", **kw):
    return load_config(CONFIG_DIR / backbone, {
        "data_root": str(data), "run_dir": str(run_dir), "method": method, "epoch": 2, "num_embedding": 3,
        "batch_size": 3, "selector_epochs": 2, "val_every": 0, "num_workers": 0, "order": "polyp_shadow",
        "unseen": [], **kw})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """run(method, backbone, **settings) -> (run folder, metrics, cfg): each distinct run trained once."""
    runs = {}

    def run(method, backbone="demo_sam.yaml", **kw):
        key = (method, backbone, tuple(sorted(kw.items())))
        if key not in runs:
            folder = tmp_path_factory.mktemp(f"{method}_{backbone.split('.')[0]}")
            cfg = cfg_for(data, folder, method, backbone, **kw)
            runs[key] = folder, pipeline.train(cfg, CPU), cfg
        return runs[key]
    return run


def train_split(data, cfg, domain, model):
    root = Path(data)
    return SegmentationSplit(read_domain_map(root / "datasets_train.json", root)[domain], model.backbone.img_size,
                             cfg.mask_binarize, cfg.mask_threshold, domain)


def literal_fisher(model, module, split, cfg):
    """The mean over the split's images of each trainable parameter's squared gradient of the
    image's loss alone, image by image through the model's own inference path, in eval mode."""
    model.backbone.eval()
    module.eval()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = [p for n, p in module.named_parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(split)):
        b = to_device(collate([split[i]]), CPU)
        prefix = model.backbone.encode_prefix(b.images)
        logits, iou = model.segment_one(module, prefix, b.points, b.labels, images=b.images)
        loss = training_loss(cfg.loss, logits, iou, b.masks, cfg.iou_target, cfg.focal)
        for k, g in enumerate(torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                total[k] += g * g
    return {n: t / len(split) for n, t in zip(names, total)}


def assert_close(a, b, what):
    assert a.keys() == b.keys(), what
    for n in a:
        scale = float(b[n].abs().max())
        torch.testing.assert_close(a[n], b[n], rtol=1e-3, atol=1e-4 * scale + 1e-12, msg=f"{what}: {n}")


# ---------------------------------------------------------------------------------------------- EWC
def test_ewc_penalty_is_zero_at_theta_star_and_its_gradient_is_lambda_f_delta():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    params = trainable(net)
    fisher = {n: torch.rand_like(p) + 0.1 for n, p in params.items()}
    theta = {n: p.detach().clone() for n, p in params.items()}
    assert ewc_penalty(params, fisher, theta, 7.0).item() == 0.0
    theta = {n: t + torch.randn_like(t) for n, t in theta.items()}
    pen = ewc_penalty(params, fisher, theta, 7.0)
    literal = 0.0
    for n in params:  # 7/2 * sum F (p - t)^2, element by element in float64
        for f, p, t in zip(fisher[n].flatten().tolist(), params[n].flatten().tolist(), theta[n].flatten().tolist()):
            literal += 3.5 * f * (p - t) ** 2
    assert pen.item() == pytest.approx(literal, rel=1e-6)
    grads = torch.autograd.grad(pen, list(params.values()))
    for (n, p), g in zip(params.items(), grads):
        torch.testing.assert_close(g, 7.0 * fisher[n] * (p.detach() - theta[n]))


def test_fisher_is_the_mean_of_per_image_squared_gradients_by_hand():
    """loss_i = (w . x_i - y_i)^2: per-image gradient 2 (w . x_i - y_i) x_i; b does not take part."""
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0], requires_grad=True)
    xs = [torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 1.0, -1.0]), torch.tensor([2.0, 0.0, 1.0])]
    ys = [1.0, -2.0, 0.0]
    total, count = squared_gradients({"w": w, "b": b}, ((w @ x - y) ** 2 for x, y in zip(xs, ys)))
    # residuals w.x - y: (0.5 - 2) - 1 = -2.5; (-1 - 2) + 2 = -1; (1 + 2) - 0 = 3
    hand = (torch.tensor([-5.0, -10.0, 0.0]) ** 2 + torch.tensor([0.0, -2.0, 2.0]) ** 2
            + torch.tensor([12.0, 0.0, 6.0]) ** 2)
    assert count == 3
    assert torch.equal(total["w"], hand)  # [169, 104, 40]
    assert torch.equal(total["b"], torch.zeros(1))
    batch = (-5.0 - 0.0 + 12.0, -10.0 - 2.0 + 0.0, 0.0 + 2.0 + 6.0)  # the per-batch gradient, squared: another number
    assert not torch.equal(total["w"], torch.tensor(batch) ** 2)


def test_online_fisher_decays_the_running_fisher_by_gamma():
    f1 = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[4.0]])}
    f2 = {"a": torch.tensor([0.5, 0.25]), "b": torch.tensor([[1.0]])}
    first = online_fisher({}, f1, 0.5)
    assert all(torch.equal(first[n], f1[n]) for n in f1) and first["a"] is not f1["a"]
    second = online_fisher(first, f2, 0.5)
    assert torch.equal(second["a"], torch.tensor([1.0, 1.25])) and torch.equal(second["b"], torch.tensor([[3.0]]))
    assert torch.equal(online_fisher(first, f2, 1.0)["a"], torch.tensor([1.5, 2.25]))


@pytest.mark.parametrize("weights", ["safetensors", "pth"])
def test_ewc_state_file_round_trips(data, tmp_path, weights):
    cfg = cfg_for(data, tmp_path, "ewc")
    model = pipeline.build_model(cfg, CPU)
    a = EWC(cfg, model, CPU, None, tmp_path)
    a.weights = weights
    g = torch.Generator().manual_seed(3)
    a.fisher = {"x.weight": torch.rand(3, 4, generator=g), "y": torch.rand(5, generator=g)}
    a.theta = {"x.weight": torch.randn(3, 4, generator=g), "y": torch.randn(5, generator=g)}
    a.end_domain(0, "polyp", None, None)  # a step that trains nothing writes the state unchanged
    assert a.step_files("polyp") == [f"ewc/after_polyp.{weights}"] and (tmp_path / a.step_files("polyp")[0]).is_file()
    assert "theta" not in read_tagged(tmp_path / a.step_files("polyp")[0], "EWC state")  # the module file has it
    b = EWC(cfg, pipeline.build_model(cfg, CPU), CPU, None, tmp_path)
    b.weights = weights
    module = b.model.new_module()
    b.model.add_domain("polyp", module)  # as a resume loads the latest trained module before the method's state
    b.restore(["polyp"])
    assert a.fisher.keys() == b.fisher.keys() and all(torch.equal(a.fisher[n], b.fisher[n]) for n in a.fisher)
    assert b.theta.keys() == trainable(module).keys()
    assert all(torch.equal(b.theta[n], p) and b.theta[n] is not p for n, p in trainable(module).items())
    empty = EWC(cfg, model, CPU, None, tmp_path / "empty")  # before any domain: no Fisher, no penalty
    empty.end_domain(0, "natural", None, None)
    empty.restore(["natural"])
    assert empty.fisher == {} and empty.theta == {}


def test_ewc_fisher_of_a_real_module_equals_a_literal_per_image_loop(data, tmp_path):
    cfg = cfg_for(data, tmp_path, "ewc")
    model = pipeline.build_model(cfg, CPU)
    module = model.new_module()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from the initialisation, so that every parameter gets a gradient
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    split = train_split(data, cfg, "polyp", model)
    method = EWC(cfg, model, CPU, None, tmp_path)
    model.backbone.train()
    module.train()
    fisher, images = method.domain_fisher(module, make_loader(split, 4, True, 0, 0, CPU))
    assert images == N_TRAIN
    assert model.backbone.training and module.training  # the modes are put back
    assert fisher.keys() == trainable(module).keys()
    assert all(fisher[n].shape == p.shape and bool((fisher[n] > 0).any()) for n, p in trainable(module).items())
    assert_close(fisher, literal_fisher(model, module, split, cfg), "Fisher")


@pytest.mark.parametrize("backbone", BACKBONES)
def test_ewc_trains_end_to_end_and_keeps_fisher_and_theta_star_per_step(data, trained, backbone):
    run, metrics, cfg = trained("ewc", backbone, ewc_gamma=0.5)
    steps = metrics["steps"]
    assert [s["fisher_images"] for s in steps] == [N_TRAIN, N_TRAIN]
    manifest = json.loads((run / "run.json").read_text())
    for s, d in zip(steps, ("polyp", "shadow")):
        rel = f"ewc/after_{d}.safetensors"
        assert rel in manifest["files"] and s["storage"]["files"][rel] == (run / rel).stat().st_size
        assert s["storage"]["kept_bytes"] == (run / f"{d}.safetensors").stat().st_size + (run / rel).stat().st_size
    model = pipeline.load_run(run, cfg, CPU)
    assert model.domains == ["polyp", "shadow"]
    after = {d: read_tagged(run / f"ewc/after_{d}.safetensors", "EWC state") for d in ("polyp", "shadow")}
    # theta* is the module file of the step (not written twice); F: gamma * F_before + the step's own Fisher
    for d in ("polyp", "shadow"):
        module = read_tagged(run / f"{d}.safetensors", "module")["state_dict"]
        assert "theta" not in after[d] and after[d]["fisher"] and set(after[d]["fisher"]) <= set(module)
    resumed = EWC(cfg, model, CPU, None, run)
    resumed.restore(["polyp", "shadow"])
    shadow_module = read_tagged(run / "shadow.safetensors", "module")["state_dict"]
    assert resumed.theta.keys() == after["shadow"]["fisher"].keys()
    assert all(torch.equal(resumed.theta[n], shadow_module[n]) for n in resumed.theta)
    # load_run reads each domain's module from its own file: module_for("polyp") is the module after polyp
    assert_close(after["polyp"]["fisher"], literal_fisher(model, model.module_for("polyp"),
                                                          train_split(data, cfg, "polyp", model), cfg), "F after polyp")
    shadow = literal_fisher(model, model.module_for("shadow"), train_split(data, cfg, "shadow", model), cfg)
    assert_close(after["shadow"]["fisher"], {n: 0.5 * after["polyp"]["fisher"][n] + f for n, f in shadow.items()},
                 "F after shadow")
    report = pipeline.test(run, cfg, CPU, with_vanilla=False)  # the latest module for every image
    iou = metrics["accuracy_matrix"]["matrix"]["iou"]
    for j, d in enumerate(("polyp", "shadow")):
        assert report["results"][d]["metrics"]["iou"] == pytest.approx(iou[1][j])


def test_ewc_with_lambda_zero_is_finetune_and_a_large_lambda_stays_near_theta_star(trained):
    def shadow_module(run):
        return read_tagged(run / "shadow.safetensors", "module")["state_dict"]

    ft_run, finetune, _ = trained("finetune")
    zero_run, zero, _ = trained("ewc", ewc_lambda=0.0)
    a, b = shadow_module(ft_run), shadow_module(zero_run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the Fisher pass changes nothing of the training
    assert zero["accuracy_matrix"] == finetune["accuracy_matrix"]
    big_run, _, _ = trained("ewc", ewc_lambda=1e6)
    state = read_tagged(zero_run / "ewc/after_polyp.safetensors", "EWC state")
    theta = read_tagged(zero_run / "polyp.safetensors", "module")["state_dict"]  # theta* after polyp

    def drift(run):  # sum F (theta - theta*_polyp)^2 of the module after shadow
        module = shadow_module(run)
        return float(sum((state["fisher"][n] * (module[n] - theta[n]) ** 2).sum() for n in state["fisher"]))

    assert drift(big_run) < 0.5 * drift(zero_run)


# ---------------------------------------------------------------------------------------------- LwF
def test_lwf_kl_is_exactly_zero_for_equal_logits_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.randn(2, 1, 4, 4, generator=g) * 5, torch.full((2, 1, 4, 4), 80.0),
                        torch.full((2, 1, 4, 4), -1e4)])
    for t in (0.5, 1.0, 2.0, 3.7):
        kl = bernoulli_kl(logits, logits.clone(), t)
        assert torch.equal(kl, torch.zeros_like(kl)) and distillation(logits, logits.clone(), t).item() == 0.0
    other = logits + torch.randn(logits.shape, generator=g)
    kl = bernoulli_kl(logits[:2], other[:2], 2.0)
    assert bool((kl > 0).all()) and distillation(logits, other, 2.0).item() > 0
    assert bool(torch.isfinite(bernoulli_kl(torch.full((3,), 1e4), torch.full((3,), -1e4), 1.0)).all())


def test_lwf_distillation_equals_a_literal_transcription_in_float64():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64) * 4
    new = torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64) * 4
    t = 2.0
    expected = 0.0
    for i in range(3):  # per image the mean over its pixels, summed over images
        s = 0.0
        for o, n in zip(old[i].flatten().tolist(), new[i].flatten().tolist()):
            p, q = 1 / (1 + torch.exp(torch.tensor(-o / t, dtype=torch.float64))).item(), \
                1 / (1 + torch.exp(torch.tensor(-n / t, dtype=torch.float64))).item()
            s += p * torch.log(torch.tensor(p / q, dtype=torch.float64)).item() \
                + (1 - p) * torch.log(torch.tensor((1 - p) / (1 - q), dtype=torch.float64)).item()
        expected += s / 25
    assert distillation(old, new, t).item() == pytest.approx(expected, rel=1e-10)


def test_lwf_observe_adds_exactly_nothing_until_the_module_moves_then_the_weighted_kl(data, tmp_path):
    # a large lambda: the term well above the float32 rounding of the loss it is added to
    cfg = cfg_for(data, tmp_path, "lwf", lwf_lambda=700.0, lwf_temperature=1.5)
    model = pipeline.build_model(cfg, CPU)
    method = LwF(cfg, model, CPU, None, tmp_path)
    module = method.begin_domain(0, "polyp", True)
    assert method.old is None
    method.end_domain(0, "polyp", module, None)
    assert method.begin_domain(1, "shadow", True) is module
    old = method.old
    assert old is not module and not any(p.requires_grad for p in old.parameters())
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), module.state_dict().values()))
    module.train()
    b = to_device(collate([train_split(data, cfg, "shadow", model)[i] for i in range(3)]), CPU)
    prefix = model.backbone.encode_prefix(b.images)
    forward = SegmentStep(model.backbone, module)
    assert torch.equal(method.observe(b, prefix, forward), ContinualMethod.observe(method, b, prefix, forward))
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    method.take_terms()
    loss = method.observe(b, prefix, forward)
    terms = method.take_terms()
    plain = ContinualMethod.observe(method, b, prefix, forward)
    heat = model.heatmap(b.points, b.labels) if model.needs_heatmap else None
    with torch.no_grad():
        new_logits = forward(prefix, heat, b.points, b.labels, b.images)[0].double()
        old_logits = SegmentStep(model.backbone, old)(prefix, heat, b.points, b.labels, b.images)[0].double()
    kl = distillation(old_logits, new_logits, 1.5).item()
    assert kl > 1e-5 and (loss - plain).item() == pytest.approx(700 * 1.5 ** 2 * kl, rel=1e-4)
    assert list(terms) == ["task", "lwf_distillation"] and torch.equal(terms["task"], plain.detach())
    assert terms["lwf_distillation"].item() == pytest.approx(700 * 1.5 ** 2 * kl, rel=1e-4)
    loss.backward()
    assert all(p.grad is None for p in old.parameters()) and all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_lwf_trains_end_to_end_and_its_copy_after_a_reload_is_the_last_module(trained, backbone):
    run, metrics, cfg = trained("lwf", backbone)
    assert [s["trained"] for s in metrics["steps"]] == [True, True]
    assert not (run / "lwf").exists() and metrics["steps"][1]["storage"]["kept_bytes"] == \
        (run / "shadow.safetensors").stat().st_size
    report = pipeline.test(run, cfg, CPU, with_vanilla=False)
    iou = metrics["accuracy_matrix"]["matrix"]["iou"]
    for j, d in enumerate(("polyp", "shadow")):
        assert report["results"][d]["metrics"]["iou"] == pytest.approx(iou[1][j])
    model = pipeline.load_run(run, cfg, CPU)
    method = LwF(cfg, model, CPU, None, run)
    method.restore(["polyp", "shadow"])
    method.begin_domain(2, "lesion", True)  # as a resumed run begins its next domain
    saved = read_tagged(run / "shadow.safetensors", "module")["state_dict"]
    assert saved.keys() == method.old.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in method.old.state_dict().items())
    # the term acted: the module after shadow is not fine-tuning's
    ft_run, finetune, _ = trained("finetune", backbone)
    ft = read_tagged(ft_run / "shadow.safetensors", "module")["state_dict"]
    assert not all(torch.equal(ft[k], saved[k]) for k in ft)
    assert finetune["accuracy_matrix"]["matrix"]["iou"][0] == iou[0]  # the first domain has no copy to distil


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("method,settings", [("ewc", {"ewc_gamma": 0.5}), ("lwf", {})])
def test_a_run_extended_by_a_domain_equals_the_run_trained_in_one_go(data, trained, tmp_path, method, settings):
    """The extended run restores the method (EWC's file, LwF's copy from the module file) before its new domain."""
    whole, metrics, _ = trained(method, **settings)
    pipeline.train(cfg_for(data, tmp_path / "ext", method, order="polyp", **settings), CPU)
    pipeline.resume(tmp_path / "ext", {"order": "polyp_shadow"}, CPU)
    files = ["polyp.safetensors", "shadow.safetensors"]
    files += ["ewc/after_polyp.safetensors", "ewc/after_shadow.safetensors"] if method == "ewc" else []
    for f in files:
        assert (whole / f).read_bytes() == (tmp_path / "ext" / f).read_bytes(), f
    assert json.loads((tmp_path / "ext" / "metrics.json").read_text())["accuracy_matrix"] == metrics["accuracy_matrix"]


# ---------------------------------------------------------------------------------------------- torchrun
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ewc_under_torchrun_sums_the_fisher_of_both_shares(data, tmp_path):
    """2 CPU processes, 2 of the 4 polyp images each: the file holds the Fisher of all 4. The
    test-only domain after them trains nothing and keeps the state unchanged."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "train.py", "--config", "configs/demo_sam.yaml", "--cuda", "-1", "--device", "cpu", "--method", "ewc",
           "--data_root", str(data), "--run_dir", str(run), "--epoch", "1", "--batch_size", "2",
           "--order", "polyp_shadow_natural", "--unseen", "natural", "--num_workers", "0", "--val_every", "0"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = cfg_for(data, run, "ewc")
    model = pipeline.load_run(run, cfg, CPU)
    state = read_tagged(run / "ewc/after_polyp.safetensors", "EWC state")
    literal = literal_fisher(model, model.module_for("polyp"), train_split(data, cfg, "polyp", model), cfg)
    assert_close(state["fisher"], literal, "Fisher of both ranks")
    steps = json.loads((run / "metrics.json").read_text())["steps"]
    assert [s.get("fisher_images") for s in steps] == [N_TRAIN, N_TRAIN, None]
    shadow, natural = (read_tagged(run / f"ewc/after_{d}.safetensors", "EWC state") for d in ("shadow", "natural"))
    assert shadow["fisher"].keys() == natural["fisher"].keys() and "theta" not in natural
    assert all(torch.equal(shadow["fisher"][n], natural["fisher"][n]) for n in shadow["fisher"])
    assert "ewc/after_natural.safetensors" in json.loads((run / "run.json").read_text())["files"]
    assert steps[2]["storage"]["kept_bytes"] == steps[1]["storage"]["kept_bytes"]  # the latest trained step's files
