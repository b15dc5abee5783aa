"""The rehearsal baselines: the reservoir buffer (algorithm R), experience replay's batches, DER++'s
stored logits and loss, the buffer file, and er / der end to end on SAM and SAM 2 (one under torchrun)."""
import copy
import json
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from samcl import pipeline
from samcl.config import CONFIG_DIR, load_config
from samcl.data import SegmentationSplit, collate, read_domain_map
from samcl.demo import make_demo_data
from samcl.loading import Batch, to_device
from samcl.losses import training_loss
from samcl.precision import amp_available, amp_forward
from samcl.registry import METHODS
from samcl.replay import ReservoirBuffer, encode_png
from samcl.run_folder import RunFolderError
from samcl.training_step import SegmentStep
from tests.conftest import REPO

CPU = torch.device("cpu")


def toy_batch(first: int, n: int, points: int = 2, side: int = 2) -> Batch:
    """n samples named str(first..first+n-1); sample k's image is filled with k % 256."""
    ks = torch.arange(first, first + n)
    return Batch(images=(ks % 256).float().view(n, 1, 1, 1).expand(n, 3, side, side).clone(),
                 masks=(ks % 2).float().view(n, 1, 1, 1).expand(n, 1, side, side).clone(),
                 points=ks.float().view(n, 1, 1).expand(n, points, 2).clone(),
                 labels=torch.ones(n, points, dtype=torch.long), names=[str(int(k)) for k in ks])


# ---------------------------------------------------------------------------------- the reservoir
def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    """Capacity 10, 100 samples, 2000 seeds: each sample is kept with probability 10/100. A count is
    Binomial(2000, 0.1) (mean 200, sd 13.4): allowed 200 +- 80 (6 sd; the seeds are fixed anyway)."""
    stream = toy_batch(0, 100, points=1, side=1)
    counts = torch.zeros(100, dtype=torch.long)
    for seed in range(2000):
        buf = ReservoirBuffer(10, seed)
        for start in range(0, 100, 10):
            buf.add(Batch(stream.images[start:start + 10], stream.masks[start:start + 10],
                          stream.points[start:start + 10], stream.labels[start:start + 10],
                          stream.names[start:start + 10]), "d")
        assert len(buf) == 10 and buf.seen == 100
        counts[[int(s.name) for s in buf.samples]] += 1
    assert counts.sum() == 20000
    assert (counts - 200).abs().max() < 80, counts.tolist()
    # the first ten are not favoured over the last ten (each group's sum is Binomial(20000, 0.1): sd 42)
    assert abs(int(counts[:10].sum()) - int(counts[-10:].sum())) < 6 * 42 * 2 ** 0.5


def test_reservoir_follows_algorithm_r_draw_by_draw():
    """Capacity 3, 8 samples, seed 5: the slots of an independent literal algorithm R on the same generator."""
    buf = ReservoirBuffer(3, 5)
    stored = buf.add(toy_batch(0, 8), "d")
    g = torch.Generator().manual_seed(5)
    expected, kept = ["0", "1", "2"], 3
    for n in range(3, 8):  # sample n, n samples seen before it
        j = int(torch.randint(0, n + 1, (1,), generator=g))
        if j < 3:
            expected[j], kept = str(n), kept + 1
    assert [s.name for s in buf.samples] == expected and buf.seen == 8 and stored == kept
    assert 3 < kept < 8  # this seed both replaces and drops
    assert torch.equal(buf.generator.get_state(), g.get_state())


def test_reservoir_keeps_the_first_capacity_samples_in_order():
    buf = ReservoirBuffer(5, 0)
    untouched = buf.generator.get_state()
    for first, n in ((0, 2), (2, 2), (4, 1)):
        assert buf.add(toy_batch(first, n), "a" if first < 2 else "b") == n
    assert [s.name for s in buf.samples] == ["0", "1", "2", "3", "4"]
    assert [s.domain for s in buf.samples] == ["a", "a", "b", "b", "b"]
    assert torch.equal(buf.generator.get_state(), untouched)  # no draw while filling
    assert buf.samples[3].image.dtype == torch.uint8 and buf.samples[3].image[0, 0, 0] == 3
    assert buf.samples[3].mask.dtype == torch.uint8 and buf.samples[3].mask.sum() == 4
    buf.add(toy_batch(5, 1), "b")
    assert buf.seen == 6 and len(buf) == 5 and not torch.equal(buf.generator.get_state(), untouched)


def test_a_draw_is_without_replacement_and_pads_point_sets():
    buf = ReservoirBuffer(4, 0)
    buf.add(toy_batch(0, 2, points=1), "a", logits=torch.full((2, 1, 3, 3), 0.5, dtype=torch.bfloat16))
    buf.add(toy_batch(2, 2, points=3), "b", logits=torch.arange(18.0).view(2, 1, 3, 3))
    draw = buf.sample(10, CPU)  # more than it holds: all of them, once each
    assert sorted(draw.slots.tolist()) == [0, 1, 2, 3] and buf.draws == 1
    names = [str(int(s)) for s in draw.slots]
    assert draw.batch.names == names and draw.domains == ["a" if s < 2 else "b" for s in draw.slots.tolist()]
    assert draw.batch.points.shape == (4, 3, 2) and draw.batch.images.dtype == torch.float32
    for row, s in enumerate(draw.slots.tolist()):
        assert draw.batch.images[row, 0, 0, 0] == s and draw.batch.masks[row, 0, 0, 0] == s % 2
        assert draw.batch.labels[row].tolist() == ([1, -1, -1] if s < 2 else [1, 1, 1])
        assert draw.logits.dtype == torch.float32
        stored = torch.full((1, 3, 3), 0.5) if s < 2 else torch.arange(18.0).view(2, 1, 3, 3)[s - 2]
        assert torch.equal(draw.logits[row], stored)
    two = buf.sample(2, CPU)
    assert len(two.batch.names) == 2 and len(set(two.slots.tolist())) == 2 and buf.draws == 2
    assert ReservoirBuffer(4, 0).sample(3, CPU) is None


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_buffer_file_round_trips(tmp_path, suffix):
    buf = ReservoirBuffer(3, 7)
    buf.add(toy_batch(0, 2, points=1), "a", logits=torch.randn(2, 1, 4, 4))
    buf.add(toy_batch(2, 4, points=2), "b", logits=torch.randn(4, 1, 4, 4))
    buf.sample(2, CPU)
    path = tmp_path / f"after_b{suffix}"
    buf.save(path)
    back = ReservoirBuffer.load(path)
    assert (back.capacity, back.seed, back.seen, back.draws) == (3, 7, 6, 1)
    assert torch.equal(back.generator.get_state(), buf.generator.get_state())
    assert back.fingerprint() == buf.fingerprint() and back.size_bytes() == buf.size_bytes()
    for a, b in zip(buf.samples, back.samples):
        assert (a.name, a.domain) == (b.name, b.domain)
        for x, y in ((a.image, b.image), (a.mask, b.mask), (a.points, b.points), (a.labels, b.labels),
                     (a.logits, b.logits)):
            assert x.dtype == y.dtype and torch.equal(x, y)
    # and it goes on as the original: the same insertions and the same draws
    for x in (buf, back):
        x.add(toy_batch(6, 5), "c")
    assert back.fingerprint() == buf.fingerprint()
    assert torch.equal(buf.sample(2, CPU).slots, back.sample(2, CPU).slots)
    empty = tmp_path / f"empty{suffix}"
    ReservoirBuffer(3, 7).save(empty)
    assert len(ReservoirBuffer.load(empty)) == 0
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes()[:100] if suffix == ".safetensors" else b"x" * 100)
    with pytest.raises(RunFolderError, match="bad.safetensors"):
        ReservoirBuffer.load(tmp_path / "bad.safetensors")


def test_buffer_size_in_bytes():
    buf = ReservoirBuffer(8, 0)
    buf.add(toy_batch(0, 3, points=2, side=4), "a", logits=torch.zeros(3, 1, 2, 2))
    # per sample: the image's and the mask's PNG, points 2*2 float32, labels 2 int64, logits 4 float32
    pngs = sum(len(encode_png(t)) for b in [toy_batch(0, 3, side=4)] for t in [*b.images, *b.masks])
    assert buf.size_bytes() == pngs + 3 * (16 + 16 + 16)


def demo_batch(data, domain="polyp", size=128):
    split = SegmentationSplit(read_domain_map(data / "datasets_train.json", data)[domain], size)
    return to_device(collate([split[i] for i in range(len(split))]), CPU)


def test_replayed_samples_equal_the_batch_rows_bit_for_bit_and_cost_their_png_bytes(data, tmp_path):
    """The buffer keeps PNGs, the draw decodes them: equal to the raw uint8 rows the buffer kept
    before (the batch's own values), images float 0..255 and masks float {0, 1}, also after the file."""
    batch = demo_batch(data)
    buf = ReservoirBuffer(len(batch.names), 3)
    buf.add(batch, "polyp")
    raw = sum(t.numel() for t in (*batch.images, *batch.masks))  # what raw uint8 took
    assert buf.size_bytes() < raw
    buf.save(tmp_path / "b.safetensors")
    for b in (buf, ReservoirBuffer.load(tmp_path / "b.safetensors")):
        draw = b.sample(len(batch.names), CPU)
        rows = [batch.names.index(n) for n in draw.batch.names]
        assert draw.batch.images.dtype == torch.float32 and torch.equal(draw.batch.images, batch.images[rows])
        assert draw.batch.masks.dtype == torch.float32 and torch.equal(draw.batch.masks, batch.masks[rows])


def test_a_buffer_file_of_raw_samples_loads_into_the_same_draws(data, tmp_path):
    """A file written before PNGs (stacked uint8 images and masks, version 1) replays the same tensors."""
    batch = demo_batch(data)
    buf = ReservoirBuffer(3, 5)
    buf.add(batch, "polyp")
    state = buf.state_dict()
    for k in ("images", "masks", "image_ends", "mask_ends", "budget"):
        state.pop(k)
    state.update(images=torch.stack([s.image for s in buf.samples]), masks=torch.stack([s.mask for s in buf.samples]))
    old = ReservoirBuffer(3, 5)
    old.load_state_dict(state)
    assert old.fingerprint() == buf.fingerprint()


def test_a_byte_budget_fixes_the_capacity_when_first_reached_then_algorithm_r():
    one = ReservoirBuffer(100, 0)
    one.add(toy_batch(0, 1, side=4), "a")
    per = one.size_bytes()  # equal-size samples: toy images of one value
    budget = ReservoirBuffer(None, 9, budget=3 * per + per // 2)
    counted = ReservoirBuffer(3, 9)
    for first in range(0, 40, 4):
        assert budget.add(toy_batch(first, 4, side=4), "a") == counted.add(toy_batch(first, 4, side=4), "a")
    assert budget.capacity == 3 and budget.seen == 40 and budget.size_bytes() <= 3 * per + per // 2
    assert [s.name for s in budget.samples] == [s.name for s in counted.samples]
    assert torch.equal(budget.generator.get_state(), counted.generator.get_state())
    tiny = ReservoirBuffer(None, 0, budget=1)  # one sample outweighs it: nothing is kept
    assert tiny.add(toy_batch(0, 3, side=4), "a") == 0 and len(tiny) == 0 and tiny.capacity == 0
    with pytest.raises(ValueError, match="budget must be positive"):
        ReservoirBuffer(None, 0, budget=0)


# ---------------------------------------------------------------------------------- the methods
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay_data")
    make_demo_data(root, n_train=4, n_test=2)
    return root


def cfg_for(data, run_dir, method, config="demo_sam.yaml", **kw):
    return load_config(CONFIG_DIR / config, {
        "data_root": str(data), "run_dir": str(run_dir), "method": method, "epoch": 2, "num_embedding": 3,
        "batch_size": 2, "val_every": 0, "num_workers": 0, "order": "polyp_shadow", "unseen": [],
        "replay_size": 3, **kw})


def batches(data, domain, img_size, n):
    split = SegmentationSplit(read_domain_map(data / "datasets_train.json", data)[domain], img_size, domain=domain)
    return to_device(collate([split[i] for i in range(n)]), CPU)


def method_for(cfg, tmp_path):
    model = pipeline.build_model(cfg, CPU)
    method = METHODS.get(cfg.method)(cfg, model, CPU, None, tmp_path)
    module = method.begin_domain(0, "polyp", True)
    return method, module, SegmentStep(model.backbone, module)


def run(method, step, prefix, b, low_res=False):
    """The training forward of batch ``b`` (with its heatmap where the module needs one)."""
    heat = method.model.heatmap(b.points, b.labels) if method.model.needs_heatmap else None
    return step(prefix, heat, b.points, b.labels, b.images, low_res=low_res)


class Recording(torch.nn.Module):
    """The training forward, recording what it was called with."""

    def __init__(self, step):
        super().__init__()
        self.step, self.calls = step, []

    def forward(self, prefix, heat, points, labels, images, boxes=None, low_res=False):
        self.calls.append({"prefix": prefix, "points": points, "labels": labels, "images": images})
        return self.step(prefix, heat, points, labels, images, boxes, low_res=low_res)


def test_experience_replay_batch_is_current_rows_then_replayed_rows(data, tmp_path):
    cfg = cfg_for(data, tmp_path, "er", learning_module="lora")
    er, module, step = method_for(cfg, tmp_path)
    backbone = er.model.backbone
    polyp, shadow = batches(data, "polyp", backbone.img_size, 2), batches(data, "shadow", backbone.img_size, 4)
    forward = Recording(step)

    er.observe(polyp, backbone.encode_prefix(polyp.images), forward)  # empty buffer: the batch alone
    assert forward.calls[-1]["images"].shape[0] == 2 and len(er.replay) == 2
    assert [s.name for s in er.replay.samples] == polyp.names and er.replay.samples[0].domain == "polyp"

    er.domain = "shadow"
    half = Batch(shadow.images[:2], shadow.masks[:2], shadow.points[:2], shadow.labels[:2], shadow.names[:2])
    expected = copy.deepcopy(er.replay).sample(2, CPU)  # the draw observe will make
    joined, _, replayed = copy.deepcopy(er).compose(half, backbone.encode_prefix(half.images))
    assert joined.names == half.names + [polyp.names[int(s)] for s in expected.slots]
    assert replayed.domains == ["polyp", "polyp"] and torch.equal(replayed.slots, expected.slots)
    loss = er.observe(half, backbone.encode_prefix(half.images), forward)
    call = forward.calls[-1]
    assert call["images"].shape[0] == 4  # N current + N replayed
    assert torch.equal(call["images"][:2], half.images) and torch.equal(call["images"][2:], expected.batch.images)
    assert torch.equal(call["points"][2:], expected.batch.points)
    replay_prefix = backbone.encode_prefix(expected.batch.images)
    assert all(torch.equal(call["prefix"][k][2:], v) for k, v in replay_prefix.items())
    loss.backward()
    assert len(er.replay) == 3 and er.replay.seen == 4  # the current batch went in after its loss

    # a batch larger than the buffer: all three stored samples join it
    er.observe(shadow, backbone.encode_prefix(shadow.images), forward)
    assert forward.calls[-1]["images"].shape[0] == 4 + 3
    assert er.replay.seen == 8


def test_low_res_logits_upsampled_equal_the_full_size_forward(data, tmp_path):
    for config in ("demo_sam.yaml", "demo_sam2.yaml"):
        cfg = cfg_for(data, tmp_path, "der", config=config, learning_module="lora")
        der, module, step = method_for(cfg, tmp_path)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # not the frozen model
        b = batches(data, "polyp", der.model.backbone.img_size, 2)
        prefix = der.model.backbone.encode_prefix(b.images)
        for amp in ("off", "bf16") if amp_available(CPU) else ("off",):
            forward = amp_forward(step, amp, CPU)  # as the protocol runs it with --amp
            full, iou = run(der, forward, prefix, b)
            low, iou_low = run(der, forward, prefix, b, low_res=True)
            g = der.model.backbone.grid_size
            assert low.shape == (2, 1, 4 * g, 4 * g) and full.shape[-1] == der.model.backbone.img_size
            assert low.dtype == full.dtype == torch.float32
            assert torch.equal(der.model.backbone.upsample_logits(low), full), (config, amp)
            assert torch.equal(iou, iou_low)


def test_der_stores_the_logits_of_the_step_that_stored_the_sample_and_its_loss_is_the_composition(data, tmp_path):
    alpha, beta = 0.3, 0.7
    cfg = cfg_for(data, tmp_path, "der", der_alpha=alpha, der_beta=beta, replay_size=4)
    der, module, step = method_for(cfg, tmp_path)
    backbone = der.model.backbone
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    polyp, shadow = batches(data, "polyp", backbone.img_size, 2), batches(data, "shadow", backbone.img_size, 2)
    for k, b in enumerate((polyp, shadow)):
        der.domain = ["polyp", "shadow"][k]
        then = copy.deepcopy(module)  # the module as it is when b is stored
        prefix = backbone.encode_prefix(b.images)
        loss = der.observe(b, prefix, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            low_then, _ = run(der, SegmentStep(backbone, then), prefix, b, low_res=True)
            low_now, _ = run(der, step, prefix, b, low_res=True)
        stored = torch.stack([s.logits for s in der.replay.samples[2 * k: 2 * k + 2]])
        assert [s.name for s in der.replay.samples[2 * k:]] == b.names
        assert stored.dtype == torch.float32 and torch.equal(stored, low_then)
        assert (stored - low_now).abs().max() > 1e-4  # the module moved on: these are the old logits

    # the loss of the next batch, composed by hand from the two draws observe will make
    current = batches(data, "shadow", backbone.img_size, 4)
    current = Batch(current.images[2:], current.masks[2:], current.points[2:], current.labels[2:], current.names[2:])
    prefix = backbone.encode_prefix(current.images)
    probe = copy.deepcopy(der.replay)
    first, second = probe.sample(2, CPU), probe.sample(2, CPU)
    assert {d for d in first.domains + second.domains} <= {"polyp", "shadow"}
    with torch.no_grad():
        logits, iou = run(der, step, prefix, current)
        hand = training_loss(cfg.loss, logits, iou, current.masks, cfg.iou_target, cfg.focal)
        past, _ = run(der, step, backbone.encode_prefix(first.batch.images), first.batch, low_res=True)
        mse = sum(F.mse_loss(past[i], first.logits[i]) for i in range(2))
        logits2, iou2 = run(der, step, backbone.encode_prefix(second.batch.images), second.batch)
        replayed = training_loss(cfg.loss, logits2, iou2, second.batch.masks, cfg.iou_target, cfg.focal)
        der.take_terms()
        loss = der.observe(current, prefix, step)
    assert mse > 0 and replayed > 0
    assert loss.item() == pytest.approx((hand + alpha * mse + beta * replayed).item(), rel=1e-6)
    terms = der.take_terms()  # each term by its name, weighted as it enters the loss
    assert list(terms) == ["task", "der_logits", "der_labels"]
    for name, value in (("task", hand), ("der_logits", alpha * mse), ("der_labels", beta * replayed)):
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-6), name
    assert der.replay.draws == 4 and der.replay.seen == 6


def test_replay_works_with_a_module_whose_cache_keeps_more_than_the_prefix(data, tmp_path):
    """CAD's training cache keeps the whole frozen embedding: replayed rows get it too."""
    for method in ("er", "der"):
        cfg = cfg_for(data, tmp_path, method, learning_module="cad")
        m, module, step = method_for(cfg, tmp_path)
        b = batches(data, "polyp", m.model.backbone.img_size, 2)
        for _ in range(2):
            loss = m.observe(b, module.frozen_features(m.model.backbone, b.images), step)
            loss.backward()
        assert len(m.replay) == 3 and torch.isfinite(loss)


# ---------------------------------------------------------------------------------- end to end
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_run(data, run, cfg, metrics, method):
    for d in ("polyp", "shadow"):
        assert (run / f"replay/after_{d}.safetensors").is_file()
    steps = metrics["steps"]
    # 4 training images per domain, 2 epochs: every one offered twice
    assert [s["replay"]["seen"] for s in steps] == [8, 16] and [s["replay"]["samples"] for s in steps] == [3, 3]
    last = steps[-1]["storage"]
    kept = (run / "shadow.safetensors").stat().st_size + (run / "replay/after_shadow.safetensors").stat().st_size
    assert last["kept_bytes"] == kept and "replay/after_shadow.safetensors" in last["files"]
    buf = ReservoirBuffer.load(run / "replay/after_shadow.safetensors")
    assert buf.seen == 16 and len(buf) == 3 and (buf.samples[0].logits is not None) == (method == "der")
    assert buf.domain_counts() == steps[-1]["replay"]["domains"]
    manifest = json.loads((run / "run.json").read_text())
    assert "replay/after_polyp.safetensors" in manifest["files"] and manifest["completed"] == ["polyp", "shadow"]
    report = pipeline.test(run, cfg, CPU, with_vanilla=False)
    iou = metrics["accuracy_matrix"]["matrix"]["iou"]
    for j, d in enumerate(("polyp", "shadow")):
        assert report["results"][d]["metrics"]["iou"] == pytest.approx(iou[1][j])
    model = pipeline.load_run(run, cfg, CPU)
    assert set(model.modules_by_domain) == {"polyp", "shadow"} and model.selector is None
    if method == "der":  # float32 also under --amp bf16
        g = model.backbone.grid_size
        assert all(s.logits.dtype == torch.float32 and s.logits.shape == (1, 4 * g, 4 * g) for s in buf.samples)


@pytest.mark.parametrize("method,config,module,amp", [("er", "demo_sam.yaml", "lora", "off"),
                                                       ("er", "demo_sam2.yaml", "augmodule", "off"),
                                                       ("der", "demo_sam2.yaml", "lora", "bf16")])
def test_trains_end_to_end(data, tmp_path, method, config, module, amp):
    run = tmp_path / "run"
    amp = amp if amp_available(CPU) else "off"  # bf16 where this CPU computes it natively
    cfg = cfg_for(data, run, method, config=config, learning_module=module, amp=amp)
    metrics = pipeline.train(cfg, CPU)
    check_run(data, run, cfg, metrics, method)


def test_der_under_torchrun_keeps_one_buffer_on_every_rank(data, tmp_path):
    """Two CPU processes: each trains on 2 of the 4 images; the buffer sees all of them (gathered)
    and is identical on both ranks (end_domain compares them), written once."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "train.py", "--config", "configs/demo_sam.yaml", "--cuda", "-1", "--device", "cpu", "--method", "der",
           "--data_root", str(data), "--run_dir", str(run), "--epoch", "2", "--num_embedding", "3",
           "--batch_size", "1", "--order", "polyp_shadow", "--unseen", "--num_workers", "0", "--replay_size", "3",
           "--val_every", "0"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = cfg_for(data, run, "der")
    metrics = json.loads((run / "metrics.json").read_text())
    check_run(data, run, cfg, metrics, "der")
