"""SAM backbone: prefix/suffix split, decoding, routing, checkpoint loading."""
import pytest
import torch
import torch.nn.functional as F

from samcl.learning_modules.augmodule import AugModule, AugModuleSpec
from samcl.learning_modules.base import segment_with
from samcl.backbones.base import index_features
from samcl.backbones.sam import SAMBackbone, build_sam, load_sam_weights
from samcl.model import ModuleBank
from samcl.selector import ModuleSelector


def batch(n=3, seed=0, size=128):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g) * 255
    points = torch.rand(n, 3, 2, generator=g) * (size - 1)
    labels = torch.ones(n, 3, dtype=torch.long)
    return images, points, labels


def trained_like(spec, seed):
    """A module with non-zero weights everywhere (stands in for a trained one)."""
    torch.manual_seed(seed)
    m = AugModule(spec)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m


def test_prefix_plus_suffix_equals_stock_encoder(tiny_sam):
    images, _, _ = batch()
    prefix = tiny_sam.encode_prefix(images)
    assert prefix["tokens"].shape == (3, 16, 16, 32)
    ours = tiny_sam.encode_suffix(prefix)["image_embeddings"]
    stock = tiny_sam.sam.image_encoder(tiny_sam.sam.preprocess(images))
    assert torch.equal(ours, stock)
    assert tiny_sam.selector_embedding(prefix).shape == (3, 32)


def test_batched_decoding_equals_stock_sam_per_image(tiny_sam):
    images, points, labels = batch()
    with torch.no_grad():
        masks, iou = tiny_sam.decode(tiny_sam.encode_suffix(tiny_sam.encode_prefix(images)), points, labels)
        assert masks.shape == (3, 1, 128, 128) and iou.shape == (3, 1)
        for i in range(3):
            out = tiny_sam.sam([{"image": images[i], "original_size": (128, 128), "point_coords": points[i:i + 1],
                                 "point_labels": labels[i:i + 1]}], multimask_output=False)[0]
            stock = F.interpolate(out["low_res_logits"], size=(128, 128), mode="nearest")
            assert torch.allclose(masks[i:i + 1], stock, atol=1e-5)
            assert torch.allclose(iou[i:i + 1], out["iou_predictions"], atol=1e-6)


def test_bilinear_upsampling_option():
    torch.manual_seed(0)
    sam, _ = build_sam("vit_tiny")
    bb = SAMBackbone(sam, "vit_tiny", upsample="bilinear").eval()
    images, points, labels = batch(1)
    with torch.no_grad():
        masks, _ = bb.decode(bb.encode_suffix(bb.encode_prefix(images)), points, labels)
        out = sam([{"image": images[0], "original_size": (128, 128), "point_coords": points, "point_labels": labels}],
                  multimask_output=False)[0]
    assert torch.allclose(masks, F.interpolate(out["low_res_logits"], (128, 128), mode="bilinear",
                                               align_corners=False), atol=1e-5)


def test_zero_module_leaves_masks_unchanged_and_trained_module_changes_them(tiny_sam):
    images, points, labels = batch()
    model = ModuleBank(tiny_sam, AugModuleSpec.for_backbone(tiny_sam))
    heat = model.heatmap(points, labels)
    with torch.no_grad():
        prefix = tiny_sam.encode_prefix(images)
        vanilla = tiny_sam.segment(prefix, points, labels)[0]
        zero = segment_with(model.new_module(), tiny_sam, prefix, None, heat, points, labels)[0]
        other = segment_with(trained_like(model.spec, 1), tiny_sam, prefix, None, heat, points, labels)[0]
    assert torch.equal(zero, vanilla)
    assert not torch.allclose(other, vanilla)


def test_module_acts_on_windowed_and_global_blocks_and_neck(tiny_sam):
    spec = AugModuleSpec.for_backbone(tiny_sam)
    assert spec.layers == (4, 5)
    assert tiny_sam.sam.image_encoder.blocks[4].window_size == 7  # windowed (16x16 grid padded to 21x21)
    assert tiny_sam.sam.image_encoder.blocks[5].window_size == 0  # global
    images, points, labels = batch(2)
    heat = ModuleBank(tiny_sam, spec).heatmap(points, labels)
    prefix = tiny_sam.encode_prefix(images)
    base = tiny_sam.encode_suffix(prefix)["image_embeddings"]
    for name in ("B.0", "B.1", "extra.upward_"):
        m = AugModule(spec)
        torch.nn.init.normal_(dict(m.named_modules())[name].weight)
        with torch.no_grad():
            with m.attached(tiny_sam, heatmap=heat):
                out = tiny_sam.encode_suffix(prefix)["image_embeddings"]
        assert not torch.allclose(out, base), name


def test_routed_batch_equals_per_image(tiny_sam):
    images, points, labels = batch(5)
    model = ModuleBank(tiny_sam, AugModuleSpec.for_backbone(tiny_sam))
    model.add_domain("a", trained_like(model.spec, 1))
    model.add_domain("b", trained_like(model.spec, 2))
    model.add_domain("u", None)
    model.selector = ModuleSelector(32, 3).eval()
    choice = torch.tensor([2, 0, 1, 0, 2])
    with torch.no_grad():
        prefix = tiny_sam.encode_prefix(images)
        logits, iou = model.segment_routed(prefix, choice, points, labels)
        for i in range(5):
            idx = torch.tensor([i])
            m = model.module_for(model.domains[choice[i]])
            ref, ref_iou = segment_with(m, tiny_sam, index_features(prefix, idx), None, model.heatmap(points[idx], labels[idx]),
                                            points[idx], labels[idx])
            assert torch.allclose(logits[i:i + 1], ref, atol=1e-5)
            assert torch.allclose(iou[i:i + 1], ref_iou, atol=1e-6)
        # predict() routes with the selector and returns its choice
        out = model.predict(images, points, labels)
        assert out["choice"].shape == (5,) and int(out["choice"].max()) < 3


def test_predict_exposes_scores_low_res_logits_and_forced_domains(tiny_sam):
    images, points, labels = batch(4)
    model = ModuleBank(tiny_sam, AugModuleSpec.for_backbone(tiny_sam))
    model.add_domain("a", trained_like(model.spec, 1))
    model.add_domain("b", trained_like(model.spec, 2))
    model.add_domain("u", None)
    model.selector = ModuleSelector(32, 3)
    model.selector(torch.randn(8, 32))  # non-trivial BatchNorm running statistics
    with torch.no_grad():
        prefix = tiny_sam.encode_prefix(images)
        routed = model.predict(images, points, labels)
        probs = routed["probabilities"]
        assert probs.shape == (4, 3) and torch.allclose(probs.sum(1), torch.ones(4))
        assert torch.equal(routed["choice"], probs.argmax(1)) and torch.equal(routed["choice"], model.route(prefix))
        # low-res logits are the decoder's (N, 1, 4G, 4G); the full-size ones are their nearest upsampling
        g = tiny_sam.grid_size
        assert routed["low_res_logits"].shape == (4, 1, 4 * g, 4 * g)
        assert torch.equal(routed["logits"], torch.nn.functional.interpolate(
            routed["low_res_logits"], size=(tiny_sam.img_size,) * 2, mode="nearest"))
        want, want_iou = model.segment_routed(prefix, routed["choice"], points, labels)
        assert torch.equal(routed["logits"], want) and torch.equal(routed["iou"], want_iou)
        # a forced domain runs its module on every image; "vanilla" runs none; routing scores stay
        forced = model.predict(images, points, labels, domain="b")
        assert forced["choice"].tolist() == [1] * 4 and torch.equal(forced["probabilities"], probs)
        b_logits, _ = model.segment_one(model.module_for("b"), prefix, points, labels)
        assert torch.equal(forced["logits"], b_logits)
        vanilla = model.predict(images, points, labels, domain="vanilla")
        assert vanilla["choice"].tolist() == [-1] * 4
        assert torch.equal(vanilla["logits"], model.segment_vanilla(prefix, points, labels)[0])
    with pytest.raises(ValueError, match=r"unknown domain 'c'; this model has \['a', 'b', 'u'\]"):
        model.predict(images, points, labels, domain="c")


def test_module_for_another_backbone_is_refused(tiny_sam):
    with pytest.raises(ValueError, match=r"sam/vit_tiny.*width 384 \(this backbone: 32\)"):
        ModuleBank(tiny_sam, AugModuleSpec(dim=384, layers=(6, 7, 8, 9), neck_channels=None))
    with pytest.raises(ValueError, match="frozen prefix"):
        ModuleBank(tiny_sam, AugModuleSpec(dim=32, layers=(2, 4), neck_channels=(32, 32)))


def test_official_key_layout_loads_and_foreign_checkpoints_are_named(tmp_path):
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    ours, _ = build_sam("vit_b")
    stock = sam_model_registry["vit_b"]()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}

    torch.manual_seed(1)
    src, _ = build_sam("vit_tiny")
    path = tmp_path / "sam_tiny.pth"
    torch.save(src.state_dict(), path)
    dst, _ = build_sam("vit_tiny")
    load_sam_weights(dst, path, "vit_tiny")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)

    fake_vit_b = {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    fake_vit_b |= {f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)}
    torch.save(fake_vit_b, tmp_path / "vit_b_like.pth")
    with pytest.raises(ValueError, match=r"does not fit --vit_name vit_tiny: it is vit_b \(width 768, 12 blocks\)"):
        load_sam_weights(dst, tmp_path / "vit_b_like.pth", "vit_tiny")

    torch.save({"model": {"image_encoder.trunk.x": torch.zeros(1)}}, tmp_path / "sam2.pt")
    with pytest.raises(ValueError, match="SAM 2 checkpoint"):
        load_sam_weights(dst, tmp_path / "sam2.pt", "vit_tiny")

    with pytest.raises(FileNotFoundError, match="--random_weights"):
        load_sam_weights(dst, tmp_path / "missing.pth", "vit_tiny")

    (tmp_path / "truncated.pth").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read SAM checkpoint .*truncated.pth"):
        load_sam_weights(dst, tmp_path / "truncated.pth", "vit_tiny")
