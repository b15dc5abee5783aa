"""CAD as a second learning module: adapter, high-pass input, frozen encoder,
the continual loop and run folder with --module CAD, single-domain mode, the memory bench."""
import json
import math
import subprocess
import sys

import pytest
import torch

from samcl import pipeline
from samcl.learning_modules.augmodule import AugModule, AugModuleSpec
from samcl.learning_modules.cad import CADModule, CADSpec, ConvAdapter, high_frequency, high_pass
from samcl.config import default_config
from samcl.config import CONFIG_DIR, load_config
from samcl.demo import make_demo_data
from samcl.io import read_tagged
from samcl.losses import cad_loss, soft_iou_loss
from samcl.model import ModuleBank
from samcl.run_folder import RunFolderError, load_module, save_module
from tests.conftest import REPO

CPU = torch.device("cpu")


# ------------------------------------------------------------------ the adapter and its input
def test_conv_adapter_vit_b_shape_and_tanh_range():
    torch.manual_seed(0)
    adapter = ConvAdapter(256, 64).eval()
    x = high_frequency(torch.rand(1, 3, 1024, 1024) * 255, 512)
    assert x.shape == (1, 6, 512, 512)
    with torch.no_grad():
        y = adapter(x)
    assert y.shape == (1, 256, 64, 64)
    assert y.abs().max() <= 1 and y.std() > 0  # tanh (float32 rounds tanh(x > 9) to exactly 1)
    assert (y.abs() == 1).float().mean() < 0.01
    n = sum(p.numel() for p in adapter.parameters())
    assert n == (6 * 256 + 256) + 3 * (256 * 256 * 9 + 256 + 2 * 256)  # 1,773,568
    for block in adapter.blocks:  # Kaiming-normal fan_out: std sqrt(2 / (out * 3 * 3))
        assert block.conv.weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
        assert torch.all(block.bn.weight == 1) and torch.all(block.bn.bias == 0)


def test_high_pass_of_a_constant_image_is_zero():
    const = torch.full((2, 3, 64, 64), 173.0)
    assert high_pass(const).abs().max() < 1e-3
    x = high_frequency(const, 64)
    assert x.shape == (2, 6, 64, 64)
    assert torch.allclose(x[:, :3], torch.full_like(x[:, :3], 173 / (173 + 1e-5)))
    assert x[:, 3:].abs().max() < 1e-3


def test_high_pass_removes_exactly_the_centred_square():
    # 512 x 512: the zeroed square has side 2 * floor(sqrt(512 * 512 * 0.25) / 2) = 256, i.e. the
    # frequencies -128..127 on both axes; a pattern along x only (ky = 0) is removed iff |kx| <= 127
    side = 512
    xs = torch.arange(side, dtype=torch.float64)

    def wave(k):
        return torch.cos(2 * math.pi * k * xs / side).expand(side, side).reshape(1, 1, side, side)

    for k in (1, 40, 127):
        assert high_pass(wave(k)).abs().max() < 1e-4, k
    for k in (129, 200):
        assert torch.allclose(high_pass(wave(k)), wave(k).abs().float(), atol=1e-4), k
    mix = 100 + 50 * wave(3) + 20 * wave(200)  # only the high component survives
    assert torch.allclose(high_pass(mix), (20 * wave(200)).abs().float(), atol=1e-3)
    # each of the 6 channels is divided by its own max (+ 1e-5)
    x = high_frequency(mix.expand(1, 3, side, side), side)
    assert torch.allclose(x.amax(dim=(2, 3)), torch.ones(1, 6), atol=1e-6)


def test_cad_loss_is_bce_plus_soft_iou_summed_over_images():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]]).repeat(2, 1, 1, 1)
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]]).repeat(2, 1, 1, 1)
    p = torch.sigmoid(logits[0, 0])
    g = target[0, 0]
    bce = -(g * p.log() + (1 - g) * (1 - p).log()).mean()
    inter, union = (p * g).sum(), p.sum() + g.sum() - (p * g).sum()
    one = bce + 1 - (inter + 1e-3) / (union + 1e-3)
    assert soft_iou_loss(logits, target)[0] == pytest.approx(float(1 - (inter + 1e-3) / (union + 1e-3)), rel=1e-6)
    assert cad_loss(logits, target).item() == pytest.approx(2 * one.item(), rel=1e-6)


# ------------------------------------------------------------------ the frozen encoder
def test_encoder_gets_no_gradient_and_keeps_no_graph(tiny_sam):
    spec = CADSpec.for_backbone(tiny_sam)
    assert (spec.channels, spec.grid, spec.in_side) == (32, 16, 128)
    module = spec.build(tiny_sam).train()
    enc = tiny_sam.sam.image_encoder
    outputs = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in [*enc.blocks, enc.neck]]
    images = torch.rand(2, 3, 128, 128) * 255
    points, labels = torch.rand(2, 3, 2) * 128, torch.ones(2, 3)
    prefix = tiny_sam.encode_prefix(images)
    frozen, adapted = module.embedding(tiny_sam, prefix, images)
    for h in handles:
        h.remove()
    assert frozen.shape == adapted.shape == (2, 32, 16, 16)
    assert not frozen.requires_grad and frozen.grad_fn is None  # before the adapter is added
    assert adapted.requires_grad and adapted.abs().max() <= 1
    assert len(outputs) == len(enc.blocks) + 1 and not any(o.requires_grad for o in outputs)

    logits, iou = module.segment(tiny_sam, prefix, images, None, points, labels)
    assert logits.shape == (2, 1, 128, 128) and iou.shape == (2, 1)
    cad_loss(logits, (torch.rand(2, 1, 128, 128) > 0.5).float()).backward()
    assert all(p.grad is None for p in tiny_sam.parameters())  # encoder, prompt encoder, SAM's decoder
    assert all(p.grad is not None for p in module.adapter.parameters())
    assert module.decoder.output_upscaling[0].weight.grad is not None
    assert module.decoder is not tiny_sam.sam.mask_decoder
    # the same model with an AugModule does backpropagate through the blocks after the selector layer
    aug = ModuleBank(tiny_sam, AugModuleSpec.for_backbone(tiny_sam)).new_module()
    outputs.clear()
    handles = [blk.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for blk in enc.blocks]
    aug.segment(tiny_sam, prefix, images, torch.zeros(2, 16, 16), points, labels)
    for h in handles:
        h.remove()
    assert [o.requires_grad for o in outputs] == [True, True]  # the suffix blocks 4, 5 keep a graph


def test_cad_refuses_sam2_and_prompt_box_needs_cad():
    from samcl.plugins import check_plugins

    with pytest.raises(ValueError, match=r"--module CAD is the SAM \(ViT\) variant, but the backbone is 'sam2'"):
        load_config(CONFIG_DIR / "samcl2_hiera_t.yaml", {"module": "CAD"})
    with pytest.raises(ValueError, match="learning module cad needs the sam backbone, not sam2: SAM 2's mask decoder"):
        check_plugins(load_config(CONFIG_DIR / "samcl2_hiera_t.yaml", {"learning_module": "cad"}))
    with pytest.raises(ValueError, match="prompt: box is CAD's recipe"):
        check_plugins(load_config(CONFIG_DIR / "samcl_vit_b.yaml", {"prompt": "box"}))


def test_module_cad_defaults_to_cads_own_recipe():
    assert default_config("sam", "CAD").endswith("cad_vit_b.yaml")
    assert default_config("sam", None).endswith("samcl_vit_b.yaml")
    cfg = load_config(default_config("sam", "CAD"))
    assert (cfg.module, cfg.loss, cfg.optimizer, cfg.lr, cfg.scheduler, cfg.epoch, cfg.batch_size, cfg.seed) == \
        ("CAD", "bce_iou", "adamw", 2e-4, "cosine", 20, 4, 21)
    assert cfg.prompt == "points" and cfg.run_name().startswith("CAD_")


# ------------------------------------------------------------------ the continual loop
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cad_data")
    make_demo_data(root, n_train=5, n_test=3)
    return root


def cad_cfg(root, run_dir, config="demo_cad.yaml", **kw):
    return load_config(CONFIG_DIR / config, {
        "data_root": str(root), "run_dir": str(run_dir), "epoch": 2, "num_embedding": 4, "batch_size": 3,
        "val_every": 1, "selector_epochs": 3, "num_workers": 0, "eval_batch_size": 4, **kw})


def test_continual_run_with_module_cad_writes_run_folder_tests_and_resumes(data, tmp_path, capsys):
    run = tmp_path / "cad_run"
    cfg = cad_cfg(data, run, order="polyp_shadow_natural")
    metrics = pipeline.train(cfg, CPU)
    for f in ("run.json", "polyp.safetensors", "shadow.safetensors", "Module_Selector.safetensors", "metrics.json",
              "embedding_buffer/natural.safetensors", "selector/after_natural.safetensors"):
        assert (run / f).is_file(), f
    assert not (run / "natural.safetensors").exists()
    saved = json.loads((run / "metrics.json").read_text())
    lm = saved["learning_module"]
    assert lm["kind"] == "cad" and lm["module"] == "CAD" and "aug_module" not in saved
    assert lm["counted_parameters"] == metrics["learning_module"]["counted_parameters"] == 68_768
    assert lm["spec"] == {"channels": 32, "grid": 16, "in_side": 128, "scale": 0.1}
    steps = saved["steps"]
    assert [s["trained"] for s in steps] == [True, True, False]
    assert len(steps[0]["training"]["epoch_loss"]) == 2 and len(steps[0]["training"]["validation"]) == 2
    assert all(math.isfinite(v) for s in steps[:2] for v in s["training"]["epoch_loss"])
    assert "CAD module: 68,768 parameters" in (run / "log.txt").read_text()
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["module"] == "CAD" and manifest["spec"]["in_side"] == 128

    data_file = read_tagged(run / "polyp.safetensors", "module file")
    assert data_file["format"] == "samcl-cad" and data_file["kind"] == "cad"
    assert any(k.startswith("decoder.") for k in data_file["state_dict"])
    assert any(k.startswith("adapter.blocks.0.bn.running_mean") for k in data_file["state_dict"])

    report = pipeline.test(run, cfg, CPU)
    assert "polyp" in capsys.readouterr().out
    for d in ("polyp", "shadow", "natural"):
        r = report["results"][d]
        assert r["metrics"]["n"] == 3 and r["vanilla"]["n"] == 3
        assert r["metrics"]["iou"] == pytest.approx(steps[2]["evaluation"][d]["metrics"]["iou"])
    assert report["results"]["polyp"]["trained"] and not report["results"]["natural"]["trained"]

    # a module file of one kind is refused by a run of the other, naming both
    model = pipeline.load_run(run, cfg, CPU)
    assert isinstance(model.module_for("polyp"), CADModule) and not model.module_for("polyp").training
    with pytest.raises(RunFolderError, match="holds a cad module, but this run uses augmodule modules"):
        load_module(run / "polyp.safetensors", model.backbone, "augmodule")
    aug_file = tmp_path / "aug.safetensors"
    save_module(AugModule(AugModuleSpec.for_backbone(model.backbone)), model.backbone, "polyp", aug_file)
    with pytest.raises(RunFolderError, match="holds a augmodule module, but this run uses cad modules"):
        load_module(aug_file, model.backbone, "cad")
    with pytest.raises(ValueError, match="takes cad modules, got a augmodule module"):
        model.add_domain("other", AugModule(AugModuleSpec.for_backbone(model.backbone)))
    with pytest.raises(RunFolderError, match="module='CAD'"):
        pipeline.resume(run, {"module": "SAMCL"}, CPU)

    # resume adds a domain: the finished CAD modules are read back, one new module trained
    before = read_tagged(run / "polyp.safetensors", "module file")["state_dict"]
    pipeline.resume(run, {"order": "polyp_shadow_natural_lesion"}, CPU)
    assert (run / "lesion.safetensors").is_file()
    after = json.loads((run / "metrics.json").read_text())
    assert [s["domain"] for s in after["steps"]] == ["polyp", "shadow", "natural", "lesion"]
    assert after["steps"][3]["trained"] and after["steps"][2]["evaluation"]["lesion"].get("measured_when_added")
    assert all(torch.equal(v, read_tagged(run / "polyp.safetensors", "module file")["state_dict"][k])
               for k, v in before.items())


def test_cad_training_with_the_cache_equals_without(data, tmp_path):
    """Under CAD the whole encoder is frozen: the cache keeps its embedding, results stay bit-identical."""
    runs = {}
    for mode in ("off", "auto"):
        cfg = cad_cfg(data, tmp_path / mode, order="polyp", epoch=3, feature_cache=mode)
        runs[mode] = (cfg, pipeline.train(cfg, CPU))
    (cfg_off, m_off), (cfg_on, m_on) = runs["off"], runs["auto"]
    assert m_off["steps"][0]["training"]["epoch_loss"] == m_on["steps"][0]["training"]["epoch_loss"]
    assert m_off["steps"][0]["evaluation"] == m_on["steps"][0]["evaluation"]
    model = pipeline.build_model(cfg_off, CPU)
    a = load_module(cfg_off.resolved_run_dir() / "polyp.safetensors", model.backbone, "cad").state_dict()
    b = load_module(cfg_on.resolved_run_dir() / "polyp.safetensors", model.backbone, "cad").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "hit rate 66.7%" in (cfg_on.resolved_run_dir() / "log.txt").read_text()  # epochs 2-3 skip the encoder


def test_single_domain_mode_with_box_prompt(data, tmp_path):
    run = tmp_path / "single"
    cfg = cad_cfg(data, run, config="cad_single_domain.yaml", order="shadow", vit_name="vit_tiny",
                  random_weights=True, img_size=128, epoch=1, val_every=1)
    assert cfg.unseen == [] and cfg.prompt == "box" and cfg.domains == ["shadow"]
    pipeline.train(cfg, CPU)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["accuracy_matrix"]["matrix"]["iou"] == [[saved["steps"][0]["evaluation"]["shadow"]["metrics"]["iou"]]]
    assert saved["steps"][0]["evaluation"]["shadow"]["selector_counts"] == {"shadow": 3}
    assert saved["steps"][0]["summary"]["iou"]["FM"] == 0
    report = pipeline.test(run, cfg, CPU, with_vanilla=False)
    assert report["domains"] == ["shadow"] and report["results"]["shadow"]["selector_accuracy"] == 1.0
    model = pipeline.load_run(run, cfg, CPU)
    assert model.prompt == "box" and model.boxes(2).tolist() == [[0, 0, 128, 128]] * 2


# ------------------------------------------------------------------ the memory bench
def test_memory_bench_cad_below_in_encoder_adapter(tmp_path):
    """ViT-B's architecture (random weights) at 256 px: the proportions of the real model (the vit_tiny
    toy's 32-wide encoder is too small for the comparison to mean anything). What CAD's design decides
    is what autograd keeps for the backward: no encoder activations. The step's peak at this size
    also holds the CPU's convolution workspace, which depends on the instruction set (on an AVX2 CPU
    oneDNN's im2col buffers for CAD's 3x3 convolutions, about 150 MB, put CAD's peak above the
    adapter's at 256 and 384 px; on AVX-512 below), so the peaks are printed, not compared here
    (bench/README.md records them at full size)."""
    out = tmp_path / "memory.json"
    r = subprocess.run([sys.executable, "bench/memory.py", "--vit_name", "vit_b", "--img_size", "256", "--batch", "1",
                        "--modules", "cad", "adapter+decoder", "--steps", "1", "--json", str(out)],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "peak MB" in r.stdout and "adapter+decoder" in r.stdout
    report = json.loads(out.read_text())
    rows = {row["module"]: row for row in report["results"]}
    for row in rows.values():
        for key in ("peak_mb", "step_mb", "saved_mb", "time_s", "trainable", "stored_mb"):
            assert row[key] > 0, (row["module"], key)
    assert rows["cad"]["saved_mb"] < rows["adapter+decoder"]["saved_mb"] / 1.5
    assert rows["cad"]["trainable"] == 5_831_908 and 20 < rows["cad"]["stored_mb"] < 25  # ViT-B: adapter + decoder
