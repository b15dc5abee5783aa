#!/usr/bin/env python
"""Speed benchmark: this project's training and testing against a
reference-style path that mirrors the authors' release, in one process, on the
same device, data, weights and seed.

    python bench/speed.py                     # CPU, small setting (a few minutes on 2 cores)
    python bench/speed.py --quick             # seconds: a smoke run (CI)
    python bench/speed.py --device cuda --vit_name vit_b --img_size 1024   # the real size on a GPU

What is measured (random backbone weights: speed does not depend on them). The
paths run in one process, each in its own thread, and take turns pass by pass
(one training epoch; one test split) or, with ``--turns batch``, batch by batch:
only one path computes at any moment and all of them meet the same background
load, so the ratios hold on a shared machine, where absolute images/s may
wander. Only a path's own batches (loading + work) count in its time.

* Training, one domain, the real ``ContinualTrainer._train_module``:
  - reference-style: fp32, the frozen encoder prefix recomputed for every batch
    of every epoch (``--feature_cache off``; what the release computes);
  - ours: the default settings (``--feature_cache auto``, fp32), and also
    ``--amp bf16`` where it runs (CUDA; CPUs with native bfloat16: AVX512-BF16 or
    AMX) as the row ``ours_bf16``.
  Throughput = training images per second over epochs 2..N (epoch 1 fills the
  cache; it is reported apart). Peak memory of the training step is measured
  during one more epoch (N+1), which each path runs alone once all paths have
  finished their timed epochs, as the peak of allocated bytes above what was
  resident when that epoch began (weights, optimizer state and the cache itself,
  whose size is reported separately): on CUDA ``torch.cuda.max_memory_allocated``
  minus ``memory_allocated`` at the epoch start; on the CPU the peak of the CPU
  allocator's "Total Allocated" counter in ``torch.profiler`` memory events
  (``profile_memory=True``) over that epoch, minus its value at the epoch start.
  The per-epoch losses of ours (fp32) and the reference-style run are compared:
  the cache must not change them.
* Testing, selector + routed segmentation over the test splits of every domain
  (modules with non-zero weights, a selector fitted on training embeddings):
  - ours: ``evaluate_split`` (batches of ``--eval_batch_size``, one frozen prefix
    per image, the batch split into groups per chosen module, all modules
    resident, heatmaps built on the device), fp32 and, where it runs, bf16;
  - reference-style, per image (batch 1): the prefix for the selector, then, as
    the release does for every image, ``copy.deepcopy`` of the whole backbone, the
    chosen module reloaded from its file on disk, the point heatmap built on the
    CPU with ``cv2.GaussianBlur`` and moved to the device, and the full forward
    (the whole encoder again, the module, the decoder). The forward runs through
    the resident backbone object, because this project's module hooks are bound
    to it; the copy is made and dropped per image as the release's is, so its
    cost is paid in full.
  Mean IoU per path is reported: the reference-style and ours fp32 must agree;
  the bf16 row shows the accuracy effect of ``--amp bf16``.

Targets (printed with the verdict): testing >= 5x the reference-style images/s;
training epochs 2..N >= 1.5x on the CPU (>= 2x on a GPU, ViT-B at 1024); peak
training-step memory not above the reference-style.
The results go to ``bench/results/speed_<device>.json`` (or ``--out``).
"""
import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiet torch.profiler's own log lines (CPU memory measurement)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from samcl.config import load_config  # noqa: E402
from samcl.continual import ContinualTrainer  # noqa: E402
from samcl.data import SegmentationSplit, read_domain_map  # noqa: E402
from samcl.demo import make_demo_data  # noqa: E402
from samcl.evaluation import evaluate_split, routed  # noqa: E402
from samcl.loading import make_loader, to_device  # noqa: E402
from samcl.metrics import per_image_metrics  # noqa: E402
from samcl.model import segment_with  # noqa: E402
from samcl.pipeline import build_model  # noqa: E402
from samcl.precision import amp_available, autocast  # noqa: E402
from samcl.points import generate_split_points  # noqa: E402
from samcl.run_folder import load_module, package_versions, save_module  # noqa: E402
from samcl.selector import ModuleSelector, train_selector  # noqa: E402

TARGETS = {"test": 5.0, "train_cpu": 1.5, "train_cuda": 2.0}
PRESETS = {  # device type -> defaults of the unset flags
    "quick": dict(vit_name="vit_tiny", img_size=128, n_train=4, n_test=2, domains=2, epochs=2, batch_size=2,
                  eval_batch_size=2, num_workers=0),
    "cpu": dict(vit_name="vit_b", img_size=128, n_train=16, n_test=8, domains=3, epochs=3, batch_size=4,
                eval_batch_size=8, num_workers=0),
    "cuda": dict(vit_name="vit_b", img_size=1024, n_train=32, n_test=16, domains=3, epochs=3, batch_size=8,
                 eval_batch_size=8, num_workers=4),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    p.add_argument("--quick", action="store_true", help="a few seconds on vit_tiny (smoke run for CI)")
    p.add_argument("--vit_name", help="SAM size (CPU default vit_b at --img_size 128; CUDA vit_b at 1024)")
    p.add_argument("--img_size", type=int, help="model input side")
    p.add_argument("--n_train", type=int, help="training images of the timed domain")
    p.add_argument("--n_test", type=int, help="test images per domain")
    p.add_argument("--domains", type=int, help="domains with a module at test (2..3)")
    p.add_argument("--epochs", type=int, help="timed training epochs N (epochs 2..N count; N >= 2)")
    p.add_argument("--batch_size", type=int, help="training batch")
    p.add_argument("--eval_batch_size", type=int, help="test batch of our path")
    p.add_argument("--num_workers", type=int, help="DataLoader workers (both paths)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no_amp", action="store_true", help="skip the --amp bf16 rows (CUDA, bfloat16 CPUs)")
    p.add_argument("--turns", choices=("pass", "batch"), default="pass",
                   help="the paths alternate per loader pass (an epoch, a test split; default) or per batch")
    p.add_argument("--out", help="JSON path (default bench/results/speed_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    preset = PRESETS["quick" if args.quick else ("cuda" if device.type == "cuda" else "cpu")]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (epochs 2..N are timed)")
    if not 1 <= args.domains <= 3:
        p.error("--domains must be 1..3")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- data
def make_data(root: Path, args) -> None:
    maps = make_demo_data(root, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    for split in maps.values():
        for folder in split.values():
            generate_split_points(root / folder)


# ---------------------------------------------------------------- training
class CPUMemoryPeak:
    """Peak bytes the CPU allocator holds above the start of the window (torch.profiler memory events)."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.peak = 0

    def start(self) -> None:
        self.prof.__enter__()

    def stop(self) -> int:
        self.prof.__exit__(None, None, None)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            self.prof.export_chrome_trace(str(path))
            trace = json.loads(path.read_text())
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        mem = sorted((e for e in events if e.get("name") == "[memory]" and int(e["args"].get("Device Type", 0)) == 0),
                     key=lambda e: float(e["ts"]))
        if not mem:
            return 0
        base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
        self.peak = max(e["args"]["Total Allocated"] for e in mem) - base
        return self.peak


class Turns:
    """Lets the measured pieces of several threads run one at a time, in alternation (first come,
    first served), so that every path meets the same background load on a shared machine.

    Each path runs in its own thread; a piece runs while its thread holds the turn, and only its
    own batches (loading + work) count in its time. ``granularity`` "pass": a piece is a whole
    pass over a loader (one training epoch, one test split); "batch": one batch. Batch turns
    follow background load more closely but make the paths disturb each other (caches, the
    allocator's free lists, one OpenMP pool per thread waking up): on 2 CPU cores they cost the
    batched path up to half its measured speed on a tiny backbone.
    """

    def __init__(self, n: int, granularity: str = "pass") -> None:
        if granularity not in ("pass", "batch"):
            raise ValueError(f"granularity must be 'pass' or 'batch', got {granularity!r}")
        self.granularity = granularity
        self.cond = threading.Condition()
        self.queue: deque = deque()
        self.holder: Optional[str] = None
        self.live = n
        self.arrived = 0

    def acquire(self, name: str) -> None:
        with self.cond:
            self.queue.append(name)
            while self.holder is not None or self.queue[0] != name:
                self.cond.wait()
            self.queue.popleft()
            self.holder = name

    def release(self, name: str) -> None:
        with self.cond:
            if self.holder == name:
                self.holder = None
            self.cond.notify_all()

    @contextlib.contextmanager
    def held(self, name: str, active: bool = True):
        """The turn for the enclosed block (nothing when not ``active``)."""
        if not active:
            yield
            return
        self.acquire(name)
        try:
            yield
        finally:
            self.release(name)

    def barrier(self) -> None:
        """Wait until every live thread got here (the memory epochs run after all timed epochs)."""
        with self.cond:
            self.arrived += 1
            self.cond.notify_all()
            while self.arrived < self.live:
                self.cond.wait()

    def leave(self, name: str) -> None:
        with self.cond:
            if self.holder == name:
                self.holder = None
            if name in self.queue:
                self.queue.remove(name)
            self.live -= 1
            self.cond.notify_all()


class TurnLoader:
    """A DataLoader whose batches are handed out only while its thread holds the turn.

    The turn is held for the whole pass, or (batch turns) from fetching a batch until the
    consumer asks for the next one; ``seconds[e]`` (per pass e) counts data loading and the
    consumer's work on each batch. Pass ``memory_pass`` runs in one turn after all threads
    reached it, and measures the peak memory.
    """

    def __init__(self, loader, turns: Turns, name: str, device: torch.device,
                 memory_pass: Optional[int] = None) -> None:
        self._loader = loader
        self.turns = turns
        self.name = name
        self.device = device
        self.memory_pass = memory_pass
        self.seconds: List[float] = []
        self.memory: Dict = {}

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name):  # dataset, sampler, generator, ...
        return getattr(self._loader, name)

    def __iter__(self):
        if len(self.seconds) == self.memory_pass:
            yield from self._memory_pass()
            return
        it = iter(self._loader)
        total = 0.0
        per_batch = self.turns.granularity == "batch"
        with self.turns.held(self.name, not per_batch):  # the whole pass ...
            while True:
                with self.turns.held(self.name, per_batch):  # ... or each batch
                    t0 = time.perf_counter()
                    batch = next(it, None)
                    if batch is None:
                        break
                    yield batch
                    sync(self.device)
                    total += time.perf_counter() - t0
        self.seconds.append(total)

    def _memory_pass(self):
        self.turns.barrier()
        with self.turns.held(self.name):
            sync(self.device)
            cpu_peak = None
            if self.device.type == "cuda":
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                cpu_peak = CPUMemoryPeak()
                cpu_peak.start()
            t0 = time.perf_counter()
            yield from self._loader
            sync(self.device)
            dt = time.perf_counter() - t0
            if self.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.device)
                self.memory = {"step_peak_bytes": peak - base,
                               "method": "torch.cuda.max_memory_allocated over the epoch - memory_allocated at its start"}
            else:
                self.memory = {"step_peak_bytes": cpu_peak.stop(),
                               "method": "torch.profiler CPU allocator 'Total Allocated' peak over the epoch "
                                         "- its value at the start"}
            self.memory["epoch_seconds"] = round(dt, 4)
        self.seconds.append(float("nan"))


def run_interleaved(jobs: Dict[str, Callable[[Turns], Dict]], granularity: str = "pass") -> Dict[str, Dict]:
    """Run every job in its own thread under one Turns; re-raise the first failure."""
    turns = Turns(len(jobs), granularity)
    results: Dict[str, Dict] = {}
    errors: Dict[str, BaseException] = {}

    def target(name: str, fn) -> None:
        try:
            results[name] = fn(turns)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors[name] = e
        finally:
            turns.leave(name)

    threads = [threading.Thread(target=target, args=(name, fn), name=f"bench-{name}", daemon=True)
               for name, fn in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        name, e = next(iter(errors.items()))
        raise RuntimeError(f"benchmark path {name!r} failed: {type(e).__name__}: {e}") from e
    return results


def train_job(label: str, base_cfg, device: torch.device, run_root: Path, n_epochs: int, *,
              feature_cache: str, amp: str) -> Callable[[Turns], Dict]:
    """Set up one training path (here, in the calling thread: seeding is global) and return the
    function that trains it (in its thread)."""
    cfg = replace(base_cfg, feature_cache=feature_cache, amp=amp, epoch=n_epochs + 1,
                  run_dir=str(run_root / label))
    model = build_model(cfg, device)
    trainer = ContinualTrainer(cfg, model, device, Path(cfg.run_dir), overwrite=True, checkpoint={})
    domain = cfg.domains[0]
    loader = make_loader(trainer.train_sets[domain], cfg.batch_size, True, cfg.seed, cfg.num_workers, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = model.new_module()

    def run(turns: Turns) -> Dict:
        clock = TurnLoader(loader, turns, label, device, memory_pass=n_epochs)
        history = trainer._train_module(domain, module, clock)
        n = len(loader.dataset)
        timed = clock.seconds[1:n_epochs]
        return {
            "label": label, "feature_cache": feature_cache, "amp": amp, "images": n, "batch_size": cfg.batch_size,
            "epoch_seconds": [round(t, 4) for t in clock.seconds[:n_epochs]],
            "first_epoch_images_per_s": n / clock.seconds[0],
            "images_per_s": n * len(timed) / sum(timed),
            "epoch_loss": history["epoch_loss"],
            "memory": clock.memory,
            "cache": trainer.cache_stats,
        }

    return run


def warm_up(cfg, device: torch.device, amps) -> None:
    """One untimed training step and one test batch per precision, so that one-time costs (thread
    pools, kernel selection and JIT, first page faults, CUDA handles) fall on no measured path."""
    from samcl.losses import samcl_loss

    model = build_model(cfg, device)
    module = model.new_module()
    s = model.backbone.img_size
    gen = torch.Generator().manual_seed(0)
    for amp in amps:
        for n in sorted({cfg.batch_size, cfg.eval_batch_size, 1}):
            images = (torch.rand(n, 3, s, s, generator=gen) * 255).to(device)
            points = (torch.rand(n, 3, 2, generator=gen) * s).to(device)
            labels = torch.ones(n, 3, dtype=torch.long, device=device)
            masks = (torch.rand(n, 1, s, s, generator=gen) > 0.5).float().to(device)
            prefix = model.backbone.encode_prefix(images)
            with autocast(amp, device):
                logits, iou = segment_with(module, model.backbone, prefix, images, model.heatmap(points, labels),
                                           points, labels)
            samcl_loss(logits.float(), iou.float(), masks).backward()
    del model, module
    sync(device)
    if device.type != "cuda":  # start torch.profiler once in the main thread (kineto registers it here)
        peak = CPUMemoryPeak()
        peak.start()
        peak.stop()


# ---------------------------------------------------------------- testing
def build_test_model(cfg, device: torch.device, module_dir: Path, train_sets, n_domains: int):
    """Backbone + one module per domain (non-zero weights, saved to disk) + a selector fitted on
    the prefix embeddings of each domain's training images."""
    model = build_model(cfg, device)
    paths = {}
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    for d in cfg.domains[:n_domains]:
        m = model.new_module()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.device))
        paths[d] = module_dir / f"{d}.pth"
        save_module(m, model.backbone, d, paths[d])
        model.add_domain(d, m.eval())
    xs, ys = [], []
    with torch.no_grad():
        for k, d in enumerate(model.domains):
            loader = make_loader(train_sets[d], 8, False, 0, 0, device)
            for raw in loader:
                b = to_device(raw, device)
                xs.append(model.backbone.selector_embedding(model.backbone.encode_prefix(b.images)).cpu())
                ys.append(torch.full((len(b.names),), k, dtype=torch.long))
    selector = ModuleSelector(model.backbone.selector_dim, len(model.domains)).to(device)
    if len(model.domains) > 1:
        train_selector(selector, torch.cat(xs), torch.cat(ys), epochs=25, batch_size=24,
                       generator=torch.Generator().manual_seed(cfg.seed))
    model.selector = selector.eval()
    model.backbone.eval()
    return model, paths


def test_job_ours(model, test_sets, domains, device, batch: int, workers: int, amp: str, label: str):
    def run(turns: Turns) -> Dict:
        n, seconds, ious, counts = 0, 0.0, {}, {}
        for d in domains:
            loader = TurnLoader(make_loader(test_sets[d], batch, False, 0, workers, device), turns, label, device)
            res = evaluate_split(model, loader, device, routed(model), desc=f"bench {d}", amp=amp)
            n += res["metrics"]["n"]
            seconds += sum(loader.seconds)
            ious[d] = res["metrics"]["iou"]
            counts[d] = res["selector_counts"]
        return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "mean_iou": ious, "routed": counts,
                "batch_size": batch, "amp": amp}

    return run


def cpu_heatmap(points: np.ndarray, labels: np.ndarray, grid: int, frame: int) -> np.ndarray:
    """The release's heatmap, per image on the CPU: grid[int(x*G/S)][int(y*G/S)] = 1, cv2 blur, x 255."""
    g = np.zeros((grid, grid), np.float32)
    for (x, y), lab in zip(points, labels):
        if lab < 0:
            continue
        g[min(int(x * grid / frame), grid - 1)][min(int(y * grid / frame), grid - 1)] = 1
    return cv2.GaussianBlur(g, (9, 9), 0) * 255


class Laps:
    """Seconds per named part of a loop body (synchronised on CUDA, so each part gets its own kernels)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: Dict[str, float] = {}
        self.t = time.perf_counter()

    def start(self) -> None:
        sync(self.device)
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.t
        self.t = now


def test_job_reference(model, paths: Dict[str, Path], test_sets, domains, device, workers: int):
    bb = model.backbone

    @torch.no_grad()
    def run(turns: Turns) -> Dict:
        n, seconds, ious, counts = 0, 0.0, {}, {}
        laps = Laps(device)
        for d in domains:
            loader = TurnLoader(make_loader(test_sets[d], 1, False, 0, workers, device), turns, "reference", device)
            vals, routed = [], {}
            for raw in loader:  # one image at a time, as the release
                laps.start()
                b = to_device(raw, device)
                k = int(model.route(bb.encode_prefix(b.images))[0])  # selector input: the prefix
                chosen = model.domains[k]
                routed[chosen] = routed.get(chosen, 0) + 1
                laps.lap("selector (encoder prefix + MLP)")
                sam_copy = copy.deepcopy(bb)  # the release copies the whole SAM for every image ...
                laps.lap("deepcopy of SAM")
                module = None
                if chosen in paths:  # ... and reloads the chosen module from its file
                    module = load_module(paths[chosen], bb).to(device).eval()
                laps.lap("module reload from disk")
                heat = None
                if module is not None:  # heatmap on the CPU, per image, with cv2
                    heat = torch.from_numpy(cpu_heatmap(raw["points"][0].numpy(), raw["labels"][0].numpy(),
                                                        bb.grid_size, bb.img_size))[None].to(device)
                laps.lap("CPU heatmap")
                prefix = bb.encode_prefix(b.images)  # the copy runs the whole encoder
                logits, _ = segment_with(module, bb, prefix, b.images, heat, b.points, b.labels)
                vals.append(float(per_image_metrics(logits, b.masks)["iou"][0]))
                laps.lap("full forward + metrics")
                del sam_copy, module
            n += len(vals)
            seconds += sum(loader.seconds)
            ious[d] = float(np.mean(vals))
            counts[d] = routed
        return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "mean_iou": ious, "routed": counts,
                "batch_size": 1, "amp": "off",
                "ms_per_image": {k: round(1000 * v / n, 2) for k, v in laps.seconds.items()}}

    return run


# ---------------------------------------------------------------- report
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def mb(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 1024 ** 2:.1f} MB"


def main(argv=None) -> Dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    amp_rows = amp_available(device) and not args.no_amp  # CUDA, or a CPU with native bfloat16
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="samcl_bench_") as tmp:
        root = Path(tmp)
        make_data(root, args)
        order = "_".join(["polyp", "shadow", "lesion"][: args.domains])
        cfg = load_config(None, {
            "module": "SAMCL", "backbone": "sam", "vit_name": args.vit_name, "img_size": args.img_size,
            "random_weights": True, "seed": args.seed, "order": order, "unseen": [], "data_root": str(root),
            "train_json": "datasets_train.json", "test_json": "datasets_test.json", "output_dir": str(root / "runs"),
            "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size, "num_workers": args.num_workers,
            "val_every": 0, "num_embedding": 4, "deterministic": True})
        print(f"[bench] {device_name(device)} | SAM {args.vit_name} at {args.img_size} (random weights) | "
              f"train {args.n_train} images x {args.epochs} timed epochs, batch {args.batch_size} | "
              f"test {args.domains} domains x {args.n_test} images", flush=True)

        warm_up(cfg, device, ("off", "bf16") if amp_rows else ("off",))

        # ---- training: the paths take turns (each in its own thread)
        runs = [("reference", "off", "off"), ("ours", "auto", "off")] + ([("ours_bf16", "auto", "bf16")] if amp_rows else [])
        print(f"[bench] training {', '.join(r[0] for r in runs)} (interleaved) ...", flush=True)
        train = run_interleaved({label: train_job(label, cfg, device, root / "runs", args.epochs, feature_cache=fc,
                                                  amp=amp) for label, fc, amp in runs}, args.turns)
        train = {label: train[label] for label, _, _ in runs}
        ref_losses, our_losses = train["reference"]["epoch_loss"], train["ours"]["epoch_loss"]
        loss_diff = max(abs(a - b) for a, b in zip(ref_losses, our_losses))
        if device.type == "cuda":
            torch.cuda.empty_cache()

        # ---- testing: the paths take turns
        splits = {name: read_domain_map(Path(getattr(cfg, f"{name}_json")), root) for name in ("train", "test")}
        sets = {name: {d: SegmentationSplit(m[d], args.img_size, domain=d) for d in cfg.domains}
                for name, m in splits.items()}
        model, paths = build_test_model(cfg, device, root / "modules", sets["train"], args.domains)
        domains = model.domains
        test_sets = sets["test"]
        jobs = {"reference": test_job_reference(model, paths, test_sets, domains, device, args.num_workers),
                "ours": test_job_ours(model, test_sets, domains, device, args.eval_batch_size, args.num_workers,
                                      "off", "ours")}
        if amp_rows:
            jobs["ours_bf16"] = test_job_ours(model, test_sets, domains, device, args.eval_batch_size,
                                              args.num_workers, "bf16", "ours_bf16")
        print(f"[bench] testing {', '.join(jobs)} (interleaved) ...", flush=True)
        test = run_interleaved(jobs, args.turns)

    # ---- table
    rt, rtest = train["reference"], test["reference"]
    train_target = TARGETS["train_cuda" if device.type == "cuda" else "train_cpu"]
    rows = []
    for label in train:
        t, s = train[label], test[label]
        rows.append({
            "path": label,
            "train_images_per_s": t["images_per_s"], "train_ratio": t["images_per_s"] / rt["images_per_s"],
            "train_first_epoch_images_per_s": t["first_epoch_images_per_s"],
            "train_step_peak_bytes": t["memory"].get("step_peak_bytes"),
            "cache_bytes": t["cache"].get("bytes", 0) if t["cache"].get("enabled") else 0,
            "cache_location": t["cache"].get("location", "none") if t["cache"].get("enabled") else "none",
            "test_images_per_s": s["images_per_s"], "test_ratio": s["images_per_s"] / rtest["images_per_s"],
            "test_mean_iou": float(np.mean(list(s["mean_iou"].values()))),
            "final_epoch_loss": t["epoch_loss"][args.epochs - 1],
        })
    head = (f"{'path':<10} {'train img/s':>11} {'x ref':>6} {'epoch-1 img/s':>13} {'step peak mem':>13} "
            f"{'cache':>10}  {'test img/s':>10} {'x ref':>6} {'test IoU':>8} {'loss@N':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['path']:<10} {r['train_images_per_s']:>11.3f} {r['train_ratio']:>6.2f} "
                     f"{r['train_first_epoch_images_per_s']:>13.3f} {mb(r['train_step_peak_bytes']):>13} "
                     f"{mb(r['cache_bytes']):>10}  {r['test_images_per_s']:>10.3f} {r['test_ratio']:>6.2f} "
                     f"{r['test_mean_iou']:>8.4f} {r['final_epoch_loss']:>8.4f}")
    ours = next(r for r in rows if r["path"] == "ours")
    best = max(rows[1:], key=lambda r: r["test_ratio"])
    best_train = max(rows[1:], key=lambda r: r["train_ratio"])
    ref_mem = rows[0]["train_step_peak_bytes"]
    checks = {
        f"test >= {TARGETS['test']:g}x reference-style (best: {best['path']}; "
        + ", ".join(f"{r['path']} {r['test_ratio']:.2f}x" for r in rows[1:]) + ")": best["test_ratio"] >= TARGETS["test"],
        f"training epochs 2..N >= {train_target:g}x (best: {best_train['path']}; "
        + ", ".join(f"{r['path']} {r['train_ratio']:.2f}x" for r in rows[1:]) + ")":
            best_train["train_ratio"] >= train_target,
        "peak training-step memory <= reference-style (ours, fp32)":
            ref_mem is not None and ours["train_step_peak_bytes"] is not None
            and ours["train_step_peak_bytes"] <= ref_mem,
        "ours fp32 training losses equal the reference-style": loss_diff <= 1e-6,
        "ours fp32 test IoU equals the reference-style": abs(ours["test_mean_iou"] - rows[0]["test_mean_iou"]) <= 1e-4,
    }
    lines.append("-" * len(head))
    lines.append("reference-style: fp32, prefix recomputed every epoch; test batch 1 + deepcopy + module reload "
                 "from disk + CPU heatmap + full forward")
    lines.append(f"ours: feature cache ({ours['cache_location']}, hit rate "
                 f"{100 * train['ours']['cache'].get('hit_rate', 0):.0f}%), test batch {args.eval_batch_size} "
                 f"routed by group, resident modules, device heatmaps"
                 + ("; ours_bf16: the same with --amp bf16" if amp_rows else ""))
    lines.append("reference-style test, ms per image: " + ", ".join(
        f"{k} {v:.1f}" for k, v in rtest["ms_per_image"].items()) + f" (the rest, {1000 / rtest['images_per_s'] - sum(rtest['ms_per_image'].values()):.1f}, is data loading)")
    lines.append(f"max |loss difference| ours vs reference-style over {len(ref_losses)} epochs: {loss_diff:.3g}")
    for name, ok in checks.items():
        lines.append(f"target: {name}: {'MET' if ok else 'NOT MET'}")
    table = "\n".join(lines)
    print(table)

    result = {
        "format": "samcl-speed-bench", "version": 1,
        "device": str(device), "device_name": device_name(device),
        "setting": {k: getattr(args, k) for k in ("vit_name", "img_size", "n_train", "n_test", "domains", "epochs",
                                                   "batch_size", "eval_batch_size", "num_workers", "seed", "quick")},
        "torch_threads": torch.get_num_threads(),
        "rows": rows, "train": train, "test": test, "targets": TARGETS, "checks": checks,
        "loss_max_abs_diff": loss_diff, "seconds": round(time.time() - t_start, 1),
        "versions": package_versions(), "table": table,
    }
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"speed_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"[bench] wrote {out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
