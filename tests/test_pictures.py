"""Pictures: the overlay's colours stand out from the image under the mask, with a legend; the
comparison's storage bars are on a log scale with their values written on them."""
import numpy as np
import pytest

from samcl.pictures import (ALPHA, NEGATIVE, POSITIVE, comparison_figure, contour, overlay, overlay_colours,
                            _pyplot)

RED = (200, 30, 30)
CYAN, MAGENTA, YELLOW = (0, 235, 255), (255, 40, 220), (255, 240, 0)


def disc(h: int, w: int, cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def test_contour_is_the_band_inside_the_mask_and_the_image_border_counts_as_outside():
    m = np.zeros((8, 8), bool)
    m[0:5, 0:5] = True  # touches the top and left borders
    one = contour(m, 1)
    want = m.copy()
    want[0:4, 0:4] = False
    want[0, 0:5] = want[0:5, 0] = True  # along the border too
    assert np.array_equal(one, want)
    two = contour(m, 2)
    assert two.sum() == 25 - 1 and not two[2, 2] and not (two & ~m).any()  # all but the centre of 5 x 5


def test_overlay_on_a_red_image_draws_a_contrasting_contour_and_a_legend():
    h, w = 120, 200  # narrower than 320: enlarged by 2
    image = np.zeros((h, w, 3), np.uint8)
    image[:] = RED
    mask = disc(h, w, 70, 60, 30)
    truth = disc(h, w, 130, 60, 30)
    mask_colour, truth_colour = overlay_colours(image, mask, truth)
    assert mask_colour == CYAN and truth_colour == YELLOW  # far from red, and from each other
    assert np.linalg.norm(np.subtract(mask_colour, RED)) > 250
    picture = np.asarray(overlay(image, mask, np.array([[70, 60], [190, 10]]), [1, 0], "a red polyp", truth))
    k = 2
    assert picture.shape[1] == k * w and picture.shape[0] > k * h
    left = k * (70 - 30)  # the mask's leftmost pixel on row 60, on its contour, far from the truth's
    assert tuple(picture[k * 60, left]) == mask_colour != RED
    assert tuple(picture[k * 60, left - 1]) == RED  # just outside the mask: the image as it was
    inside = tuple(picture[k * 45, k * 70])  # in the mask, off the contour and the points: tinted
    assert inside == tuple(int(v) for v in ((1 - ALPHA) * np.array(RED) + ALPHA * np.array(CYAN)).round())
    assert tuple(picture[k * 60, k * (130 + 30)]) == truth_colour  # the truth's rightmost pixel
    assert tuple(picture[k * 60, k * (130 + 30) + k]) == RED
    assert tuple(picture[k * 60, k * 70]) == POSITIVE and tuple(picture[k * 10, k * 190]) == NEGATIVE
    legend = picture[k * h:].reshape(-1, 3)
    for colour in (mask_colour, truth_colour, POSITIVE, NEGATIVE):  # a swatch of each in the strip below
        assert (legend == colour).all(1).any(), colour
    plain = np.asarray(overlay(image, mask, caption="no truth, no points"))[k * h:].reshape(-1, 3)
    assert (plain == mask_colour).all(1).any()
    assert not (plain == truth_colour).all(1).any() and not (plain == POSITIVE).all(1).any()


@pytest.mark.parametrize("colour, want", [((30, 200, 40), MAGENTA), ((240, 240, 240), (255, 150, 0)),
                                          ((0, 200, 230), (255, 150, 0))])
def test_the_mask_colour_is_the_palette_hue_farthest_from_the_image_under_the_mask(colour, want):
    image = np.zeros((40, 60, 3), np.uint8)
    image[:] = (128, 128, 128)
    mask = disc(40, 60, 30, 20, 10)
    image[mask] = colour  # only the mask's region counts
    assert overlay_colours(image, mask)[0] == want
    everywhere = np.zeros_like(image) + np.array(colour, np.uint8)  # no mask: the whole image counts
    assert overlay_colours(everywhere, np.zeros_like(mask))[0] == want


def test_the_storage_bars_are_on_a_log_scale_with_their_values():
    rows = [{"run": "SAMCL", "iou_AA": 0.8, "iou_FM": 0.01, "stored_mb_per_domain": 0.0213},
            {"run": "samcl-lora", "iou_AA": 0.79, "iou_FM": None, "stored_mb_per_domain": 0.61},
            {"run": "finetune", "iou_AA": 0.6, "iou_FM": 0.2, "stored_mb_per_domain": 358.0},
            {"run": "nothing", "iou_AA": None, "iou_FM": None, "stored_mb_per_domain": 0.0}]
    fig = comparison_figure(rows)
    try:
        storage = fig.axes[1]
        assert storage.get_yscale() == "log" and storage.get_title() == "stored per trained domain"
        assert [t.get_text() for t in storage.texts] == ["0.0213 MB", "0.61 MB", "358 MB", "0 MB"]
        tops = [p.get_y() + p.get_height() for p in storage.patches]
        assert tops[:3] == pytest.approx([0.0213, 0.61, 358.0]) and tops[3] == pytest.approx(storage.get_ylim()[0])
        low, high = storage.get_ylim()
        assert low < 0.0213 / 2 and high > 358 * 2  # the smallest bar is seen, the tallest's label fits
    finally:
        _pyplot().close(fig)
