"""Drive samcl-app as a person would, in a headless chromium: playwright on the system's browser
(Debian's chromium; playwright downloads none). tests/test_app.py uses it, and it makes the
README's picture of the app:

    python tests/app_browser.py RUN_DIR IMAGE X Y docs/images/app.png

starts the app on RUN_DIR, opens IMAGE, clicks its pixel (X, Y) and saves the page.
"""
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: this checkout's samcl
    sys.path.insert(0, str(REPO))
# headless, no sandbox (containers), and nothing fetched from the network behind the page's back
CHROMIUM_FLAGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
VIEWPORT = {"width": 1200, "height": 820}


def find_chromium() -> Optional[str]:
    """The system's chromium, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    """A TCP port of the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(run_dir: Path, args: Sequence[str] = (), timeout: float = 120) -> Iterator[str]:
    """``python -m samcl.app --run_dir RUN_DIR`` on a free loopback port; yields its URL once it serves
    (its start-up line), and stops it at the end. Its output is in the error if it does not start."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "samcl.app", "--run_dir", str(run_dir), "--port", str(port),
                             "--device", "cpu", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not any(line.startswith(f"samcl-app: {url} ") for line in seen):
            if proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)
                while not lines.empty():
                    seen.append(lines.get())
                raise RuntimeError("samcl-app did not start:\n" + "".join(seen))
            try:
                seen.append(lines.get(timeout=0.5))
            except queue.Empty:
                pass
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the app closes its server and removes its downloads
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def click_to_segment(url: str, image: Path, xy: Sequence[float], profile: Path,
                     screenshot: Optional[Path] = None, browser: Optional[str] = None,
                     then: Optional[Callable[[Any], None]] = None) -> Dict[str, object]:
    """Open the page, upload ``image``, click its pixel ``xy`` on the picture and wait for the result.
    Returns the domain shown, the details, the downloads listed and the picture's address before and
    after the click; ``screenshot``: the page as PNG (after the click); ``then``: called with the
    playwright page at the end."""
    from playwright.sync_api import expect, sync_playwright

    from samcl.pictures import enlargement

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=browser or find_chromium(), headless=True, args=list(CHROMIUM_FLAGS),
            viewport=VIEWPORT)
        try:
            page = context.new_page()
            page.goto(url)
            page.locator("#samcl-upload input[type=file]").set_input_files(str(image))
            picture = page.locator("#samcl-overlay img")
            picture.wait_for(state="visible", timeout=60_000)
            page.wait_for_function("() => { const e = document.querySelector('#samcl-overlay img');"
                                   " return e && e.complete && e.naturalWidth > 0 }", timeout=60_000)
            before = picture.get_attribute("src")
            box = picture.bounding_box()
            natural_w, natural_h = picture.evaluate("e => [e.naturalWidth, e.naturalHeight]")
            # the picture is the image enlarged by a whole factor (and a legend below), fitted into the element
            ratio = min(box["width"] / natural_w, box["height"] / natural_h, 1)
            left, top = (box["width"] - natural_w * ratio) / 2, (box["height"] - natural_h * ratio) / 2
            from PIL import Image

            with Image.open(image) as im:
                scale = enlargement(im.width)
            picture.click(position={"x": left + xy[0] * scale * ratio, "y": top + xy[1] * scale * ratio})
            domain = page.locator("#samcl-domain textarea, #samcl-domain input")
            try:
                expect(domain).not_to_have_value("", timeout=60_000)
            except AssertionError:
                raise AssertionError("no domain after the click; the page says: "
                                     + page.locator("#samcl-message").inner_text()) from None
            expect(page.locator("#samcl-downloads")).to_contain_text("_mask", timeout=60_000)
            page.wait_for_function("() => { const e = document.querySelector('#samcl-overlay img');"
                                   " return e && e.complete && e.naturalWidth > 0 }", timeout=60_000)
            result = {"domain": domain.input_value(), "details": page.locator("#samcl-details").inner_text(),
                      "downloads": page.locator("#samcl-downloads").inner_text(), "before": before,
                      "after": picture.get_attribute("src"), "message": page.locator("#samcl-message").inner_text()}
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            if then is not None:
                then(page)
            return result
        finally:
            context.close()


def small_png(path: Path, colours: int = 96) -> None:
    """Rewrite a screenshot with a palette of ``colours``: a third of its size, alike to the eye."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


if __name__ == "__main__":
    import tempfile

    if len(sys.argv) != 6:
        sys.exit(__doc__)
    run, picture_of, x, y, out = sys.argv[1:]
    with running_app(Path(run)) as address, tempfile.TemporaryDirectory() as tmp:
        shown = click_to_segment(address, Path(picture_of), (float(x), float(y)), Path(tmp) / "profile",
                                 screenshot=Path(out))
    small_png(Path(out))
    print(f"{out}: {shown['domain']}; {Path(out).stat().st_size // 1024} KB")
