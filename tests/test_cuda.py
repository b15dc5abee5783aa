"""What only a GPU can check: bf16 autocast, pinned-memory loaders, a 1-process NCCL group under
torchrun, the feature cache's GPU budget and the attention paths on CUDA. Skipped without CUDA
(``pytest -m cuda`` runs them; ``bench/gpu_check.sh`` runs them first)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_backbone

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")]
CUDA = torch.device("cuda")


def demo_cfg(root: Path, **overrides):
    from samcl.config import CONFIG_DIR, load_config
    from samcl.demo import make_demo_data

    make_demo_data(root, n_train=6, n_test=2)
    settings = {"data_root": str(root), "run_dir": str(root / "run"), "epoch": 2, "num_embedding": 2,
                "batch_size": 2, "selector_epochs": 2, "val_every": 0, "order": "polyp_natural",
                "unseen": ["natural"], "num_workers": 2}
    settings.update(overrides)
    return load_config(CONFIG_DIR / "demo_sam.yaml", settings)


@pytest.mark.parametrize("path", ["chunked", "sdpa"])
def test_attention_paths_equal_stock_on_cuda(path):
    """A global ViT-B-sized attention (64 x 64 tokens, 12 heads): output and input gradient equal the
    stock path's in fp32; the chunked path keeps far less for the backward (sdpa does not: in fp32
    scaled_dot_product_attention takes its math kernel for the widened heads, measured on an H200)."""
    from segment_anything.modeling.image_encoder import Attention

    from samcl.backbones.attention import use_attention

    torch.manual_seed(0)
    attn = Attention(768, 12, use_rel_pos=True, input_size=(64, 64)).to(CUDA)
    for p in (attn.rel_pos_h, attn.rel_pos_w):
        p.data.normal_(0, 0.02)
    x0 = torch.randn(1, 64, 64, 768, device=CUDA)
    results = {}
    for name in ("stock", path):
        use_attention(attn, name)
        x = x0.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = attn(x)
        kept = torch.cuda.memory_allocated() - base
        out.square().sum().backward()
        results[name] = (out.detach(), x.grad, kept)
    (ref, ref_grad, ref_kept), (out, grad, kept) = results["stock"], results[path]
    assert (out - ref).abs().max() <= 1e-4
    assert (grad - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max()
    if path == "chunked":
        assert kept < ref_kept / 4, (kept, ref_kept)


def test_bf16_attention_close_on_cuda():
    from segment_anything.modeling.image_encoder import Attention

    from samcl.backbones.attention import use_attention

    torch.manual_seed(0)
    attn = Attention(768, 12, use_rel_pos=True, input_size=(64, 64)).to(CUDA)
    x = torch.randn(2, 64, 64, 768, device=CUDA)
    ref = attn(x)
    for path in ("chunked", "sdpa"):
        use_attention(attn, path)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = attn(x)
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max(), path


def test_bf16_training_run_on_cuda(tmp_path):
    """A whole demo run (train, selector, test) under bf16 autocast on the GPU: finite losses and metrics."""
    from samcl import pipeline

    cfg = demo_cfg(tmp_path, amp="bf16")
    pipeline.train(cfg, CUDA)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "NaN" not in text and "Infinity" not in text
    assert (tmp_path / "run" / "run.json").is_file()


def test_loader_pins_memory_on_cuda(tmp_path):
    from samcl.data import SegmentationSplit, read_domain_map
    from samcl.loading import make_loader

    cfg = demo_cfg(tmp_path)
    split = SegmentationSplit(read_domain_map(Path(cfg.train_json), Path(cfg.data_root))["polyp"], 128)
    loader = make_loader(split, batch_size=2, shuffle=False, seed=0, num_workers=1, device=CUDA)
    batch = next(iter(loader))
    assert batch["image"].is_pinned() and batch["mask"].is_pinned()


def test_feature_cache_moves_to_the_gpu_within_its_budget():
    from samcl.feature_cache import PrefixCache

    backbone = tiny_backbone("sam").to(CUDA)
    images = torch.rand(4, 3, backbone.img_size, backbone.img_size, device=CUDA) * 255
    cache = PrefixCache("auto", CUDA, n_items=4)  # "cuda" without an index, as --device cuda gives it
    cache.new_epoch()
    first = cache.prefix(backbone, images, torch.arange(4))
    assert cache.location == "host (pinned)"
    cache.new_epoch()  # the second epoch: promoted beside the measured step peak
    assert cache.location == "cuda:0"
    again = cache.prefix(backbone, images, torch.arange(4))
    for k in first:
        assert torch.equal(first[k], again[k])
    small = PrefixCache("device", CUDA, n_items=4, budget_gb=cache.item_bytes * 2 / 1024 ** 3)
    small.new_epoch()
    small.prefix(backbone, images, torch.arange(4))
    assert small.used == 2 and small.bytes_held() <= cache.item_bytes * 2


def test_one_process_nccl_group_under_torchrun(tmp_path):
    """train.py under torchrun with one process on the GPU: an NCCL group, a whole run."""
    cfg = demo_cfg(tmp_path, epoch=1)
    probe = ("import torch.distributed as d; from samcl import distributed; dev = distributed.init(); "
             "print('backend', d.get_backend(), dev); d.destroy_process_group()")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run(torchrun + ["--no-python", sys.executable, "-c", probe],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "backend nccl cuda:0" in r.stdout, r.stderr[-3000:]
    r = subprocess.run(torchrun + ["train.py", "--order", "polyp_natural", "--unseen", "natural", "--device", "cuda",
                                   "--epoch", "1", "--vit_name", "vit_tiny", "--random_weights", "--batch_size", "2",
                                   "--data_root", cfg.data_root, "--run_dir", str(tmp_path / "ddp")],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ddp" / "metrics.json").is_file()
