"""Every registered learning module on every backbone: what it injects where, that a fresh one
is the frozen backbone (zero-initialised kinds), its parameter count, its file round trip."""
import pytest
import torch

from samcl.heatmap import points_to_heatmap
from samcl.learning_modules.base import segment_with
from samcl.registry import LEARNING_MODULES, UnknownName
from samcl.run_folder import load_module, save_module
from tests.conftest import tiny_backbone

ZERO_INIT = ("augmodule", "lora", "adapter", "decoder", "olora")  # CAD's adapter and L2P's prompt pool are not
# zero-initialised (their recipes)


@pytest.fixture(scope="module", params=["sam", "sam2"])
def backbone(request):
    return tiny_backbone(request.param)


def batch(bb, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, bb.img_size, bb.img_size), generator=g).float()
    points = torch.rand(n, 3, 2, generator=g) * bb.img_size
    labels = torch.tensor([[1, 1, 0], [1, 0, 1]])[:n]
    return images, points, labels


def build(kind, bb):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return LEARNING_MODULES.get(kind).spec_class.for_backbone(bb).build(bb).eval()


def kinds_for(bb):
    return [k for k in LEARNING_MODULES.names() if not (k == "cad" and bb.family == "sam2")]


def hooked(bb):
    """Names of the backbone's submodules that carry a forward or forward-pre hook, or whose forward
    a module replaced for the call."""
    return sorted(n for n, m in bb.named_modules() if m._forward_hooks or m._forward_pre_hooks
                  or "forward" in vars(m))


def randomise(module, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def run(module, bb, images, points, labels):
    prefix = bb.encode_prefix(images)
    heat = points_to_heatmap(points, bb.grid_size, bb.img_size, labels) if module and module.needs_heatmap else None
    with torch.no_grad():
        return segment_with(module, bb, prefix, images, heat, points, labels)


def test_registry_lists_the_kinds_and_refuses_unknown_names():
    assert LEARNING_MODULES.names() == ["adapter", "augmodule", "cad", "decoder", "lora", "olora", "prompt_pool"]
    with pytest.raises(UnknownName, match="unknown learning module 'dora'; known: adapter, augmodule, cad, decoder, lora, "
                                          "olora, prompt_pool$"):
        LEARNING_MODULES.get("dora")


def test_cad_on_sam2_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="CAD needs a SAM \\(ViT\\) backbone.*conv_s0/conv_s1"):
        LEARNING_MODULES.get("cad").spec_class.for_backbone(tiny_backbone("sam2"))


def test_fresh_zero_initialised_modules_equal_the_frozen_backbone(backbone):
    images, points, labels = batch(backbone)
    vanilla, vanilla_iou = run(None, backbone, images, points, labels)
    for kind in kinds_for(backbone):
        logits, iou = run(build(kind, backbone), backbone, images, points, labels)
        same = torch.equal(logits, vanilla) and torch.equal(iou, vanilla_iou)
        assert same == (kind in ZERO_INIT), kind


def test_modules_inject_exactly_at_their_declared_points_and_leave_the_backbone_stock(backbone):
    images, points, labels = batch(backbone)
    assert hooked(backbone) == []
    stock, _ = run(None, backbone, images, points, labels)
    for kind in kinds_for(backbone):
        module = randomise(build(kind, backbone))
        heat = points_to_heatmap(points, backbone.grid_size, backbone.img_size, labels)
        declared = module.injection_points(backbone)
        with module.attached(backbone, heatmap=heat):
            assert hooked(backbone) == declared, kind
        assert hooked(backbone) == [], kind
        changed, _ = run(module, backbone, images, points, labels)
        assert not torch.equal(changed, stock), kind  # it does act ...
        after, _ = run(None, backbone, images, points, labels)
        assert torch.equal(after, stock), kind  # ... and only while attached
    sel, depth = backbone.selector_layer, backbone.depth
    points_of = {k: build(k, backbone).injection_points(backbone) for k in kinds_for(backbone)}
    prefix = "sam.image_encoder.blocks" if backbone.family == "sam" else "sam2.image_encoder.trunk.blocks"
    assert points_of["lora"] == points_of["olora"] == sorted(f"{prefix}.{i}.attn.qkv" for i in range(sel + 1, depth))
    assert points_of["prompt_pool"] == sorted(f"{prefix}.{i}.attn" for i in range(sel + 1, depth))
    assert points_of["adapter"] == sorted(f"{prefix}.{i}.mlp" for i in range(depth))
    aug_layers = build("augmodule", backbone).spec.layers
    neck = ["sam.image_encoder.neck"] if backbone.family == "sam" else []
    assert points_of["augmodule"] == sorted([f"{prefix}.{i}.attn" for i in aug_layers] + neck)
    assert points_of["decoder"] == [] and points_of.get("cad", []) == []


def expected_parameters(kind, module, bb):
    """The documented count of each kind, from the backbone's shapes."""
    spec = module.spec
    if kind == "augmodule":
        neck = 0 if spec.neck_channels is None else (spec.rank + 1) * sum(spec.neck_channels)
        return (spec.dim + 1) * spec.rank + len(spec.layers) * (spec.rank + 1) * spec.dim \
            + (spec.rank + 1) * spec.rank + neck  # A, B_l, extra.layer (+ upward, upward_); LayerNorms not counted
    if kind in ("lora", "olora"):  # olora: one pair per trained domain (1 when fresh)
        pairs = spec.tasks if kind == "olora" else 1
        return pairs * sum(spec.rank * (bb.qkv(i).in_features + bb.qkv(i).out_features) for i in spec.layers)
    if kind == "prompt_pool":  # keys (M, D_sel); per late block key and value prompts (M, 2, L, C)
        return spec.pool_size * (bb.selector_dim + sum(2 * spec.length * bb.qkv(i).out_features // 3
                                                       for i in spec.layers))
    if kind == "adapter":
        return sum(2 * w * h + w + h for w, h in zip(spec.widths, spec.hidden))
    if kind == "decoder":
        skip = ("conv_s0", "conv_s1")
        return sum(p.numel() for n, p in bb.mask_decoder.named_parameters() if not n.startswith(skip))
    if kind == "cad":
        c = spec.channels
        return 6 * c + c + 3 * (9 * c * c + c + 2 * c) + sum(p.numel() for p in bb.mask_decoder.parameters())
    raise AssertionError(kind)


def test_parameter_counts_are_the_documented_ones(backbone):
    for kind in kinds_for(backbone):
        module = build(kind, backbone)
        assert module.counted_parameters() == expected_parameters(kind, module, backbone), kind
        if kind != "augmodule":  # every parameter is stored and trained
            assert module.counted_parameters() == sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_module_files_round_trip_and_refuse_another_backbone(backbone, tmp_path):
    images, points, labels = batch(backbone)
    other = tiny_backbone("sam2" if backbone.family == "sam" else "sam")
    for kind in kinds_for(backbone):
        module = randomise(build(kind, backbone))
        for suffix in (".safetensors", ".pth"):  # run folders, and those written before safetensors
            path = tmp_path / f"{kind}{suffix}"
            save_module(module, backbone, "polyp", path)
            back = load_module(path, backbone, kind)
            assert type(back) is type(module) and back.spec == module.spec
            assert torch.equal(run(back, backbone, images, points, labels)[0],
                               run(module, backbone, images, points, labels)[0])
            with pytest.raises(ValueError, match="was trained on"):
                load_module(path, other, kind)
