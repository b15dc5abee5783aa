"""The memory-efficient attention paths against segment_anything's own Attention: forward and
backward, windowed and global blocks, extra key/value tokens, several chunks, autocast."""
import json

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from samcl.backbones import attention as attention_module
from samcl.backbones.attention import (ChunkedRelPosAttention, MemoryEfficientAttention, prefixed_sam_attention,
                                       use_attention)
from samcl.backbones.sam import SAMBackbone, build_sam


def random_rel_pos(model: torch.nn.Module, seed: int = 0) -> None:
    """SAM builds its relative positions at zero; random ones make the bias count in the comparison."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "rel_pos" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(0)
    sam, _ = build_sam("vit_tiny")
    random_rel_pos(sam)
    return sam


def block_io(sam, index: int, path: str, x: torch.Tensor):
    """Output of encoder block ``index`` on x and the gradients of x and of its qkv weight."""
    use_attention(sam.image_encoder, path)
    blk = sam.image_encoder.blocks[index]
    blk.attn.qkv.weight.requires_grad_(True)
    blk.attn.qkv.weight.grad = None
    x = x.clone().requires_grad_(True)
    out = blk(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = (x.grad, blk.attn.qkv.weight.grad.clone())
    blk.attn.qkv.weight.requires_grad_(False)
    return out.detach(), grads


@pytest.mark.parametrize("path", ["chunked", "sdpa"])
@pytest.mark.parametrize("index", [0, 2])  # windowed (7 x 7 windows of a padded 16 x 16 grid), global
def test_block_equals_stock(tiny_sam, path, index, monkeypatch):
    # a few hundred score elements per chunk: several head groups and row blocks, the last ones partial
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", {"cpu": 700, "cuda": 700})
    monkeypatch.setattr(attention_module, "ROW_ELEMENTS", 300)
    x = torch.randn(2, 16, 16, 32, generator=torch.Generator().manual_seed(1))
    ref, (ref_dx, ref_dw) = block_io(tiny_sam, index, "stock", x)
    out, (dx, dw) = block_io(tiny_sam, index, path, x)
    assert type(tiny_sam.image_encoder.blocks[index].attn) is MemoryEfficientAttention
    assert (out - ref).abs().max() <= 1e-5
    assert (dx - ref_dx).abs().max() <= 1e-5 * ref_dx.abs().max()
    assert (dw - ref_dw).abs().max() <= 1e-5 * ref_dw.abs().max()
    use_attention(tiny_sam.image_encoder, "stock")
    assert type(tiny_sam.image_encoder.blocks[index].attn) is Attention


def test_chunks_cover_every_row_and_head(monkeypatch):
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", {"cpu": 1000, "cuda": 1000})
    monkeypatch.setattr(attention_module, "ROW_ELEMENTS", 600)
    seen = torch.zeros(5, 70, dtype=torch.int64)
    for b, r in attention_module._blocks(5, 70, 30, torch.device("cpu")):
        seen[b, r] += 1
        assert r.start % 20 == 0 and (b.stop - b.start) * (r.stop - r.start) * 30 <= 1000
    assert bool((seen == 1).all())


def test_an_image_does_not_depend_on_its_batch(tiny_sam, monkeypatch):
    """Blocks of a fixed row count: one image alone and the same image in a batch of three give equal bits."""
    monkeypatch.setattr(attention_module, "ROW_ELEMENTS", 2000)
    use_attention(tiny_sam.image_encoder, "chunked")
    x = torch.randn(3, 16, 16, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        together = tiny_sam.image_encoder.blocks[2](x)
        alone = tiny_sam.image_encoder.blocks[2](x[1:2])
    use_attention(tiny_sam.image_encoder, "stock")
    assert torch.equal(together[1:2], alone)


def test_prefix_tokens_and_bias_gradients(tiny_sam):
    """Extra key/value tokens get no bias; the gradient reaches them and the relative positions."""
    attn = tiny_sam.image_encoder.blocks[2].attn
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 16, 32, generator=g)
    key0, value0 = torch.randn(1, 3, 32, generator=g), torch.randn(1, 3, 32, generator=g)
    results = {}
    for path in ("stock", "chunked", "sdpa"):
        use_attention(tiny_sam.image_encoder, path)
        key, value = key0.clone().requires_grad_(True), value0.clone().requires_grad_(True)
        attn.rel_pos_h.requires_grad_(True)
        attn.rel_pos_h.grad = None
        out = prefixed_sam_attention(attn, x, key, value)
        (out ** 2).sum().backward()
        results[path] = (out.detach(), key.grad, value.grad, attn.rel_pos_h.grad.clone())
        attn.rel_pos_h.requires_grad_(False)
    use_attention(tiny_sam.image_encoder, "stock")
    for path in ("chunked", "sdpa"):
        for got, want in zip(results[path], results["stock"]):
            assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_function_by_hand():
    """One head, 2 x 2 keys: softmax(s q k^T + rel_h[kh] + rel_w[kw]) v written out."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 2, generator=g, dtype=torch.float64) for _ in range(3))
    rel_h, rel_w = torch.randn(1, 4, 2, generator=g, dtype=torch.float64), torch.randn(1, 4, 2, generator=g,
                                                                                     dtype=torch.float64)
    out = ChunkedRelPosAttention.apply(q, k, v, rel_h, rel_w, 0.5)
    want = torch.zeros(4, 2, dtype=torch.float64)
    for i in range(4):
        scores = [0.5 * float(q[0, i] @ k[0, j]) + float(rel_h[0, i, j // 2]) + float(rel_w[0, i, j % 2])
                  for j in range(4)]
        weights = torch.tensor(scores, dtype=torch.float64).softmax(0)
        want[i] = (weights[:, None] * v[0]).sum(0)
    assert torch.allclose(out[0], want, atol=1e-12)
    inputs = tuple(t.clone().requires_grad_(True) for t in (q, k, v, rel_h, rel_w))
    assert torch.autograd.gradcheck(lambda *t: ChunkedRelPosAttention.apply(*t, 0.5), inputs)


def test_bf16_autocast_close(tiny_sam):
    x = torch.randn(1, 16, 16, 32, generator=torch.Generator().manual_seed(4))
    use_attention(tiny_sam.image_encoder, "stock")
    ref = tiny_sam.image_encoder.blocks[2](x)
    use_attention(tiny_sam.image_encoder, "chunked")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_sam.image_encoder.blocks[2](x)
    use_attention(tiny_sam.image_encoder, "stock")
    assert out.dtype == torch.float32  # the block's residual keeps fp32
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_backbone_setting_and_replace_hooks(tiny_sam):
    """The backbone applies its path; a learning module's "replace" hook, removed, leaves that path."""
    backbone = SAMBackbone(tiny_sam, "vit_tiny", attention="chunked")
    attn = backbone.attention(2)
    assert isinstance(attn, MemoryEfficientAttention) and attn.path == "chunked"
    assert {p.attention for p in backbone.block_plans(128)} == {"chunked"}
    assert {p.attention for p in SAMBackbone(tiny_sam, "vit_tiny", attention="sdpa").block_plans(128)} == {
        "sdpa_rel_pos"}
    attn.forward = lambda x: x
    del attn.forward
    assert type(attn).forward is MemoryEfficientAttention.forward
    assert all(not isinstance(m, MemoryEfficientAttention) for m in tiny_sam.mask_decoder.modules())
    SAMBackbone(tiny_sam, "vit_tiny", attention="stock")
    assert type(backbone.attention(2)) is Attention
    with pytest.raises(ValueError, match="unknown attention path 'flash'"):
        SAMBackbone(tiny_sam, "vit_tiny", attention="flash")


def test_a_run_with_the_default_attention_stays_within_tolerance_of_stock(tmp_path):
    """A whole tiny SAMCL run (train, selector, test) with the stock and the default attention: the same
    routing, accuracy matrices within 1e-4, module weights within 1e-4."""
    from samcl import pipeline
    from samcl.config import CONFIG_DIR, load_config
    from samcl.demo import make_demo_data
    from samcl.io import read_tagged

    make_demo_data(tmp_path, n_train=4, n_test=2)
    runs = {}
    for path in ("stock", "chunked"):
        cfg = load_config(CONFIG_DIR / "demo_sam.yaml", {
            "data_root": str(tmp_path), "run_dir": str(tmp_path / path), "epoch": 1, "num_embedding": 2,
            "batch_size": 2, "selector_epochs": 2, "val_every": 0, "order": "polyp_natural", "unseen": ["natural"],
            "num_workers": 0, "attention": path})
        pipeline.train(cfg, torch.device("cpu"))
        runs[path] = json.loads((tmp_path / path / "metrics.json").read_text())
    for row_a, row_b in zip(runs["stock"]["accuracy_matrix"]["matrix"]["iou"],
                            runs["chunked"]["accuracy_matrix"]["matrix"]["iou"]):
        for a, b in zip(row_a, row_b):
            assert (a is None and b is None) or abs(a - b) <= 1e-4
    files = sorted(p.relative_to(tmp_path / "stock") for p in (tmp_path / "stock").glob("*.safetensors"))
    assert files
    for f in files:
        a, b = (read_tagged(tmp_path / p / f, "weights")["state_dict"] for p in ("stock", "chunked"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-4, rtol=0), (f, k, float((a[k] - b[k]).abs().max()))
