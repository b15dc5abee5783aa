"""Segment your own images with a trained run: masks, overlays and predictions.json.

    python predict.py --run_dir RUN --input photo.jpg --points "120,80;200,140" --output out/
    python predict.py --run_dir RUN --input folder/ --points_json prompts.json --output out/ --domain Kvasir

For every image: ``<stem>_mask.png`` (0/255 at the image's size), ``<stem>_overlay.png``
(the mask and the points over the image, the routed domain and its probability in a
caption), and one ``predictions.json`` for all (domain, selector probabilities, IoU
prediction, mask area, seconds). Point coordinates are in each image's own pixels.
``--points_json`` maps file names to ``[[x, y], ...]`` or ``[[[x, y], ...], [label, ...]]``.
A folder is processed in batches, routed as a batch; a file that cannot be read or
prompted is listed at the end and the rest are processed (exit status 1 then).
"""
import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("samcl.predict")


def parse_points(text: str, where: str) -> List[List[float]]:
    """``"x,y;x,y"`` -> [[x, y], ...]."""
    try:
        pts = [[float(v) for v in p.split(",")] for p in text.replace(" ", "").split(";") if p]
    except ValueError:
        pts = []
    if not pts or any(len(p) != 2 for p in pts):
        raise ValueError(f"{where}: points must read 'x,y;x,y;...', got {text!r}")
    return pts


def parse_box(text: str) -> List[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ValueError(f"--box must read 'x0,y0,x1,y1', got {text!r}")
    return box


def prompts_from_json(path: Path) -> Dict[str, Tuple[List[List[float]], Optional[List[int]]]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--points_json {path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--points_json {path} must map file names to points")
    out = {}
    for name, entry in data.items():
        if isinstance(entry, list) and len(entry) == 2 and entry and isinstance(entry[1], list) \
                and all(isinstance(v, int) for v in entry[1]):
            out[name] = (entry[0], entry[1])
        else:
            out[name] = (entry, None)
    return out


def inputs(path: Path) -> List[Path]:
    from .data import IMAGE_EXTS

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"--input {path} holds no images (extensions {', '.join(IMAGE_EXTS)})")
        return files
    if not path.exists():
        raise FileNotFoundError(f"--input {path} does not exist")
    return [path]


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .cli import Parser, add_setting_flag, explained_errors, resolve_device

    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, help="a trained run folder (or the authors' release folder)")
    p.add_argument("--input", required=True, type=Path, help="an image file or a folder of images")
    p.add_argument("--points", help="'x,y;x,y' in each image's pixels, the same for every image")
    p.add_argument("--labels", help="'1,0,...' one per point (default: all 1, foreground)")
    p.add_argument("--points_json", type=Path, help="JSON: file name -> [[x, y], ...] or [[[x, y], ...], [labels]]")
    p.add_argument("--box", help="'x0,y0,x1,y1' box prompt in pixels, with the points")
    p.add_argument("--domain", help="force this domain's module ('vanilla': none); default: the selector routes")
    p.add_argument("--output", required=True, type=Path, help="folder for the masks, overlays and predictions.json")
    p.add_argument("--batch_size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: GPU 0 if present, else CPU)")
    add_setting_flag(p, "amp", with_default=True)
    add_setting_flag(p, "ckpt", help="backbone weights (default: the run's own)")
    add_setting_flag(p, "random_weights", help="random backbone weights (smoke tests; default: the run's own)")
    add_setting_flag(p, "img_size", help="model input side for a release folder (default: the architecture's, 1024)")
    args = p.parse_args(argv)
    if (args.points is None) == (args.points_json is None):
        p.error("give the prompts with exactly one of --points and --points_json")
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    device = resolve_device(None, args.device)
    with explained_errors():
        failures = run(args, device)
    if failures:
        raise SystemExit(1)


def run(args: argparse.Namespace, device) -> List[str]:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from .data import DataError, read_image
    from .pictures import overlay
    from .predictor import Prediction, SAMCLPredictor

    files = inputs(args.input)
    shared = parse_points(args.points, "--points") if args.points else None
    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    by_name = prompts_from_json(args.points_json) if args.points_json else {}
    box = parse_box(args.box) if args.box else None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    extra = {k: v for k, v in (("img_size", args.img_size),) if v is not None}
    predictor = SAMCLPredictor.from_run(args.run_dir, device=device, amp=args.amp, ckpt=args.ckpt,
                                        random_weights=args.random_weights, **extra)
    args.output.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Dict] = {}
    failures: List[str] = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=None)
    for start in range(0, len(files), args.batch_size):
        ready = []
        for f in files[start: start + args.batch_size]:
            try:
                image = np.asarray(read_image(f))
                pts, lab = (shared, labels) if shared is not None else by_name.get(f.name, (None, None))
                if pts is None:
                    raise ValueError(f"{f}: --points_json {args.points_json} has no entry for {f.name}")
                predictor.check_prompts(pts, lab, image.shape[:2])  # refuse bad prompts per file, not the batch
                ready.append((f, image, pts, lab))
            except (DataError, ValueError, OSError) as e:
                failures.append(f"{f}: {e}" if not str(e).startswith(str(f)) else str(e))
                bar.update(1)
        if not ready:
            continue
        t0 = time.time()
        if box is not None:  # a box is per image, so these go one by one
            outs = []
            for _, image, pts, lab in ready:
                predictor.set_image(image)
                masks, scores, low = predictor.predict(pts, lab, box=box, multimask_output=False, domain=args.domain)
                outs.append(Prediction(masks, scores, low, *predictor.routing))
        else:
            outs = predictor.predict_batch([r[1] for r in ready], [r[2] for r in ready],
                                           [r[3] if r[3] is not None else [1] * len(r[2]) for r in ready],
                                           domain=args.domain)
        seconds = (time.time() - t0) / len(ready)
        for (f, image, pts, lab), out in zip(ready, outs):
            mask = out.masks[0]
            Image.fromarray(mask.astype(np.uint8) * 255).save(args.output / f"{f.stem}_mask.png")
            prob = out.probabilities.get(out.domain)
            caption = f"{f.name}: {out.domain}" + (f" (selector {prob:.2f})" if prob is not None else "") \
                + f", IoU prediction {float(out.iou_predictions[0]):.2f}"
            overlay(image, mask, np.asarray(pts), lab, caption).save(args.output / f"{f.stem}_overlay.png")
            results[f.name] = {"domain": out.domain, "probabilities": out.probabilities,
                               "iou_prediction": float(out.iou_predictions[0]), "area": int(mask.sum()),
                               "height": int(mask.shape[0]), "width": int(mask.shape[1]), "seconds": round(seconds, 4)}
            bar.update(1)
    bar.close()
    (args.output / "predictions.json").write_text(json.dumps({"run_dir": str(args.run_dir), "results": results,
                                                              "failures": failures}, indent=1))
    print(f"wrote {len(results)} mask(s) and overlay(s) and predictions.json to {args.output}")
    if failures:
        print(f"{len(failures)} file(s) failed:\n" + "\n".join(f"  {f}" for f in failures))
    return failures
