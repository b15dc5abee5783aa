"""Segment your own images with a trained run, in the language of segment_anything's SamPredictor.

    from samcl.predictor import SAMCLPredictor
    predictor = SAMCLPredictor.from_run("log_sam1/SAMCL_Kvasir_camo_ISTD_ISIC_cod_COCO_300_1234_training")
    predictor.set_image(image)                      # H x W x 3 uint8 RGB, any size
    masks, scores, logits = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1]))
    predictor.routing                               # Routing(domain='Kvasir', probabilities={'Kvasir': 0.93, ...})
    masks, scores, logits = predictor.predict(point_coords=np.array([[500, 375]]), point_labels=np.array([1]),
                                              mask_input=logits[np.argmax(scores)][None], multimask_output=False)
    masks, scores, logits = predictor.predict(box=np.array([100, 80, 620, 540]), domain="vanilla")

``predict`` takes and returns what ``SamPredictor.predict`` does: ``masks`` (C, H, W) bool at
the image's size (float logits with ``return_logits``), ``scores`` (C,) the predicted IoU,
``logits`` (C, 256, 256 at 1024 input) low-resolution logits that ``mask_input`` takes back
(on SAM 2 clamped to +-32, as SAM2ImagePredictor returns them); C = 3 with ``multimask_output`` (the default), else 1. After each call :attr:`~SAMCLPredictor.routing`
says which domain's module segmented the image and the Module Selector's probabilities;
``domain=`` forces a domain's module ("vanilla": the frozen backbone). The learning modules were
trained on the single-mask output (the release's ``multimask_output=False``).

The image is prepared as the training data were (PIL bilinear resize to the model's S x S input,
aspect ratio ignored; SamPredictor resizes the longest side and pads); prompt coordinates are in
the *original* image's pixels, and the decoder's logits are upsampled to S x S as the run says
(``upsample``: nearest on SAM by default, as the release; bilinear is SamPredictor's), then
bilinearly to the image's size. :meth:`~SAMCLPredictor.predict_batch` segments many images at
once, routed as a batch. Works for this project's run folders (SAM and SAM 2, every learning
module) and for the authors' release folders (:func:`samcl.opening.open_run`).
"""
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbones.base import DecodeOptions
from .data import PAD_LABEL, resize_image
from .model import VANILLA, ModuleBank
from .opening import OpenedRun, open_run
from .precision import autocast, check_amp

ArrayLike = Union[np.ndarray, Sequence]


class Routing(NamedTuple):
    """Which module segmented an image."""

    domain: str  # the domain whose module segmented the image, or "vanilla"
    probabilities: Dict[str, float]  # the selector's softmax over the run's domains


class Prediction(NamedTuple):
    """One image's result of :meth:`SAMCLPredictor.predict_batch`: SamPredictor's three, and the routing."""

    masks: np.ndarray  # (C, H, W) bool at the original size, or float logits with return_logits
    iou_predictions: np.ndarray  # (C,)
    low_res_logits: np.ndarray  # (C, L, L) the decoder's own logits (256 x 256 at 1024)
    domain: str  # the domain whose module segmented the image, or "vanilla"
    probabilities: Dict[str, float]  # the selector's softmax over the run's domains


class SAMCLPredictor:
    """A trained module bank on one image at a time (:meth:`set_image`, :meth:`predict`) or a
    batch (:meth:`predict_batch`, routed as a batch, as test.py does)."""

    def __init__(self, model: ModuleBank, amp: str = "off", mask_threshold: float = 0.0,
                 run: Optional[OpenedRun] = None) -> None:
        self.model = model.eval()
        self.device = model.device
        check_amp(amp, self.device)
        self.amp = amp
        self.mask_threshold = mask_threshold  # on the logits: sigmoid >= 0.5, as the metrics threshold
        self.run = run  # the opened run folder (its configuration and manifest), when made by from_run
        self.routing: Optional[Routing] = None  # of the latest predict()
        self._image: Optional[torch.Tensor] = None
        self._prefix = None
        self._size = (0, 0)

    @classmethod
    def from_run(cls, run_dir: Union[str, Path], device: Optional[Union[str, torch.device]] = None, amp: str = "off",
                 ckpt: Optional[str] = None, random_weights: Optional[bool] = None, **settings) -> "SAMCLPredictor":
        """Load a run folder of this project (converted release folders included) or a raw release
        folder (:func:`samcl.opening.open_run`). The backbone weights are the run's own unless
        ``ckpt`` / ``random_weights`` say otherwise (they are checked against the run's, as test.py
        does); ``settings`` are further Config settings (e.g. ``img_size`` or ``order`` for a release folder)."""
        dev = torch.device(device) if device is not None else torch.device("cuda:0" if torch.cuda.is_available()
                                                                             else "cpu")
        run = open_run(run_dir, dev, ckpt=ckpt, random_weights=random_weights, settings=settings)
        return cls(run.model, amp=amp, run=run)

    # ------------------------------------------------------------------ one image
    def set_image(self, image: np.ndarray) -> None:
        """``image``: H x W x 3 uint8 RGB. Resized as the training images were; the frozen encoder
        prefix (which also feeds the selector) is computed once here."""
        self._image = self._prepare(image)
        self._size = image.shape[:2]
        self.routing = None
        with torch.no_grad(), autocast(self.amp, self.device):
            self._prefix = self.model.backbone.encode_prefix(self._image)

    def predict(self, point_coords: Optional[ArrayLike] = None, point_labels: Optional[ArrayLike] = None,
                box: Optional[ArrayLike] = None, mask_input: Optional[ArrayLike] = None,
                multimask_output: bool = True, return_logits: bool = False, *,
                domain: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment the image of :meth:`set_image`, as ``SamPredictor.predict``; the routing is then
        in :attr:`routing`.

        Args:
            point_coords: (P, 2) (x, y) in the original image's pixels; point_labels: (P,) 1 or 0
                (default: all 1).
            box: (4,) x0, y0, x1, y1 in original pixels, with the points or alone (a module that
                reads the point heatmap needs points too).
            mask_input: (1, L, L) low-resolution logits of an earlier prediction (L = 256 at 1024).
            multimask_output: three masks instead of one.
            return_logits: the masks as float logits instead of bool.
            domain: None routes with the selector; a domain name forces its module; "vanilla" none.
        Returns:
            masks (C, H, W), scores (C,), low-resolution logits (C, L, L); C = 3 with
            ``multimask_output``, else 1.
        """
        if self._image is None:
            raise RuntimeError("call set_image(image) before predict()")
        points, labels = self._prompts(point_coords, point_labels, self._size)
        boxes = None if box is None else self._box(box, self._size)
        options = DecodeOptions(multimask=multimask_output, mask_input=self._mask_input(mask_input),
                                points_with_box=boxes is not None)
        out = self._run(self._image, points[None], labels[None], domain, boxes, options, prefix=self._prefix)
        result = self._result(out, 0, self._size, return_logits)
        self.routing = Routing(result.domain, result.probabilities)
        return result.masks, result.iou_predictions, result.low_res_logits

    # ------------------------------------------------------------------ a batch
    def predict_batch(self, images: Sequence[np.ndarray], point_coords: Sequence[ArrayLike],
                      point_labels: Sequence[ArrayLike], domain: Optional[str] = None,
                      return_logits: bool = False, multimask_output: bool = False) -> List[Prediction]:
        """Many images at once (any sizes), routed as one batch; coordinates per image in its own
        pixels. One :class:`Prediction` per image: masks, scores, low-resolution logits (one mask
        each unless ``multimask_output``) and its routing."""
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
        out = self._run(batch, points, labels, domain, None, DecodeOptions(multimask=multimask_output))
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

    def _mask_input(self, mask_input: Optional[ArrayLike]) -> Optional[torch.Tensor]:
        if mask_input is None:
            return None
        m = np.asarray(mask_input, dtype=np.float32)
        side = self.model.backbone.low_res_size
        if m.shape != (1, side, side):
            raise ValueError(f"mask_input must be (1, {side}, {side}) low-resolution logits (one mask of predict()'s "
                             f"third result, e.g. logits[i][None]), got shape {m.shape}")
        return torch.from_numpy(m)[None].to(self.device)

    def _run(self, images, points, labels, domain, boxes, options: DecodeOptions, prefix=None):
        if points.shape[1] == 0 and self.model.needs_heatmap and domain != VANILLA:
            raise ValueError(f"the {self.model.kind} modules read the point heatmap: give at least one point")
        with torch.no_grad(), autocast(self.amp, self.device):
            return self.model.predict(images, points, labels, domain=domain, boxes=boxes, prefix=prefix,
                                      options=options)

    def _result(self, out, i: int, hw, return_logits: bool) -> Prediction:
        logits = F.interpolate(out["logits"][i: i + 1].float(), size=tuple(hw), mode="bilinear", align_corners=False)[0]
        low = out["low_res_logits"][i].float()
        limit = self.model.backbone.predictor_logit_limit  # as the family's own predictor returns them
        if limit is not None:
            low = low.clamp(-limit, limit)
        k = int(out["choice"][i])
        probs = out["probabilities"][i].float().cpu().tolist()
        return Prediction(
            masks=(logits if return_logits else logits > self.mask_threshold).cpu().numpy(),
            iou_predictions=out["iou"][i].float().cpu().numpy(),
            low_res_logits=low.cpu().numpy(),
            domain=VANILLA if k < 0 else self.model.domains[k],
            probabilities=dict(zip(self.model.domains, probs)))
