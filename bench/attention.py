#!/usr/bin/env python
"""SAM's attention paths in one training step: time, step peak memory, and equality with the stock path.

    python bench/attention.py                                  # CPU: ViT-B at 1024, batch 1, the AugModule
    python bench/attention.py --batch 2
    python bench/attention.py --device cuda --batch 8 --paths stock chunked sdpa

One process builds one frozen ViT-B (random weights, relative positions drawn at random too:
SAM builds them at zero, and then the bias would not be tested) and, for each attention path
(``samcl.backbones.attention``: ``stock`` is segment_anything's own), a learning module from the
same seed. For each path it then

* runs one forward and backward from the module's initial weights and keeps the logits and the
  module's gradients: **max |delta|** is the largest of the logits' max |Δ| and the gradients'
  max |Δ| relative to the largest gradient, against the stock path;
* measures one steady-state training step as ``bench/memory.py`` does (after a warm-up step):
  **step peak** is the most memory the step adds to what was held before it (CPU: the
  allocator's running balance in ``torch.profiler``'s memory timeline; CUDA:
  ``torch.cuda.max_memory_allocated``);
* times ``--steps`` further steps, the paths taking turns step by step so that background load
  hits them alike: **time** is the fastest of a path's steps.

The last line compares ``--path`` (default ``chunked``) with the stock path, ratios new / stock:
``attention vs stock: time X.XXx, step peak memory Y.YYx, max |delta| Z.ZZe-NN``.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from memory import Case, make_batch, measure  # noqa: E402  (bench/memory.py)

from samcl.backbones.attention import ATTENTION_PATHS, use_attention  # noqa: E402
from samcl.backbones.sam import SAMBackbone, build_sam  # noqa: E402
from samcl.losses import samcl_loss  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vit_name", default="vit_b", help="SAM architecture (configs/models/sam.yaml)")
    p.add_argument("--img_size", type=int, default=1024, help="input side")
    p.add_argument("--batch", type=int, default=1, help="images per step")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--module", default="augmodule", help="learning module trained (samcl.learning_modules)")
    p.add_argument("--paths", nargs="+", default=["stock", "chunked"], choices=ATTENTION_PATHS,
                   help="attention paths to run (stock is always run first)")
    p.add_argument("--path", default="chunked", choices=ATTENTION_PATHS, help="the path the last line compares")
    p.add_argument("--steps", type=int, default=2, help="timed steps per path")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch")
    p.add_argument("--json", type=Path, help="also write the report here")
    return p.parse_args(argv)


def first_pass(case: Case) -> Dict[str, torch.Tensor]:
    """Logits and the module's gradients of one forward and backward (no optimizer step)."""
    logits, iou = case.forward()
    samcl_loss(logits, iou, case.batch["masks"]).backward()
    out = {"logits": logits.detach().float().cpu()}
    out.update({n: p.grad.detach().float().cpu() for n, p in case.module.named_parameters() if p.grad is not None})
    case.opt.zero_grad(set_to_none=True)
    return out


def delta(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    grads = [k for k in ref if k != "logits"]
    scale = max(float(ref[k].abs().max()) for k in grads) if grads else 1.0
    return {"logits": float((got["logits"] - ref["logits"]).abs().max()),
            "gradients": max((float((got[k] - ref[k]).abs().max()) for k in grads), default=0.0) / scale}


def run(args: argparse.Namespace) -> Dict:
    dev = torch.device(args.device)
    paths = ["stock"] + [p for p in args.paths if p != "stock"]
    if args.path not in paths:
        paths.append(args.path)
    torch.manual_seed(args.seed)
    sam, _ = build_sam(args.vit_name, args.img_size)
    g = torch.Generator().manual_seed(args.seed)
    for name, p in sam.image_encoder.named_parameters():
        if "rel_pos" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.02
    backbone = SAMBackbone(sam, args.vit_name, attention="stock").to(dev).train()
    batch = make_batch(backbone, args.batch, dev, args.seed)
    cases, rows, ref = {}, {}, None
    for path in paths:
        use_attention(sam.image_encoder, path)
        torch.manual_seed(args.seed)
        cases[path] = Case(args.module, backbone, batch)
        grads = first_pass(cases[path])
        ref = grads if ref is None else ref  # the stock path runs first
        rows[path] = {"path": path, **delta(grads, ref)}
        rows[path].update({k: v for k, v in measure(cases[path], dev, 0).items()
                           if k in ("peak_mb", "step_mb", "saved_mb")})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    times: Dict[str, List[float]] = {p: [] for p in paths}
    for _ in range(args.steps):
        for path in paths:
            use_attention(sam.image_encoder, path)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            cases[path].step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[path].append(time.perf_counter() - t0)
    for path in paths:
        rows[path]["time_s"] = round(min(times[path]), 4) if times[path] else None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"format": "samcl-attention-bench", "version": 1, "device_name": name, "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": [rows[p] for p in paths]}


def ratio(a, b) -> float:
    return float("nan") if not a or not b else a / b


def format_report(report: Dict) -> str:
    s = report["settings"]
    rows = {r["path"]: r for r in report["results"]}
    stock, new = rows["stock"], rows[s["path"]]
    lines = [f"{s['vit_name']} at {s['img_size']} px, batch {s['batch']}, module {s['module']}, "
             f"{report['device_name']} ({report['cpu_threads']} threads), torch {report['torch']}",
             "| path | time per step (s) | step peak (MB) | peak (MB) | saved for backward (MB) | logits max abs delta "
             "| gradients max rel delta |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['path']} | {r['time_s']} | {r['step_mb']} | {r['peak_mb']} | {r['saved_mb']} | "
                     f"{r['logits']:.2e} | {r['gradients']:.2e} |")
    worst = max(new["logits"], new["gradients"])
    lines.append(f"attention vs stock: time {ratio(new['time_s'], stock['time_s']):.2f}x, "
                 f"step peak memory {ratio(new['step_mb'], stock['step_mb']):.2f}x, max |delta| {worst:.2e}")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
