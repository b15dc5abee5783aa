#!/usr/bin/env python
"""Training memory, step time and storage of one step per learning module.

    python bench/memory.py                                          # CPU: ViT-B at 256 px, batch 1
    python bench/memory.py --device cuda --vit_name vit_b --img_size 1024 --batch 4
    python bench/memory.py --vit_name vit_tiny --img_size 128 --modules cad adapter+decoder

For each registered learning module (``samcl.learning_modules``: the AugModule, CAD, bottleneck
adapters in every block, LoRA on the qkv after the selector layer, a decoder copy) and for
SAM-Adapter's recipe (the adapters trained together with a decoder copy) it builds the
same frozen SAM backbone (random weights: memory does not depend on them), runs one
warm-up step (so the optimizer state exists), then measures one steady-state training
step (forward from the raw batch, loss, backward, optimizer step):

* ``peak_mb`` -- the most tensor memory held at any moment of the step, everything
  included (frozen SAM, the module, its optimizer state, the batch, activations):
  CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``.
  CPU: the bytes of every tensor alive when the step starts (parameters and buffers of
  backbone and module, optimizer state, the batch) plus the peak of the allocator's
  running balance during the step, taken from ``torch.profiler`` with
  ``profile_memory=True`` (each allocation and free of the CPU allocator, in order:
  the profiler's memory timeline). The two agree in what they count (bytes handed to
  tensors), not in allocator rounding/caching.
* ``step_mb`` -- ``peak_mb`` minus what was held when the step started: activations,
  gradients and temporaries of the step.
* ``saved_mb`` -- bytes of the tensors autograd keeps for backward (collected with
  ``torch.autograd.graph.saved_tensors_hooks``; unique storages, parameters and buffers
  excluded): the encoder activations CAD's design avoids.
* ``time_s`` -- mean wall time of ``--steps`` further unprofiled steps.
* ``trainable`` -- parameters with requires_grad; ``stored_mb`` -- size of the module's
  state dict saved with torch.save (what a run folder keeps per domain).

A table is printed and everything is written as JSON (``--json``).
"""
import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from samcl.backbones.sam import SAMBackbone, build_sam  # noqa: E402
from samcl.backbones.sam2 import SAM2Backbone, build_sam2_model  # noqa: E402
from samcl.heatmap import points_to_heatmap  # noqa: E402
from samcl.losses import cad_loss, samcl_loss  # noqa: E402
from samcl.learning_modules.base import LearningModule  # noqa: E402
from samcl.registry import LEARNING_MODULES as REGISTERED  # noqa: E402

SAM_ADAPTER = "adapter+decoder"
LEARNING_MODULES = ("augmodule", "cad", SAM_ADAPTER, "adapter", "lora", "decoder")
WHAT = {
    "augmodule": "SAMCL's AugModule on the blocks after the selector layer; prefix without autograd",
    "cad": "conv adapter beside the encoder (no encoder autograd) + decoder copy",
    SAM_ADAPTER: "SAM-Adapter's recipe: bottleneck adapter in every encoder block + decoder copy",
    "adapter": "bottleneck adapter in every encoder block",
    "lora": "LoRA r=10 on the qkv after the selector layer; prefix without autograd",
    "decoder": "decoder copy; encoder without autograd",
}
ADAMW_RECIPES = ("cad", SAM_ADAPTER, "decoder")  # CAD's and SAM-Adapter's recipe: AdamW 2e-4, BCE + IoU loss
MB = 1024**2


class AdapterWithDecoder(torch.nn.Module):
    """SAM-Adapter as CAD compares against it: the adapters and a decoder copy, trained together."""

    def __init__(self, backbone: SAMBackbone) -> None:
        super().__init__()
        self.adapters = REGISTERED.get("adapter").spec_class.for_backbone(backbone).build(backbone)
        self.decoder = REGISTERED.get("decoder").spec_class.for_backbone(backbone).build(backbone)

    def segment(self, backbone, prefix, images, heatmap, points, labels):
        with self.adapters.attached(backbone):
            features = backbone.encode_suffix(backbone.prefix(images))
        return backbone.decode(features, points, labels, mask_decoder=self.decoder.decoder)


class Case:
    """One module's training step on a fixed batch."""

    def __init__(self, name: str, backbone: SAMBackbone, batch: Dict[str, torch.Tensor]) -> None:
        self.name = name
        self.backbone = backbone
        self.batch = batch
        b = batch
        if name == SAM_ADAPTER:
            self.module = AdapterWithDecoder(backbone)
        else:
            self.module = REGISTERED.get(name).spec_class.for_backbone(backbone).build(backbone)
        needs_heat = isinstance(self.module, LearningModule) and self.module.needs_heatmap
        heat = points_to_heatmap(b["points"], backbone.grid_size, backbone.img_size, b["labels"]) if needs_heat else None

        def forward():
            prefix = backbone.encode_prefix(b["images"])  # without autograd, as in training
            return self.module.segment(backbone, prefix, b["images"], heat, b["points"], b["labels"])

        self.module.to(b["images"].device).train()
        self.forward: Callable = forward
        params = [p for p in self.module.parameters() if p.requires_grad]
        recipe_adamw = name in ADAMW_RECIPES
        self.opt = (torch.optim.AdamW(params, lr=2e-4) if recipe_adamw else torch.optim.Adam(params, lr=5e-3))
        self.loss_name = "bce_iou" if recipe_adamw else "samcl"

    def step(self) -> float:
        logits, iou = self.forward()
        if self.loss_name == "samcl":
            loss = samcl_loss(logits, iou, self.batch["masks"])
        else:
            loss = cad_loss(logits, self.batch["masks"])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def trainable(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def stored_mb(self) -> float:
        buf = io.BytesIO()
        torch.save(self.module.state_dict(), buf)
        return buf.tell() / MB

    def live_bytes(self) -> int:
        """Bytes of every tensor alive between steps: backbone, module, optimizer state, batch."""
        seen, total = set(), 0
        tensors = [*self.backbone.parameters(), *self.backbone.buffers(), *self.module.parameters(),
                   *self.module.buffers(), *self.batch.values()]
        for state in self.opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total


def _saved_bytes(case: Case) -> Callable:
    """Context + result for the bytes autograd saves for backward (unique storages, no parameters)."""
    exclude = {p.untyped_storage().data_ptr() for p in
               [*case.backbone.parameters(), *case.backbone.buffers(), *case.module.parameters(), *case.module.buffers()]}
    seen: Dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in exclude and ptr not in seen:
            seen[ptr] = s.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


def _cpu_peak_delta(prof) -> Optional[int]:
    """Peak of the CPU allocator's running balance (allocations - frees) over a profiled step."""
    try:
        from torch.profiler._memory_profiler import Action, MemoryProfileTimeline
    except ImportError:
        return None
    timeline = MemoryProfileTimeline(prof._memory_profile()).timeline
    cum = peak = 0
    for _t, action, (key, _version), size in sorted(timeline, key=lambda e: e[0]):
        if getattr(key, "device", torch.device("cpu")).type != "cpu":
            continue
        if action == Action.CREATE:
            cum += size
        elif action == Action.DESTROY:
            cum -= size
        peak = max(peak, cum)
    return peak


def measure(case: Case, device: torch.device, steps: int) -> Dict:
    case.step()  # warm-up: optimizer state, lazy inits
    hooks, saved = _saved_bytes(case)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with hooks:
            case.step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        method = "torch.cuda.max_memory_allocated"
    else:
        from torch.profiler import ProfilerActivity, profile

        before = case.live_bytes()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            with hooks:
                case.step()
        delta = _cpu_peak_delta(prof)
        peak = None if delta is None else before + delta
        method = "live tensors + torch.profiler memory timeline peak"
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        case.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {
        "module": case.name, "what": WHAT[case.name],
        "peak_mb": None if peak is None else round(peak / MB, 2),
        "step_mb": None if peak is None else round((peak - before) / MB, 2),
        "saved_mb": round(sum(saved.values()) / MB, 2),
        "time_s": round(sum(times) / len(times), 4) if times else None,
        "trainable": case.trainable(), "stored_mb": round(case.stored_mb(), 4), "memory_method": method,
    }


def make_batch(backbone: SAMBackbone, n: int, device: torch.device, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = backbone.img_size
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    masks = ((yy - s / 2) ** 2 + (xx - s / 2) ** 2 < (s / 4) ** 2).float().expand(n, 1, s, s).contiguous()
    return {
        "images": (torch.rand(n, 3, s, s, generator=g) * 255).to(device),
        "masks": masks.to(device),
        "points": (s / 2 + (torch.rand(n, 3, 2, generator=g) - 0.5) * s / 4).to(device),
        "labels": torch.ones(n, 3).to(device),
    }


def run(vit_name: str = "vit_b", img_size: Optional[int] = None, batch: int = 1, device: str = "cpu",
        modules=LEARNING_MODULES, steps: int = 1, seed: int = 0, hiera_name: Optional[str] = None) -> Dict:
    """``hiera_name``: a SAM 2.1 backbone of that size instead of SAM's ``vit_name``."""
    dev = torch.device(device)
    results: List[Dict] = []
    torch.manual_seed(seed)
    if hiera_name:
        model, arch = build_sam2_model(hiera_name, img_size)
        backbone = SAM2Backbone(model, hiera_name)
        arch = {"img_size": backbone.img_size}
    else:
        sam, arch = build_sam(vit_name, img_size)
        backbone = SAMBackbone(sam, vit_name)
    backbone = backbone.to(dev).train()  # shared: the modules' hooks leave it unchanged
    data = make_batch(backbone, batch, dev, seed)
    for name in modules:
        torch.manual_seed(seed)
        case = Case(name, backbone, data)
        results.append(measure(case, dev, steps))
        del case
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "format": "samcl-memory-bench", "version": 1,
        "settings": {"vit_name": hiera_name or vit_name, "img_size": img_size or arch["img_size"], "batch": batch,
                     "device": str(dev), "steps": steps, "weights": "random"},
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "results": results,
    }


def format_table(report: Dict) -> str:
    s = report["settings"]
    head = (f"{'module':<13} {'peak MB':>9} {'step MB':>9} {'saved MB':>9} {'step s':>8} "
            f"{'trainable':>11} {'stored MB':>10}")
    lines = [f"{s['vit_name']} at {s['img_size']}px, batch {s['batch']}, {s['device']} "
             f"({report['device_name']}, {report['cpu_threads']} threads), torch {report['torch']}", head,
             "-" * len(head)]
    for r in report["results"]:
        f = (lambda v, w=9, d=1: f"{v:{w}.{d}f}" if v is not None else f"{'n/a':>{w}}")
        lines.append(f"{r['module']:<13} {f(r['peak_mb'])} {f(r['step_mb'])} {r['saved_mb']:9.1f} "
                     f"{f(r['time_s'], 8, 3)} {r['trainable']:11,} {r['stored_mb']:10.3f}")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--vit_name", default="vit_b", help="SAM size: vit_b (default), vit_l, vit_h, vit_tiny")
    p.add_argument("--hiera_name", help="a SAM 2.1 size instead (hiera_t, hiera_s, hiera_b+, hiera_l, hiera_toy); "
                                        "the modules that support SAM 2: augmodule, lora, decoder")
    p.add_argument("--img_size", type=int, help="input side (default: 256 on the CPU, the architecture's on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 1 on the CPU, 4 on CUDA)")
    p.add_argument("--modules", nargs="*", choices=LEARNING_MODULES, default=list(LEARNING_MODULES))
    p.add_argument("--steps", type=int, default=None, help="timed steps after the measured one (default 1 CPU, 5 CUDA)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", help="output file (default bench/results/memory_<device>_<vit>_<size>.json)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda needs a CUDA GPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    img = args.img_size or (None if cuda else 256)
    report = run(args.vit_name, img, args.batch or (4 if cuda else 1), args.device, args.modules,
                 args.steps if args.steps is not None else (5 if cuda else 1), hiera_name=args.hiera_name)
    print(format_table(report))
    s = report["settings"]
    out = Path(args.json) if args.json else (
        REPO / "bench" / "results" / f"memory_{s['device'].split(':')[0]}_{s['vit_name']}_{s['img_size']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {out}")
    return report


if __name__ == "__main__":
    main()
