"""Click to segment: a local web app over a trained run (``samcl-app``, ``python -m samcl.app``).

    samcl-app --run_dir RUN                  # http://127.0.0.1:7860, reachable from this machine only
    samcl-app --run_dir RUN --port 8000 --device cpu
    samcl-app --run_dir RUN --host           # every interface (0.0.0.0): other machines can reach it
    samcl-app --run_dir checkpoint/SAM1      # the authors' release folder, on the official ViT-B weights

RUN is a run folder of this project, a converted release folder or the authors' raw release
folder (as predict.py opens them). Open an image (upload, drag and drop, or one of the run's
test images from the list) and click on the object: each click adds a foreground point, or a
background point with that tool; the box tool takes two clicks, one per corner. Every click
shows the mask, the points, the box and, for a test image, its ground-truth outline; beside the
image, the domain whose module segmented (the Module Selector's choice, or the one forced in the
drop-down, "vanilla": no module), the selector's probabilities and the predicted IoU. The mask
downloads as a 0/255 PNG at the image's size, beside the overlay.

An image's frozen encoder prefix, which also feeds the selector, is computed once when the image
is opened (``set_image``); a click runs the chosen module's encoder blocks after it and the
decoder, and its time is shown. Errors (an unreadable image, a run folder that does not load)
are one sentence in the page; the server goes on. The page can open another run folder.

Needs gradio: pip install 'samcl[app]'.
"""
import argparse
import importlib.util
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .data import DataError, binarize_mask, pair_split, read_domain_map, read_image
from .pictures import enlargement, overlay

log = logging.getLogger("samcl.app")

INSTALL_HINT = "samcl-app needs gradio, which is not installed: pip install 'samcl[app]' (or: pip install gradio)"
LOOPBACK = "127.0.0.1"
EVERY_INTERFACE = "0.0.0.0"  # --host without an address
ROUTED = "routed by the Module Selector"  # the drop-down's choice that forces nothing
VANILLA = "vanilla"  # samcl.model.VANILLA, named here without importing torch
FOREGROUND, BACKGROUND, BOX = "foreground point", "background point", "box (two corners)"
TOOLS = (FOREGROUND, BACKGROUND, BOX)
MAX_TEST_IMAGES = 500  # listed per domain


@dataclass
class Session:
    """One browser tab's image and prompts (gradio keeps one per tab)."""

    image: Optional[np.ndarray] = None  # (H, W, 3) uint8 RGB
    name: str = ""  # the image's file name
    key: int = 0  # the image's number: the predictor holds one image's prefix at a time
    truth: Optional[np.ndarray] = None  # (H, W) bool, a test image's ground truth
    points: List[Tuple[float, float]] = field(default_factory=list)  # (x, y) in the image's pixels
    labels: List[int] = field(default_factory=list)  # 1 foreground, 0 background
    box: Optional[Tuple[float, float, float, float]] = None  # x0, y0, x1, y1 in the image's pixels
    corner: Optional[Tuple[float, float]] = None  # a box's first corner, until the second click
    added: List[str] = field(default_factory=list)  # "point" / "box" in the order given (for undo)
    embed_seconds: float = 0.0  # the image's set_image
    shown: Optional["View"] = None  # the latest view of these prompts


class View(NamedTuple):
    """What the page shows after a callback."""

    picture: Optional[np.ndarray]  # the overlay (enlarged for a small image), or the image before a prompt
    domain: str  # the domain whose module segmented ("vanilla": none); "" without a mask
    probabilities: Dict[str, float]  # the Module Selector's softmax over the run's domains ({}: it does not route)
    details: str  # how the module was chosen, the predicted IoU and the time of the click
    message: str  # one sentence: an error, or what to do next
    files: List[str]  # the mask (0/255 PNG at the image's size) and the overlay
    mask: Optional[np.ndarray]  # (H, W) bool


def one_sentence(e: BaseException) -> str:
    """An exception's message (and notes) on one line."""
    return "; ".join(" ".join(part.split()) for part in [str(e), *getattr(e, "__notes__", [])])


class ClickApp:
    """The app's callbacks, independent of the web page: each takes the tab's :class:`Session`
    and returns it with the :class:`View` to show. One predictor serves every tab, one call at a time."""

    def __init__(self, device: Any = "cpu", amp: str = "off", data_root: Optional[str] = None,
                 folder: Optional[Path] = None, **settings: Any) -> None:
        self.device, self.amp, self.data_root = device, amp, data_root
        self.settings = {k: v for k, v in settings.items() if v is not None}  # ckpt, random_weights, img_size
        self.predictor = None  # SAMCLPredictor of the open run
        self.run_dir = ""
        self.error = ""  # why the last run folder did not open
        self.test_images: Dict[str, Tuple[Path, Path]] = {}  # "domain / file" -> (image, mask)
        self.folder = Path(tempfile.mkdtemp(prefix="samcl-app-")) if folder is None else Path(folder)
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._embedded = 0  # the key of the image whose prefix the predictor holds

    # ------------------------------------------------------------------ the run
    def open_run(self, run_dir: str) -> str:
        """Open a run folder (the open one stays if this one does not load); returns the sentence to show."""
        from .predictor import SAMCLPredictor

        run_dir = str(run_dir or "").strip()
        if not run_dir:
            return "Give a run folder."
        try:
            predictor = SAMCLPredictor.from_run(run_dir, device=self.device, amp=self.amp, **self.settings)
        except Exception as e:  # whatever the folder holds, the page says why and the server goes on
            if not isinstance(e, (ValueError, OSError)):
                log.exception("opening %s", run_dir)
            self.error = f"The run folder {run_dir} does not load: {one_sentence(e)}"
            return self.error
        with self._lock:
            self.predictor, self.run_dir, self.error, self._embedded = predictor, run_dir, "", 0
        self.test_images, listed = self._list_test_images()
        model = predictor.model
        return (f"Opened {run_dir}: {model.kind} modules for "
                f"{', '.join(d for d in model.domains if model.module_for(d) is not None) or 'no domain'}; {listed}")

    def _list_test_images(self) -> Tuple[Dict[str, Tuple[Path, Path]], str]:
        cfg = self.predictor.run.config
        root = self.data_root or cfg.data_root
        try:
            splits = read_domain_map(cfg.test_json, root)
        except (ValueError, OSError):
            return {}, f"no test images listed ({cfg.test_json} not found under {root}; --data_root names the data)."
        found: Dict[str, Tuple[Path, Path]] = {}
        for domain, split in splits.items():
            try:
                pairs = pair_split(split)
            except (ValueError, OSError):
                continue
            for image, mask in pairs[:MAX_TEST_IMAGES]:
                found[f"{domain} / {image.name}"] = (image, mask)
        return found, f"{len(found)} test images listed."

    def domain_choices(self) -> List[str]:
        """The drop-down: the selector's choice, every domain's module, vanilla."""
        domains = [] if self.predictor is None else list(self.predictor.model.domains)
        return [ROUTED] + domains + [VANILLA]

    def status(self) -> str:
        return self.error or ("Open an image: upload one, drop one, or pick a test image." if self.predictor
                              else "No run folder is open.")

    # ------------------------------------------------------------------ images
    def open_upload(self, session: Session, path: Optional[str], forced: str = ROUTED) -> Tuple[Session, View]:
        """An uploaded (or dropped) image file."""
        if not path:
            return Session(), self._view(Session(), message=self.status())
        name = Path(path).name
        try:
            image = np.asarray(read_image(Path(path)))
        except (DataError, OSError):
            return Session(), self._view(Session(), message=f"{name} cannot be read as an image: it is corrupt, "
                                                            f"truncated or not an image file.")
        return self._opened(image, name, None, forced)

    def open_test_image(self, session: Session, label: Optional[str], forced: str = ROUTED) -> Tuple[Session, View]:
        """One of the run's test images, with its ground truth."""
        if not label or label not in self.test_images:
            return session, self.segment(session, forced)
        image_path, mask_path = self.test_images[label]
        try:
            image = np.asarray(read_image(image_path))
            cfg = self.predictor.run.config
            truth = binarize_mask(np.asarray(read_image(mask_path, gray=True)), cfg.mask_binarize,
                                  cfg.mask_threshold) > 0
        except (DataError, OSError) as e:
            return Session(), self._view(Session(), message=one_sentence(e))
        return self._opened(image, image_path.name, truth if truth.shape == image.shape[:2] else None, forced)

    def _opened(self, image: np.ndarray, name: str, truth: Optional[np.ndarray],
                forced: str) -> Tuple[Session, View]:
        session = Session(image=image, name=name, key=next(self._numbers), truth=truth)
        if self.predictor is None:
            return session, self._view(session, message=self.status())
        with self._lock:
            self._embed(session)
        return session, self._view(session, message=f"{name}: {image.shape[1]}x{image.shape[0]}; click on the object "
                                                    f"(set_image took {session.embed_seconds:.2f} s).")

    def _embed(self, session: Session) -> None:
        """set_image for the session's image (under the lock)."""
        t0 = time.perf_counter()
        self.predictor.set_image(session.image)
        session.embed_seconds = time.perf_counter() - t0
        self._embedded = session.key

    # ------------------------------------------------------------------ prompts
    def click(self, session: Session, x: float, y: float, tool: str = FOREGROUND,
              forced: str = ROUTED) -> Tuple[Session, View]:
        """A click at pixel (x, y) of the picture shown (the image enlarged by
        :func:`samcl.pictures.enlargement`, the legend below it)."""
        if session.image is None:
            return session, self._view(session, message="Open an image first.")
        h, w = session.image.shape[:2]
        scale = enlargement(w)
        px, py = float(x) / scale, float(y) / scale
        if not (0 <= px <= w and 0 <= py <= h):
            return session, self._again(session, forced, "Click on the image, not on the legend below it.")
        message = ""
        if tool == BOX:
            if session.corner is None:
                session.corner = (px, py)
                return session, self._again(session, forced, "Click the box's opposite corner.")
            (x0, y0), session.corner = session.corner, None
            session.box = (min(x0, px), min(y0, py), max(x0, px), max(y0, py))
            session.added = [a for a in session.added if a != "box"] + ["box"]
        elif tool in (FOREGROUND, BACKGROUND):
            session.points.append((px, py))
            session.labels.append(1 if tool == FOREGROUND else 0)
            session.added.append("point")
        else:
            message = f"Unknown tool {tool!r}; choose one of: {', '.join(TOOLS)}."
        return session, self.segment(session, forced, message)

    def undo(self, session: Session, forced: str = ROUTED) -> Tuple[Session, View]:
        """Take back the last point or box (or a box's first corner)."""
        if session.corner is not None:
            session.corner = None
        elif session.added:
            if session.added.pop() == "box":
                session.box = None
            else:
                session.points.pop()
                session.labels.pop()
        return session, self.segment(session, forced)

    def clear(self, session: Session, forced: str = ROUTED) -> Tuple[Session, View]:
        """Every prompt off; the image stays."""
        session.points, session.labels, session.box, session.corner, session.added = [], [], None, None, []
        return session, self.segment(session, forced)

    # ------------------------------------------------------------------ segmenting
    def segment(self, session: Session, forced: str = ROUTED, message: str = "") -> View:
        """The session's image with its prompts, by the selector's choice or the ``forced`` domain."""
        session.shown = self._segment(session, forced, message)
        return session.shown

    def _again(self, session: Session, forced: str, message: str) -> View:
        """The latest view with another message (the prompts have not changed)."""
        if session.shown is None:
            return self.segment(session, forced, message)
        return session.shown._replace(message=message)

    def _segment(self, session: Session, forced: str, message: str) -> View:
        if session.image is None or self.predictor is None:
            return self._view(session, message=message or self.status())
        if not session.points and session.box is None:
            return self._view(session, message=message or "Click on the object.")
        domain = None if forced in (None, "", ROUTED) else forced
        model = self.predictor.model
        if not session.points and model.needs_heatmap and domain != VANILLA:
            return self._view(session, message=f"This run's {model.kind} modules read the point heatmap: add a point "
                                               f"on the object to the box, or choose {VANILLA} to segment with the "
                                               f"box alone.")
        try:
            with self._lock:
                if self._embedded != session.key:  # another tab's image (or another run) since
                    self._embed(session)
                t0 = time.perf_counter()
                masks, scores, _ = self.predictor.predict(session.points or None, session.labels or None,
                                                          box=session.box, multimask_output=False, domain=domain)
                seconds = time.perf_counter() - t0
                routing = self.predictor.routing
        except ValueError as e:
            return self._view(session, message=one_sentence(e))
        mask, iou = masks[0], float(scores[0])
        probabilities = dict(routing.probabilities) if model.routes else {}
        prob = probabilities.get(routing.domain)
        caption = (f"{session.name}: {routing.domain}" + (f" (selector {prob:.2f})" if prob is not None else "")
                   + f", IoU prediction {iou:.2f}")
        picture = self._picture(session, mask, caption)
        files = self._write(session, mask, picture)
        return View(np.asarray(picture), routing.domain, probabilities,
                    self._details(routing.domain, domain, probabilities, iou, seconds, session.embed_seconds),
                    message or f"Wrote {Path(files[0]).name} and {Path(files[1]).name}.", files, mask)

    def _details(self, chosen: str, forced: Optional[str], probabilities: Dict[str, float], iou: float,
                 seconds: float, embed_seconds: float) -> str:
        model = self.predictor.model
        if forced is None and not model.routes:
            how = f"**{chosen}**: this run does not route (one shared module, its latest)"
        elif forced is None:
            how = f"**{chosen}**: the Module Selector's choice (probability {probabilities[chosen]:.2f})"
        else:
            top = max(probabilities, key=probabilities.get) if probabilities else None
            how = f"**{chosen}**: forced" + (f" (the selector would choose {top})" if top else "")
        if model.module_for(chosen) is None:  # vanilla, or a domain without a module (an unseen one)
            how += "; no module: the frozen backbone segmented"
        return (f"{how}  \npredicted IoU {iou:.3f}  \nthis click: {seconds * 1000:.0f} ms "
                f"(set_image, once per image: {embed_seconds:.2f} s)")

    def _picture(self, session: Session, mask: Optional[np.ndarray], caption: str) -> Image.Image:
        h, w = session.image.shape[:2]
        points = np.asarray(session.points, dtype=np.float64).reshape(-1, 2)
        return overlay(session.image, np.zeros((h, w), bool) if mask is None else mask, points, session.labels,
                       caption, truth=session.truth, box=session.box)

    def _write(self, session: Session, mask: np.ndarray, picture: Image.Image) -> List[str]:
        folder = self.folder / str(session.key)
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(session.name).stem or "image"
        paths = [folder / f"{stem}_mask.png", folder / f"{stem}_overlay.png"]
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(paths[0])
        picture.save(paths[1])
        return [str(p) for p in paths]

    def _view(self, session: Session, message: str) -> View:
        """The image without a mask (its ground-truth outline and the prompts), or nothing."""
        picture = None
        if session.image is not None:
            picture = np.asarray(self._picture(session, None, f"{session.name}: click on the object"))
        return View(picture, "", {}, "", message, [], None)


# ---------------------------------------------------------------------------- the page
def build_page(app: ClickApp):
    """The gradio Blocks of the app (not launched)."""
    import gradio as gr

    with gr.Blocks(title="SAMCL: click to segment") as page:
        session = gr.State(Session())
        gr.Markdown("### SAMCL: click to segment")
        with gr.Row():
            run_box = gr.Textbox(app.run_dir, label="run folder", scale=4, elem_id="samcl-run")
            open_button = gr.Button("Open run", scale=1)
        message = gr.Markdown(app.status(), elem_id="samcl-message")
        with gr.Row():
            with gr.Column(scale=3):
                picture = gr.Image(label="click on the object", interactive=False, type="numpy", format="png",
                                   buttons=["fullscreen"], elem_id="samcl-overlay")
                with gr.Row():
                    tool = gr.Radio(list(TOOLS), value=FOREGROUND, label="a click adds", elem_id="samcl-tool")
                    undo = gr.Button("Undo", elem_id="samcl-undo")
                    clear = gr.Button("Clear", elem_id="samcl-clear")
            with gr.Column(scale=2):
                upload = gr.File(label="open an image: drop it here or click", file_types=["image"],
                                 type="filepath", elem_id="samcl-upload")
                tests = gr.Dropdown(sorted(app.test_images), value=None, label="or a test image of the run",
                                    filterable=True, elem_id="samcl-test-image")
                forced = gr.Dropdown(app.domain_choices(), value=ROUTED, label="module", elem_id="samcl-force")
                domain = gr.Textbox(label="domain whose module segmented", interactive=False, elem_id="samcl-domain")
                probabilities = gr.Label(label="Module Selector probabilities", elem_id="samcl-probabilities")
                details = gr.Markdown(elem_id="samcl-details")
                files = gr.File(label="downloads: the mask (0/255 PNG at the image's size) and the overlay",
                                file_count="multiple", interactive=False, elem_id="samcl-downloads")
        shown = [session, picture, domain, probabilities, details, message, files]

        def show(s: Session, v: View):
            return [s, v.picture, v.domain, v.probabilities or None, v.details, v.message, v.files or None]

        def on_click(s: Session, t: str, f: str, evt: gr.SelectData):
            return show(*app.click(s, evt.index[0], evt.index[1], t, f))

        def on_open(path: str, s: Session, f: str):
            text = app.open_run(path)
            names = sorted(app.test_images)
            return [gr.update(choices=names, value=None), gr.update(choices=app.domain_choices(), value=ROUTED),
                    *show(s, app.segment(s, ROUTED, text))]

        upload.upload(lambda s, p, f: show(*app.open_upload(s, p, f)), [session, upload, forced], shown)
        tests.input(lambda s, n, f: show(*app.open_test_image(s, n, f)), [session, tests, forced], shown)
        picture.select(on_click, [session, tool, forced], shown)
        forced.input(lambda s, f: show(s, app.segment(s, f)), [session, forced], shown)
        undo.click(lambda s, f: show(*app.undo(s, f)), [session, forced], shown)
        clear.click(lambda s, f: show(*app.clear(s, f)), [session, forced], shown)
        open_button.click(on_open, [run_box, session, forced], [tests, forced, *shown])
    return page


def serve(app: ClickApp, host: str, port: int) -> Any:
    """Start the page on ``host``:``port`` in the background; returns the launched Blocks."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: the app works offline
    page = build_page(app)
    page.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=True,
                quiet=True, ssr_mode=False, theme=theme, allowed_paths=[str(app.folder)])
    return page


def binding(host: str, port: int) -> str:
    """The start-up line: where the app is and who can reach it."""
    if host == LOOPBACK:
        who = f"bound to {LOOPBACK}, so only this machine can reach it (--host serves other machines)"
    else:
        who = f"bound to {host}, so other machines on the network can reach it, without a password"
    return f"samcl-app: http://{LOOPBACK if host == EVERY_INTERFACE else host}:{port} is {who}; Ctrl-C stops it"


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .cli import CLIError, Parser, add_setting_flag, resolve_device

    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run_dir", required=True, help="a trained run folder (or the authors' release folder)")
    p.add_argument("--port", type=int, default=7860, help="the port (default 7860)")
    p.add_argument("--host", nargs="?", const=EVERY_INTERFACE, default=LOOPBACK,
                   help=f"serve other machines: the address to bind (alone: {EVERY_INTERFACE}, every interface; "
                        f"default {LOOPBACK}, this machine only)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: GPU 0 if present, else CPU)")
    p.add_argument("--data_root", help="the folder the run's test images are listed from (default: the run's own "
                                       "data_root)")
    add_setting_flag(p, "amp", with_default=True)
    add_setting_flag(p, "ckpt", help="backbone weights (default: the run's own)")
    add_setting_flag(p, "random_weights", help="random backbone weights (smoke tests; default: the run's own)")
    add_setting_flag(p, "img_size", help="model input side for a release folder (default: the architecture's)")
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port} is not a port (1 to 65535)")
    if importlib.util.find_spec("gradio") is None:
        raise CLIError(INSTALL_HINT)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app sends nothing away
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own requests to the page, one line each
    device = resolve_device(None, args.device)
    app = ClickApp(device, amp=args.amp, data_root=args.data_root, ckpt=args.ckpt,
                   random_weights=args.random_weights, img_size=args.img_size)
    print(app.open_run(args.run_dir), flush=True)  # a folder that does not load is said in the page too
    try:
        page = serve(app, args.host, args.port)
    except OSError as e:
        raise CLIError(f"cannot serve on {args.host}:{args.port}: {one_sentence(e)} (--port picks another)") from None
    print(binding(args.host, args.port), flush=True)
    try:
        page.block_thread()  # until Ctrl-C
    finally:
        shutil.rmtree(app.folder, ignore_errors=True)  # the downloads written


if __name__ == "__main__":
    from .cli import run_script

    run_script(main)
