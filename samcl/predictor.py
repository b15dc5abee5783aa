"""Segment your own images with a trained run, in the conventions of segment_anything's SamPredictor.

    from samcl.predictor import SAMCLPredictor
    predictor = SAMCLPredictor.from_run("log_sam1/SAMCL_Kvasir_camo_ISTD_ISIC_cod_COCO_300_1234_training")
    predictor.set_image(image)                      # H x W x 3 uint8 RGB, any size
    masks, scores, logits, domain, probs = predictor.predict(point_coords=[[500, 375]], point_labels=[1])

The image is prepared as the training data were (PIL bilinear resize to the model's
S x S input, aspect ratio ignored); prompt coordinates are in the *original* image's
pixels and masks come back at its size. Each prediction also says which domain's module
was used and the Module Selector's probabilities; ``domain=`` forces one ("vanilla": the
frozen backbone). Works for this project's run folders (SAM and SAM 2, every learning
module) and for the authors' release folders.
"""
import dataclasses
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import build_config, default_config, load_config
from .data import PAD_LABEL, resize_image
from .model import SAMCLModel
from .pipeline import load_run
from .precision import autocast, check_amp
from .release import RELEASE_ORDER, RELEASE_UNSEEN
from .release.folder import is_release_folder, read_release_folder
from .run_folder import MANIFEST, read_manifest

ArrayLike = Union[np.ndarray, Sequence]


class Prediction(NamedTuple):
    """One image's result. The first three are SamPredictor's (C = 1 mask)."""

    masks: np.ndarray  # (C, H, W) bool at the original size, or float logits with return_logits
    iou_predictions: np.ndarray  # (C,)
    low_res_logits: np.ndarray  # (C, 4G, 4G) the decoder's own logits (256 x 256 at 1024)
    domain: str  # the domain whose module segmented the image, or "vanilla"
    probabilities: dict  # the selector's softmax over the run's domains


class SAMCLPredictor:
    """A trained module bank on one image at a time (:meth:`set_image`, :meth:`predict`) or a
    batch (:meth:`predict_batch`, routed as a batch, as test.py does)."""

    def __init__(self, model: SAMCLModel, amp: str = "off", mask_threshold: float = 0.0) -> None:
        self.model = model.eval()
        self.device = model.device
        check_amp(amp, self.device)
        self.amp = amp
        self.mask_threshold = mask_threshold  # on the logits: sigmoid >= 0.5, as the metrics threshold
        self._image: Optional[torch.Tensor] = None
        self._prefix = None
        self._size = (0, 0)

    @classmethod
    def from_run(cls, run_dir: Union[str, Path], device: Optional[Union[str, torch.device]] = None, amp: str = "off",
                 ckpt: Optional[str] = None, random_weights: Optional[bool] = None, **settings) -> "SAMCLPredictor":
        """Load a run folder of this project (converted release folders included) or a raw release
        folder. The backbone weights are the run's own unless ``ckpt`` / ``random_weights`` say
        otherwise (they are checked against the run's, as test.py does); ``settings`` are further
        Config settings (e.g. ``img_size`` or ``order`` for a release folder)."""
        run_dir = Path(run_dir)
        dev = torch.device(device) if device is not None else torch.device("cuda:0" if torch.cuda.is_available()
                                                                             else "cpu")
        if is_release_folder(run_dir):
            family = read_release_folder(run_dir, RELEASE_ORDER, RELEASE_UNSEEN).family
            cfg = load_config(default_config(family, None), {"backbone": family, "ckpt": ckpt,
                                                             "random_weights": random_weights, **settings})
        else:
            stored = build_config([(str(run_dir / MANIFEST), read_manifest(run_dir)["config"])])
            given = {k: v for k, v in dict(ckpt=ckpt, random_weights=random_weights, **settings).items()
                     if v is not None}
            cfg = dataclasses.replace(stored, **given)
        return cls(load_run(run_dir, cfg, dev), amp=amp)

    # ------------------------------------------------------------------ one image
    def set_image(self, image: np.ndarray) -> None:
        """``image``: H x W x 3 uint8 RGB. Resized as the training images were; the frozen encoder
        prefix (which also feeds the selector) is computed once here."""
        self._image = self._prepare(image)
        self._size = image.shape[:2]
        with torch.no_grad(), autocast(self.amp, self.device):
            self._prefix = self.model.backbone.encode_prefix(self._image)

    def predict(self, point_coords: Optional[ArrayLike] = None, point_labels: Optional[ArrayLike] = None,
                box: Optional[ArrayLike] = None, multimask_output: bool = False, return_logits: bool = False,
                domain: Optional[str] = None) -> Prediction:
        """Segment the image of :meth:`set_image`.

        Args:
            point_coords: (P, 2) (x, y) in the original image's pixels; point_labels: (P,) 1 or 0.
            box: (4,) x0, y0, x1, y1 in original pixels (SAM backbones; a module that reads the point
                heatmap needs points too).
            domain: None routes with the selector; a domain name forces its module; "vanilla" none.
        """
        if self._image is None:
            raise RuntimeError("call set_image(image) before predict()")
        if multimask_output:
            raise ValueError("multimask_output=True is not supported: the modules are trained for one mask per "
                             "prompt set, as in the release")
        points, labels = self._prompts(point_coords, point_labels, self._size)
        boxes = None if box is None else self._box(box, self._size)
        out = self._run(self._image, points[None], labels[None], domain, boxes, prefix=self._prefix)
        return self._result(out, 0, self._size, return_logits)

    # ------------------------------------------------------------------ a batch
    def predict_batch(self, images: Sequence[np.ndarray], point_coords: Sequence[ArrayLike],
                      point_labels: Sequence[ArrayLike], domain: Optional[str] = None,
                      return_logits: bool = False) -> List[Prediction]:
        """Many images at once (any sizes), routed as one batch; coordinates per image in its own pixels."""
        if not (len(images) == len(point_coords) == len(point_labels)) or not images:
            raise ValueError(f"give as many point sets and label sets as images (got {len(images)} images, "
                             f"{len(point_coords)} point sets, {len(point_labels)} label sets)")
        prompts = [self._prompts(c, lab, img.shape[:2]) for img, c, lab in zip(images, point_coords, point_labels)]
        p = max(len(c) for c, _ in prompts)
        points = torch.zeros(len(images), p, 2, device=self.device)
        labels = torch.full((len(images), p), PAD_LABEL, dtype=torch.long, device=self.device)
        for i, (c, lab) in enumerate(prompts):
            points[i, : len(c)], labels[i, : len(lab)] = c, lab
        batch = torch.cat([self._prepare(img) for img in images])
        out = self._run(batch, points, labels, domain, None)
        return [self._result(out, i, img.shape[:2], return_logits) for i, img in enumerate(images)]

    # ------------------------------------------------------------------ internals
    @property
    def img_size(self) -> int:
        return self.model.backbone.img_size

    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            raise ValueError(f"an image must be an H x W x 3 uint8 RGB array, got "
                             f"{getattr(image, 'dtype', type(image).__name__)} of shape {getattr(image, 'shape', '?')}")
        s = resize_image(Image.fromarray(image, "RGB"), self.img_size)
        return torch.from_numpy(np.ascontiguousarray(s.transpose(2, 0, 1)))[None].to(self.device).float()

    def check_prompts(self, point_coords: Optional[ArrayLike], point_labels: Optional[ArrayLike], hw) -> None:
        """Raise ValueError if the points do not fit an image of size ``hw`` (H, W)."""
        self._prompts(point_coords, point_labels, hw)

    def _scale(self, hw) -> np.ndarray:
        h, w = hw
        return np.array([self.img_size / w, self.img_size / h])

    def _prompts(self, coords: Optional[ArrayLike], labels: Optional[ArrayLike], hw):
        if coords is None or len(coords) == 0:
            return torch.zeros(0, 2, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device)
        c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        lab = np.ones(len(c), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        h, w = hw
        if len(lab) != len(c):
            raise ValueError(f"{len(c)} points but {len(lab)} labels")
        outside = ~((c[:, 0] >= 0) & (c[:, 0] <= w) & (c[:, 1] >= 0) & (c[:, 1] <= h))
        if outside.any():
            raise ValueError(f"points {c[outside].tolist()[:3]} lie outside the {w}x{h} image")
        if not np.isin(lab, (0, 1)).all():
            raise ValueError(f"point labels must be 1 (foreground) or 0 (background), got {sorted(set(lab.tolist()))}")
        scaled = torch.from_numpy((c * self._scale(hw)).astype(np.float32))
        return scaled.to(self.device), torch.from_numpy(lab).to(self.device)

    def _box(self, box: ArrayLike, hw) -> torch.Tensor:
        b = np.asarray(box, dtype=np.float64).reshape(4) * np.tile(self._scale(hw), 2)
        return torch.from_numpy(b.astype(np.float32))[None].to(self.device)

    def _run(self, images, points, labels, domain, boxes, prefix=None):
        if points.shape[1] == 0 and self.model.needs_heatmap:
            raise ValueError(f"the {self.model.kind} modules read the point heatmap: give at least one point")
        with torch.no_grad(), autocast(self.amp, self.device):
            return self.model.predict(images, points, labels, domain=domain, boxes=boxes, prefix=prefix)

    def _result(self, out, i: int, hw, return_logits: bool) -> Prediction:
        logits = F.interpolate(out["logits"][i: i + 1].float(), size=tuple(hw), mode="bilinear", align_corners=False)[0]
        k = int(out["choice"][i])
        probs = out["probabilities"][i].float().cpu().tolist()
        return Prediction(
            masks=(logits if return_logits else logits > self.mask_threshold).cpu().numpy(),
            iou_predictions=out["iou"][i].float().cpu().numpy(),
            low_res_logits=out["low_res_logits"][i].float().cpu().numpy(),
            domain="vanilla" if k < 0 else self.model.domains[k],
            probabilities=dict(zip(self.model.domains, probs)))
