"""Heatmaps against hand-computed grids (OpenCV's 9-tap kernel)."""
import cv2
import numpy as np
import pytest
import torch

from samcl.heatmap import blur_grid, point_grid, points_to_heatmap

# cv2.getGaussianKernel(9, 0): OpenCV's fixed table, centre 15/64, neighbours 12.75/64, 7.5/64, 3.25/64, 1/64
K = [1 / 64, 3.25 / 64, 7.5 / 64, 12.75 / 64, 15 / 64, 12.75 / 64, 7.5 / 64, 3.25 / 64, 1 / 64]


def heat(points, grid=64, frame=1024):
    return points_to_heatmap(torch.tensor([points], dtype=torch.float32), grid, frame)[0]


def test_kernel_is_opencvs():
    assert np.allclose(cv2.getGaussianKernel(9, 0).ravel(), K)


def test_single_point_first_index_is_x():
    h = heat([[512.0, 256.0]])  # cell x = 32, y = 16
    assert h.shape == (64, 64)
    assert h[32, 16].item() == pytest.approx(255 * K[4] * K[4])  # 14.0076
    assert h[33, 16].item() == pytest.approx(255 * K[5] * K[4])  # one step along x
    assert h[32, 18].item() == pytest.approx(255 * K[6] * K[4])  # two steps along y
    assert h[16, 32].item() == 0.0  # not transposed
    assert h.sum().item() == pytest.approx(255.0, rel=1e-5)  # the kernel sums to 1


def test_two_points_in_one_cell_count_once():
    assert torch.equal(heat([[512.0, 256.0], [515.0, 271.0]]), heat([[512.0, 256.0]]))


def test_points_on_the_border_reflect_101():
    # a point in cell x = 1: reflect-101 mirrors it onto x = -1, so cell x = 0 gets two neighbour weights
    h = heat([[16.0, 512.0]])
    assert h[0, 32].item() == pytest.approx(255 * 2 * K[3] * K[4])  # 23.81
    # cell 1 gets its own centre weight plus its mirror image at x = -1, two cells away
    assert h[1, 32].item() == pytest.approx(255 * (K[4] + K[2]) * K[4])  # 21.01
    # x = 1023 is the last cell; x = 1024 (on the border) is clamped into it
    assert torch.equal(heat([[1023.0, 0.0]]), heat([[1024.0, 0.0]]))
    assert heat([[1023.0, 0.0]])[63, 0].item() == pytest.approx(255 * K[4] * K[4])


def test_matches_cv2_gaussianblur_on_random_points():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1024, (4, 3, 2)).astype(np.float32)
    ours = points_to_heatmap(torch.from_numpy(pts), 64, 1024).numpy()
    for n in range(4):
        g = np.zeros((64, 64), np.float32)
        for x, y in pts[n]:
            g[int(x * 64 / 1024)][int(y * 64 / 1024)] = 1
        assert np.abs(ours[n] - cv2.GaussianBlur(g, (9, 9), 0) * 255).max() < 1e-4


def test_padding_points_are_ignored():
    pts = torch.tensor([[[512.0, 256.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, -1]])
    assert torch.equal(points_to_heatmap(pts, 64, 1024, labels)[0], heat([[512.0, 256.0]]))


def test_other_grid_and_frame():
    g = point_grid(torch.tensor([[[100.0, 20.0]]]), 16, 128)  # cell (12, 2)
    assert g[0].nonzero().tolist() == [[12, 2]]
    assert blur_grid(g).shape == (1, 16, 16)
