"""Point heatmaps: the prompt-location prior that the AugModule consumes.

A heatmap is built once per image from its prompt points, on the same device as
the model, in one batched call (no CPU round trip, no per-image loop). As in the
release, the blur and the scaling by 255 run in float64 and the result is cast to
float32 (the release blurs a float64 NumPy grid with OpenCV).
"""
from functools import lru_cache
from typing import Optional

import cv2
import torch
import torch.nn.functional as F

BLUR_KSIZE = 9


@lru_cache(maxsize=None)
def _opencv_kernel(ksize: int) -> tuple:
    """1-D kernel that ``cv2.GaussianBlur(img, (ksize, ksize), 0)`` applies.

    With sigma 0 OpenCV derives sigma from the size (1.7 for 9 taps) and, for
    small odd sizes, uses a fixed bit-exact table; taking the kernel from OpenCV
    itself reproduces the reference's blur exactly.
    """
    return tuple(float(v) for v in cv2.getGaussianKernel(ksize, 0).ravel())


def point_grid(points: torch.Tensor, grid_size: int, frame_size: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mark the grid cell of every point with 1 (several points in a cell count once).

    Args:
        points: (N, P, 2) float, (x, y) in a ``frame_size`` x ``frame_size`` frame.
        grid_size: side G of the grid (64 for SAM ViT-B at 1024).
        frame_size: side of the frame the points live in (1024 for SAM).
        valid: optional (N, P) bool; padding points (False) are left out.
    Returns:
        (N, G, G) float grid whose *first* spatial index is x (reference layout:
        ``grid[int(x*G/S)][int(y*G/S)] = 1``). Points on or past the border are
        clamped into the grid.
    """
    n, p, _ = points.shape
    cells = torch.floor(points * grid_size / frame_size).long().clamp_(0, grid_size - 1)
    flat = cells[..., 0] * grid_size + cells[..., 1]  # (N, P), x-major
    if valid is not None:
        flat = torch.where(valid, flat, grid_size * grid_size)  # a spare slot, dropped below
    grid = torch.zeros(n, grid_size * grid_size + 1, device=points.device, dtype=torch.float32)
    grid.scatter_(1, flat, 1.0)
    return grid[:, :-1].reshape(n, grid_size, grid_size)


def blur_grid(grid: torch.Tensor, ksize: int = BLUR_KSIZE) -> torch.Tensor:
    """``float32(cv2.GaussianBlur(float64 grid, (ksize, ksize), 0) * 255)`` for a batch, on grid's device.

    Args:
        grid: (N, G, G).
    Returns:
        (N, G, G) float32; OpenCV's default border (reflect-101) is torch's 'reflect'.
    """
    k = torch.tensor(_opencv_kernel(ksize), device=grid.device, dtype=torch.float64)
    pad = ksize // 2
    x = F.pad(grid.to(torch.float64).unsqueeze(1), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, ksize))  # along the second axis
    x = F.conv2d(x, k.view(1, 1, ksize, 1))  # along the first axis
    return (x.squeeze(1) * 255.0).float()


def points_to_heatmap(points: torch.Tensor, grid_size: int, frame_size: int,
                      labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Blurred point heatmap (N, G, G), first spatial index x; points labelled -1 (padding) are left out."""
    valid = None if labels is None else labels >= 0
    return blur_grid(point_grid(points, grid_size, frame_size, valid))
