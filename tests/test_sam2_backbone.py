"""SAM 2.1 (Hiera) backbone: split points, sizes, equivalence with the stock sam2 path,
AugModule hooks, checkpoint errors, and a short continual run."""
import json

import numpy as np
import pytest
import torch

from samcl.learning_modules.augmodule import AugModule, AugModuleSpec
from samcl.learning_modules.base import segment_with
from samcl.backbones.sam2 import SAM2Backbone, build_sam2_model, load_sam2_weights
from samcl.config import Config, load_config

S = 128  # hiera_toy input side


def toy(seed: int = 0) -> SAM2Backbone:
    torch.manual_seed(seed)
    model, _ = build_sam2_model("hiera_toy")
    return SAM2Backbone(model, "hiera_toy").eval()


@pytest.fixture(scope="module")
def tiny_sam2() -> SAM2Backbone:
    return toy()


def _batch(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, S, S), generator=g).float()
    points = torch.rand(n, 3, 2, generator=g) * S
    labels = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1]])[:n]
    return images, points, labels


def _randomise(module: AugModule, seed: int = 1) -> AugModule:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


# ------------------------------------------------------------------ sizes and split points
def test_hiera_t_counted_size_split_and_selector_embedding():
    model, entry = build_sam2_model("hiera_t")
    assert entry["config"] == "configs/sam2.1/sam2.1_hiera_t.yaml" and entry["checkpoint"] == "sam2.1_hiera_tiny.pt"
    bb = SAM2Backbone(model, "hiera_t").eval()
    assert (bb.family, bb.img_size, bb.selector_layer, bb.selector_dim, bb.grid_size) == ("sam2", 1024, 5, 384, 64)
    spec = AugModuleSpec.for_backbone(bb)
    assert spec == AugModuleSpec(dim=384, layers=(6, 7, 8, 9), neck_channels=None, rank=10)
    m = AugModule(spec)
    assert m.counted_parameters() == 3850 + 4 * 4224 + 110 == 20856
    assert f"{m.counted_size_mb():.4f}" == "0.0796"
    assert m.extra.upward is None and m.extra.upward_ is None
    assert all(not p.requires_grad for p in bb.parameters())
    trunk = model.image_encoder.trunk
    assert [trunk.blocks[i].window_size for i in spec.layers] == [14, 0, 14, 0]  # windowed, global, ...
    prefix = bb.encode_prefix(torch.full((1, 3, 1024, 1024), 128.0))
    assert prefix["tokens"].shape == (1, 64, 64, 384)
    assert prefix["trunk_0"].shape == (1, 96, 256, 256) and prefix["trunk_2"].shape == (1, 192, 128, 128)
    assert bb.selector_embedding(prefix).shape == (1, 384)


@pytest.mark.parametrize("name, selector, dim, layers", [
    ("hiera_s", 7, 384, tuple(range(8, 14))),
    ("hiera_b+", 12, 448, tuple(range(13, 21))),
    ("hiera_l", 23, 576, tuple(range(24, 44))),
])
def test_other_sizes_derive_selector_and_layers(name, selector, dim, layers):
    """The defaults documented in configs/models/sam2.yaml."""
    model, _ = build_sam2_model(name)
    bb = SAM2Backbone(model, name)
    assert (bb.selector_layer, bb.selector_dim, bb.grid_size) == (selector, dim, 64)
    assert AugModuleSpec.for_backbone(bb) == AugModuleSpec(dim=dim, layers=layers, neck_channels=None, rank=10)


def test_hiera_s_runs_prefix_suffix_decode_with_a_module():
    torch.manual_seed(0)
    model, _ = build_sam2_model("hiera_s", img_size=256)  # reduced input: 16x16 grid, windows of 14 padded to 28
    bb = SAM2Backbone(model, "hiera_s").eval()
    assert bb.grid_size == 16
    module = _randomise(AugModule(AugModuleSpec.for_backbone(bb)))
    images = torch.rand(1, 3, 256, 256) * 255
    points, labels = torch.tensor([[[30.0, 200.0], [100.0, 50.0]]]), torch.tensor([[1, 1]])
    prefix = bb.encode_prefix(images)
    heat = torch.rand(1, 16, 16)
    with torch.no_grad():
        logits, iou = segment_with(module, bb, prefix, None, heat, points, labels)
        vanilla, _ = bb.segment(prefix, points, labels)
    assert logits.shape == (1, 1, 256, 256) and iou.shape == (1, 1)
    assert torch.isfinite(logits).all() and not torch.equal(logits, vanilla)


# ------------------------------------------------------------------ equivalence with stock sam2
def test_prefix_plus_suffix_equals_stock_forward_image(tiny_sam2):
    bb = tiny_sam2.eval()
    model = bb.sam2
    images, _, _ = _batch()
    with torch.no_grad():
        ours = bb.encode_suffix(bb.encode_prefix(images))
        # SAM2ImagePredictor.set_image_batch, on the same normalised input
        backbone_out = model.forward_image(bb.preprocess(images))
        _, feats, _, sizes = model._prepare_backbone_features(backbone_out)
        feats[-1] = feats[-1] + model.no_mem_embed
        stock = [f.permute(1, 2, 0).view(2, -1, *s) for f, s in zip(feats, sizes)]
    assert ours["image_embed"].shape == (2, 32, 8, 8)
    assert ours["high_res_0"].shape == (2, 4, 32, 32) and ours["high_res_1"].shape == (2, 8, 16, 16)
    for key, ref in zip(("high_res_0", "high_res_1", "image_embed"), stock):
        torch.testing.assert_close(ours[key], ref, rtol=0, atol=1e-6)


def test_batched_decode_equals_stock_image_predictor(tiny_sam2):
    """Logits and IoU of a batch equal SAM2ImagePredictor.predict on each image alone (eval mode:
    the decoder's dynamic multimask-by-stability is on, as build_sam2 sets it)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    bb = tiny_sam2.eval()
    assert bb.sam2.sam_mask_decoder.dynamic_multimask_via_stability
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, S, S, 3), dtype=np.uint8)
    points = rng.uniform(0, S, (2, 3, 2)).astype(np.float32)
    labels = np.array([[1, 1, 0], [1, 0, 1]])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        logits, iou = bb.segment(bb.encode_prefix(x), torch.from_numpy(points), torch.from_numpy(labels))
    assert logits.shape == (2, 1, S, S) and iou.shape == (2, 1)
    predictor = SAM2ImagePredictor(bb.sam2)
    predictor._bb_feat_sizes = [(S // 4, S // 4), (S // 8, S // 8), (S // 16, S // 16)]  # stock values assume 1024
    for i in range(2):
        predictor.set_image(images[i])
        masks, scores, _ = predictor.predict(point_coords=points[i], point_labels=labels[i],
                                             multimask_output=False, return_logits=True)
        np.testing.assert_allclose(logits[i].numpy(), masks, rtol=0, atol=1e-5)
        np.testing.assert_allclose(iou[i].numpy(), scores, rtol=0, atol=1e-6)


def test_train_mode_takes_the_single_mask_token(tiny_sam2):
    bb = tiny_sam2
    images, points, labels = _batch()
    prefix = bb.encode_prefix(images)
    feats = bb.encode_suffix(prefix)
    bb.train()
    try:
        assert bb.sam2.sam_mask_decoder.training
        with torch.no_grad():
            logits, iou = bb.decode(feats, points, labels)
            model = bb.sam2
            sparse, dense = model.sam_prompt_encoder(points=(points.float(), labels), boxes=None, masks=None)
            low, all_iou, _, _ = model.sam_mask_decoder.predict_masks(
                feats["image_embed"], model.sam_prompt_encoder.get_dense_pe(), sparse, dense, repeat_image=False,
                high_res_features=[feats["high_res_0"], feats["high_res_1"]])
        ref = torch.nn.functional.interpolate(low[:, :1], size=(S, S), mode="bilinear", align_corners=False)
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(iou, all_iou[:, :1], rtol=0, atol=1e-6)
    finally:
        bb.eval()


# ------------------------------------------------------------------ AugModule hooks
def test_fresh_module_leaves_sam2_masks_unchanged(tiny_sam2):
    bb = tiny_sam2
    images, points, labels = _batch(3)
    prefix = bb.encode_prefix(images)
    heat = torch.rand(3, bb.grid_size, bb.grid_size) * 255
    module = AugModule(AugModuleSpec.for_backbone(bb))
    for mode in ("eval", "train"):
        getattr(bb, mode)()
        with torch.no_grad():
            vanilla = bb.segment(prefix, points, labels)
            fresh = segment_with(module, bb, prefix, None, heat, points, labels)
        assert torch.equal(vanilla[0], fresh[0]) and torch.equal(vanilla[1], fresh[1])
    bb.eval()


def test_module_branch_layout_and_gradients(tiny_sam2):
    """Windowed blocks (6, 8) get the whole heatmap resized to the window and repeated per
    window; global blocks (7, 9) the transposed map; only the module gets gradients."""
    bb = tiny_sam2.eval()
    spec = AugModuleSpec.for_backbone(bb)
    assert spec == AugModuleSpec(dim=32, layers=(6, 7, 8, 9), neck_channels=None, rank=10)
    module = _randomise(AugModule(spec))
    images, points, labels = _batch()
    prefix = bb.encode_prefix(images)
    assert not prefix["tokens"].requires_grad
    seen = {}
    branch = module.branch

    def spy(layer, tokens, heat):
        seen[layer] = (tuple(tokens.shape), tuple(heat.shape))
        return branch(layer, tokens, heat)

    module.branch = spy
    heat = torch.rand(2, 8, 8) * 255
    logits, iou = segment_with(module, bb, prefix, None, heat, points, labels)
    # 8x8 grid padded to 12x12 in windows of 6: 4 windows per image
    assert seen == {6: ((8, 6, 6, 32), (8, 6, 6, 10)), 7: ((2, 8, 8, 32), (2, 8, 8, 10)),
                    8: ((8, 6, 6, 32), (8, 6, 6, 10)), 9: ((2, 8, 8, 32), (2, 8, 8, 10))}
    (logits.mean() + iou.mean()).backward()
    assert all(p.grad is not None for p in module.parameters())
    assert all(p.grad is None for p in bb.parameters())
    with torch.no_grad():
        vanilla, _ = bb.segment(prefix, points, labels)
    assert not torch.equal(vanilla, logits.detach())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bb.modules())  # no hook left behind


def test_check_aug_spec_refuses_sam_modules(tiny_sam2):
    bb = tiny_sam2
    with pytest.raises(ValueError, match="neck"):
        AugModuleSpec(dim=32, layers=(6, 7), neck_channels=(32, 32)).check(bb)
    with pytest.raises(ValueError, match="layers \\[10\\] do not exist or have another width"):
        AugModuleSpec(dim=32, layers=(6, 10)).check(bb)
    with pytest.raises(ValueError, match="frozen prefix"):
        AugModuleSpec(dim=32, layers=(5, 6)).check(bb)


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_errors_and_strict_round_trip(tmp_path):
    model = toy(1).sam2
    with pytest.raises(FileNotFoundError, match=r"checkpoint/.*--ckpt PATH.*--random_weights"):
        load_sam2_weights(model, tmp_path / "sam2.1_hiera_tiny.pt", "hiera_t")
    sam_file = tmp_path / "sam_vit_b.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, sam_file)
    with pytest.raises(ValueError, match="is a SAM \\(ViT\\) checkpoint"):
        load_sam2_weights(model, sam_file, "hiera_t")
    good = tmp_path / "toy.pt"
    torch.save({"model": toy(2).sam2.state_dict()}, good)
    load_sam2_weights(model, good, "hiera_toy")
    assert torch.equal(model.no_mem_embed, toy(2).sam2.no_mem_embed)
    hiera_t, _ = build_sam2_model("hiera_t")
    with pytest.raises(ValueError, match="does not fit --hiera_name hiera_t: it is SAM 2.1 an unknown size "
                                         "\\(width 8, 12 blocks\\)"):
        load_sam2_weights(hiera_t, good, "hiera_t")


# ------------------------------------------------------------------ config and scripts
def test_config_pairs_module_and_backbone():
    cfg = load_config("configs/samcl2_hiera_t.yaml")
    assert (cfg.module, cfg.backbone, cfg.hiera_name, cfg.batch_size, cfg.output_dir, cfg.upsample) == \
        ("SAMCL_2", "sam2", "hiera_t", 16, "log_sam2", "bilinear")
    assert cfg.resolved_run_dir().as_posix() == "log_sam2/SAMCL_2_Kvasir_camo_ISTD_ISIC_cod_COCO_300_1234_training"
    with pytest.raises(ValueError, match="--module SAMCL_2 is the SAM 2.1 variant"):
        Config(module="SAMCL_2", backbone="sam").validate()
    with pytest.raises(ValueError, match="--module SAMCL is the SAM \\(ViT\\) variant"):
        Config(module="SAMCL", backbone="sam2").validate()


def test_readme_commands_parse(tmp_path, monkeypatch):
    from functools import partial

    from samcl.commands.test import test_main
    from samcl.commands.train import train_main

    train_sam2, test_sam2 = partial(train_main, "sam2", ""), partial(test_main, "sam2", "")
    monkeypatch.chdir(tmp_path)  # no checkpoint/ and no run folder here
    with pytest.raises(SystemExit, match="nothing to test: looked for the run folder log_sam2/.*checkpoint/SAM2"):
        test_sam2(["--module", "SAMCL_2", "--device", "cpu"])
    with pytest.raises(SystemExit, match="sam2.1_hiera_tiny.pt not found.*--random_weights"):
        train_sam2(["--module", "SAMCL_2", "--batch_size", "16", "--device", "cpu"])
    assert not (tmp_path / "log_sam2").exists()  # a failed start leaves no run folder behind
    if not torch.cuda.is_available():
        for main, extra in ((train_sam2, ["--batch_size", "16"]), (test_sam2, [])):
            with pytest.raises(SystemExit, match="needs a CUDA GPU"):
                main(["--module", "SAMCL_2", "--cuda", "0", *extra])


# ------------------------------------------------------------------ end to end
def test_short_continual_run_on_tiny_hiera(tmp_path):
    from samcl.demo import DEMO_CONFIGS, make_demo_data
    from samcl.pipeline import test, train

    make_demo_data(tmp_path, n_train=4, n_test=2)
    cfg = load_config(DEMO_CONFIGS["sam2"], {
        "data_root": str(tmp_path), "output_dir": str(tmp_path / "log_sam2"), "order": "polyp_shadow_natural",
        "epoch": 1, "batch_size": 2, "num_embedding": 4, "selector_epochs": 2, "val_every": 1,
        "eval_batch_size": 4})
    device = torch.device("cpu")
    metrics = train(cfg, device, overwrite=True)
    run_dir = cfg.resolved_run_dir()
    assert run_dir.name == "SAMCL_2_polyp_shadow_natural_4_1234_training"
    assert (run_dir / "polyp.safetensors").is_file() and (run_dir / "shadow.safetensors").is_file()
    assert not (run_dir / "natural.safetensors").exists()
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["backbone"]["family"] == "sam2" and manifest["backbone"]["arch"] == "hiera_toy"
    assert manifest["spec"] == {"dim": 32, "layers": [6, 7, 8, 9], "neck_channels": None, "rank": 10}
    assert metrics["aug_module"]["counted_parameters"] == 32 * 10 + 10 + 4 * (10 * 32 + 32) + 110
    assert [s["domain"] for s in metrics["steps"]] == ["polyp", "shadow", "natural"]
    report = test(run_dir, cfg, device)
    assert report["selector_domains"] == ["polyp", "shadow", "natural"]
    for d in ("polyp", "shadow", "natural"):
        res = report["results"][d]
        assert 0.0 <= res["metrics"]["iou"] <= 1.0 and sum(res["selector_counts"].values()) == 2
    assert report["results"]["natural"]["trained"] is False
