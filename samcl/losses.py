"""The SAMCL training loss (SPEC §6): focal + 10 * dice + IoU-head MSE."""
import torch
import torch.nn.functional as F

IOU_TARGETS = ("reference", "sigmoid")


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.8, gamma: float = 2.0) -> torch.Tensor:
    """Per image: mean over pixels of ``alpha * (1 - exp(-BCE))**gamma * BCE``.

    Args:
        logits, target: (N, 1, H, W). Returns (N,).
    """
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (alpha * (1 - torch.exp(-bce)) ** gamma * bce).flatten(1).mean(1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per image: ``1 - (2 sum(p g) + 1) / (sum p + sum g + 1)`` with p = sigmoid(logits). Returns (N,)."""
    p = torch.sigmoid(logits).flatten(1)
    g = target.flatten(1)
    return 1 - (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)


def binary_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image IoU of two {0,1} maps (N, ...) -> (N,); 1.0 where both are empty."""
    p = pred.flatten(1).float()
    g = target.flatten(1).float()
    inter = (p * g).sum(1)
    union = p.sum(1) + g.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def iou_target(logits: torch.Tensor, target: torch.Tensor, rule: str = "reference") -> torch.Tensor:
    """IoU the IoU head should predict: raw logits >= 0.5 (reference, quirk Q3) or sigmoid >= 0.5."""
    if rule not in IOU_TARGETS:
        raise ValueError(f"iou_target must be one of {IOU_TARGETS}, got {rule!r}")
    pred = logits >= (0.5 if rule == "reference" else 0.0)
    return binary_iou(pred, target)


def samcl_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, iou_rule: str = "reference") -> torch.Tensor:
    """``sum_i (focal_i + 10 dice_i) + mean_i (iou_pred_i - IoU_i)^2`` over a batch.

    Args:
        logits: (N, 1, H, W) mask logits; iou_pred: (N, 1); target: (N, 1, H, W) in {0, 1}.
    Returns:
        scalar loss.
    """
    with torch.no_grad():
        iou = iou_target(logits, target, iou_rule)
    mse = (iou_pred.squeeze(1) - iou) ** 2
    return (focal_loss(logits, target) + 10 * dice_loss(logits, target)).sum() + mse.mean()


def soft_iou_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-3) -> torch.Tensor:
    """Per image: ``1 - (sum(p g) + 1e-3) / (sum p + sum g - sum(p g) + 1e-3)``, p = sigmoid(logits). Returns (N,)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    g = target.float().flatten(1)
    inter = (p * g).sum(1)
    union = p.sum(1) + g.sum(1) - inter
    return 1 - (inter + smooth) / (union + smooth)


def cad_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CAD's loss (SPEC §11): per image BCE on p = sigmoid(logits) (mean over pixels) + soft IoU
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
                  iou_rule: str = "reference") -> torch.Tensor:
    """The configured training loss: 'samcl' (SPEC §6) or 'bce_iou' (CAD, SPEC §11; no IoU-head term)."""
    if name == "samcl":
        return samcl_loss(logits, iou_pred, target, iou_rule)
    if name == "bce_iou":
        return cad_loss(logits, target)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
