r"""Segment your own images with a trained run: masks, overlays and predictions.json.

    python predict.py --run_dir RUN --input photo.jpg --points "120,80;200,140" --output out/
    python predict.py --run_dir RUN --input photo.jpg --box "40,30,400,300" --output out/
    python predict.py --run_dir RUN --input data/Kvasir/test/images --output out/ \
        --points_json data/Kvasir/test/masks/points.json

For every image: ``<stem>_mask.png`` (0/255 at the image's size), ``<stem>_overlay.png``
(the mask's outline and tint, the ground truth's outline when given, the points and the box
over the image, a legend, and the routed domain and its probability in a caption), and one
``predictions.json`` for all (domain, selector probabilities, IoU prediction, mask area, seconds).
--points and --box are in each image's own pixels, the same for every image.

--points_json takes either of two files:
  1. the data's own <split>/masks/points.json, as generate_point.py writes it: keyed by MASK file
     name, every entry [[[x, y], ...], [label, ...]] in the 1024 x 1024 frame (label 1 foreground,
     0 background); entries are matched to the images by file stem (as training pairs images and
     masks) and scaled to each image's own pixels:
         {"cju0qkwl35piu0993l0dewei2.png": [[[512.0, 388.0], [471.0, 602.0]], [1, 1]]}
  2. your own prompts in each image's own pixels, keyed by image file name (or its stem), each
     entry [[x, y], ...] (all foreground) or [[[x, y], ...], [label, ...]]:
         {"photo.jpg": [[120, 80], [200, 140]], "scan.png": [[[40, 52], [300, 10]], [1, 0]]}
--points_frame says which: auto (the default) reads a file named points.json whose entries all
carry labels as the data's (1024), any other file as pixels; the choice is printed.

--box alone (no points) works for learning modules that do not read the point heatmap (lora,
adapter, decoder, ...) and with --domain vanilla; an AugModule run needs at least one point with it.
A folder is processed in batches, routed as a batch (one by one with a box); a file that cannot be
read or prompted is listed at the end and the rest are processed (exit status 1 then).
"""
import argparse
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .data import POINTS_FILE, POINTS_FRAME

log = logging.getLogger("samcl.predict")

PIXELS = "pixels"  # --points_frame: coordinates in each image's own pixels
FRAMES = ("auto", PIXELS, str(POINTS_FRAME))
Prompt = Tuple[List[List[float]], Optional[List[int]]]  # points [[x, y], ...] and labels (None: all foreground)


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


def _labelled(entry) -> bool:
    """``[[[x, y], ...], [label, ...]]`` (points with labels) rather than ``[[x, y], ...]``."""
    return (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list) and isinstance(entry[1], list)
            and (not entry[0] or isinstance(entry[0][0], list)))


class PromptFile:
    """The prompts of ``--points_json``: an entry per image, found by the image's file name or
    stem, in the image's own pixels (``frame`` None) or in the data's 1024 x 1024 frame of
    points.json (``frame`` 1024), scaled to the image by :meth:`prompt`."""

    def __init__(self, path: Path, frame: str = "auto") -> None:
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--points_json {path} cannot be read as JSON ({e})") from None
        if not isinstance(data, dict) or not data:
            raise ValueError(f"--points_json {path} must map file names to points (see predict.py --help)")
        self.entries: Dict[str, list] = data
        if frame == "auto":
            data_file = self.path.name == POINTS_FILE and all(_labelled(e) for e in data.values())
            frame = str(POINTS_FRAME) if data_file else PIXELS
        if frame not in FRAMES[1:]:
            raise ValueError(f"--points_frame must be one of {', '.join(FRAMES)}, got {frame!r}")
        self.frame: Optional[int] = None if frame == PIXELS else int(frame)
        self.by_stem: Dict[str, List[str]] = {}
        for name in data:
            self.by_stem.setdefault(Path(name).stem, []).append(name)

    def describe(self) -> str:
        if self.frame is None:
            return (f"--points_json {self.path}: {len(self.entries)} entries in each image's own pixels "
                    f"(--points_frame {POINTS_FRAME} if they are a points.json of the data)")
        return (f"--points_json {self.path}: {len(self.entries)} entries of the data's points.json format (keyed "
                f"by mask name, {self.frame} x {self.frame} frame), matched by stem and scaled to each image's "
                f"pixels (--points_frame {PIXELS} if they are pixels)")

    def key(self, image: Path) -> str:
        """The entry of ``image``: its file name, else the one entry with its stem (a mask's name)."""
        if image.name in self.entries:
            return image.name
        keys = self.by_stem.get(image.stem, [])
        if len(keys) == 1:
            return keys[0]
        if keys:
            raise ValueError(f"{image}: --points_json {self.path} has {len(keys)} entries with its stem "
                             f"({', '.join(keys)}); keep one, or key one by {image.name}")
        raise ValueError(f"{image}: --points_json {self.path} has no entry for {image.name} (nor for another "
                         f"file named {image.stem}.*)")

    def prompt(self, image: Path, hw: Tuple[int, int]) -> Prompt:
        """The points of ``image`` (of size ``hw`` = (H, W)) in its own pixels, and their labels."""
        key = self.key(image)
        entry = self.entries[key]
        where = f"{image}: entry {key!r} of --points_json {self.path}"
        pts, labels = (entry[0], entry[1]) if _labelled(entry) else (entry, None)
        try:
            pts = [[float(x), float(y)] for x, y in pts]
            labels = None if labels is None else [int(v) for v in labels]
        except (TypeError, ValueError):
            raise ValueError(f"{where} is not [[x, y], ...] nor [[[x, y], ...], [label, ...]]: {entry!r}") from None
        if not pts:
            raise ValueError(f"{where} has no points")
        if self.frame is None:
            return pts, labels
        outside = [p for p in pts if not (0 <= p[0] <= self.frame and 0 <= p[1] <= self.frame)]
        if outside:
            raise ValueError(f"{where}: points {outside[:3]} lie outside its {self.frame}x{self.frame} frame; "
                             f"if they are in the image's own pixels, give --points_frame {PIXELS}")
        h, w = hw
        return [[x * w / self.frame, y * h / self.frame] for x, y in pts], labels


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
    p.add_argument("--labels", help="'1,0,...' one per point of --points (default: all 1, foreground)")
    p.add_argument("--points_json", type=Path, help="JSON of points per image: the data's masks/points.json as it "
                   "is, or your own in pixels (both formats above)")
    p.add_argument("--points_frame", choices=FRAMES, default="auto",
                   help=f"--points_json's coordinates: {POINTS_FRAME} (the data's points.json frame, scaled to each "
                        f"image), {PIXELS} (each image's own), or auto (default: a file named {POINTS_FILE} with "
                        f"labels is the data's)")
    p.add_argument("--box", help="'x0,y0,x1,y1' box prompt in each image's pixels, with the points or alone "
                   "(alone: not for a learning module that reads the point heatmap, e.g. augmodule)")
    p.add_argument("--domain", help="force this domain's module ('vanilla': none); default: the selector routes")
    p.add_argument("--output", required=True, type=Path, help="folder for the masks, overlays and predictions.json")
    p.add_argument("--batch_size", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: GPU 0 if present, else CPU)")
    add_setting_flag(p, "amp", with_default=True)
    add_setting_flag(p, "ckpt", help="backbone weights (default: the run's own)")
    add_setting_flag(p, "random_weights", help="random backbone weights (smoke tests; default: the run's own)")
    add_setting_flag(p, "img_size", help="model input side for a release folder (default: the architecture's)")
    args = p.parse_args(argv)
    if args.points is not None and args.points_json is not None:
        p.error("give the points with one of --points and --points_json, not both")
    if args.points is None and args.points_json is None and args.box is None:
        p.error("give the prompts: --points, --points_json or --box (with or without points)")
    if args.labels is not None and args.points is None:
        p.error("--labels goes with --points (a --points_json entry carries its own labels)")
    if args.batch_size < 1:
        p.error("--batch_size must be at least 1")
    device = resolve_device(None, args.device)
    with explained_errors():
        failures = run(args, device)
    if failures:
        raise SystemExit(1)


def box_alone_refusal(kind: str) -> str:
    """Why a box without points is refused for a learning module that reads the point heatmap."""
    return (f"--box alone: this run's learning module ({kind}) reads the point heatmap, so every prompt needs at "
            f"least one point: add --points 'x,y' (a point on the object) with the box, or --domain vanilla to "
            f"segment with the frozen backbone and the box alone")


def run(args: argparse.Namespace, device) -> List[str]:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from .data import DataError, read_image
    from .model import VANILLA
    from .pictures import overlay
    from .predictor import Prediction, SAMCLPredictor

    files = inputs(args.input)
    shared = parse_points(args.points, "--points") if args.points else None
    labels = [int(v) for v in args.labels.split(",")] if args.labels else None
    table = PromptFile(args.points_json, args.points_frame) if args.points_json else None
    box = parse_box(args.box) if args.box else None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    extra = {k: v for k, v in (("img_size", args.img_size),) if v is not None}
    predictor = SAMCLPredictor.from_run(args.run_dir, device=device, amp=args.amp, ckpt=args.ckpt,
                                        random_weights=args.random_weights, **extra)
    if shared is None and table is None and predictor.model.needs_heatmap and args.domain != VANILLA:
        raise ValueError(box_alone_refusal(predictor.model.kind))
    if table is not None:
        print(table.describe())
    args.output.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Dict] = {}
    failures: List[str] = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=None)
    for start in range(0, len(files), args.batch_size):
        ready = []
        for f in files[start: start + args.batch_size]:
            try:
                image = np.asarray(read_image(f))
                pts, lab = table.prompt(f, image.shape[:2]) if table is not None else (shared, labels)
                try:  # refuse bad prompts per file, not the batch
                    predictor.check_prompts(pts, lab, image.shape[:2])
                except ValueError as e:
                    if table is None or table.frame is not None or "lie outside" not in str(e):
                        raise
                    raise ValueError(f"{e}; if --points_json {table.path} is in the data's {POINTS_FRAME} x "
                                     f"{POINTS_FRAME} frame of {POINTS_FILE}, give --points_frame {POINTS_FRAME}"
                                     ) from None
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
            overlay(image, mask, None if pts is None else np.asarray(pts), lab, caption,
                    box=box).save(args.output / f"{f.stem}_overlay.png")
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
