"""Module Selector and embedding buffer (quirk Q7)."""
import math

import pytest
import torch

from samcl.selector import EmbeddingBuffer, ModuleSelector, train_selector


def test_architecture_matches_spec():
    s = ModuleSelector(768, 6)
    shapes = {k: tuple(v.shape) for k, v in s.state_dict().items() if k.endswith("weight")}
    assert shapes == {"layer1.weight": (768, 768), "norm1.weight": (768,), "layer2.weight": (192, 768),
                      "norm2.weight": (192,), "layer3.weight": (192, 192), "norm3.weight": (192,),
                      "layer4.weight": (6, 192)}
    assert "norm1.running_mean" in s.state_dict()


def test_grow_keeps_old_outputs_bit_for_bit():
    torch.manual_seed(0)
    s = ModuleSelector(16, 2).eval()
    x = torch.randn(5, 16)
    before = s(x)
    old_w = s.layer4.weight.clone()
    s.grow(3)
    assert s.num_domains == 3 and torch.equal(s.layer4.weight[:2], old_w)
    assert torch.allclose(s(x)[:, :2], before)
    with pytest.raises(ValueError, match="shrink"):
        s.grow(2)


def clusters(k, n=30, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    x = torch.cat([centres[i] + torch.randn(n, d, generator=g) for i in range(k)])
    return x, torch.arange(k).repeat_interleave(n)


def test_training_routes_only_to_existing_domains_and_learns_them():
    torch.manual_seed(0)
    x, y = clusters(3)
    s = ModuleSelector(16, 2)
    train_selector(s, x[y < 2], y[y < 2], epochs=25, generator=torch.Generator().manual_seed(0))
    assert int(s.route(x).max()) <= 1  # never a domain that does not exist yet
    s.grow(3)
    history = train_selector(s, x, y, epochs=25, generator=torch.Generator().manual_seed(0))
    assert history[-1] < history[0]
    assert (s.route(x) == y).float().mean() == 1.0
    assert not s.training


def test_small_buffer_is_one_batch_and_single_sample_is_skipped():
    x, y = clusters(2, n=5)
    s = ModuleSelector(16, 2)
    assert len(train_selector(s, x, y, epochs=3, batch_size=24)) == 3  # 10 < 24: one batch of all
    before = {k: v.clone() for k, v in s.state_dict().items()}
    assert math.isnan(train_selector(s, x[:1], y[:1], epochs=1)[0])  # BatchNorm cannot train on one sample
    assert all(torch.equal(before[k], v) for k, v in s.state_dict().items())


def test_buffer_capacity_labels_and_round_trip(tmp_path):
    b = EmbeddingBuffer(4)
    b.add("Kvasir", torch.randn(3, 8))
    b.add("Kvasir", torch.randn(3, 8))
    b.add("COCO", torch.randn(2, 8))
    assert b.store["Kvasir"].shape == (4, 8) and b.missing("Kvasir") == 0 and b.missing("COCO") == 2
    x, y = b.dataset(["Kvasir", "camo", "COCO"])
    assert x.shape == (6, 8) and y.tolist() == [0, 0, 0, 0, 2, 2]
    for suffix in (".safetensors", ".pth"):  # run folders, and those written before safetensors
        for d in b.domains:
            b.save_part(tmp_path / f"{d}{suffix}", d)
        c = EmbeddingBuffer(4)
        for d in b.domains:
            c.load_part(tmp_path / f"{d}{suffix}", d)
        assert c.domains == ["Kvasir", "COCO"]
        assert all(torch.equal(c.store[k], b.store[k]) for k in b.store)
        with pytest.raises(ValueError, match="not the embedding buffer of COCO"):
            c.load_part(tmp_path / f"Kvasir{suffix}", "COCO")
    assert b.size_bytes() == 6 * 8 * 4
