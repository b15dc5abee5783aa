"""Built-in demo: the whole SAMCL job on generated data, on the CPU, in minutes.

    python -m samcl.demo                 # writes demo_output/, prints the final table
    python -m samcl.demo --backbone sam2 # the same on a tiny SAM 2.1 (Hiera) backbone
    python -m samcl.demo --pictures docs # also copy the run's report.png and one test overlay to docs/
    python -m samcl.demo --compare       # zero-shot, fine-tuning, ER, SAMCL (and its oracle, ncm, merge
                                         # baselines) on the same domains, one table

It (1) draws a small synthetic dataset in the release's layout, four visually
distinct domains (three to learn, one unseen/test-only), with non-square JPEG
and PNG images, JSON maps and points.json; (2) trains SAMCL over them with a
tiny SAM-architecture backbone, or with --backbone sam2 a tiny Hiera-T-shaped SAM 2.1
(random weights, fixed seed); (3) tests the run
folder and prints per-domain IoU/F1/MAE, the vanilla (no module) IoU beside each
domain, selector routing, and AA/FM/FT.

With --compare it trains the baselines zero-shot, fine-tuning and experience replay beside
SAMCL, SAMCL routed by the true domain (oracle) and by the nearest mean embedding (ncm), and
the per-domain modules TIES-merged into one (merge), every method with the same LoRA learning
module, under the same protocol and prints the comparison (samcl.compare's table): fine-tuning
forgets, SAMCL's loss comes only from images the selector routes to another domain's module.
The columns are defined in docs/metrics.md.

What it shows: the pipeline end to end, that the selector tells domains apart
from a frozen intermediate embedding, and that each domain's tiny module moves
its IoU away from vanilla without touching the others. What it does not show:
real numbers; those need the official SAM weights and the real datasets.
"""
import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Tuple

import cv2
import numpy as np

from .config import CONFIG_DIR, load_config
from .data import domain_map_file

DEMO_CONFIG = CONFIG_DIR / "demo_sam.yaml"
DEMO_CONFIGS = {"sam": DEMO_CONFIG, "sam2": CONFIG_DIR / "demo_sam2.yaml"}
LOG_DIRS = {"sam": "log_sam1", "sam2": "log_sam2"}
# --compare: the methods, all with the same learning module (LoRA, the baselines' recipes' and
# configs/samcl_lora_vit_b.yaml's), so that only the method differs
# (a variant "method:value" as the sweep's --methods: samcl:oracle routes by the true domain, merge:ties
# merges the per-domain modules into one)
COMPARED = ("zeroshot", "finetune", "er", "samcl", "samcl:oracle", "samcl:ncm", "merge:ties")
COMPARED_MODULE = "lora"
BACKBONE_NAMES = {"sam": "SAM", "sam2": "SAM 2.1 (Hiera)"}

Painter = Callable[[np.random.Generator, int, int], Tuple[np.ndarray, np.ndarray]]


def _noise(rng: np.random.Generator, h: int, w: int, base, amp: float) -> np.ndarray:
    img = np.array(base, np.float32)[None, None, :] + rng.normal(0, amp, (h, w, 3)).astype(np.float32)
    return cv2.GaussianBlur(img, (5, 5), 0)


def _ellipse_mask(rng, h, w, scale=(0.15, 0.3)) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    c = (int(rng.uniform(0.3, 0.7) * w), int(rng.uniform(0.3, 0.7) * h))
    ax = (int(rng.uniform(*scale) * w), int(rng.uniform(*scale) * h))
    cv2.ellipse(m, c, ax, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    return m


def paint_polyp(rng, h, w):
    """Pink mucosa, a brighter smooth blob (like Kvasir)."""
    img = _noise(rng, h, w, (200, 90, 100), 12)
    m = _ellipse_mask(rng, h, w)
    blob = cv2.GaussianBlur((m > 0).astype(np.float32), (9, 9), 0)[..., None]
    img = img * (1 - 0.5 * blob) + np.array([250, 170, 150], np.float32) * 0.5 * blob
    return img, m


def paint_shadow(rng, h, w):
    """Light textured ground, a dark polygonal shadow (like ISTD)."""
    img = _noise(rng, h, w, (170, 165, 150), 25)
    m = np.zeros((h, w), np.uint8)
    n = rng.integers(4, 7)
    cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.15, 0.35, n) * min(h, w)
    pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
    cv2.fillPoly(m, [pts], 255)
    img = np.where(m[..., None] > 0, img * 0.45, img)
    return img, m


def paint_lesion(rng, h, w):
    """Skin tone with hair-like lines, a dark brown irregular lesion (like ISIC)."""
    img = _noise(rng, h, w, (225, 185, 160), 8)
    for _ in range(6):
        p1 = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        p2 = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
        cv2.line(img, p1, p2, (90, 60, 50), 1)
    m = _ellipse_mask(rng, h, w, (0.12, 0.25))
    m = cv2.dilate(m, np.ones((5, 5), np.uint8), iterations=int(rng.integers(0, 3)))
    img = np.where(m[..., None] > 0, np.array([110, 70, 50], np.float32) + rng.normal(0, 10, (h, w, 3)), img)
    return img, m


def paint_natural(rng, h, w):
    """Colourful clutter of rectangles; the object is the largest one (like COCO)."""
    img = np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * rng.uniform(50, 200, 3) + rng.uniform(0, 60, 3)
    img = np.repeat(img, h, 0).astype(np.float32)
    for _ in range(5):
        x0, y0 = int(rng.uniform(0, w * 0.8)), int(rng.uniform(0, h * 0.8))
        cv2.rectangle(img, (x0, y0), (x0 + int(w * 0.15), y0 + int(h * 0.15)), rng.uniform(0, 255, 3).tolist(), -1)
    m = np.zeros((h, w), np.uint8)
    x0, y0 = int(rng.uniform(0.1, 0.4) * w), int(rng.uniform(0.1, 0.4) * h)
    x1, y1 = x0 + int(rng.uniform(0.3, 0.5) * w), y0 + int(rng.uniform(0.3, 0.5) * h)
    cv2.rectangle(m, (x0, y0), (x1, y1), 255, -1)
    img[m > 0] = rng.uniform(0, 255, 3)
    return img, m


DOMAINS: Dict[str, Painter] = {"polyp": paint_polyp, "shadow": paint_shadow, "lesion": paint_lesion,
                               "natural": paint_natural}


def make_demo_data(root: Path, n_train: int = 48, n_test: int = 12, seed: int = 0,
                   points: bool = True) -> Dict[str, Dict[str, str]]:
    """Write ``root/data/<Domain>/{train,test}`` in the release layout plus the two JSON maps
    and (``points``) every split's ``masks/points.json`` as generate_point.py writes it.

    Image sizes vary (non-square); even-numbered files are JPEG, odd ones PNG.
    Returns the two maps.
    """
    from .points import generate_split_points

    root = Path(root)
    maps: Dict[str, Dict[str, str]] = {"train": {}, "test": {}}
    for k, (name, paint) in enumerate(DOMAINS.items()):
        for split, n in (("train", n_train), ("test", n_test)):
            rng = np.random.default_rng([seed, k, split == "test"])
            folder = root / "data" / name.capitalize() / split
            (folder / "images").mkdir(parents=True, exist_ok=True)
            (folder / "masks").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(96, 160)), int(rng.integers(96, 200))
                img, mask = paint(rng, h, w)
                ext = ".jpg" if i % 2 == 0 else ".png"
                img = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
                cv2.imwrite(str(folder / "images" / f"{name}_{i:03d}{ext}"), img)
                cv2.imwrite(str(folder / "masks" / f"{name}_{i:03d}.png"), mask)
            maps[split][name] = f"data/{name.capitalize()}/{split}"
            if points:
                generate_split_points(folder)
    for split in ("train", "test"):
        (root / f"datasets_{split}.json").write_text(json.dumps(maps[split], indent=2))
    return maps


def main(argv=None) -> None:
    from .cli import Parser, explained_errors, resolve_device

    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="demo_output", help="folder for the data and the run (default demo_output)")
    p.add_argument("--backbone", choices=sorted(DEMO_CONFIGS), default="sam",
                   help="sam: tiny SAM ViT (configs/demo_sam.yaml, default); sam2: tiny SAM 2.1 Hiera "
                        "(configs/demo_sam2.yaml)")
    p.add_argument("--epoch", type=int, help="epochs per domain (default: the demo config's)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--pictures", type=Path, help="also write the run's report.png and one test overlay into this "
                                                 "folder as demo_report.png and demo_overlay.png")
    p.add_argument("--compare", action="store_true",
                   help="train zero-shot, fine-tuning and ER beside SAMCL, SAMCL routed by the true domain "
                        "(oracle) and by nearest means (ncm), and TIES-merged modules, on the same domains, all with "
                        "a LoRA module, and print their comparison (the release's AA / FM / FT, the canonical "
                        "FM_max / BWT / FWT / AIA, the unseen domain's score beside the vanilla one, storage, time; "
                        "docs/metrics.md); also written as <output>/compare.csv and compare.png")
    args = p.parse_args(argv)
    device = resolve_device(None, args.device)
    with explained_errors():
        (_compare if args.compare else _run)(args, device)


def _prepare(out: Path, device, step: str) -> Path:
    """Logging to the terminal, the synthetic data in ``out``, one CPU thread; returns ``out``."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
    print(f"[demo] {step} drawing synthetic domains {list(DOMAINS)} into {out / 'data'}")
    make_demo_data(out)
    # CPU reductions split their work by thread, and the last bits they round differently move the
    # selector's borderline choices: one thread makes the printed table the same on every machine
    # with the same instruction set (the tiny model gains nothing from more).
    if device.type == "cpu":
        torch.set_num_threads(1)
    return out


def _data_settings(out: Path) -> Dict[str, str]:
    """The demo's data settings: its folder and its two maps by absolute path (a relative map path is read
    under the data root, and refused if the current folder holds another map of the same name)."""
    return {"data_root": str(out), **{f"{split}_json": str(domain_map_file(f"datasets_{split}.json", out))
                                      for split in ("train", "test")}}


def next_step(run_dir: Path, out: Path) -> str:
    """A predict.py command on ``run_dir`` and one of the demo's test images, prompted at its centre."""
    from PIL import Image

    image = sorted((out / "data" / "Polyp" / "test" / "images").iterdir())[0]
    with Image.open(image) as im:
        w, h = im.size
    return (f"python predict.py --run_dir {shlex.quote(str(run_dir))} --input {shlex.quote(str(image))} "
            f"--points {w // 2},{h // 2} --output {shlex.quote(str(out / 'predict'))}")


def _run(args: argparse.Namespace, device) -> None:
    from .pipeline import test, train
    t0 = time.time()
    out = _prepare(Path(args.output), device, "1/3")
    cfg = load_config(DEMO_CONFIGS[args.backbone],
                      {**_data_settings(out), "output_dir": str(out / LOG_DIRS[args.backbone]), "epoch": args.epoch})
    name = BACKBONE_NAMES[args.backbone]
    print(f"[demo] 2/3 training SAMCL over {cfg.order} (unseen: {cfg.unseen}) with a tiny random-weight {name}")
    train(cfg, device, overwrite=True)
    print("[demo] 3/3 testing the run folder (routed by the Module Selector)")
    run_dir = cfg.resolved_run_dir()
    test(run_dir, cfg, device, save_overlays=1)
    if args.pictures:
        args.pictures.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "report.png", args.pictures / "demo_report.png")
        shutil.copyfile(sorted((run_dir / "overlays").glob("polyp_*.png"))[0], args.pictures / "demo_overlay.png")
        print(f"[demo] pictures: {args.pictures / 'demo_report.png'}, {args.pictures / 'demo_overlay.png'}")
    print(f"[demo] finished in {time.time() - t0:.0f} s; run folder: {cfg.resolved_run_dir()}")
    print(f"[demo] synthetic data and a random tiny backbone: real results need the official {name} weights "
          "and datasets (README).")
    print(f"[demo] next: segment an image with the run (masks and overlays in {out / 'predict'}):\n"
          f"    {next_step(run_dir, out)}")


def _compare(args: argparse.Namespace, device) -> None:
    """Every method of COMPARED on the demo's domains, then one table."""
    from .compare import markdown, summarise, write_csv
    from .pictures import draw_comparison
    from .pipeline import train
    from .sweep_plan import method_settings
    t0 = time.time()
    out = _prepare(Path(args.output), device, "1/2")
    runs = []
    for k, method in enumerate(COMPARED, 1):
        cfg = load_config(DEMO_CONFIGS[args.backbone], {
            **_data_settings(out), "epoch": args.epoch, **method_settings(method), "learning_module": COMPARED_MODULE,
            "run_dir": str(out / f"compare_{args.backbone}" / method.replace(":", "-"))})
        print(f"[demo] 2/2 ({k}/{len(COMPARED)}) training {method} ({cfg.learning_module_kind}) over {cfg.order}")
        train(cfg, device, overwrite=True)
        runs.append(cfg.resolved_run_dir())
    rows = [summarise(r) for r in runs]
    write_csv(rows, out / "compare.csv")
    draw_comparison(rows, out / "compare.png")
    print(markdown(rows))
    print(f"[demo] finished in {time.time() - t0:.0f} s; wrote {out / 'compare.csv'} and {out / 'compare.png'}")


if __name__ == "__main__":
    from .cli import run_script

    run_script(main)
