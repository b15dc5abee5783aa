"""The SAMCL training loss: focal + 10 * dice + IoU-head MSE, as the release computes it."""
from functools import reduce
from operator import add

import torch
import torch.nn.functional as F

IOU_TARGETS = ("reference", "sigmoid")
FOCAL_FORMS = ("reference", "logits")
IOU_EPS = 1e-7  # the release's epsilon in the IoU target's denominator


def per_image(values: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """(N, ...) -> (N,): the sum or mean of each image's values, one reduction per image as the
    release computes its per-image terms (a batched reduction splits the work otherwise and
    rounds differently at full size)."""
    return torch.stack([getattr(v.reshape(-1), reduce)() for v in values])


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.8, gamma: int = 2,
               form: str = "reference") -> torch.Tensor:
    """Per image: mean over pixels of ``alpha * (1 - exp(-BCE))**gamma * BCE``.

    form "reference" (the release): BCE = ``F.binary_cross_entropy(sigmoid(logits), g)``;
    its logs are clamped at -100, and in fp32 sigmoid is exactly 1.0 above a logit of
    about 16.6, so a confidently wrong pixel costs 100 and passes no gradient. "logits":
    ``binary_cross_entropy_with_logits``, the same value elsewhere, unbounded and with
    a full gradient there.

    Args:
        logits, target: (N, 1, H, W). Returns (N,).
    """
    if form == "reference":
        bce = F.binary_cross_entropy(torch.sigmoid(logits), target, reduction="none")
    elif form == "logits":
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    else:
        raise ValueError(f"focal must be one of {FOCAL_FORMS}, got {form!r}")
    return per_image(alpha * (1 - torch.exp(-bce)) ** gamma * bce, "mean")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per image: ``1 - (2 sum(p g) + 1) / (sum p + sum g + 1)`` with p = sigmoid(logits). Returns (N,)."""
    p = torch.sigmoid(logits)
    return 1 - (2 * per_image(p * target) + smooth) / (per_image(p) + per_image(target) + smooth)


def binary_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image IoU of two {0,1} maps (N, ...) -> (N,); 1.0 where both are empty."""
    p = pred.flatten(1).float()
    g = target.flatten(1).float()
    inter = (p * g).sum(1)
    union = p.sum(1) + g.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def iou_target(logits: torch.Tensor, target: torch.Tensor, rule: str = "reference") -> torch.Tensor:
    """IoU the IoU head should predict, as the release computes it: ``inter / (union + 1e-7)``
    (0 where prediction and mask are both empty) of the prediction ``logits >= 0.5``
    (reference, quirk Q3) or ``sigmoid(logits) >= 0.5`` (rule "sigmoid"). Returns (N,)."""
    if rule not in IOU_TARGETS:
        raise ValueError(f"iou_target must be one of {IOU_TARGETS}, got {rule!r}")
    p = (logits >= (0.5 if rule == "reference" else 0.0)).float()
    inter = per_image(p * target)
    union = per_image(p) + per_image(target) - inter
    return inter / (union + IOU_EPS)


def running_sum(values: torch.Tensor) -> torch.Tensor:
    """``0 + v_0 + v_1 + ...`` left to right, as the release accumulates its per-image terms
    (the same float rounding as its loop, on every device)."""
    return reduce(add, values.unbind(0), values.new_zeros(()))


def samcl_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, iou_rule: str = "reference",
               focal: str = "reference") -> torch.Tensor:
    """``sum_i focal_i + 10 sum_i dice_i + sum_i (iou_pred_i - IoU_i)^2 / N`` over a batch,
    each sum accumulated image by image as the release does.

    Args:
        logits: (N, 1, H, W) mask logits; iou_pred: (N, 1); target: (N, 1, H, W) in {0, 1}.
    Returns:
        scalar loss.
    """
    with torch.no_grad():
        iou = iou_target(logits, target, iou_rule)
    mse = (iou_pred.squeeze(1) - iou) ** 2 / iou_pred.shape[0]
    return (running_sum(focal_loss(logits, target, form=focal)) + 10 * running_sum(dice_loss(logits, target))
            + running_sum(mse))


def soft_iou_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-3) -> torch.Tensor:
    """Per image: ``1 - (sum(p g) + 1e-3) / (sum p + sum g - sum(p g) + 1e-3)``, p = sigmoid(logits). Returns (N,)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    g = target.float().flatten(1)
    inter = (p * g).sum(1)
    union = p.sum(1) + g.sum(1) - inter
    return 1 - (inter + smooth) / (union + smooth)


def cad_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CAD's loss: per image BCE on p = sigmoid(logits) (mean over pixels) + soft IoU
    loss, *summed* over the batch like :func:`samcl_loss` (so the loop's loss/image is comparable).

    CAD averages over the batch instead; with Adam(W) that is the same update up to eps
    (Adam is invariant to the loss scale). BCE is computed from the logits
    (``binary_cross_entropy_with_logits``: the same value as BCE on sigmoid probabilities,
    without its log clamp at -100, and safe under autocast).
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (bce + soft_iou_loss(logits, target)).sum()


LOSSES = ("samcl", "bce_iou")


def training_loss(name: str, logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor,
                  iou_rule: str = "reference", focal: str = "reference") -> torch.Tensor:
    """The configured training loss: 'samcl' or 'bce_iou' (CAD; no IoU-head term)."""
    if name == "samcl":
        return samcl_loss(logits, iou_pred, target, iou_rule, focal)
    if name == "bce_iou":
        return cad_loss(logits, target)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
