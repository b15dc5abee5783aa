"""AugModule: counted size, zero init, heat layouts."""
import pytest
import torch

from samcl.learning_modules.augmodule import AugModule, AugModuleSpec, token_heat, window_heat
from samcl.backbones.sam import SAMBackbone, build_sam
from samcl.heatmap import points_to_heatmap


def test_vit_b_counted_size_from_real_classes():
    sam, _ = build_sam("vit_b")
    bb = SAMBackbone(sam, "vit_b")
    spec = AugModuleSpec.for_backbone(bb)
    assert spec == AugModuleSpec(dim=768, layers=(7, 8, 9, 10, 11), neck_channels=(768, 256), rank=10)
    assert bb.selector_layer == 6 and bb.grid_size == 64 and bb.selector_dim == 768
    m = AugModule(spec)
    assert m.counted_parameters() == 7690 + 5 * 8448 + 110 + 8448 + 2816 == 61304
    assert f"{m.counted_size_mb():.4f}" == "0.2339"
    assert "61,304 parameters = 0.2339 MB" in m.describe()
    # LayerNorms exist but are not counted, as in the reference
    assert sum(p.numel() for p in m.parameters()) == 61304 + 5 * 2 * 20 + 20


def test_vit_l_dims_and_layers_are_derived():
    sam, _ = build_sam("vit_l")
    spec = AugModuleSpec.for_backbone(SAMBackbone(sam, "vit_l"))
    assert spec.dim == 1024 and spec.layers == tuple(range(13, 24)) and spec.neck_channels == (1024, 256)


def test_fresh_module_is_zero_and_initialised_as_specified():
    torch.manual_seed(0)
    m = AugModule(AugModuleSpec(dim=32, layers=(4, 5), neck_channels=(32, 16)))
    for lin in [*m.B, m.extra.upward, m.extra.upward_]:
        assert torch.count_nonzero(lin.weight) == 0 and torch.count_nonzero(lin.bias) == 0
    assert torch.count_nonzero(m.A.bias) == 0 and torch.count_nonzero(m.A.weight) > 0
    bound = 1 / 32**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert m.A.weight.abs().max() <= bound
    t = torch.randn(2, 5, 5, 32)
    assert torch.count_nonzero(m.branch(4, t, torch.randn(2, 5, 5, 10))) == 0


def test_heat_shape_and_relu():
    m = AugModule(AugModuleSpec(dim=32, layers=(4,), neck_channels=(32, 16)))
    hm = points_to_heatmap(torch.tensor([[[10.0, 100.0]]]), 16, 128)
    h = m.heat(hm)
    assert h.shape == (1, 16, 16, 10) and (h >= 0).all()


def test_window_heat_resizes_whole_map_and_repeats_it_per_window():
    heat = torch.arange(16 * 16, dtype=torch.float32).view(1, 16, 16, 1).repeat(2, 1, 1, 3)  # (N=2, x, y, r)
    heat[1] += 1000
    w = window_heat(heat, window=7, windows_per_image=9)
    assert w.shape == (18, 7, 7, 3)
    for win in range(18):
        n = win // 9
        for i in range(7):  # rows = y
            for j in range(7):  # cols = x
                assert w[win, i, j, 0] == heat[n, j * 16 // 7, i * 16 // 7, 0]


def test_token_heat_transposes_to_rows_y():
    heat = torch.randn(1, 4, 6, 2)  # (N, x, y, r)
    assert torch.equal(token_heat(heat)[0, 5, 3], heat[0, 3, 5])


def test_neck_orientation_reference_vs_corrected():
    torch.manual_seed(0)
    m = AugModule(AugModuleSpec(dim=8, layers=(1,), neck_channels=(8, 4)))
    torch.nn.init.normal_(m.extra.upward.weight)
    torch.nn.init.normal_(m.extra.upward_.weight)
    heat = torch.randn(1, 5, 5, 10)
    u1r, u2r = m.neck_terms(heat, "reference")
    u1c, u2c = m.neck_terms(heat, "corrected")
    assert u1r.shape == (1, 8, 5, 5) and u2r.shape == (1, 4, 5, 5)
    assert torch.equal(u1c, u1r.transpose(2, 3)) and torch.equal(u2c, u2r.transpose(2, 3))
    assert not torch.equal(u1c, u1r)
    with pytest.raises(ValueError, match="orientation"):
        m.neck_terms(heat, "sideways")


def test_spec_round_trip():
    spec = AugModuleSpec(dim=768, layers=(7, 8), neck_channels=(768, 256))
    assert AugModuleSpec.from_dict(spec.to_dict()) == spec
