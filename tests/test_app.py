"""samcl-app: the callbacks give what SAMCLPredictor gives for the same prompts, and the page works
in a real browser (skipped, with the reason, without gradio, playwright or chromium)."""
import importlib.util
import shutil

import numpy as np
import pytest
from PIL import Image

from samcl import model
from samcl.app import (BACKGROUND, BOX, FOREGROUND, INSTALL_HINT, ROUTED, VANILLA, ClickApp, Session, binding,
                       main)
from samcl.data import read_image
from samcl.pictures import enlargement
from samcl.predictor import SAMCLPredictor
from tests.app_browser import click_to_segment, find_chromium, running_app
from tests.conftest import train_demo_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch SAMCL run on polyp (with a module) and natural (unseen: none), its data beside it."""
    root = tmp_path_factory.mktemp("app")
    train_demo_run(root, n_train=2)
    return root


@pytest.fixture(scope="module")
def app(run, tmp_path_factory):
    app = ClickApp("cpu", folder=tmp_path_factory.mktemp("downloads"))
    assert app.open_run(str(run / "run")) == f"Opened {run / 'run'}: augmodule modules for polyp; 8 test images listed."
    return app


@pytest.fixture(scope="module")
def predictor(run):
    return SAMCLPredictor.from_run(run / "run", device="cpu")


def polyp_image(run, i: int = 0):
    path = sorted((run / "data" / "Polyp" / "test" / "images").iterdir())[i]
    return path, np.asarray(read_image(path))


def expected(predictor, image, points=None, labels=None, box=None, domain=None):
    """The predictor's mask, predicted IoU and routing for ``image`` with these prompts."""
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(points, labels, box=box, multimask_output=False, domain=domain)
    return masks[0], float(scores[0]), predictor.routing


def test_clicks_give_the_predictors_masks_routed_and_forced(app, predictor, run):
    path, image = polyp_image(run)
    session, view = app.open_upload(Session(), str(path))
    assert session.image.shape == image.shape and view.domain == "" and view.mask is None
    s = enlargement(image.shape[1])
    assert s > 1 and view.picture.shape[1] == image.shape[1] * s  # a small image is shown enlarged
    session, view = app.click(session, 40 * s, 30 * s, FOREGROUND)  # pixel (40, 30) of the image
    assert session.points == [(40.0, 30.0)] and session.labels == [1]
    mask, iou, routing = expected(predictor, image, [[40, 30]], [1])
    assert view.domain == routing.domain and view.probabilities == pytest.approx(routing.probabilities)
    assert np.array_equal(view.mask, mask) and f"predicted IoU {iou:.3f}" in view.details
    assert "the Module Selector's choice" in view.details and "this click: " in view.details
    for forced in ("polyp", VANILLA):  # the drop-down: the same prompts, another module
        view = app.segment(session, forced)
        masks, _, _ = predictor.predict([[40, 30]], [1], multimask_output=False, domain=forced)
        assert view.domain == predictor.routing.domain == forced and np.array_equal(view.mask, masks[0])
        assert view.details.startswith(f"**{forced}**: forced (the selector would choose ")
    assert "no module: the frozen backbone segmented" in view.details  # vanilla
    assert app.domain_choices() == [ROUTED, "polyp", "natural", VANILLA] and VANILLA == model.VANILLA


def test_background_points_and_the_box(app, predictor, run):
    _, image = polyp_image(run, 1)
    session, _ = app.open_test_image(Session(), "polyp / " + polyp_image(run, 1)[0].name)
    assert session.truth is not None and session.truth.shape == image.shape[:2] and session.truth.any()
    s = enlargement(image.shape[1])
    session, _ = app.click(session, 50 * s, 40 * s, FOREGROUND)
    session, view = app.click(session, 10 * s, 12 * s, BACKGROUND)
    assert session.points == [(50.0, 40.0), (10.0, 12.0)] and session.labels == [1, 0]
    mask, _, routing = expected(predictor, image, [[50, 40], [10, 12]], [1, 0])
    assert np.array_equal(view.mask, mask) and view.domain == routing.domain
    session, view = app.click(session, 90 * s, 70 * s, BOX)  # the first corner waits for the second
    assert session.box is None and view.message == "Click the box's opposite corner."
    session, view = app.click(session, 20 * s, 15 * s, BOX)
    assert session.box == (20.0, 15.0, 90.0, 70.0)
    mask, _, _ = expected(predictor, image, [[50, 40], [10, 12]], [1, 0], box=[20, 15, 90, 70])
    assert np.array_equal(view.mask, mask)
    session, view = app.clear(session)
    session, _ = app.click(session, 20 * s, 15 * s, BOX)
    session, view = app.click(session, 90 * s, 70 * s, BOX)  # a box alone: the AugModule reads the points
    assert view.mask is None and view.message == (
        "This run's augmodule modules read the point heatmap: add a point on the object to the box, or choose "
        "vanilla to segment with the box alone.")
    view = app.segment(session, VANILLA)
    mask, _, _ = expected(predictor, image, box=[20, 15, 90, 70], domain=VANILLA)
    assert view.domain == VANILLA and np.array_equal(view.mask, mask)
    session, view = app.undo(session, VANILLA)
    assert session.box is None and view.mask is None and view.message == "Click on the object."
    _, view = app.click(session, 10, image.shape[0] * s + 5)  # on the legend below the picture
    assert view.message == "Click on the image, not on the legend below it." and session.points == []


def test_the_downloads_are_the_mask_at_the_images_size_and_the_overlay(app, run):
    path, image = polyp_image(run)
    session, _ = app.open_upload(Session(), str(path))
    session, view = app.click(session, 100, 90)
    mask_file, overlay_file = view.files
    assert [p.rsplit("/", 1)[1] for p in view.files] == [f"{path.stem}_mask.png", f"{path.stem}_overlay.png"]
    with Image.open(mask_file) as m:
        assert m.format == "PNG" and m.mode == "L" and m.size == (image.shape[1], image.shape[0])
        values = np.asarray(m)
    assert set(np.unique(values)) <= {0, 255} and np.array_equal(values == 255, view.mask) and view.mask.any()
    with Image.open(overlay_file) as o:
        assert np.array_equal(np.asarray(o.convert("RGB")), view.picture)


def test_a_corrupt_upload_and_a_bad_run_folder_are_one_sentence_in_the_page(app, run, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    session, view = app.open_upload(Session(), str(bad))
    assert view.message == "broken.jpg cannot be read as an image: it is corrupt, truncated or not an image file."
    assert session.image is None and view.picture is None
    _, view = app.click(session, 5, 5)
    assert view.message == "Open an image first."
    before = app.predictor
    broken = tmp_path / "run"
    shutil.copytree(run / "run", broken)
    (broken / "polyp.safetensors").write_bytes(b"\x00" * 10)
    text = app.open_run(str(broken))
    assert text.startswith(f"The run folder {broken} does not load: ") and "polyp.safetensors" in text
    assert "\n" not in text and app.predictor is before  # the open run stays
    path, _ = polyp_image(run)
    session, _ = app.open_upload(Session(), str(path))
    assert app.click(session, 30, 30)[1].mask is not None


def test_without_gradio_it_says_how_to_install_it(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        main(["--run_dir", "anything"])
    assert e.value.code == f"error: {INSTALL_HINT}"
    assert binding("127.0.0.1", 7860) == ("samcl-app: http://127.0.0.1:7860 is bound to 127.0.0.1, so only this "
                                          "machine can reach it (--host serves other machines); Ctrl-C stops it")
    assert binding("0.0.0.0", 80).startswith("samcl-app: http://127.0.0.1:80 is bound to 0.0.0.0, so other machines")


def test_in_a_browser_a_click_shows_the_overlay_and_the_routed_domain(run, predictor, tmp_path):
    for module, why in (("gradio", "gradio is not installed (pip install 'samcl[app]')"),
                        ("playwright", "playwright is not installed (pip install -r requirements-dev.txt)")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(why)
    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium installed (apt-get install chromium chromium-driver)")
    path, image = polyp_image(run)
    xy = (image.shape[1] // 2, image.shape[0] // 2)

    def errors_in_the_page(page):
        """A corrupt upload, then a run folder that does not load: one sentence each, and the server goes on."""
        from playwright.sync_api import expect

        page.locator("#samcl-upload button[aria-label=Clear]").click()  # the uploaded file off, the drop box back
        page.locator("#samcl-upload input[type=file]").set_input_files(
            {"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8\xff\xe0 not a whole jpeg"})
        expect(page.locator("#samcl-message")).to_have_text(
            "broken.jpg cannot be read as an image: it is corrupt, truncated or not an image file.", timeout=30_000)
        page.locator("#samcl-run textarea, #samcl-run input").fill(str(tmp_path / "no_run"))
        page.get_by_role("button", name="Open run").click()
        expect(page.locator("#samcl-message")).to_have_text(
            f"The run folder {tmp_path / 'no_run'} does not load: run folder {tmp_path / 'no_run'} does not exist; "
            f"train first (python train.py ...) or pass --run_dir", timeout=30_000)

    with running_app(run / "run") as url:
        shown = click_to_segment(url, path, xy, tmp_path / "profile", tmp_path / "app.png", browser,
                                 then=errors_in_the_page)
    _, _, routing = expected(predictor, image, [xy], [1])
    assert shown["domain"] == routing.domain, shown
    assert shown["after"] != shown["before"] and shown["after"].endswith(".png")
    listed = shown["downloads"].replace("\n", "")  # the page breaks a name before its extension
    assert f"{path.stem}_mask.png" in listed and f"{path.stem}_overlay.png" in listed
    assert "predicted IoU" in shown["details"] and "this click: " in shown["details"]
    assert (tmp_path / "app.png").stat().st_size > 10_000
