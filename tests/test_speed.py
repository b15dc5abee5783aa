"""Speed: the frozen-prefix cache changes nothing that is computed, --amp is guarded
and its code path runs, test-time batching equals per-image inference, the benchmark runs.

Routed batched inference equal to per-image inference at the model level is
tests/test_sam_backbone.py::test_routed_batch_equals_per_image; here the same
holds for the whole evaluation loop (evaluate_split at batch 4 vs batch 1).
"""
import importlib.util
import json
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from samcl import pipeline
from samcl.config import CONFIG_DIR, load_config
from samcl.data import SegmentationSplit
from samcl.demo import make_demo_data
from samcl.evaluation import evaluate_split, routed
from samcl.feature_cache import PrefixCache
from samcl.loading import make_loader
from samcl.model import ModuleBank
from samcl.learning_modules.augmodule import AugModuleSpec
from samcl.precision import amp_available, amp_forward, autocast, check_amp
from samcl.run_folder import load_module
from samcl.selector import ModuleSelector
from tests.conftest import REPO

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    make_demo_data(root, n_train=6, n_test=4)
    return root


def cfg_for(root, name, **kw):
    return load_config(CONFIG_DIR / "demo_sam.yaml", {
        "data_root": str(root), "output_dir": str(root / name), "order": "polyp_shadow", "unseen": [],
        "epoch": 3, "batch_size": 4, "num_embedding": 4, "val_every": 0, "selector_epochs": 2, **kw})


# ------------------------------------------------------------ feature cache
@pytest.mark.parametrize("budget", [None, 3 * 32 * 16 * 16 * 4 / 1024 ** 3])  # all images / 3 of 6 (mixed batches)
def test_prefix_cache_returns_exactly_the_computed_prefix(tiny_sam, budget):
    tiny_sam.train()
    images = torch.rand(6, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 255
    cache = PrefixCache("auto", CPU, 6, budget)
    gen = torch.Generator().manual_seed(1)
    for _epoch in range(3):
        cache.new_epoch()
        perm = torch.randperm(6, generator=gen)
        for idx in (perm[:4], perm[4:]):
            got = cache.prefix(tiny_sam, images[idx], idx)["tokens"]
            want = tiny_sam.encode_prefix(images[idx])["tokens"]
            assert torch.equal(got, want) and got.stride() == want.stride()  # same values, same layout
    s = cache.stats()
    assert s["images"] == (6 if budget is None else 3) and s["capacity"] == s["images"]
    assert s["hits"] == (12 if budget is None else 6) and s["bytes"] == s["images"] * 32 * 16 * 16 * 4


def test_prefix_cache_keeps_every_entry_of_a_sam2_prefix():
    """SAM 2's prefix has several entries (trunk stage outputs, channel-first views): each is kept exactly."""
    from samcl.backbones.sam2 import SAM2Backbone, build_sam2_model

    torch.manual_seed(0)
    bb = SAM2Backbone(build_sam2_model("hiera_toy")[0], "hiera_toy").train()
    images = torch.rand(3, 3, bb.img_size, bb.img_size, generator=torch.Generator().manual_seed(0)) * 255
    cache = PrefixCache("auto", CPU, 3)
    for idx in (torch.tensor([2, 0]), torch.tensor([1]), torch.tensor([0, 1, 2])):
        got = cache.prefix(bb, images[idx], idx)
        want = bb.encode_prefix(images[idx])
        assert got.keys() == want.keys() and len(got) > 1
        for k in want:
            assert torch.equal(got[k], want[k]) and got[k].stride() == want[k].stride(), k
    assert cache.stats()["hits"] == 3


def test_prefix_cache_off_and_random_prefix_compute_every_time(tiny_sam):
    images = torch.rand(2, 3, 128, 128) * 255
    idx = torch.tensor([0, 1])
    off = PrefixCache("off", CPU, 2)
    off.prefix(tiny_sam, images, idx)
    off.prefix(tiny_sam, images, idx)
    assert off.stats()["hits"] == 0 and off.stats()["bytes"] == 0

    class Noisy(nn.Module):  # a prefix with dropout: not the same twice in training mode
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def encode_prefix(self, x):
            return {"tokens": self.drop(x)}

    noisy = Noisy().train()
    cache = PrefixCache("auto", CPU, 2)
    cache.prefix(noisy, images, idx)
    cache.prefix(noisy, images, idx)
    assert not cache.enabled and "random" in cache.reason and cache.stats()["hits"] == 0
    with pytest.raises(ValueError, match="feature_cache must be one of"):
        PrefixCache("gpu", CPU, 2)


def test_training_with_and_without_the_cache_is_identical(data):
    """Same per-epoch losses, same trained modules, same buffer and metrics (fp32, CPU)."""
    runs = {}
    for mode in ("off", "auto"):
        cfg = cfg_for(data, f"cache_{mode}", feature_cache=mode, order="polyp")
        runs[mode] = (cfg, pipeline.train(cfg, CPU))
    (cfg_off, m_off), (cfg_on, m_on) = runs["off"], runs["auto"]
    for s_off, s_on in zip(m_off["steps"], m_on["steps"]):
        assert s_off["training"]["epoch_loss"] == s_on["training"]["epoch_loss"]
        assert s_off["evaluation"] == s_on["evaluation"]
    model = pipeline.build_model(cfg_off, CPU)
    for d in ("polyp",):
        a = load_module(cfg_off.resolved_run_dir() / f"{d}.safetensors", model.backbone).state_dict()
        b = load_module(cfg_on.resolved_run_dir() / f"{d}.safetensors", model.backbone).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from samcl.selector import EmbeddingBuffer

    buffers = [EmbeddingBuffer(4), EmbeddingBuffer(4)]
    for buf, cfg in zip(buffers, (cfg_off, cfg_on)):
        buf.load_part(cfg.resolved_run_dir() / "embedding_buffer" / "polyp.safetensors", "polyp")
    assert torch.equal(buffers[0].store["polyp"], buffers[1].store["polyp"])
    log = (cfg_on.resolved_run_dir() / "log.txt").read_text()
    assert "feature cache: 6 images" in log and "hit rate 66.7%" in log  # epochs 2 and 3 hit every image
    assert "feature cache" not in (cfg_off.resolved_run_dir() / "log.txt").read_text()


@pytest.mark.skipif(not amp_available(CPU), reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX): "
                                                  "--amp bf16 is refused here")
def test_a_whole_run_under_bf16_on_a_bfloat16_cpu_stays_close_to_fp32(data):
    """--amp bf16 end to end on the CPU: training, selector, routed test; the buffer (fp32 prefix)
    is the fp32 one exactly, losses and metrics move only a little."""
    runs = {amp: pipeline.train(cfg_for(data, f"amp_{amp}", amp=amp), CPU) for amp in ("off", "bf16")}
    steps = list(zip(runs["off"]["steps"], runs["bf16"]["steps"]))
    assert len(steps) == 2 and all(len(s32["evaluation"]) == 2 for s32, _ in steps)
    assert steps[0][0]["training"]["epoch_loss"] != steps[0][1]["training"]["epoch_loss"]  # bf16 did run
    for s32, s16 in steps:
        assert s16["training"]["epoch_loss"] == pytest.approx(s32["training"]["epoch_loss"], rel=1e-2)
        for d, ev in s32["evaluation"].items():
            assert ev["selector_counts"] == s16["evaluation"][d]["selector_counts"]
            assert s16["evaluation"][d]["metrics"]["iou"] == pytest.approx(ev["metrics"]["iou"], abs=0.05)
    from samcl.selector import EmbeddingBuffer

    stores = []
    for amp in ("off", "bf16"):
        buf = EmbeddingBuffer(4)
        run_dir = cfg_for(data, f"amp_{amp}", amp=amp).resolved_run_dir()
        buf.load_part(run_dir / "embedding_buffer" / "polyp.safetensors", "polyp")
        stores.append(buf.store["polyp"])
    assert torch.equal(*stores)


def test_speed_settings_are_validated_and_resumable():
    with pytest.raises(ValueError, match="feature_cache must be one of"):
        load_config(None, {"feature_cache": "ram"})
    with pytest.raises(ValueError, match="amp must be one of"):
        load_config(None, {"amp": "fp16"})
    with pytest.raises(ValueError, match="cache_budget_gb must be >= 0"):
        load_config(None, {"cache_budget_gb": -1.0})
    from samcl.continual import RESUMABLE_SETTINGS

    assert "feature_cache" in RESUMABLE_SETTINGS and "cache_budget_gb" in RESUMABLE_SETTINGS
    assert "amp" not in RESUMABLE_SETTINGS  # bf16 changes results: a run keeps its precision


# ------------------------------------------------------------ mixed precision
def test_amp_runs_on_a_bfloat16_cpu_and_is_refused_elsewhere_with_the_fix(monkeypatch):
    from samcl import precision

    check_amp("off", CPU)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="no native bfloat16.*slower than fp32; drop --amp"):
        check_amp("bf16", CPU)
    assert not precision.amp_available(CPU)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    check_amp("bf16", CPU)
    assert precision.amp_available(CPU)
    with pytest.raises(ValueError, match="amp must be one of"):
        check_amp("fp16", CPU)
    from samcl.cli import CLIError, config_from_args
    import argparse

    from samcl.cli import add_common_flags, add_train_flags

    p = argparse.ArgumentParser()
    add_common_flags(p)
    add_train_flags(p)
    args = p.parse_args(["--amp", "bf16", "--feature_cache", "off", "--cache_budget_gb", "2"])
    cfg = config_from_args(args)
    assert (cfg.amp, cfg.feature_cache, cfg.cache_budget_gb) == ("bf16", "off", 2.0)
    assert isinstance(CLIError("x"), SystemExit)


def test_amp_code_path_runs_under_bf16_autocast(tiny_sam):
    """The autocast path (exercised on the CPU here; the option itself is CUDA-only): the module's
    hooks, neck terms and decoder run under bf16, outputs come back float32 and close to fp32."""
    model = ModuleBank(tiny_sam, AugModuleSpec.for_backbone(tiny_sam))
    module = model.new_module()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05)
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 255
    points = torch.tensor([[[30.0, 40.0], [60.0, 70.0], [90.0, 20.0]]] * 2)
    labels = torch.ones(2, 3, dtype=torch.long)
    prefix = tiny_sam.encode_prefix(images)
    heat = model.heatmap(points, labels)

    def step(*args):
        return module.segment(tiny_sam, *args)

    ref_logits, ref_iou = step(prefix, images, heat, points, labels)
    assert amp_forward(step, "off", CPU) is step
    logits, iou = amp_forward(step, "bf16", CPU)(prefix, images, heat, points, labels)
    assert logits.dtype == iou.dtype == torch.float32
    assert (logits - ref_logits).abs().max() < 0.1 * ref_logits.abs().max() + 0.1
    logits.sum().backward()  # the backward runs outside autocast
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    with autocast("bf16", CPU):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16


# ------------------------------------------------------------ testing path
def test_batched_routed_evaluation_equals_per_image(data, tiny_sam):
    model = ModuleBank(tiny_sam, AugModuleSpec.for_backbone(tiny_sam))
    gen = torch.Generator().manual_seed(3)
    for d in ("polyp", "shadow"):
        m = model.new_module()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        model.add_domain(d, m.eval())
    model.add_domain("natural", None)
    model.selector = ModuleSelector(32, 3).eval()
    with torch.no_grad():
        model.selector.layer4.bias.copy_(torch.tensor([0.0, 0.5, 0.2]))
    ds = SegmentationSplit(data / "data/Polyp/test", 128, domain="polyp")
    results = [evaluate_split(model, make_loader(ds, bs, False, 0, 0, CPU), CPU, routed(model), with_vanilla=True)
               for bs in (4, 1)]
    batched, single = results
    assert batched["selector_counts"] == single["selector_counts"]
    for key in ("metrics", "vanilla"):
        for m in ("iou", "f1", "mae"):
            assert batched[key][m] == pytest.approx(single[key][m], abs=1e-6)


# ------------------------------------------------------------ benchmark
def test_bench_quick_runs_and_reports(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "speed.py"), "--quick", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train img/s" in proc.stdout and "test img/s" in proc.stdout and "target:" in proc.stdout
    result = json.loads(out.read_text())
    rows = {r["path"]: r for r in result["rows"]}
    assert set(rows) == {"reference", "ours"} | ({"ours_bf16"} if amp_available(CPU) else set())
    for r in rows.values():
        assert r["train_images_per_s"] > 0 and r["test_images_per_s"] > 0
        assert r["train_ratio"] > 0 and r["test_ratio"] > 0 and r["train_step_peak_bytes"] > 0
    assert result["loss_max_abs_diff"] == 0.0  # the cache changes no loss
    assert result["train"]["ours"]["cache"]["hit_rate"] > 0
    ref = result["test"]["reference"]
    assert set(ref["ms_per_image"]) == {"selector (encoder prefix + MLP)", "deepcopy of SAM", "module reload from disk",
                                        "CPU heatmap", "full forward + metrics"}
    assert 0 < sum(ref["ms_per_image"].values()) <= 1000 / ref["images_per_s"]  # parts of the timed batches
    assert "reference-style test, ms per image: selector" in proc.stdout


def load_bench():
    spec = importlib.util.spec_from_file_location("samcl_bench_speed", REPO / "bench" / "speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("granularity", ["pass", "batch"])
def test_bench_paths_take_turns_per_pass_or_per_batch(granularity):
    bench = load_bench()
    events = []

    def job(name):
        def run(turns):
            loader = bench.TurnLoader([1, 2, 3], turns, name, CPU)
            for _ in range(2):
                for item in loader:
                    events.append((name, item))
                    time.sleep(0.02)  # the other thread is queued by now
            return {"seconds": loader.seconds}
        return run

    res = bench.run_interleaved({"a": job("a"), "b": job("b")}, granularity)
    assert sorted(events) == sorted((n, i) for n in "ab" for i in (1, 2, 3) for _ in range(2))
    for r in res.values():  # one entry per pass, each its own 3 batches only
        assert len(r["seconds"]) == 2 and all(0.06 <= t < 1.0 for t in r["seconds"])
    names = [n for n, _ in events]
    switches = sum(x != y for x, y in zip(names, names[1:]))
    if granularity == "pass":  # every pass runs in one piece: 1, 2, 3 of one path
        assert [i for _, i in events] == [1, 2, 3] * 4 and switches == 3
    else:  # first come, first served, batch by batch
        assert switches == 11
    with pytest.raises(ValueError, match="granularity"):
        bench.Turns(2, "epoch")
